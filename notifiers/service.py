"""The push proxy's core, independent of the transport (HTTP app or embedded).

:class:`NotifyService` turns one ``/notify`` body into one :class:`NotifyResult`
whose :class:`~chatmail_common.outcome.Outcome` is the contract the relays rely
on: SENT done (sent or debounced), GONE the token is dead and the relay deletes
it, RETRY keep the token and maybe retry.  Only a provider's verdict that a
token is permanently dead (or an ``openpgp:`` token for one of our keys that
does not open, or for nobody's key when no upstream is configured) may be
GONE; configuration gaps, malformed tokens and throttling never are, because
GONE makes the relay delete a token that may be fine.  HTTP statuses exist only
in :mod:`notifiers.app`; the embedded proxy hands the result over as it is.

Order of steps for ``/notify``: decrypt ``openpgp:`` → parse the grammar →
debounce on the plaintext → dispatch to the provider for the token's kind.
A token no local key opens (every token, with ``forward_all``) goes to the
upstream proxy instead, if one is configured (:mod:`notifiers.forwarding`):
debounced on its ciphertext, then posted unchanged, the upstream's verdict
passed back.
Parsing, which also checks the characters each kind allows, comes before
debouncing (upstream debounces first) so a malformed token of any kind is
always answered 400, before any provider could call it dead, and never
occupies the debouncer.  Debounced trailing
sends are made by a background task through the same dispatch path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from .debounce import Debouncer
from .forwarding import Upstream
from .heartbeat import HEARTBEAT_KINDS
from .heartbeat_loop import Heartbeats
from .heartbeat_store import HeartbeatStoreError
from .metrics import ProxyMetrics
from .openpgp import NO_KEYRING, DecryptionError, UnknownRecipient
from .providers.base import Delivery, Outcome, Provider
from .providers.registry import LABEL, NOT_CONFIGURED
from .tokens import Kind, PushToken, TokenError, parse_token, token_digest

log = logging.getLogger(__name__)

OPENPGP_PREFIX = "openpgp:"

#: The ``provider`` label of forwarded notifications' latency.
FORWARD_LABEL = "upstream"

#: How often a failed trailing (debounced) send is tried again by the proxy itself.
TRAILING_RETRIES = 3

#: ``async decrypt(token) -> plaintext`` for ``openpgp:`` tokens (it gets the whole
#: token, prefix included; :class:`~notifiers.openpgp.OpenPgpDecryptor`).  It raises
#: :class:`~notifiers.openpgp.UnknownRecipient` when none of its keys is the
#: recipient (forwarded, if an upstream is configured) and
#: :class:`~notifiers.openpgp.DecryptionError` when the token cannot be opened (GONE).
Decryptor = Callable[[str], Awaitable[str]]

__all__ = ["DecryptionError", "Decryptor", "NotifyResult", "NotifyService"]


class _DecryptorFailed(Exception):
    """The decryptor raised something unexpected (a bug): RETRY, never GONE."""


@dataclass(frozen=True, slots=True)
class NotifyResult:
    """The verdict on one request and a short plain-text ``message`` (never the token).

    ``malformed``: the request itself is invalid (a token outside the grammar,
    bad JSON); its outcome is RETRY, because a relay bug must never delete a token.
    """

    outcome: Outcome
    message: str
    malformed: bool = False


def _sent(message: str) -> NotifyResult:
    return NotifyResult(Outcome.SENT, message)


def _retry(message: str) -> NotifyResult:
    return NotifyResult(Outcome.RETRY, message)


def _malformed(message: str) -> NotifyResult:
    return NotifyResult(Outcome.RETRY, message, malformed=True)


class NotifyService:
    """Decrypt, parse, debounce and dispatch notifications; count and log outcomes.

    ``providers`` maps each token kind to the provider that serves it (usually
    a :class:`~notifiers.ratelimit.RateLimitedProvider`); kinds not in the map
    are answered 500 with the failure reason their push service declares
    (upstream's ``no_certificate``, ``no_api_key``, ``not_configured``,
    ``no_vapid_key``).  All methods must run on one event loop.
    """

    def __init__(
        self,
        providers: Mapping[Kind, Provider],
        *,
        metrics: ProxyMetrics | None = None,
        debouncer: Debouncer | None = None,
        decryptor: Decryptor | None = None,
        upstream: Upstream | None = None,
        forward_all: bool = False,
        clock: Callable[[], float] = time.monotonic,
        heartbeats: Heartbeats | None = None,
    ) -> None:
        if forward_all and upstream is None:
            raise ValueError("forward_all needs an upstream")
        self.providers = dict(providers)
        #: the heartbeat schedule ``/register`` writes to; None: heartbeats off
        self.heartbeats = heartbeats
        self.metrics = metrics if metrics is not None else ProxyMetrics()
        self.debouncer = debouncer if debouncer is not None else Debouncer()
        self.decryptor = decryptor
        self.upstream = upstream
        self.forward_all = forward_all
        self._clock = clock
        self._wakeup: asyncio.Event | None = None
        self._trailing_task: asyncio.Task[None] | None = None
        self._sends: set[asyncio.Task[object]] = set()
        # plaintext token -> failed trailing sends so far (only while retrying)
        self._trailing_attempts: dict[str, int] = {}
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Start the background task that makes the debouncer's trailing sends."""
        self._ensure_started()

    def _ensure_started(self) -> None:
        if self._trailing_task is None and not self._closed:
            self._wakeup = asyncio.Event()
            self._trailing_task = asyncio.get_running_loop().create_task(
                self._trailing_loop(), name="notifiers-trailing-sends"
            )

    async def aclose(self) -> None:
        """Stop the background task, wait for sends in flight, close the providers.

        Trailing sends still scheduled are dropped: the relay already got 200 for
        them, and the next mail to the address wakes the phone again.
        """
        if self._closed:
            return
        self._closed = True
        if self._trailing_task is not None:
            self._trailing_task.cancel()
            await asyncio.gather(self._trailing_task, return_exceptions=True)
            self._trailing_task = None
        if self._sends:
            await asyncio.gather(*self._sends, return_exceptions=True)
        pending = self.debouncer.pending_count
        if pending:
            log.info("shutting down with %d trailing debounced sends not made", pending)
        if self.upstream is not None:
            await self.upstream.aclose()
        closed: set[int] = set()
        for provider in self.providers.values():
            if id(provider) not in closed:
                closed.add(id(provider))
                try:
                    await provider.aclose()
                except Exception:
                    log.exception("closing provider %s failed", provider.name)

    # -- /notify ------------------------------------------------------------------

    async def notify(self, body: str) -> NotifyResult:
        """Handle one ``/notify`` body (the raw token) and say what to answer."""
        self._ensure_started()
        if self.forward_all:
            return await self._debounced(body, self._forward)
        token = body
        if token.startswith(OPENPGP_PREFIX):
            try:
                token = await self.open_openpgp(body)
            except UnknownRecipient as exc:
                if self.upstream is not None:
                    return await self._debounced(body, self._forward)
                if exc.reason == NO_KEYRING:
                    log.error("openpgp token %s: no keyring configured", token_digest(body))
                    return _retry("openpgp tokens not supported: no keyring configured")
                return self._undecryptable(body, exc)
            except DecryptionError as exc:
                return self._undecryptable(body, exc)
            except _DecryptorFailed:
                return _retry("decryption failed")
        try:
            parsed = parse_token(token)
        except TokenError as exc:
            log.info("malformed token %s: %s", token_digest(token), exc)
            return _malformed(f"malformed token: {exc}")
        return await self._debounced(token, lambda _: self.dispatch(parsed))

    async def open_openpgp(self, token: str) -> str:
        """The plaintext of an ``openpgp:`` token: the one decryption call of every endpoint.

        Raises :class:`~notifiers.openpgp.UnknownRecipient` (reason ``no_keyring``
        when no keyring is configured), :class:`~notifiers.openpgp.DecryptionError`,
        or :class:`_DecryptorFailed` (logged) when the decryptor itself fails.
        """
        if self.decryptor is None:
            raise UnknownRecipient("no keyring configured", reason=NO_KEYRING)
        try:
            return (await self.decryptor(token)).strip()
        except DecryptionError:
            raise
        except Exception as exc:
            log.exception("decrypting openpgp token %s failed", token_digest(token))
            raise _DecryptorFailed from exc

    def _undecryptable(self, body: str, exc: DecryptionError) -> NotifyResult:
        """GONE for a token that cannot be opened here (and no upstream can take it)."""
        self.metrics.openpgp_failed(exc.key, exc.reason)
        log.error(
            "cannot decrypt openpgp token %s: %s (%s%s)",
            token_digest(body),
            exc,
            exc.reason,
            f", key {exc.key}" if exc.key else "",
        )
        return NotifyResult(Outcome.GONE, "cannot decrypt token")

    async def _debounced(
        self, key: str, send: Callable[[str], Awaitable[NotifyResult]]
    ) -> NotifyResult:
        """Send now (``await send(key)``) unless ``key``'s debounce window covers this hit."""
        hit_at = self._clock()
        send_now = self.debouncer.hit(key, hit_at)
        if not send_now or self.debouncer.owes_now:
            # A trailing send may have been scheduled, or an owed one evicted by the cap.
            # (Only then: waking the trailing loop on every hit cost a task step per request.)
            self._wake()
        self.metrics.debounced_set_size.set(len(self.debouncer))
        if not send_now:
            self.metrics.debounced_notifications.inc()
            if log.isEnabledFor(logging.DEBUG):
                log.debug("debounced token %s", token_digest(key))
            return _sent("debounced")
        result = await send(key)
        if result.outcome is Outcome.RETRY:
            # Nothing was delivered: the relay retries, and that retry must not be
            # answered "debounced" by the window this failed send opened.
            self.debouncer.forget(key, hit_at)
        return result

    def _forwarded(self, key: str) -> bool:
        """Whether a debouncer key is a token for the upstream (plaintext tokens never
        start with ``openpgp:``: the grammar refuses them)."""
        return self.forward_all or key.startswith(OPENPGP_PREFIX)

    async def _forward(self, token: str) -> NotifyResult:
        """POST ``token`` unchanged to the upstream; its verdict, counted and timed."""
        assert self.upstream is not None
        started = time.perf_counter()
        answer = await self.upstream.forward(token)
        self.metrics.latency(FORWARD_LABEL).observe(time.perf_counter() - started)
        self.metrics.forwarded(answer.status)
        level = logging.DEBUG if answer.outcome is Outcome.SENT else logging.WARNING
        log.log(
            level,
            "forwarded token %s upstream: %s %s (%s)",
            token_digest(token),
            answer.status,
            answer.details,
            answer.outcome.value,
        )
        if answer.outcome is Outcome.SENT:
            return _sent("sent upstream")
        if answer.outcome is Outcome.GONE:
            return NotifyResult(Outcome.GONE, "token is gone (upstream)")
        return _retry(f"upstream failed: {answer.status}")

    async def dispatch(self, token: PushToken) -> NotifyResult:
        """Send ``token`` through its provider; count, time and log the outcome."""
        label = LABEL[token.kind]
        provider = self.providers.get(token.kind)
        if provider is None:
            reason = NOT_CONFIGURED[token.kind]
            self.metrics.failed(label, reason)
            log.warning("no %s provider configured for token %s", token.kind.value, token.digest)
            return _retry(f"no provider configured for {token.kind.value} tokens")
        started = time.perf_counter()
        try:
            delivery = await provider.send(token)
        except Exception as exc:  # providers should not raise; never let it be a 410
            log.exception("%s provider raised for token %s", label, token.digest)
            delivery = Delivery(Outcome.RETRY, "send", type(exc).__name__)
        finally:
            self.metrics.latency(label).observe(time.perf_counter() - started)
        if delivery.outcome is Outcome.SENT:
            self.metrics.sent(label)
            if log.isEnabledFor(logging.DEBUG):  # the digest is a hash: not for a dropped line
                log.debug("sent %s push to token %s", token.kind.value, token.digest)
            return _sent("sent")
        reason = delivery.reason or "send"
        self.metrics.failed(label, reason, delivery.details)
        level = logging.INFO if delivery.outcome is Outcome.GONE else logging.WARNING
        log.log(
            level,
            "%s push to token %s failed: %s %s (%s)",
            token.kind.value,
            token.digest,
            reason,
            delivery.details,
            delivery.outcome.value,
        )
        if delivery.outcome is Outcome.GONE:
            if self.heartbeats is not None:
                self.heartbeats.forget(token)
            return NotifyResult(Outcome.GONE, "token is gone")
        return _retry(f"push failed: {reason}")

    # -- /register ----------------------------------------------------------------

    async def register(self, body: str) -> NotifyResult:
        """Handle ``/register`` (JSON ``{"token": ...}``) from old iOS clients.

        With heartbeats on (``--db``), an APNs token is scheduled for a silent
        push every interval (:mod:`notifiers.heartbeat_loop`) and any other
        kind is refused 400: upstream stored those and dropped them later.
        With heartbeats off, the token is validated and counted and 200 is
        answered, so that old clients do not retry forever; nothing is kept.
        Chatmail core removed heartbeat registration in 2026 (core PR #8452).
        """
        try:
            data = json.loads(body)
        except ValueError:
            return _malformed("invalid JSON")
        token = data.get("token") if isinstance(data, dict) else None
        if not isinstance(token, str):
            return _malformed('expected JSON {"token": "<string>"}')
        if token.startswith(OPENPGP_PREFIX):
            try:
                token = await self.open_openpgp(token)
            except DecryptionError as exc:  # upstream answers 500; a clear 4xx, no metric
                if exc.reason == NO_KEYRING:
                    return _retry("openpgp tokens not supported: no keyring configured")
                log.info("cannot decrypt openpgp token for /register: %s", exc.reason)
                return _malformed(f"cannot decrypt openpgp token: {exc.reason}")
            except _DecryptorFailed:
                return _retry("decryption failed")
        try:
            parsed = parse_token(token)
        except TokenError as exc:
            return _malformed(f"malformed token: {exc}")
        if self.heartbeats is None:
            self.metrics.heartbeat_registrations.inc()
            log.info(
                "heartbeat registration for %s token %s (heartbeats off: no --db)",
                parsed.kind.value,
                parsed.digest,
            )
            return _sent("")
        if parsed.kind not in HEARTBEAT_KINDS:
            return _malformed(f"heartbeats are for APNs tokens only, not {parsed.kind.value}")
        try:
            await self.heartbeats.register(parsed)
        except HeartbeatStoreError as exc:
            log.error("heartbeat registration for %s not stored: %s", parsed.digest, exc)
            return _retry("cannot store the registration")
        return _sent("")

    # -- trailing debounced sends ---------------------------------------------------

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    async def _trailing_loop(self) -> None:
        assert self._wakeup is not None
        wakeup = self._wakeup
        while True:
            wakeup.clear()
            next_due = self.debouncer.next_due()
            if next_due is None:
                await wakeup.wait()
                continue
            delay = next_due - self._clock()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wakeup.wait(), delay)
                continue
            for token in self.debouncer.due(self._clock()):
                task = asyncio.get_running_loop().create_task(self._trailing_send(token))
                self._sends.add(task)
                task.add_done_callback(self._sends.discard)
            self.metrics.debounced_set_size.set(len(self.debouncer))

    async def _trailing_send(self, token: str) -> None:
        digest = token_digest(token)
        try:
            if self._forwarded(token):
                result = await self._forward(token)
            else:
                result = await self.dispatch(parse_token(token))  # parsed before debouncing
        except Exception:
            log.exception("trailing send to token %s failed", digest)
            result = _retry("internal error")
        log.debug("trailing send to token %s: %s", digest, result.outcome.value)
        if result.outcome is not Outcome.RETRY:
            self._trailing_attempts.pop(token, None)
            return
        # The relay was answered 200 for the hits this send covers, so it will not
        # retry: the proxy does, a few times, one window apart.
        attempts = self._trailing_attempts.get(token, 0) + 1
        if attempts > TRAILING_RETRIES:
            self._trailing_attempts.pop(token, None)
            log.error("trailing push to token %s failed %d times; given up", digest, attempts)
            return
        self._trailing_attempts[token] = attempts
        self.debouncer.defer(token, self._clock() + self.debouncer.window * attempts)
        self._wake()
