"""Heartbeats: the schedule, the silent APNs pushes, /register, restarts (fake APNs, fake clock)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from helpers_proxy import fake_apns_options

from chatmail_common.outcome import Outcome
from devstack.fakes.apns import apns_error
from devstack.fakes.h2server import Reply
from devstack.loopback import free_port
from devstack.process import stop_and_collect
from notifiers.app import make_app
from notifiers.build import build_providers, build_service
from notifiers.heartbeat import (
    DEFAULT_INTERVAL,
    HeartbeatPolicy,
    format_duration,
    parse_duration,
)
from notifiers.heartbeat_loop import Heartbeats
from notifiers.heartbeat_store import HeartbeatStore, HeartbeatStoreError
from notifiers.metrics import ProxyMetrics
from notifiers.providers.apns import BACKGROUND_PAYLOAD, ApnsProvider
from notifiers.providers.base import Delivery
from notifiers.service import NotifyService
from notifiers.settings import ProxySettings, settings_from_args, settings_from_mapping
from notifiers.tokens import Kind, parse_token

INTERVAL = 1200.0
T0 = 1_800_000_000.0


def device(n: int) -> str:
    return f"{n:064x}"


class Clock:
    """Seconds since the epoch, moved by the test."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def sample(metrics: ProxyMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


async def until(predicate, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
def apns_settings(fake_apns_jwt, apns_key, ca_path, tmp_path) -> ProxySettings:
    options = fake_apns_options(fake_apns_jwt, apns_key, ca_path)
    return settings_from_mapping({**options, "db": str(tmp_path / "heartbeats.sqlite3")})


class Harness:
    """Builds heartbeats on the settings' database, closes them all at the end."""

    def __init__(self, settings: ProxySettings) -> None:
        self.settings = settings
        self.opened: list[Heartbeats] = []

    def make(self, clock: Clock, *, workers: int = 4, uniform=None) -> Heartbeats:
        providers = build_providers(self.settings)
        policy = HeartbeatPolicy(INTERVAL, **({"uniform": uniform} if uniform else {}))
        beats = Heartbeats(
            HeartbeatStore(self.settings.db),
            policy,
            providers,
            ProxyMetrics(),
            workers=workers,
            clock=clock,
        )
        self.opened.append(beats)
        return beats

    async def started(self, clock: Clock, **kw) -> Heartbeats:
        beats = self.make(clock, **kw)
        await beats.start()
        return beats

    async def close(self, beats: Heartbeats) -> None:
        await beats.aclose()
        for provider in {id(p): p for p in beats.providers.values()}.values():
            await provider.aclose()

    async def aclose(self) -> None:
        for beats in self.opened:
            await self.close(beats)


@pytest_asyncio.fixture
async def harness(apns_settings):
    h = Harness(apns_settings)
    yield h
    await h.aclose()


# -- the pure parts ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("20m", 1200), ("1h 5m", 3900), ("1h5m", 3900), ("30s", 30), ("2days", 172800),
     ("15min", 900), ("500ms", 0.5), (" 1hour ", 3600)],
)  # fmt: skip
def test_parse_duration_is_upstreams_humantime(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["20", "1.5h", "20 parsecs", "0s", "m", "-5m"])
def test_parse_duration_refuses(text):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_interval_and_db_options(tmp_path):
    s = settings_from_args(["--interval", "1h 5m", "--db", str(tmp_path / "h.db")], env={})
    assert s.interval == 3900 and s.db == tmp_path / "h.db"
    assert settings_from_args([], env={}).interval is None  # the default, 20m, applies
    assert settings_from_mapping({"interval": "30s"}).interval == 30
    with pytest.raises(ValueError, match="^interval: expected a duration"):
        settings_from_mapping({"interval": "20"})
    with pytest.raises(SystemExit):
        settings_from_args(["--interval", "twenty minutes"], env={})
    assert DEFAULT_INTERVAL == 1200 and format_duration(DEFAULT_INTERVAL) == "20m"


