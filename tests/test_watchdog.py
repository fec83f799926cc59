"""systemd's watchdog against the running chatmail-metadata (issue 10): fed while the
service works, STATUS= with the figures, and no pings once the notifier is stuck.

A real NOTIFY_SOCKET (a datagram socket the test binds) and WATCHDOG_USEC; the push
proxy is a TCP socket that listens but never accepts or answers (a blackhole), with a
notify_timeout far beyond the watchdog's bound, so jobs fall due and nothing progresses.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from helpers_chatmaild import ALICE, priv, write_ini

REPO = Path(__file__).resolve().parent.parent
WATCHDOG_USEC = 1_000_000  # pings every 0.5 s; stuck after 1 s without progress
TIMEOUT = 30.0  # generous: the machine is shared


@contextlib.contextmanager
def running(tmp_path: Path, metadata: str):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.socket"))
    notify.settimeout(TIMEOUT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "WATCHDOG_"))}
    env["NOTIFY_SOCKET"] = str(tmp_path / "notify.socket")
    env["WATCHDOG_USEC"] = str(WATCHDOG_USEC)
    ini = write_ini(tmp_path, metadata=metadata)
    path = tmp_path / "dict.socket"
    log = (tmp_path / "log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatmaild.cli", str(path), str(ini)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield path, notify
    finally:
        proc.terminate()
        proc.wait(TIMEOUT)
        log.close()
        notify.close()


def messages(notify: socket.socket, seconds: float) -> list[bytes]:
    """Every datagram that arrives within ``seconds``."""
    got = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        notify.settimeout(left)
        try:
            got.append(notify.recv(4096))
        except TimeoutError:
            break
    return got


def wait_for(notify: socket.socket, predicate) -> bytes:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        message = notify.recv(4096)
        if predicate(message):
            return message
    raise AssertionError("no such notification")


def dict_session(path: Path, *lines: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(str(path))
        sock.sendall(b"H3\t2\t0\t\tmetadata\n" + b"".join(line + b"\n" for line in lines))
        return sock.recv(4096)


def test_a_healthy_service_feeds_the_watchdog_and_reports_its_figures(tmp_path):
    with running(tmp_path, "notify_workers = 3\n") as (_, notify):
        wait_for(notify, lambda m: b"READY=1" in m)
        status = wait_for(notify, lambda m: m.startswith(b"STATUS=3/3 workers"))
        assert status == b"STATUS=3/3 workers, 0 jobs queued, 0 due, 0 overdue"
        assert messages(notify, 3.0).count(b"WATCHDOG=1") >= 2


def test_a_stuck_notifier_stops_feeding_the_watchdog(tmp_path):
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(64)  # completes handshakes in the kernel, never answers
    url = f"http://127.0.0.1:{blackhole.getsockname()[1]}/notify"
    metadata = f"notify_url = {url}\nnotify_workers = 1\nnotify_timeout = 600\n"
    try:
        with running(tmp_path, metadata) as (path, notify):
            wait_for(notify, lambda m: m.startswith(b"STATUS=1/1 workers"))
            user = ALICE.encode()
            for n, token in enumerate((b"tok-one", b"tok-two"), start=1):
                t = str(n).encode()
                reply = dict_session(
                    path,
                    b"B" + t + b"\t" + user,
                    b"S" + t + b"\t" + priv("devicetoken") + b"\t" + token,
                    b"C" + t,
                )
                assert reply.startswith(b"O"), reply
            reply = dict_session(path, b"B9\t" + user, b"S9\t" + priv("messagenew") + b"\t", b"C9")
            assert reply.startswith(b"O"), reply
            # One job hangs in the blackhole, the other waits behind it, due and then overdue.
            stuck = wait_for(notify, lambda m: b"watchdog not fed" in m)
            assert stuck.startswith(b"STATUS=1/1 workers, 1 jobs queued, 1 due, 1 overdue")
            assert b"WATCHDOG=1" not in messages(notify, 3.0)
    finally:
        blackhole.close()
    log = (tmp_path / "log").read_text()
    assert log.count("not feeding the systemd watchdog") == 1
