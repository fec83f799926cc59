"""Both ways Dovecot connects to the dict: one connection per IMAP session (shipped,
2.3 ``proxy:idle_msecs=60000:``, 2.4 ``idle_timeout = 60s``) and a new connection per
IMAP command (Dovecot's default, as upstream chatmail configures it); each for both
Dovecot versions."""

from __future__ import annotations

import re
import shutil
import time

import httpx
import pytest

from devstack.accounts import USERS
from devstack.dovecot import DovecotInstance, make_run_dir
from devstack.imap import ImapClient
from devstack.lmtp import deliver
from devstack.loopback import free_port
from devstack.metadata import MetadataServer
from devstack.process import running
from devstack.pushsink import PushSink

pytestmark = pytest.mark.dovecot  # every test here starts a real Dovecot (`stack`)


def wait_until(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def dict_counter(metrics_url: str, name: str) -> float:
    text = httpx.get(metrics_url).text
    match = re.search(rf"^chatmail_dict_{name}(?:_total)? ([0-9.e+]+)$", text, re.M)
    assert match, f"chatmail_dict_{name} missing from metrics"
    return float(match.group(1))


@pytest.fixture(params=["shipped", "per-command"])
def stack(request, dovecot_build):
    run_dir = make_run_dir()
    sink = PushSink()
    dovecot = DovecotInstance.from_build(run_dir, dovecot_build, attribute_dict=request.param)
    metadata = MetadataServer(run_dir, dovecot.metadata_socket, sink.url)
    port = free_port()
    metadata.extra_args = ["--metrics", f"127.0.0.1:{port}"]
    try:
        with running(metadata, dovecot):
            yield request.param, dovecot, f"http://127.0.0.1:{port}/metrics", sink
            crashes = dovecot.crash_lines()
    finally:
        sink.close()
        shutil.rmtree(run_dir, ignore_errors=True)
    assert not crashes, crashes


def test_dict_connections(stack):
    mode, dovecot, metrics_url, sink = stack
    imap = ImapClient(dovecot.imap_port, "alice@example.org", USERS["alice@example.org"])
    try:
        before = dict_counter(metrics_url, "connections")
        for i in range(10):
            typ, _ = imap.setmetadata("INBOX", {f"/private/vendor/test/k{i}": f"v{i}"})
            assert typ == "OK"
            typ, values = imap.getmetadata("INBOX", f"/private/vendor/test/k{i}")
            assert (typ, values) == ("OK", {f"/private/vendor/test/k{i}": f"v{i}".encode()})
        typ, values = imap.getmetadata("INBOX", "/private/vendor/test", depth="infinity")
        assert typ == "OK"
        assert len(values) == 10
        typ, _ = imap.setmetadata("INBOX", {"/private/devicetoken": "idle-token"})
        assert typ == "OK"
        connections = dict_counter(metrics_url, "connections") - before
        if mode == "shipped":
            # 22 IMAP commands, one dict connection (Dovecot connects lazily, once).
            assert connections <= 2
            assert dict_counter(metrics_url, "open_connections") >= 1
        elif dovecot.version == "2.3":
            assert connections >= 21
        else:
            # 2.4.1 closes an idle connection on its next ioloop pass, so a command
            # that follows within about a millisecond sometimes rides on it (seen on
            # the wire: a SET and the GET right after it on one connection; 1 to 10
            # connections for the 22 commands, by the machine's speed). What holds
            # whatever the timing: the connection is not kept while the IMAP session
            # stays open, unlike "shipped" (checked above: still open).
            assert connections >= 1
            wait_until(lambda: dict_counter(metrics_url, "open_connections") == 0, 10.0)
        assert dict_counter(metrics_url, "commits") >= 11
    finally:
        imap.logout()
    code, text = deliver(dovecot.lmtp_port, "carol@example.net", "alice@example.org")
    assert code == 250, text
    sink.wait_for_body(b"idle-token")