def test_jitter_bounds_and_verdicts():
    policy = HeartbeatPolicy(INTERVAL)
    dues = [policy.next_due(T0) - T0 for _ in range(5000)]
    assert policy.jitter == 60.0  # upstream: ±60 s at 20 min
    assert all(INTERVAL - 60 <= d <= INTERVAL + 60 for d in dues)
    assert min(dues) < INTERVAL - 50 and max(dues) > INTERVAL + 50  # spread out, not constant
    assert HeartbeatPolicy(INTERVAL, lambda a, b: a).after_registration(T0) == T0 + INTERVAL - 60
    assert HeartbeatPolicy(INTERVAL, lambda a, b: b).next_due(T0) == T0 + INTERVAL + 60
    assert policy.after(Outcome.GONE, T0) is None
    for kept in (Outcome.SENT, Outcome.RETRY):
        assert INTERVAL - 60 <= policy.after(kept, T0) - T0 <= INTERVAL + 60


def test_store_orders_by_due_and_survives_reopening(tmp_path):
    path = tmp_path / "h.sqlite3"
    store = HeartbeatStore(path)
    assert store.register("b", 30.0) and store.register("a", 20.0) and store.register("c", 10.0)
    assert not store.register("c", 40.0)  # again: moved, not duplicated
    assert store.count == 3
    assert store.due(35.0, 10) == [("a", 20.0), ("b", 30.0)]
    assert store.due(100.0, 2, skip={"a"}) == [("b", 30.0), ("c", 40.0)]
    assert store.next_due_after(30.0) == 40.0 and store.next_due_after(40.0) is None
    assert store.apply([("a", 50.0), ("b", None), ("gone-already", None)]) == 1
    store.close()
    again = HeartbeatStore(path)
    assert again.count == 2 and again.due(1e9, 10) == [("c", 40.0), ("a", 50.0)]
    assert again._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    again.close()


def test_store_errors_name_the_file(tmp_path):
    sled = tmp_path / "notifiers.db"
    sled.mkdir()  # upstream's default --db is a sled directory
    with pytest.raises(HeartbeatStoreError, match=f"^heartbeat database {sled}: is a directory"):
        HeartbeatStore(sled)
    junk = tmp_path / "junk"
    junk.write_bytes(b"not sqlite" * 100)
    with pytest.raises(HeartbeatStoreError, match=f"^heartbeat database {junk}: "):
        HeartbeatStore(junk)


# -- the silent push ----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_background_push_bytes_and_headers(fake_apns_jwt, apns_key, ca_path):
    provider = ApnsProvider.from_p8(
        apns_key.path,
        key_id=apns_key.key_id,
        team_id=apns_key.team_id,
        topic="chat.delta",
        sandbox=False,
        base_url=fake_apns_jwt.url,
        verify=ca_path,
    )
    try:
        assert (await provider.send_background(parse_token(device(1)))).outcome is Outcome.SENT
        assert (await provider.send(parse_token(device(2)))).outcome is Outcome.SENT
    finally:
        await provider.aclose()
    silent, visible = fake_apns_jwt.requests
    assert silent.path == f"/3/device/{device(1)}"
    assert silent.body == BACKGROUND_PAYLOAD == b'{"aps":{"content-available":1}}'
    headers = dict(silent.headers)
    assert headers.pop("apns-push-type") == "background"
    assert headers.pop("apns-priority") == "5"
    assert headers.pop("content-type") == "application/json"
    assert headers.pop("apns-topic") == "chat.delta"
    assert headers.pop("content-length") == str(len(BACKGROUND_PAYLOAD))
    assert headers.pop("authorization").startswith("bearer ")
    assert set(headers) <= {"accept", "accept-encoding", "user-agent"}  # no collapse id
    assert visible.header("apns-push-type") == "alert"  # the visible path is unchanged
    assert visible.header("apns-collapse-id") == "new_messages"


# -- the loop ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_first_heartbeat_one_jittered_interval_after_registration(harness, fake_apns_jwt):
    clock = Clock()
    beats = await harness.started(clock)
    await beats.register(parse_token(device(1)))
    due = beats.store.due_time(device(1))
    assert T0 + INTERVAL - 60 <= due <= T0 + INTERVAL + 60
    assert sample(beats.metrics, "heartbeat_registrations_total") == 1
    assert sample(beats.metrics, "heartbeat_tokens") == 1
    clock.now = due - 1
    beats.wake()
    await asyncio.sleep(0.2)
    assert fake_apns_jwt.requests == []  # not due yet
    clock.now = due
    beats.wake()
    await until(lambda: len(fake_apns_jwt.requests) == 1, "the heartbeat")
    await until(lambda: beats.store.due_time(device(1)) != due, "the reschedule")
    assert due + INTERVAL - 60 <= beats.store.due_time(device(1)) <= due + INTERVAL + 60
    assert sample(beats.metrics, "heartbeat_notifications_total") == 1
    assert fake_apns_jwt.requests[0].header("apns-push-type") == "background"


