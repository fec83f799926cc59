"""A real, self-contained Dovecot 2.3 wired to a real ``chatmail-metadata`` process.

Used by ``conftest.py`` (fixtures ``dovecot_instance`` and ``relay``) and by
``test_dovecot_integration.py``.  Everything runs on 127.0.0.1 in a temporary run
directory, with the config files the project ships in ``dovecot/`` rendered by
substituting their ``@NAME@`` placeholders (see ``dovecot/README.md``).

* :class:`DovecotInstance`: renders the config, starts ``dovecot -F``, stops it,
  and checks its log for ``Panic``/``Fatal``/``killed with signal``.
* :class:`MetadataServer`: ``chatmail-metadata`` as a subprocess (from the same
  virtualenv as the tests) with a generated ``chatmail.ini``; can be stopped,
  started and restarted while Dovecot keeps running.
* :class:`ImapClient` (on :mod:`imaplib`) and :class:`RawImap` (a raw socket, for
  ``{N}`` and ``{N+}`` literals and byte-exact values), :func:`parse_metadata`.
* :func:`deliver`: one LMTP delivery with :mod:`smtplib`.
* :class:`TurnHelper`: a stand-in for the chatmail-turn credential socket.
* the notifier is pointed at a :class:`pushsink.PushSink` on 127.0.0.1, so no test
  ever sends a push anywhere else.
"""

from __future__ import annotations

import contextlib
import grp
import imaplib
import os
import pwd
import re
import shutil
import signal
import smtplib
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pushsink

REPO = Path(__file__).resolve().parent.parent
DOVECOT_DIR = REPO / "dovecot"
SNIPPET = DOVECOT_DIR / "conf.d" / "90-chatmail-metadata.conf"
LUA_SCRIPT = DOVECOT_DIR / "push_notification.lua"
INSTANCE_TEMPLATE = DOVECOT_DIR / "test-instance.conf.in"

HOST = "127.0.0.1"
MAIL_DOMAIN = "example.org"
USERS = {
    "alice@example.org": "alicepass",
    "bob@example.org": "bobpass",
}
# What the Dovecot log must never contain (a crashed imap/lmtp process).
# Case-sensitive on purpose: the master logs "Killed with signal 15" when we stop it.
LOG_CRASH_RE = re.compile(r"Panic:|Fatal:|killed with signal")
START_TIMEOUT = 15.0

imaplib.Commands.setdefault("SETMETADATA", ("AUTH", "SELECTED"))
imaplib.Commands.setdefault("GETMETADATA", ("AUTH", "SELECTED"))


