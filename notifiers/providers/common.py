"""Small helpers shared by the HTTP provider clients (APNs, FCM, UBports).

They exist so that every provider treats ``Retry-After``, malformed tokens,
timeouts and dead pooled connections the same way, and that FCM and UBports
open their HTTP/2 connections alike.
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

from ..tokens import PushToken, well_formed
from .base import Delivery, Outcome

__all__ = ["Verify", "make_ssl_context"]  # re-exported for the provider modules

log = logging.getLogger(__name__)

#: Upper bound for a server-supplied ``Retry-After`` so a bogus header cannot
#: park a provider for days.
MAX_RETRY_AFTER = 3600.0

# A short symbolic provider error code that is safe to use as a metric label.
_LABEL = re.compile(r"[A-Za-z0-9_\-]{1,64}")

# Errors that mean "the pooled connection was already dead" (GOAWAY, peer
# closed it while idle): the request can be repeated once on a fresh one.
_STALE_CONNECTION_ERRORS = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


def refuse_malformed(token: PushToken, provider: str) -> Delivery | None:
    """RETRY ``invalid_token`` for a token outside its kind's grammar, else None.

    :func:`~notifiers.tokens.parse_token` refuses such tokens before any provider
    (``/notify`` answers 400), so this only guards a token built by hand.  It is
    never GONE: a malformed token is a bug, not a dead device, and GONE makes the
    relay delete it.  Refusing it here also keeps it out of URLs and JSON bodies.
    """
    if well_formed(token):
        return None
    log.warning("%s token %s is malformed; not sent", provider, token.digest)
    return Delivery(Outcome.RETRY, "invalid_token")


def http2_client(verify: Verify, timeout: float) -> httpx.AsyncClient:
    """The pooled HTTP/2 client of an httpx-based provider (FCM, UBports)."""
    return httpx.AsyncClient(
        http2=True,
        verify=make_ssl_context(verify),
        timeout=httpx.Timeout(timeout),
        limits=httpx.Limits(max_connections=10, max_keepalive_connections=4),
    )


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


def retry_later(status: int, details: str, retry_after: str | None, default: float) -> Delivery:
    """RETRY for an error answer; on a 429 or with a ``Retry-After`` header it carries
    the back-off in seconds (``default`` when the header is missing or unreadable)."""
    seconds = None
    if status == 429 or retry_after is not None:
        seconds = parse_retry_after(retry_after, default)
    return Delivery(Outcome.RETRY, str(status), details, seconds)


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


async def post_push(
    client: httpx.AsyncClient,
    url: str,
    token: PushToken,
    *,
    provider: str,
    timeout: float,
    map_response: Callable[[httpx.Response], Delivery],
    **kwargs: Any,
) -> Delivery:
    """POST one push with :func:`post` and map the answer with ``map_response``.

    A request that got no answer is RETRY ``send``; every answer that is not
    SENT is logged with the token's digest.
    """
    try:
        response = await post(client, url, timeout=timeout, **kwargs)
    except (httpx.HTTPError, OSError, TimeoutError) as exc:
        log.warning("%s send for %s failed: %s", provider, token.digest, type(exc).__name__)
        return transport_failure(exc)
    delivery = map_response(response)
    if delivery.outcome is not Outcome.SENT:
        log.info(
            "%s answered %s %s for %s",
            provider,
            response.status_code,
            delivery.details,
            token.digest,
        )
    return delivery
