"""WebPushProvider against a fake push service over HTTPS on 127.0.0.1.

The fake decrypts every body with the subscriber's private key and verifies
the VAPID JWT, so a SENT here means a real subscriber could read the push.
Loopback endpoints are reached only with ``allow_loopback`` (the tests'
explicit configuration); the refusal tests use the policy as production has it.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import time

import jwt
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from devstack.fakes.webpush import WebPushReply
from notifiers.build import build_providers
from notifiers.providers.base import Outcome, ProviderConfigError
from notifiers.providers.endpoints import EndpointPolicy, address_refusal, parse_patterns
from notifiers.providers.vapid import JWT_LIFETIME, Vapid, audience, load_key
from notifiers.providers.webpush import MAX_RESPONSE_BYTES, WebPushProvider, build, map_status
from notifiers.settings import ProxySettings, settings_from_mapping
from notifiers.tokens import Kind, PushToken, TokenError, parse_token

LOOPBACK = EndpointPolicy(allow_loopback=True)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


P256DH = b64url(
    ec.generate_private_key(ec.SECP256R1())
    .public_key()
    .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
)
AUTH = b64url(b"0123456789abcdef")


def token_for(endpoint: str) -> PushToken:
    return parse_token(f"webpush:{endpoint}|{P256DH}|{AUTH}")


class Resolver:
    """A resolver the test controls: name -> addresses; records what it was asked."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int, family: int) -> list[str]:
        self.asked.append(host)
        if host not in self.answers:
            raise OSError(f"{host}: no such host")
        return self.answers[host]


@pytest.fixture
def vapid() -> Vapid:
    return Vapid(ec.generate_private_key(ec.SECP256R1()), "mailto:ops@relay.example")


@pytest_asyncio.fixture
async def make_provider(vapid, ca_path):
    made: list[WebPushProvider] = []

    def make(policy: EndpointPolicy = LOOPBACK, **kw) -> WebPushProvider:
        provider = WebPushProvider(vapid, policy=policy, verify=ca_path, **kw)
        made.append(provider)
        return provider

    yield make
    for provider in made:
        await provider.aclose()


# -- the request ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_payload_decrypts_and_headers_and_vapid_claims(fake_webpush, make_provider, vapid):
    subscription = fake_webpush.subscribe()
    provider = make_provider()
    before = time.time()
    delivery = await provider.send(parse_token(fake_webpush.token(subscription)))
    assert delivery.outcome is Outcome.SENT, fake_webpush.requests[0].error
    [seen] = fake_webpush.requests
    assert seen.error == ""
    assert seen.plaintext == b"ping"
    assert seen.path == "/push/s1"
    assert seen.headers["ttl"] == "43200"
    assert seen.headers["urgency"] == "high"
    assert seen.headers["content-encoding"] == "aes128gcm"
    assert seen.headers["content-type"] == "application/octet-stream"
    assert seen.headers["content-length"] == str(len(seen.body))
    # aes128gcm header: 16-byte salt, record size, and the 65-byte ephemeral key as key id.
    assert seen.body[20] == 65 and seen.body[21] == 4
    assert seen.vapid_key == vapid.public_key
    assert seen.claims["aud"] == f"https://127.0.0.1:{fake_webpush.port}"
    assert seen.claims["sub"] == "mailto:ops@relay.example"
    assert before + JWT_LIFETIME - 5 <= seen.claims["exp"] <= time.time() + 24 * 3600


@pytest.mark.asyncio
async def test_each_message_has_a_fresh_key_and_salt_and_the_jwt_is_reused(
    fake_webpush, make_provider
):
    token = parse_token(fake_webpush.token(fake_webpush.subscribe()))
    provider = make_provider()
    for _ in range(2):
        assert (await provider.send(token)).outcome is Outcome.SENT
    first, second = fake_webpush.requests
    assert first.body[:16] != second.body[:16]  # salt
    assert first.body[21:86] != second.body[21:86]  # ephemeral public key
    assert first.plaintext == second.plaintext == b"ping"
    assert first.headers["authorization"] == second.headers["authorization"]


