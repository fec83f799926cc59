"""The asyncio dict server over a real Unix socket (server loop in a thread)."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers_chatmaild import ALICE, BOB, SERVER, make_backend, priv, wire
from prometheus_client import generate_latest

from chatmaild import dictproto as dp
from chatmaild.dictserver import DictProtocol, ServerStats, bind_unix_socket, start_dict_server
from chatmaild.relaymetrics import RelayMetrics

HELLO = b"H3\t2\t0\t\tmetadata\n"


class ServerThread:
    def __init__(self, backend, path, mode=0o666, max_line=dp.DEFAULT_MAX_LINE):
        self.backend = backend
        self.path = path
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        sock = bind_unix_socket(path, mode)

        async def main():
            self.server, self.stats = await start_dict_server(backend, sock, max_line)
            self.stop = asyncio.Event()
            self.ready.set()
            await self.stop.wait()
            self.server.close()
            await self.server.wait_closed()

        def run():
            try:
                self.loop.run_until_complete(main())
            except BaseException as exc:  # pragma: no cover - surfaced in the test
                self.error = exc
                self.ready.set()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)
        assert self.error is None

    def call(self, fn):
        """Run ``fn()`` (a coroutine factory) on the server loop."""
        return asyncio.run_coroutine_threadsafe(fn(), self.loop).result(10)

    def close(self):
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def server(tmp_path):
    backend = make_backend(tmp_path, params=f"turn_socket_path = {tmp_path / 'turn.socket'}\n")
    srv = ServerThread(backend, tmp_path / "metadata.socket")
    yield srv
    srv.close()


class Client:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def lines(self, n: int) -> list[bytes]:
        while self.buf.count(b"\n") < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"connection closed, got {self.buf!r}")
            self.buf += chunk
        out = self.buf.split(b"\n")
        result, self.buf = out[:n], b"\n".join(out[n:])
        return result

    def assert_no_pending(self):
        self.sock.settimeout(0.05)
        try:
            data = self.sock.recv(1)
        except TimeoutError:
            data = None
        finally:
            self.sock.settimeout(10)
        assert data is None and self.buf == b""

    def close(self):
        self.sock.close()


def set_cmd(txid: str, key: bytes, value: bytes, user: str = ALICE) -> bytes:
    t = txid.encode()
    return (
        b"B" + t + b"\t" + user.encode() + b"\n"
        b"S" + t + b"\t" + key + b"\t" + dp.tabescape(value) + b"\n"
        b"C" + t + b"\n"
    )


def test_many_short_connections(server):
    c = Client(server.path)
    c.send(HELLO + set_cmd("1", priv("devicetoken"), b"tok"))
    assert c.lines(1) == [b"O1"]
    c.close()

    def one(i: int) -> list[bytes]:
        cl = Client(server.path)
        try:
            user = ALICE if i % 2 == 0 else BOB
            cl.send(HELLO + b"L" + priv("devicetoken") + f"\t{user}\n".encode())
            return cl.lines(1)
        finally:
            cl.close()

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(300)))
    assert results == [[b"Otok"] if i % 2 == 0 else [b"N"] for i in range(300)]
    assert server.stats.connections == 301


def test_closed_connections_leave_no_cyclic_garbage(server):
    """Dovecot 2.3 connects per command: a connection's objects must be freed by reference
    counting when it closes, not left for the cyclic GC (it was ~10 objects each)."""
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for i in range(20):
            cl = Client(server.path)
            cl.send(HELLO + b"L" + priv("devicetoken") + f"\t{ALICE}\n".encode())
            cl.send(set_cmd(str(i + 1), priv("k"), b"v"))
            assert cl.lines(2) == [b"N", f"O{i + 1}".encode()]
            cl.close()
        deadline = time.monotonic() + 10
        while server.stats.open_connections and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.stats.open_connections == 0
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage if isinstance(o, DictProtocol)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left == []


def test_long_lived_connection(server):
    c = Client(server.path)
    c.send(HELLO)
    for i in range(300):
        c.send(set_cmd(str(i + 1), priv(f"k{i % 50}"), b"v%d" % i))
        c.send(b"L" + priv(f"k{i % 50}") + b"\t" + ALICE.encode() + b"\n")
        assert c.lines(2) == [b"O%d" % (i + 1), b"Ov%d" % i]
    c.assert_no_pending()
    c.close()


def test_pipelined_commands_answered_in_order(server):
    c = Client(server.path)
    a = ALICE.encode()
    c.send(
        HELLO
        + wire(
            b"B1\t" + a,
            b"S1\t" + priv("comment") + b"\tpc",
            b"B2\t" + a,
            b"S2\t" + priv("devicetoken") + b"\ttok",
            b"L" + priv("comment") + b"\t" + a,  # not yet committed
            b"C1",
            b"L" + priv("comment") + b"\t" + a,
            b"I9\t0\t" + priv("") + b"\t" + a,
            b"C2",
            b"C9",
            b"L" + SERVER + b"turn\t" + a,  # TURN helper missing: async N
            b"L" + priv("devicetoken") + b"\t" + a,
            b"Xjunk",
            b"L" + SERVER + b"maxsmtprecipients\t" + a,
        )
    )
    assert c.lines(10) == [
        b"N",
        b"O1",
        b"Opc",
        b"O" + priv("comment") + b"\t",
        b"",
        b"O2",
        b"F9\tunknown transaction",
        b"N",
        b"Otok",
        b"O1000",
    ]
    c.assert_no_pending()
    c.close()


def test_slow_turn_keeps_reply_order(server, tmp_path):
    async def start_turn():
        async def handle(reader, writer):
            await asyncio.sleep(0.05)
            writer.write(b"u:p\n")
            await writer.drain()
            writer.close()

        return await asyncio.start_unix_server(handle, path=str(tmp_path / "turn.socket"))

    turn = server.call(start_turn)
    try:
        c = Client(server.path)
        a = ALICE.encode()
        c.send(
            HELLO
            + wire(b"L" + SERVER + b"turn\t" + a)
            + set_cmd("1", priv("x"), b"1")
            + wire(b"L" + SERVER + b"turn\t" + a, b"L" + priv("x") + b"\t" + a)
        )
        assert c.lines(4) == [b"Oexample.org:3478:u:p", b"O1", b"Oexample.org:3478:u:p", b"O1"]
        c.close()
    finally:

        async def stop():
            turn.close()

        server.call(stop)


def test_huge_line_answered_f_without_closing(server):
    c = Client(server.path)
    a = ALICE.encode()
    big = b"L" + priv("x" * (3 << 19)) + b"\t" + a + b"\n"  # 1.5 MiB
    c.send(HELLO + set_cmd("1", priv("k"), b"v") + b"B2\t" + a + b"\n")
    assert c.lines(1) == [b"O1"]
    c.send(big)
    c.send(b"S2\t" + priv("y") + b"\t" + b"z" * (3 << 19) + b"\n")
    c.send(b"L" + priv("k") + b"\t" + a + b"\nC2\n")
    reply = c.lines(3)
    assert reply[0].startswith(b"F") and reply[1] == b"Ov"
    assert reply[2].startswith(b"F2\t")
    c.assert_no_pending()
    c.close()


def test_garbage_and_disconnect_mid_transaction(server):
    c = Client(server.path)
    c.send(HELLO + b"\n\x00\xff\tgarbage\nB1\t" + ALICE.encode() + b"\nS1\t" + priv("a") + b"\tv\n")
    c.close()
    c = Client(server.path)
    c.send(HELLO + b"L" + priv("a") + b"\t" + ALICE.encode() + b"\n")
    assert c.lines(1) == [b"N"]
    c.close()


def test_stale_socket_replaced(tmp_path):
    path = tmp_path / "stale.socket"
    old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old.bind(str(path))
    old.close()  # the file stays behind, nobody listens
    assert stat.S_ISSOCK(path.lstat().st_mode)
    srv = ServerThread(make_backend(tmp_path), path)
    try:
        c = Client(path)
        c.send(HELLO + b"L" + priv("a") + b"\t" + ALICE.encode() + b"\n")
        assert c.lines(1) == [b"N"]
        c.close()
    finally:
        srv.close()


@pytest.mark.parametrize("kind", ["file", "dir", "symlink"])
def test_non_socket_file_refused(tmp_path, kind):
    path = tmp_path / "metadata.socket"
    if kind == "file":
        path.write_text("precious")
    elif kind == "dir":
        path.mkdir()
    else:
        (tmp_path / "target").write_text("precious")
        path.symlink_to(tmp_path / "target")
    with pytest.raises(OSError, match="not a socket"):
        bind_unix_socket(path, 0o666)
    if kind == "file":
        assert path.read_text() == "precious"
    elif kind == "symlink":
        assert (tmp_path / "target").read_text() == "precious" and path.is_symlink()
    else:
        assert path.is_dir()


def test_missing_socket_directory(tmp_path):
    with pytest.raises(OSError, match="does not exist"):
        bind_unix_socket(tmp_path / "nope" / "x.socket", None)


@pytest.mark.parametrize("mode", [0o666, 0o660, 0o600])
def test_socket_mode_applied(tmp_path, mode):
    path = tmp_path / "m.socket"
    sock = bind_unix_socket(path, mode)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == mode
        assert stat.S_ISSOCK(os.stat(path).st_mode)
    finally:
        sock.close()


def test_huge_number_field_answered_f(server):
    c = Client(server.path)
    c.send(HELLO + wire(b"I" + b"1" * 5000 + b"\t0\tpriv/\t" + ALICE.encode()))
    c.send(wire(b"L" + priv("k") + b"\t" + ALICE.encode()))
    reply = c.lines(2)
    assert reply[0].startswith(b"F") and reply[1] == b"N"
    c.close()


# ---------------------------------------------------------------------------
# The adapter alone (no socket): every owed reply goes out through the connection


class FakeTransport:
    def __init__(self):
        self.written = b""

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return False

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass  # writes never block here


def adapter(backend) -> tuple[DictProtocol, FakeTransport]:
    proto = DictProtocol(backend, dp.DEFAULT_MAX_LINE, ServerStats())
    transport = FakeTransport()
    proto.connection_made(transport)
    return proto, transport


def test_backend_exception_ends_in_the_one_failure_owed(tmp_path, caplog):
    backend = make_backend(tmp_path)

    def broken(ev):
        raise RuntimeError("disk on fire")

    backend.lookup = broken
    backend.iterate = broken
    backend.commit = broken
    proto, transport = adapter(backend)
    a = ALICE.encode()
    proto.data_received(
        HELLO + wire(b"L" + priv("k") + b"\t" + a, b"I9\t0\tpriv/\t" + a, b"B1\t" + a, b"C1")
    )
    assert transport.written == (
        b"Finternal error: disk on fire\n"
        b"Finternal error: disk on fire\n"
        b"F1\tinternal error: disk on fire\n"
    )
    assert proto.conn.replies_owed == 0
    assert [r.getMessage() for r in caplog.records] == [
        "error handling Lookup",
        "error handling Iterate",
        "error handling Commit",
    ]


def test_huge_backend_exception_text_is_clipped_in_the_failure(tmp_path, caplog):
    """An exception may quote client bytes (a 1 MiB key): Dovecot gets a short, one-line reason."""
    backend = make_backend(tmp_path)
    huge = "boom\n" + "x" * (1 << 20) + "\tend"

    def broken(ev):
        raise RuntimeError(huge)

    async def broken_later():
        raise RuntimeError(huge)

    backend.lookup = lambda ev: broken_later() if ev.key == b"later" else broken(ev)
    backend.iterate = broken
    backend.commit = broken

    async def main():
        proto, transport = adapter(backend)
        a = ALICE.encode()
        proto.data_received(
            HELLO
            + wire(b"L" + priv("k") + b"\t" + a, b"I9\t0\tpriv/\t" + a, b"B1\t" + a, b"C1")
            + wire(b"Llater\t" + a)
        )
        for _ in range(100):
            if transport.written.count(b"\n") == 4:
                break
            await asyncio.sleep(0.01)
        return proto, transport

    proto, transport = asyncio.run(main())
    lines = transport.written.split(b"\n")
    assert lines[-1] == b"" and len(lines) == 5
    for line in lines[:-1]:
        assert b"internal error: boom\x01nxxx" in line and line.count(b"\t") <= 1  # F<id>\t
        assert len(line) < 400
    assert proto.conn.replies_owed == 0


@pytest.mark.parametrize("wrong", [b"Ov\n", None, dp.COMMITTED, [(b"k", b"v")]])
def test_backend_reply_of_the_wrong_kind_becomes_a_failure(tmp_path, caplog, wrong):
    backend = make_backend(tmp_path)
    backend.lookup = lambda ev: wrong
    proto, transport = adapter(backend)
    proto.data_received(HELLO + wire(b"L" + priv("k") + b"\t" + ALICE.encode()))
    assert transport.written.startswith(b"Finternal error: a Lookup is answered with")
    assert transport.written.count(b"\n") == 1
    assert proto.conn.replies_owed == 0
    assert "backend reply refused" in caplog.text


def test_failed_awaitable_reply_ends_in_a_failure_in_order(tmp_path):
    backend = make_backend(tmp_path)
    real_lookup = backend.lookup

    async def slow_failure():
        await asyncio.sleep(0.01)
        raise OSError("turn helper gone")

    def lookup(ev):
        return slow_failure() if ev.key == b"slow" else real_lookup(ev)

    backend.lookup = lookup

    async def main():
        proto, transport = adapter(backend)
        a = ALICE.encode()
        proto.data_received(HELLO + wire(b"Lslow\t" + a, b"L" + priv("x") + b"\t" + a))
        assert transport.written == b""  # the second waits for the first
        for _ in range(100):
            await asyncio.sleep(0.01)
            if transport.written.count(b"\n") == 2:
                break
        return proto, transport

    proto, transport = asyncio.run(main())
    assert transport.written == b"Finternal error: turn helper gone\nN\n"
    assert proto.conn.replies_owed == 0


def test_protocol_problems_are_logged_by_the_adapter(tmp_path, caplog):
    proto, transport = adapter(make_backend(tmp_path))
    proto.data_received(b"H9\t0\t0\t\tmetadata\nXjunk\nH9\t1\n")
    assert transport.written == b""
    assert "dict protocol error: 'X': unknown command" in caplog.text
    assert caplog.text.count("serving it as Dovecot 2.4") == 1  # once per connection
    assert proto.conn.version is dp.DOVECOT_2_4


def test_dovecot_2_4_over_the_socket_and_connections_by_version(server):
    c = Client(server.path)
    a = ALICE.encode()
    c.send(
        b"H4\t0\t0\t\tmetadata\n"
        + wire(
            b"B1\t" + a + b"\t0",
            b"S1\t" + priv("devicetoken") + b"\ttok24",
            b"C1",
            b"L" + priv("devicetoken") + b"\t" + a,
            b"D2",  # not a 2.4 command: no reply
            b"L" + priv("nothing") + b"\t" + a,
        )
    )
    assert c.lines(3) == [b"O1", b"Otok24", b"N"]
    c.assert_no_pending()
    c.close()
    c = Client(server.path)
    c.send(HELLO + wire(b"L" + priv("devicetoken") + b"\t" + a))
    assert c.lines(1) == [b"Otok24"]
    c.close()
    c = Client(server.path)  # no hello at all: not counted by version
    c.send(wire(b"L" + priv("devicetoken") + b"\t" + a))
    assert c.lines(1) == [b"Otok24"]
    c.close()
    assert server.stats.connections_by_version == {"2.3": 1, "2.4": 1}


def test_connections_by_version_on_the_metrics_registry():
    stats = ServerStats()
    stats.count_version(dp.DOVECOT_2_4)
    stats.count_version(dp.DOVECOT_2_4)
    stats.count_version(dp.DOVECOT_2_3)
    metrics = RelayMetrics()
    metrics.track_dict_server(stats)
    text = generate_latest(metrics.registry).decode()
    assert 'chatmail_dict_connections_by_protocol_total{dovecot="2.3"} 1.0' in text
    assert 'chatmail_dict_connections_by_protocol_total{dovecot="2.4"} 2.0' in text


def test_huge_transaction_id_is_echoed_exactly_but_logged_capped(tmp_path, caplog):
    proto, transport = adapter(make_backend(tmp_path))
    txid = b"7" * (dp.DEFAULT_MAX_LINE - 8)  # as long as a line may be
    proto.data_received(HELLO + wire(b"C" + txid))
    assert transport.written.startswith(b"F" + txid + b"\t")  # Dovecot matches the id
    assert transport.written.count(b"\n") == 1
    assert caplog.records, "the unknown transaction is logged"
    for record in caplog.records:
        assert len(record.getMessage()) < 1000


def test_increment_past_the_int_digit_limit_is_a_clean_refusal(tmp_path, caplog):
    proto, transport = adapter(make_backend(tmp_path))
    a = ALICE.encode()
    key = priv("n")
    proto.data_received(HELLO + set_cmd("1", key, b"9" * 4300) + wire(b"B2\t" + a))
    proto.data_received(wire(b"A2\t" + key + b"\t1", b"C2"))
    assert transport.written.startswith(b"O1\nF2\t")
    assert transport.written.count(b"\n") == 2
    assert "Traceback" not in caplog.text
    assert not any(r.exc_info for r in caplog.records)
