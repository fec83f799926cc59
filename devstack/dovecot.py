"""One self-contained Dovecot (``dovecot -F``), 2.3 or 2.4, with its own run directory and ports.

The config is the one the project ships in ``dovecot/<version>/``, rendered by
substituting its ``@NAME@`` placeholders (see ``dovecot/README.md``): the test
instance template plus the chatmail snippet, with the shared Lua push script copied
next to them.  Everything lives in the run directory and listens on 127.0.0.1 only.

The host's packaged Dovecot runs directly.  The other major version runs from a
Debian tree (:mod:`devstack.debian_tree`) in its own mount and PID namespace,
chrooted into the tree, with the run directory bind-mounted at the same path inside
it: so every path in the config, and the dict socket chatmail-metadata listens on
(on the host), is the same inside and outside, and nothing the master starts
outlives it (it is PID 1 of its namespace).
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from devstack import debian_tree
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
VERSIONS = ("2.3", "2.4")
SNIPPET_NAME = "90-chatmail-metadata.conf"
LUA_SCRIPT = DOVECOT_DIR / "push_notification.lua"


def snippet_path(version: str) -> Path:
    """The conf.d snippet a relay with Dovecot ``version`` ships."""
    return DOVECOT_DIR / version / "conf.d" / SNIPPET_NAME


def instance_template(version: str) -> Path:
    return DOVECOT_DIR / version / "test-instance.conf.in"


# What the Dovecot log must never contain (a crashed imap/lmtp process).
# Case-sensitive on purpose: the master logs "Killed with signal 15" when we stop it.
LOG_CRASH_RE = re.compile(r"Panic:|Fatal:|killed with signal")

# How Dovecot reaches the attribute dict (the snippet's attribute dict setting):
# "shipped": our dict, one connection per IMAP session (2.3 ``proxy:idle_msecs=60000:``,
# 2.4 ``idle_timeout = 60s``); "per-command": our dict, a new connection per IMAP
# command (Dovecot's default, as upstream chatmail configures it); "file": Dovecot's
# built-in ``file:`` dict, no chatmail-metadata at all (the benchmarks' baseline).
ATTRIBUTE_DICTS = ("shipped", "per-command", "file")
IDLE_OPTION = "idle_msecs=60000:"
PROXY_DICT_RE = re.compile(r"(?m)^(\s*mail_attribute_dict\s*=\s*)proxy:\S+$")
IDLE_TIMEOUT_24_RE = re.compile(r"(?m)^\s*idle_timeout = 60s\n")
# 2.4: the top-level proxy dict block, and protocol lmtp's name override of it.
PROXY_BLOCK_24_RE = re.compile(r"(?ms)^mail_attribute \{\n  dict proxy \{\n.*?^\}\n")
LMTP_NAME_24_RE = re.compile(r"(?ms)^  mail_attribute \{\n    dict proxy \{\n.*?^  \}\n")
FILE_DICT_24 = "mail_attribute {\n  dict file {\n    path = %{home}/dovecot-attributes\n  }\n}\n"


def dovecot_major(version_output: str) -> str:
    """``2.3`` from ``dovecot --version`` output such as ``2.3.19.1 (9b53102964)``."""
    match = re.match(r"\s*(\d+\.\d+)", version_output)
    if not match:
        raise ValueError(f"cannot read a Dovecot version from {version_output!r}")
    return match.group(1)


@dataclass(frozen=True)
class DovecotBuild:
    """Where one Dovecot comes from: the host's binary, or ``dovecot`` inside ``tree``."""

    version: str
    binary: str
    tree: Path | None = None

    def describe(self) -> str:
        where = f"the Debian tree {self.tree}" if self.tree else self.binary
        return f"Dovecot {self.version} ({where})"


def host_build() -> DovecotBuild | None:
    """The host's packaged Dovecot, or None if there is none."""
    binary = find_dovecot()
    if binary is None:
        return None
    out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    try:
        return DovecotBuild(dovecot_major(out), binary)
    except ValueError:
        # A dovecot that cannot say its version will not start either: starting it
        # (with the 2.3 config) shows its own error, which says more than a guess here.
        return DovecotBuild("2.3", binary)


