"""How a worker hands one token to the push proxy: HTTP POST, or in-process (embedded proxy).

Both answer with the HTTP status of the proxy's ``/notify`` contract (200 done,
410 token dead, anything else retry) or raise :class:`TransportError`.
"""

from __future__ import annotations

from typing import Protocol

import httpx


class TransportError(Exception):
    """No answer from the proxy (connection refused, timeout, protocol error)."""


class PushTransport(Protocol):
    def post(self, token: str) -> int: ...

    def close(self) -> None: ...


class HttpPushTransport:
    """One keep-alive httpx client per worker thread; HTTP/2 when the URL is https.

    The body is the raw token: no JSON, no trailing newline, no content type,
    exactly what upstream's relay sends.
    """

    def __init__(self, url: str, timeout: float, verify: bool | str = True) -> None:
        self.url = url
        self.client = httpx.Client(
            http2=url.startswith("https://"),
            timeout=timeout,
            verify=verify,
            headers={"user-agent": "chatmail-metadata"},
        )

    def post(self, token: str) -> int:
        try:
            return self.client.post(self.url, content=token.encode()).status_code
        except httpx.HTTPError as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        self.client.close()


class EmbeddedPushTransport:
    """Calls an in-process :class:`notifiers.embedded.EmbeddedProxy` (same semantics as HTTP)."""

    def __init__(self, proxy: object, timeout: float) -> None:
        self.proxy = proxy
        self.timeout = timeout

    def post(self, token: str) -> int:
        try:
            return int(self.proxy.notify(token, self.timeout))  # type: ignore[attr-defined]
        except TimeoutError as exc:
            raise TransportError("embedded proxy timed out") from exc

    def close(self) -> None:
        pass
