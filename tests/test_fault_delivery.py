"""Faults around delivery: kill -9 in a flood, fd exhaustion at start (issue 10, CI fault tests).

Both run the real ``chatmail-metadata`` (:class:`devstack.metadata.MetadataServer`)
against a :class:`devstack.pushsink.PushSink` that records every POST.
"""

from __future__ import annotations

import contextlib
import os
import random
import resource
import socket
import sqlite3
import subprocess
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers_dictwire import session

from chatmaild import dictproto as dp
from devstack.loopback import wait_until
from devstack.metadata import MetadataServer
from devstack.pushsink import PushSink

GUID = "0db9f01b8afe096b1c28000083ecc375"
TOKEN_KEY = f"priv/{GUID}/devicetoken".encode()
MESSAGENEW = f"priv/{GUID}/messagenew".encode()
FAST_RETRIES = {
    "notify_retry_delays": "0.3",
    "notify_max_attempts": "50",
    "notify_deadline": "600",
    "notify_timeout": "5",
}
SEED = 1010  # the flood's choice of users; fixed, so a failure replays the same run


@pytest.fixture
def metadata(tmp_path: Path, sink: PushSink):
    server = MetadataServer(tmp_path, tmp_path / "metadata.socket", sink.url)
    server.log_level = "INFO"
    server.metadata = dict(FAST_RETRIES)
    yield server
    server.stop()


def register(server: MetadataServer, tokens: dict[str, list[str]]) -> None:
    """Store each user's tokens through the dict, one transaction per token."""
    for user, toks in tokens.items():
        lines: list[bytes] = []
        for i, tok in enumerate(toks, 1):
            t = str(i).encode()
            lines += [
                b"B" + t + b"\t" + user.encode(),
                b"S" + t + b"\t" + TOKEN_KEY + b"\t" + tok.encode(),
                b"C" + t,
            ]
        assert session(server.socket_path, "metadata", lines) == [
            b"O%d" % i for i in range(1, len(toks) + 1)
        ]


def messagenew(user: str, txid: int = 1) -> list[bytes]:
    t = str(txid).encode()
    return [b"B" + t + b"\t" + user.encode(), b"S" + t + b"\t" + MESSAGENEW + b"\t", b"C" + t]


def jobs(db: Path) -> list[tuple[str, str, int]]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return conn.execute("SELECT user, token, attempts FROM jobs").fetchall()


@dataclass
class Sent:
    user: str
    at: float  # when the C line went out (before the commit, so before its job's POST)
    acked: bool = False


class Flood:
    """Threads delivering ``messagenew`` for random users, one lmtp connection each,
    recording when each C was sent and whether it was answered ``O``."""

    def __init__(self, socket_path: Path, users: list[str], connections: int) -> None:
        self.socket_path = socket_path
        self.users = users
        self.sent: list[Sent] = []
        self._lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._deliver, args=(random.Random(SEED + i),), daemon=True)
            for i in range(connections)
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def acked(self) -> int:
        with self._lock:
            return sum(s.acked for s in self.sent)

    def join(self) -> None:
        for t in self.threads:
            t.join(15)
            assert not t.is_alive()

    def _deliver(self, rng: random.Random) -> None:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(self.socket_path))
            sock.sendall(dp.DOVECOT_2_3.hello_line("lmtp"))
            buf = b""
            txid = 0
            while True:
                txid += 1
                sent = Sent(rng.choice(self.users), time.time())
                with self._lock:
                    self.sent.append(sent)
                try:
                    sock.sendall(b"".join(li + b"\n" for li in messagenew(sent.user, txid)))
                    while b"\n" not in buf:
                        chunk = sock.recv(4096)
                        if not chunk:
                            return  # killed
                        buf += chunk
                except OSError:
                    return
                reply, buf = buf.split(b"\n", 1)
                assert reply == b"O%d" % txid, reply
                sent.acked = True


def test_kill9_in_a_delivery_flood_loses_no_acknowledged_wakeup(
    metadata: MetadataServer, sink: PushSink
) -> None:
    tokens = {f"u{u}@example.org": [f"tok-{u}-{t}" for t in range(2)] for u in range(12)}
    owner = {tok: user for user, toks in tokens.items() for tok in toks}
    sink.delay = 0.05  # slower than the flood: fresh and in-flight jobs when the kill comes
    metadata.start()
    register(metadata, tokens)

    flood = Flood(metadata.socket_path, list(tokens), connections=8)
    flood.start()
    wait_until(lambda: flood.acked() >= 400, 30, "400 acknowledged messagenew")
    metadata.kill()
    flood.join()
    # Coalescing (jobstore.py): at most one never-attempted job per (user, token).
    fresh = defaultdict(int)
    for user, tok, attempts in jobs(metadata.db_path):
        assert owner[tok] == user
        fresh[(user, tok)] += attempts == 0
    assert max(fresh.values(), default=0) <= 1

    metadata.start()
    wait_until(lambda: not jobs(metadata.db_path), 30, "every job sent after the restart")

    last_ack: dict[str, float] = {}
    for s in flood.sent:
        if s.acked:
            last_ack[s.user] = max(last_ack.get(s.user, 0.0), s.at)
    assert len(last_ack) == len(tokens)  # every user got acknowledged mail
    posts = defaultdict(list)
    for r in sink.requests:
        if len(r.body) == int(r.headers["Content-Length"]):  # not cut short by the kill
            posts[r.body.decode()].append(r.arrived)
    assert set(posts) <= set(owner)
    # The job that was fresh when the last acknowledged commit went in was claimed after
    # it, so each of the user's tokens has a POST later than that C line.
    for user, at in last_ack.items():
        for tok in tokens[user]:
            assert any(p > at for p in posts[tok]), (user, tok)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fixed_limit(limit: int):
    """preexec_fn: soft = hard = ``limit`` (the program raises soft to hard at start)."""

    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    return lower


