"""Upstream forwarding: a front proxy debounces and forwards to a second proxy (the upstream).

Both proxies are real aiohttp apps on 127.0.0.1 around real NotifyServices; the
upstream holds the key the clients encrypted to, like notifications.delta.chat.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from helpers_proxy import APNS, HeldClock, Recording, sample

from devstack.loopback import free_port
from devstack.openpgp_tokens import encrypt_token, generate_key, write_keyring
from notifiers.app import make_app
from notifiers.debounce import Debouncer
from notifiers.forwarding import Upstream, upstream_url
from notifiers.openpgp import Keyring, OpenPgpDecryptor
from notifiers.service import NotifyService
from notifiers.settings import settings_from_mapping
from notifiers.tokens import Kind


@pytest.fixture(scope="module")
def central_key():
    return generate_key()


@pytest.fixture(scope="module")
def relay_key():
    return generate_key()


def decryptor(tmp: Path, key) -> OpenPgpDecryptor:
    return OpenPgpDecryptor(Keyring.load(write_keyring(tmp / f"{id(key)}.asc", key.to_armored())))


class Pair:
    """The front proxy (``front``, an HTTP client to it) and the upstream (``central``)."""

    def __init__(self, front: NotifyService, central: NotifyService, apns: Recording) -> None:
        self.front, self.central, self.apns = front, central, apns
        self.client: TestClient

    async def notify(self, token: str) -> int:
        resp = await self.client.post("/notify", data=token)
        return resp.status


def run_pair(
    tmp_path, central_key, test, *, front_key=None, window=0.3, forward_all=False, clock=None
):
    """Serve an upstream proxy (keyring: central_key) and a front proxy forwarding to it
    (its debounce windows timed by ``clock``, a :class:`HeldClock` a test may hold)."""

    async def main():
        apns = Recording()
        central = NotifyService({Kind.APNS: apns}, decryptor=decryptor(tmp_path, central_key))
        async with TestServer(make_app(central), host="127.0.0.1") as upstream_server:
            url = str(upstream_server.make_url("/notify"))
            front = NotifyService(
                {Kind.APNS: Recording("APNS")},
                decryptor=decryptor(tmp_path, front_key) if front_key else None,
                upstream=Upstream(url, timeout=5),
                forward_all=forward_all,
                debouncer=Debouncer(window),
                clock=clock or HeldClock(),
            )
            pair = Pair(front, central, apns)
            async with TestClient(TestServer(make_app(front), host="127.0.0.1")) as client:
                pair.client = client
                await test(pair)

    asyncio.run(main())


async def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_unknown_recipient_is_debounced_then_forwarded(tmp_path, central_key, relay_key):
    token = encrypt_token(APNS, central_key)  # the relay cannot open it
    clock = HeldClock()

    async def test(pair: Pair):
        clock.hold()  # the three hits fall inside one window, however long decryption takes
        assert await pair.notify(token) == 200
        assert pair.apns.sent == [APNS]  # the upstream decrypted and sent it
        assert await pair.notify(token) == 200  # debounced at the front, on the ciphertext
        assert await pair.notify(token) == 200
        assert pair.apns.sent == [APNS]
        assert sample(pair.front.metrics, "debounced_notifications_total") == 2
        clock.release()

        def arrived() -> float:  # requests the upstream got: sent, or debounced there
            return len(pair.apns.sent) + sample(
                pair.central.metrics, "debounced_notifications_total"
            )

        await wait_for(lambda: arrived() == 2)  # one trailing forward
        await asyncio.sleep(0.5)
        assert arrived() == 2
        assert sample(pair.front.metrics, "forwarded_notifications_total", status="200") == 2
        assert sample(pair.front.metrics, "openpgp_decryption_failures_total") == 0

    run_pair(tmp_path, central_key, test, front_key=relay_key, clock=clock)


def test_own_tokens_are_decrypted_locally(tmp_path, central_key, relay_key):
    async def test(pair: Pair):
        assert await pair.notify(encrypt_token(APNS, relay_key)) == 200
        assert pair.front.providers[Kind.APNS].sent == [APNS]
        assert pair.apns.sent == []
        assert sample(pair.front.metrics, "forwarded_notifications_total", status="200") == 0

    run_pair(tmp_path, central_key, test, front_key=relay_key)


def test_upstream_status_is_passed_back(tmp_path, central_key, relay_key):
    nobody = generate_key()

    async def test(pair: Pair):
        # the upstream holds no key for it either: its 410 comes back as GONE
        assert await pair.notify(encrypt_token(APNS, nobody)) == 410
        assert sample(pair.front.metrics, "forwarded_notifications_total", status="410") == 1
        assert sample(pair.front.metrics, "openpgp_decryption_failures_total") == 0
        # the upstream has no FCM provider: 500 there, RETRY here, and no window stays open
        fcm = encrypt_token("fcm-chat.delta:abc", central_key)
        assert await pair.notify(fcm) == 500
        assert await pair.notify(fcm) == 500  # not "debounced": the relay's retry goes through
        assert sample(pair.front.metrics, "forwarded_notifications_total", status="500") == 2

    run_pair(tmp_path, central_key, test, front_key=relay_key)


def test_no_keyring_forwards_every_openpgp_token(tmp_path, central_key):
    async def test(pair: Pair):
        assert await pair.notify(encrypt_token(APNS, central_key)) == 200
        assert pair.apns.sent == [APNS]
        assert await pair.notify("sandbox:" + "cd" * 32) == 500  # plain: local, not configured

    run_pair(tmp_path, central_key, test)


def test_forward_all_posts_every_token_unchanged(tmp_path, central_key, relay_key):
    bodies: list[str] = []

    async def record(request: web.Request) -> web.Response:
        bodies.append(await request.text())
        return web.Response(text="ok")

    async def main():
        app = web.Application()
        app.router.add_post("/notify", record)
        async with TestServer(app, host="127.0.0.1") as upstream_server:
            front = NotifyService(
                {},
                decryptor=decryptor(tmp_path, relay_key),
                upstream=Upstream(str(upstream_server.make_url("/notify"))),
                forward_all=True,
            )
            own = encrypt_token(APNS, relay_key)
            async with TestClient(TestServer(make_app(front), host="127.0.0.1")) as client:
                for token in (own, APNS, own):
                    assert (await client.post("/notify", data=token)).status == 200
            assert bodies == [own, APNS]  # unchanged, not decrypted; the repeat debounced

    asyncio.run(main())


def test_upstream_down_is_retry():
    async def main():
        port = free_port()
        front = NotifyService({}, upstream=Upstream(f"http://127.0.0.1:{port}/notify"))
        result = await front.notify(encrypt_token(APNS, generate_key()))
        assert result.outcome.value == "retry"
        assert sample(front.metrics, "forwarded_notifications_total", status="send") == 1
        again = await front.notify(encrypt_token(APNS, generate_key()))
        assert again.outcome.value == "retry"
        await front.aclose()

    asyncio.run(main())


def test_settings():
    assert upstream_url("https://notifications.delta.chat") == (
        "https://notifications.delta.chat/notify"
    )
    assert upstream_url("http://127.0.0.1:9000/") == "http://127.0.0.1:9000/notify"
    assert upstream_url("https://x.example/push/notify") == "https://x.example/push/notify"
    with pytest.raises(ValueError, match="upstream_url: expected an http"):
        settings_from_mapping({"upstream_url": "ftp://x"}, env={})
    with pytest.raises(ValueError, match="forward_all: needs upstream_url"):
        settings_from_mapping({"forward_all": "true"}, env={})
    settings = settings_from_mapping(
        {"upstream_url": "https://up.example", "forward_all": "yes"}, env={}
    )
    assert settings.upstream_url == "https://up.example/notify" and settings.forward_all