def build_for(version: str, progress: TextIO | None = None) -> DovecotBuild:
    """A Dovecot of major ``version``: the host's if it is that version, else one from
    a Debian tree (built first if missing or stale, with progress on stderr).

    Raises :class:`LookupError` (host has no Dovecot) or
    :class:`devstack.debian_tree.TreeUnavailable`, each with a one-line reason.
    """
    host = host_build()
    if host is None:
        raise LookupError("dovecot binary not found (install dovecot-imapd and dovecot-lmtpd)")
    if host.version == version:
        return host
    root = debian_tree.ensure_tree(debian_tree.release_for(version), progress or sys.stderr)
    return DovecotBuild(version, "dovecot", root)


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


def snippet_for(attribute_dict: str, snippet: str, version: str = "2.3") -> str:
    """The rendered chatmail snippet with its attribute dict as ``attribute_dict`` says."""
    if attribute_dict not in ATTRIBUTE_DICTS:
        raise ValueError(f"attribute_dict must be one of {ATTRIBUTE_DICTS}, not {attribute_dict!r}")
    if attribute_dict == "shipped":
        return snippet
    if version == "2.3":
        edits = {
            "per-command": [(re.compile(re.escape(IDLE_OPTION)), "")],
            "file": [(PROXY_DICT_RE, r"\1file:%h/dovecot-attributes")],
        }
    else:
        edits = {
            "per-command": [(IDLE_TIMEOUT_24_RE, "")],
            # The built-in dict for everything; LMTP's proxy name override goes too.
            "file": [(PROXY_BLOCK_24_RE, FILE_DICT_24), (LMTP_NAME_24_RE, "")],
        }
    for pattern, replacement in edits[attribute_dict]:
        snippet, count = pattern.subn(lambda m, r=replacement: m.expand(r), snippet)
        if not count:
            raise ValueError(f"{snippet_path(version)} no longer matches {pattern.pattern!r}")
    return snippet


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
    ``version`` picks the config in ``dovecot/<version>/``; with ``tree``, ``binary``
    is the path inside that Debian tree and Dovecot runs there (module docstring).
    ``users`` (address -> password) is the passwd file; ``attribute_dict`` is one
    of :data:`ATTRIBUTE_DICTS`.
    """

    @classmethod
    def from_build(cls, run_dir: Path, build: DovecotBuild, **kwargs) -> DovecotInstance:
        return cls(run_dir, build.binary, version=build.version, tree=build.tree, **kwargs)

    def __init__(
        self,
        run_dir: Path,
        binary: str,
        *,
        version: str = "2.3",
        tree: Path | None = None,
        users: dict[str, str] | None = None,
        attribute_dict: str = "shipped",
    ) -> None:
        if version not in VERSIONS:
            raise ValueError(f"Dovecot version must be one of {VERSIONS}, not {version!r}")
        self.run_dir = run_dir
        self.binary = binary
        self.version = version
        self.tree = tree
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
        if self.tree is not None:
            # Names as the tree's Debian dovecot-core package created them.
            internal_user = internal_group = "dovecot"
            login_user = "dovenull"
            mail_uid, mail_gid = "nobody", "nogroup"
        elif self.as_root:
            internal_user = _existing(pwd.getpwnam, "dovecot", "nobody")
            internal_group = _existing(grp.getgrnam, "dovecot", "nogroup")
            login_user = _existing(pwd.getpwnam, "dovenull", "nobody")
            mail_uid, mail_gid = "nobody", "nogroup"
        else:
            internal_user = login_user = pwd.getpwuid(os.getuid()).pw_name
            internal_group = grp.getgrgid(os.getgid()).gr_name
            mail_uid, mail_gid = internal_user, internal_group
        # 2.3's static userdb takes "uid=... gid=..." (empty: keep our own uid).
        userdb_ids = f"uid={mail_uid} gid={mail_gid}" if self.as_root else ""
        return {
            "RUN_DIR": str(self.run_dir),
            "IMAP_PORT": str(self.imap_port),
            "LMTP_PORT": str(self.lmtp_port),
            "INTERNAL_USER": internal_user,
            "INTERNAL_GROUP": internal_group,
            "LOGIN_USER": login_user,
            "USERDB_IDS": userdb_ids,
            "MAIL_UID": mail_uid,
            "MAIL_GID": mail_gid,
            "METADATA_SOCKET": str(self.metadata_socket),
            "LUA_SCRIPT": str(self.lua_script),
        }

    def write_config(self) -> None:
        values = self.placeholder_values()
        conf_d = self.run_dir / "conf.d"
        conf_d.mkdir(exist_ok=True)
        shipped = render(snippet_path(self.version).read_text(), values)
        snippet = snippet_for(self.attribute_dict, shipped, self.version)
        (conf_d / SNIPPET_NAME).write_text(snippet)
        shutil.copyfile(LUA_SCRIPT, self.lua_script)
        template = instance_template(self.version)
        self.config_path.write_text(render(template.read_text(), values))
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
        for path in (self.lua_script, self.run_dir / "passwd", conf_d / SNIPPET_NAME):
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
                    self.command(self.binary, "-F", "-c", str(self.config_path)),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                )
            try:
                wait_until(self._ready, START_TIMEOUT, "Dovecot to listen")
                return
            except (TimeoutError, RuntimeError) as exc:
                self.stop()
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
            if self.tree is not None:
                _stop_namespace(self.proc)
            stop_process(self.proc)
            self.proc = None
        self._remove_mount_point()

    def _remove_mount_point(self) -> None:
        """The empty directory in the tree the run directory was mounted on."""
        if self.tree is not None:
            with contextlib.suppress(OSError):
                self._mount_point().rmdir()

    # -- running Dovecot's programs -----------------------------------------
    def _mount_point(self) -> Path:
        assert self.tree is not None
        return self.tree / self.run_dir.relative_to("/")

    def command(self, program: str, *args: str) -> list[str]:
        """The command line that runs ``program`` (dovecot, doveconf, doveadm) of this
        instance's Dovecot: directly, or in a new mount and PID namespace chrooted into
        the tree, with ``/proc`` and the run directory mounted there."""
        if self.tree is None:
            return [program, *args]
        self._mount_point().mkdir(parents=True, exist_ok=True)
        script = (
            'mount -t proc proc "$1/proc" && mount --bind "$2" "$1$2" && '
            'root=$1 && shift 2 && exec chroot "$root" "$@"'
        )
        return [
            *("unshare", "--mount", "--pid", "--fork", "--kill-child=SIGTERM"),
            *("sh", "-c", script, "sh", str(self.tree), str(self.run_dir), program, *args),
        ]

    def doveconf(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``doveconf -c <this config> ARGS`` of this instance's Dovecot (after
        :meth:`write_config`); e.g. ``doveconf("-n")`` to validate the config."""
        program = "doveconf" if self.tree else _sibling(self.binary, "doveconf")
        try:
            return subprocess.run(
                self.command(program, "-c", str(self.config_path), *args),
                capture_output=True,
                text=True,
                timeout=60,
            )
        finally:
            if self.proc is None:
                self._remove_mount_point()

    @property
    def master_pid(self) -> int | None:
        """The Dovecot master's PID on this machine (SIGTERM stops it): in a tree that
        is ``unshare``'s child, since ``unshare`` itself ignores SIGTERM."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        if self.tree is None:
            return self.proc.pid
        children = _children(self.proc.pid)
        return children[0] if children else None

    # -- log: see LogFile ---------------------------------------------------

    def wait_for_log(self, needle: str, offset: int = 0, timeout: float = 30.0) -> None:
        """Dovecot's log process writes asynchronously: poll for ``needle``."""
        wait_until(lambda: needle in self.log_since(offset), timeout, f"{needle!r} in Dovecot log")

    def crash_lines(self, offset: int = 0) -> list[str]:
        """Log lines since ``offset`` that show a panic, a fatal error or a killed process."""
        return [line for line in self.log_since(offset).splitlines() if LOG_CRASH_RE.search(line)]


def _sibling(binary: str, program: str) -> str:
    """``doveconf`` next to ``dovecot`` (Debian: /usr/sbin/dovecot, /usr/bin/doveconf)."""
    return shutil.which(program) or str(Path(binary).with_name(program))


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def _stop_namespace(unshare: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM the Dovecot master (``unshare``'s child, PID 1 of its namespace) and
    wait for ``unshare`` to exit: the kernel then has killed every process in the
    namespace.  ``unshare`` itself ignores SIGTERM while it waits."""
    if unshare.poll() is not None:
        return
    for pid in _children(unshare.pid):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        unshare.wait(timeout)


def _existing(lookup: Callable[[str], object], name: str, fallback: str) -> str:
    """``name`` if ``lookup`` (``pwd.getpwnam``, ``grp.getgrnam``) knows it, else ``fallback``."""
    try:
        lookup(name)
    except KeyError:
        return fallback
    return name
