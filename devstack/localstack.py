"""The whole relay push path on this machine: real Dovecot, chatmail-metadata, embedded proxy.

Started by ``scripts/run-local`` (``python -m devstack.localstack`` from the
repository root).  Dovecot runs self-contained on 127.0.0.1 (free ports, a run
directory under /tmp) with the config files from ``dovecot/``: the host's Dovecot,
or with ``--dovecot 2.4`` (or 2.3) that major version, from a Debian tree if the host
has the other one (:mod:`devstack.debian_tree`, built on first use); the notifier hands
pushes to the push proxy embedded in chatmail-metadata, whose log-only provider
prints what it would send to Apple or Google (token digests only).  It registers
a demo token for alice over IMAP, prints a short guide (:mod:`devstack.guide`),
then follows chatmail-metadata's log until Ctrl-C.  ``run-local imap ...`` is the
guide's IMAP helper (:mod:`devstack.imap_command`).

It is built on the dev stack's process managers (:mod:`devstack`), so the local
stack and the integration tests run Dovecot exactly the same way.  A start that
fails says why in one message (what Dovecot or chatmail-metadata printed), stops
what did start and removes the run directory it made.
"""

from __future__ import annotations

import argparse
import contextlib
import imaplib
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from devstack import imap_command
from devstack.accounts import USERS
from devstack.debian_tree import TreeUnavailable
from devstack.dovecot import (
    VERSIONS,
    DovecotBuild,
    DovecotInstance,
    build_for,
    host_build,
    make_run_dir,
)
from devstack.guide import guide
from devstack.imap import ImapClient
from devstack.loopback import free_port
from devstack.metadata import MetadataServer
from devstack.process import StartError, start_all

PROG = "run-local"
DEMO_USER = "alice@example.org"
DEMO_TOKEN = "sandbox:" + "5ca1ab1e" * 8  # an APNs sandbox token the log provider accepts


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.splitlines()[0],
        epilog=f"{PROG} imap PORT USER PASSWORD COMMAND: one IMAP command (see the guide)",
    )
    p.add_argument("--run-dir", type=Path, help="state directory (default: a new one in /tmp)")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help="relay metrics port on 127.0.0.1 (default: a free port)",
    )
    p.add_argument(
        "--dovecot",
        choices=VERSIONS,
        help="Dovecot major version (default: the host's; the other one runs from a "
        "Debian tree in /var/cache/chatmail-push, built on first use as root)",
    )
    p.add_argument(
        "--no-follow",
        action="store_true",
        help="print the guide and exit, leaving the stack running (for scripts)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["imap"]:
        return imap_command.main(argv[1:])
    args = parse_args(argv)
    try:
        build = build_for(args.dovecot) if args.dovecot else host_build()
    except (LookupError, TreeUnavailable) as exc:
        return _fail(f"no Dovecot {args.dovecot}: {exc}")
    if build is None:
        return _fail("dovecot not found: run scripts/install-deps first")
    try:
        return run(args, build)
    except StartError as exc:
        kept = args.run_dir or f"(removed; {PROG} --run-dir DIR keeps the files of a failed start)"
        return _fail(f"{exc}\nrun directory: {kept}")
    except KeyboardInterrupt:
        return 130


def run(args: argparse.Namespace, build: DovecotBuild) -> int:
    """Start the stack, print the guide, follow the log; everything started is undone on exit.

    With ``--no-follow`` the processes keep running and the run directory stays.
    """
    with contextlib.ExitStack() as cleanup:
        if args.run_dir is None:
            run_dir = make_run_dir(prefix="chatmail-local-")
            cleanup.callback(shutil.rmtree, run_dir, ignore_errors=True)
        else:
            # scripts/run-local changed to the repository root; resolve against the caller's cwd.
            caller = Path(os.environ.get("RUN_LOCAL_CALLER_DIR", "."))
            run_dir = (caller / args.run_dir).resolve()
            run_dir.mkdir(parents=True, exist_ok=True)
            run_dir.chmod(0o755)  # Dovecot's mail processes (nobody) must reach the socket
        dovecot = DovecotInstance.from_build(run_dir, build)
        metadata = MetadataServer(run_dir, dovecot.metadata_socket, "embedded")
        metrics_port = args.metrics_port or free_port()
        metadata.notifiers = {"log_provider": "true", "debounce_seconds": "10"}
        metadata.extra_args = ["--metrics", f"127.0.0.1:{metrics_port}"]
        metadata.log_level = "DEBUG"  # show every step of the push path

        start_all(cleanup, metadata, dovecot)
        register_demo_token(dovecot)
        print(f"{build.describe()} is up", flush=True)
        print(guide(run_dir, dovecot, metadata, metrics_port), flush=True)
        if args.no_follow:
            cleanup.pop_all()
            assert metadata.proc is not None and dovecot.master_pid is not None
            print(f"stop it with: kill {metadata.proc.pid} {dovecot.master_pid}")
            return 0
        follow(metadata.log_path)
        print("\nstopping ...", flush=True)
    return 0


def register_demo_token(dovecot: DovecotInstance) -> None:
    """SETMETADATA a device token for alice, as Delta Chat does after login."""
    try:
        imap = ImapClient(dovecot.imap_port, DEMO_USER, USERS[DEMO_USER])
        typ, data = imap.setmetadata("INBOX", {"/private/devicetoken": DEMO_TOKEN})
        imap.logout()
    except (OSError, imaplib.IMAP4.error) as exc:
        raise StartError(f"registering the demo token for {DEMO_USER} failed: {exc}") from None
    if typ != "OK":
        raise StartError(f"registering the demo token for {DEMO_USER} failed: {typ} {data}")


def follow(path: Path) -> None:
    """Print new lines of ``path`` as they come (like tail -f) until Ctrl-C or SIGTERM."""
    signal.signal(signal.SIGTERM, _interrupt)
    with contextlib.suppress(KeyboardInterrupt), path.open("r", errors="replace") as f:
        f.seek(0, os.SEEK_END)
        while True:
            line = f.readline()
            if line:
                print(line, end="", flush=True)
            else:
                time.sleep(0.2)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _fail(message: str) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