def test_jwt_renewed_before_expiry_and_audience_is_the_origin():
    now = [1_700_000_000.0]
    vapid = Vapid(ec.generate_private_key(ec.SECP256R1()), clock=lambda: now[0])
    first = vapid.header("https://push.example/a")
    assert vapid.header("https://push.example/b") == first
    now[0] += JWT_LIFETIME - 3000  # less than an hour left
    renewed = vapid.header("https://push.example/a")
    assert renewed != first
    t = renewed.split("t=")[1].split(",")[0]
    claims = jwt.decode(t, options={"verify_signature": False})
    assert claims["exp"] == int(now[0]) + JWT_LIFETIME
    assert audience("https://Push.Example:443/x?y") == "https://push.example"
    assert audience("https://push.example:8443/x") == "https://push.example:8443"
    assert audience("https://[2001:db8::1]/x") == "https://[2001:db8::1]"


@pytest.mark.asyncio
async def test_concurrent_sends_to_one_service(fake_webpush, make_provider):
    subscriptions = [fake_webpush.subscribe(f"s{i}") for i in range(20)]
    provider = make_provider()
    results = await asyncio.gather(
        *(provider.send(parse_token(fake_webpush.token(s))) for s in subscriptions)
    )
    assert all(r.outcome is Outcome.SENT for r in results)
    assert sorted(r.path for r in fake_webpush.requests) == sorted(s.path for s in subscriptions)
    assert all(r.plaintext == b"ping" for r in fake_webpush.requests)


# -- the answers -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply, outcome, reason",
    [
        (WebPushReply(201), Outcome.SENT, ""),
        (WebPushReply(200), Outcome.SENT, ""),
        (WebPushReply(202), Outcome.SENT, ""),
        (WebPushReply(404), Outcome.GONE, "404"),
        (WebPushReply(410, body=b'{"errno":106}'), Outcome.GONE, "410"),
        (WebPushReply(400), Outcome.RETRY, "400"),
        (WebPushReply(401), Outcome.RETRY, "401"),
        (WebPushReply(403), Outcome.RETRY, "403"),
        (WebPushReply(413), Outcome.RETRY, "413"),
        (WebPushReply(500), Outcome.RETRY, "500"),
        (WebPushReply(503, headers=[("Retry-After", "30")]), Outcome.RETRY, "503"),
        (WebPushReply(301, headers=[("Location", "https://127.0.0.1:9/")]), Outcome.RETRY, "301"),
    ],
)
@pytest.mark.asyncio
async def test_status_mapping(reply, outcome, reason, fake_webpush, make_provider):
    token = parse_token(fake_webpush.token(fake_webpush.subscribe()))
    fake_webpush.script(reply)
    delivery = await make_provider().send(token)
    assert (delivery.outcome, delivery.reason, delivery.retry_after) == (outcome, reason, None)
    assert len(fake_webpush.requests) == 1  # a redirect is not followed


@pytest.mark.asyncio
async def test_429_backs_off_that_origin_only(fake_webpush, make_provider):
    subscription = fake_webpush.subscribe()
    by_ip = parse_token(fake_webpush.token(subscription))
    by_name = parse_token(fake_webpush.token(subscription, "localhost"))
    now = [1000.0]
    provider = make_provider(clock=lambda: now[0])
    fake_webpush.script(WebPushReply(429, headers=[("Retry-After", "30")]))
    throttled = await provider.send(by_ip)
    # The shared rate limiter is not parked: one hostile endpoint must not stop every service.
    assert (throttled.outcome, throttled.reason, throttled.retry_after) == (
        Outcome.RETRY,
        "429",
        None,
    )
    held = await provider.send(by_ip)
    assert (held.outcome, held.reason) == (Outcome.RETRY, "backoff")
    assert len(fake_webpush.requests) == 1
    assert (await provider.send(by_name)).outcome is Outcome.SENT  # another origin
    now[0] += 31
    assert (await provider.send(by_ip)).outcome is Outcome.SENT
    assert len(fake_webpush.requests) == 3


@pytest.mark.asyncio
async def test_429_without_retry_after_backs_off_the_default(fake_webpush, make_provider):
    token = parse_token(fake_webpush.token(fake_webpush.subscribe()))
    now = [1000.0]
    provider = make_provider(clock=lambda: now[0])
    fake_webpush.script(WebPushReply(429))
    await provider.send(token)
    now[0] += 4
    assert (await provider.send(token)).reason == "backoff"
    now[0] += 2
    assert (await provider.send(token)).outcome is Outcome.SENT


