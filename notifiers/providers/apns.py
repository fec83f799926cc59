"""Apple Push Notification service client (HTTP/2, certificate or token auth).

One :class:`ApnsProvider` talks to one APNs host over one multiplexed HTTP/2
connection.  The proxy builds two, production and ``sandbox=True`` (for
``sandbox:`` tokens), and serves both through one :class:`ApnsEnvironments`,
so that one rate limiter covers both: the single set of ``apns_*`` limits is
what the proxy sends to Apple in total (two limiters would double the
configured concurrency and rate), and a 429 from either host backs off both.

The connection is :class:`notifiers.h2client.H2Client` (``h2`` on asyncio)
rather than httpx: with httpx's HTTP/2 client the proxy was CPU-bound at about
1,100 notifications/s, most of it in httpcore's per-stream locking and
per-frame TLS writes.  Two ways to authenticate, as Apple offers:

* ``.p12`` client certificate (what upstream uses): loaded with ``cryptography``
  (legacy RC2-40/3DES bags included) and put into the TLS context;
* ``.p8`` signing key: an ES256 JWT (``kid``, ``iss``, ``iat``) sent as
  ``authorization: bearer``, reused and renewed after 50 minutes (Apple rejects
  tokens older than an hour and refreshing more than every 20 minutes).

Heartbeats (``/register``) are silent background pushes to the same hosts
(:class:`BackgroundPush`: ``apns-push-type: background``, priority 5,
``{"aps":{"content-available":1}}``), through the same limiter.

Non-hex device tokens never reach this module: the token grammar refuses them
(``/notify`` answers 400), and :meth:`ApnsProvider.send` repeats the check
(RETRY, never GONE) so that no such token is spliced into the request path.

The end of the module registers APNs with the proxy (:data:`PROVIDER`): its
options, and the factory that builds both environments from them.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import ssl
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12

from ..h2client import H2Client, H2Error, H2Response
from ..options import Option, path, secret_file, text
from ..tokens import Kind, PushToken
from .base import Delivery, Outcome, Provider, ProviderConfigError
from .common import (
    Verify,
    label,
    make_ssl_context,
    refuse_malformed,
    retry_later,
    transport_failure,
)
from .spec import Built, ProviderSpec

if TYPE_CHECKING:
    from ..settings import ProxySettings

log = logging.getLogger(__name__)

PRODUCTION_URL = "https://api.push.apple.com"
SANDBOX_URL = "https://api.sandbox.push.apple.com"

#: The exact visible "new messages" payload (reference §4): compact, this key order.
PAYLOAD = json.dumps(
    {
        "aps": {
            "alert": {
                "title": "New messages",
                "body": "You have new messages",
                "title-loc-key": "new_messages",
                "loc-key": "new_messages_body",
            },
            "sound": "default",
            "mutable-content": 1,
        }
    },
    separators=(",", ":"),
).encode()

#: The silent heartbeat payload: wakes the app in the background, shows nothing.
#: (Upstream's library also wrote ``"mutable-content":0``, which Apple ignores
#: without an alert; reference §4 marks it uncertain.)
BACKGROUND_PAYLOAD = b'{"aps":{"content-available":1}}'

#: APNs reasons that mean the token will never work again -> GONE (410 to the relay).
GONE_REASONS = frozenset(
    {"BadDeviceToken", "DeviceTokenNotForTopic", "ExpiredToken", "Unregistered"}
)

#: Renew the provider JWT after this many seconds (Apple: valid 60 min, refresh >= 20 min).
JWT_RENEW_AFTER = 50 * 60

#: Back-off for a 429 without ``Retry-After``.  APNs 429 is usually per device
#: token, so the provider-wide pause stays short.
DEFAULT_RETRY_AFTER = 1.0

#: Where the ``.p12`` password comes from when no ``--password-file`` is given.
PASSWORD_ENV = "NOTIFIERS_CERT_PASSWORD"


@dataclass(frozen=True, slots=True)
class BackgroundPush(PushToken):
    """A token to be woken by a silent background push (a heartbeat) instead of the
    visible "new messages" alert.

    Why a kind of token and not another method: heartbeats go through the same
    :class:`~notifiers.ratelimit.RateLimitedProvider` as the visible pushes, so
    the ``apns_*`` limits stay the proxy's total towards Apple and a 429 backs
    off both; the limiter hands the token through unchanged, and
    :meth:`ApnsProvider.send` picks the request by its class.
    """

    @classmethod
    def of(cls, token: PushToken) -> BackgroundPush:
        return cls(**{f.name: getattr(token, f.name) for f in fields(PushToken)})


class _JwtSigner:
    """Makes the APNs provider token and reuses it until it is due for renewal."""

    def __init__(
        self, key: ec.EllipticCurvePrivateKey, key_id: str, team_id: str, clock: Callable[[], float]
    ) -> None:
        self._key = key
        self._key_id = key_id
        self._team_id = team_id
        self._clock = clock
        self._token = ""
        self._issued_at = 0.0

    def token(self) -> str:
        now = self._clock()
        if not self._token or now - self._issued_at >= JWT_RENEW_AFTER or now < self._issued_at:
            self._token = jwt.encode(
                {"iss": self._team_id, "iat": int(now)},
                self._key,
                algorithm="ES256",
                headers={"kid": self._key_id},
            )
            self._issued_at = now
        return self._token


class ApnsProvider(Provider):
    """APNs client for one host (production or sandbox)."""

    name = "APNS"

    def __init__(
        self,
        *,
        sandbox: bool,
        topic: str | None,
        base_url: str | None,
        timeout: float,
        ssl_context: ssl.SSLContext,
        signer: _JwtSigner | None = None,
    ) -> None:
        """Use :meth:`from_p12` or :meth:`from_p8`; this takes already-loaded credentials."""
        self.sandbox = sandbox
        self.topic = topic
        self.base_url = (base_url or (SANDBOX_URL if sandbox else PRODUCTION_URL)).rstrip("/")
        self.timeout = timeout
        self._signer = signer
        self._alert_headers = self._fixed_headers(background=False)
        self._background_headers = self._fixed_headers(background=True)
        # APNs speaks only HTTP/2: concurrent sends share one connection, a
        # connection draining after GOAWAY is replaced for new sends.
        parts = urlsplit(self.base_url)
        self._path_prefix = parts.path
        self._client = H2Client(f"{parts.scheme}://{parts.netloc}", ssl_context)

    @classmethod
    def from_p12(
        cls,
        p12_path: Path,
        password: bytes | None,
        *,
        topic: str | None,
        sandbox: bool,
        base_url: str | None = None,
        timeout: float = 20.0,
        verify: Verify = True,
    ) -> ApnsProvider:
        """Certificate auth from a PKCS#12 file.

        ``verify`` is the server trust (tests pass their CA); if it is an
        SSLContext, the client certificate is loaded into that context.
        """
        ctx = make_ssl_context(verify)
        key, cert, chain = _load_p12(Path(p12_path), password)
        _load_client_cert(ctx, key, cert, chain)
        return cls(
            sandbox=sandbox, topic=topic, base_url=base_url, timeout=timeout, ssl_context=ctx
        )

    @classmethod
    def from_p8(
        cls,
        key_path: Path,
        *,
        key_id: str,
        team_id: str,
        topic: str | None,
        sandbox: bool,
        base_url: str | None = None,
        timeout: float = 20.0,
        verify: Verify = True,
        clock: Callable[[], float] = time.time,
    ) -> ApnsProvider:
        """Token auth from an APNs ``AuthKey_<kid>.p8`` (PKCS#8 P-256 key).

        ``clock`` (seconds since the epoch) is injectable so tests can age the JWT.
        """
        try:
            key = serialization.load_pem_private_key(Path(key_path).read_bytes(), None)
        except (OSError, ValueError, TypeError) as exc:
            raise ProviderConfigError(f"APNs key {key_path}: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise ProviderConfigError(f"APNs key {key_path}: not an EC P-256 private key")
        signer = _JwtSigner(key, key_id, team_id, clock)
        return cls(
            sandbox=sandbox,
            topic=topic,
            base_url=base_url,
            timeout=timeout,
            ssl_context=make_ssl_context(verify),
            signer=signer,
        )

    def _fixed_headers(self, background: bool) -> list[tuple[str, str]]:
        """The headers every request of one kind carries (built once: they never change)."""
        if background:  # Apple: background pushes must be priority 5, no collapse id needed
            headers = [
                ("apns-push-type", "background"),
                ("apns-priority", "5"),
                ("content-type", "application/json"),
            ]
        else:
            headers = [
                ("apns-push-type", "alert"),
                ("apns-priority", "10"),
                ("apns-collapse-id", "new_messages"),
                ("content-type", "application/json"),
            ]
        if self.topic:
            # stripped as h2's (now disabled) outbound normalisation did
            headers.append(("apns-topic", self.topic.strip()))
        return headers

    def _headers(self, background: bool) -> list[tuple[str, str]]:
        headers = self._background_headers if background else self._alert_headers
        if self._signer is not None:
            return [*headers, ("authorization", f"bearer {self._signer.token()}")]
        return headers

    async def send(self, token: PushToken) -> Delivery:
        """The visible push, or the silent one for a :class:`BackgroundPush`."""
        refused = refuse_malformed(token, self.name)
        if refused is not None:
            return refused
        request_path = f"{self._path_prefix}/3/device/{token.device}"
        background = isinstance(token, BackgroundPush)
        payload = BACKGROUND_PAYLOAD if background else PAYLOAD
        try:
            response = await self._client.request(
                "POST", request_path, self._headers(background), payload, timeout=self.timeout
            )
        except (H2Error, OSError, TimeoutError) as exc:
            log.warning("APNs send for %s failed: %s", token.digest, type(exc).__name__)
            return transport_failure(exc)
        delivery = _map_response(response)
        if delivery.outcome is not Outcome.SENT:
            log.info("APNs answered %s %s for %s", response.status, delivery.details, token.digest)
        return delivery

    async def send_background(self, token: PushToken) -> Delivery:
        """A silent background push (heartbeat) to ``token``, without the rate limiter."""
        return await self.send(BackgroundPush.of(token))

    async def aclose(self) -> None:
        await self._client.aclose()


class ApnsEnvironments(Provider):
    """Production and sandbox as one provider, so that one limiter covers both
    (see the module docstring); ``sandbox:`` tokens go to the sandbox host."""

    name = "APNS"

    def __init__(self, production: ApnsProvider, sandbox: ApnsProvider) -> None:
        self.production = production
        self.sandbox = sandbox

    async def send(self, token: PushToken) -> Delivery:
        host = self.sandbox if token.kind is Kind.APNS_SANDBOX else self.production
        return await host.send(token)

    async def aclose(self) -> None:
        await self.production.aclose()
        await self.sandbox.aclose()


def _map_response(response: H2Response) -> Delivery:
    """Map an APNs answer: only permanent token errors become GONE."""
    status = response.status
    if status == 200:
        return Delivery.sent()
    reason = ""
    try:
        body = json.loads(response.body)
        if isinstance(body, dict):
            reason = label(body.get("reason", ""))
    except ValueError:
        pass
    if status == 410 or reason in GONE_REASONS:
        return Delivery(Outcome.GONE, str(status), reason or "Unregistered")
    return retry_later(status, reason, response.header("retry-after"), DEFAULT_RETRY_AFTER)


def _load_p12(
    path: Path, password: bytes | None
) -> tuple[pkcs12.PKCS12PrivateKeyTypes, x509.Certificate, list[x509.Certificate]]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ProviderConfigError(f"APNs certificate {path}: {exc.strerror or exc}") from exc
    try:
        key, cert, chain = pkcs12.load_key_and_certificates(data, password or None)
    except (ValueError, TypeError) as exc:
        # Wrong password and corrupt file look the same ("mac verify failure").
        raise ProviderConfigError(f"APNs certificate {path}: cannot decrypt/parse: {exc}") from exc
    if key is None or cert is None:
        raise ProviderConfigError(f"APNs certificate {path}: needs a private key and a certificate")
    log.info(
        "APNs certificate %s valid until %s",
        cert.subject.rfc4514_string(),
        cert.not_valid_after_utc,
    )
    return key, cert, list(chain)


def _load_client_cert(
    ctx: ssl.SSLContext,
    key: pkcs12.PKCS12PrivateKeyTypes,
    cert: x509.Certificate,
    chain: list[x509.Certificate],
) -> None:
    """Put the client certificate into ``ctx``.

    :mod:`ssl` loads keys only from files.  The key is written re-encrypted
    with a random one-time password into a private temporary directory that is
    removed at once, so the plaintext key never touches the disk.
    """
    one_time = secrets.token_bytes(32)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    pem += b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
    pem += key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(one_time),
    )
    with tempfile.TemporaryDirectory(prefix="apns-") as tmp:
        path = os.path.join(tmp, "client.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        try:
            ctx.load_cert_chain(path, password=one_time)
        except ssl.SSLError as exc:
            raise ProviderConfigError(f"APNs certificate unusable for TLS: {exc}") from exc


# -- registration ------------------------------------------------------------------

OPTIONS = (
    Option("certificate_file", path, help="APNs client certificate (.p12)", metavar="PATH"),
    Option(
        "password",
        secret_file,
        help="the APNs certificate password",
        secret=True,
        env=PASSWORD_ENV,
        dest="certificate_password",
    ),
    Option("topic", text, help="apns-topic header (the iOS bundle id)", metavar="BUNDLE_ID"),
    Option(
        "apns_key_file",
        path,
        help="APNs token-auth signing key (.p8), instead of a .p12",
        metavar="PATH",
    ),
    Option("apns_key_id", text, help="key id of --apns-key-file", metavar="ID"),
    Option("apns_team_id", text, help="Apple team id for --apns-key-file", metavar="TEAM"),
    Option("apns_url", text, help="APNs production base URL (tests)", metavar="URL"),
    Option("apns_sandbox_url", text, help="APNs sandbox base URL (tests)", metavar="URL"),
)


def build(settings: ProxySettings) -> Built | None:
    """Both environments from a ``.p12`` or a ``.p8``; None when neither is given."""
    certificate, key = settings.certificate_file, settings.apns_key_file
    if certificate and key:
        raise ProviderConfigError(
            "APNs: give either --certificate-file or --apns-key-file, not both"
        )
    if not certificate and not key:
        return None
    if key and not (settings.apns_key_id and settings.apns_team_id):
        raise ProviderConfigError("APNs: --apns-key-file needs --apns-key-id and --apns-team-id")

    def environment(sandbox: bool, base_url: str | None) -> ApnsProvider:
        shared = {
            "topic": settings.topic,
            "sandbox": sandbox,
            "base_url": base_url,
            "verify": settings.tls_verify,
        }
        if certificate:
            return ApnsProvider.from_p12(certificate, settings.certificate_password, **shared)
        return ApnsProvider.from_p8(
            key, key_id=settings.apns_key_id, team_id=settings.apns_team_id, **shared
        )

    both = ApnsEnvironments(
        environment(False, settings.apns_url), environment(True, settings.apns_sandbox_url)
    )
    how = f"certificate {certificate}" if certificate else f"key {key}"
    return Built(both, f"production and sandbox, {how}")


PROVIDER = ProviderSpec(
    name="APNS",
    description="Apple Push Notification service, with a .p12 certificate or a .p8 key",
    kinds=(Kind.APNS, Kind.APNS_SANDBOX),
    options=OPTIONS,
    build=build,
    disabled="no --certificate-file or --apns-key-file",
    label="APNS",
    success=("direct_notifications", "Number of direct APNS notifications"),
    not_configured="no_certificate",
)
