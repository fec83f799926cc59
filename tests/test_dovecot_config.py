"""Each shipped snippet (and the test instance that includes it) passes ``doveconf -n``
of its own Dovecot version, in every attribute-dict variant the tests and bench/ use;
the other version's snippet does not (the syntaxes are incompatible)."""

from __future__ import annotations

import shutil

import pytest

from devstack.dovecot import (
    ATTRIBUTE_DICTS,
    SNIPPET_NAME,
    VERSIONS,
    DovecotInstance,
    make_run_dir,
    render,
    snippet_path,
)

# What `doveconf -n` must print back from the shipped snippet, per version.
EXPECTED = {
    "2.3": [
        "mail_attribute_dict = proxy:idle_msecs=60000:",
        "imap_capability = +XDELTAPUSH XCHATMAIL",
        'mail_plugins = " mail_lua notify push_notification push_notification_lua"',
        "push_notification_driver = lua:file=",
    ],
    "2.4": [
        "idle_timeout = 60s",
        "name = lmtp",
        "XDELTAPUSH = yes",
        "push_notification_lua = yes",
        "lua_file = ",
    ],
}


@pytest.fixture
def instance(dovecot_build):
    run_dir = make_run_dir()
    yield DovecotInstance.from_build(run_dir, dovecot_build)
    shutil.rmtree(run_dir, ignore_errors=True)


@pytest.mark.parametrize("attribute_dict", ATTRIBUTE_DICTS)
def test_doveconf_accepts_the_snippet_of_its_version(instance, attribute_dict):
    instance.attribute_dict = attribute_dict
    instance.write_config()
    result = instance.doveconf("-n")
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr, result.stderr
    if attribute_dict == "shipped":
        for line in EXPECTED[instance.version]:
            assert line in result.stdout, f"{line!r} missing from doveconf -n"


def test_doveconf_refuses_the_other_versions_snippet(instance):
    instance.write_config()
    (other,) = (v for v in VERSIONS if v != instance.version)
    text = render(snippet_path(other).read_text(), instance.placeholder_values())
    (instance.run_dir / "conf.d" / SNIPPET_NAME).write_text(text)
    result = instance.doveconf("-n")
    assert result.returncode != 0
    assert "Fatal:" in result.stderr
