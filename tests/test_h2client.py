"""notifiers.h2client against the fake HTTP/2 server of devstack/fakes (TLS on loopback)."""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import Iterator

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import pytest
import trustme

from devstack.fakes import h2server
from devstack.fakes.h2server import FakeH2Server, Reply, Request
from devstack.fakes.keys import server_context
from notifiers import h2client
from notifiers.h2client import ConnectError, ConnectionLost, H2Client

pytestmark = pytest.mark.asyncio

JSON = [("content-type", "application/json")]


@pytest.fixture
def server(tls_ca: trustme.CA) -> Iterator[FakeH2Server]:
    with FakeH2Server(server_context(tls_ca)) as srv:
        yield srv


@pytest.fixture
def limited(tls_ca: trustme.CA) -> Iterator[FakeH2Server]:
    """A server that allows 3 concurrent streams and answers after 50 ms."""
    with FakeH2Server(server_context(tls_ca), max_concurrent_streams=3) as srv:
        srv.default = Reply(200, delay=0.05)
        yield srv


def client_for(server: FakeH2Server, ca_path: str, **kw) -> H2Client:
    return H2Client(server.url, ca_path, **kw)


async def post(client: H2Client, path: str = "/x", body: bytes = b"{}", timeout: float = 5):
    return await client.request("POST", path, JSON, body, timeout=timeout)


async def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_request_and_response(server, ca_path):
    server.script(Reply(201, b'{"ok":1}', [("x-answer", "yes")]))
    client = client_for(server, ca_path)
    try:
        response = await post(client, "/3/device/ab", b'{"a":1}')
    finally:
        await client.aclose()
    assert (response.status, response.body) == (201, b'{"ok":1}')
    assert response.header("x-answer") == "yes"
    assert response.header("content-length") == "8"
    [req] = server.requests
    assert (req.method, req.path, req.body, req.http_version) == (
        "POST",
        "/3/device/ab",
        b'{"a":1}',
        "2",
    )
    assert req.headers == [("content-type", "application/json"), ("content-length", "7")]


async def test_many_concurrent_requests_share_one_connection(server, ca_path):
    client = client_for(server, ca_path)
    try:
        responses = await asyncio.gather(*(post(client, f"/{i}") for i in range(300)))
    finally:
        await client.aclose()
    assert {r.status for r in responses} == {200}
    assert server.connections == 1
    assert sorted(r.path for r in server.requests) == sorted(f"/{i}" for i in range(300))


async def test_stream_limit_respected(limited, ca_path):
    client = client_for(limited, ca_path)
    try:
        responses = await asyncio.gather(*(post(client) for _ in range(12)))
    finally:
        await client.aclose()
    assert [r.status for r in responses] == [200] * 12
    assert limited.connections == 1  # the fake closes a connection that exceeds the limit
    assert limited.peak_streams == 3


async def test_client_cap_below_server_limit(server, ca_path):
    server.default = Reply(200, delay=0.05)
    client = client_for(server, ca_path, max_streams_cap=2)
    try:
        await asyncio.gather(*(post(client) for _ in range(6)))
    finally:
        await client.aclose()
    assert server.peak_streams == 2


async def test_waiting_for_a_stream_is_bounded_by_the_timeout(limited, ca_path):
    limited.default = Reply(200, delay=1.0)
    client = client_for(limited, ca_path)
    try:
        busy = [asyncio.ensure_future(post(client)) for _ in range(3)]
        await wait_for(lambda: len(limited.requests) == 3)
        with pytest.raises(TimeoutError):
            await post(client, "/late", timeout=0.2)
        assert [r.status for r in await asyncio.gather(*busy)] == [200] * 3
    finally:
        await client.aclose()
    assert "/late" not in [r.path for r in limited.requests]


async def test_timeout_resets_the_stream_and_frees_it(limited, ca_path):
    limited.script(*[Reply(200, delay=2.0)] * 3)
    client = client_for(limited, ca_path)
    try:
        results = await asyncio.gather(
            *(post(client, timeout=0.2) for _ in range(3)), return_exceptions=True
        )
        assert all(isinstance(r, TimeoutError) for r in results)
        # All three streams were reset, so the next three fit at once.
        responses = await asyncio.gather(*(post(client, timeout=1) for _ in range(3)))
    finally:
        await client.aclose()
    assert [r.status for r in responses] == [200] * 3
    assert limited.connections == 1


