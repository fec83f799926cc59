"""FcmProvider against a fake FCM v1 + OAuth token endpoint (HTTP/2 over TLS, loopback)."""

from __future__ import annotations

import asyncio
import urllib.parse

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from devstack.fakes.fcm import SCOPE, FakeFcm, fcm_error, invalid_token_error
from devstack.fakes.h2server import Reply
from devstack.fakes.keys import write_service_account
from notifiers.providers.base import Outcome, ProviderConfigError
from notifiers.providers.fcm import REFRESH_MARGIN, FcmProvider
from notifiers.tokens import Kind, PushToken, TokenError, parse_token

pytestmark = pytest.mark.asyncio

DEVICE = "dGVzdA:APA91bH-example_token-123"
TOKEN = parse_token(f"fcm-chat.delta:{DEVICE}")


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def provider_for(server: FakeFcm, key_path, ca_path: str, **kw) -> FcmProvider:
    return FcmProvider.from_service_account(key_path, base_url=server.url, verify=ca_path, **kw)


async def test_request_bytes_headers_and_oauth(fake_fcm, fcm_key_path, ca_path):
    clock = Clock()
    provider = provider_for(fake_fcm, fcm_key_path, ca_path, clock=clock)
    try:
        delivery = await provider.send(TOKEN)
    finally:
        await provider.aclose()
    assert delivery.outcome is Outcome.SENT
    [token_req] = fake_fcm.token_requests
    assert token_req.method == "POST"
    assert token_req.header("content-type") == "application/x-www-form-urlencoded"
    form = urllib.parse.parse_qs(token_req.body.decode())
    assert form["grant_type"] == ["urn:ietf:params:oauth:grant-type:jwt-bearer"]
    [assertion] = fake_fcm.assertions
    assert assertion["header"]["alg"] == "RS256"
    assert assertion["claims"] == {
        "iss": "push@test-project.iam.gserviceaccount.com",
        "aud": fake_fcm.token_url,
        "scope": SCOPE,
        "iat": 1_700_000_000,
        "exp": 1_700_000_000 + 3600,
    }
    [req] = fake_fcm.send_requests
    assert req.http_version == "2"
    assert req.method == "POST"
    assert req.path == "/v1/projects/test-project/messages:send"
    assert req.body == (
        b'{"message":{"token":"dGVzdA:APA91bH-example_token-123",'
        b'"data":{"level":"awesome"},"android":{"priority":"high"}}}'
    )
    headers = dict(req.headers)
    assert headers.pop("authorization") == "Bearer ya29.fake-1"
    assert headers.pop("content-type") == "application/json"
    assert headers.pop("content-length") == str(len(req.body))
    assert set(headers) <= {"accept", "accept-encoding", "user-agent"}


async def test_project_id_override(fake_fcm, tmp_path, ca_path):
    key = tmp_path / "k.json"
    info = write_service_account(key, token_uri=fake_fcm.token_url, project_id="from-file")
    fake_fcm.use_service_account(info)
    provider = provider_for(fake_fcm, key, ca_path, project_id="test-project")
    try:
        assert (await provider.send(TOKEN)).outcome is Outcome.SENT
    finally:
        await provider.aclose()
    assert fake_fcm.send_requests[0].path == "/v1/projects/test-project/messages:send"


async def test_token_url_override(fake_fcm, tmp_path, ca_path):
    key = tmp_path / "k.json"
    info = write_service_account(key, token_uri="https://oauth2.googleapis.com/token")
    fake_fcm.use_service_account(info)
    provider = provider_for(fake_fcm, key, ca_path, token_url=fake_fcm.token_url)
    try:
        assert (await provider.send(TOKEN)).outcome is Outcome.SENT
    finally:
        await provider.aclose()
    assert fake_fcm.assertions[0]["claims"]["aud"] == "https://oauth2.googleapis.com/token"


