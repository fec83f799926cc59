"""The relay's notifier with the push proxy, end to end, delivering to a fake APNs.

1. Embedded: chatmail-metadata's notifier calls the proxy in-process (EmbeddedProxy
   built from the same ``[notifiers]`` options an ini would carry).
2. Standalone: a real ``notifiers`` process over HTTP; the relay is the real
   Dovecot + chatmail-metadata and the mail comes in over LMTP.
The fake APNs speaks HTTP/2 over TLS on 127.0.0.1 and checks the ES256 JWT.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatmaild import dictproto as dp
from chatmaild.config import read_config
from chatmaild.database import connect
from chatmaild.jobqueue import RetryPolicy
from chatmaild.jobstore import JobStore
from chatmaild.metadata import MetadataDict
from chatmaild.notifier import Notifier
from chatmaild.pushtransport import EmbeddedPushTransport
from chatmaild.serverkeys import ServerKeys
from chatmaild.store import MetadataStore
from devstack.fakes.apns import apns_error
from devstack.loopback import free_port
from notifiers.embedded import EmbeddedProxy
from notifiers.settings import settings_from_mapping

GUID = b"0db9f01b8afe096b1c28000083ecc375"
DEVICE = "ab" * 32  # an APNs device token: 64 hex digits
PAYLOAD = (
    b'{"aps":{"alert":{"title":"New messages","body":"You have new messages",'
    b'"title-loc-key":"new_messages","loc-key":"new_messages_body"},'
    b'"sound":"default","mutable-content":1}}'
)


def proxy_options(fake, apns_key, ca_path) -> dict[str, str]:
    return {
        "apns_key_file": str(apns_key.path),
        "apns_key_id": apns_key.key_id,
        "apns_team_id": apns_key.team_id,
        "topic": "chat.delta",
        "apns_url": fake.url,
        "apns_sandbox_url": fake.url,
        "ca_file": ca_path,
        "ubports": "false",
        "debounce_seconds": "0.2",
    }


def wait_until(predicate, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


def assert_apns_request(request, device: str) -> None:
    assert request.method == "POST"
    assert request.path == f"/3/device/{device}"
    assert request.http_version == "2"
    assert request.header("apns-topic") == "chat.delta"
    assert request.header("apns-push-type") == "alert"
    assert request.header("apns-priority") == "10"
    assert request.header("apns-collapse-id") == "new_messages"
    assert request.header("authorization").startswith("bearer ")
    assert request.body == PAYLOAD
    assert json.loads(request.body)["aps"]["alert"]["loc-key"] == "new_messages_body"


class EmbeddedRelay:
    """chatmail-metadata's backend and notifier with the proxy in-process."""

    def __init__(self, tmp: Path, options: dict[str, str]) -> None:
        ini = tmp / "chatmail.ini"
        ini.write_text(f"[params]\nmail_domain = example.org\nmailboxes_dir = {tmp}\n")
        self.proxy = EmbeddedProxy(settings_from_mapping(options))
        self.proxy.start()
        db = tmp / "db.sqlite3"
        self.conn = connect(db)
        self.store = MetadataStore(self.conn)
        policy = RetryPolicy(delays=(0.2,) * 4, max_attempts=5, deadline=60)
        self.notifier = Notifier(
            lambda: JobStore.open(db), lambda: EmbeddedPushTransport(self.proxy, 10.0), 4, policy
        )
        self.notifier.start()
        self.backend = MetadataDict(self.store, ServerKeys(read_config(ini)), hook=self.notifier)
        self.txid = 0

    def commit(self, *ops: dp.Op) -> bytes:
        self.txid += 1
        ev = dp.Commit(str(self.txid), "alice@example.org", ops, "lmtp")
        return dp.encode_reply(ev, self.backend.commit(ev))

    def close(self) -> None:
        self.notifier.stop()
        self.proxy.stop()
        self.conn.close()