async def test_goaway_mid_flight_drains_and_retries_refused(server, ca_path):
    def first_connection_slow(request: Request) -> Reply:
        # The first two streams are answered after 0.3 s; the last two never before the
        # GOAWAY that refuses them, however late it comes (a fixed 0.3 s for all four let
        # a stalled test answer them first).
        if request.connection == 1:
            arrived = sum(r.connection == 1 for r in server.requests)
            return Reply(200, delay=0.3 if arrived <= 2 else 60.0)
        return Reply(200)

    server.handler = first_connection_slow
    client = client_for(server, ca_path)
    try:
        first = [asyncio.ensure_future(post(client, f"/a{i}")) for i in range(4)]
        await wait_for(lambda: len(server.requests) == 4)
        stream_of = {r.path: i for i, r in enumerate(server.requests)}
        # Streams 1 and 3 will be answered; 5 and 7 were "not processed".
        server.goaway_all(last_stream_id=3, keep_open=True)
        await asyncio.sleep(0.05)
        later = await post(client, "/later")
        responses = await asyncio.gather(*first)
    finally:
        await client.aclose()
    assert later.status == 200
    assert [r.status for r in responses] == [200] * 4
    assert server.connections == 2
    on_second = sorted(r.path for r in server.requests if r.connection == 2)
    refused = sorted(p for p, i in stream_of.items() if i >= 2)
    assert on_second == sorted([*refused, "/later"])


async def test_goaway_after_reply_moves_new_requests_to_a_new_connection(server, ca_path):
    server.script(Reply(200, action="goaway"))
    client = client_for(server, ca_path)
    try:
        assert (await post(client)).status == 200
        assert (await post(client)).status == 200
        assert (await post(client)).status == 200
    finally:
        await client.aclose()
    assert [r.connection for r in server.requests] == [1, 2, 2]


async def test_refused_stream_is_retried_once(server, ca_path):
    server.script(Reply(200), Reply(action="refuse"))
    client = client_for(server, ca_path)
    try:
        assert (await post(client)).status == 200
        assert (await post(client)).status == 200
    finally:
        await client.aclose()
    assert [r.connection for r in server.requests] == [1, 1, 2]


async def test_connection_drop_mid_flight_retries_on_a_new_connection(server, ca_path):
    server.script(*[Reply(200, delay=1.0)] * 5)
    client = client_for(server, ca_path)
    try:
        pending = [asyncio.ensure_future(post(client)) for _ in range(5)]
        await wait_for(lambda: len(server.requests) == 5)
        server.close_connections()
        responses = await asyncio.gather(*pending)
    finally:
        await client.aclose()
    assert [r.status for r in responses] == [200] * 5
    assert server.connections == 2


async def test_connection_lost_twice_raises_then_recovers(server, ca_path):
    server.script(Reply(action="close"), Reply(action="close"))
    client = client_for(server, ca_path)
    try:
        with pytest.raises(ConnectionLost):
            await post(client)
        assert (await post(client)).status == 200
    finally:
        await client.aclose()
    assert server.connections == 3


async def test_idle_connection_closed_by_server_reconnects(server, ca_path):
    client = client_for(server, ca_path)
    try:
        await post(client)
        server.close_connections()
        await asyncio.sleep(0.05)
        assert (await post(client)).status == 200
    finally:
        await client.aclose()
    assert server.connections == 2


async def test_large_bodies_both_ways_use_flow_control(server, ca_path):
    def echo(request: Request) -> Reply:
        return Reply(200, request.body)

    server.handler = echo
    body = bytes(range(256)) * 4096  # 1 MiB, far above the 64 KiB initial windows
    client = client_for(server, ca_path)
    try:
        responses = await asyncio.gather(*(post(client, body=body, timeout=20) for _ in range(3)))
    finally:
        await client.aclose()
    assert all(r.body == body for r in responses)
    assert all(r.body == body for r in server.requests)
    assert server.connections == 1


