"""kill -9 of the real chatmail-metadata process loses no push job and repeats no attempt."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from devstack.loopback import free_port
from devstack.pushsink import PushSink

GUID = "0db9f01b8afe096b1c28000083ecc375"
BIN = Path(sys.executable).with_name("chatmail-metadata")


def write_ini(tmp: Path, url: str) -> Path:
    ini = tmp / "chatmail.ini"
    ini.write_text(
        "[params]\nmail_domain = example.org\n"
        f"mailboxes_dir = {tmp}\n"
        "[metadata]\n"
        f"notify_url = {url}\n"
        "notify_retry_delays = 0.3\n"
        "notify_max_attempts = 50\n"
        "notify_deadline = 600\n"
        "notify_timeout = 5\n"
    )
    return ini


def start(tmp: Path, ini: Path) -> subprocess.Popen:
    sock = tmp / "metadata.socket"
    log = open(tmp / "metadata.log", "ab")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [str(BIN), str(sock), str(ini), "--delivery-dict", "lmtp", "--log-level", "DEBUG"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(sock))
            return proc
        except OSError:
            time.sleep(0.02)
    proc.kill()
    raise RuntimeError((tmp / "metadata.log").read_text())


def dict_session(tmp: Path, dict_name: str, lines: list[str]) -> bytes:
    """Send lines on one connection and read the replies owed to the C commands."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(tmp / "metadata.socket"))
        s.sendall(f"H3\t2\t0\t\t{dict_name}\n".encode() + "".join(lines).encode())
        expected = sum(1 for line in lines if line.startswith("C"))
        data = b""
        s.settimeout(10)
        while data.count(b"\n") < expected:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def register_and_deliver(tmp: Path, users: list[str], tokens_per_user: int) -> list[str]:
    tokens = []
    for u, user in enumerate(users):
        lines = []
        for t in range(tokens_per_user):
            tok = f"tok-{u}-{t}"
            tokens.append(tok)
            lines += [
                f"B{t + 1}\t{user}\n",
                f"S{t + 1}\tpriv/{GUID}/devicetoken\t{tok}\n",
                f"C{t + 1}\n",
            ]
        assert dict_session(tmp, "metadata", lines).count(b"O") == tokens_per_user
        reply = dict_session(
            tmp, "lmtp", ["B1\t" + user + "\n", f"S1\tpriv/{GUID}/messagenew\t\n", "C1\n"]
        )
        assert reply == b"O1\n"
    return tokens


def jobs(db: Path) -> list[tuple[str, int]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT token, attempts FROM jobs").fetchall()
    finally:
        conn.close()


def wait_until(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


def test_kill9_with_proxy_down_then_every_job_sent_once(tmp_path: Path) -> None:
    port = free_port()
    ini = write_ini(tmp_path, f"http://127.0.0.1:{port}/notify")
    db = tmp_path / "chatmail-metadata.sqlite3"
    proc = start(tmp_path, ini)
    try:
        tokens = register_and_deliver(tmp_path, [f"u{i}@example.org" for i in range(5)], 4)
        # Let a few attempts fail against the closed port, then kill without warning.
        wait_until(lambda: all(a >= 2 for _, a in jobs(db)) and len(jobs(db)) == 20)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    before = dict(jobs(db))
    assert sorted(before) == sorted(tokens)
    assert all(a >= 2 for a in before.values())

    sink = PushSink(port=port)  # the proxy comes back on the configured port
    proc = start(tmp_path, ini)
    try:
        wait_until(lambda: len(jobs(db)) == 0)
        counts = Counter(b.decode() for b in sink.bodies())
        assert sorted(counts) == sorted(tokens)
        assert set(counts.values()) == {1}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        sink.close()


def test_kill9_mid_request_repeats_no_attempt(tmp_path: Path) -> None:
    sink = PushSink(delay=1.0, default_status=500)
    ini = write_ini(tmp_path, sink.url)
    db = tmp_path / "chatmail-metadata.sqlite3"
    proc = start(tmp_path, ini)
    try:
        tokens = register_and_deliver(tmp_path, ["alice@example.org"], 3)
        wait_until(lambda: all(a >= 1 for _, a in jobs(db)))  # all three in flight
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    attempts_at_kill = dict(jobs(db))
    assert sorted(attempts_at_kill) == sorted(tokens)
    # The in-flight requests of the dead process finish at the sink (a fixed 1.2 s for
    # its 1 s delay left a loaded sink recording one late, counted as resumed twice).
    wait_until(sink.idle)
    started = Counter(b.decode() for b in sink.bodies())
    # Every request that reached the sink was counted as an attempt before it was sent.
    for tok in tokens:
        assert started[tok] <= attempts_at_kill[tok]

    sink.default_status = 200
    sink.delay = 0.0
    proc = start(tmp_path, ini)
    try:
        wait_until(lambda: len(jobs(db)) == 0)
        final = Counter(b.decode() for b in sink.bodies())
        for tok in tokens:
            assert final[tok] - started[tok] == 1  # resumed exactly once, then done
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        sink.close()
