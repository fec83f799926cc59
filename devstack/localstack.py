"""The whole relay push path on this machine: real Dovecot, chatmail-metadata, embedded proxy.

Started by ``scripts/run-local``.  Dovecot runs self-contained on 127.0.0.1 (free
ports, a run directory under /tmp) with the config files from ``dovecot/``; the
notifier hands pushes to the push proxy embedded in chatmail-metadata, whose
log-only provider prints what it would send to Apple or Google (token digests
only).  It registers a demo token for alice over IMAP, prints a short guide, then
follows chatmail-metadata's log until Ctrl-C.

It is built on the dev stack's process managers (:mod:`devstack`), so the local
stack and the integration tests run Dovecot exactly the same way.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from devstack.accounts import USERS
from devstack.dovecot import DovecotInstance, find_dovecot
from devstack.imap import ImapClient, RawImap
from devstack.loopback import free_ports
from devstack.metadata import MetadataServer

DEMO_TOKEN = "sandbox:" + "5ca1ab1e" * 8  # an APNs sandbox token the log provider accepts


def imap_command(argv: list[str]) -> int:
    """``localstack.py imap PORT USER PASSWORD COMMAND``: one IMAP command, answer printed.

    For the guide: curl does not print untagged answers that carry literals.
    """
    port, user, password, command = argv
    with RawImap(int(port)) as imap:
        imap.login(user, password)
        resp = imap.command(command)
    for parts in resp.untagged:
        print("* " + b"".join(parts).decode("utf-8", "replace"))
    print(f"{resp.tag.decode()} {resp.status} {resp.text.decode('utf-8', 'replace')}")
    return 0 if resp.status == "OK" else 1


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", type=Path, help="state directory (default: a new one in /tmp)")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help="relay metrics port on 127.0.0.1 (default: a free port)",
    )
    p.add_argument(
        "--no-follow",
        action="store_true",
        help="print the guide and exit, leaving the stack running (for scripts)",
    )
    return p.parse_args()


def main() -> int:
    if sys.argv[1:2] == ["imap"]:
        return imap_command(sys.argv[2:])
    args = parse_args()
    binary = find_dovecot()
    if binary is None:
        print("dovecot not found: run scripts/install-deps first", file=sys.stderr)
        return 1
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="chatmail-local-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    run_dir.chmod(0o755)  # Dovecot's mail processes (nobody) must reach the socket

    dovecot = DovecotInstance(run_dir, binary)
    metadata = MetadataServer(run_dir, dovecot.metadata_socket, "embedded")
    metrics_port = args.metrics_port or free_ports(1)[0]
    metadata.notifiers = {"log_provider": "true", "debounce_seconds": "10"}
    metadata.extra_args = ["--metrics", f"127.0.0.1:{metrics_port}"]
    metadata.log_level = "DEBUG"  # show every step of the push path

    metadata.start()
    dovecot.start()
    try:
        imap = ImapClient(dovecot.imap_port, "alice@example.org", USERS["alice@example.org"])
        typ, _ = imap.setmetadata("INBOX", {"/private/devicetoken": DEMO_TOKEN})
        imap.logout()
        if typ != "OK":
            raise RuntimeError(f"registering the demo token failed: {typ}")
        print_guide(run_dir, dovecot, metadata, metrics_port)
        if args.no_follow:
            print(f"stop it with: kill {metadata.proc.pid} {dovecot.proc.pid}")
            return 0
        follow(metadata.log_path)
    except KeyboardInterrupt:
        pass
    finally:
        if not args.no_follow:
            print("\nstopping ...")
            dovecot.stop()
            metadata.stop()
            if args.run_dir is None:
                shutil.rmtree(run_dir, ignore_errors=True)
    return 0


def print_guide(run_dir: Path, dovecot, metadata, metrics_port: int) -> None:
    imap, lmtp = dovecot.imap_port, dovecot.lmtp_port
    imapcmd = f".venv/bin/python scripts/localstack.py imap {imap}"
    print(
        f"""
== chatmail push, local stack (Ctrl-C stops it) ==
  Dovecot IMAP       127.0.0.1:{imap}   users alice@example.org / alicepass, bob@example.org / bobpass
  Dovecot LMTP       127.0.0.1:{lmtp}
  chatmail-metadata  dict socket {metadata.socket_path}
                     database {metadata.db_path}
                     metrics http://127.0.0.1:{metrics_port}/metrics
  push proxy         embedded, log-only provider (nothing leaves this machine)
  files              {run_dir}  (Dovecot log: {dovecot.log_path})

alice has a demo device token already (set with IMAP SETMETADATA, as Delta Chat does).

1. Deliver a mail to alice and watch the push below ("sent (attempt 1)", and the
   log provider's "would send" line):
     swaks --server 127.0.0.1:{lmtp} --protocol LMTP --from carol@example.net --to alice@example.org
   or, without swaks:
     python3 -c 'import smtplib; smtplib.LMTP("127.0.0.1", {lmtp}).sendmail("carol@example.net", ["alice@example.org"], "From: carol@example.net\\r\\nSubject: hi\\r\\n\\r\\nhello\\r\\n")'
2. Register a token for bob, then read it back (IMAP METADATA):
     {imapcmd} bob@example.org bobpass 'SETMETADATA INBOX (/private/devicetoken "fcm-chat.delta:demo")'
     {imapcmd} bob@example.org bobpass 'GETMETADATA INBOX /private/devicetoken'
3. Read the server keys Delta Chat asks for:
     {imapcmd} bob@example.org bobpass 'GETMETADATA "" (/shared/vendor/deltachat/irohrelay /shared/vendor/deltachat/maxsmtprecipients /shared/vendor/deltachat/appversions)'
4. Mail from alice to herself wakes nothing; more mail within 10 s is debounced
   into one trailing push. Counters: curl -s http://127.0.0.1:{metrics_port}/metrics | grep chatmail_push

-- chatmail-metadata log --""",
        flush=True,
    )


def follow(path: Path) -> None:
    """Print new lines of ``path`` as they come (like tail -f) until interrupted."""
    signal.signal(signal.SIGTERM, _interrupt)
    with path.open("r", errors="replace") as f:
        f.seek(0, os.SEEK_END)
        while True:
            line = f.readline()
            if line:
                print(line, end="", flush=True)
            else:
                time.sleep(0.2)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