async def test_connections_are_lazy_and_shared_while_connecting(server, ca_path):
    client = client_for(server, ca_path)
    await asyncio.sleep(0.05)
    assert server.connections == 0
    try:
        await asyncio.gather(*(post(client) for _ in range(20)))
    finally:
        await client.aclose()
    assert server.connections == 1


async def test_verify_modes(server, ca_path, tls_ca):
    ctx = ssl.create_default_context()
    tls_ca.configure_trust(ctx)
    for verify in (ctx, ca_path, False):
        client = H2Client(server.url, verify)
        try:
            assert (await post(client)).status == 200
        finally:
            await client.aclose()
    client = H2Client(server.url, True)  # default trust store: the test CA is unknown
    try:
        with pytest.raises(ConnectError):
            await post(client)
    finally:
        await client.aclose()


async def test_alpn_h2_is_required(tls_ca, ca_path):
    ctx = server_context(tls_ca)
    ctx.set_alpn_protocols(["http/1.1"])

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=ctx)
    port = srv.sockets[0].getsockname()[1]
    client = H2Client(f"https://127.0.0.1:{port}", ca_path)
    try:
        with pytest.raises(ConnectError, match="h2"):
            await post(client)
    finally:
        await client.aclose()
        srv.close()
        await srv.wait_closed()


async def test_unreachable_is_connect_error(ca_path):
    client = H2Client("https://127.0.0.1:9", ca_path)
    try:
        with pytest.raises(ConnectError):
            await post(client)
    finally:
        await client.aclose()


async def test_aclose_fails_pending_requests(server, ca_path):
    server.default = Reply(200, delay=2.0)
    client = client_for(server, ca_path)
    pending = asyncio.ensure_future(post(client))
    await wait_for(lambda: server.requests)
    await client.aclose()
    with pytest.raises(ConnectionLost):
        await pending


async def test_one_write_per_batch(server, ca_path, monkeypatch):
    """Frames of many streams started in one loop iteration go out in one TLS write."""
    client = client_for(server, ca_path)
    try:
        await post(client)  # connected
        writes: collections.Counter[int] = collections.Counter()
        connection = client._current
        assert connection is not None
        transport = connection._transport
        original = transport.write

        def counting_write(data: bytes) -> None:
            writes[len(data)] += 1
            original(data)

        monkeypatch.setattr(transport, "write", counting_write)
        await asyncio.gather(*(post(client) for _ in range(50)))
    finally:
        await client.aclose()
    # 50 requests (HEADERS + DATA each): one batch for all of them, plus
    # WINDOW_UPDATEs as the answers come back; never one write per frame.
    assert sum(writes.values()) < 10, writes


async def test_silent_server_times_out_the_connect_and_is_retried(tls_ca, ca_path):
    """TLS with ALPN h2 but never a SETTINGS frame: each attempt ends, the next reconnects."""
    ctx = server_context(tls_ca)
    ctx.set_alpn_protocols(["h2"])
    accepted: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await reader.read()  # say nothing

    srv = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=ctx)
    port = srv.sockets[0].getsockname()[1]
    client = H2Client(f"https://127.0.0.1:{port}", ca_path, connect_timeout=0.3)
    try:
        for _ in range(2):
            with pytest.raises(ConnectError, match="no HTTP/2 connection"):
                await post(client, timeout=5)
        assert len(accepted) == 2  # a fresh attempt, not the stuck one
    finally:
        await client.aclose()
        for writer in accepted:
            writer.close()
        srv.close()
        await srv.wait_closed()


class _SilentAfterSettings(asyncio.Protocol):
    """Completes TLS and the SETTINGS exchange, then never says anything again
    (a peer or NAT that silently dropped the connection)."""

    connections = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        type(self).connections += 1
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        self.h2.initiate_connection()
        transport.write(self.h2.data_to_send())  # type: ignore[attr-defined]
        self.transport = transport
        self.acked = False

    def data_received(self, data: bytes) -> None:
        if not self.acked:  # acknowledge the client's SETTINGS once, then go silent
            self.h2.receive_data(data)
            self.transport.write(self.h2.data_to_send())  # type: ignore[attr-defined]
            self.acked = True


