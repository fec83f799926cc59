"""How a worker hands one token to the push proxy: HTTP POST, or in-process (embedded proxy).

Both return a :class:`PushAnswer` whose outcome follows the proxy's ``/notify``
contract (SENT done, GONE the token is dead, RETRY anything else) and never
raise for a failed push.  HTTP statuses exist only in :class:`HttpPushTransport`;
the embedded proxy's verdict is taken as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import httpx

from chatmail_common.outcome import Outcome


@dataclass(frozen=True, slots=True)
class PushAnswer:
    """The verdict on one push and a short ``detail`` for the log (a status, an error)."""

    outcome: Outcome
    detail: str


class PushTransport(Protocol):
    def push(self, token: str) -> PushAnswer: ...

    def close(self) -> None: ...


class InProcessProxy(Protocol):
    """What :class:`EmbeddedPushTransport` needs of ``notifiers.embedded.EmbeddedProxy``."""

    def notify(self, token: str, timeout: float) -> _ProxyVerdict: ...


class _ProxyVerdict(Protocol):
    outcome: Outcome
    message: str


def answer_for_status(status: int) -> PushAnswer:
    """The relay's reading of a ``/notify`` status: 200 done, 410 gone, else retry."""
    if status == 200:
        return PushAnswer(Outcome.SENT, "200")
    if status == 410:
        return PushAnswer(Outcome.GONE, "410")
    return PushAnswer(Outcome.RETRY, str(status))


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

    def push(self, token: str) -> PushAnswer:
        try:
            status = self.client.post(self.url, content=token.encode()).status_code
        except httpx.HTTPError as exc:
            return PushAnswer(Outcome.RETRY, f"error ({type(exc).__name__}: {exc})")
        return answer_for_status(status)

    def close(self) -> None:
        self.client.close()


class EmbeddedPushTransport:
    """Calls the in-process proxy and takes its verdict as it is."""

    def __init__(self, proxy: InProcessProxy, timeout: float) -> None:
        self.proxy = proxy
        self.timeout = timeout

    def push(self, token: str) -> PushAnswer:
        result = self.proxy.notify(token, self.timeout)
        return PushAnswer(result.outcome, result.message)

    def close(self) -> None:
        pass
