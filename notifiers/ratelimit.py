"""Per-provider rate limiting: a :class:`Provider` wrapped around a Provider.

Why: push services throttle senders (APNs and FCM answer 429 with
``Retry-After``).  Upstream had no limit at all and, for FCM, even turned a 429
into 410 so relays deleted live tokens.  Here a 429 backs off the *whole
provider* until the given time; requests arriving meanwhile wait (bounded by
``max_wait``), then go out, or give up with ``Delivery(RETRY, "backoff")`` so the
relay retries later.  Tokens are never failed as dead because of throttling.

Three limits, applied in this order: back-off, requests per second (a token
bucket holding one second's worth of burst), concurrency (a semaphore).  Clock
and sleep are injectable so tests run without real time.

Each push service has one limiter, configured by its ``<label>_concurrency``,
``<label>_rps`` and ``<label>_max_wait`` options (:func:`limit_options`), and
one limiter serves every token kind of the service: APNs production and
sandbox share theirs, so the ``apns_*`` limits are the proxy's total towards
Apple and a 429 from either environment holds back both.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .options import Option, integer, number
from .providers.base import Delivery, Outcome, Provider
from .tokens import PushToken

log = logging.getLogger(__name__)

#: A server-supplied ``Retry-After`` is capped at this many seconds.
MAX_BACKOFF = 3600.0


@dataclass(slots=True)
class LimitSettings:
    """One push service's limits; ``rps`` 0 = unlimited."""

    concurrency: int = 50
    rps: float = 0.0
    max_wait: float = 10.0

    @classmethod
    def of(cls, settings: Any, label: str) -> LimitSettings:
        """The limits ``settings`` holds for the service ``label`` (see :func:`limit_options`)."""
        prefix = label.lower()
        return cls(
            getattr(settings, f"{prefix}_concurrency"),
            getattr(settings, f"{prefix}_rps"),
            getattr(settings, f"{prefix}_max_wait"),
        )


def limit_options(label: str) -> tuple[Option, ...]:
    """The options of one service's limits: ``--apns-concurrency`` / ``apns_concurrency`` etc."""
    prefix, default = label.lower(), LimitSettings()
    return (
        Option(
            f"{prefix}_concurrency",
            integer(1),
            default.concurrency,
            f"parallel {label} requests",
            metavar="N",
        ),
        Option(
            f"{prefix}_rps",
            number(0),
            default.rps,
            f"{label} requests per second, 0 for unlimited",
            metavar="R",
        ),
        Option(
            f"{prefix}_max_wait",
            number(0),
            default.max_wait,
            f"longest wait for {label} back-off/rate limit before answering 500",
            metavar="S",
        ),
    )


class RateLimitedProvider(Provider):
    """Limits concurrency and rate of ``inner`` and honours its ``retry_after``.

    ``rps`` of None or 0 means no rate limit.  ``max_wait`` bounds how long one
    send may wait for a back-off or for the token bucket before it gives up with
    a RETRY (reasons ``backoff`` and ``ratelimit``).  The wait for a free
    concurrency slot is bounded by the inner provider's own request timeout.
    """

    def __init__(
        self,
        inner: Provider,
        *,
        concurrency: int = 50,
        rps: float | None = None,
        max_wait: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if rps is not None and rps < 0:
            raise ValueError("rps must not be negative")
        self.inner = inner
        self.name = inner.name
        self.concurrency = concurrency
        self.rps = rps or None
        self.max_wait = max_wait
        self._clock = clock
        self._sleep = sleep
        self._sem = asyncio.Semaphore(concurrency)
        self._burst = max(1.0, rps or 0.0)
        self._tokens = self._burst
        self._refilled = clock()
        self.backoff_until = -float("inf")

    @classmethod
    def limiting(cls, inner: Provider, limits: LimitSettings) -> RateLimitedProvider:
        """``inner`` behind the configured ``limits``."""
        return cls(
            inner, concurrency=limits.concurrency, rps=limits.rps or None, max_wait=limits.max_wait
        )

    @property
    def in_flight(self) -> int:
        return self.concurrency - self._sem._value  # noqa: SLF001 - introspection for metrics/tests

    def back_off(self, seconds: float) -> None:
        """Hold every send of this provider for ``seconds`` (capped at :data:`MAX_BACKOFF`)."""
        seconds = min(max(seconds, 0.0), MAX_BACKOFF)
        until = self._clock() + seconds
        if until > self.backoff_until:
            self.backoff_until = until
            log.warning(
                "%s: backing off for %.1f s (provider asked us to slow down)", self.name, seconds
            )

    async def send(self, token: PushToken) -> Delivery:
        # The checks are made inline before awaiting their coroutines: no back-off and
        # no rate limit is the usual case, and three coroutines per push add up.
        now = self._clock()
        deadline = now + self.max_wait
        if now < self.backoff_until and not await self._wait_backoff(deadline):
            return Delivery(Outcome.RETRY, "backoff")
        if self.rps is not None and not await self._take_rate_token(deadline):
            return Delivery(Outcome.RETRY, "ratelimit")
        async with self._sem:
            # A 429 may have arrived while we queued for a slot.
            if self._clock() < self.backoff_until and not await self._wait_backoff(deadline):
                return Delivery(Outcome.RETRY, "backoff")
            delivery = await self.inner.send(token)
        if delivery.retry_after is not None:
            self.back_off(delivery.retry_after)
        return delivery

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def _wait_backoff(self, deadline: float) -> bool:
        """Sleep through the back-off; False if it lasts past ``deadline``."""
        while True:
            now = self._clock()
            if now >= self.backoff_until:
                return True
            if self.backoff_until > deadline:
                return False
            await self._sleep(self.backoff_until - now)

    async def _take_rate_token(self, deadline: float) -> bool:
        """Reserve one request slot of the token bucket, sleeping until it is ours.

        The bucket may go negative: a reservation is a place in the queue, so
        concurrent waiters are served in arrival order without a lock.
        """
        if self.rps is None:
            return True
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._refilled) * self.rps)
        self._refilled = now
        wait = (1.0 - self._tokens) / self.rps if self._tokens < 1.0 else 0.0
        if now + wait > deadline:
            return False
        self._tokens -= 1.0
        if wait > 0:
            await self._sleep(wait)
        return True
