"""``python -m chatmaild.exporter``: hand the database's state back to upstream chatmaild.

``deploy/install-relay --rollback`` runs this after stopping chatmail-metadata and before
starting upstream's again, so that switching back loses nothing that was stored since
the switch:

* tokens: every valid token that upstream's ``<addr>/metadata.json`` lacks, or that was
  set again after the switch (``--since``), is merged into that file in the form
  upstream reads (``{"devicetoken": {token: unix_ts}}``; a legacy list file is converted
  as upstream converts it on a write, stamping its tokens with "now").  A file that needs
  nothing is not touched, so it stays byte-identical to what upstream left;
* with ``--pending``, every job still queued becomes an upstream queue file
  (``pending_notifications/<uuid>``, ``"<addr>\\n<start_ts>\\n<token>"``), its start time
  chosen so that upstream's 5 h deadline falls where ours did.

Files are written as upstream writes them (a ``.tmp`` then a rename) and, when run as
root, given the owner of their directory (upstream runs as ``vmail`` and must read them).
Tokens are never printed: logs show :func:`chatmail_common.digest.token_digest`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sqlite3
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from chatmail_common.digest import token_digest

from .config import ConfigError, read_config
from .database import DatabaseError, connect
from .importer import METADATA_FILE, QUEUE_DIR, report_error, staged
from .jobqueue import RetryPolicy
from .jobstore import JobStore
from .store import TokenPolicy

log = logging.getLogger("chatmail-metadata-export")


@dataclass(slots=True)
class ExportStats:
    addresses: int = 0  # addresses with valid tokens in the database
    added: int = 0  # tokens written that upstream's file did not have
    refreshed: int = 0  # tokens set again since the switch: the file's stamp updated
    files_written: int = 0  # metadata.json files created or rewritten
    no_mailbox: int = 0  # tokens of addresses without a mailbox directory (not written)
    corrupt: int = 0  # upstream files that do not parse: left alone, their tokens not written
    jobs: int = 0  # queued pushes written as upstream queue files

    def summary(self) -> str:
        return (
            f"{self.addresses} addresses with tokens, {self.added} tokens added and "
            f"{self.refreshed} refreshed in {self.files_written} metadata.json files, "
            f"{self.no_mailbox} skipped without a mailbox directory, {self.corrupt} corrupt "
            f"files left alone, {self.jobs} queued pushes written for upstream"
        )


def stored_tokens(conn: sqlite3.Connection, now: int) -> dict[str, dict[str, int]]:
    """Valid tokens per address, in first-set order, with their last set time."""
    low, high = TokenPolicy().window(now)
    rows = conn.execute(
        "SELECT user, token, set_at FROM tokens WHERE set_at>? AND set_at<? "
        "ORDER BY user, created, rowid",
        (low, high),
    )
    users: dict[str, dict[str, int]] = {}
    for user, token, set_at in rows:
        users.setdefault(user, {})[token] = set_at
    return users


def write_like_upstream(path: Path, data: bytes) -> None:
    """Write via ``.tmp`` and rename, owned like the directory when run as root."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    if os.geteuid() == 0:
        st = path.parent.stat()
        os.chown(tmp, st.st_uid, st.st_gid)
    tmp.chmod(0o600)
    os.replace(tmp, path)


def merge_address(path: Path, tokens: dict[str, int], since: int, now: int, stats) -> None:
    """Merge one address's tokens into its upstream file; leave it alone if nothing changes."""
    data: dict = {}
    if path.exists():
        try:
            data = json.loads(path.read_bytes())
            if not isinstance(data, dict):
                raise ValueError("top level is not an object")
        except (OSError, ValueError) as exc:
            stats.corrupt += 1
            log.warning("corrupt %s left alone (%s): its tokens are not written", path, exc)
            return
    current = data.get("devicetoken")
    if isinstance(current, list):  # legacy form: converted on a write, as upstream does
        stamps = {tok: now for tok in current if isinstance(tok, str)}
        legacy = True
    else:
        stamps = dict(current) if isinstance(current, dict) else {}
        legacy = False
    changed = False
    for token, set_at in tokens.items():
        old = stamps.get(token)
        if old is None:
            stats.added += 1
        elif not legacy and set_at > since and (not isinstance(old, int) or set_at > old):
            stats.refreshed += 1
        else:
            continue
        stamps[token] = set_at
        changed = True
        log.debug("%s: token %s written", path.parent.name, token_digest(token))
    if changed:
        data["devicetoken"] = stamps
        write_like_upstream(path, json.dumps(data).encode())
        stats.files_written += 1


def export_tokens(
    conn: sqlite3.Connection, mailboxes_dir: Path, since: int, now: int, stats: ExportStats
) -> None:
    for user, tokens in stored_tokens(conn, now).items():
        stats.addresses += 1
        home = mailboxes_dir / user
        if "/" in user or not home.is_dir():
            stats.no_mailbox += len(tokens)
            log.warning(
                "%s: no mailbox directory %s, %d tokens not written", user, home, len(tokens)
            )
            continue
        merge_address(home / METADATA_FILE, tokens, since, now, stats)


def export_jobs(jobs: JobStore, queue_dir: Path, policy: RetryPolicy, stats: ExportStats) -> None:
    """Move every queued job to an upstream queue file (upstream retries them at its start)."""
    pending = jobs.pending()
    if not pending:
        return
    queue_dir.mkdir(mode=0o700, exist_ok=True)
    if os.geteuid() == 0:
        st = queue_dir.parent.stat()
        os.chown(queue_dir, st.st_uid, st.st_gid)
    for job in pending:
        start_ts = int(job.deadline - policy.deadline)
        body = f"{job.user}\n{start_ts}\n{job.token}".encode()
        write_like_upstream(queue_dir / uuid.uuid4().hex, body)
        jobs.finish(job.id)  # handed over: a later switch-over must not send it twice
        stats.jobs += 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m chatmaild.exporter",
        description="Write the tokens stored since a switch-over back into upstream "
        "chatmaild's <mailboxes_dir>/<addr>/metadata.json files (install-relay --rollback).",
    )
    p.add_argument("config", metavar="CHATMAIL_INI", help="chatmail.ini of the relay")
    p.add_argument(
        "--since", type=int, required=True, help="unix time of the switch-over (state file)"
    )
    p.add_argument("--pending", action="store_true", help="also write queued pushes for upstream")
    p.add_argument(
        "--root", type=Path, help="the ini's paths are below this directory (staged relay)"
    )
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    stats = ExportStats()
    db_path = None
    try:
        config = read_config(args.config)
        mailboxes_dir = staged(args.root, config.mailboxes_dir)
        db_path = staged(args.root, config.database_path)
        if not db_path.exists():
            raise ConfigError(f"database {db_path} does not exist: nothing was stored")
        conn = connect(db_path, config.synchronous)
        try:
            export_tokens(conn, mailboxes_dir, args.since, int(time.time()), stats)
            if args.pending:
                policy = config.notifier.retry_policy()
                export_jobs(JobStore(conn), mailboxes_dir / QUEUE_DIR, policy, stats)
        finally:
            conn.close()
    except (ConfigError, DatabaseError, OSError, sqlite3.Error) as exc:
        return report_error("chatmail-metadata-export", exc, db_path)
    print(f"export: {stats.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
