"""UBports (Ubuntu Touch) push client: one JSON POST to ``<base>/notify``.

Dead tokens: the UBports server (a fork of Canonical's ubuntu-push, written in
Go) answers 400 with ``{"error": "unknown-token", ...}`` for a token it does
not know (from memory of ubuntu-push's ``server/api``; not verified against the
live service), so that, 404 and 410 are GONE.  Everything else that is not 2xx
is RETRY: upstream's "any 4xx deletes the token" lost live devices.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Callable

import httpx

from ..tokens import PushToken
from .base import Delivery, Outcome, Provider
from .common import (
    Verify,
    is_safe_token,
    label,
    make_ssl_context,
    parse_retry_after,
    post,
    transport_failure,
)

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://push.ubports.com"
APP_ID = "deltatouch.lotharketterer_deltatouch"
#: How long the push server keeps an undelivered notification.
EXPIRY = dt.timedelta(days=7)
DEFAULT_RETRY_AFTER = 5.0
GONE_ERRORS = frozenset({"unknown-token"})


def notification_body(token: str, now: float) -> bytes:
    """The JSON of reference §6; ``expire_on`` is UTC RFC 3339 (upstream used local time)."""
    expire_on = dt.datetime.fromtimestamp(now, dt.UTC) + EXPIRY
    body = {
        "expire_on": expire_on.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "appid": APP_ID,
        "token": token,
        "data": {
            "notification": {
                "tag": "sent_by_chatmail_server",
                "card": {
                    "popup": True,
                    "persist": True,
                    "summary": "New message",
                    "body": "You have a new message",
                },
                "sound": True,
                "vibrate": {"pattern": [200], "duration": 200, "repeat": 1},
            },
            "sent-by": "Chatmail Server",
        },
    }
    return json.dumps(body, separators=(",", ":")).encode()


class UbportsProvider(Provider):
    name = "UBports"

    def __init__(
        self,
        base_url: str | None = None,
        timeout: float = 60.0,
        *,
        verify: Verify = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = (base_url or DEFAULT_BASE_URL).rstrip("/") + "/notify"
        self.timeout = timeout
        self._clock = clock
        self._client = httpx.AsyncClient(
            http2=True,
            verify=make_ssl_context(verify),
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=10, max_keepalive_connections=4),
        )

    async def send(self, token: PushToken) -> Delivery:
        if not is_safe_token(token.device):
            log.info("UBports token %s has invalid characters; answering gone", token.digest)
            return Delivery(Outcome.GONE, "invalid_token")
        try:
            response = await post(
                self._client,
                self.url,
                timeout=self.timeout,
                headers={"content-type": "application/json"},
                content=notification_body(token.device, self._clock()),
            )
        except (httpx.HTTPError, OSError, TimeoutError) as exc:
            log.warning("UBports send for %s failed: %s", token.digest, type(exc).__name__)
            return transport_failure(exc)
        delivery = _map_response(response)
        if delivery.outcome is not Outcome.SENT:
            log.info(
                "UBports answered %s %s for %s",
                response.status_code,
                delivery.details,
                token.digest,
            )
        return delivery

    async def aclose(self) -> None:
        await self._client.aclose()


def _map_response(response: httpx.Response) -> Delivery:
    status = response.status_code
    if 200 <= status < 300:
        return Delivery.sent()
    error = ""
    try:
        body = response.json()
        if isinstance(body, dict):
            error = label(body.get("error", ""))
    except ValueError:
        pass
    if status in (404, 410) or (status == 400 and error in GONE_ERRORS):
        return Delivery(Outcome.GONE, str(status), error)
    retry_after = None
    if status == 429 or "retry-after" in response.headers:
        retry_after = parse_retry_after(response.headers.get("retry-after"), DEFAULT_RETRY_AFTER)
    return Delivery(Outcome.RETRY, str(status), error, retry_after)
