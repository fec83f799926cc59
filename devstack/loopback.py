"""Everything the dev stack runs listens on 127.0.0.1: free ports, listening checks, polling.

Nothing here ever connects anywhere but loopback (and Unix sockets), so no test,
benchmark or local run can reach another machine.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from pathlib import Path

HOST = "127.0.0.1"


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that are free right now (another process may still take one)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind((HOST, 0))
            ports.append(s.getsockname()[1])
        return ports


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (for "proxy is down" tests)."""
    return free_ports(1)[0]


def wait_until(
    predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.02
) -> object:
    """Poll ``predicate`` until it returns something truthy; raise TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def tcp_listening(port: int) -> bool:
    """Whether a TCP connect to 127.0.0.1:``port`` succeeds."""
    try:
        with socket.create_connection((HOST, port), timeout=1):
            return True
    except OSError:
        return False


def unix_listening(path: Path) -> bool:
    """Whether a connect to the Unix socket ``path`` succeeds."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
        return True


def hold_connections(
    family: int,
    address: object,
    count: int,
    seconds: float,
    reached: Callable[[], bool] | None = None,
    timeout: float = 30.0,
) -> None:
    """Connect ``count`` clients to a local server, hold them ``seconds``, close them.

    More clients than the server has descriptors for put it at its fd limit (the
    rest wait in its backlog): the fd-limit tests and the "faults" benchmark.
    ``reached``: the ``seconds`` count from when it first returns true (the server
    says it is at its limit), not from the last connect: a loaded server may take a
    while to accept them all.
    """
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family)
            held.append(sock)
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.connect(address)
        if reached is not None:
            wait_until(reached, timeout, "the server to reach its fd limit")
        time.sleep(seconds)
    finally:
        for sock in held:
            sock.close()
