"""How a worker hands one token to the push proxy: HTTP POST, or in-process (embedded proxy).

Both return a :class:`PushAnswer` whose outcome follows the proxy's ``/notify``
contract (SENT done, GONE the token is dead, RETRY anything else) and never
raise for a failed push.  HTTP statuses exist only in :class:`HttpPushTransport`;
the embedded proxy's verdict is taken as it is.
"""

from __future__ import annotations

import http.client
import select
import socket
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

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


USER_AGENT = "chatmail-metadata"


def answer_for_status(status: int) -> PushAnswer:
    """The relay's reading of a ``/notify`` status: 200 done, 410 gone, else retry."""
    if status == 200:
        return PushAnswer(Outcome.SENT, "200")
    if status == 410:
        return PushAnswer(Outcome.GONE, "410")
    return PushAnswer(Outcome.RETRY, str(status))


class HttpPushTransport:
    """One keep-alive HTTP client per worker thread: HTTP/2 (httpx) when the URL is https,
    the standard library's HTTP/1.1 client (:class:`PlainHttpClient`) for a plain http URL.

    The body is the raw token: no JSON, no trailing newline, no content type,
    exactly what upstream's relay sends.  A plain-http proxy is on loopback or the
    local network, where httpx's per-request machinery cost a worker about five times
    the CPU of the request itself (and the notifier's twelve workers share one GIL).
    """

    def __init__(self, url: str, timeout: float, verify: bool | str = True) -> None:
        self.url = url
        self.client: httpx.Client | PlainHttpClient
        if url.startswith("http://"):
            self.client = PlainHttpClient(url, timeout)
        else:
            self.client = httpx.Client(
                http2=url.startswith("https://"),
                timeout=timeout,
                verify=verify,
                headers={"user-agent": USER_AGENT},
            )

    def push(self, token: str) -> PushAnswer:
        client = self.client
        if isinstance(client, PlainHttpClient):
            return client.push(token)
        try:
            status = client.post(self.url, content=token.encode()).status_code
        except httpx.HTTPError as exc:
            return _failed(exc)
        return answer_for_status(status)

    def close(self) -> None:
        self.client.close()


def _failed(exc: Exception) -> PushAnswer:
    return PushAnswer(Outcome.RETRY, f"error ({type(exc).__name__}: {exc})")


class PlainHttpClient:
    """POST over one keep-alive HTTP/1.1 connection, reopened when needed.

    The request is written in ONE send (head and body in one buffer): ``http.client``
    sends them in two, which costs a syscall and on loopback a second segment the
    server has to wait for.  ``http.client`` still opens the connection (host and
    port as written, its timeout) and parses the response.

    A connection the server has closed while idle (its keep-alive timeout) is readable
    (EOF) before the next request: it is reopened first, so that request is not lost
    to a stale connection.  Any error during a request is a RETRY, never repeated here.
    """

    def __init__(self, url: str, timeout: float) -> None:
        parts = urlsplit(url)
        if parts.hostname is None:
            raise ValueError(f"notify URL without a host: {url}")
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        # The port always explicit: without one, http.client parses a bare IPv6 host
        # (``::1`` from ``[::1]``) as host ``:`` and port 1.
        port = parts.port or http.client.HTTP_PORT
        self.conn = http.client.HTTPConnection(parts.hostname, port, timeout=timeout)
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        if port != http.client.HTTP_PORT:
            host = f"{host}:{port}"
        # What http.client sent: Host, Accept-Encoding identity, User-Agent, Content-Length.
        self._head = (
            f"POST {self.path} HTTP/1.1\r\nHost: {host}\r\nAccept-Encoding: identity\r\n"
            f"User-Agent: {USER_AGENT}\r\nContent-Length: "
        ).encode("ascii")
        self._readable = select.poll()

    def _open_socket(self) -> socket.socket:
        """The kept connection, or a new one if there is none or the server closed it."""
        sock = self.conn.sock
        if sock is not None:
            # A poll object kept per connection: one poll(0) syscall, not select()'s lists.
            # (A peek with MSG_DONTWAIT would wait for the socket's timeout first.)
            if not self._readable.poll(0):
                return sock
            self.conn.close()  # EOF (closed by the server), an error, or unasked-for bytes
        self.conn.connect()
        sock = self.conn.sock
        assert sock is not None
        self._readable = select.poll()
        self._readable.register(sock, select.POLLIN)
        return sock

    def push(self, token: str) -> PushAnswer:
        body = token.encode()
        try:
            sock = self._open_socket()
            sock.sendall(b"%s%d\r\n\r\n%s" % (self._head, len(body), body))
            response = http.client.HTTPResponse(sock, method="POST")
            try:
                response.begin()
                response.read()
            finally:
                response.close()  # the socket's own file stays open: keep-alive
            if response.will_close:
                self.conn.close()
        except (OSError, http.client.HTTPException) as exc:
            self.conn.close()
            return _failed(exc)
        return answer_for_status(response.status)

    def close(self) -> None:
        self.conn.close()


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
