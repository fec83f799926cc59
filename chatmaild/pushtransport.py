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
import struct
from dataclasses import dataclass
from typing import NamedTuple, Protocol
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
#: A response head longer than this is an error (a /notify answer is a few lines).
MAX_HEAD = 65536

# Linux's ``struct tcp_info``: the state is its first byte, ``tcpi_bytes_received`` (the
# payload bytes the connection received, read or not; Linux 4.1+) the u64 at offset 128.
_TCP_INFO: int | None = getattr(socket, "TCP_INFO", None)
_TCP_ESTABLISHED = 1
_BYTES_RECEIVED = struct.Struct("=Q")
_BYTES_RECEIVED_AT = 128
_TCP_INFO_LEN = _BYTES_RECEIVED_AT + _BYTES_RECEIVED.size


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
    port as written, its timeout); the response is read by :func:`parse_response_head`.

    A connection the server has closed while idle (its keep-alive timeout) is no longer
    established, or has bytes nobody asked for: it is reopened first, so that request is
    not lost to a stale connection.  Any error during a request is a RETRY, never
    repeated here.  On Linux that check is one ``getsockopt(TCP_INFO)``, which Python
    makes without releasing the GIL: a ``poll`` released it, and a worker whose GIL
    the dict server's loop took there waited for it back, a hand-off per push.
    Elsewhere it is the ``poll(0)``: readable (EOF, an error or bytes) means stale.

    Once connected, the socket is blocking and the timeout is the kernel's
    (``SO_RCVTIMEO``/``SO_SNDTIMEO``, per send and per receive as Python's own): with a
    Python timeout every send and receive is a ``poll`` first, two more syscalls per push
    (each releasing and taking back the GIL the dict server's loop shares).
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
        self._received = 0  # response bytes read on the open connection
        self._tcp_info = _TCP_INFO is not None

    def _open_socket(self) -> socket.socket:
        """The kept connection, or a new one if there is none or the server closed it."""
        sock = self.conn.sock
        if sock is not None:
            if self._intact(sock):
                return sock
            self.conn.close()  # closed by the server, an error, or unasked-for bytes
        self._received = 0
        self.conn.connect()
        sock = self.conn.sock
        assert sock is not None
        timeout = self.conn.timeout
        if isinstance(timeout, (int, float)) and timeout > 0:
            seconds = int(timeout)
            timeval = struct.pack("ll", seconds, int((timeout - seconds) * 1e6))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
            sock.settimeout(None)
        self._readable = select.poll()
        self._readable.register(sock, select.POLLIN)
        return sock

    def _intact(self, sock: socket.socket) -> bool:
        """The idle connection is still open and holds no bytes nobody asked for."""
        option = _TCP_INFO
        if option is not None and self._tcp_info:
            try:
                info = sock.getsockopt(socket.IPPROTO_TCP, option, _TCP_INFO_LEN)
            except OSError:
                return False
            if len(info) >= _TCP_INFO_LEN:
                received = _BYTES_RECEIVED.unpack_from(info, _BYTES_RECEIVED_AT)[0]
                return info[0] == _TCP_ESTABLISHED and received == self._received
            self._tcp_info = False  # a kernel before 4.1: poll from now on
        # A poll object kept per connection: one poll(0) syscall, not select()'s lists.
        # (A peek with MSG_DONTWAIT would wait for the socket's timeout first.)
        return not self._readable.poll(0)

    def push(self, token: str) -> PushAnswer:
        body = token.encode()
        try:
            sock = self._open_socket()
            sock.sendall(b"%s%d\r\n\r\n%s" % (self._head, len(body), body))
            status, keep, read = _read_response(sock)
            self._received += read
        except BlockingIOError:  # EAGAIN: the kernel's timeout (SO_RCVTIMEO/SO_SNDTIMEO)
            self.conn.close()
            return _failed(TimeoutError("timed out"))
        except (OSError, http.client.HTTPException) as exc:
            self.conn.close()
            return _failed(exc)
        if not keep:
            self.conn.close()
        return answer_for_status(status)

    def close(self) -> None:
        self.conn.close()


class ResponseHead(NamedTuple):
    status: int
    #: The body's length, or None when it is not framed by Content-Length (chunked,
    #: or until the server closes): the connection is then not reused.
    length: int | None
    keep_alive: bool


def parse_response_head(head: bytes) -> ResponseHead:
    """An HTTP/1.x response's status line and headers (without the blank line).

    Only what the transport needs: the status, Content-Length and whether the
    connection stays open; ``http.client`` parsed every header through the email
    package, about as much CPU as the rest of a push.
    """
    lines = head.split(b"\r\n")
    parts = lines[0].split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise http.client.BadStatusLine(lines[0].decode("latin-1")[:80])
    length: int | None = None
    keep = parts[0] == b"HTTP/1.1"
    chunked = False
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise http.client.HTTPException(f"bad header line {line[:80]!r}")
        name = name.strip().lower()
        value = value.strip().lower()
        if name == b"content-length":
            if not value.isdigit():
                raise http.client.HTTPException(f"bad Content-Length {value[:20]!r}")
            length = int(value)
        elif name == b"connection":
            keep = value == b"keep-alive" if not keep else b"close" not in value
        elif name == b"transfer-encoding":
            chunked = True
    if chunked:
        length = None
    return ResponseHead(int(parts[1]), length, keep and length is not None)


def _read_response(sock: socket.socket) -> tuple[int, bool, int]:
    """Read one response (skipping 1xx); its status, whether the connection is reusable,
    and how many bytes were read."""
    buf = b""
    read = 0
    while True:
        while (end := buf.find(b"\r\n\r\n")) < 0:
            if len(buf) > MAX_HEAD:
                raise http.client.HTTPException("response head too long")
            data = sock.recv(65536)
            if not data:
                raise http.client.RemoteDisconnected("closed without a response")
            buf += data
            read += len(data)
        head = parse_response_head(buf[:end])
        buf = buf[end + 4 :]
        if not 100 <= head.status < 200:
            break
    if head.length is None:
        return head.status, False, read  # the body is not needed; the connection is dropped
    while len(buf) < head.length:
        data = sock.recv(65536)
        if not data:
            raise http.client.IncompleteRead(buf)
        buf += data
        read += len(data)
    # Bytes after the body nobody asked for: the connection is not reused.
    return head.status, head.keep_alive and len(buf) == head.length, read


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
