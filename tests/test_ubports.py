"""UbportsProvider against a fake push server (HTTP/2 over TLS, loopback)."""

from __future__ import annotations

import asyncio
import json

import pytest

from devstack.fakes.h2server import Reply
from notifiers.providers.base import Outcome
from notifiers.providers.ubports import UbportsProvider
from notifiers.tokens import Kind, PushToken, TokenError, parse_token

pytestmark = pytest.mark.asyncio

DEVICE = "ZGV2aWNlOnViLXRva2VuLTEyMw"
TOKEN = parse_token(f"ubports-{DEVICE}")
NOW = 1_700_000_000.0  # 2023-11-14T22:13:20Z


def provider_for(server, ca_path, **kw) -> UbportsProvider:
    return UbportsProvider(server.url, verify=ca_path, clock=lambda: NOW, **kw)


async def test_request_bytes_and_headers(fake_ubports, ca_path):
    provider = provider_for(fake_ubports, ca_path)
    try:
        delivery = await provider.send(TOKEN)
    finally:
        await provider.aclose()
    assert delivery.outcome is Outcome.SENT
    [req] = fake_ubports.requests
    assert (req.method, req.path, req.http_version) == ("POST", "/notify", "2")
    assert req.body == (
        b'{"expire_on":"2023-11-21T22:13:20Z","appid":"deltatouch.lotharketterer_deltatouch",'
        b'"token":"ZGV2aWNlOnViLXRva2VuLTEyMw","data":{"notification":{'
        b'"tag":"sent_by_chatmail_server","card":{"popup":true,"persist":true,'
        b'"summary":"New message","body":"You have a new message"},"sound":true,'
        b'"vibrate":{"pattern":[200],"duration":200,"repeat":1}},"sent-by":"Chatmail Server"}}'
    )
    headers = dict(req.headers)
    assert headers.pop("content-type") == "application/json"
    assert headers.pop("content-length") == str(len(req.body))
    assert set(headers) <= {"accept", "accept-encoding", "user-agent"}


async def test_default_url_and_timeout():
    provider = UbportsProvider()
    try:
        assert provider.url == "https://push.ubports.com/notify"
        assert provider.timeout == 60.0
    finally:
        await provider.aclose()


async def test_concurrent_sends_one_connection(fake_ubports, ca_path):
    provider = provider_for(fake_ubports, ca_path)
    try:
        results = await asyncio.gather(*(provider.send(TOKEN) for _ in range(20)))
    finally:
        await provider.aclose()
    assert all(r.outcome is Outcome.SENT for r in results)
    assert fake_ubports.connections == 1


def _json(status: int, body: dict, headers=()) -> Reply:
    reply = Reply.json(status, json.dumps(body))
    reply.headers.extend(headers)
    return reply


@pytest.mark.parametrize(
    "reply, outcome, reason, details, retry_after",
    [
        (Reply(200, b'{"ok":true}'), Outcome.SENT, "", "", None),
        (Reply(202), Outcome.SENT, "", "", None),
        (_json(400, {"error": "unknown-token", "message": "Unknown token"}), Outcome.GONE,
         "400", "unknown-token", None),
        # The push server never answers 404/410 for a token (ubuntu-push server/api):
        # they mean a wrong --ubports-url or a proxy in front, so they must not delete tokens.
        (Reply(404), Outcome.RETRY, "404", "", None),
        (Reply(410), Outcome.RETRY, "410", "", None),
        (_json(401, {"error": "unauthorized", "message": "Unauthorized"}), Outcome.RETRY,
         "401", "unauthorized", None),
        (_json(413, {"error": "too-many-pending"}), Outcome.RETRY, "413", "too-many-pending",
         None),
        (_json(503, {"error": "unavailable"}), Outcome.RETRY, "503", "unavailable", None),
        (_json(400, {"error": "invalid-request", "message": "bad"}), Outcome.RETRY,
         "400", "invalid-request", None),
        (Reply(401), Outcome.RETRY, "401", "", None),
        (Reply(413), Outcome.RETRY, "413", "", None),
        (_json(429, {"error": "too-many"}, [("retry-after", "9")]), Outcome.RETRY,
         "429", "too-many", 9.0),
        (Reply(429), Outcome.RETRY, "429", "", 5.0),
        (Reply(500), Outcome.RETRY, "500", "", None),
        (Reply(503, headers=[("retry-after", "2")]), Outcome.RETRY, "503", "", 2.0),
    ],
)  # fmt: skip
async def test_status_mapping(reply, outcome, reason, details, retry_after, fake_ubports, ca_path):
    fake_ubports.script(reply)
    provider = provider_for(fake_ubports, ca_path)
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


@pytest.mark.parametrize("device", ['x","appid":"evil', "a b", "t\u00f6k"])
async def test_bad_charset_is_not_sent_and_not_gone(device, fake_ubports, ca_path):
    raw = f"ubports-{device}"
    with pytest.raises(TokenError):
        parse_token(raw)  # the service answers these 400 before any provider
    provider = provider_for(fake_ubports, ca_path)
    try:
        delivery = await provider.send(PushToken(Kind.UBPORTS, raw, device))
    finally:
        await provider.aclose()
    assert (delivery.outcome, delivery.reason) == (Outcome.RETRY, "invalid_token")
    assert fake_ubports.requests == []


async def test_transport_errors_are_retry_send(fake_ubports, ca_path):
    fake_ubports.script(Reply(200, delay=2))
    provider = provider_for(fake_ubports, ca_path, timeout=0.3)
    try:
        timed_out = await provider.send(TOKEN)
    finally:
        await provider.aclose()
    unreachable = UbportsProvider("https://127.0.0.1:9", verify=ca_path)
    try:
        refused = await unreachable.send(TOKEN)
    finally:
        await unreachable.aclose()
    assert (timed_out.outcome, timed_out.reason, timed_out.details) == (
        Outcome.RETRY,
        "send",
        "timeout",
    )
    assert (refused.outcome, refused.reason) == (Outcome.RETRY, "send")


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, 5.0),
        ("", 5.0),
        ("12", 12.0),
        ("1.5", 1.5),
        ("-3", 0.0),
        ("99999999", 3600.0),
        ("nan", 5.0),
        ("soon", 5.0),
        ("Tue, 14 Nov 2023 22:14:20 GMT", 60.0),
    ],
)
async def test_parse_retry_after(value, expected):
    from notifiers.providers.common import parse_retry_after

    assert parse_retry_after(value, 5.0, now=lambda: NOW) == expected