@pytest.mark.asyncio
async def test_due_tokens_are_sent_oldest_first(harness, fake_apns_jwt):
    clock = Clock()
    beats = await harness.started(clock, workers=1, uniform=lambda a, b: 0.0)
    order = [7, 3, 9, 1, 5]  # registered in this order, 10 s apart: due in this order
    for n in order:
        await beats.register(parse_token(device(n)))
        clock.now += 10
    clock.now = T0 + INTERVAL + 1000
    beats.wake()
    await until(lambda: len(fake_apns_jwt.requests) == len(order), "all heartbeats")
    assert [r.path for r in fake_apns_jwt.requests] == [f"/3/device/{device(n)}" for n in order]


@pytest.mark.asyncio
async def test_second_service_on_the_same_db_drains_after_downtime(harness, fake_apns_jwt):
    """Registrations through /register survive a restart; after a long downtime every
    token is due and they are drained oldest due first, each sent once."""
    clock = Clock()
    first = harness.make(clock)
    service = NotifyService(first.providers, metrics=first.metrics, heartbeats=first)
    tokens = [device(n) for n in range(1, 41)] + ["sandbox:" + device(99)]
    app = make_app(service)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        await first.start()
        for token in tokens:
            response = await client.post("/register", data=json.dumps({"token": token}))
            assert response.status == 200
            clock.now += 1
        await first.aclose()  # before the app closes the providers, as the programs do
    assert sample(first.metrics, "heartbeat_registrations_total") == len(tokens)
    assert fake_apns_jwt.requests == []

    store = HeartbeatStore(harness.settings.db)
    dues = {token: store.due_time(token) for token in tokens}
    store.close()
    clock.now = T0 + 10 * INTERVAL  # the proxy was down for many intervals
    second = harness.make(clock, workers=1)
    assert sample(second.metrics, "heartbeat_tokens") == len(tokens)
    await second.start()
    await until(lambda: len(fake_apns_jwt.requests) == len(tokens), "the drain")
    expected = [t.removeprefix("sandbox:") for t in sorted(tokens, key=dues.__getitem__)]
    assert [r.path.rsplit("/", 1)[1] for r in fake_apns_jwt.requests] == expected
    sent = lambda: sample(second.metrics, "heartbeat_notifications_total")  # noqa: E731
    await until(lambda: sent() == len(tokens), "the counts")
    await until(lambda: not second.store.due(clock.now, 100), "all rescheduled")
    for token in tokens:
        assert (
            clock.now + INTERVAL - 60 <= second.store.due_time(token) <= clock.now + INTERVAL + 60
        )
    await asyncio.sleep(0.2)
    assert len(fake_apns_jwt.requests) == len(tokens)  # each once


@pytest.mark.asyncio
async def test_only_gone_removes_a_token(harness, fake_apns_jwt):
    clock = Clock()
    beats = await harness.started(clock, workers=1, uniform=lambda a, b: 0.0)
    fates = {
        device(1): apns_error(410, "Unregistered"),
        device(2): apns_error(400, "BadDeviceToken"),
        device(3): apns_error(500, "InternalServerError"),
        device(4): apns_error(403, "ExpiredProviderToken"),
        device(5): apns_error(503, "ServiceUnavailable"),
    }
    for token in fates:
        await beats.register(parse_token(token))
        clock.now += 1
    fake_apns_jwt.script(*fates.values())
    clock.now = T0 + INTERVAL + 100
    beats.wake()
    await until(lambda: len(fake_apns_jwt.requests) == len(fates), "the heartbeats")
    await until(lambda: beats.store.count == 3, "the removals")
    assert beats.store.due_time(device(1)) is None and beats.store.due_time(device(2)) is None
    for kept in (device(3), device(4), device(5)):
        assert beats.store.due_time(kept) == pytest.approx(clock.now + INTERVAL)
    assert sample(beats.metrics, "heartbeat_tokens") == 3
    assert sample(beats.metrics, "heartbeat_notifications_total") == 0
    failures = "notification_failures_total"
    m = beats.metrics
    assert sample(m, failures, provider="APNS", reason="410", details="Unregistered") == 1
    assert sample(m, failures, provider="APNS", reason="500", details="InternalServerError") == 1