def find_dovecot() -> str | None:
    """Path of the ``dovecot`` binary (``/usr/sbin`` is often not on a user's PATH)."""
    found = shutil.which("dovecot")
    if found:
        return found
    for candidate in ("/usr/sbin/dovecot", "/usr/local/sbin/dovecot"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def render(template: str, values: dict[str, str]) -> str:
    """Replace every ``@NAME@``; a placeholder without a value is an error."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in values:
            raise KeyError(f"no value for placeholder @{name}@")
        return values[name]

    return re.sub(r"@([A-Z][A-Z0-9_]*)@", sub, template)


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that are free right now (another process may still take one)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind((HOST, 0))
            ports.append(s.getsockname()[1])
        return ports


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


def _tcp_listening(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1):
            return True
    except OSError:
        return False


def _unix_listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
        return True


def _stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


# ---------------------------------------------------------------------------
# Dovecot


class LogFile:
    """Reading a process's log file from an offset (tests look at what one step logged)."""

    log_path: Path

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_since(self, offset: int = 0) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(offset)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""


class DovecotInstance(LogFile):
    """One Dovecot master (``dovecot -F``) with its own run directory and ports.

    Started as root, mail processes run as ``nobody``; started as another user,
    every process keeps that user's uid (dovecot/README.md, "non-root").
    """

    def __init__(self, run_dir: Path, binary: str) -> None:
        self.run_dir = run_dir
        self.binary = binary
        self.metadata_socket = run_dir / "metadata.socket"
        self.lua_script = run_dir / "push_notification.lua"
        self.config_path = run_dir / "dovecot.conf"
        self.log_path = run_dir / "dovecot.log"
        self.mail_dir = run_dir / "mail"
        self.imap_port = 0
        self.lmtp_port = 0
        self.start_offset = 0
        self.proc: subprocess.Popen | None = None
        self.as_root = os.geteuid() == 0

    # -- configuration ----------------------------------------------------
    def placeholder_values(self) -> dict[str, str]:
        if self.as_root:
            internal_user = _existing_user("dovecot", "nobody")
            internal_group = _existing_group("dovecot", "nogroup")
            login_user = _existing_user("dovenull", "nobody")
            userdb_ids = "uid=nobody gid=nogroup"
        else:
            internal_user = login_user = pwd.getpwuid(os.getuid()).pw_name
            internal_group = grp.getgrgid(os.getgid()).gr_name
            userdb_ids = ""
        return {
            "RUN_DIR": str(self.run_dir),
            "IMAP_PORT": str(self.imap_port),
            "LMTP_PORT": str(self.lmtp_port),
            "INTERNAL_USER": internal_user,
            "INTERNAL_GROUP": internal_group,
            "LOGIN_USER": login_user,
            "USERDB_IDS": userdb_ids,
            "METADATA_SOCKET": str(self.metadata_socket),
            "LUA_SCRIPT": str(self.lua_script),
        }

    def write_config(self) -> None:
        values = self.placeholder_values()
        conf_d = self.run_dir / "conf.d"
        conf_d.mkdir(exist_ok=True)
        (conf_d / SNIPPET.name).write_text(render(SNIPPET.read_text(), values))
        shutil.copyfile(LUA_SCRIPT, self.lua_script)
        self.config_path.write_text(render(INSTANCE_TEMPLATE.read_text(), values))
        passwd = "".join(f"{user}:{{PLAIN}}{pw}::::::\n" for user, pw in USERS.items())
        (self.run_dir / "passwd").write_text(passwd)
        self.mail_dir.mkdir(exist_ok=True)
        if self.as_root:
            # The mail processes (uid nobody) create the maildirs and reach the
            # dict socket and the Lua script through the run directory.
            nobody = pwd.getpwnam("nobody")
            os.chown(self.mail_dir, nobody.pw_uid, nobody.pw_gid)
        for path in (self.run_dir, conf_d, self.mail_dir):
            path.chmod(0o755)
        for path in (self.lua_script, self.run_dir / "passwd", conf_d / SNIPPET.name):
            path.chmod(0o644)

    # -- life cycle -------------------------------------------------------
    def start(self, attempts: int = 3) -> None:
        """Start on fresh free ports; retries if a port was taken in between."""
        for attempt in range(attempts):
            self.imap_port, self.lmtp_port = free_ports(2)
            self.write_config()
            offset = self.log_size()
            self.start_offset = offset
            self.proc = subprocess.Popen(
                [self.binary, "-F", "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=open(self.run_dir / "dovecot.stderr", "ab"),  # noqa: SIM115
            )
            try:
                wait_until(self._ready, START_TIMEOUT, "Dovecot to listen")
                return
            except (TimeoutError, RuntimeError):
                _stop_process(self.proc)
                text = self.log_since(offset)
                if "Address already in use" in text and attempt + 1 < attempts:
                    continue
                raise RuntimeError(
                    f"Dovecot did not start (config {self.config_path}):\n{text}"
                ) from None

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"dovecot exited with status {self.proc.returncode}")
        # The master logs "starting up" only after it has bound all listeners, so
        # a connect afterwards reaches this instance, not whoever else had the port.
        log = self.log_since(self.start_offset)
        if "Fatal:" in log:
            raise RuntimeError("dovecot logged a fatal error")
        return (
            "starting up" in log
            and _tcp_listening(self.imap_port)
            and _tcp_listening(self.lmtp_port)
        )

    def stop(self) -> None:
        if self.proc is not None:
            _stop_process(self.proc)
            self.proc = None

    # -- log: see LogFile ---------------------------------------------------

    def wait_for_log(self, needle: str, offset: int = 0, timeout: float = 10.0) -> None:
        """Dovecot's log process writes asynchronously: poll for ``needle``."""
        wait_until(lambda: needle in self.log_since(offset), timeout, f"{needle!r} in Dovecot log")

    def crash_lines(self, offset: int = 0) -> list[str]:
        """Log lines since ``offset`` that show a panic, a fatal error or a killed process."""
        return [line for line in self.log_since(offset).splitlines() if LOG_CRASH_RE.search(line)]


def _existing_user(name: str, fallback: str) -> str:
    try:
        pwd.getpwnam(name)
        return name
    except KeyError:
        return fallback


def _existing_group(name: str, fallback: str) -> str:
    try:
        grp.getgrnam(name)
        return name
    except KeyError:
        return fallback


def make_run_dir() -> Path:
    """A fresh directory the mail uid (nobody) can traverse.

    pytest's ``tmp_path`` lives under a 0700 directory, which ``nobody`` cannot
    enter, so the run directory is made with :mod:`tempfile` instead.
    """
    path = Path(tempfile.mkdtemp(prefix="chatmail-dovecot-"))
    path.chmod(0o755)
    return path


# ---------------------------------------------------------------------------
# chatmail-metadata


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
        self.proc: subprocess.Popen | None = None
        self._log_file = None
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

    def fresh(
        self, params: dict[str, str] | None = None, metadata: dict[str, str] | None = None
    ) -> None:
        """Restart with a new, empty database and the given extra ini settings."""
        self.stop()
        self._generation += 1
        self.db_path = self.run_dir / f"metadata-{self._generation}.sqlite3"
        self.params = {k: str(v) for k, v in (params or {}).items()}
        self.metadata = {k: str(v) for k, v in (metadata or {}).items()}
        self.start()

    def start(self) -> None:
        """Start the process and wait until its socket accepts connections."""
        assert self.proc is None, "already running"
        self.mailboxes_dir.mkdir(exist_ok=True)
        self.write_ini()
        offset = self.log_size()
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
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
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"chatmail-metadata exited with status {self.proc.returncode}:\n"
                    + self.log_since(offset)
                )
            return _unix_listening(self.socket_path)

        wait_until(ready, START_TIMEOUT, "chatmail-metadata to listen")

    def stop(self) -> None:
        """SIGTERM and wait; the socket file is gone afterwards (Dovecot gets ENOENT)."""
        if self.proc is not None:
            _stop_process(self.proc)
            self.proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    def restart(
        self, params: dict[str, str] | None = None, metadata: dict[str, str] | None = None
    ) -> None:
        """Stop and start again with the same database (optionally new ini settings)."""
        self.stop()
        if params is not None:
            self.params = {k: str(v) for k, v in params.items()}
        if metadata is not None:
            self.metadata = {k: str(v) for k, v in metadata.items()}
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- log: see LogFile ---------------------------------------------------

    def count_in_log(self, needle: str, offset: int = 0) -> int:
        return self.log_since(offset).count(needle)

    def wait_for_log(self, needle: str, offset: int = 0, count: int = 1, timeout=10.0) -> None:
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


