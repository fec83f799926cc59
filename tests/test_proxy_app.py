"""The proxy's HTTP API, service core, metrics and embedded mode, on 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time

import pytest
from aiohttp.test_utils import TestClient, TestServer
from helpers_proxy import HeldClock, Recording, sample

from notifiers.app import http_status, make_app, make_metrics_app
from notifiers.build import build_service
from notifiers.debounce import Debouncer
from notifiers.embedded import NOT_RUNNING, EmbeddedProxy
from notifiers.metrics import ProxyMetrics
from notifiers.providers.base import Delivery, Outcome
from notifiers.providers.log import LogProvider
from notifiers.service import DecryptionError, NotifyResult, NotifyService
from notifiers.settings import ProxySettings
from notifiers.tokens import Kind

APNS_TOKEN = "0155b93b7eb8" + "ab" * 26
FCM_TOKEN = "fcm-chat.delta:cXXXX:APA91bSecretFcmTokenValue"
UBPORTS_TOKEN = "ubports-SecretUbportsToken"
# A well-formed subscription (65-byte uncompressed P-256 key, 16-byte auth secret).
WEBPUSH_TOKEN = (
    "webpush:https://push.example/abc"
    "|BNcRdreALRFXTkOOUHK1EtK2wtaz5Ry4YfYCA_0QTpQtUbVlUls0VJXg7A8u-Ts1XbjhazAkj7I99e8QcYP7DkM"
    "|tBHItJI5svbpez7KI4CCXg"
)

UPSTREAM_METRICS = {
    "direct_notifications": "counter",
    "fcm_notifications": "counter",
    "ubports_notifications": "counter",
    "webpush_notifications": "counter",
    "debounced_notifications": "counter",
    "debounced_set_size": "gauge",
    "heartbeat_notifications": "counter",
    "heartbeat_registrations": "counter",
    "heartbeat_tokens": "gauge",
    "openpgp_decryption_failures": "counter",
    "notification_failures": "counter",
}


def run_app(service: NotifyService, test, *, body_limit: int = 8192):
    """Run ``await test(client)`` against the app served on 127.0.0.1."""

    async def main():
        server = TestServer(make_app(service, body_limit=body_limit), host="127.0.0.1")
        async with TestClient(server) as client:
            await test(client)

    asyncio.run(main())


@pytest.fixture
def fcm():
    return Recording("FCM")


@pytest.fixture
def clock() -> HeldClock:
    return HeldClock()


@pytest.fixture
def service(fcm, clock):
    providers = {
        Kind.APNS: LogProvider(),
        Kind.APNS_SANDBOX: LogProvider(),
        Kind.FCM: fcm,
        Kind.UBPORTS: LogProvider(),
    }  # no WebPush provider: "not configured"
    return NotifyService(providers, debouncer=Debouncer(window=0.3), clock=clock)


def test_hello_404_405(service):
    async def test(client):
        resp = await client.get("/")
        assert resp.status == 200 and await resp.text() == "Hello, world!"
        assert (await client.get("/nope")).status == 404
        assert (await client.post("/nope", data=b"x")).status == 404
        assert (await client.get("/notify")).status == 405
        assert (await client.put("/register", data=b"{}")).status == 405
        assert (await client.post("/", data=b"x")).status == 405

    run_app(service, test)


def test_notify_statuses_and_metrics(service, fcm):
    async def test(client):
        m = service.metrics
        assert (await client.post("/notify", data=APNS_TOKEN)).status == 200
        assert (await client.post("/notify", data="sandbox:" + APNS_TOKEN)).status == 200
        assert sample(m, "direct_notifications_total") == 2
        assert (await client.post("/notify", data=UBPORTS_TOKEN)).status == 200
        assert sample(m, "ubports_notifications_total") == 1

        assert (await client.post("/notify", data=FCM_TOKEN)).status == 200
        assert fcm.sent == [FCM_TOKEN]
        assert sample(m, "fcm_notifications_total") == 1

        fcm.answer = Delivery(Outcome.GONE, "404", "UNREGISTERED")
        resp = await client.post("/notify", data="fcm-chat.delta:gone")
        assert resp.status == 410
        assert (
            sample(
                m,
                "notification_failures_total",
                provider="FCM",
                reason="404",
                details="UNREGISTERED",
            )
            == 1
        )

        fcm.answer = Delivery(Outcome.RETRY, "503")
        assert (await client.post("/notify", data="fcm-chat.delta:busy")).status == 500
        assert (
            sample(m, "notification_failures_total", provider="FCM", reason="503", details="") == 1
        )

        fcm.answer = RuntimeError("provider bug")
        assert (await client.post("/notify", data="fcm-chat.delta:boom")).status == 500
        assert (
            sample(
                m,
                "notification_failures_total",
                provider="FCM",
                reason="send",
                details="RuntimeError",
            )
            == 1
        )

        # not configured: 500 (never 410) with upstream's symbolic reason
        resp = await client.post("/notify", data=WEBPUSH_TOKEN)
        assert resp.status == 500
        assert (
            sample(
                m,
                "notification_failures_total",
                provider="WebPush",
                reason="no_vapid_key",
                details="",
            )
            == 1
        )
        assert sample(m, "notification_latency_seconds_count", provider="FCM") == 4

    run_app(service, test)


def test_missing_providers_use_upstream_reasons():
    service = NotifyService({})

    async def test(client):
        for token in (APNS_TOKEN, "sandbox:" + APNS_TOKEN, FCM_TOKEN):
            assert (await client.post("/notify", data=token)).status == 500
        m = service.metrics
        assert (
            sample(
                m,
                "notification_failures_total",
                provider="APNS",
                reason="no_certificate",
                details="",
            )
            == 2
        )
        assert (
            sample(
                m, "notification_failures_total", provider="FCM", reason="no_api_key", details=""
            )
            == 1
        )

    run_app(service, test)


def test_bad_bodies(service, fcm):
    async def test(client):
        assert (await client.post("/notify", data=b"")).status == 400
        resp = await client.post("/notify", data=b"fcm-chat.delta:\xff\xfe")
        assert resp.status == 400 and "UTF-8" in await resp.text()
        resp = await client.post("/notify", data=b"a" * 9000)
        assert resp.status == 413
        resp = await client.post("/notify", data="fcm-no-colon")
        assert resp.status == 400 and "malformed token" in await resp.text()
        assert (await client.post("/notify", data="webpush:https://x|only-two")).status == 400
        # Unknown kinds and broken APNs tokens are a client/relay bug: 400, never 410.
        for body in ("newkind:abcdef", "sandbox:not-hex", "0155b93b7eb8abab\n", "ab cd"):
            resp = await client.post("/notify", data=body)
            assert resp.status == 400, body
        assert fcm.sent == []

    run_app(service, test)


@pytest.mark.parametrize(
    "kind, body",
    [
        (Kind.FCM, "fcm-chat.delta:abc def"),
        (Kind.FCM, 'fcm-chat.delta:tok"}'),
        (Kind.UBPORTS, 'ubports-x","appid":"evil'),
        (Kind.UBPORTS, "ubports-t\u00f6k"),
        (Kind.APNS, "0155b93b7eb8/../x"),
        (Kind.WEBPUSH, "webpush:https://push.example/a b|BNcKey|k3hAuth"),
        (Kind.WEBPUSH, "webpush:https://push.example/abc|BNc Key|k3hAuth"),
    ],
)
def test_malformed_tokens_are_400_before_any_provider(kind, body):
    """One rule for every kind: characters outside a kind's grammar are a client or relay
    bug, answered 400 at /notify; no provider sees the token, so none can answer 410."""
    providers = {k: Recording(k.value) for k in Kind}
    service = NotifyService(providers)

    async def test(client):
        resp = await client.post("/notify", data=body)
        assert resp.status == 400 and "malformed token" in await resp.text()
        assert all(p.sent == [] for p in providers.values())

    run_app(service, test)


def test_debounced_counting_and_trailing_send(service, fcm, clock):
    async def test(client):
        m = service.metrics
        clock.hold()  # the three hits fall inside one window, however slow the machine
        for _ in range(3):
            resp = await client.post("/notify", data=FCM_TOKEN)
            assert resp.status == 200
        assert fcm.sent == [FCM_TOKEN]  # leading edge only so far
        assert sample(m, "debounced_notifications_total") == 2
        assert sample(m, "debounced_set_size") == 1
        clock.release()
        deadline = time.monotonic() + 5
        while len(fcm.sent) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert fcm.sent == [FCM_TOKEN, FCM_TOKEN]  # exactly one trailing send
        await asyncio.sleep(0.5)
        assert len(fcm.sent) == 2
        assert sample(m, "fcm_notifications_total") == 2

    run_app(service, test)


def test_openpgp_without_keyring_is_500_never_410(service, fcm):
    async def test(client):
        resp = await client.post("/notify", data="openpgp:wcDMA0xyz==")
        assert resp.status == 500
        assert await resp.text() == "openpgp tokens not supported: no keyring configured"
        assert fcm.sent == []

    run_app(service, test)


def test_openpgp_with_decryptor(fcm):
    async def decrypt(token: str) -> str:
        if token == "openpgp:good":
            return FCM_TOKEN + "\n"
        raise DecryptionError("no key opens it")

    service = NotifyService({Kind.FCM: fcm}, decryptor=decrypt)

    async def test(client):
        assert (await client.post("/notify", data="openpgp:good")).status == 200
        assert fcm.sent == [FCM_TOKEN]  # decrypted and trimmed
        assert (await client.post("/notify", data="openpgp:bad")).status == 410
        assert sample(service.metrics, "openpgp_decryption_failures_total") == 1

    run_app(service, test)


def test_register(service):
    async def test(client):
        m = service.metrics
        resp = await client.post("/register", data=json.dumps({"token": APNS_TOKEN, "x": 1}))
        assert resp.status == 200
        assert sample(m, "heartbeat_registrations_total") == 1
        assert (await client.post("/register", data="not json")).status == 400
        assert (await client.post("/register", data='{"token": 5}')).status == 400
        assert (await client.post("/register", data='["x"]')).status == 400
        assert (await client.post("/register", data='{"token": "fcm-x"}')).status == 400
        assert (await client.post("/register", data='{"token": "openpgp:x"}')).status == 500
        assert sample(m, "heartbeat_registrations_total") == 1

    run_app(service, test)


def test_metrics_listener_exposes_every_upstream_metric(service):
    async def main():
        mserver = TestServer(make_metrics_app(service.metrics), host="127.0.0.1")
        server = TestServer(make_app(service), host="127.0.0.1")
        async with TestClient(server) as api, TestClient(mserver) as client:
            assert (await api.post("/notify", data=WEBPUSH_TOKEN)).status == 500
            resp = await client.get("/metrics")
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
            text = await resp.text()
            assert (await client.get("/notify")).status == 404
        assert text.endswith("# EOF\n")
        assert "_created" not in text
        for name, kind in UPSTREAM_METRICS.items():
            assert f"# TYPE {name} {kind}\n" in text
        assert "# HELP debounced_set_size Number of tokens notified recently.\n" in text
        assert (
            "# HELP notification_failures Number of failed notifications by provider and error type"
            in text
        )
        assert re.search(r"^direct_notifications_total 0\.0$", text, re.M)
        assert (
            'notification_failures_total{details="",provider="WebPush",reason="no_vapid_key"} 1.0'
            in text
        )
        assert "# TYPE notification_latency_seconds histogram" in text

    asyncio.run(main())


def test_metrics_keep_upstream_registration_order():
    text = ProxyMetrics().render().decode()
    types = re.findall(r"^# TYPE (\S+) ", text, re.M)
    assert types[: len(UPSTREAM_METRICS)] == list(UPSTREAM_METRICS)


def test_tokens_never_appear_in_logs(service, fcm, caplog):
    secrets = [APNS_TOKEN, FCM_TOKEN, UBPORTS_TOKEN, WEBPUSH_TOKEN, "fcm-chat.delta:gone"]

    async def test(client):
        for token in secrets:
            await client.post("/notify", data=token)
        await client.post("/notify", data=FCM_TOKEN)  # debounced
        fcm.answer = Delivery(Outcome.GONE, "404", "UNREGISTERED")
        await client.post("/notify", data="fcm-chat.delta:gone")
        await client.post("/notify", data="fcm-SecretMalformed")
        await client.post("/notify", data="openpgp:SecretCipher")
        await client.post("/register", data=json.dumps({"token": APNS_TOKEN}))
        await asyncio.sleep(0.5)  # trailing send

    with caplog.at_level(logging.DEBUG):
        run_app(service, test)
    assert "would send" in caplog.text  # the log provider did log
    for token in [*secrets, "SecretMalformed", "SecretCipher", "cXXXX:APA91b", "0155b93b7eb8"]:
        assert token not in caplog.text


def test_embedded_proxy_shares_semantics_and_metrics(clock):
    settings = ProxySettings(log_provider=True, debounce_seconds=0.3)
    proxy = EmbeddedProxy(settings, service=build_service(settings, clock=clock))
    assert proxy.notify(APNS_TOKEN, timeout=1) is NOT_RUNNING  # not started
    clock.hold()  # every call below falls inside the first window, however slow the machine
    with proxy:
        # The verdicts, and the statuses the HTTP front end would make of them.
        assert http_status(proxy.notify(APNS_TOKEN, timeout=5)) == 200
        assert proxy.notify(APNS_TOKEN, timeout=5) == NotifyResult(Outcome.SENT, "debounced")
        assert http_status(proxy.notify("fcm-bad", timeout=5)) == 400
        assert proxy.notify("", timeout=5).outcome is Outcome.RETRY
        assert http_status(proxy.notify("openpgp:abc", timeout=5)) == 500
        assert proxy.notify(FCM_TOKEN, timeout=5).outcome is Outcome.SENT
        metrics = proxy.service.metrics
        assert sample(metrics, "direct_notifications_total") == 1
        assert sample(metrics, "debounced_notifications_total") == 1
        assert sample(metrics, "fcm_notifications_total") == 1
        clock.release()
        deadline = time.monotonic() + 5
        while sample(metrics, "direct_notifications_total") < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sample(metrics, "direct_notifications_total") == 2  # trailing send
    assert not proxy.running
    assert proxy.notify(APNS_TOKEN, timeout=1) is NOT_RUNNING


def test_embedded_proxy_from_threads():
    from concurrent.futures import ThreadPoolExecutor

    with EmbeddedProxy(ProxySettings(log_provider=True)) as proxy:
        tokens = [f"fcm-chat.delta:tok{i}" for i in range(200)]
        with ThreadPoolExecutor(8) as pool:
            verdicts = list(pool.map(lambda t: proxy.notify(t, timeout=10).outcome, tokens))
        assert verdicts == [Outcome.SENT] * 200
        assert sample(proxy.service.metrics, "fcm_notifications_total") == 200


def test_embedded_proxy_start_reports_broken_key(tmp_path):
    from notifiers.providers.base import ProviderConfigError

    key = tmp_path / "AuthKey.p8"
    key.write_text("garbage")
    proxy = EmbeddedProxy(ProxySettings(apns_key_file=key, apns_key_id="K", apns_team_id="T"))
    with pytest.raises(ProviderConfigError):
        proxy.start()
    assert not proxy.running
    assert proxy.notify(APNS_TOKEN, timeout=1) is NOT_RUNNING


def test_owed_send_evicted_by_the_cap_is_sent_promptly(fcm):
    service = NotifyService({Kind.FCM: fcm}, debouncer=Debouncer(window=60, max_entries=1))

    async def test(client):
        assert (await client.post("/notify", data="fcm-a:1")).status == 200
        assert (await client.post("/notify", data="fcm-a:1")).status == 200  # owes a send
        assert (await client.post("/notify", data="fcm-b:2")).status == 200  # evicts a:1
        deadline = time.monotonic() + 5
        while fcm.sent.count("fcm-a:1") < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert fcm.sent.count("fcm-a:1") == 2  # not lost, not after 60 s

    run_app(service, test)


class Scripted(Recording):
    """Answers the given outcomes in order, then SENT."""

    def __init__(self, name: str, outcomes: list[Outcome]) -> None:
        super().__init__(name)
        self.outcomes = list(outcomes)

    async def send(self, token):
        self.sent.append(token.raw)
        if self.outcomes:
            return Delivery(self.outcomes.pop(0), "503")
        return Delivery.sent()


def test_failed_leading_send_does_not_debounce_the_relays_retry():
    fcm = Scripted("FCM", [Outcome.RETRY])
    service = NotifyService({Kind.FCM: fcm}, debouncer=Debouncer(window=30))

    async def test(client):
        assert (await client.post("/notify", data="fcm-a:1")).status == 500
        # The relay's retry comes well inside the window: it is sent, not debounced.
        assert (await client.post("/notify", data="fcm-a:1")).status == 200
        assert fcm.sent == ["fcm-a:1", "fcm-a:1"]
        assert sample(service.metrics, "debounced_notifications_total") == 0

    run_app(service, test)


def test_failed_trailing_send_is_retried_by_the_proxy(clock):
    fcm = Scripted("FCM", [])
    service = NotifyService({Kind.FCM: fcm}, debouncer=Debouncer(window=0.2), clock=clock)

    async def test(client):
        clock.hold()  # the second hit falls inside the first one's window
        assert (await client.post("/notify", data="fcm-a:1")).status == 200
        fcm.outcomes = [Outcome.RETRY, Outcome.RETRY]  # the trailing send fails twice
        assert (await client.post("/notify", data="fcm-a:1")).status == 200  # debounced
        clock.release()
        deadline = time.monotonic() + 5
        while len(fcm.sent) < 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        # leading send, then the trailing send: failed, failed, delivered
        assert fcm.sent == ["fcm-a:1"] * 4
        await asyncio.sleep(0.5)
        assert len(fcm.sent) == 4  # and nothing more once it went through

    run_app(service, test)


def test_slow_failed_send_does_not_close_a_newer_window():
    """A send that fails after the window (APNs times out after 20 s) must not erase
    the window a later, successful send opened: no second push inside it."""
    now = [0.0]

    class SlowFirst(Recording):
        async def send(self, token):
            self.sent.append(token.raw)
            if len(self.sent) == 1:
                while now[0] < 15:
                    await asyncio.sleep(0)
                return Delivery(Outcome.RETRY, "send", "timeout")
            return Delivery.sent()

    apns = SlowFirst("APNS")
    service = NotifyService({Kind.APNS: apns}, debouncer=Debouncer(10), clock=lambda: now[0])
    token = "ab" * 32

    async def scenario():
        first = asyncio.ensure_future(service.notify(token))  # t=0, in flight until t=15
        await asyncio.sleep(0)
        now[0] = 12.0
        assert (await service.notify(token)).outcome is Outcome.SENT  # t=0 window over: sent
        now[0] = 15.0
        assert (await first).outcome is Outcome.RETRY
        now[0] = 16.0
        result = await service.notify(token)  # inside the t=12 window
        await service.aclose()
        return result

    result = asyncio.run(scenario())
    assert result == NotifyResult(Outcome.SENT, "debounced")
    assert len(apns.sent) == 2


def test_serving_gc_threshold_raises_only_the_young_generation():
    import gc

    from notifiers.app import SERVING_GC_THRESHOLD, tune_gc_for_serving

    before = gc.get_threshold()
    try:
        tune_gc_for_serving()
        assert gc.get_threshold() == (SERVING_GC_THRESHOLD, before[1], before[2])
    finally:
        gc.set_threshold(*before)