async def test_silent_connection_is_dropped_after_an_unanswered_ping(tls_ca, ca_path, monkeypatch):
    monkeypatch.setattr(h2client, "PING_TIMEOUT", 0.3)
    ctx = server_context(tls_ca)
    ctx.set_alpn_protocols(["h2"])
    _SilentAfterSettings.connections = 0
    srv = await asyncio.get_running_loop().create_server(
        _SilentAfterSettings, "127.0.0.1", 0, ssl=ctx
    )
    port = srv.sockets[0].getsockname()[1]
    client = H2Client(f"https://127.0.0.1:{port}", ca_path)
    try:
        with pytest.raises(TimeoutError):
            await post(client, timeout=0.3)
        first = client._current
        await wait_for(lambda: first.closed)  # the PING went unanswered
        with pytest.raises(TimeoutError):
            await post(client, timeout=0.3)
        assert _SilentAfterSettings.connections == 2  # a new connection, not the dead one
    finally:
        await client.aclose()
        srv.close()
        await srv.wait_closed()


async def test_slow_but_alive_connection_is_kept(server, ca_path, monkeypatch):
    monkeypatch.setattr(h2client, "PING_TIMEOUT", 0.3)
    server.default = Reply(200, delay=1.0)
    client = client_for(server, ca_path)
    try:
        with pytest.raises(TimeoutError):
            await post(client, timeout=0.2)
        await asyncio.sleep(0.5)  # the server answered the PING: connection kept
        server.default = Reply(200)
        assert (await post(client)).status == 200
        assert server.connections == 1
    finally:
        await client.aclose()


async def test_exhausted_stream_ids_move_to_a_new_connection(server, ca_path):
    client = client_for(server, ca_path)
    try:
        assert (await post(client)).status == 200
        client._current._h2.highest_outbound_stream_id = 2**31 - 1  # next id would overflow
        assert (await post(client)).status == 200
        assert server.connections == 2
        assert (await post(client)).status == 200
    finally:
        await client.aclose()