@pytest.mark.asyncio
async def test_a_token_gone_on_notify_leaves_the_heartbeats(harness, fake_apns_jwt):
    """APNs said the token is dead when /notify used it: no heartbeat is sent to it again."""
    clock = Clock()
    beats = await harness.started(clock, workers=1)
    service = NotifyService(beats.providers, metrics=beats.metrics, heartbeats=beats)
    async with TestClient(TestServer(make_app(service), host="127.0.0.1")) as client:
        for n in (1, 2):
            response = await client.post("/register", data=json.dumps({"token": device(n)}))
            assert response.status == 200
        assert beats.store.count == 2
        fake_apns_jwt.script(apns_error(410, "Unregistered"))
        response = await client.post("/notify", data=device(1))
        assert response.status == 410
        await until(lambda: beats.store.count == 1, "the removal")
        assert beats.store.due_time(device(1)) is None
        assert beats.store.due_time(device(2)) is not None
        assert sample(beats.metrics, "heartbeat_tokens") == 1
        await beats.aclose()  # before the app closes the providers, as the programs do


@pytest.mark.asyncio
async def test_transport_failure_keeps_the_token(harness, fake_apns_jwt):
    clock = Clock()
    beats = await harness.started(clock)
    await beats.register(parse_token(device(1)))
    fake_apns_jwt.script(*[Reply(action="close")] * 3)  # connections drop: no answer
    clock.now = T0 + 2 * INTERVAL
    beats.wake()
    await until(lambda: failures(beats.metrics, "send") == 1, "the failure")
    await until(lambda: beats.store.due_time(device(1)) > clock.now, "the reschedule")
    assert beats.store.count == 1


def failures(metrics: ProxyMetrics, reason: str) -> float:
    """``notification_failures_total`` of APNS with ``reason``, whatever the details."""
    return sum(
        s.value
        for family in metrics.registry.collect()
        for s in family.samples
        if s.name == "notification_failures_total"
        and s.labels.get("provider") == "APNS"
        and s.labels.get("reason") == reason
    )


# -- /register ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_register_refuses_non_apns_tokens(harness, caplog):
    beats = harness.make(Clock())
    service = NotifyService(beats.providers, metrics=beats.metrics, heartbeats=beats)
    refused = [
        "fcm-chat.delta:cXXXX:APA91bSecret",
        "ubports-SecretUbports",
        # a well-formed subscription (the grammar refuses malformed ones before this check)
        "webpush:https://push.example/Secret"
        "|BNcRdreALRFXTkOOUHK1EtK2wtaz5Ry4YfYCA_0QTpQtUbVlUls0VJXg7A8u-Ts1XbjhazAkj7I99e8QcYP7DkM"
        "|tBHItJI5svbpez7KI4CCXg",
    ]
    async with TestClient(TestServer(make_app(service), host="127.0.0.1")) as client:
        with caplog.at_level(logging.DEBUG):
            for token in refused:
                response = await client.post("/register", data=json.dumps({"token": token}))
                assert response.status == 400
                assert "heartbeats are for APNs tokens only" in await response.text()
            ok = await client.post("/register", data=json.dumps({"token": "sandbox:" + device(5)}))
            assert ok.status == 200
            again = await client.post("/register", data=json.dumps({"token": device(6)}))
            assert again.status == 200
            assert (await client.post("/register", data='{"token": "zz"}')).status == 400
        await beats.aclose()
    assert beats.store.count == 2
    assert sample(beats.metrics, "heartbeat_registrations_total") == 2
    for secret in ["Secret", device(5), device(6)]:
        assert secret not in caplog.text
    assert "heartbeat registration for APNS_SANDBOX token" in caplog.text


