"""UBports (Ubuntu Touch) push client: one JSON POST to ``<base>/notify``.

The request is reference §6 (upstream's body, field for field), except that
``expire_on`` is UTC (``...Z``) where upstream used local time; the server
parses it with Go's RFC 3339 parser, which takes both.

Dead tokens: checked against the push server's source (ubports/ubuntu-push,
``server/api/handlers.go``, a fork of Canonical's ubuntu-push): ``/notify``
answers 400 ``{"error": "unknown-token", ...}`` for a token it does not know,
and that alone is GONE.  The server never answers 404 or 410 for a token (a
404 is its HTTP mux's answer to a wrong path), so those mean a wrong
``--ubports-url`` or a proxy in front and are RETRY: GONE would make every
relay delete every UBports token.  Its other answers are RETRY too: 400
``invalid-request``, 401 ``unauthorized`` (the token belongs to another app
id), 413 ``too-many-pending`` (the device is offline with a full queue), 5xx
``unavailable``/``internal``; upstream's "any 4xx deletes the token" lost live
devices.  Not verified: that push.ubports.com runs that code unchanged, with
no proxy in front that answers on its own.

A token with characters outside the grammar never gets here (``/notify``
answers 400); :meth:`UbportsProvider.send` repeats the check as a guard,
RETRY and never GONE.

UBports needs no credentials, so it is on unless switched off (as upstream);
the end of the module registers it with the proxy (:data:`PROVIDER`).
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import httpx

from ..options import Option, boolean, text
from ..tokens import Kind, PushToken
from .base import Delivery, Outcome, Provider
from .common import (
    Verify,
    http2_client,
    label,
    post_push,
    refuse_malformed,
    retry_later,
)
from .spec import Built, ProviderSpec

if TYPE_CHECKING:
    from ..settings import ProxySettings


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
        self._client = http2_client(verify, timeout)

    async def send(self, token: PushToken) -> Delivery:
        refused = refuse_malformed(token, self.name)
        if refused is not None:
            return refused
        return await post_push(
            self._client,
            self.url,
            token,
            provider=self.name,
            timeout=self.timeout,
            map_response=_map_response,
            headers={"content-type": "application/json"},
            content=notification_body(token.device, self._clock()),
        )

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
    if status == 400 and error in GONE_ERRORS:
        return Delivery(Outcome.GONE, str(status), error)
    return retry_later(status, error, response.headers.get("retry-after"), DEFAULT_RETRY_AFTER)


# -- registration ------------------------------------------------------------------

OPTIONS = (
    Option(
        "ubports",
        boolean,
        True,
        help="disable UBports (enabled by default; it needs no credentials)",
    ),
    Option("ubports_url", text, help="UBports push base URL", metavar="URL"),
)


def build(settings: ProxySettings) -> Built | None:
    if not settings.ubports:
        return None
    provider = UbportsProvider(base_url=settings.ubports_url, verify=settings.tls_verify)
    return Built(provider, provider.url)


PROVIDER = ProviderSpec(
    name="UBports",
    description="UBports (Ubuntu Touch) push; no credentials needed",
    kinds=(Kind.UBPORTS,),
    options=OPTIONS,
    build=build,
    disabled="switched off",
    label="UBports",
    success=("ubports_notifications", "Number of UBports notifications"),
    not_configured="not_configured",
)
