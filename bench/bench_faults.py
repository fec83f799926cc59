"""Section "faults": the figures of issue 10, each next to a baseline from the same run.

- Slow consumer: ``chatmail-metadata``'s resident memory (VmRSS) while one client
  pipelines 1,500 lookups of a 60 KiB value and never reads, against the same
  server's memory idle with the value stored.
- The dict server at the fd limit: ``chatmail-metadata`` under a low RLIMIT_NOFILE
  (soft = hard, so it cannot raise it), clients hold every descriptor for a few
  seconds and close: how long after the release a fresh lookup is answered (against
  the same lookup on the unloaded server), the log lines and bytes written during the
  episode and the server's CPU seconds.
- The proxy (``notifiers`` standalone, log provider) the same way, answering ``GET /``.

Every measurement takes the root of the code to run (``PYTHONPATH`` of the server
only), so the same functions measure an older tree (the figures before the fixes).
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.common import DictSocket, cpu_seconds, guid, temp_dir, wait_unix
from bench.table import Figure, at_most, print_table
from devstack.loopback import HOST, free_port, hold_connections

REPO = Path(__file__).resolve().parent.parent
VALUE_BYTES = 60 * 1024
LOOKUPS = 1500
FD_LIMIT = 64
HOLD = FD_LIMIT + 40  # more than the server has descriptors for: some stay in its backlog
ANSWER_TIMEOUT = 60.0  # generous: before the fixes a lookup waited ~10 s
QUIET_AFTER = 2.5  # the accept guard's "accepting again" comes 2 s after the last failure
USER = "alice@example.org"
KEY = f"priv/{guid(1)}/comment".encode()
MB = 1024 * 1024


def rss_bytes(pid: int) -> int:
    """VmRSS of a running process, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _fixed_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


