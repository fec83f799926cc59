"""A real HTTP/1.1 server on 127.0.0.1 that records push POSTs: the notifier's "proxy".

Answers are scripted per token (a list of statuses consumed in order, then the
default) and can be delayed, so tests can make the "proxy" slow, failing or gone.

It reads every request whole (request line, headers, a ``Content-Length`` body) on a
keep-alive connection served by a thread of its own, and answers with a status and
an empty body.  It is written on the socket API rather than ``http.server``: that
parsed each request's headers through the email package and cost about 0.25 ms of
CPU per POST, a quarter of what the notifier spends on the job it stands in for, on
the same two cores in the LMTP benchmark (bench/bench_notifier.py).
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus

from devstack.loopback import HOST

#: A request head longer than this is refused (a push POST's head is a few lines).
MAX_HEAD = 65536


@dataclass
class Received:
    path: str
    body: bytes
    headers: dict[str, str]
    status: int
    at: float  # when the answer was decided (after ``delay``)
    arrived: float = 0.0  # when the request's body had been read (before ``delay``)
    method: str = "POST"


class BadRequest(Exception):
    """The bytes on a connection are not an HTTP/1.x request this sink reads."""


@dataclass
class _Head:
    method: str
    path: str
    version: str
    headers: dict[str, str]  # as sent (the first of a repeated name)
    lower: dict[str, str]  # lower-cased names, for lookups

    @property
    def keep_alive(self) -> bool:
        connection = self.lower.get("connection", "").lower()
        if self.version == "HTTP/1.1":
            return "close" not in connection
        return connection == "keep-alive"


def parse_request_head(head: bytes) -> _Head:
    """A request line and its header lines (without the blank line)."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(f"bad request line {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    lower: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise BadRequest(f"bad header line {line[:80]!r}")
        value = value.strip()
        headers.setdefault(name, value)
        lower.setdefault(name.lower(), value)
    return _Head(parts[0], parts[1], parts[2], headers, lower)


def _response(status: int, close: bool) -> bytes:
    reason = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
    extra = "Connection: close\r\n" if close else ""
    return f"HTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\n{extra}\r\n".encode("latin-1")


@dataclass
class PushSink:
    default_status: int = 200
    delay: float = 0.0
    scripts: dict[str, list[int]] = field(default_factory=dict)
    requests: list[Received] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._connections: set[socket.socket] = set()
        self._closed = False
        self._answering = threading.Event()  # cleared: requests wait unanswered (in flight)
        self._answering.set()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # As http.server's: a sink can come back on the port a closed one used.
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((HOST, self.port))
        self._listener.listen(128)
        self._listener.setblocking(False)  # accept() only when poll() says one waits
        # poll, not select: select() refuses a descriptor above 1023 (a test process may
        # hold that many), and the accept thread would end without a word.
        self._readable = select.poll()
        self._readable.register(self._listener, select.POLLIN)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://{HOST}:{self.port}/notify"
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    # -- serving ------------------------------------------------------------
    def _accept(self) -> None:
        while True:
            try:
                self._readable.poll()
            except OSError:
                return  # closed
            # Taken and counted as one step under the lock: idle() never sees a connection
            # that is neither waiting nor open (accepted, not yet in the set).
            with self._lock:
                if self._closed:
                    return
                try:
                    conn, _ = self._listener.accept()
                except BlockingIOError:
                    continue  # the client went away before it was taken
                except OSError:
                    return  # closed
                self._connections.add(conn)
            conn.setblocking(True)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        """Requests on one connection, one after the other, until either side closes."""
        buf = b""
        try:
            while True:
                while (end := buf.find(b"\r\n\r\n")) < 0:
                    if len(buf) > MAX_HEAD:
                        raise BadRequest("request head too long")
                    data = conn.recv(65536)
                    if not data:
                        return  # the client closed the connection
                    buf += data
                head = parse_request_head(buf[:end])
                buf = buf[end + 4 :]
                body, buf = self._read_body(conn, head, buf)
                close = not head.keep_alive
                status = self._record(head, body) if head.method == "POST" else 501
                conn.sendall(_response(status, close or status == 501))
                if close or status == 501:
                    return
        except BadRequest:
            with contextlib.suppress(OSError):
                conn.sendall(_response(400, close=True))
        except OSError:
            pass  # reset by the client, or closed by close()
        finally:
            with self._lock:
                self._connections.discard(conn)
            conn.close()

    @staticmethod
    def _read_body(conn: socket.socket, head: _Head, buf: bytes) -> tuple[bytes, bytes]:
        """The body framed by Content-Length, and the bytes after it (a pipelined request)."""
        if "transfer-encoding" in head.lower:
            raise BadRequest("chunked request bodies are not read by this sink")
        length = head.lower.get("content-length", "0")
        if not length.isdigit():
            raise BadRequest(f"bad Content-Length {length[:20]!r}")
        size = int(length)
        if size > len(buf) and head.lower.get("expect", "").lower() == "100-continue":
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        while len(buf) < size:
            data = conn.recv(max(65536, size - len(buf)))
            if not data:
                raise OSError("closed in the middle of a request body")
            buf += data
        return buf[:size], buf[size:]

    def _record(self, head: _Head, body: bytes) -> int:
        """Decide the answer (after ``delay``) and record the request; returns the status."""
        arrived = time.time()
        self._answering.wait()
        if self.delay:
            time.sleep(self.delay)
        status = self._answer(body.decode("utf-8", "replace"))
        received = Received(head.path, body, head.headers, status, time.time(), arrived)
        with self._cond:
            self.requests.append(received)
            self._cond.notify_all()
        return status

    def _answer(self, token: str) -> int:
        with self._lock:
            script = self.scripts.get(token)
            if script:
                return script.pop(0)
            return self.default_status

    # -- holding pushes in flight ----------------------------------------------
    def hold_answers(self) -> None:
        """Requests from now on are read and then left unanswered until
        ``release_answers()``: a push stays in flight for exactly as long as a test needs,
        however slow the machine (a ``delay`` ends on its own, maybe before the test looked)."""
        self._answering.clear()

    def release_answers(self) -> None:
        """Answer the held requests, and every later one at once (or after ``delay``)."""
        self._answering.set()

    # -- what tests read ------------------------------------------------------
    def idle(self) -> bool:
        """No connection open and none waiting to be accepted: every request that
        reached the sink, held or delayed, is in ``requests`` (after a client died, say)."""
        with self._lock:
            if self._connections:
                return False
            waiting = select.poll()  # one poll object is not for two threads at once
            waiting.register(self._listener, select.POLLIN)
            return not waiting.poll(0)

    def bodies(self) -> list[bytes]:
        with self._lock:
            return [r.body for r in self.requests]

    def wait_for(self, count: int, timeout: float = 30.0) -> list[Received]:
        """Wait until at least ``count`` requests arrived; return them (raises on timeout)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.requests) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(self.requests)} of {count} push requests arrived")
                self._cond.wait(left)
            return list(self.requests)

    def wait_for_body(self, body: bytes, timeout: float = 30.0) -> None:
        """Wait until a request with exactly ``body`` arrived (raises on timeout)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not any(r.body == body for r in self.requests):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no push request with body {body[:40]!r}")
                self._cond.wait(left)

    def close(self) -> None:
        """Stop listening and drop the open connections: the proxy is down."""
        with self._lock:
            self._closed = True
            connections = list(self._connections)
        self._answering.set()  # held requests end (their connections are dropped below)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the poll()
        self._listener.close()
        self._thread.join(5)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
