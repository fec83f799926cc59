"""Section "dict": dict operations per second over the Unix socket (issue 2).

The server is a real ``chatmail-metadata`` subprocess (notify_url = off).  The
client is one separate asyncio process (``asyncio.Protocol``, one request in
flight per connection, as Dovecot does) driving 1 or 32 connections.  The
baseline is the same client against a trivial asyncio server that answers
``N\\n`` to every line that owes a reply: the floor of a Python socket round trip
on this machine, with 2 cores shared by client and server.

Every ours/echo pair is measured in alternating rounds (:func:`bench.rounds.alternate`:
ours first in one round, the echo first in the next) and shown as the median ratio and
its min..max spread: one echo point measured after all of ours gave ratios from 0.83x
to 2.97x between two runs.  The summary judges the single-connection lookup against
the echo floor (the rule is at :data:`LOOKUP_FLOOR_TARGET`).
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import time
from pathlib import Path

from bench.common import (
    ChildServer,
    DictSocket,
    guid,
    percentile,
    run_child,
    temp_dir,
    tree_cpu_seconds,
)
from bench.rounds import ROUNDS, Ratios, alternate, ratio_figure
from bench.table import Figure, at_least, at_most, print_table, ratio
from devstack.metadata import MetadataServer

USERS = 64
HELLO = b"H3\t2\t0\t\tmetadata\n"
TOKEN = b"openpgp:" + b"A" * 924  # the size of a Delta Chat token


def _user(i: int) -> str:
    return f"user{i}@example.org"


def _key(i: int) -> bytes:
    return f"priv/{guid(i)}/vendor/vendor.bench/k".encode()


def requests(mode: str, conn_no: int) -> list[bytes]:
    """Precomputed requests for one connection; each owes exactly one reply line."""
    out = []
    for j in range(USERS):
        i = (conn_no * 7 + j) % USERS
        user = _user(i).encode()
        if mode == "lookup":
            out.append(b"L" + _key(i) + b"\t" + user + b"\n")
        elif mode == "token":  # what SETMETADATA /private/devicetoken sends on each connect
            tid = str(j + 1).encode()
            out.append(
                b"B" + tid + b"\t" + user + b"\n"
                b"S" + tid + b"\tpriv/" + guid(i).encode() + b"/devicetoken\t" + TOKEN + b"\n"
                b"C" + tid + b"\n"
            )
        else:
            tid = str(j + 1).encode()
            value = b"value-%d-%d" % (conn_no, j)
            out.append(
                b"B" + tid + b"\t" + user + b"\n"
                b"S" + tid + b"\t" + _key(i) + b"\t" + value + b"\n"
                b"C" + tid + b"\n"
            )
    return out


class _ClientConn(asyncio.Protocol):
    def __init__(self, reqs: list[bytes], deadline: float, max_ops: int, done: asyncio.Future):
        self.reqs = reqs
        self.deadline = deadline
        self.max_ops = max_ops
        self.done = done
        self.ops = 0
        self.failures = 0
        self.sent_at = 0.0
        self.latencies: list[float] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def start(self) -> None:
        assert self.transport is not None
        self.sent_at = time.perf_counter()
        self.transport.write(HELLO + self.reqs[0])

    def data_received(self, data: bytes) -> None:
        n = data.count(b"\n")
        if not n:
            return  # a partial reply line: wait for its end
        if data[:1] == b"F":
            self.failures += 1
        self.ops += n
        now = time.perf_counter()
        self.latencies.append(now - self.sent_at)
        if self.ops >= self.max_ops or now >= self.deadline:
            if not self.done.done():
                self.done.set_result(None)
            return
        assert self.transport is not None
        self.sent_at = now
        self.transport.write(self.reqs[self.ops % len(self.reqs)])

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


def _blocking_client(path: str, mode: str, seconds: float, max_ops: int) -> dict:
    """One connection, one request at a time, as Dovecot does it: a blocking socket is
    the tightest Python loop for that (Dovecot's own client is C, faster still), so
    it measures the server rather than an event loop in the client."""
    reqs = requests(mode, 0)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.sendall(HELLO)
    ops = failures = 0
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    deadline = t0 + seconds
    send, recv = sock.sendall, sock.recv
    n_reqs = len(reqs)
    while ops < max_ops:
        send(reqs[ops % n_reqs])
        data = recv(65536)
        while not data.endswith(b"\n"):
            data += recv(65536)
        if data[:1] == b"F":
            failures += 1
        ops += 1
        if not ops % 256 and time.perf_counter() >= deadline:
            break
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    sock.close()
    return {"ops": ops, "elapsed": elapsed, "client_cpu": cpu, "failures": failures}


def dict_client(path: str, conns: int, mode: str, seconds: float, max_ops: int) -> dict:
    """Child process: drive ``conns`` connections; ops/s over the slowest connection."""
    if conns == 1:
        return _blocking_client(path, mode, seconds, max_ops)

    async def main() -> dict:
        loop = asyncio.get_running_loop()
        protos: list[_ClientConn] = []
        per_conn = max(1, max_ops // conns)
        for c in range(conns):
            done = loop.create_future()
            proto = _ClientConn(requests(mode, c), 0.0, per_conn, done)
            await loop.create_unix_connection(lambda p=proto: p, path)
            protos.append(proto)
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        for p in protos:
            p.deadline = t0 + seconds
            p.start()
        await asyncio.wait_for(asyncio.gather(*(p.done for p in protos)), seconds + 30)
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        for p in protos:
            assert p.transport is not None
            p.transport.close()
        ops = sum(p.ops for p in protos)
        lat = [x for p in protos for x in p.latencies]
        p99 = percentile(lat, 99)
        return {
            "p99_ms": None if p99 is None else 1000 * p99,
            "ops": ops,
            "elapsed": elapsed,
            "client_cpu": cpu,
            "failures": sum(p.failures for p in protos),
        }

    return asyncio.run(main())


def echo_server(ready, stop, path: str) -> None:
    """Child process: answers ``N`` to each line that owes a reply (L, I, C)."""

    class Echo(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.buf = b""

        def data_received(self, data: bytes) -> None:
            lines = (self.buf + data).split(b"\n")
            self.buf = lines.pop()
            n = sum(1 for line in lines if line[:1] in (b"L", b"I", b"C"))
            if n:
                self.transport.write(b"N\n" * n)  # type: ignore[attr-defined]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(Echo, path, backlog=4096)
        ready.send(path)
        while not stop.is_set():
            await asyncio.sleep(0.05)
        server.close()

    asyncio.run(main())


def _measure(path: Path, pid: int, conns: int, mode: str, seconds: float, max_ops: int) -> dict:
    cpu0 = tree_cpu_seconds(pid)
    result = run_child(dict_client, str(path), conns, mode, seconds, max_ops)
    result["server_cpu"] = tree_cpu_seconds(pid) - cpu0
    result["rate"] = result["ops"] / result["elapsed"]
    return result


# The main table's pairs: (mode, connections, synchronous).  FULL also survives power
# loss (fsync per commit); NORMAL (the default) survives a killed process.
PAIRS = [
    ("lookup", 1, "NORMAL"),
    ("lookup", 32, "NORMAL"),
    ("transaction", 1, "NORMAL"),
    ("transaction", 32, "NORMAL"),
    ("transaction", 1, "FULL"),
    ("transaction", 32, "FULL"),
]

# What "single-connection lookups at the echo floor" is judged by.  With one connection
# and one request in flight, a lookup's round trip is the echo's round trip plus the
# server's own work (parse, one SQLite point query, format), so it cannot beat an echo
# that does no work: 1.0x is the floor itself, not a reachable target.  "At the floor"
# means that work is small next to the socket round trip both pay: the lookup's round
# trip at most a quarter longer than the echo's, i.e. >= 0.8x of the echo's rate,
# judged by the median ratio of the alternating rounds: measured once, after all of
# ours, the echo gave this table ratios from 0.83x to 2.97x between two runs, and the
# single-connection echo alone is bimodal here (about 28,000 or 50,000/s, round to round).
LOOKUP_FLOOR_TARGET = 0.8


class _Side:
    """One side of a pair: each call measures a point, returns its rate, keeps the rest."""

    def __init__(self, path: Path, pid: int, conns: int, mode: str, seconds: float, max_ops: int):
        self.args = (path, pid, conns, mode, seconds, max_ops)
        self.points: list[dict] = []

    def __call__(self) -> float:
        self.points.append(_measure(*self.args))
        return self.points[-1]["rate"]

    def median(self, key: str) -> float:
        return statistics.median(p[key] for p in self.points)

    def cpu_share(self, key: str) -> str:
        return f"{100 * statistics.median(p[key] / p['elapsed'] for p in self.points):.0f}%"


def _label(mode: str, synchronous: str) -> str:
    if mode == "lookup":
        return "lookups (L)"
    if synchronous == "FULL":
        return "transactions, synchronous=FULL"
    return "transactions (B/S/C)"


def run(quick: bool) -> list[Figure]:
    seconds = 1.5 if quick else 4.0
    max_ops = 200_000 if quick else 1_000_000
    rounds = int(os.environ.get("CHATMAIL_BENCH_ROUNDS", ROUNDS))
    rows = []
    pairs: dict[tuple[str, int, str], Ratios] = {}
    with temp_dir("dict") as run_dir:
        servers = {s: _started(run_dir / s.lower(), s) for s in ("NORMAL", "FULL")}
        try:
            setup = DictSocket(servers["NORMAL"].socket_path)
            for i in range(USERS):  # so that lookups find a value
                reply = setup.commit(_user(i), b"S" + _key(i) + b"\tinitial")
                assert reply.startswith(b"O"), reply
            setup.close()
            echo_path = run_dir / "echo.socket"
            with ChildServer(echo_server, str(echo_path)) as echo:
                for mode, conns, synchronous in PAIRS:
                    server = servers[synchronous]
                    assert server.proc is not None
                    print(f"{_label(mode, synchronous)}, {conns} conns, ours vs echo:", flush=True)
                    ours = _Side(server.socket_path, server.proc.pid, conns, mode, seconds, max_ops)
                    base = _Side(echo_path, echo.pid, conns, mode, seconds, max_ops)
                    pair = pairs[(mode, conns, synchronous)] = alternate(ours, base, rounds)
                    rows.append(
                        [
                            _label(mode, synchronous),
                            conns,
                            ours.median("rate"),
                            base.median("rate"),
                            f"{pair.median:.2f}x",
                            pair.spread(),
                            ours.cpu_share("server_cpu"),
                            ours.cpu_share("client_cpu"),
                            base.cpu_share("client_cpu"),
                            sum(p["failures"] for p in ours.points),
                        ]
                    )
        finally:
            for server in servers.values():
                server.stop()
    print_table(
        "dict: operations/s over the Unix socket (chatmail-metadata, notify off) "
        f"vs. trivial asyncio echo server; medians of {rounds} alternating rounds of "
        f"{seconds:g} s per side",
        [
            "operation",
            "conns",
            "ours ops/s",
            "echo ops/s",
            "ours/echo",
            "spread",
            "server CPU",
            "client CPU",
            "client CPU (echo)",
            "F replies",
        ],
        rows,
    )
    lookups = pairs[("lookup", 1, "NORMAL")]
    print("dict lookups, 1 connection, ours/echo by round: " + lookups.shown())
    figures = [
        ratio_figure("dict lookups, 1 connection, vs echo floor", lookups, LOOKUP_FLOOR_TARGET)
    ]
    with temp_dir("dict-token") as run_dir:
        figures += _token_rounds(run_dir, seconds, max_ops)
    return figures


def _started(run_dir: Path, synchronous: str) -> MetadataServer:
    run_dir.mkdir()
    server = MetadataServer(run_dir, run_dir / "metadata.socket", "off")
    server.log_level = "INFO"  # the production default
    server.metadata = {"synchronous": synchronous}
    server.start()
    return server


def _token_rounds(run_dir: Path, seconds: float, max_ops: int) -> list[Figure]:
    """B/S/C device-token refreshes on 32 connections (what every Delta Chat connect costs),
    ``synchronous=NORMAL`` (the default) and ``FULL``, next to the echo floor, in
    alternating rounds (echo first in one, last in the next) so that each ratio compares
    points measured seconds apart."""
    rounds = int(os.environ.get("CHATMAIL_BENCH_ROUNDS", 3))
    servers = {s: _started(run_dir / s.lower(), s) for s in ("NORMAL", "FULL")}
    per: dict[str, list[dict]] = {"NORMAL": [], "FULL": [], "echo": []}
    try:
        echo_path = run_dir / "echo.socket"
        with ChildServer(echo_server, str(echo_path)) as echo:
            sides = {"echo": (echo_path, echo.pid)}
            for name, server in servers.items():
                assert server.proc is not None
                sides[name] = (server.socket_path, server.proc.pid)
            for rnd in range(rounds):
                order = list(sides) if rnd % 2 == 0 else list(reversed(sides))  # alternate
                for name in order:
                    path, pid = sides[name]
                    per[name].append(_measure(path, pid, 32, "token", seconds, max_ops))
    finally:
        for server in servers.values():
            server.stop()
    rows = []
    for name, results in per.items():
        for rnd, r in enumerate(results):
            base = per["echo"][rnd]
            rows.append(
                [
                    rnd + 1,
                    name if name == "echo" else f"ours, synchronous={name}",
                    r["rate"],
                    r["p99_ms"],
                    ratio(r["rate"], base["rate"]),
                    f"{100 * r['server_cpu'] / r['elapsed']:.0f}%",
                    r["failures"],
                ]
            )
    print_table(
        f"dict: B/S/C device-token refresh ({len(TOKEN)}-byte token), 32 connections, "
        f"{rounds} alternating rounds of {seconds:g} s",
        ["round", "server", "ops/s", "p99 ms", "ours/echo", "server CPU", "F replies"],
        rows,
    )
    figures = []
    for name in ("NORMAL", "FULL"):
        rates = [r["rate"] for r in per[name]]
        p99s = [r["p99_ms"] for r in per[name]]
        ratios = [r["rate"] / b["rate"] for r, b in zip(per[name], per["echo"], strict=True)]
        spread = (
            f"rates {min(rates):,.0f}-{max(rates):,.0f}, "
            f"ours/echo {min(ratios):.2f}-{max(ratios):.2f}"
        )
        label = f"dict token refresh/s, 32 conns, synchronous={name} ({spread})"
        figures.append(at_least(label, statistics.median(rates), 15_000, "/s"))
        figures.append(
            at_most(f"dict token refresh p99, synchronous={name}", statistics.median(p99s), 5, "ms")
        )
    return figures