@contextlib.contextmanager
def _server(
    root: Path, args: list[str], log_path: Path, limited: bool = False
) -> Iterator[subprocess.Popen]:
    """``python -m ARGS`` with ``root`` (only) on its path, output to ``log_path``."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", *args],
            cwd=root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_fixed_limit if limited else None,
        )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextlib.contextmanager
def _metadata(root: Path, workdir: Path, limited: bool = False) -> Iterator[tuple[int, Path]]:
    """``chatmail-metadata`` (notifier off) listening; (pid, socket path)."""
    mailboxes = workdir / "mailboxes"
    mailboxes.mkdir(exist_ok=True)
    ini = workdir / "chatmail.ini"
    ini.write_text(
        f"[params]\nmail_domain = example.org\nmailboxes_dir = {mailboxes}\n"
        f"turn_socket_path = {workdir / 'no-turn.socket'}\n\n[metadata]\nnotify_url = off\n"
    )
    path = workdir / "dict.socket"
    cmd = ["chatmaild.cli", str(path), str(ini), "--db", str(workdir / "db.sqlite3")]
    with _server(root, cmd, workdir / "metadata.log", limited) as proc:
        wait_unix(path, 60)
        yield proc.pid, path


# -- slow consumer ------------------------------------------------------------
def slow_consumer(root: Path, lookups: int = LOOKUPS) -> dict[str, float]:
    """Server RSS idle with a 60 KiB value stored, and its peak while one client
    pipelines ``lookups`` lookups of it and reads nothing (MB)."""
    with temp_dir("faults-slow") as workdir, _metadata(root, workdir) as (pid, path):
        setup = DictSocket(path)
        assert setup.commit(USER, b"S" + KEY + b"\t" + b"v" * VALUE_BYTES) == b"O1\n"
        assert len(setup.request(b"L" + KEY + b"\t" + USER.encode() + b"\n")) > VALUE_BYTES
        setup.close()
        time.sleep(1.0)
        idle = rss_bytes(pid)

        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(path))
        hello = b"H3\t2\t0\t\tmetadata\n"
        lines = hello + (b"L" + KEY + b"\t" + USER.encode() + b"\n") * lookups

        def send() -> None:  # blocks once the server stops reading (backpressure)
            with contextlib.suppress(OSError):
                client.sendall(lines)

        threading.Thread(target=send, daemon=True).start()
        peak = _peak_until_steady(lambda: rss_bytes(pid), steady=2.0, limit=60.0)
        client.close()
    return {"idle_mb": idle / MB, "peak_mb": peak / MB, "growth_mb": (peak - idle) / MB}


def _peak_until_steady(sample: Callable[[], int], steady: float, limit: float) -> int:
    """The largest sample, once the peak has not grown (by 1 MB) for ``steady`` s."""
    peak, since, started = sample(), time.monotonic(), time.monotonic()
    while time.monotonic() - since < steady and time.monotonic() - started < limit:
        time.sleep(0.05)
        now = sample()
        if now > peak + MB:
            since = time.monotonic()
        peak = max(peak, now)
    return peak


# -- at the fd limit ------------------------------------------------------------
@dataclass
class Episode:
    """One episode at the fd limit: held, released, answered again."""

    baseline_s: float  # the fresh request's latency on the unloaded server
    recovery_s: float  # release until the fresh request was answered
    lines: int  # log lines written from the first held connection until quiet again,
    # not counting the access log lines of the bench's own requests
    log_bytes: int  # of those lines
    seconds: float  # the episode's length (held + recovery + quiet)
    cpu_s: float  # the server's CPU seconds in it

    @property
    def lines_per_minute(self) -> float:
        return self.lines * 60 / self.seconds

    @property
    def bytes_per_minute(self) -> float:
        return self.log_bytes * 60 / self.seconds


def _episode(
    pid: int, log_path: Path, request: Callable[[], None], hold: Callable[[], None]
) -> Episode:
    """Baseline latency of ``request``, then ``hold``, then time until ``request`` works."""
    latencies = []
    for _ in range(5):
        t0 = time.perf_counter()
        request()
        latencies.append(time.perf_counter() - t0)
    offset, cpu0, started = log_path.stat().st_size, cpu_seconds(pid), time.monotonic()
    hold()
    released = time.perf_counter()
    deadline = time.monotonic() + ANSWER_TIMEOUT
    while True:
        try:
            request()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    recovery = time.perf_counter() - released
    time.sleep(QUIET_AFTER)
    seconds, cpu = time.monotonic() - started, cpu_seconds(pid) - cpu0
    with log_path.open("rb") as f:
        f.seek(offset)
        written = f.read()
    lines = [li for li in written.split(b"\n") if li and b" aiohttp.access: " not in li]
    size = sum(len(li) + 1 for li in lines)
    return Episode(statistics.median(latencies), recovery, len(lines), size, seconds, cpu)


def _lookup(path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(ANSWER_TIMEOUT)
        sock.connect(str(path))
        sock.sendall(b"H3\t2\t0\t\tmetadata\nL" + KEY + b"\t" + USER.encode() + b"\n")
        reply = sock.recv(4096)
        if not reply.endswith(b"\n"):
            raise OSError(f"no lookup reply: {reply[:40]!r}")


def dict_at_fd_limit(root: Path, hold_seconds: float) -> Episode:
    with temp_dir("faults-fd") as workdir, _metadata(root, workdir, limited=True) as (pid, path):
        return _episode(
            pid,
            workdir / "metadata.log",
            lambda: _lookup(path),
            lambda: hold_connections(socket.AF_UNIX, str(path), HOLD, hold_seconds),
        )


def proxy_at_fd_limit(root: Path, hold_seconds: float) -> Episode:
    port = free_port()
    url = f"http://{HOST}:{port}/"

    def get() -> None:
        with urllib.request.urlopen(url, timeout=ANSWER_TIMEOUT) as answer:
            answer.read()

    with temp_dir("faults-proxy") as workdir:
        log_path = workdir / "proxy.log"
        cmd = ["notifiers.cli", "--log-provider", "--port", str(port)]
        with _server(root, cmd, log_path, limited=True) as proc:
            deadline = time.monotonic() + 60
            while True:
                try:
                    get()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        tail = log_path.read_text(errors="replace")[-2000:]
                        raise RuntimeError(f"the proxy did not answer:\n{tail}") from None
                    time.sleep(0.05)
            return _episode(
                proc.pid,
                log_path,
                get,
                lambda: hold_connections(socket.AF_INET, (HOST, port), HOLD, hold_seconds),
            )


# -- the section ------------------------------------------------------------------
def _episode_row(what: str, e: Episode) -> list[object]:
    return [
        what,
        f"{1000 * e.baseline_s:.1f} ms",
        f"{e.recovery_s:.2f} s",
        e.lines,
        e.lines_per_minute,
        f"{e.bytes_per_minute / 1024:,.1f} KiB",
        f"{e.cpu_s:.2f} s / {e.seconds:.1f} s",
    ]


def run(quick: bool, root: Path = REPO) -> list[Figure]:
    hold_seconds = 2.0 if quick else 5.0
    slow = slow_consumer(root)
    print_table(
        f"faults: one dict client pipelines {LOOKUPS:,} lookups of a 60 KiB value, reads nothing",
        ["what", "server RSS", "vs baseline"],
        [
            ["baseline: idle, value stored", f"{slow['idle_mb']:.1f} MB", ""],
            ["peak with the unread replies", f"{slow['peak_mb']:.1f} MB",
             f"+{slow['growth_mb']:.1f} MB ({slow['peak_mb'] / slow['idle_mb']:.2f}x)"],
        ],
    )  # fmt: skip
    dict_ep = dict_at_fd_limit(root, hold_seconds)
    proxy_ep = proxy_at_fd_limit(root, hold_seconds)
    print_table(
        f"faults: RLIMIT_NOFILE {FD_LIMIT}, {HOLD} clients held {hold_seconds:.0f} s, released",
        ["server", "baseline request", "answered after release", "log lines", "lines/min",
         "log/min", "CPU in episode"],
        [_episode_row("chatmail-metadata (lookup)", dict_ep),
         _episode_row("notifiers proxy (GET /)", proxy_ep)],
    )  # fmt: skip
    return [
        at_most(
            f"slow consumer: RSS growth ({LOOKUPS:,} unread 60 KiB lookups)",
            slow["growth_mb"],
            5,
            "MB",
        ),
        at_most("dict at the fd limit: log lines per episode", dict_ep.lines, 2, "lines"),
        at_most("dict at the fd limit: lookup answered after release", dict_ep.recovery_s, 1, "s"),
        at_most("proxy at the fd limit: log lines per episode", proxy_ep.lines, 2, "lines"),
        at_most("proxy at the fd limit: GET / answered after release", proxy_ep.recovery_s, 1, "s"),
    ]
