"""ApnsProvider against a fake APNs speaking HTTP/2 over TLS on loopback."""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl

import pytest
import trustme

from devstack.fakes.apns import FakeApns, apns_error
from devstack.fakes.h2server import Reply
from devstack.fakes.keys import ApnsCert, ApnsKey, write_client_p12
from notifiers.providers.apns import JWT_RENEW_AFTER, PAYLOAD, ApnsProvider
from notifiers.providers.base import Outcome, ProviderConfigError
from notifiers.tokens import Kind, PushToken, TokenError, parse_token

pytestmark = pytest.mark.asyncio

DEVICE = "a1b2c3d4" * 8
TOKEN = parse_token(DEVICE)
EXPECTED_PAYLOAD = (
    b'{"aps":{"alert":{"title":"New messages","body":"You have new messages",'
    b'"title-loc-key":"new_messages","loc-key":"new_messages_body"},'
    b'"sound":"default","mutable-content":1}}'
)


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def cert_provider(server: FakeApns, cert: ApnsCert, ca_path: str, **kw) -> ApnsProvider:
    kw.setdefault("topic", "chat.delta")
    return ApnsProvider.from_p12(
        cert.path, cert.password, sandbox=False, base_url=server.url, verify=ca_path, **kw
    )


def jwt_provider(server: FakeApns, key: ApnsKey, ca_path: str, **kw) -> ApnsProvider:
    kw.setdefault("topic", "chat.delta")
    return ApnsProvider.from_p8(
        key.path,
        key_id=key.key_id,
        team_id=key.team_id,
        sandbox=False,
        base_url=server.url,
        verify=ca_path,
        **kw,
    )


async def test_request_bytes_and_headers_cert_auth(fake_apns_cert, apns_cert, ca_path):
    provider = cert_provider(fake_apns_cert, apns_cert, ca_path)
    try:
        delivery = await provider.send(TOKEN)
    finally:
        await provider.aclose()
    assert delivery.outcome is Outcome.SENT
    [req] = fake_apns_cert.requests
    assert req.http_version == "2"
    assert req.method == "POST"
    assert req.path == f"/3/device/{DEVICE}"
    assert req.body == EXPECTED_PAYLOAD == PAYLOAD
    headers = dict(req.headers)
    assert headers.pop("apns-topic") == "chat.delta"
    assert headers.pop("apns-push-type") == "alert"
    assert headers.pop("apns-priority") == "10"
    assert headers.pop("apns-collapse-id") == "new_messages"
    assert headers.pop("content-type") == "application/json"
    assert headers.pop("content-length") == str(len(EXPECTED_PAYLOAD))
    # httpx's own defaults; nothing else (no authorization in certificate mode).
    assert set(headers) <= {"accept", "accept-encoding", "user-agent"}
    assert req.peer_cert is not None
    subject = dict(x[0] for x in req.peer_cert["subject"])
    assert subject["commonName"] == "Apple Push Services: chat.delta"


async def test_no_topic_header_when_unset(fake_apns_cert, apns_cert, ca_path):
    provider = cert_provider(fake_apns_cert, apns_cert, ca_path, topic=None)
    try:
        assert (await provider.send(TOKEN)).outcome is Outcome.SENT
    finally:
        await provider.aclose()
    assert fake_apns_cert.requests[0].header("apns-topic") is None


async def test_server_rejects_missing_client_cert(fake_apns_cert, ca_path):
    """Sanity check of the fake: without the .p12 the TLS handshake fails -> RETRY send."""
    provider = ApnsProvider(
        sandbox=False,
        topic=None,
        base_url=fake_apns_cert.url,
        timeout=5,
        ssl_context=ssl.create_default_context(cafile=ca_path),
    )
    try:
        delivery = await provider.send(TOKEN)
    finally:
        await provider.aclose()
    assert (delivery.outcome, delivery.reason) == (Outcome.RETRY, "send")
    assert fake_apns_cert.requests == []


@pytest.mark.parametrize("legacy", ["3des", "rc2", "none-password"])
async def test_legacy_and_unprotected_p12_load(
    legacy, fake_apns_cert, client_ca, ca_path, tmp_path
):
    if legacy == "rc2" and shutil.which("openssl") is None:
        pytest.skip("needs the openssl binary")
    path = tmp_path / "legacy.p12"
    password = None if legacy == "none-password" else b"pw"
    write_client_p12(client_ca, path, password, legacy="" if password is None else legacy)
    provider = cert_provider(fake_apns_cert, ApnsCert(path, password), ca_path)
    try:
        assert (await provider.send(TOKEN)).outcome is Outcome.SENT
    finally:
        await provider.aclose()


