"""PlainHttpClient (the notifier's keep-alive http:// transport) against a loopback server:
the URL's host and port as written, one POST per push whatever the server does (a lost
response is a RETRY, never a silent second request), and its timeout honoured."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from chatmail_common.outcome import Outcome
from chatmaild.pushtransport import PlainHttpClient


def test_ipv6_host_without_port_is_that_host_on_port_80():
    """http.client would read ``::1`` as host ``:`` and port 1: every push would fail."""
    client = PlainHttpClient("http://[::1]/notify", 1.0)
    try:
        assert (client.conn.host, client.conn.port) == ("::1", 80)
    finally:
        client.close()


def test_ipv4_host_without_port_is_port_80():
    client = PlainHttpClient("http://127.0.0.1/notify?x=1", 1.0)
    try:
        assert (client.conn.host, client.conn.port, client.path) == (
            "127.0.0.1",
            80,
            "/notify?x=1",
        )
    finally:
        client.close()


Handler = Callable[[socket.socket, bytes], None]


@pytest.fixture
def server() -> Iterator[tuple[int, list[bytes], list[Handler]]]:
    """A loopback listener answering each request with the next handler (or 200 keep-alive);
    records every request it read."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    seen: list[bytes] = []
    handlers: list[Handler] = []
    stop = threading.Event()

    def ok(conn: socket.socket, _req: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    def serve_conn(conn: socket.socket) -> None:
        with conn:
            buf = b""
            while not stop.is_set():
                while b"\r\n\r\n" not in buf:
                    try:
                        data = conn.recv(65536)
                    except ConnectionResetError:  # the client dropped one it found stale
                        return
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                while len(buf) < length:
                    buf += conn.recv(65536)
                body, buf = buf[:length], buf[length:]
                seen.append(body)
                handler = handlers.pop(0) if handlers else ok
                handler(conn, body)

    def accept_loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve_conn, args=(conn,), daemon=True).start()

    threading.Thread(target=accept_loop, daemon=True).start()
    yield listener.getsockname()[1], seen, handlers
    stop.set()
    listener.close()


def close_without_answer(conn: socket.socket, _req: bytes) -> None:
    conn.shutdown(socket.SHUT_RDWR)


def test_response_lost_after_the_post_arrived_is_one_retry_not_a_second_post(server):
    port, seen, handlers = server
    client = PlainHttpClient(f"http://127.0.0.1:{port}/notify", 5.0)
    try:
        assert client.push("tok-1").outcome is Outcome.SENT
        handlers.append(close_without_answer)
        answer = client.push("tok-2")
        assert answer.outcome is Outcome.RETRY
        assert "tok-2" not in answer.detail
        assert seen == [b"tok-1", b"tok-2"]  # exactly one POST of tok-2
        assert client.push("tok-3").outcome is Outcome.SENT  # a new connection
        assert seen == [b"tok-1", b"tok-2", b"tok-3"]
    finally:
        client.close()


def test_a_server_that_never_answers_is_a_retry_within_the_timeout(server):
    port, seen, handlers = server
    hold = threading.Event()
    handlers.append(lambda conn, req: hold.wait(10))
    client = PlainHttpClient(f"http://127.0.0.1:{port}/notify", 0.3)
    try:
        answer = client.push("tok")
        assert answer.outcome is Outcome.RETRY
        assert "timed out" in answer.detail
        assert seen == [b"tok"]
    finally:
        hold.set()
        client.close()


def _answer_then(after: Callable[[socket.socket], None]) -> Handler:
    def handler(conn: socket.socket, _req: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        after(conn)

    return handler


def test_a_connection_the_server_closed_while_idle_is_reopened_before_the_request(server):
    port, seen, handlers = server
    closed = threading.Event()

    def close(conn: socket.socket) -> None:
        conn.shutdown(socket.SHUT_RDWR)  # its keep-alive timeout, after the answer
        closed.set()

    handlers.append(_answer_then(close))
    client = PlainHttpClient(f"http://127.0.0.1:{port}/notify", 5.0)
    try:
        assert client.push("tok-1").outcome is Outcome.SENT
        assert closed.wait(10)
        assert client.push("tok-2").outcome is Outcome.SENT  # not lost to the closed one
        assert seen == [b"tok-1", b"tok-2"]
    finally:
        client.close()


def test_a_connection_with_bytes_nobody_asked_for_is_reopened_before_the_request(server):
    port, seen, handlers = server
    kept: list[socket.socket] = []
    held = threading.Event()

    def keep(conn: socket.socket) -> None:
        kept.append(conn)
        held.set()

    handlers.append(_answer_then(keep))
    client = PlainHttpClient(f"http://127.0.0.1:{port}/notify", 5.0)
    try:
        assert client.push("tok-1").outcome is Outcome.SENT
        assert held.wait(10)  # the server thread keeps it after the answer went out
        # While idle, the server says something (a 408 before closing, say): not the
        # answer to the next request, which goes on a new connection.
        kept[0].sendall(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")
        assert client.push("tok-2").outcome is Outcome.SENT
        assert seen == [b"tok-1", b"tok-2"]
    finally:
        client.close()


@pytest.mark.skipif(not hasattr(socket, "TCP_INFO"), reason="Linux's TCP_INFO")
def test_the_idle_check_of_a_kept_connection_is_no_poll(server):
    """A poll released the GIL (a hand-off to the dict server's loop per push)."""
    port, seen, _ = server
    client = PlainHttpClient(f"http://127.0.0.1:{port}/notify", 5.0)

    class NoPoll:
        def poll(self, timeout: int) -> list:
            raise AssertionError("poll called")

    try:
        assert client.push("tok-1").outcome is Outcome.SENT
        client._readable = NoPoll()  # type: ignore[assignment]
        assert client.push("tok-2").outcome is Outcome.SENT
        assert client.push("tok-3").outcome is Outcome.SENT
        assert seen == [b"tok-1", b"tok-2", b"tok-3"]
    finally:
        client.close()
