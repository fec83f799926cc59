"""A fake Web Push service (RFC 8030) over real HTTPS/1.1 on 127.0.0.1, in a thread.

It checks what a real push service and the subscriber together would: the
VAPID ``Authorization`` header (ES256 signature with the key in ``k``, ``aud``
= the origin the request was sent to, ``exp`` at most 24 h ahead, a ``sub``),
and it decrypts the ``aes128gcm`` body with the subscriber's private key and
auth secret, as the browser or UnifiedPush distributor would.  A request that
fails either check is answered 400 (body) or 401 (VAPID) and recorded with
the error, so a test sees why.

Subscriptions live under ``/push/<id>``; an unknown path is 404.  Replies are
scripted (``script(WebPushReply(...))``), else ``default`` (201) answers.
``WebPushReply(stream=n)`` answers a body of ``n`` bytes in chunks, for the
client's response-size cap.  The TLS certificate covers 127.0.0.1, localhost
and any ``names`` given, so a test can point a name it resolves itself at it;
``server_names`` records the SNI of each TLS connection.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import os
import ssl
import threading
import time
from dataclasses import dataclass, field

import http_ece
import jwt
import trustme
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .keys import SERVER_NAMES

MAX_JWT_LIFETIME = 24 * 3600


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass
class Subscription:
    """A subscriber's keys (RFC 8291) and the path of its push resource."""

    id: str
    private_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    auth: bytes = field(default_factory=lambda: os.urandom(16))

    @property
    def path(self) -> str:
        return f"/push/{self.id}"

    @property
    def p256dh(self) -> str:
        point = self.private_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        return b64url(point)


@dataclass
class WebPushReply:
    status: int = 201
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    stream: int = 0  # answer this many body bytes in chunks instead of ``body``
    delay: float = 0.0


@dataclass
class PushRequest:
    """One request as the fake saw it, with the outcome of its checks."""

    path: str
    headers: dict[str, str]  # names lower-case
    body: bytes
    server_name: str | None  # the TLS SNI of its connection
    plaintext: bytes | None = None
    claims: dict | None = None
    vapid_key: str = ""
    error: str = ""


class FakeWebPush:
    def __init__(self, ca: trustme.CA, *, names: tuple[str, ...] = ()) -> None:
        self._ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(*SERVER_NAMES, *names).configure_cert(self._ssl)
        self._ssl.sni_callback = self._note_sni
        self._sni: dict[int, str | None] = {}
        self.server_names: list[str | None] = []
        self.subscriptions: dict[str, Subscription] = {}
        self.requests: list[PushRequest] = []
        self.default = WebPushReply()
        self._replies: collections.deque[WebPushReply] = collections.deque()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.port = 0

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> FakeWebPush:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(timeout=10)
        return self

    async def _listen(self) -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._ssl)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> FakeWebPush:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- subscriptions and scripting -------------------------------------------

    def subscribe(self, id: str = "s1") -> Subscription:
        subscription = self.subscriptions[id] = Subscription(id)
        return subscription

    def endpoint(self, subscription: Subscription, host: str = "127.0.0.1") -> str:
        return f"https://{host}:{self.port}{subscription.path}"

    def token(self, subscription: Subscription, host: str = "127.0.0.1") -> str:
        """The ``webpush:`` token a client with ``subscription`` would send."""
        return (
            f"webpush:{self.endpoint(subscription, host)}"
            f"|{subscription.p256dh}|{b64url(subscription.auth)}"
        )

    def script(self, *replies: WebPushReply) -> None:
        with self._lock:
            self._replies.extend(replies)

    # -- serving ---------------------------------------------------------------

    def _note_sni(self, ssl_object: ssl.SSLObject, name: str | None, _ctx: object) -> None:
        self._sni[id(ssl_object)] = name
        with self._lock:
            self.server_names.append(name)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        seen = PushRequest(
            path=request.path,
            headers={k.lower(): v for k, v in request.headers.items()},
            body=await request.read(),
            server_name=self._sni.get(id(ssl_object)),
        )
        with self._lock:
            self.requests.append(seen)
        subscription = self.subscriptions.get(request.path.removeprefix("/push/"))
        if subscription is None:
            seen.error = "no such subscription"
            return web.Response(status=404)
        try:
            seen.claims, seen.vapid_key = _verify_vapid(seen.headers)
        except (ValueError, jwt.PyJWTError) as exc:
            seen.error = f"vapid: {exc}"
            return web.Response(status=401)
        try:
            seen.plaintext = _decrypt(seen, subscription)
        except Exception as exc:  # http_ece raises several kinds
            seen.error = f"decrypt: {exc!r}"
            return web.Response(status=400)
        with self._lock:
            reply = self._replies.popleft() if self._replies else self.default
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if not reply.stream:
            return web.Response(status=reply.status, headers=reply.headers, body=reply.body)
        response = web.StreamResponse(status=reply.status, headers=reply.headers)
        await response.prepare(request)
        chunk = b"x" * 65536
        try:
            for offset in range(0, reply.stream, len(chunk)):
                # Yield every chunk: writes to a dead peer do not block, and only a turn of
                # the loop delivers connection_lost (which clears request.transport).
                await asyncio.sleep(0)
                if request.transport is None or request.transport.is_closing():
                    break
                await response.write(chunk[: reply.stream - offset])
        except (ConnectionError, RuntimeError):
            pass  # the client stopped reading, as it should
        return response


def _verify_vapid(headers: dict[str, str]) -> tuple[dict, str]:
    """The verified claims and ``k`` of ``Authorization: vapid t=..., k=...`` (RFC 8292 §3)."""
    scheme, _, params = headers.get("authorization", "").partition(" ")
    if scheme != "vapid":
        raise ValueError(f"authorization scheme {scheme!r}")
    values = dict(p.strip().split("=", 1) for p in params.split(",") if "=" in p)
    token, key_text = values.get("t", ""), values.get("k", "")
    raw = base64.urlsafe_b64decode(key_text + "=" * (-len(key_text) % 4))
    public_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)
    audience = "https://" + headers["host"].removesuffix(":443")
    claims = jwt.decode(
        token,
        public_key,
        algorithms=["ES256"],
        audience=audience,
        options={"require": ["aud", "exp", "sub"]},
    )
    if claims["exp"] - time.time() > MAX_JWT_LIFETIME:
        raise ValueError("exp more than 24 hours ahead")
    if jwt.get_unverified_header(token).get("typ") != "JWT":
        raise ValueError("JWT header without typ JWT")
    return claims, key_text


def _decrypt(seen: PushRequest, subscription: Subscription) -> bytes:
    if seen.headers.get("content-encoding") != "aes128gcm":
        raise ValueError(f"content-encoding {seen.headers.get('content-encoding')!r}")
    return http_ece.decrypt(
        seen.body,
        private_key=subscription.private_key,
        auth_secret=subscription.auth,
        version="aes128gcm",
    )
