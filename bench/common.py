"""Shared helpers: paths, child processes, CPU accounting, percentiles."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from devstack.dovecot import make_run_dir

CLK_TCK = os.sysconf("SC_CLK_TCK")
SPAWN = multiprocessing.get_context("spawn")


@contextlib.contextmanager
def temp_dir(prefix: str) -> Iterator[Path]:
    """A directory the Dovecot mail uid (nobody) can traverse; removed afterwards."""
    path = make_run_dir(prefix=f"chatmail-bench-{prefix}-")
    try:
        yield path
    finally:
        if not os.environ.get("CHATMAIL_BENCH_KEEP"):
            shutil.rmtree(path, ignore_errors=True)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (its threads included), from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _tree_pids(pid: int) -> Iterator[int]:
    """``pid`` and all its descendants that are still alive."""
    todo = [pid]
    while todo:
        p = todo.pop()
        yield p
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{p}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and all its descendants that are still alive."""
    return sum(cpu_seconds(p) for p in _tree_pids(pid))


def tree_cpu_by_pid(pid: int) -> dict[int, tuple[str, float]]:
    """pid -> (process name, CPU seconds) for ``pid`` and its live descendants.

    Two snapshots give the CPU per kind of process (:func:`cpu_by_name`), e.g. Dovecot's
    ``imap`` processes apart from its master, auth and login processes.
    """
    out = {}
    for p in _tree_pids(pid):
        with contextlib.suppress(OSError), open(f"/proc/{p}/comm") as f:
            out[p] = (f.read().strip(), cpu_seconds(p))
    return out


def cpu_by_name(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
) -> dict[str, float]:
    """CPU seconds per process name between two :func:`tree_cpu_by_pid` snapshots
    (a process started in between counts whole; one that exited in between is lost)."""
    out: dict[str, float] = {}
    for p, (name, cpu) in after.items():
        out[name] = out.get(name, 0.0) + cpu - (before[p][1] if p in before else 0.0)
    return out


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    idx = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[idx]


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _child(target: Callable[..., Any], args: tuple, conn: Any) -> None:
    try:
        conn.send(("ok", target(*args)))
    except BaseException as exc:  # report, do not hang the parent
        import traceback

        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        conn.close()


def run_child(target: Callable[..., Any], *args: Any, timeout: float = 300.0) -> Any:
    """Run ``target(*args)`` in a fresh (spawned) Python process and return its result."""
    parent, child = SPAWN.Pipe(duplex=False)
    proc = SPAWN.Process(target=_child, args=(target, args, child), daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(timeout):
            raise TimeoutError(f"{target.__name__} did not finish within {timeout} s")
        status, value = parent.recv()
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    if status != "ok":
        raise RuntimeError(f"child {target.__name__} failed: {value}")
    return value


class ChildServer:
    """A server in a spawned process: ``target(ready_conn, stop_event, *args)`` sends
    its address through ``ready_conn`` once listening and returns when stopped."""

    def __init__(self, target: Callable[..., Any], *args: Any) -> None:
        self._parent, child = SPAWN.Pipe(duplex=False)
        self._stop = SPAWN.Event()
        self.proc = SPAWN.Process(target=target, args=(child, self._stop, *args), daemon=True)
        self.proc.start()
        child.close()
        if not self._parent.poll(60):
            self.close()
            raise TimeoutError(f"{target.__name__} did not start")
        self.info = self._parent.recv()

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return self.proc.pid

    def close(self) -> None:
        self._stop.set()
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)

    def __enter__(self) -> ChildServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_unix(path: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(path))
                return
            except OSError:
                time.sleep(0.01)
    raise TimeoutError(f"nothing listens on {path}")


class DictSocket:
    """A blocking dict-protocol client (one request at a time), for setup and pacing."""

    def __init__(self, path: Path, dict_name: str = "metadata") -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")
        self.sock.sendall(b"H3\t2\t0\t\t" + dict_name.encode() + b"\n")
        self._tx = 0

    def request(self, data: bytes) -> bytes:
        self.sock.sendall(data)
        return self.file.readline()

    def commit(self, user: str, *ops: bytes) -> bytes:
        """One transaction: ``ops`` are ``S``/``U`` bodies after the id (``key\\tvalue``)."""
        self._tx += 1
        tid = str(self._tx).encode()
        lines = [b"B" + tid + b"\t" + user.encode()]
        lines += [op[:1] + tid + b"\t" + op[1:] for op in ops]
        lines.append(b"C" + tid)
        return self.request(b"\n".join(lines) + b"\n")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def guid(i: int) -> str:
    return f"{i:032x}"
