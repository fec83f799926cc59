"""Web Push (RFC 8030/8291/8292) for ``webpush:<endpoint>|<p256dh>|<auth>`` tokens.

One push is a POST of the encrypted four bytes ``ping`` (as upstream; the
client only needs the wake-up) to the subscription's endpoint:

* the body is RFC 8291 ``aes128gcm`` (one record, a fresh ephemeral key and
  salt per message), made by ``http_ece``, the maintained reference
  implementation of RFC 8188's framing, so no framing is written here;
* ``Authorization: vapid t=<ES256 JWT>, k=<public key>`` (:mod:`.vapid`) with
  the key from ``--vapid-key-path``; the public key is logged at start, since
  it is what the client subscribes with;
* ``TTL: 43200`` (12 h, as upstream) and ``Urgency: high`` (a new message
  should wake the device, RFC 8030 §5.3).

Answers: 2xx is SENT; 404 and 410 (the subscription expired or was
unsubscribed, RFC 8030 §7.3) are GONE; everything else (413, 429, 5xx, 3xx,
other 4xx, no answer) is RETRY: upstream's "any 4xx is 410" would let a push
service's auth or quota trouble delete live tokens.

Endpoints are chosen by whoever made the token, so :mod:`.endpoints` decides
where a request may go (https only, the optional allow-list, public addresses
only, checked on the address connected to), redirects are not followed,
answers are not decompressed and at most :data:`MAX_RESPONSE_BYTES` of a body
is read, and the whole exchange has a short deadline.  For the same reason a
429 backs off only the origin that sent it, never the whole provider: one
hostile endpoint answering ``429, Retry-After: 3600`` must not stop Web Push
for every other push service.  A refused endpoint is RETRY, never GONE, so
a wrong allow-list cannot make relays delete tokens.

HTTP/1.1 over aiohttp: its connector takes a resolver, which is what lets the
guard pin the connection to a checked address; push services all speak it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING

import aiohttp
import http_ece
from cryptography.hazmat.primitives.asymmetric import ec
from yarl import URL

from ..options import Option, boolean, path
from ..tokens import Kind, PushToken, base64url_bytes
from .base import Delivery, Outcome, Provider
from .common import (
    MAX_RETRY_AFTER,
    Verify,
    make_ssl_context,
    parse_retry_after,
    refuse_malformed,
    transport_failure,
)
from .endpoints import (
    EndpointPolicy,
    EndpointRefused,
    GuardedResolver,
    Resolve,
    parse_patterns,
    system_resolve,
)
from .spec import Built, ProviderSpec
from .vapid import DEFAULT_SUBJECT, Vapid, check_subject, load_key

if TYPE_CHECKING:
    from ..settings import ProxySettings

log = logging.getLogger(__name__)

PAYLOAD = b"ping"
TTL_SECONDS = 43200
#: Total deadline of one push (connect, TLS, request, answer) and of the connect alone.
DEFAULT_TIMEOUT = 15.0
CONNECT_TIMEOUT = 5.0
#: More of an answer body than this is never read; the connection is then dropped.
MAX_RESPONSE_BYTES = 16 * 1024
#: Back-off for a 429 without a usable Retry-After.
DEFAULT_RETRY_AFTER = 5.0
#: Origins with a pending back-off that are remembered (a bound on memory).
MAX_BACKOFF_ORIGINS = 10_000


def encrypt(payload: bytes, p256dh: bytes, auth: bytes) -> bytes:
    """``payload`` as an RFC 8291 ``aes128gcm`` body for the subscription's keys.

    Raises ValueError if ``p256dh`` is not a point on P-256.
    """
    receiver = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), p256dh)
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    return http_ece.encrypt(
        payload, private_key=ephemeral, dh=receiver, auth_secret=auth, version="aes128gcm"
    )


def map_status(status: int, oversized: bool = False) -> Delivery:
    """The verdict for a push service's answer ``status`` (429 back-off is handled apart)."""
    details = "oversized" if oversized else ""
    if 200 <= status < 300:
        return Delivery(Outcome.SENT, details=details)
    if status in (404, 410):
        return Delivery(Outcome.GONE, str(status), details)
    return Delivery(Outcome.RETRY, str(status), details)


def _key_bytes(text: str) -> bytes:
    """A subscription key's bytes (the grammar checked it; b"" fails encryption cleanly)."""
    return base64url_bytes(text) or b""


