"""Child processes of the dev stack: stopping them, reading their logs, starting a set.

Dovecot and chatmail-metadata are real subprocesses that write to files in the
run directory; tests look at what one step logged by remembering an offset.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

#: Generous: it only bounds a start that fails, and a fresh CI machine under load (Dovecot
#: 2.4 from its Debian tree, a cold Python import) was seen to need several seconds.
START_TIMEOUT = 60.0


class StartError(RuntimeError):
    """A service of the dev stack did not come up; the message says what it logged."""


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def stop_and_collect(
    proc: subprocess.Popen, timeout: float = 15.0, sig: int = signal.SIGTERM
) -> tuple[int, str]:
    """``sig`` (SIGKILL after ``timeout`` s); the exit status and what it wrote to stderr.

    Tests that start a program with ``stderr=PIPE`` check both: a clean stop is
    status 0, and its log must carry (or must not carry) certain lines.  ``communicate``
    drains the pipe while waiting, so a chatty process cannot block on a full pipe.
    """
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate(timeout=5)
    if isinstance(err, bytes):
        err = err.decode("utf-8", "replace")
    return proc.returncode, err or ""


def file_size(path: Path) -> int:
    """Size of ``path`` (0 if it does not exist yet): an offset for :func:`read_from`."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def read_from(path: Path, offset: int = 0) -> str:
    """What ``path`` holds from byte ``offset`` on ("" if it does not exist)."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


class LogFile:
    """Reading a process's log file from an offset (tests look at what one step logged)."""

    log_path: Path

    def log_size(self) -> int:
        return file_size(self.log_path)

    def log_since(self, offset: int = 0) -> str:
        return read_from(self.log_path, offset)


class Service(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


def start_all(cleanup: contextlib.ExitStack, *services: Service) -> None:
    """Start ``services`` in order, each one's ``stop`` pushed on ``cleanup`` before it starts.

    So closing ``cleanup`` stops them in reverse order, also the one that failed to
    start (``stop`` is safe on a service that did not start: all here are), and
    ``cleanup.pop_all()`` leaves them running.
    """
    for service in services:
        cleanup.callback(service.stop)
        service.start()


@contextlib.contextmanager
def running(*services: Service) -> Iterator[None]:
    """Start ``services`` in order; stop them in reverse order on exit, also if one fails."""
    with contextlib.ExitStack() as cleanup:
        start_all(cleanup, *services)
        yield