async def test_broken_p12_is_config_error(tmp_path, client_ca):
    missing = tmp_path / "missing.p12"
    with pytest.raises(ProviderConfigError):
        ApnsProvider.from_p12(missing, b"x", topic=None, sandbox=False)
    garbage = tmp_path / "garbage.p12"
    garbage.write_bytes(b"not a pkcs12 file")
    with pytest.raises(ProviderConfigError):
        ApnsProvider.from_p12(garbage, b"x", topic=None, sandbox=False)
    good = tmp_path / "good.p12"
    write_client_p12(client_ca, good, b"right")
    with pytest.raises(ProviderConfigError):
        ApnsProvider.from_p12(good, b"wrong", topic=None, sandbox=False)


async def test_broken_p8_is_config_error(tmp_path):
    with pytest.raises(ProviderConfigError):
        ApnsProvider.from_p8(
            tmp_path / "nope.p8", key_id="K", team_id="T", topic=None, sandbox=False
        )
    bad = tmp_path / "bad.p8"
    bad.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ProviderConfigError):
        ApnsProvider.from_p8(bad, key_id="K", team_id="T", topic=None, sandbox=False)


async def test_jwt_auth_reuse_and_renewal(fake_apns_jwt, apns_key, ca_path):
    clock = Clock()
    provider = jwt_provider(fake_apns_jwt, apns_key, ca_path, clock=clock)
    try:
        assert (await provider.send(TOKEN)).outcome is Outcome.SENT
        clock.now += JWT_RENEW_AFTER - 1
        assert (await provider.send(TOKEN)).outcome is Outcome.SENT
        clock.now += 2
        assert (await provider.send(TOKEN)).outcome is Outcome.SENT
    finally:
        await provider.aclose()
    auths = [r.header("authorization") for r in fake_apns_jwt.requests]
    assert all(a.startswith("bearer ") for a in auths)
    assert auths[0] == auths[1] != auths[2]
    (h0, c0), _, (h2, c2) = fake_apns_jwt.jwts
    assert h0["alg"] == "ES256" and h0["kid"] == apns_key.key_id
    assert c0 == {"iss": apns_key.team_id, "iat": 1_700_000_000}
    assert c2["iat"] == 1_700_000_000 + JWT_RENEW_AFTER + 1
    assert fake_apns_jwt.requests[0].header("apns-topic") == "chat.delta"


async def test_jwt_rejected_by_server_is_retry(fake_apns_jwt, tmp_path, ca_path):
    other = tmp_path / "other.p8"
    from devstack.fakes.keys import write_p8

    write_p8(other)
    key = ApnsKey(other, "ABC123DEFG", "TEAM123456", None)  # type: ignore[arg-type]
    provider = jwt_provider(fake_apns_jwt, key, ca_path)
    try:
        delivery = await provider.send(TOKEN)
    finally:
        await provider.aclose()
    assert delivery.outcome is Outcome.RETRY
    assert (delivery.reason, delivery.details) == ("403", "InvalidProviderToken")


async def test_many_concurrent_sends_share_one_connection(fake_apns_cert, apns_cert, ca_path):
    provider = cert_provider(fake_apns_cert, apns_cert, ca_path)
    try:
        results = await asyncio.gather(*(provider.send(TOKEN) for _ in range(50)))
        assert all(r.outcome is Outcome.SENT for r in results)
        await provider.send(TOKEN)
    finally:
        await provider.aclose()
    assert len(fake_apns_cert.requests) == 51
    assert fake_apns_cert.connections == 1
    assert {r.connection for r in fake_apns_cert.requests} == {1}
    assert {r.http_version for r in fake_apns_cert.requests} == {"2"}