class _GrowsWindowBySettings(asyncio.Protocol):
    """Starts with a 10-byte stream window, then raises it with SETTINGS only (no
    WINDOW_UPDATE), as RFC 9113 6.9.2 allows; answers 200 with the body length."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        config = h2.config.H2Configuration(client_side=False)
        self.h2 = h2.connection.H2Connection(config)
        window = h2.settings.SettingCodes.INITIAL_WINDOW_SIZE
        self.h2.local_settings = h2.settings.Settings(client=False, initial_values={window: 10})
        self.h2.initiate_connection()
        transport.write(self.h2.data_to_send())  # type: ignore[attr-defined]
        self.received: dict[int, int] = {}

    def data_received(self, data: bytes) -> None:
        for ev in self.h2.receive_data(data):
            if isinstance(ev, h2.events.RequestReceived):
                self.received[ev.stream_id] = 0
                window = h2.settings.SettingCodes.INITIAL_WINDOW_SIZE
                self.h2.update_settings({window: 65535})
            elif isinstance(ev, h2.events.DataReceived):
                self.received[ev.stream_id] += len(ev.data)
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                body = str(self.received[ev.stream_id]).encode()
                self.h2.send_headers(ev.stream_id, [(":status", "200")])
                self.h2.send_data(ev.stream_id, body, end_stream=True)
        self.transport.write(self.h2.data_to_send())  # type: ignore[attr-defined]


async def test_window_grown_by_settings_unblocks_the_body(tls_ca, ca_path):
    ctx = server_context(tls_ca)
    ctx.set_alpn_protocols(["h2"])
    srv = await asyncio.get_running_loop().create_server(
        _GrowsWindowBySettings, "127.0.0.1", 0, ssl=ctx
    )
    client = H2Client(f"https://127.0.0.1:{srv.sockets[0].getsockname()[1]}", ca_path)
    try:
        response = await post(client, body=b"x" * 1000, timeout=5)
        assert (response.status, response.body) == (200, b"1000")
    finally:
        await client.aclose()
        srv.close()
        await srv.wait_closed()


def _h2_pair(
    max_streams: int | None = None,
    client_class: type[h2.connection.H2Connection] = h2client._DrainingH2Connection,
    server_class: type[h2.connection.H2Connection] = h2.connection.H2Connection,
):
    """A client (default ``_DrainingH2Connection``) and a server (default ``H2Connection``),
    settings exchanged."""
    client = client_class(
        config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    )
    server = server_class(
        config=h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
    )
    if max_streams is not None:
        server.local_settings = h2.settings.Settings(
            client=False,
            initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_streams},
        )
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())  # the server's SETTINGS ACK
    return client, server


REQUEST_HEADERS = [(":method", "GET"), (":scheme", "https"), (":authority", "x"), (":path", "/")]


def _answer_requests(client, server, count: int) -> None:
    for _ in range(count):
        stream_id = client.get_next_available_stream_id()
        client.send_headers(stream_id, REQUEST_HEADERS, end_stream=True)
        server.receive_data(client.data_to_send())
        server.send_headers(stream_id, [(":status", "200")], end_stream=True)
        client.receive_data(server.data_to_send())


async def test_stream_table_stays_bounded_without_a_walk_per_request():
    """The cheap open-stream count still lets h2 drop closed streams now and then."""
    client, server = _h2_pair()
    _answer_requests(client, server, 1000)
    assert len(client.streams) <= h2client.SWEEP_BATCH + 1
    assert h2.connection.H2Connection.open_outbound_streams.fget(client) == 0  # the true count


async def test_the_peers_stream_limit_is_still_enforced_by_h2():
    client, server = _h2_pair(max_streams=100)
    for _ in range(100):
        client.send_headers(client.get_next_available_stream_id(), REQUEST_HEADERS)
    with pytest.raises(h2.exceptions.TooManyStreamsError):
        client.send_headers(client.get_next_available_stream_id(), REQUEST_HEADERS)


def _fake_server_pair(max_streams: int | None = None):
    return _h2_pair(max_streams, h2.connection.H2Connection, h2server._ServerConnection)


async def test_fake_server_stream_table_stays_bounded_without_a_walk_per_request():
    """The fake server's cheap open-stream count, as the client's (above)."""
    client, server = _fake_server_pair()
    _answer_requests(client, server, 1000)
    assert len(server.streams) <= h2server.SWEEP_BATCH + 1
    assert h2.connection.H2Connection.open_inbound_streams.fget(server) == 0  # the true count


async def test_fake_server_still_refuses_streams_past_its_limit():
    client, server = _fake_server_pair(10)
    for _ in range(10):
        client.send_headers(client.get_next_available_stream_id(), REQUEST_HEADERS)
        server.receive_data(client.data_to_send())
    # the client's own check is bypassed, so that the server's is what refuses
    client.remote_settings = h2.settings.Settings(
        client=True, initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100}
    )
    client.send_headers(client.get_next_available_stream_id(), REQUEST_HEADERS)
    with pytest.raises(h2.exceptions.TooManyStreamsError):
        server.receive_data(client.data_to_send())


async def test_deadlines_kept_by_an_established_connection(limited, ca_path):
    """On a connected client a request's deadline is the connection's (one timer), also
    when a shorter timeout follows a longer one; timed-out streams are reset and freed."""
    client = client_for(limited, ca_path)
    try:
        assert (await post(client)).status == 200  # connected: the next ones open at once
        limited.script(*[Reply(200, delay=2.0)] * 3)
        results = await asyncio.gather(
            post(client, timeout=0.5),
            post(client, timeout=0.2),
            post(client, timeout=0.3),
            return_exceptions=True,
        )
        assert all(isinstance(r, TimeoutError) for r in results), results
        responses = await asyncio.gather(*(post(client, timeout=1) for _ in range(3)))
        assert not client._current._deadlines  # nothing left queued once all are answered
    finally:
        await client.aclose()
    assert [r.status for r in responses] == [200] * 3
    assert limited.connections == 1