async def test_access_token_cached_and_refreshed_before_expiry(fake_fcm, fcm_key_path, ca_path):
    clock = Clock()
    fake_fcm.expires_in = 3600
    provider = provider_for(fake_fcm, fcm_key_path, ca_path, clock=clock)
    try:
        await provider.send(TOKEN)
        clock.now += 3600 - REFRESH_MARGIN - 1
        await provider.send(TOKEN)
        assert len(fake_fcm.token_requests) == 1
        clock.now += 2  # now within the last minute: refresh
        await provider.send(TOKEN)
    finally:
        await provider.aclose()
    assert len(fake_fcm.token_requests) == 2
    auths = [r.header("authorization") for r in fake_fcm.send_requests]
    assert auths == ["Bearer ya29.fake-1", "Bearer ya29.fake-1", "Bearer ya29.fake-2"]
    assert fake_fcm.assertions[1]["claims"]["iat"] == 1_700_000_000 + 3600 - REFRESH_MARGIN + 1


async def test_concurrent_sends_share_one_refresh_and_one_connection(
    fake_fcm, fcm_key_path, ca_path
):
    provider = provider_for(fake_fcm, fcm_key_path, ca_path)
    try:
        results = await asyncio.gather(*(provider.send(TOKEN) for _ in range(50)))
    finally:
        await provider.aclose()
    assert all(r.outcome is Outcome.SENT for r in results)
    assert len(fake_fcm.token_requests) == 1
    assert len(fake_fcm.send_requests) == 50
    assert fake_fcm.connections == 1


async def test_401_drops_token_and_next_send_refreshes(fake_fcm, fcm_key_path, ca_path):
    provider = provider_for(fake_fcm, fcm_key_path, ca_path)
    try:
        assert (await provider.send(TOKEN)).outcome is Outcome.SENT
        fake_fcm.revoke_all()
        rejected = await provider.send(TOKEN)
        again = await provider.send(TOKEN)
    finally:
        await provider.aclose()
    assert (rejected.outcome, rejected.reason, rejected.details) == (
        Outcome.RETRY,
        "401",
        "UNAUTHENTICATED",
    )
    assert again.outcome is Outcome.SENT
    assert [r.header("authorization") for r in fake_fcm.send_requests] == [
        "Bearer ya29.fake-1",
        "Bearer ya29.fake-1",
        "Bearer ya29.fake-2",
    ]


@pytest.mark.parametrize(
    "reply, details",
    [
        (Reply.json(400, '{"error":"invalid_grant"}'), "400"),
        (Reply.json(500, "oops"), "500"),
        (Reply.json(200, '{"token_type":"Bearer"}'), "bad_response"),
        (Reply.json(200, '{"access_token":"x","token_type":"mac"}'), "bad_response"),
        (Reply(200, action="close"), "RemoteProtocolError"),
    ],
)
async def test_token_fetch_failure_is_retry(reply, details, fake_fcm, fcm_key_path, ca_path):
    # A dropped connection is repeated once on a fresh one, so it needs two.
    fake_fcm.token_script.extend([reply, reply] if reply.action == "close" else [reply])
    provider = provider_for(fake_fcm, fcm_key_path, ca_path)
    try:
        delivery = await provider.send(TOKEN)
        assert fake_fcm.send_requests == []
        recovered = await provider.send(TOKEN)
    finally:
        await provider.aclose()
    assert (delivery.outcome, delivery.reason) == (Outcome.RETRY, "api_key_fetch")
    if reply.action != "close":
        assert delivery.details == details
    assert recovered.outcome is Outcome.SENT


async def test_bad_assertion_rejected_by_fake(fake_fcm, tmp_path, ca_path):
    """The fake really checks the signature: a key it does not know gets invalid_grant."""
    other = tmp_path / "other.json"
    write_service_account(other, token_uri=fake_fcm.token_url)
    fake_fcm.public_key = rsa.generate_private_key(
        public_exponent=65537, key_size=2048
    ).public_key()
    provider = provider_for(fake_fcm, other, ca_path)
    try:
        delivery = await provider.send(TOKEN)
    finally:
        await provider.aclose()
    assert (delivery.reason, delivery.details) == ("api_key_fetch", "400")


