"""GuardedServer's two ways of making a connection's transport (issue 11).

On the stock selector loop the transport is made at once, the way asyncio's own accept
loop does it; any other loop goes through the public ``connect_accepted_socket``.  Both
must serve the same, and a protocol factory that raises must cost only that connection.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from chatmail_common import acceptguard
from chatmail_common.acceptguard import GuardedServer


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(b"echo " + data)  # type: ignore[attr-defined]


async def _ask(path: str, line: bytes) -> bytes:
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        writer.write(line)
        return await asyncio.wait_for(reader.readline(), 10)
    except OSError:  # closed by the server (reset, broken pipe, not connected): no answer
        return b""
    finally:
        writer.close()


async def _first_refused_then_twenty_echoed(server: GuardedServer, path) -> None:
    """The first connection is closed unanswered (its setup raised); 20 more are served."""
    server.start()
    try:
        assert await _ask(path, b"one\n") == b""
        answers = await asyncio.gather(*(_ask(path, b"%d\n" % i) for i in range(20)))
        assert answers == [b"echo %d\n" % i for i in range(20)]
    finally:
        server.close()
        await server.wait_closed()


def _listening(tmp_path) -> tuple[socket.socket, str]:
    path = str(tmp_path / "s")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(128)
    return sock, path


def test_the_stock_loop_makes_transports_without_a_task():
    async def check() -> None:
        assert acceptguard._transport_maker(asyncio.get_running_loop()) is not None

    asyncio.run(check())


@pytest.mark.parametrize("direct", [True, False], ids=["transport at once", "public API"])
def test_connections_are_served_and_a_refusing_factory_costs_one_connection(
    tmp_path, monkeypatch, direct
):
    if not direct:
        monkeypatch.setattr(acceptguard, "_transport_maker", lambda loop: None)
    refuse = [True]

    def factory() -> asyncio.Protocol:
        if refuse[0]:
            refuse[0] = False
            raise RuntimeError("refused")
        return _Echo()

    async def check() -> None:
        sock, path = _listening(tmp_path)
        await _first_refused_then_twenty_echoed(GuardedServer([sock], factory), path)

    asyncio.run(check())


def test_on_socket_is_handed_each_accepted_socket_and_a_refusal_costs_one_connection(tmp_path):
    refuse = [True]
    served: list[socket.socket] = []

    async def check() -> None:
        loop = asyncio.get_running_loop()

        def on_socket(conn: socket.socket) -> None:
            if refuse[0]:
                refuse[0] = False
                raise RuntimeError("refused")
            conn.setblocking(False)
            served.append(conn)
            loop.add_reader(conn.fileno(), answer, conn)

        def answer(conn: socket.socket) -> None:
            data = conn.recv(100)
            if data:
                conn.send(b"echo " + data)
            else:
                loop.remove_reader(conn.fileno())
                conn.close()

        sock, path = _listening(tmp_path)
        await _first_refused_then_twenty_echoed(GuardedServer([sock], on_socket=on_socket), path)

    asyncio.run(check())
    assert len(served) == 20


def test_either_a_protocol_factory_or_on_socket():
    async def check() -> None:
        with pytest.raises(TypeError):
            GuardedServer([])
        with pytest.raises(TypeError):
            GuardedServer([], asyncio.Protocol, on_socket=lambda conn: None)

    asyncio.run(check())
