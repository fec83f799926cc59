"""A Debian tree holding the *other* Dovecot major version, built with debootstrap.

The host runs its packaged Dovecot (2.3 on Debian 12); the tests, bench/ and
run-local also need the other major (2.4 from Debian 13 on such a host, 2.3 from
Debian 12 on a Debian 13 host).  It comes from a minimal Debian tree made with
``debootstrap`` (about 50 s and 300 MB) and is run in its own mount and PID
namespace, chrooted into the tree (:mod:`devstack.dovecot`).

Where: ``$CHATMAIL_DEBIAN_TREES`` (default ``/var/cache/chatmail-push``), one directory
per release, e.g. ``/var/cache/chatmail-push/debian13-dovecot``: outside the clone, so
every worktree and every CI run on the machine shares it.

Stale trees: a finished build writes the stamp file ``<tree>/.chatmail-tree`` holding
:data:`FORMAT_VERSION`, the suite, the mirror and the package list.  A tree whose stamp
is missing (an interrupted build) or differs from what this module would build now is
rebuilt from scratch; a build goes to ``<tree>.building`` and is renamed into place
only when complete, so a half-built tree is never used; ``<tree>.lock`` makes
concurrent builders (other worktrees, CI jobs) wait for one build.

Inside the tree go the host's CA certificates and apt configuration (proxy, mirror
settings) and an apt source for the same mirror the host uses, so ``apt-get`` in the
tree works where it works on the host.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

# Bump when what goes into a tree changes (not the package list: that is in the stamp).
FORMAT_VERSION = 1
CACHE_ENV = "CHATMAIL_DEBIAN_TREES"
DEFAULT_CACHE = Path("/var/cache/chatmail-push")
STAMP_NAME = ".chatmail-tree"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# The push_notification Lua driver and mail_lua are in dovecot-core (both releases).
PACKAGES = ("dovecot-imapd", "dovecot-lmtpd")
PER_PACKAGE_RE = re.compile(r"I: (Retrieving|Validating|Extracting|Unpacking|Configuring) ")
APT_PROXIES = (("Acquire::http::Proxy", "http_proxy"), ("Acquire::https::Proxy", "https_proxy"))


@dataclass(frozen=True)
class Release:
    """A Debian release whose Dovecot the tests can run from a tree."""

    debian: int
    suite: str
    dovecot_major: str

    @property
    def tree_name(self) -> str:
        return f"debian{self.debian}-dovecot"


RELEASES = (Release(12, "bookworm", "2.3"), Release(13, "trixie", "2.4"))


class TreeUnavailable(RuntimeError):
    """The tree cannot be built here; the message is one line saying why."""


def release_for(dovecot_major: str) -> Release:
    for release in RELEASES:
        if release.dovecot_major == dovecot_major:
            return release
    known = ", ".join(r.dovecot_major for r in RELEASES)
    raise ValueError(f"no Debian release with Dovecot {dovecot_major} (known: {known})")


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def tree_path(release: Release) -> Path:
    return cache_dir() / release.tree_name


def host_mirror(sources_dir: Path = Path("/etc/apt")) -> str:
    """The Debian mirror the host's apt sources use (the first ``deb`` source for
    Debian's main archive), or deb.debian.org if none is found."""
    files = [sources_dir / "sources.list", *sorted((sources_dir / "sources.list.d").glob("*"))]
    for path in files:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError):
            continue
        for uri in _source_uris(text):
            if "security" not in uri and "/debian" in uri:
                return uri.rstrip("/")
    return DEFAULT_MIRROR


def _source_uris(text: str) -> list[str]:
    """URIs of ``deb`` entries, one-line (``deb [opts] URI suite``) and deb822 (``URIs:``)."""
    uris = []
    for line in text.splitlines():
        one_line = re.match(r"\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)", line)
        deb822 = re.match(r"\s*URIs:\s*(\S+)", line, re.IGNORECASE)
        if one_line or deb822:
            uris.append((one_line or deb822).group(1))
    return uris


def stamp_text(release: Release, mirror: str) -> str:
    return (
        f"format {FORMAT_VERSION}\nsuite {release.suite}\nmirror {mirror}\n"
        f"packages {' '.join(sorted(PACKAGES))}\n"
    )


def is_current(root: Path, release: Release, mirror: str) -> bool:
    try:
        return (root / STAMP_NAME).read_text() == stamp_text(release, mirror)
    except OSError:
        return False