@pytest.mark.parametrize(
    "how", ["goaway_after_reply", "goaway_idle", "refuse_stream", "server_closed_idle"]
)
async def test_reconnects_after_goaway_or_close(how, fake_apns_cert, apns_cert, ca_path):
    server = fake_apns_cert
    provider = cert_provider(server, apns_cert, ca_path)
    try:
        if how == "goaway_after_reply":
            server.script(Reply(200, action="goaway"))
        elif how == "refuse_stream":
            server.script(Reply(200), Reply(200, action="refuse"))
        assert (await provider.send(TOKEN)).outcome is Outcome.SENT
        if how == "goaway_idle":
            server.goaway_all()
        elif how == "server_closed_idle":
            server.close_connections()
        await asyncio.sleep(0.05)
        second = await provider.send(TOKEN)
        third = await provider.send(TOKEN)
    finally:
        await provider.aclose()
    assert second.outcome is Outcome.SENT, second
    assert third.outcome is Outcome.SENT
    assert server.connections == 2
    assert server.requests[-1].connection == 2


async def test_dropped_connection_mid_request_is_retry_then_recovers(
    fake_apns_cert, apns_cert, ca_path
):
    server = fake_apns_cert
    server.script(Reply(action="close"), Reply(action="close"))
    provider = cert_provider(server, apns_cert, ca_path)
    try:
        first = await provider.send(TOKEN)
        second = await provider.send(TOKEN)
    finally:
        await provider.aclose()
    assert (first.outcome, first.reason) == (Outcome.RETRY, "send")
    assert second.outcome is Outcome.SENT


async def test_timeout_is_retry_send(fake_apns_cert, apns_cert, ca_path):
    fake_apns_cert.script(Reply(200, delay=2))
    provider = cert_provider(fake_apns_cert, apns_cert, ca_path, timeout=0.3)
    try:
        delivery = await provider.send(TOKEN)
    finally:
        await provider.aclose()
    assert (delivery.outcome, delivery.reason, delivery.details) == (
        Outcome.RETRY,
        "send",
        "timeout",
    )


async def test_unreachable_is_retry_send(apns_cert, ca_path):
    provider = ApnsProvider.from_p12(
        apns_cert.path,
        apns_cert.password,
        topic=None,
        sandbox=True,
        base_url="https://127.0.0.1:9",
        verify=ca_path,
    )
    try:
        delivery = await provider.send(parse_token("sandbox:" + DEVICE))
    finally:
        await provider.aclose()
    assert (delivery.outcome, delivery.reason) == (Outcome.RETRY, "send")


@pytest.mark.parametrize(
    "reply, outcome, reason, details, retry_after",
    [
        (Reply(200), Outcome.SENT, "", "", None),
        (apns_error(410, "Unregistered"), Outcome.GONE, "410", "Unregistered", None),
        (apns_error(410, "ExpiredToken"), Outcome.GONE, "410", "ExpiredToken", None),
        (Reply(410), Outcome.GONE, "410", "Unregistered", None),
        (apns_error(400, "BadDeviceToken"), Outcome.GONE, "400", "BadDeviceToken", None),
        (
            apns_error(400, "DeviceTokenNotForTopic"),
            Outcome.GONE,
            "400",
            "DeviceTokenNotForTopic",
            None,
        ),
        (apns_error(400, "BadTopic"), Outcome.RETRY, "400", "BadTopic", None),
        (apns_error(400, "TopicDisallowed"), Outcome.RETRY, "400", "TopicDisallowed", None),
        (
            apns_error(403, "ExpiredProviderToken"),
            Outcome.RETRY,
            "403",
            "ExpiredProviderToken",
            None,
        ),
        (
            apns_error(403, "InvalidProviderToken"),
            Outcome.RETRY,
            "403",
            "InvalidProviderToken",
            None,
        ),
        (
            apns_error(403, "MissingProviderToken"),
            Outcome.RETRY,
            "403",
            "MissingProviderToken",
            None,
        ),
        (apns_error(403, "BadCertificate"), Outcome.RETRY, "403", "BadCertificate", None),
        (apns_error(413, "PayloadTooLarge"), Outcome.RETRY, "413", "PayloadTooLarge", None),
        (apns_error(429, "TooManyRequests", "7"), Outcome.RETRY, "429", "TooManyRequests", 7.0),
        (apns_error(429, "TooManyRequests"), Outcome.RETRY, "429", "TooManyRequests", 1.0),
        (apns_error(500, "InternalServerError"), Outcome.RETRY, "500", "InternalServerError", None),
        (apns_error(503, "ServiceUnavailable"), Outcome.RETRY, "503", "ServiceUnavailable", None),
        (apns_error(503, "Shutdown", "30"), Outcome.RETRY, "503", "Shutdown", 30.0),
        (Reply(502, b"<html>bad gateway</html>"), Outcome.RETRY, "502", "", None),
        (apns_error(400, "x" * 100), Outcome.RETRY, "400", "other", None),
    ],
)
async def test_status_mapping(
    reply, outcome, reason, details, retry_after, fake_apns_cert, apns_cert, ca_path
):
    fake_apns_cert.script(reply)
    provider = cert_provider(fake_apns_cert, apns_cert, ca_path)
    try:
        delivery = await provider.send(TOKEN)
    finally:
        await provider.aclose()
    assert delivery.outcome is outcome
    if outcome is not Outcome.SENT:
        assert (delivery.reason, delivery.details, delivery.retry_after) == (
            reason,
            details,
            retry_after,
        )


