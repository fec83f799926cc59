"""Forwarding tokens unchanged to an upstream proxy's ``/notify`` (``--upstream-url``).

Why: stock clients encrypt their token to the central push service's key, which
a relay's own proxy does not hold.  With an upstream configured, a token no
local key opens (or, with ``--forward-all``, every token) is debounced locally
on its ciphertext (NotifyService does that) and then POSTed as it is to the
upstream, whose answer is passed back: 200 SENT, 410 GONE, anything else
(another status, a timeout, a refused connection) RETRY.  So a relay running
the embedded proxy in front of the central service sends one request per
window instead of one per mail, and sees per-token metrics without plaintext.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from chatmail_common.outcome import Outcome
from chatmail_common.tls import Verify, make_ssl_context

from .options import Option, boolean, number

if TYPE_CHECKING:
    from .settings import ProxySettings

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 20.0


def upstream_url(value: str) -> str:
    """An ``http(s)://`` URL; one without a path means that host's ``/notify``."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
    if parts.path in ("", "/"):
        parts = parts._replace(path="/notify")
    return urlunsplit(parts)


OPTIONS: tuple[Option, ...] = (
    Option(
        "upstream_url",
        upstream_url,
        help="forward openpgp: tokens no local key opens, unchanged, to this proxy's "
        "/notify (e.g. https://notifications.delta.chat/notify)",
        metavar="URL",
    ),
    Option(
        "forward_all",
        boolean,
        False,
        help="forward every token to --upstream-url (debounced here), decrypting none",
    ),
    Option(
        "upstream_timeout",
        number(0, exclusive=True),
        DEFAULT_TIMEOUT,
        "seconds to wait for the upstream's answer",
        metavar="S",
    ),
)


@dataclass(frozen=True, slots=True)
class UpstreamAnswer:
    """The upstream's verdict; ``status`` is its HTTP status as text, or ``send`` when no
    answer came (``details`` then names the error)."""

    outcome: Outcome
    status: str
    details: str = ""


_OUTCOMES = {200: Outcome.SENT, 410: Outcome.GONE}


class Upstream:
    """POSTs raw tokens to the upstream's ``/notify`` over one pooled aiohttp session."""

    def __init__(
        self, url: str, *, timeout: float = DEFAULT_TIMEOUT, verify: Verify = True
    ) -> None:
        self.url = url
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._verify = verify
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            ssl = make_ssl_context(self._verify) if self.url.startswith("https:") else None
            connector = aiohttp.TCPConnector(limit=256, ssl=ssl if ssl is not None else True)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self._session

    async def forward(self, token: str) -> UpstreamAnswer:
        """Send ``token`` unchanged; never raises for a remote failure (that is RETRY)."""
        try:
            async with self._open().post(
                self.url, data=token.encode("utf-8"), headers={"Content-Type": "text/plain"}
            ) as response:
                await response.read()
                status = response.status
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return UpstreamAnswer(Outcome.RETRY, "send", type(exc).__name__)
        return UpstreamAnswer(_OUTCOMES.get(status, Outcome.RETRY), str(status))

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def build(settings: ProxySettings) -> Upstream | None:
    """The upstream for ``--upstream-url``, or None; logs where tokens go."""
    if settings.upstream_url is None:
        return None
    what = "every token" if settings.forward_all else "openpgp: tokens no local key opens"
    log.info("forwarding %s to %s", what, settings.upstream_url)
    return Upstream(
        settings.upstream_url, timeout=settings.upstream_timeout, verify=settings.tls_verify
    )