class OriginBackoff:
    """Back-off per push service origin, from its 429 answers; bounded, injectable clock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._until: dict[str, float] = {}

    def holds(self, origin: str) -> bool:
        until = self._until.get(origin)
        if until is None:
            return False
        if until <= self._clock():
            del self._until[origin]
            return False
        return True

    def back_off(self, origin: str, seconds: float) -> None:
        now = self._clock()
        if len(self._until) >= MAX_BACKOFF_ORIGINS:
            self._until = {o: t for o, t in self._until.items() if t > now}
            if len(self._until) >= MAX_BACKOFF_ORIGINS:
                return  # under a flood of 429s, remember none rather than grow
        self._until[origin] = max(self._until.get(origin, now), now + seconds)


class WebPushProvider(Provider):
    name = "WebPush"

    def __init__(
        self,
        vapid: Vapid,
        *,
        policy: EndpointPolicy | None = None,
        verify: Verify = True,
        timeout: float = DEFAULT_TIMEOUT,
        resolve: Resolve = system_resolve,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.vapid = vapid
        self.policy = policy or EndpointPolicy()
        self.timeout = timeout
        self.backoff = OriginBackoff(clock)
        self._verify = verify
        self._resolve = resolve
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        """The pooled session, made on first use (aiohttp needs the running loop)."""
        if self._session is None:
            connector = aiohttp.TCPConnector(
                resolver=GuardedResolver(self.policy, self._resolve),
                ssl=make_ssl_context(self._verify),
                limit=100,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self.timeout, connect=CONNECT_TIMEOUT),
                auto_decompress=False,
                trust_env=False,
            )
        return self._session

    async def send(self, token: PushToken) -> Delivery:
        refused = refuse_malformed(token, self.name)
        if refused is not None:
            return refused
        endpoint = token.device
        host = urllib.parse.urlsplit(endpoint).hostname or ""
        origin = URL(endpoint, encoded=True).origin()
        try:
            self.policy.check_host(host)
            self.policy.check_literal(host)
            body = encrypt(PAYLOAD, _key_bytes(token.p256dh), _key_bytes(token.auth))
        except EndpointRefused as exc:
            return self._refused(token, exc)
        except ValueError:
            log.warning("%s token %s has a p256dh that is no P-256 point", self.name, token.digest)
            return Delivery(Outcome.RETRY, "invalid_token")
        if self.backoff.holds(str(origin)):
            return Delivery(Outcome.RETRY, "backoff")
        headers = {
            "TTL": str(TTL_SECONDS),
            "Urgency": "high",
            "Content-Encoding": "aes128gcm",
            "Content-Type": "application/octet-stream",
            "Authorization": self.vapid.header(endpoint),
        }
        try:
            async with asyncio.timeout(self.timeout):
                status, retry_after, oversized = await self._post(endpoint, headers, body)
        except EndpointRefused as exc:
            return self._refused(token, exc)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.warning(
                "%s send to %s for %s failed: %s", self.name, host, token.digest, type(exc).__name__
            )
            return transport_failure(exc)
        if status == 429:
            seconds = min(parse_retry_after(retry_after, DEFAULT_RETRY_AFTER), MAX_RETRY_AFTER)
            self.backoff.back_off(str(origin), seconds)
        delivery = map_status(status, oversized)
        if delivery.outcome is not Outcome.SENT or oversized:
            log.info("%s: %s answered %s for %s", self.name, host, status, token.digest)
        return delivery

    async def _post(
        self, endpoint: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, str | None, bool]:
        """POST; the status, ``Retry-After`` and whether the body was over the cap."""
        async with self._client().post(
            URL(endpoint, encoded=True), data=body, headers=headers, allow_redirects=False
        ) as response:
            received = 0
            while received <= MAX_RESPONSE_BYTES:
                chunk = await response.content.readany()
                if not chunk:
                    break
                received += len(chunk)
            oversized = received > MAX_RESPONSE_BYTES
            if oversized:
                response.close()  # drop the connection instead of reading on
            return response.status, response.headers.get("Retry-After"), oversized

    def _refused(self, token: PushToken, exc: EndpointRefused) -> Delivery:
        log.warning("%s: not sending for %s: %s", self.name, token.digest, exc)
        return Delivery(Outcome.RETRY, "endpoint", exc.reason)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


# -- registration ------------------------------------------------------------------


OPTIONS = (
    Option(
        "vapid_key_path",
        path,
        help="VAPID private key (PKCS#8 PEM, P-256) for Web Push; its public key is logged "
        "at start",
        metavar="PATH",
    ),
    Option(
        "vapid_subject",
        check_subject,
        DEFAULT_SUBJECT,
        "contact for push services in the VAPID JWT (mailto: or https:// URI)",
        metavar="URI",
    ),
    Option(
        "webpush_allowed_endpoints",
        parse_patterns,
        help="only send to endpoint hosts matching these glob patterns, comma-separated "
        "(e.g. *.push.services.mozilla.com,ntfy.sh); default: any public host",
        metavar="PATTERNS",
    ),
    Option(
        "webpush_allow_loopback",
        boolean,
        False,
        help="for tests and local development only: allow Web Push endpoints on loopback "
        "addresses (private addresses stay refused)",
    ),
)


def build(settings: ProxySettings) -> Built | None:
    if not settings.vapid_key_path:
        return None
    vapid = Vapid(load_key(settings.vapid_key_path), settings.vapid_subject)
    policy = EndpointPolicy(
        tuple(settings.webpush_allowed_endpoints or ()), bool(settings.webpush_allow_loopback)
    )
    provider = WebPushProvider(vapid, policy=policy, verify=settings.tls_verify)
    detail = f"key {settings.vapid_key_path}, VAPID pubkey={vapid.public_key}"
    if vapid.subject == DEFAULT_SUBJECT:
        detail += f"; subject {DEFAULT_SUBJECT}: set --vapid-subject to a real contact"
    if policy.allowed_hosts:
        detail += f"; endpoints {','.join(policy.allowed_hosts)}"
    if policy.allow_loopback:
        detail += "; LOOPBACK ENDPOINTS ALLOWED (tests only)"
    return Built(provider, detail, logging.WARNING if policy.allow_loopback else logging.INFO)


PROVIDER = ProviderSpec(
    name="WebPush",
    description="Web Push (RFC 8030) with VAPID; endpoints are checked before any request",
    kinds=(Kind.WEBPUSH,),
    options=OPTIONS,
    build=build,
    disabled="no --vapid-key-path",
    label="WebPush",
    success=("webpush_notifications", "Number of web push notifications"),
    not_configured="no_vapid_key",
)