def why_unbuildable() -> str | None:
    """Why a tree cannot be built or run here (one line), or None."""
    if os.geteuid() != 0:
        return "needs root (debootstrap, unshare and chroot)"
    for tool in ("unshare", "chroot", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    if find_debootstrap() is None:
        return "debootstrap not found (apt-get install debootstrap)"
    return None


def find_debootstrap() -> str | None:
    return shutil.which("debootstrap") or (
        "/usr/sbin/debootstrap" if os.access("/usr/sbin/debootstrap", os.X_OK) else None
    )


def ensure_tree(release: Release, progress: TextIO = sys.stderr) -> Path:
    """The tree for ``release``, built first if missing or stale.

    Raises :class:`TreeUnavailable` (one line) if it cannot be built.  Progress goes
    to ``progress`` line by line (debootstrap's own ``I: Retrieving ...`` lines).
    """
    root = tree_path(release)
    mirror = host_mirror()
    if is_current(root, release, mirror):
        return root
    reason = why_unbuildable()
    if reason:
        raise TreeUnavailable(f"cannot build the Debian {release.debian} tree {root}: {reason}")
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        # Worktrees and CI jobs on one machine share the cache: one builds, the others
        # wait for it and then use its tree.
        with open(root.with_name(root.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if is_current(root, release, mirror):
                return root
            return _build(release, root, mirror, progress)
    except OSError as exc:
        reason = f"cannot build the Debian {release.debian} tree {root}: {exc}"
        raise TreeUnavailable(reason) from None


def _build(release: Release, root: Path, mirror: str, progress: TextIO) -> Path:
    building = root.with_name(root.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    building.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"== building a Debian {release.debian} ({release.suite}) tree with Dovecot "
        f"{release.dovecot_major} in {root} from {mirror} (debootstrap, about a minute)",
        file=progress,
        flush=True,
    )
    _debootstrap(release, building, mirror, progress)
    _copy_host_config(building, release, mirror)
    (building / STAMP_NAME).write_text(stamp_text(release, mirror))
    shutil.rmtree(root, ignore_errors=True)
    building.rename(root)
    print(f"== Debian {release.debian} tree ready: {root}", file=progress, flush=True)
    return root


def _debootstrap(release: Release, target: Path, mirror: str, progress: TextIO) -> None:
    command = [
        find_debootstrap() or "debootstrap",
        "--variant=minbase",
        "--include=" + ",".join(PACKAGES),
        release.suite,
        str(target),
        mirror,
    ]
    env = {**os.environ, **_apt_proxy_env()}
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    assert proc.stdout is not None
    tail: list[str] = []
    seen: set[str] = set()
    per_package_lines = 0
    for line in proc.stdout:
        line = line.rstrip()
        tail = [*tail[-19:], line]
        # debootstrap prints "I: Retrieving/Validating/Extracting/Unpacking/... <pkg>"
        # for each of ~150 packages: show the first line of each kind and every 25th,
        # so the build visibly moves without flooding the terminal.
        per_package = PER_PACKAGE_RE.match(line)
        if per_package:
            per_package_lines += 1
            first = per_package.group(1) not in seen
            seen.add(per_package.group(1))
            if not first and per_package_lines % 25:
                continue
        print(f"   {line}", file=progress, flush=True)
    if proc.wait() != 0:
        shutil.rmtree(target, ignore_errors=True)
        last = "; ".join(t for t in tail[-3:] if t)
        raise TreeUnavailable(
            f"debootstrap {release.suite} from {mirror} failed (status {proc.returncode}): {last}"
        )


def _apt_proxy_env() -> dict[str, str]:
    """The host apt's HTTP(S) proxy as environment variables for debootstrap (which
    uses wget/apt and reads ``http_proxy``)."""
    env = {}
    for setting, var in APT_PROXIES:
        try:
            value = subprocess.run(
                ["apt-config", "dump", "--no-empty", "--format", "%v", setting],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            value = ""
        if value and var not in os.environ:
            env[var] = value
    return env


def _copy_host_config(root: Path, release: Release, mirror: str) -> None:
    """The host's CA certificates and apt settings, and a source for the same mirror."""
    for rel in ("etc/ssl/certs/ca-certificates.crt", "usr/local/share/ca-certificates"):
        src = Path("/") / rel
        dst = root / rel
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        elif src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
    conf_d = Path("/etc/apt/apt.conf.d")
    if conf_d.is_dir():
        shutil.copytree(conf_d, root / "etc/apt/apt.conf.d", dirs_exist_ok=True)
    sources = root / "etc/apt/sources.list.d/debian.sources"
    sources.parent.mkdir(parents=True, exist_ok=True)
    sources.write_text(
        f"Types: deb\nURIs: {mirror}\nSuites: {release.suite}\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    )
    (root / "etc/apt/sources.list").unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m devstack.debian_tree [--other | DOVECOT_MAJOR]``: build the tree if
    missing or stale and print its path.  ``--other``: the tree with the Dovecot major
    version the host does not have packaged (what the tests need besides the host's)."""
    args = sys.argv[1:] if argv is None else argv
    try:
        if args == ["--other"]:
            release = _other_release()
        else:
            release = release_for(args[0] if args else "2.4")
        print(ensure_tree(release))
    except (TreeUnavailable, LookupError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _other_release() -> Release:
    from devstack.dovecot import host_build  # devstack.dovecot imports this module

    host = host_build()
    if host is None:
        raise LookupError("no dovecot on this host: install dovecot-imapd first")
    others = [r for r in RELEASES if r.dovecot_major != host.version]
    if len(others) != 1:
        raise LookupError(f"no single other Dovecot major version next to {host.version}")
    return others[0]


if __name__ == "__main__":
    sys.exit(main())
