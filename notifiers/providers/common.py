"""Small helpers shared by the HTTP provider clients (APNs, FCM, UBports).

They exist so that every provider treats ``Retry-After``, token characters,
timeouts and dead pooled connections the same way.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import httpx

from chatmail_common.tls import Verify, make_ssl_context

from .base import Delivery, Outcome

__all__ = ["Verify", "make_ssl_context"]  # re-exported for the provider modules

log = logging.getLogger(__name__)

#: Upper bound for a server-supplied ``Retry-After`` so a bogus header cannot
#: park a provider for days.
MAX_RETRY_AFTER = 3600.0

# FCM and UBports tokens are spliced into JSON; upstream accepts exactly these
# characters, which also rules out injection.
_SAFE_TOKEN = re.compile(r"[A-Za-z0-9_:\-]+")

# A short symbolic provider error code that is safe to use as a metric label.
_LABEL = re.compile(r"[A-Za-z0-9_\-]{1,64}")

# Errors that mean "the pooled connection was already dead" (GOAWAY, peer
# closed it while idle): the request can be repeated once on a fresh one.
_STALE_CONNECTION_ERRORS = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


def is_safe_token(token: str) -> bool:
    """True if ``token`` uses only ASCII letters, digits, ``_``, ``:`` and ``-``."""
    return bool(token.isascii() and _SAFE_TOKEN.fullmatch(token))


def label(value: object) -> str:
    """``value`` if it is a short code fit for a metric label, else ``other`` (or "")."""
    if not value:
        return ""
    text = str(value)
    return text if _LABEL.fullmatch(text) else "other"


def parse_retry_after(
    value: str | None, default: float, now: Callable[[], float] = time.time
) -> float:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date)."""
    if not value:
        return default
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return default
        if when is None:
            return default
        seconds = when.timestamp() - now()
    if seconds != seconds:  # NaN
        return default
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def transport_failure(exc: BaseException) -> Delivery:
    """The Delivery for a request that got no HTTP answer (reason ``send``)."""
    details = "timeout" if isinstance(exc, TimeoutError | httpx.TimeoutException) else ""
    return Delivery(Outcome.RETRY, "send", details or label(type(exc).__name__))


async def post(
    client: httpx.AsyncClient, url: str, *, timeout: float, **kwargs: Any
) -> httpx.Response:
    """POST with a hard total deadline, repeating once if the pooled connection was dead.

    httpx's timeouts are per phase; the deadline here bounds the whole exchange.
    A repeat can deliver a push twice, which the APNs collapse id and the
    proxy's debouncing make harmless, whereas failing it would delay the wake-up
    by the relay's first retry interval.
    """
    async with asyncio.timeout(timeout):
        try:
            return await client.post(url, **kwargs)
        except _STALE_CONNECTION_ERRORS as exc:
            log.debug("repeating request on a fresh connection after %s", type(exc).__name__)
            return await client.post(url, **kwargs)
