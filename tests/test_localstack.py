"""``scripts/run-local`` (``python -m devstack.localstack``) as a new user meets it.

The stack runs as a subprocess, the way run-local starts it; the guide's printed
commands are run from another directory, as a user would paste them.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devstack.dovecot import find_dovecot, make_run_dir
from devstack.loopback import free_port

REPO = Path(__file__).resolve().parent.parent


def localstack(*args: str, env: dict[str, str] | None = None, timeout: float = 60):
    return subprocess.run(
        [sys.executable, "-m", "devstack.localstack", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0]


def processes_mentioning(text: str) -> list[str]:
    """Command lines of the live processes whose arguments contain ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(cmdline)
    return found


# -- the imap helper -------------------------------------------------------------


def test_imap_helper_on_a_stopped_stack_is_one_line():
    port = free_port()
    proc = localstack("imap", str(port), "alice@example.org", "alicepass", "NOOP")
    assert_one_line_error(proc, f"127.0.0.1:{port}")


def test_imap_helper_with_wrong_arguments_is_one_line():
    proc = localstack("imap", "143")
    assert_one_line_error(proc, "PORT USER PASSWORD COMMAND")
    proc = localstack("imap", "not-a-port", "alice@example.org", "alicepass", "NOOP")
    assert_one_line_error(proc, "not-a-port")


@pytest.mark.dovecot
def test_imap_helper_with_a_wrong_password_is_one_line(dovecot_stack):
    dovecot, _ = dovecot_stack
    port = str(dovecot.imap_port)
    proc = localstack("imap", port, "alice@example.org", "wrong", "NOOP")
    assert_one_line_error(proc, "alice@example.org")


# -- starting ------------------------------------------------------------------


def test_failed_start_is_cleaned_up_and_says_why(failing_dovecot, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    path = f"{failing_dovecot.parent}:{os.environ['PATH']}"  # found before the real one
    env = {**os.environ, "PATH": path, "TMPDIR": str(tmp)}
    proc = localstack("--no-follow", env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "Dovecot did not start" in proc.stderr
    assert "stand-in failure" in proc.stderr
    assert list(tmp.iterdir()) == []  # the run directory is gone
    assert processes_mentioning(str(tmp)) == []  # chatmail-metadata was stopped


@pytest.fixture
def local_stack():
    """``localstack --no-follow`` (the stack keeps running); its guide; stopped at the end."""
    if find_dovecot() is None:
        pytest.skip("dovecot binary not found (install dovecot-imapd and dovecot-lmtpd)")
    run_dir = make_run_dir(prefix="chatmail-local-test-")
    proc = localstack("--no-follow", "--run-dir", str(run_dir))
    stop = re.search(r"^stop it with: kill ([\d ]+)$", proc.stdout, re.M)
    pids = [int(pid) for pid in stop.group(1).split()] if stop else []
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        yield proc.stdout
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while processes_mentioning(str(run_dir)) and time.monotonic() < deadline:
            time.sleep(0.1)
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.mark.dovecot
def test_guide_commands_work_from_another_directory(local_stack, tmp_path):
    if not (REPO / ".venv" / "bin" / "python").exists():
        pytest.skip("the guide's imap helper runs the project's .venv (scripts/install-deps)")
    # The guide indents each command by five spaces (and nothing else by exactly five).
    commands = [line[5:] for line in local_stack.splitlines() if re.match(r" {5}\S", line)]
    assert len(commands) >= 6, local_stack
    outputs = []
    for command in commands:
        if command.startswith("swaks") and shutil.which("swaks") is None:
            continue
        result = subprocess.run(
            command, shell=True, executable="/bin/bash", cwd=tmp_path,
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, (command, result.stdout, result.stderr)
        outputs.append(result.stdout)
    assert any("fcm-chat.delta:demo" in out for out in outputs)  # bob's token, read back
    assert any("chatmail_push" in out for out in outputs)  # the metrics command
    assert any(out.strip() == "ok" for out in outputs)  # status --check on the running stack
    assert any("tokens" in out for out in outputs)  # the status summary
