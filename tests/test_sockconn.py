"""The dict server's own connection object at its edges, over real sockets (issue 11).

The server runs each connection on :class:`chatmaild.sockconn.SocketConnection` instead
of an asyncio transport; these are the edges a transport used to handle for it: a
reader slower than the replies (partial sends, flow control), a peer that goes away
mid-reply or while its commit waits for its group, end of input after the last
command, and many short connections, which must all end closed and counted.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import struct
import time

import pytest
from helpers_chatmaild import ALICE, BOB, SERVER, make_backend, priv, wire
from test_dictserver import HELLO, Client, ServerThread, set_cmd

from chatmaild import groupcommit
from chatmaild.dictserver import WRITE_HIGH_WATER
from chatmaild.sockconn import SocketConnection

VALUE_BYTES = 60 * 1024
LOOKUPS = 400  # 24 MB of replies if nothing held them back
BOUND = WRITE_HIGH_WATER + 256 * 1024  # the mark, one flush batch and one reply


@pytest.fixture
def server(tmp_path):
    srv = ServerThread(make_backend(tmp_path), tmp_path / "metadata.socket")
    yield srv
    srv.close()


def _buffered(srv: ServerThread) -> int:
    """Bytes the server holds unsent, over all its connections (read on its loop)."""

    async def size():
        return sum(c.get_write_buffer_size() for c in _live(srv))

    return srv.call(size)


def _live(srv: ServerThread) -> list[SocketConnection]:
    return [c for c in gc.get_objects() if type(c) is SocketConnection and not c.is_closing()]


def _wait_for(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _store_big_values(client: Client) -> None:
    client.send(HELLO + set_cmd("1", priv("comment"), b"a" * VALUE_BYTES))
    assert client.lines(1) == [b"O1"]


def test_a_slow_reader_gets_partial_sends_bounded_output_and_every_reply_in_order(server):
    client = Client(server.path)
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    try:
        _store_big_values(client)
        lookup = b"L" + priv("comment") + b"\t" + ALICE.encode()
        client.send(wire(*[lookup] * LOOKUPS))  # and read nothing for now
        # The server has begun (a stalled one looked "still" for 0.5 s before its first reply).
        _wait_for(lambda: _buffered(server) > 0, "replies to be left unsent")

        peak, answered, still_since = 0, -1, time.monotonic()
        while time.monotonic() - still_since < 0.5:  # until the server stops answering
            peak = max(peak, _buffered(server))
            if server.stats.lookups != answered:
                answered, still_since = server.stats.lookups, time.monotonic()
            time.sleep(0.02)
        assert peak > 0, "nothing was left unsent: the reader was not slow enough"
        assert peak <= BOUND, f"{peak} bytes buffered for one connection that does not read"
        assert answered < LOOKUPS, "the server kept processing with its output buffer full"

        buf, lines = bytearray(), 0  # read slowly: many partial sends, pauses and resumptions
        while lines < LOOKUPS:
            chunk = client.sock.recv(8192)
            assert chunk, "connection closed before every reply arrived"
            buf += chunk
            lines += chunk.count(b"\n")
        replies = bytes(buf).split(b"\n")
        assert replies[LOOKUPS:] == [b""]
        assert replies[:LOOKUPS] == [b"O" + b"a" * VALUE_BYTES] * LOOKUPS
        assert server.stats.lookups == LOOKUPS
        assert _buffered(server) == 0
    finally:
        client.close()


def test_a_peer_closing_mid_reply_is_closed_quietly_and_others_are_served(server, caplog):
    caplog.set_level(logging.WARNING)
    client = Client(server.path)
    _store_big_values(client)
    lookup = b"L" + priv("comment") + b"\t" + ALICE.encode()
    client.send(wire(*[lookup] * LOOKUPS))
    client.sock.recv(4096)  # a piece of the first reply, then away with the rest unread
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()  # with unread data (and linger 0): a reset

    _wait_for(lambda: server.stats.open_connections == 0, "the connection to be closed")
    assert _buffered(server) == 0
    other = Client(server.path)
    try:
        other.send(HELLO + b"L" + priv("comment") + b"\t" + BOB.encode() + b"\n")
        assert other.lines(1) == [b"N"]
    finally:
        other.close()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_replies_are_written_before_closing_at_end_of_input(server):
    client = Client(server.path)
    try:
        _store_big_values(client)
        lookup = b"L" + priv("comment") + b"\t" + ALICE.encode()
        client.send(wire(*[lookup] * 40))
        client.sock.shutdown(socket.SHUT_WR)  # end of input right after the commands
        time.sleep(0.3)  # replies pile up unsent meanwhile
        buf = bytearray()
        while chunk := client.sock.recv(1 << 20):
            buf += chunk
        assert bytes(buf).split(b"\n") == [b"O" + b"a" * VALUE_BYTES] * 40 + [b""]
    finally:
        client.close()
    _wait_for(lambda: server.stats.open_connections == 0, "the connection to be closed")


def test_many_short_connections_of_every_kind_end_closed_and_counted(server):
    n = 0
    for i in range(300):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(str(server.path))
        n += 1
        if i % 3 == 0:  # a lookup, its reply, close
            sock.sendall(HELLO + b"L" + priv("comment") + b"\t" + ALICE.encode() + b"\n")
            assert sock.recv(100) == b"N\n"
        elif i % 3 == 1:  # the hello and gone
            sock.sendall(HELLO)
        # else: nothing sent at all
        sock.close()
    _wait_for(lambda: server.stats.connections == n, "every connection to be accepted")
    _wait_for(lambda: server.stats.open_connections == 0, "every connection to be closed")
    assert server.stats.lookups == 100
    assert _live(server) == []


def test_a_connection_closed_while_its_group_commit_is_pending(tmp_path, monkeypatch, caplog):
    """The commit is still written (the peer may not learn of it, as with any lost reply),
    its reply goes nowhere without an error, and the connection ends closed."""
    submitted, written = [], []

    def flush_and_note(self):
        self._flush()
        written.append(True)

    def later_submit(self, ev, on_reply):  # the group written 0.3 s later instead of at once
        if not self._events:
            self._loop.call_later(0.3, flush_and_note, self)
        self._events.append(ev)
        self._callbacks.append(on_reply)
        submitted.append(ev)

    monkeypatch.setattr(groupcommit.GroupCommitter, "submit", later_submit)
    caplog.set_level(logging.WARNING)
    srv = ServerThread(make_backend(tmp_path), tmp_path / "metadata.socket")
    try:
        client = Client(srv.path)
        client.send(HELLO + set_cmd("1", priv("comment"), b"durable"))
        _wait_for(lambda: submitted, "the commit to wait for its group")
        client.close()
        _wait_for(lambda: srv.stats.open_connections == 0, "the connection to be closed")
        _wait_for(lambda: written, "the group to be written")

        other = Client(srv.path)
        other.send(HELLO + b"L" + priv("comment") + b"\t" + ALICE.encode() + b"\n")
        assert other.lines(1) == [b"Odurable"]
        other.close()
    finally:
        srv.close()
    assert srv.stats.commits == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_a_protocol_that_raises_costs_only_its_connection(tmp_path, caplog):
    """A bug in data_received closes that connection (logged), the loop serves on."""

    class Broken(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            raise RuntimeError("bug")

        def connection_lost(self, exc: Exception | None) -> None:
            self.lost = exc

    async def check() -> None:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        proto = Broken()
        conn = SocketConnection.serve(loop, b, proto)  # type: ignore[arg-type]
        a.sendall(b"x")
        for _ in range(100):
            await asyncio.sleep(0.01)
            if conn.is_closing():
                break
        assert conn.is_closing() and isinstance(proto.lost, RuntimeError)
        assert a.recv(10) == b""  # closed on our side
        a.close()

    caplog.set_level(logging.ERROR)
    asyncio.run(check())
    assert "dict connection failed" in caplog.text


def test_a_connection_closed_while_its_turn_reply_is_pending(tmp_path, caplog):
    """The TURN helper answers after the peer left: the reply goes nowhere, quietly."""
    caplog.set_level(logging.WARNING)
    backend = make_backend(tmp_path, params=f"turn_socket_path = {tmp_path / 'turn.socket'}\n")
    srv = ServerThread(backend, tmp_path / "metadata.socket")
    asked = []

    async def start_turn():
        async def handle(reader, writer):
            asked.append(True)
            await asyncio.sleep(0.3)
            writer.write(b"u:p\n")
            await writer.drain()
            writer.close()

        return await asyncio.start_unix_server(handle, path=str(tmp_path / "turn.socket"))

    turn = srv.call(start_turn)
    try:
        client = Client(srv.path)
        client.send(HELLO + wire(b"L" + SERVER + b"turn\t" + ALICE.encode()))
        _wait_for(lambda: asked, "the TURN helper to be asked")
        client.close()
        _wait_for(lambda: srv.stats.open_connections == 0, "the connection to be closed")
        time.sleep(0.4)  # the helper answers meanwhile

        other = Client(srv.path)
        other.send(HELLO + wire(b"L" + SERVER + b"turn\t" + BOB.encode()))
        assert other.lines(1) == [b"Oexample.org:3478:u:p"]
        other.close()
    finally:

        async def stop():
            turn.close()

        srv.call(stop)
        srv.close()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