@pytest.mark.parametrize("status, outcome", [(201, Outcome.SENT), (500, Outcome.RETRY)])
@pytest.mark.asyncio
async def test_oversized_answer_is_not_read_to_the_end(
    status, outcome, fake_webpush, make_provider
):
    token = parse_token(fake_webpush.token(fake_webpush.subscribe()))
    fake_webpush.script(WebPushReply(status, stream=1 << 40))  # endless in effect
    provider = make_provider()
    started = time.monotonic()
    delivery = await provider.send(token)
    assert time.monotonic() - started < 5
    assert (delivery.outcome, delivery.details) == (outcome, "oversized")
    # The connection was dropped, so the next push works on a fresh one.
    assert (await provider.send(token)).outcome is Outcome.SENT


@pytest.mark.asyncio
async def test_small_answer_body_within_the_cap(fake_webpush, make_provider):
    token = parse_token(fake_webpush.token(fake_webpush.subscribe()))
    fake_webpush.script(WebPushReply(201, stream=MAX_RESPONSE_BYTES))
    assert await make_provider().send(token) == map_status(201)


@pytest.mark.asyncio
async def test_timeout_and_unreachable_are_retry_send(fake_webpush, make_provider):
    token = parse_token(fake_webpush.token(fake_webpush.subscribe()))
    fake_webpush.script(WebPushReply(201, delay=2))
    timed_out = await make_provider(timeout=0.3).send(token)
    assert (timed_out.outcome, timed_out.reason, timed_out.details) == (
        Outcome.RETRY,
        "send",
        "timeout",
    )
    refused = await make_provider().send(token_for("https://127.0.0.1:9/push/x"))
    assert (refused.outcome, refused.reason) == (Outcome.RETRY, "send")


@pytest.mark.asyncio
async def test_unknown_subscription_at_the_fake_is_gone(fake_webpush, make_provider):
    fake_webpush.subscribe()
    delivery = await make_provider().send(
        token_for(f"https://127.0.0.1:{fake_webpush.port}/push/unknown")
    )
    assert (delivery.outcome, delivery.reason) == (Outcome.GONE, "404")


@pytest.mark.asyncio
async def test_key_that_is_no_curve_point_is_retry_and_not_sent(fake_webpush, make_provider):
    bogus = b64url(b"\x04" + b"\x01" * 64)
    raw = f"webpush:{fake_webpush.endpoint(fake_webpush.subscribe())}|{bogus}|{AUTH}"
    delivery = await make_provider().send(parse_token(raw))
    assert (delivery.outcome, delivery.reason) == (Outcome.RETRY, "invalid_token")
    assert fake_webpush.requests == []


@pytest.mark.asyncio
async def test_token_built_by_hand_outside_the_grammar_is_not_sent(make_provider):
    token = PushToken(Kind.WEBPUSH, "webpush:x", "http://127.0.0.1/x", p256dh=P256DH, auth=AUTH)
    delivery = await make_provider().send(token)
    assert (delivery.outcome, delivery.reason) == (Outcome.RETRY, "invalid_token")


# -- where requests may go ---------------------------------------------------------------


@pytest.mark.parametrize(
    "host, reason",
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("[::1]", "loopback"),
        ("[::ffff:127.0.0.1]", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "private"),  # shared address space (CGNAT)
        ("0.0.0.0", "private"),
        ("[::]", "private"),
        ("[fc00::1]", "private"),
        ("[::ffff:10.0.0.1]", "private"),
        ("192.0.2.1", "private"),  # documentation
        ("240.0.0.1", "private"),  # reserved
        ("169.254.169.254", "link_local"),  # cloud metadata
        ("[fe80::1]", "link_local"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("[ff02::1]", "multicast"),
    ],
)
@pytest.mark.asyncio
async def test_private_address_literals_are_refused_before_any_connection(
    host, reason, make_provider
):
    resolver = Resolver({})
    provider = make_provider(EndpointPolicy(), resolve=resolver)
    delivery = await provider.send(token_for(f"https://{host}:1/push/x"))
    assert (delivery.outcome, delivery.reason, delivery.details) == (
        Outcome.RETRY,
        "endpoint",
        reason,
    )
    assert resolver.asked == []


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"]
)
def test_public_addresses_pass(address):
    assert address_refusal(ipaddress.ip_address(address)) is None