@pytest.mark.parametrize("device", ["xyz", "a1b2/../c3", "abc def", "ab\u00e9", "0x12"])
async def test_non_hex_token_is_not_sent_and_not_gone(device, fake_apns_cert, apns_cert, ca_path):
    with pytest.raises(TokenError):
        parse_token(device)  # the service answers these 400 before any provider
    provider = cert_provider(fake_apns_cert, apns_cert, ca_path)
    try:
        delivery = await provider.send(PushToken(Kind.APNS, device, device))
    finally:
        await provider.aclose()
    assert (delivery.outcome, delivery.reason) == (Outcome.RETRY, "invalid_token")
    assert fake_apns_cert.requests == []
    assert fake_apns_cert.connections == 0


async def test_sandbox_defaults(apns_key):
    sandbox = ApnsProvider.from_p8(apns_key.path, key_id="K", team_id="T", topic=None, sandbox=True)
    production = ApnsProvider.from_p8(
        apns_key.path, key_id="K", team_id="T", topic=None, sandbox=False
    )
    try:
        assert sandbox.base_url == "https://api.sandbox.push.apple.com"
        assert production.base_url == "https://api.push.apple.com"
        assert sandbox.timeout == 20.0
    finally:
        await sandbox.aclose()
        await production.aclose()


async def test_verify_as_ssl_context(fake_apns_cert, apns_cert, tls_ca: trustme.CA):
    ctx = ssl.create_default_context()
    tls_ca.configure_trust(ctx)
    provider = ApnsProvider.from_p12(
        apns_cert.path,
        apns_cert.password,
        topic="chat.delta",
        sandbox=False,
        base_url=fake_apns_cert.url,
        verify=ctx,
    )
    try:
        assert (await provider.send(TOKEN)).outcome is Outcome.SENT
    finally:
        await provider.aclose()
    assert json.loads(fake_apns_cert.requests[0].body)["aps"]["mutable-content"] == 1


async def test_production_and_sandbox_share_one_limiter(fake_apns_jwt, apns_key, ca_path):
    """The single ``apns_*`` limits cover both APNs environments: a 429 from one backs off
    the other, and ``apns_concurrency`` is not doubled by a second limiter."""
    from notifiers.build import build_service
    from notifiers.settings import settings_from_mapping

    settings = settings_from_mapping(
        {
            "apns_key_file": str(apns_key.path),
            "apns_key_id": apns_key.key_id,
            "apns_team_id": apns_key.team_id,
            "apns_url": fake_apns_jwt.url,
            "apns_sandbox_url": fake_apns_jwt.url,
            "ca_file": ca_path,
            "apns_concurrency": "3",
            "apns_max_wait": "0",
            "ubports": "false",
        },
        env={},
    )
    service = build_service(settings)
    try:
        production, sandbox = service.providers[Kind.APNS], service.providers[Kind.APNS_SANDBOX]
        fake_apns_jwt.script(apns_error(429, "TooManyRequests", "60"))
        delivery = await production.send(TOKEN)
        assert (delivery.outcome, delivery.reason) == (Outcome.RETRY, "429")
        delivery = await sandbox.send(parse_token("sandbox:" + DEVICE))
        assert (delivery.outcome, delivery.reason) == (Outcome.RETRY, "backoff")
        assert len(fake_apns_jwt.requests) == 1  # the sandbox send was held back too
        # and one concurrency cap of 3 for both, not 3 each
        assert production is sandbox and production.concurrency == 3
    finally:
        await service.aclose()
