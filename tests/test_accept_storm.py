"""The accept loop at the fd limit (issue 10, finding 3): one warning per episode, no storm.

``chatmail-metadata`` runs with a low RLIMIT_NOFILE (soft and hard, so it cannot raise
it); the test opens connections that it holds until the server runs out of descriptors,
keeps the server at the limit for a while, releases them and asks a fresh lookup.
"""

from __future__ import annotations

import contextlib
import resource
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from helpers_chatmaild import write_ini

from devstack.loopback import free_port, hold_connections

REPO = Path(__file__).resolve().parent.parent
FD_LIMIT = 64
HOLD = FD_LIMIT + 40  # more than the server can take: some stay in its backlog
AT_LIMIT_SECONDS = 3.0
ANSWER_TIMEOUT = 30.0  # generous: the machine is shared


def _limit_both():
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


def _wait_for_socket(path: Path, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "chatmail-metadata exited"
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
            probe.connect(str(path))
            return
        time.sleep(0.05)
    raise TimeoutError("chatmail-metadata did not listen")


def _wait_for_log(path: Path, needle: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while needle not in path.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"{needle!r} not logged"
        time.sleep(0.1)


def _lookup(path: Path, timeout: float) -> bytes:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(b"H3\t2\t0\talice@example.org\tx\nLpriv/x/y\talice@example.org\n")
        return sock.recv(4096)


def test_the_dict_server_backs_off_at_the_fd_limit_and_answers_afterwards(tmp_path):
    ini = write_ini(tmp_path, metadata="notify_url = off\n")
    path = tmp_path / "dict.socket"
    log_path = tmp_path / "log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "chatmaild.cli",
                str(path),
                str(ini),
                "--db",
                str(tmp_path / "db.sqlite3"),
            ],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_limit_both,
        )
    try:
        _wait_for_socket(path, proc)
        _hold_then_release(socket.AF_UNIX, str(path), log_path)
        reply = _lookup(path, ANSWER_TIMEOUT)
        assert reply.endswith(b"\n") and reply[:1] in (b"O", b"N")
        _wait_for_log(log_path, "accepting again", ANSWER_TIMEOUT)
    finally:
        proc.terminate()
        proc.wait(30)
    _assert_one_episode(log_path.read_text(errors="replace"))


def test_the_proxy_backs_off_at_the_fd_limit_and_answers_afterwards(tmp_path):
    port, metrics_port = free_port(), free_port()
    log_path = tmp_path / "log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "notifiers.cli",
                "--log-provider",
                "--port",
                str(port),
                "--metrics",
                f"127.0.0.1:{metrics_port}",
            ],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_limit_both,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_for_log(log_path, "metrics on", ANSWER_TIMEOUT)
        _hold_then_release(socket.AF_INET, ("127.0.0.1", port), log_path)
        with urllib.request.urlopen(base + "/", timeout=ANSWER_TIMEOUT) as answer:
            assert answer.status == 200
        _wait_for_log(log_path, "accepting again", ANSWER_TIMEOUT)
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=ANSWER_TIMEOUT) as answer:
            metrics = answer.read().decode()
    finally:
        proc.terminate()
        proc.wait(30)
    _assert_one_episode(log_path.read_text(errors="replace"))
    assert "listener_accept_pauses_total 1.0" in metrics


def _hold_then_release(family: int, address, log_path: Path) -> None:
    """Connect more clients than the server has descriptors for, hold them (for
    AT_LIMIT_SECONDS after the server says it paused accepting), close them."""

    def paused() -> bool:
        return "accepting paused" in log_path.read_text(errors="replace")

    hold_connections(family, address, HOLD, AT_LIMIT_SECONDS, paused, ANSWER_TIMEOUT)


def _assert_one_episode(text: str) -> None:
    assert "Traceback" not in text
    assert text.count("out of system resource") == 0
    assert text.count("accepting paused") == 1, text[-3000:]
    assert text.count("accepting again") == 1, text[-3000:]
