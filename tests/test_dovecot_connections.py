"""Both ways Dovecot connects to the dict: one connection per IMAP session (shipped,
``proxy:idle_msecs=60000:``) and a new connection per IMAP command (Dovecot's default,
as upstream chatmail configures it)."""

from __future__ import annotations

import re
import shutil

import dovecot_fixture as df
import httpx
import pytest
from pushsink import PushSink


class PerCommandDovecot(df.DovecotInstance):
    """The shipped config without idle_msecs: a dict connection per IMAP command."""

    def write_config(self) -> None:
        super().write_config()
        snippet = self.run_dir / "conf.d" / df.SNIPPET.name
        text = snippet.read_text()
        assert "idle_msecs=60000:" in text
        snippet.write_text(text.replace("idle_msecs=60000:", ""))


def dict_counter(metrics_url: str, name: str) -> float:
    text = httpx.get(metrics_url).text
    match = re.search(rf"^chatmail_dict_{name}(?:_total)? ([0-9.e+]+)$", text, re.M)
    assert match, f"chatmail_dict_{name} missing from metrics"
    return float(match.group(1))


@pytest.fixture(params=["shipped", "per-command"])
def stack(request):
    binary = df.find_dovecot()
    if binary is None:
        pytest.skip("dovecot binary not found (install dovecot-imapd and dovecot-lmtpd)")
    run_dir = df.make_run_dir()
    sink = PushSink()
    cls = PerCommandDovecot if request.param == "per-command" else df.DovecotInstance
    dovecot = cls(run_dir, binary)
    metadata = df.MetadataServer(run_dir, dovecot.metadata_socket, sink.url)
    port = df.free_ports(1)[0]
    metadata.extra_args = ["--metrics", f"127.0.0.1:{port}"]
    try:
        metadata.start()
        dovecot.start()
        yield request.param, dovecot, f"http://127.0.0.1:{port}/metrics", sink
        crashes = dovecot.crash_lines()
    finally:
        metadata.stop()
        dovecot.stop()
        sink.close()
        shutil.rmtree(run_dir, ignore_errors=True)
    assert not crashes, crashes


def test_dict_connections(stack):
    mode, dovecot, metrics_url, sink = stack
    imap = df.ImapClient(dovecot.imap_port, "alice@example.org", df.USERS["alice@example.org"])
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
        else:
            assert connections >= 21
        assert dict_counter(metrics_url, "commits") >= 11
    finally:
        imap.logout()
    code, text = df.deliver(dovecot.lmtp_port, "carol@example.net", "alice@example.org")
    assert code == 250, text
    sink.wait_for_body(b"idle-token")