def test_loopback_exception_covers_loopback_only():
    def refusal(text):
        return address_refusal(ipaddress.ip_address(text), allow_loopback=True)

    assert refusal("127.0.0.1") is None and refusal("::1") is None
    assert refusal("10.0.0.1") == "private"
    assert refusal("169.254.1.1") == "link_local"


@pytest.mark.asyncio
async def test_localhost_resolves_to_loopback_and_is_refused(fake_webpush, make_provider):
    token = parse_token(fake_webpush.token(fake_webpush.subscribe(), "localhost"))
    delivery = await make_provider(EndpointPolicy()).send(token)
    assert (delivery.outcome, delivery.reason, delivery.details) == (
        Outcome.RETRY,
        "endpoint",
        "loopback",
    )
    assert fake_webpush.requests == []


@pytest.mark.parametrize(
    "addresses, reason",
    [
        (["127.0.0.1"], "loopback"),
        (["::1"], "loopback"),
        (["10.1.2.3"], "private"),
        # All or nothing: a public answer next to a private one does not open the private one.
        (["93.184.216.34", "192.168.0.10"], "private"),
        (["2606:4700::1", "fe80::1"], "link_local"),
    ],
)
@pytest.mark.asyncio
async def test_names_resolving_to_private_addresses_are_refused(
    addresses, reason, fake_webpush, make_provider
):
    resolver = Resolver({"push.example": addresses})
    token = parse_token(fake_webpush.token(fake_webpush.subscribe(), "push.example"))
    delivery = await make_provider(EndpointPolicy(), resolve=resolver).send(token)
    assert (delivery.outcome, delivery.reason, delivery.details) == (
        Outcome.RETRY,
        "endpoint",
        reason,
    )
    assert resolver.asked == ["push.example"]
    assert fake_webpush.requests == []


@pytest.mark.asyncio
async def test_connection_goes_to_the_checked_address_with_the_name_for_tls(
    fake_webpush, make_provider
):
    # push.example exists only in this resolver: reaching the fake proves the connection
    # used the address the guard checked, while TLS (SNI, certificate) and Host use the name.
    resolver = Resolver({"push.example": ["127.0.0.1"]})
    token = parse_token(fake_webpush.token(fake_webpush.subscribe(), "push.example"))
    delivery = await make_provider(LOOPBACK, resolve=resolver).send(token)
    assert delivery.outcome is Outcome.SENT, fake_webpush.requests
    [seen] = fake_webpush.requests
    assert seen.server_name == "push.example"
    assert seen.headers["host"] == f"push.example:{fake_webpush.port}"
    assert seen.claims["aud"] == f"https://push.example:{fake_webpush.port}"
    assert seen.plaintext == b"ping"


@pytest.mark.asyncio
async def test_unresolvable_name_is_retry(make_provider):
    delivery = await make_provider(resolve=Resolver({})).send(
        token_for("https://nowhere.example/push/x")
    )
    assert (delivery.outcome, delivery.reason, delivery.details) == (
        Outcome.RETRY,
        "endpoint",
        "dns",
    )


@pytest.mark.asyncio
async def test_allow_list(fake_webpush, make_provider):
    subscription = fake_webpush.subscribe()
    resolver = Resolver({"push.example": ["127.0.0.1"]})
    policy = EndpointPolicy(parse_patterns("*.mozilla.com, PUSH.example"), allow_loopback=True)
    provider = make_provider(policy, resolve=resolver)
    allowed = await provider.send(parse_token(fake_webpush.token(subscription, "push.example")))
    assert allowed.outcome is Outcome.SENT
    for host in ("127.0.0.1", "localhost", "evil.push.example", "push.example.evil"):
        delivery = await provider.send(parse_token(fake_webpush.token(subscription, host)))
        assert (delivery.outcome, delivery.reason, delivery.details) == (
            Outcome.RETRY,
            "endpoint",
            "not_allowed",
        ), host
    assert len(fake_webpush.requests) == 1
    assert resolver.asked == ["push.example"]  # refused hosts are not even resolved