@pytest.fixture
def embedded(tmp_path, fake_apns_jwt, apns_key, ca_path) -> Iterator[EmbeddedRelay]:
    relay = EmbeddedRelay(tmp_path, proxy_options(fake_apns_jwt, apns_key, ca_path))
    yield relay
    relay.close()


def test_embedded_proxy_delivers_to_apns(embedded, fake_apns_jwt):
    key = b"priv/" + GUID + b"/"
    assert embedded.commit(dp.SetOp(key + b"devicetoken", DEVICE.encode())).startswith(b"O")
    assert embedded.commit(dp.SetOp(key + b"messagenew", b"")).startswith(b"O")
    wait_until(lambda: fake_apns_jwt.requests, what="the APNs request")
    assert_apns_request(fake_apns_jwt.requests[0], DEVICE)
    wait_until(lambda: embedded.notifier.metrics.sent._value.get() == 1, what="the 200")
    assert b"direct_notifications_total 1.0" in embedded.proxy.service.metrics.render()


def test_embedded_proxy_410_removes_the_token(embedded, fake_apns_jwt):
    fake_apns_jwt.script(apns_error(410, "Unregistered"))
    key = b"priv/" + GUID + b"/"
    sandbox = "sandbox:" + "cd" * 32
    embedded.commit(dp.SetOp(key + b"devicetoken", sandbox.encode()))
    embedded.commit(dp.SetOp(key + b"messagenew", b""))
    wait_until(
        lambda: embedded.store.valid_tokens("alice@example.org", int(time.time())) == [],
        what="the token removal",
    )
    assert fake_apns_jwt.requests[0].path == "/3/device/" + "cd" * 32
    assert embedded.notifier.metrics.tokens_removed._value.get() == 1


def test_embedded_proxy_5xx_is_retried(embedded, fake_apns_jwt):
    fake_apns_jwt.script(apns_error(503, "ServiceUnavailable"))
    key = b"priv/" + GUID + b"/"
    embedded.commit(dp.SetOp(key + b"devicetoken", DEVICE.encode()))
    embedded.commit(dp.SetOp(key + b"messagenew", b""))
    wait_until(lambda: len(fake_apns_jwt.requests) >= 2, what="the retry")
    wait_until(lambda: embedded.notifier.metrics.sent._value.get() == 1, what="the 200")
    assert embedded.store.valid_tokens("alice@example.org", int(time.time())) == [DEVICE]


@pytest.fixture
def standalone_proxy(tmp_path, fake_apns_jwt, apns_key, ca_path) -> Iterator[str]:
    """A real ``notifiers`` process on a free port, pushing to the fake APNs."""
    port = free_port()
    opts = proxy_options(fake_apns_jwt, apns_key, ca_path)
    argv = [str(Path(sys.executable).with_name("notifiers")), "--port", str(port)]
    for key, value in opts.items():
        if key == "ubports":
            argv.append("--no-ubports")
        else:
            argv += ["--" + key.replace("_", "-"), value]
    log = open(tmp_path / "notifiers.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/notify"
    try:
        import httpx

        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError((tmp_path / "notifiers.log").read_text())
            try:
                return httpx.get(f"http://127.0.0.1:{port}/").status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, what="notifiers to listen")
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        log.close()


def test_lmtp_delivery_through_standalone_proxy_to_apns(relay, standalone_proxy, fake_apns_jwt):
    relay.metadata.restart(metadata={"notify_url": standalone_proxy})
    imap = relay.imap("alice@example.org")
    assert imap.setmetadata("INBOX", {"/private/devicetoken": DEVICE})[0] == "OK"
    code, text = relay.deliver("carol@example.net", "alice@example.org")
    assert code == 250, text
    wait_until(lambda: fake_apns_jwt.requests, what="the APNs request")
    assert_apns_request(fake_apns_jwt.requests[0], DEVICE)
    # A second mail within the debounce window is coalesced by the proxy (0.2 s window):
    # at most one trailing push follows.
    relay.deliver("carol@example.net", "alice@example.org")
    time.sleep(0.6)
    assert 1 <= len(fake_apns_jwt.requests) <= 2