# ---------------------------------------------------------------------------
# Helper servers on loopback


class TurnHelper:
    """Serves one line (``user:pass\\n``) per connection on a Unix socket, like chatmail-turn."""

    def __init__(self, path: Path, line: bytes = b"user:pass\n") -> None:
        self.path = path
        self.line = line
        self.connections = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen(16)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                self.connections += 1
                with contextlib.suppress(OSError):
                    conn.sendall(self.line)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(5)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


# ---------------------------------------------------------------------------
# IMAP


@dataclass(frozen=True)
class Literal:
    """An IMAP literal argument for :meth:`RawImap.command`: ``{N}`` or ``{N+}``."""

    data: bytes
    plus: bool = True


@dataclass
class ImapResponse:
    tag: bytes
    status: str  # OK, NO or BAD
    text: bytes  # the tagged line after the status, without CRLF
    untagged: list[list[bytes]]  # each: [text, literal, text, literal, ..., text]

    @property
    def raw_untagged(self) -> bytes:
        """The untagged responses as they came over the wire (literal markers removed)."""
        return b"\n".join(b"".join(parts) for parts in self.untagged)

    def metadata(self) -> dict[str, bytes | None]:
        """Entries of all ``* METADATA`` responses (entry name -> value, NIL -> None)."""
        result: dict[str, bytes | None] = {}
        for parts in self.untagged:
            if parts[0].startswith(b"METADATA "):
                result.update(parse_metadata([parts[0][len(b"METADATA ") :], *parts[1:]]))
        return result