def test_allow_list_globs():
    policy = EndpointPolicy(parse_patterns("*.push.services.mozilla.com fcm.googleapis.com"))
    policy.check_host("updates.push.services.mozilla.com")
    policy.check_host("FCM.googleapis.com.")
    with pytest.raises(Exception, match="not allowed"):
        policy.check_host("push.services.mozilla.com.evil.example")
    with pytest.raises(ValueError):
        parse_patterns("https://fcm.googleapis.com")


# -- the grammar -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "endpoint, p256dh, auth",
    [
        ("http://push.example/x", P256DH, AUTH),
        ("https:///x", P256DH, AUTH),
        ("https://user@push.example/x", P256DH, AUTH),
        ("https://push.example:99999/x", P256DH, AUTH),
        ("push.example/x", P256DH, AUTH),
        ("https://push.example/x", P256DH[:-2], AUTH),
        ("https://push.example/x", b64url(b"\x02" + b"\x01" * 64), AUTH),
        ("https://push.example/x", P256DH, AUTH[:-3]),
        ("https://push.example/x", P256DH, AUTH + "|more"),
        ("https://push.example/x", P256DH + "+", AUTH),
    ],
)
def test_grammar_refuses(endpoint, p256dh, auth):
    with pytest.raises(TokenError, match="web push"):
        parse_token(f"webpush:{endpoint}|{p256dh}|{auth}")


def test_grammar_accepts_padding_and_ports():
    token = parse_token(f"webpush:https://Push.Example:8443/x?y=1|{P256DH}=|{AUTH}==")
    assert token.device == "https://Push.Example:8443/x?y=1"


# -- configuration -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_build_logs_the_public_key_and_serves_webpush(vapid_key_path, fake_webpush, ca_path):
    settings = ProxySettings(
        vapid_key_path=vapid_key_path, webpush_allow_loopback=True, ca_file=ca_path
    )
    built = build(settings)
    assert built is not None
    public = load_key(vapid_key_path).public_key()
    point = public.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    assert f"VAPID pubkey={b64url(point)}" in built.detail
    assert "set --vapid-subject" in built.detail and "LOOPBACK" in built.detail
    await built.provider.aclose()
    provider = build_providers(settings)[Kind.WEBPUSH]  # behind the WebPush limiter
    try:
        token = parse_token(fake_webpush.token(fake_webpush.subscribe()))
        assert (await provider.send(token)).outcome is Outcome.SENT
        assert fake_webpush.requests[0].vapid_key == b64url(point)
    finally:
        await provider.aclose()


def test_not_configured_without_a_key():
    assert build(ProxySettings()) is None


def test_options_from_the_ini(vapid_key_path):
    settings = settings_from_mapping(
        {
            "vapid_key_path": str(vapid_key_path),
            "vapid_subject": "https://relay.example/contact",
            "webpush_allowed_endpoints": "*.push.services.mozilla.com, ntfy.sh",
        },
        env={},
    )
    assert settings.webpush_allowed_endpoints == ("*.push.services.mozilla.com", "ntfy.sh")
    assert settings.webpush_allow_loopback is False
    built = build(settings)
    assert built is not None and "subject" not in built.detail
    for bad in ({"vapid_subject": "ops@relay.example"}, {"webpush_allowed_endpoints": "a:443"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            settings_from_mapping(bad, env={})


def _pem(key, encryption=None) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        encryption or serialization.NoEncryption(),
    )


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "No such file"),
        (b"", "not a PEM private key"),
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "not a PEM"),
        (_pem(rsa.generate_private_key(65537, 2048)), "not a P-256"),
        (_pem(ec.generate_private_key(ec.SECP384R1())), "not a P-256"),
        (
            _pem(
                ec.generate_private_key(ec.SECP256R1()),
                serialization.BestAvailableEncryption(b"pw"),
            ),
            "encrypted",
        ),
    ],
)
def test_broken_key_file_is_one_line_naming_it(content, message, tmp_path):
    path = tmp_path / "vapid.pk8"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ProviderConfigError) as info:
        build(ProxySettings(vapid_key_path=path))
    text = str(info.value)
    assert str(path) in text and message in text and "\n" not in text
