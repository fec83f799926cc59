"""``chatmail-metadata`` as a subprocess with a generated ``chatmail.ini``.

It runs from the same virtualenv as the caller (the console script next to
``sys.executable``), so tests, bench/ and run-local exercise the installed entry
point, and it can be stopped, started and restarted while Dovecot keeps running.
"""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from devstack.accounts import MAIL_DOMAIN
from devstack.loopback import unix_listening, wait_until
from devstack.process import START_TIMEOUT, LogFile, StartError, stop_process


class MetadataServer(LogFile):
    """``chatmail-metadata SOCKET INI --db DB --socket-mode 0666 --delivery-dict lmtp``."""

    def __init__(self, run_dir: Path, socket_path: Path, notify_url: str) -> None:
        self.run_dir = run_dir
        self.socket_path = socket_path
        self.notify_url = notify_url
        self.ini_path = run_dir / "chatmail.ini"
        self.mailboxes_dir = run_dir / "mailboxes"
        self.log_path = run_dir / "chatmail-metadata.log"
        self.db_path = run_dir / "metadata.sqlite3"
        self.params: dict[str, str] = {}
        self.metadata: dict[str, str] = {}
        # [notifiers]: options of the embedded push proxy (notify_url = embedded)
        self.notifiers: dict[str, str] = {}
        self.extra_args: list[str] = []
        # Tests watch DEBUG lines ("new mail for ..."); bench/ measures at the default.
        self.log_level = "DEBUG"
        # Run in the child before exec, e.g. to lower RLIMIT_NOFILE (tests of the fd limit).
        self.preexec_fn: Callable[[], None] | None = None
        self.proc: subprocess.Popen | None = None
        self._generation = 0

    @property
    def executable(self) -> str:
        """The console script installed next to the running Python (the project's venv)."""
        script = Path(sys.executable).with_name("chatmail-metadata")
        return str(script) if script.exists() else "chatmail-metadata"

    def write_ini(self) -> None:
        params = {
            "mail_domain": MAIL_DOMAIN,
            "mailboxes_dir": str(self.mailboxes_dir),
            # A socket that does not exist: the TURN helper is "down" unless a test
            # configures one.
            "turn_socket_path": str(self.run_dir / "no-turn-helper.socket"),
            **self.params,
        }
        metadata = {"notify_url": self.notify_url, **self.metadata}
        lines = ["[params]"]
        lines += [f"{k} = {v}" for k, v in params.items()]
        lines += ["", "[metadata]"]
        lines += [f"{k} = {v}" for k, v in metadata.items()]
        if self.notifiers:
            lines += ["", "[notifiers]"]
            lines += [f"{k} = {v}" for k, v in self.notifiers.items()]
        self.ini_path.write_text("\n".join(lines) + "\n")

    def command(self) -> list[str]:
        """The command line :meth:`start` runs."""
        return [
            self.executable,
            str(self.socket_path),
            str(self.ini_path),
            "--db",
            str(self.db_path),
            "--socket-mode",
            "0666",
            "--delivery-dict",
            "lmtp",
            "--log-level",
            self.log_level,
            *self.extra_args,
        ]

    def fresh(
        self,
        params: dict[str, str] | None = None,
        metadata: dict[str, str] | None = None,
        notifiers: dict[str, str] | None = None,
    ) -> None:
        """Restart with a new, empty database and the given extra ini settings (only those)."""
        self.stop()
        self._generation += 1
        self.db_path = self.run_dir / f"metadata-{self._generation}.sqlite3"
        self.restart(params or {}, metadata or {}, notifiers or {})

    def start(self) -> None:
        """Start the process and wait until its socket accepts connections."""
        assert self.proc is None, "already running"
        self.mailboxes_dir.mkdir(exist_ok=True)
        self.write_ini()
        offset = self.log_size()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=self.preexec_fn,
            )

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise StartError(f"chatmail-metadata exited with status {self.proc.returncode}")
            return unix_listening(self.socket_path)

        try:
            wait_until(ready, START_TIMEOUT, "chatmail-metadata to listen")
        except (StartError, TimeoutError) as exc:
            self.stop()
            raise StartError(f"{exc} (log {self.log_path}):\n{self.log_since(offset)}") from None

    def stop(self) -> None:
        """SIGTERM and wait; the socket file is gone afterwards (Dovecot gets ENOENT)."""
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    def kill(self) -> None:
        """SIGKILL without warning (a crash or an OOM kill); the stale socket file stays."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def restart(
        self,
        params: dict[str, str] | None = None,
        metadata: dict[str, str] | None = None,
        notifiers: dict[str, str] | None = None,
    ) -> None:
        """Stop and start again with the same database; a section given replaces the old one."""
        self.stop()
        if params is not None:
            self.params = _strings(params)
        if metadata is not None:
            self.metadata = _strings(metadata)
        if notifiers is not None:
            self.notifiers = _strings(notifiers)
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- log: see LogFile ---------------------------------------------------

    def count_in_log(self, needle: str, offset: int = 0) -> int:
        return self.log_since(offset).count(needle)

    def wait_for_log(self, needle: str, offset: int = 0, count: int = 1, timeout=30.0) -> None:
        wait_until(
            lambda: self.count_in_log(needle, offset) >= count,
            timeout,
            f"{needle!r} in {self.log_path}",
        )

    # -- white-box look at the database (read-only) -----------------------
    def stored_keys(self, user: str) -> list[bytes]:
        """Generic attribute keys stored for ``user`` (the SQLite ``attributes`` table)."""
        uri = f"file:{self.db_path}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
            rows = conn.execute("SELECT key FROM attributes WHERE user=?", (user,)).fetchall()
        return sorted(bytes(k) if not isinstance(k, bytes) else k for (k,) in rows)


def _strings(values: dict[str, object] | None) -> dict[str, str]:
    """Ini values as text (tests pass numbers)."""
    return {k: str(v) for k, v in (values or {}).items()}
