"""Shared pytest fixtures, built on the dev stack (:mod:`devstack`).

The fake push services' fixtures (``fake_apns_cert``, ``fake_fcm``, ...) are in
``fixtures_fake_push.py``, loaded as a plugin below.

Integration fixtures for a real Dovecot (:mod:`devstack.dovecot`):

* ``dovecot_build`` (session, parametrised ``2.3`` / ``2.4``): which Dovecot a test
  runs against: the host's packaged one, and the other major version from a Debian
  tree (:mod:`devstack.debian_tree`, built on first use, about a minute).  If one
  cannot be had (no ``dovecot``, not root, no debootstrap, no network) its tests are
  skipped with the reason, which the terminal summary repeats; with ``CI=true`` they
  fail instead.  Every test using it (or the fixtures below) is marked ``dovecot``.
* ``dovecot_stack`` (session, per version): one self-contained Dovecot on 127.0.0.1
  (free ports, temporary run directory, users alice@example.org / bob@example.org)
  plus the ``chatmail-metadata`` process it talks to.
* ``relay`` (function): the same Dovecot with a freshly started ``chatmail-metadata``
  on an empty database.  Extra ``chatmail.ini`` settings per test with
  ``@pytest.mark.chatmail_ini(metadata={"max_value_bytes": 400000}, params={...})``.
  At teardown the test fails if the Dovecot log shows ``Panic``, ``Fatal`` or
  ``killed with signal``, or chatmail-metadata logged a traceback or died.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
from pathlib import Path

import pytest

from devstack import debian_tree
from devstack.dovecot import VERSIONS, DovecotBuild, DovecotInstance, build_for, make_run_dir
from devstack.metadata import MetadataServer
from devstack.pushsink import PushSink
from devstack.relay import Relay

pytest_plugins = ["fixtures_fake_push"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "chatmail_ini(params=None, metadata=None): extra [params]/[metadata] settings "
        "of chatmail.ini for the `relay` fixture",
    )


# Dovecot prints a fatal config error on stderr (its log process is not up yet) and
# exits 89; this stand-in does the same and also writes a line to the log file next to
# its config (`dovecot -F -c CONFIG`; `dovecot --version` writes nothing anywhere).
FAILING_DOVECOT = """#!/bin/sh
echo "doveconf: Fatal: Error in configuration file $3 line 1: stand-in failure" >&2
[ -z "$3" ] || echo "master: Error: stand-in log line" >> "$(dirname "$3")/dovecot.log"
exit 89
"""


# Fixtures that start a real Dovecot: every test using one (directly or through another
# fixture) gets the `dovecot` marker. Modules whose own fixtures start Dovecot mark
# themselves (pytestmark).
DOVECOT_FIXTURES = frozenset({"dovecot_build", "dovecot_stack", "relay", "local_stack"})
# Why a Dovecot version's tests were skipped, for the terminal summary.
DOVECOT_SKIPS: dict[str, str] = {}


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """``-m "not dovecot"`` leaves out every test that needs a real Dovecot."""
    for item in items:
        if DOVECOT_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.dovecot)


def pytest_terminal_summary(terminalreporter) -> None:
    for version, reason in sorted(DOVECOT_SKIPS.items()):
        terminalreporter.write_line(f"Dovecot {version} tests skipped: {reason}", yellow=True)


@functools.cache
def _find_build(version: str) -> DovecotBuild | str:
    """The build for ``version``, or the one-line reason there is none (tried once)."""
    try:
        # Build progress goes to the real stderr: pytest captures the fixture's.
        return build_for(version, progress=sys.__stderr__)
    except (LookupError, ValueError, debian_tree.TreeUnavailable) as exc:
        return str(exc)


def dovecot_build_or_skip(version: str) -> DovecotBuild:
    """The Dovecot ``version`` to test against; skips (fails under CI=true) without it."""
    found = _find_build(version)
    if isinstance(found, DovecotBuild):
        return found
    reason = f"Dovecot {version}: {found}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI must run both Dovecot versions)", pytrace=False)
    DOVECOT_SKIPS[version] = found
    pytest.skip(reason)


@pytest.fixture(scope="session", params=VERSIONS, ids=[f"dovecot{v}" for v in VERSIONS])
def dovecot_build(request) -> DovecotBuild:
    return dovecot_build_or_skip(request.param)


@pytest.fixture
def failing_dovecot(tmp_path) -> Path:
    """A ``dovecot`` that fails to start as a broken config makes it (alone in its directory)."""
    directory = tmp_path / "failing-dovecot-bin"
    directory.mkdir()
    path = directory / "dovecot"
    path.write_text(FAILING_DOVECOT)
    path.chmod(0o755)
    return path


@pytest.fixture(scope="session")
def push_sink():
    """Loopback HTTP server the notifier posts to (200 for everything)."""
    sink = PushSink()
    yield sink
    sink.close()


@pytest.fixture
def sink():
    """A fresh loopback push sink for one test (scripts, delay and requests its own): the
    notifier's proxy, or the embedded proxy's upstream."""
    s = PushSink()
    yield s
    s.close()


@pytest.fixture(scope="session")
def dovecot_stack(dovecot_build, push_sink):
    run_dir = make_run_dir()
    dovecot = DovecotInstance.from_build(run_dir, dovecot_build)
    metadata = MetadataServer(run_dir, dovecot.metadata_socket, push_sink.url)
    try:
        dovecot.start()
        yield dovecot, metadata
        crashes = dovecot.crash_lines(dovecot.start_offset)
    finally:
        metadata.stop()
        dovecot.stop()
        if not os.environ.get("CHATMAIL_TEST_KEEP_RUN"):
            shutil.rmtree(run_dir, ignore_errors=True)
    if crashes:
        pytest.fail("Dovecot log shows a crash:\n" + "\n".join(crashes), pytrace=False)


@pytest.fixture
def relay(dovecot_stack, push_sink, request):
    dovecot, metadata = dovecot_stack
    marker = request.node.get_closest_marker("chatmail_ini")
    settings = dict(marker.kwargs) if marker else {}
    metadata.fresh(params=settings.get("params"), metadata=settings.get("metadata"))
    dovecot_offset = dovecot.log_size()
    metadata_offset = metadata.log_size()
    r = Relay(dovecot, metadata, push_sink)
    yield r
    r.close_clients()
    problems = [f"Dovecot: {line}" for line in dovecot.crash_lines(dovecot_offset)]
    metadata_log = metadata.log_since(metadata_offset)
    if "Traceback" in metadata_log:
        problems.append("chatmail-metadata logged a traceback:\n" + metadata_log)
    if metadata.proc is not None and metadata.proc.poll() is not None:
        problems.append(f"chatmail-metadata exited with status {metadata.proc.returncode}")
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)
