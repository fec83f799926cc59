"""devstack's push sink is a real HTTP/1.1 server: whole requests recorded, keep-alive, errors."""

from __future__ import annotations

import socket

import httpx
import pytest

from devstack.loopback import wait_until
from devstack.pushsink import PushSink


def _exchange(sink: PushSink, data: bytes, replies: int) -> bytes:
    """Send raw bytes on one connection; read until ``replies`` response heads arrived."""
    with socket.create_connection(("127.0.0.1", sink.port), timeout=5) as s:
        s.sendall(data)
        got = b""
        while got.count(b"\r\n\r\n") < replies:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


def test_records_method_path_headers_and_body(sink: PushSink) -> None:
    with httpx.Client() as client:
        r = client.post(sink.url, content=b"tok-1", headers={"X-Probe": "yes"})
        assert r.status_code == 200
        assert client.post(sink.url, content=b"tok-2").status_code == 200  # same connection
    first, second = sink.wait_for(2)
    assert (first.method, first.path, first.body) == ("POST", "/notify", b"tok-1")
    assert first.headers["X-Probe"] == "yes"
    assert "x-probe" not in first.headers  # names as the client sent them
    assert second.body == b"tok-2"


def test_pipelined_requests_answered_in_order_with_scripts(sink: PushSink) -> None:
    sink.scripts["a"] = [410]
    one = b"POST /notify HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\na"
    got = _exchange(sink, one + one, 2)
    assert got.startswith(b"HTTP/1.1 410 ")
    assert b"HTTP/1.1 200 " in got.split(b"\r\n\r\n", 1)[1]
    assert [r.status for r in sink.wait_for(2)] == [410, 200]


def test_connection_close_and_http10_close_after_the_answer(sink: PushSink) -> None:
    for request in (
        b"POST /n HTTP/1.1\r\nConnection: close\r\nContent-Length: 2\r\n\r\nxy",
        b"POST /n HTTP/1.0\r\nContent-Length: 2\r\n\r\nxy",
    ):
        with socket.create_connection(("127.0.0.1", sink.port), timeout=5) as s:
            s.sendall(request)
            got = b""
            while chunk := s.recv(65536):  # ends: the sink closes the connection
                got += chunk
        assert got.startswith(b"HTTP/1.1 200 ")
    assert sink.bodies() == [b"xy", b"xy"]


def test_other_methods_and_bad_requests_are_refused_unrecorded(sink: PushSink) -> None:
    assert _exchange(sink, b"GET /notify HTTP/1.1\r\nHost: x\r\n\r\n", 1).startswith(
        b"HTTP/1.1 501 "
    )
    assert _exchange(sink, b"garbage\r\n\r\n", 1).startswith(b"HTTP/1.1 400 ")
    assert sink.requests == []


def test_closed_sink_refuses_and_a_new_one_takes_its_port() -> None:
    first = PushSink()
    port = first.port
    first.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    again = PushSink(port=port)
    try:
        assert httpx.post(again.url, content=b"t").status_code == 200
    finally:
        again.close()


def test_held_answers_wait_until_released(sink: PushSink) -> None:
    sink.hold_answers()
    with socket.create_connection(("127.0.0.1", sink.port), timeout=5) as s:
        s.sendall(b"POST /notify HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\na")
        s.settimeout(0.2)
        with pytest.raises(TimeoutError):
            s.recv(65536)  # held: no answer, however long the test took to get here
        assert sink.requests == []
        sink.release_answers()
        s.settimeout(5)
        assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
    assert sink.bodies() == [b"a"]


def test_idle_only_once_every_connection_ended(sink: PushSink) -> None:
    assert sink.idle()
    s = socket.create_connection(("127.0.0.1", sink.port), timeout=5)
    assert not sink.idle()  # waiting to be accepted, or open
    s.sendall(b"POST /notify HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\na")
    assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
    assert not sink.idle()
    s.close()
    wait_until(sink.idle, 5, "the sink to be idle")
    assert sink.bodies() == [b"a"]