@pytest.mark.parametrize(
    "reply, outcome, reason, details, retry_after",
    [
        (Reply.json(200, '{"name":"projects/p/messages/1"}'), Outcome.SENT, "", "", None),
        (fcm_error(404, "NOT_FOUND", "UNREGISTERED"), Outcome.GONE, "404", "UNREGISTERED", None),
        (invalid_token_error(), Outcome.GONE, "400", "INVALID_ARGUMENT", None),
        (
            fcm_error(400, "INVALID_ARGUMENT", "INVALID_ARGUMENT", message="Invalid JSON payload"),
            Outcome.RETRY,
            "400",
            "INVALID_ARGUMENT",
            None,
        ),
        (
            fcm_error(404, "NOT_FOUND", message="no such project"),
            Outcome.RETRY,
            "404",
            "NOT_FOUND",
            None,
        ),
        (
            fcm_error(403, "PERMISSION_DENIED", "SENDER_ID_MISMATCH"),
            Outcome.RETRY,
            "403",
            "SENDER_ID_MISMATCH",
            None,
        ),
        (
            fcm_error(403, "PERMISSION_DENIED", message="The caller does not have permission"),
            Outcome.RETRY,
            "403",
            "PERMISSION_DENIED",
            None,
        ),
        (
            fcm_error(429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED", retry_after="42"),
            Outcome.RETRY,
            "429",
            "QUOTA_EXCEEDED",
            42.0,
        ),
        (
            fcm_error(429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED"),
            Outcome.RETRY,
            "429",
            "QUOTA_EXCEEDED",
            10.0,
        ),
        (fcm_error(500, "INTERNAL", "INTERNAL"), Outcome.RETRY, "500", "INTERNAL", None),
        (
            fcm_error(503, "UNAVAILABLE", "UNAVAILABLE", retry_after="5"),
            Outcome.RETRY,
            "503",
            "UNAVAILABLE",
            5.0,
        ),
        (Reply(502, b"<html/>"), Outcome.RETRY, "502", "", None),
        (Reply(301, headers=[("location", "/elsewhere")]), Outcome.RETRY, "301", "", None),
    ],
)
async def test_status_mapping(
    reply, outcome, reason, details, retry_after, fake_fcm, fcm_key_path, ca_path
):
    fake_fcm.script(reply)
    provider = provider_for(fake_fcm, fcm_key_path, ca_path)
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


@pytest.mark.parametrize("device", ["abc def", 'abc"}', "tok/en", "t\u00f6ken", "a.b"])
async def test_bad_charset_is_not_sent_and_not_gone(device, fake_fcm, fcm_key_path, ca_path):
    raw = f"fcm-chat.delta:{device}"
    with pytest.raises(TokenError):
        parse_token(raw)  # the service answers these 400 before any provider
    provider = provider_for(fake_fcm, fcm_key_path, ca_path)
    try:
        delivery = await provider.send(PushToken(Kind.FCM, raw, device, package="chat.delta"))
    finally:
        await provider.aclose()
    assert (delivery.outcome, delivery.reason) == (Outcome.RETRY, "invalid_token")
    assert fake_fcm.requests == []


async def test_timeout_is_retry_send(fake_fcm, fcm_key_path, ca_path):
    provider = provider_for(fake_fcm, fcm_key_path, ca_path, timeout=0.3)
    try:
        assert (await provider.send(TOKEN)).outcome is Outcome.SENT
        fake_fcm.script(Reply(200, delay=2))
        delivery = await provider.send(TOKEN)
    finally:
        await provider.aclose()
    assert (delivery.outcome, delivery.reason, delivery.details) == (
        Outcome.RETRY,
        "send",
        "timeout",
    )


@pytest.mark.parametrize(
    "content",
    [
        None,
        "not json",
        "{}",
        '{"client_email": "a@b", "private_key": "garbage", "project_id": "p"}',
    ],
)
async def test_broken_key_file_is_config_error(content, tmp_path):
    path = tmp_path / "key.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ProviderConfigError):
        FcmProvider.from_service_account(path)


async def test_missing_project_id_is_config_error(tmp_path):
    path = tmp_path / "key.json"
    write_service_account(path, token_uri="https://oauth2.googleapis.com/token", project_id="")
    with pytest.raises(ProviderConfigError):
        FcmProvider.from_service_account(path)
    provider = FcmProvider.from_service_account(path, project_id="explicit")
    assert provider.send_url == "https://fcm.googleapis.com/v1/projects/explicit/messages:send"
    await provider.aclose()