def test_without_db_heartbeats_are_off(tmp_path, caplog, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO):
        service = build_service(ProxySettings(log_provider=True, interval=60.0))
    assert service.heartbeats is None
    assert "heartbeats: off (no --db)" in caplog.text

    async def main():
        async with TestClient(TestServer(make_app(service), host="127.0.0.1")) as client:
            body = json.dumps({"token": device(1)})
            assert (await client.post("/register", data=body)).status == 200
            body = json.dumps({"token": "fcm-chat.delta:abc"})
            assert (await client.post("/register", data=body)).status == 200  # as before

    asyncio.run(main())
    assert sample(service.metrics, "heartbeat_registrations_total") == 2
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_with_db_the_startup_log_says_so(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        service = build_service(ProxySettings(db=tmp_path / "h.db", interval=3900.0))
    try:
        assert service.heartbeats is not None
        assert "heartbeats: every 1h 5m" in caplog.text and str(tmp_path / "h.db") in caplog.text
        assert "APNs is not configured" in caplog.text
    finally:
        asyncio.run(service.heartbeats.aclose())


# -- the program -----------------------------------------------------------------------------


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def test_notifiers_program_sends_heartbeats_and_refuses_a_sled_db(tmp_path):
    cli = [sys.executable, "-m", "notifiers.cli", "--log-provider"]
    sled = tmp_path / "notifiers.db"
    sled.mkdir()
    proc = subprocess.run([*cli, "--db", str(sled)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("notifiers: error:")]
    assert line.startswith(f"notifiers: error: heartbeat database {sled}: is a directory")

    port, mport = free_port(), free_port()
    db = tmp_path / "heartbeats.sqlite3"
    args = ["--port", str(port), "--metrics", f"127.0.0.1:{mport}", "--db", str(db)]
    # Type=notify readiness: the API port accepting is not enough, the metrics listener
    # is bound after it (a loaded machine got a refused connection on it).
    ready = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ready.bind(str(tmp_path / "notify.socket"))
    ready.settimeout(20)
    proc = subprocess.Popen(
        [*cli, *args, "--interval", "1s"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.socket")},
    )
    try:
        assert ready.recv(100) == b"READY=1"  # both listeners up, heartbeats started
        deadline = time.monotonic() + 20
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/register", data=json.dumps({"token": device(1)}).encode()
        )
        assert urllib.request.urlopen(request, timeout=5).status == 200
        metrics = f"http://127.0.0.1:{mport}/metrics"
        while "heartbeat_notifications_total 2.0" not in _get(metrics):  # every second
            assert time.monotonic() < deadline + 20
            time.sleep(0.1)
        assert "heartbeat_tokens 1.0" in _get(metrics)
        _, err = stop_and_collect(proc, 20)
    finally:
        ready.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "heartbeats: every 1s" in err
    assert device(1) not in err
    with pytest.raises(urllib.error.URLError):
        _get(metrics)


class RegisteredAgainDuringTheSend:
    """An APNs stand-in answering ``Unregistered`` after the device called /register
    again while the heartbeat was out (the interleaving the removal races)."""

    def __init__(self) -> None:
        self.beats: Heartbeats | None = None

    async def send(self, push) -> Delivery:
        assert self.beats is not None
        await self.beats.register(parse_token(push.raw))
        return Delivery(Outcome.GONE, "410", "Unregistered")

    async def aclose(self) -> None:
        pass


@pytest.mark.asyncio
async def test_gone_heartbeat_keeps_a_registration_made_during_the_send(tmp_path):
    path = tmp_path / "heartbeats.sqlite3"
    clock = Clock()
    provider = RegisteredAgainDuringTheSend()
    beats = Heartbeats(
        HeartbeatStore(path),
        HeartbeatPolicy(INTERVAL, lambda a, b: 0.0),
        {Kind.APNS: provider},
        ProxyMetrics(),
        workers=1,
        clock=clock,
    )
    provider.beats = beats
    await beats.register(parse_token(device(1)))
    await beats.start()
    clock.now = T0 + INTERVAL + 100
    beats.wake()
    failures = "notification_failures_total"
    labels = {"provider": "APNS", "reason": "410", "details": "Unregistered"}
    await until(lambda: sample(beats.metrics, failures, **labels) == 1, "the GONE")
    await beats.aclose()  # every verdict made is written
    store = HeartbeatStore(path)
    try:
        assert store.due_time(device(1)) == clock.now + INTERVAL  # the new registration's
    finally:
        store.close()
