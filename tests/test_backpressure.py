"""Per-connection output stays bounded when a dict client does not read its replies.

Issue 10, finding 2: one client pipelining 1,500 lookups of a 60 KiB value without
reading grew the server from 47 MB to 310 MB.  Past the write buffer's high-water mark
the server now stops reading from that connection and stops processing what it has
buffered, until the client drains its replies; then every reply arrives, in order.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

from helpers_chatmaild import ALICE, BOB, make_backend, priv, wire
from test_dictserver import HELLO, set_cmd

from chatmaild import dictproto as dp
from chatmaild.dictserver import WRITE_HIGH_WATER, DictProtocol, ServerStats, bind_unix_socket

USERS = [ALICE, BOB, "carol@example.org", "dave@example.org"]
VALUE_BYTES = 60 * 1024
LOOKUPS = 400  # 24 MB of replies if nothing held them back
BOUND = WRITE_HIGH_WATER + 256 * 1024  # the mark, one flush batch and one reply


def value_of(i: int) -> bytes:
    return bytes([ord("a") + i]) * VALUE_BYTES


class RecordingServer:
    """The dict server on its own loop thread, keeping every protocol object it makes."""

    def __init__(self, backend, path) -> None:
        self.loop = asyncio.new_event_loop()
        self.protocols: list[DictProtocol] = []
        self.stats = ServerStats()
        sock = bind_unix_socket(path, 0o600)

        def factory() -> DictProtocol:
            proto = DictProtocol(backend, dp.DEFAULT_MAX_LINE, self.stats)
            self.protocols.append(proto)
            return proto

        async def start():
            self.server = await self.loop.create_unix_server(factory, sock=sock)

        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(start)

    def call(self, fn):
        return asyncio.run_coroutine_threadsafe(fn(), self.loop).result(10)

    def buffered(self) -> int:
        """Bytes waiting in the server's write buffers (read on the loop thread)."""

        async def size():
            return sum(p.transport.get_write_buffer_size() for p in self.protocols if p.transport)

        return self.call(size)

    def close(self) -> None:
        async def stop():
            self.server.close()
            await self.server.wait_closed()

        self.call(stop)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def read_lines(sock: socket.socket, n: int) -> list[bytes]:
    buf = bytearray()
    while buf.count(b"\n") < n:
        chunk = sock.recv(1 << 20)
        assert chunk, "connection closed before every reply arrived"
        buf += chunk
    lines = bytes(buf).split(b"\n")
    assert lines[n:] == [b""], "more bytes than the replies owed"
    return lines[:n]


def test_a_client_that_does_not_read_gets_bounded_output_then_every_reply(tmp_path):
    server = RecordingServer(make_backend(tmp_path), tmp_path / "metadata.socket")
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(20)
    try:
        client.connect(str(tmp_path / "metadata.socket"))
        client.sendall(
            HELLO
            + b"".join(
                set_cmd(str(i + 1), priv("comment"), value_of(i), user=u)
                for i, u in enumerate(USERS)
            )
        )
        assert read_lines(client, len(USERS)) == [b"O%d" % (i + 1) for i in range(len(USERS))]

        lookups = [b"L" + priv("comment") + b"\t" + USERS[i % 4].encode() for i in range(LOOKUPS)]
        client.sendall(wire(*lookups))  # and read nothing for now

        peak, answered, still_since = 0, -1, time.monotonic()
        while time.monotonic() - still_since < 0.5:  # until the server stops answering
            peak = max(peak, server.buffered())
            if server.stats.lookups != answered:
                answered, still_since = server.stats.lookups, time.monotonic()
            time.sleep(0.02)
        assert peak <= BOUND, f"{peak} bytes buffered for one connection that does not read"
        assert answered < LOOKUPS, "the server kept processing with its output buffer full"

        replies = read_lines(client, LOOKUPS)
        assert len(replies) == LOOKUPS
        for i, reply in enumerate(replies):
            assert reply == b"O" + value_of(i % 4), f"reply {i} wrong or out of order"
        assert server.stats.lookups == LOOKUPS
    finally:
        client.close()
        server.close()
