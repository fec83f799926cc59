"""One self-contained Dovecot 2.3 (``dovecot -F``) with its own run directory and ports.

The config is the one the project ships in ``dovecot/``, rendered by substituting
its ``@NAME@`` placeholders (see ``dovecot/README.md``): the test instance template
plus the chatmail snippet, with the Lua push script copied next to them.
Everything lives in the run directory and listens on 127.0.0.1 only.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from devstack.accounts import USERS
from devstack.loopback import free_ports, tcp_listening, wait_until
from devstack.process import (
    START_TIMEOUT,
    LogFile,
    StartError,
    file_size,
    read_from,
    stop_process,
)

REPO = Path(__file__).resolve().parent.parent
DOVECOT_DIR = REPO / "dovecot"
SNIPPET = DOVECOT_DIR / "conf.d" / "90-chatmail-metadata.conf"
LUA_SCRIPT = DOVECOT_DIR / "push_notification.lua"
INSTANCE_TEMPLATE = DOVECOT_DIR / "test-instance.conf.in"

# What the Dovecot log must never contain (a crashed imap/lmtp process).
# Case-sensitive on purpose: the master logs "Killed with signal 15" when we stop it.
LOG_CRASH_RE = re.compile(r"Panic:|Fatal:|killed with signal")

# How Dovecot reaches the attribute dict (``mail_attribute_dict`` in the snippet):
# "shipped": our dict, one connection per IMAP session (``proxy:idle_msecs=60000:``);
# "per-command": our dict, a new connection per IMAP command (Dovecot's default, as
# upstream chatmail configures it); "file": Dovecot's built-in ``file:`` dict, no
# chatmail-metadata at all (the benchmarks' baseline).
ATTRIBUTE_DICTS = ("shipped", "per-command", "file")
IDLE_OPTION = "idle_msecs=60000:"
PROXY_DICT_RE = re.compile(r"(?m)^(\s*mail_attribute_dict\s*=\s*)proxy:\S+$")


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


def snippet_for(attribute_dict: str, snippet: str) -> str:
    """The rendered chatmail snippet with ``mail_attribute_dict`` as ``attribute_dict`` says."""
    if attribute_dict == "shipped":
        return snippet
    if attribute_dict == "per-command":
        if IDLE_OPTION not in snippet:
            raise ValueError(f"{SNIPPET} no longer has {IDLE_OPTION!r}")
        return snippet.replace(IDLE_OPTION, "")
    if attribute_dict == "file":
        text, count = PROXY_DICT_RE.subn(r"\1file:%h/dovecot-attributes", snippet)
        if not count:
            raise ValueError(f"{SNIPPET} has no mail_attribute_dict = proxy:...")
        return text
    raise ValueError(f"attribute_dict must be one of {ATTRIBUTE_DICTS}, not {attribute_dict!r}")


def make_run_dir(prefix: str = "chatmail-dovecot-") -> Path:
    """A fresh directory the mail uid (nobody) can traverse.

    pytest's ``tmp_path`` lives under a 0700 directory, which ``nobody`` cannot
    enter, so the run directory is made with :mod:`tempfile` instead.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


class DovecotInstance(LogFile):
    """One Dovecot master (``dovecot -F``) with its own run directory and ports.

    Started as root, mail processes run as ``nobody``; started as another user,
    every process keeps that user's uid (dovecot/README.md, "non-root").
    ``users`` (address -> password) is the passwd file; ``attribute_dict`` is one
    of :data:`ATTRIBUTE_DICTS`.
    """

    def __init__(
        self,
        run_dir: Path,
        binary: str,
        *,
        users: dict[str, str] | None = None,
        attribute_dict: str = "shipped",
    ) -> None:
        self.run_dir = run_dir
        self.binary = binary
        self.users = dict(USERS if users is None else users)
        self.attribute_dict = attribute_dict
        self.metadata_socket = run_dir / "metadata.socket"
        self.lua_script = run_dir / "push_notification.lua"
        self.config_path = run_dir / "dovecot.conf"
        self.log_path = run_dir / "dovecot.log"
        self.stderr_path = run_dir / "dovecot.stderr"
        self.mail_dir = run_dir / "mail"
        self.imap_port = 0
        self.lmtp_port = 0
        self.start_offset = 0
        self.proc: subprocess.Popen | None = None
        self.as_root = os.geteuid() == 0

    # -- configuration ----------------------------------------------------
    def placeholder_values(self) -> dict[str, str]:
        if self.as_root:
            internal_user = _existing(pwd.getpwnam, "dovecot", "nobody")
            internal_group = _existing(grp.getgrnam, "dovecot", "nogroup")
            login_user = _existing(pwd.getpwnam, "dovenull", "nobody")
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
        snippet = snippet_for(self.attribute_dict, render(SNIPPET.read_text(), values))
        (conf_d / SNIPPET.name).write_text(snippet)
        shutil.copyfile(LUA_SCRIPT, self.lua_script)
        self.config_path.write_text(render(INSTANCE_TEMPLATE.read_text(), values))
        passwd = "".join(f"{user}:{{PLAIN}}{pw}::::::\n" for user, pw in self.users.items())
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
            self.start_offset = self.log_size()
            stderr_offset = file_size(self.stderr_path)
            with self.stderr_path.open("ab") as stderr:
                self.proc = subprocess.Popen(
                    [self.binary, "-F", "-c", str(self.config_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                )
            try:
                wait_until(self._ready, START_TIMEOUT, "Dovecot to listen")
                return
            except (TimeoutError, RuntimeError) as exc:
                stop_process(self.proc)
                output = self._output_since(stderr_offset)
                if "Address already in use" in output and attempt + 1 < attempts:
                    continue
                raise StartError(
                    f"Dovecot did not start (config {self.config_path}): {exc}\n{output}"
                ) from None

    def _output_since(self, stderr_offset: int) -> str:
        """What this start wrote to stderr and to the log, each under its file name.

        Both matter: a fatal error before Dovecot has read its config (a config
        error) goes to stderr only; later ones (a port taken) go to both.
        """
        sections = []
        for path, offset in ((self.stderr_path, stderr_offset), (self.log_path, self.start_offset)):
            text = read_from(path, offset).strip()
            if text:
                sections.append(f"{path}:\n{text}")
        return "\n".join(sections) or f"(nothing in {self.stderr_path} or {self.log_path})"

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
            "starting up" in log and tcp_listening(self.imap_port) and tcp_listening(self.lmtp_port)
        )

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    # -- log: see LogFile ---------------------------------------------------

    def wait_for_log(self, needle: str, offset: int = 0, timeout: float = 10.0) -> None:
        """Dovecot's log process writes asynchronously: poll for ``needle``."""
        wait_until(lambda: needle in self.log_since(offset), timeout, f"{needle!r} in Dovecot log")

    def crash_lines(self, offset: int = 0) -> list[str]:
        """Log lines since ``offset`` that show a panic, a fatal error or a killed process."""
        return [line for line in self.log_since(offset).splitlines() if LOG_CRASH_RE.search(line)]


def _existing(lookup: Callable[[str], object], name: str, fallback: str) -> str:
    """``name`` if ``lookup`` (``pwd.getpwnam``, ``grp.getgrnam``) knows it, else ``fallback``."""
    try:
        lookup(name)
    except KeyError:
        return fallback
    return name
