"""``proxy:idle_msecs=60000:`` keeps one dict connection per IMAP session: it must work too."""

from __future__ import annotations

import re
import shutil

import dovecot_fixture as df
import httpx
import pytest
from pushsink import PushSink


class IdleDovecot(df.DovecotInstance):
    """The shipped config, with Dovecot keeping its dict connections open for 60 s."""

    def placeholder_values(self) -> dict[str, str]:
        values = super().placeholder_values()
        values["METADATA_SOCKET"] = "idle_msecs=60000:" + values["METADATA_SOCKET"]
        return values


def dict_counter(metrics_url: str, name: str) -> float:
    text = httpx.get(metrics_url).text
    match = re.search(rf"^chatmail_dict_{name}(?:_total)? ([0-9.e+]+)$", text, re.M)
    assert match, f"chatmail_dict_{name} missing from metrics"
    return float(match.group(1))


@pytest.fixture
def idle_stack():
    binary = df.find_dovecot()
    if binary is None:
        pytest.skip("dovecot binary not found (install dovecot-imapd and dovecot-lmtpd)")
    run_dir = df.make_run_dir()
    sink = PushSink()
    dovecot = IdleDovecot(run_dir, binary)
    metadata = df.MetadataServer(run_dir, dovecot.metadata_socket, sink.url)
    port = df.free_ports(1)[0]
    metadata.extra_args = ["--metrics", f"127.0.0.1:{port}"]
    try:
        metadata.start()
        dovecot.start()
        yield dovecot, metadata, f"http://127.0.0.1:{port}/metrics", sink
        crashes = dovecot.crash_lines()
    finally:
        metadata.stop()
        dovecot.stop()
        sink.close()
        shutil.rmtree(run_dir, ignore_errors=True)
    assert not crashes, crashes


def test_long_lived_dict_connection(idle_stack):
    dovecot, metadata, metrics_url, sink = idle_stack
    assert (
        "idle_msecs=60000:"
        in dovecot.config_path.parent.joinpath("conf.d", df.SNIPPET.name).read_text()
    )
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
        # 22 IMAP commands, one dict connection (Dovecot connects lazily, once).
        assert dict_counter(metrics_url, "connections") - before <= 2
        assert dict_counter(metrics_url, "commits") >= 11
        assert dict_counter(metrics_url, "open_connections") >= 1
    finally:
        imap.logout()
    code, text = df.deliver(dovecot.lmtp_port, "carol@example.net", "alice@example.org")
    assert code == 250, text
    sink.wait_for_body(b"idle-token")