def test_pushes_resume_once_descriptors_are_free_without_restart(
    metadata: MetadataServer, sink: PushSink
) -> None:
    """Dict connections hold every descriptor the process may have (a fixed soft = hard
    limit), so the worker's first POST cannot open a socket; the job is retried, and
    once the connections close it goes out from the same process."""
    limit = 64
    metadata.metadata = {**FAST_RETRIES, "notify_workers": "1"}
    metadata.preexec_fn = fixed_limit(limit)
    metadata.start()
    assert metadata.proc is not None
    pid = metadata.proc.pid
    register(metadata, {"alice@example.org": ["tok-a"]})  # no push yet: no socket opened

    held: list[socket.socket] = []
    try:
        while (count := open_fds(pid)) < limit:
            assert len(held) < limit, "the server's descriptor count does not grow"
            conn = socket.socket(socket.AF_UNIX)
            conn.settimeout(10)
            conn.connect(str(metadata.socket_path))
            conn.sendall(dp.DOVECOT_2_3.hello_line("lmtp"))
            held.append(conn)
            with contextlib.suppress(TimeoutError):
                wait_until(lambda c=count: open_fds(pid) > c, 0.5, "the accept")
        # held[0] was accepted long ago: deliver on it while the process is at its limit
        held[0].sendall(b"".join(li + b"\n" for li in messagenew("alice@example.org")))
        assert held[0].recv(100) == b"O1\n"
        wait_until(lambda: any(a >= 2 for *_, a in jobs(metadata.db_path)), 10, "failed tries")
        assert not sink.requests
    finally:
        for conn in held:
            conn.close()
    sink.wait_for_body(b"tok-a", timeout=10)
    assert metadata.proc.pid == pid and metadata.running  # no restart
    wait_until(lambda: not jobs(metadata.db_path), 5, "the job finished")


STARTUP_WORKERS = 12
SPARE_FDS = 4  # beyond what the workers need: the accept guard fills them
WAITING_CLIENTS = 100  # Dovecot reconnecting at once: more than the process can accept
ACTIVATE = 'exec 3<&0 0</dev/null; LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"'


def steady_fds(pid: int, quiet: float = 1.0) -> int:
    """The process's descriptor count once it has not changed for ``quiet`` seconds."""
    count, since = open_fds(pid), time.monotonic()
    while time.monotonic() - since < quiet:
        time.sleep(0.05)
        if (now := open_fds(pid)) != count:
            count, since = now, time.monotonic()
    return count


def test_pushes_resume_after_fd_exhaustion_at_start_up_without_restart(
    metadata: MetadataServer, sink: PushSink
) -> None:
    """As after a restart with Dovecot reconnecting at once: the dict socket (passed in
    by socket activation, fd 3) already has a hundred clients waiting, the first with a
    ``messagenew`` sent, and the accept guard fills every descriptor left while the
    twelve workers open their job stores.

    Which gets there first is up to the scheduler (the workers usually do), so the
    deterministic lever is the push itself: at the limit its first connect has no
    descriptor either.  Either a worker cannot open or the push fails; once the
    clients close, the push goes out from the same process.
    """
    metadata.metadata = {**FAST_RETRIES, "notify_workers": str(STARTUP_WORKERS)}
    metadata.start()  # unlimited: how many descriptors it holds with every worker open
    assert metadata.proc is not None
    register(metadata, {"alice@example.org": ["tok-a"]})
    limit = steady_fds(metadata.proc.pid) + SPARE_FDS
    metadata.stop()
    offset = metadata.log_size()

    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(metadata.socket_path))
    listener.listen(WAITING_CLIENTS * 2)
    waiting: list[socket.socket] = []
    try:
        for _ in range(WAITING_CLIENTS):
            conn = socket.socket(socket.AF_UNIX)
            conn.settimeout(30)
            conn.connect(str(metadata.socket_path))  # completes in the backlog
            waiting.append(conn)
        delivery = waiting[0]  # the first in the backlog: the first accepted
        delivery.sendall(dp.DOVECOT_2_3.hello_line("lmtp"))
        delivery.sendall(b"".join(li + b"\n" for li in messagenew("alice@example.org")))
        with metadata.log_path.open("ab") as log:
            # sh hands the listening socket (its stdin) on as fd 3 and names its own pid,
            # which exec keeps: LISTEN_PID must be the service's pid.
            metadata.proc = subprocess.Popen(
                ["sh", "-c", ACTIVATE, "sh", *metadata.command()],
                stdin=listener.fileno(),
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=fixed_limit(limit),
            )
        pid = metadata.proc.pid
        wait_until(lambda: open_fds(pid) >= limit, 30, "the process at its fd limit")
        metadata.wait_for_log("accepting paused", offset, timeout=30)
        assert delivery.recv(100) == b"O1\n"

        def blocked() -> bool:
            opening_failed = "notifier worker cannot open" in metadata.log_since(offset)
            return opening_failed or any(a >= 2 for *_, a in jobs(metadata.db_path))

        wait_until(blocked, 30, "a worker that cannot open or a push that failed twice")
        assert not sink.requests
    finally:
        listener.close()
        for conn in waiting:
            conn.close()
    sink.wait_for_body(b"tok-a", timeout=30)
    assert metadata.proc.pid == pid and metadata.running  # no restart
    wait_until(lambda: not jobs(metadata.db_path), 10, "the job finished")
    assert "Traceback" not in metadata.log_since(offset)