class RawImap:
    """IMAP over a raw socket: exact bytes, synchronizing and LITERAL+ literals."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.file = self.sock.makefile("rb")
        self._tag = 0
        greeting = self.file.readline()
        if not greeting.startswith(b"* OK"):
            raise RuntimeError(f"unexpected IMAP greeting {greeting!r}")
        self.greeting = greeting

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(b"zz LOGOUT\r\n")
        self.file.close()
        self.sock.close()

    def __enter__(self) -> RawImap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def login(self, user: str, password: str) -> ImapResponse:
        resp = self.command(f"LOGIN {_quote(user)} {_quote(password)}")
        if resp.status != "OK":
            raise RuntimeError(f"LOGIN failed: {resp.text!r}")
        return resp

    def command(self, *parts: bytes | str | Literal) -> ImapResponse:
        """Send ``<tag> `` + the parts concatenated exactly as given; read to the tagged reply.

        A :class:`Literal` is sent as ``{N+}`` (or ``{N}``, waiting for the ``+``
        continuation) followed by its bytes, e.g.
        ``command("SETMETADATA INBOX (/private/x ", Literal(value), ")")``.
        """
        self._tag += 1
        tag = b"r%d" % self._tag
        pending = tag + b" "
        for part in parts:
            if isinstance(part, Literal):
                marker = b"{%d%s}" % (len(part.data), b"+" if part.plus else b"")
                self.sock.sendall(pending + marker + b"\r\n")
                if not part.plus:
                    cont = self._readline()
                    if not cont.startswith(b"+"):
                        return self._read_until(tag, first=cont)
                pending = part.data
            else:
                pending += part.encode() if isinstance(part, str) else part
        self.sock.sendall(pending + b"\r\n")
        return self._read_until(tag)

    def _read_until(self, tag: bytes, first: bytes | None = None) -> ImapResponse:
        untagged: list[list[bytes]] = []
        line = first
        while True:
            if line is None:
                line = self._readline()
            if line.startswith(tag + b" "):
                rest = line[len(tag) + 1 :].rstrip(b"\r\n")
                status, _, text = rest.partition(b" ")
                return ImapResponse(tag, status.decode(), text, untagged)
            if line.startswith(b"* "):
                untagged.append(self._read_literals(line[2:]))
            line = None

    def _read_literals(self, line: bytes) -> list[bytes]:
        parts: list[bytes] = []
        while True:
            m = re.search(rb"\{(\d+)\}\r\n$", line)
            if not m:
                parts.append(line.rstrip(b"\r\n"))
                return parts
            parts.append(line[: m.start()])
            parts.append(self._readexact(int(m.group(1))))
            line = self._readline()

    def _readline(self) -> bytes:
        line = self.file.readline()
        if not line:
            raise ConnectionError("IMAP server closed the connection")
        return line

    def _readexact(self, n: int) -> bytes:
        data = self.file.read(n)
        if len(data) != n:
            raise ConnectionError("IMAP server closed the connection inside a literal")
        return data


class ImapClient(imaplib.IMAP4):
    """:mod:`imaplib` with SETMETADATA/GETMETADATA helpers (quoted strings only)."""

    def __init__(self, port: int, user: str, password: str, timeout: float = 30.0) -> None:
        super().__init__(HOST, port, timeout=timeout)
        self.login(user, password)

    def setmetadata(self, mailbox: str, entries: dict[str, str | None]) -> tuple[str, list]:
        """``SETMETADATA mailbox (entry value ...)``; None is sent as NIL."""
        body = " ".join(f"{e} {'NIL' if v is None else _quote(v)}" for e, v in entries.items())
        return self._simple_command("SETMETADATA", _quote(mailbox), f"({body})")

    def getmetadata(
        self, mailbox: str, *entries: str, depth: str | None = None
    ) -> tuple[str, dict[str, bytes | None]]:
        """``GETMETADATA [(DEPTH d)] mailbox (entries)`` -> (status, {entry: value})."""
        args = [f"(DEPTH {depth})"] if depth else []
        args += [_quote(mailbox), "(" + " ".join(entries) + ")"]
        typ, data = self._simple_command("GETMETADATA", *args)
        typ, data = self._untagged_response(typ, data, "METADATA")
        result: dict[str, bytes | None] = {}
        for item in _imaplib_responses(data):
            result.update(parse_metadata(item))
        return typ, result


def _imaplib_responses(data: list) -> Iterator[list[bytes]]:
    """imaplib's untagged data -> one [text, literal, ..., text] list per response.

    imaplib stores a response with literals as ``(line-up-to-{N}, literal)``
    tuples followed by the rest of the line as bytes.
    """
    current: list[bytes] = []
    for item in data:
        if isinstance(item, tuple):
            head, literal = item
            current += [re.sub(rb"\{\d+\}$", b"", head), literal]
        elif item is not None:
            current.append(item)
            yield current
            current = []
    if current:
        yield current


def _quote(s: str | bytes) -> str:
    if isinstance(s, bytes):
        s = s.decode()
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


_TOKEN_RE = re.compile(rb'\s*(?:(\()|(\))|"((?:[^"\\]|\\.)*)"|([^\s()"]+))')


def parse_metadata(parts: list[bytes]) -> dict[str, bytes | None]:
    """Parse ``mailbox (entry value entry value ...)`` given as [text, literal, text, ...].

    Values may be literals, quoted strings or NIL (-> None).  Raises ValueError on
    anything else, e.g. an empty ``()``.
    """
    tokens: list[tuple[str, bytes | None]] = []
    for i, part in enumerate(parts):
        if i % 2 == 1:
            tokens.append(("str", part))
            continue
        pos = 0
        while pos < len(part):
            m = _TOKEN_RE.match(part, pos)
            if not m or m.end() == pos:
                if part[pos:].strip():
                    raise ValueError(f"cannot parse {part[pos:]!r}")
                break
            pos = m.end()
            if m.group(1):
                tokens.append(("(", None))
            elif m.group(2):
                tokens.append((")", None))
            elif m.group(3) is not None:
                tokens.append(("str", re.sub(rb"\\(.)", rb"\1", m.group(3))))
            else:
                atom = m.group(4)
                tokens.append(("nil", None) if atom.upper() == b"NIL" else ("atom", atom))
    if len(tokens) < 3 or tokens[1][0] != "(" or tokens[-1][0] != ")":
        raise ValueError(f"not a METADATA response: {tokens!r}")
    body = tokens[2:-1]
    if not body or len(body) % 2:
        raise ValueError(f"bad entry list in METADATA response: {tokens!r}")
    result: dict[str, bytes | None] = {}
    for (kind, entry), (vkind, value) in zip(body[::2], body[1::2], strict=True):
        if kind not in ("atom", "str") or entry is None:
            raise ValueError(f"bad entry name {entry!r}")
        if vkind not in ("str", "nil"):
            raise ValueError(f"bad value for {entry!r}")
        result[entry.decode()] = value
    return result


# ---------------------------------------------------------------------------
# LMTP


def make_message(sender: str, rcpt: str, subject: str = "test", body: str = "hello") -> bytes:
    msgid = f"<{time.monotonic_ns()}@{sender.rpartition('@')[2] or 'localhost'}>"
    return (
        f"From: {sender}\r\nTo: {rcpt}\r\nSubject: {subject}\r\nMessage-ID: {msgid}\r\n"
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
        f"\r\n{body}\r\n"
    ).encode()


def deliver(
    port: int, envelope_from: str, rcpt: str, message: bytes | None = None
) -> tuple[int, bytes]:
    """One LMTP transaction to ``rcpt``; returns the reply to DATA (code, text)."""
    if message is None:
        message = make_message(envelope_from, rcpt)
    with smtplib.LMTP(HOST, port, timeout=30) as lmtp:
        code, resp = lmtp.ehlo("test.localhost")  # sends LHLO
        if code != 250:
            raise RuntimeError(f"LHLO failed: {code} {resp!r}")
        code, resp = lmtp.mail(envelope_from)
        if code != 250:
            return code, resp
        code, resp = lmtp.rcpt(rcpt)
        if code != 250:
            return code, resp
        return lmtp.data(message)


# ---------------------------------------------------------------------------
# What a test gets


class Relay:
    """Dovecot + chatmail-metadata for one test; tracks clients so teardown closes them."""

    def __init__(
        self, dovecot: DovecotInstance, metadata: MetadataServer, push_sink: pushsink.PushSink
    ) -> None:
        self.dovecot = dovecot
        self.metadata = metadata
        self.push_sink = push_sink
        self.users = dict(USERS)
        self._closers: list[Callable[[], object]] = []

    def imap(self, user: str = "alice@example.org") -> ImapClient:
        client = ImapClient(self.dovecot.imap_port, user, self.users[user])
        self._closers.append(lambda: _logout(client))
        return client

    def raw_imap(self, user: str | None = "alice@example.org") -> RawImap:
        """A raw IMAP connection, logged in as ``user`` (None: not logged in)."""
        client = RawImap(self.dovecot.imap_port)
        self._closers.append(client.close)
        if user is not None:
            client.login(user, self.users[user])
        return client

    def deliver(
        self, envelope_from: str, rcpt: str, message: bytes | None = None
    ) -> tuple[int, bytes]:
        return deliver(self.dovecot.lmtp_port, envelope_from, rcpt, message)

    def turn_helper(self, line: bytes = b"user:pass\n") -> TurnHelper:
        path = self.dovecot.run_dir / f"turn-{time.monotonic_ns()}.socket"
        helper = TurnHelper(path, line)
        self._closers.append(helper.close)
        return helper

    def close_clients(self) -> None:
        while self._closers:
            with contextlib.suppress(Exception):
                self._closers.pop()()


def _logout(client: imaplib.IMAP4) -> None:
    try:
        client.logout()
    except Exception:
        with contextlib.suppress(Exception):
            client.shutdown()
