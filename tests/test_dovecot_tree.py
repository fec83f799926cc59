"""The Debian tree with the other Dovecot major version: mirror, staleness, refusal."""

from __future__ import annotations

import pytest

from devstack import debian_tree
from devstack.debian_tree import RELEASES, TreeUnavailable

TRIXIE = debian_tree.release_for("2.4")


def test_the_mirror_is_the_one_the_host_uses(tmp_path):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text("# nothing here\n")
    (tmp_path / "sources.list.d" / "a.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n"
    )
    (tmp_path / "sources.list.d" / "b.list").write_text(
        "deb [signed-by=/k.gpg] http://mirror.example/debian/ bookworm main\n"
    )
    assert debian_tree.host_mirror(tmp_path) == "http://mirror.example/debian"
    (tmp_path / "sources.list.d" / "b.list").unlink()
    assert debian_tree.host_mirror(tmp_path) == debian_tree.DEFAULT_MIRROR


def test_a_tree_is_current_only_with_the_stamp_of_what_would_be_built(tmp_path):
    mirror = "http://mirror.example/debian"
    assert not debian_tree.is_current(tmp_path, TRIXIE, mirror)  # no stamp: interrupted
    (tmp_path / debian_tree.STAMP_NAME).write_text(debian_tree.stamp_text(TRIXIE, mirror))
    assert debian_tree.is_current(tmp_path, TRIXIE, mirror)
    assert not debian_tree.is_current(tmp_path, TRIXIE, "http://other.example/debian")
    bookworm = debian_tree.release_for("2.3")
    assert not debian_tree.is_current(tmp_path, bookworm, mirror)
    old = debian_tree.stamp_text(TRIXIE, mirror).replace(
        f"format {debian_tree.FORMAT_VERSION}", "format 0"
    )
    (tmp_path / debian_tree.STAMP_NAME).write_text(old)
    assert not debian_tree.is_current(tmp_path, TRIXIE, mirror)


def test_a_current_tree_is_used_as_it_is(tmp_path, monkeypatch):
    monkeypatch.setenv(debian_tree.CACHE_ENV, str(tmp_path))
    root = tmp_path / TRIXIE.tree_name
    root.mkdir()
    stamp = debian_tree.stamp_text(TRIXIE, debian_tree.host_mirror())
    (root / debian_tree.STAMP_NAME).write_text(stamp)
    monkeypatch.setattr(debian_tree, "why_unbuildable", lambda: pytest.fail("would build"))
    assert debian_tree.ensure_tree(TRIXIE) == root


def test_an_unbuildable_tree_is_one_line_naming_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv(debian_tree.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(debian_tree, "why_unbuildable", lambda: "needs root (debootstrap)")
    with pytest.raises(TreeUnavailable) as info:
        debian_tree.ensure_tree(TRIXIE)
    message = str(info.value)
    assert "\n" not in message
    assert message.endswith(": needs root (debootstrap)")
    assert str(tmp_path / "debian13-dovecot") in message
    assert not list(tmp_path.iterdir())  # nothing half-built left behind


def test_each_dovecot_major_has_one_release():
    assert sorted(r.dovecot_major for r in RELEASES) == ["2.3", "2.4"]
    with pytest.raises(ValueError, match="2.5"):
        debian_tree.release_for("2.5")
