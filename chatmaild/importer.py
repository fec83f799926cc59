"""``chatmail-metadata-import``: move upstream's per-address token files into the database.

Upstream chatmaild keeps the push tokens of ``<addr>`` in
``<mailboxes_dir>/<addr>/metadata.json``, either as ``{"devicetoken": {token: unix_ts}}``
or, before mid-2025, as a plain list ``{"devicetoken": [token, ...]}`` (stamped with
"now" here, as upstream does when it converts such a file).

The import is idempotent: a token already in the database with the same or a newer
timestamp is left alone (:meth:`MetadataStore.import_token`), so running it twice,
or while ``chatmail-metadata`` is already serving, changes nothing the second time.
Tokens that the store's :class:`TokenPolicy` considers expired or too far in the
future are skipped, and each address keeps at most ``max_per_user`` tokens (the most
recently set win, counting tokens already in the database).  Tokens are never
printed: logs show :func:`chatmail_common.digest.token_digest`.

With ``--pending`` it also imports upstream's persistent queue
(``<mailboxes_dir>/pending_notifications/<uuid>``, each file exactly
``"<addr>\n<start_ts>\n<token>"``) as jobs, so a push owed when upstream was stopped
is still sent: the job is created at ``start_ts`` and keeps upstream's deadline from
it (due at once, as upstream retries every queued item at start).  Empty or partial
files and ``*.tmp`` leftovers are counted and skipped, as upstream's own fix (b35e84e4)
skips them; items past their deadline are counted as expired.  ``deploy/install-relay
--from-upstream`` runs this once, then moves the queue directory aside.
"""

from __future__ import annotations

import argparse
import json
import logging
import sqlite3
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from chatmail_common.digest import token_digest

from .config import ConfigError, read_config
from .database import DatabaseError, connect
from .jobqueue import RetryPolicy
from .jobstore import JobStore
from .metadata import MAX_TOKEN_BYTES
from .store import MetadataStore

log = logging.getLogger("chatmail-metadata-import")

METADATA_FILE = "metadata.json"
QUEUE_DIR = "pending_notifications"


@dataclass(slots=True)
class ImportStats:
    addresses: int = 0  # address directories scanned
    files: int = 0  # metadata.json files read
    imported: int = 0  # tokens inserted or refreshed
    unchanged: int = 0  # already in the database with the same or a newer timestamp
    expired: int = 0  # older than the validity window
    future: int = 0  # stamped too far in the future
    invalid: int = 0  # not a usable token (type, spaces, control characters, length)
    over_cap: int = 0  # valid, but beyond the per-address token limit
    evicted: int = 0  # tokens already in the database pushed out by newer imported ones
    corrupt: int = 0  # files that could not be read or parsed

    def summary(self, dry_run: bool = False) -> str:
        head = "dry run, nothing written: " if dry_run else ""
        return (
            f"{head}{self.addresses} addresses scanned, {self.files} token files, "
            f"{self.imported} tokens imported, {self.unchanged} already present, "
            f"{self.expired} skipped expired, {self.future} skipped future, "
            f"{self.invalid} skipped invalid, {self.over_cap} skipped over the per-address "
            f"limit, {self.evicted} older tokens evicted, {self.corrupt} corrupt files"
        )


@dataclass(slots=True)
class QueueStats:
    """Upstream's queue files, each counted exactly once."""

    files: int = 0  # queue files found (``*.tmp`` not included)
    imported: int = 0  # jobs added: one row each in ``jobs``
    coalesced: int = 0  # same address and token as a job not yet attempted: one push covers both
    expired: int = 0  # upstream's deadline (start_ts + 5 h) already passed
    corrupt: int = 0  # empty, partial or unreadable (upstream deletes these at start)
    spurious: int = 0  # ``*.tmp`` leftovers of an interrupted write (upstream deletes these)

    def summary(self, dry_run: bool = False) -> str:
        head = "dry run, nothing written: " if dry_run else ""
        return (
            f"{head}{self.files} queued pushes, {self.imported} imported as jobs, "
            f"{self.coalesced} coalesced with a queued job, {self.expired} skipped past their "
            f"deadline, {self.corrupt} skipped empty or partial, {self.spurious} skipped .tmp"
        )


class CorruptFile(Exception):
    pass


class _DryRun(Exception):
    """Raised inside a transaction to roll it back in ``--dry-run`` mode."""


def is_address_dir(path: Path) -> bool:
    name = path.name
    local, sep, domain = name.rpartition("@")
    return (
        bool(sep and local and domain)
        and not name.startswith(".")
        and name.isprintable()
        and " " not in name
        and path.is_dir()
    )


def read_token_file(path: Path, now: int) -> list[tuple[object, object]]:
    """``(token, set_at)`` pairs exactly as found (validated later); raise CorruptFile."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError included
        raise CorruptFile(f"{type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise CorruptFile(f"top level is {type(data).__name__}, not an object")
    tokens = data.get("devicetoken")
    if tokens is None:
        return []
    if isinstance(tokens, list):  # legacy format: stamp with "now"
        return [(tok, now) for tok in tokens]
    if isinstance(tokens, dict):
        return list(tokens.items())
    raise CorruptFile(f"devicetoken is {type(tokens).__name__}, not an object or a list")


def _valid_token(token: object) -> str | None:
    if not isinstance(token, str) or not token:
        return None
    if len(token.encode("utf-8", "replace")) > MAX_TOKEN_BYTES:
        return None
    if not token.isascii() or not token.isprintable() or " " in token:
        return None
    return token


def _timestamp(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if value != value or value in (float("inf"), float("-inf")):
        return None
    return int(value)


def import_address(
    store: MetadataStore, addr: str, entries: list[tuple[object, object]], now: int, stats
) -> None:
    """Import one address's tokens; call inside a store transaction."""
    policy = store.policy
    candidates: dict[str, int] = {}
    for raw_token, raw_ts in entries:
        token = _valid_token(raw_token)
        ts = _timestamp(raw_ts)
        if token is None or ts is None:
            stats.invalid += 1
            continue
        if ts >= now + policy.future_guard:
            stats.future += 1
            continue
        if ts <= now - policy.validity:
            stats.expired += 1
            continue
        candidates[token] = max(ts, candidates.get(token, ts))
    if not candidates:
        return
    existing = store.valid_token_stamps(addr, now)
    merged = dict(existing)
    for token, ts in candidates.items():
        merged[token] = max(ts, merged.get(token, ts))
    ranked = sorted(merged.items(), key=lambda item: (item[1], item[0]), reverse=True)
    keep = {token for token, _ in ranked[: policy.max_per_user]}
    for token, ts in candidates.items():
        if token not in keep:
            stats.over_cap += 1
            log.debug("%s: token %s over the limit, skipped", addr, token_digest(token))
        elif store.import_token(addr, token, ts):
            stats.imported += 1
            log.debug("%s: imported token %s", addr, token_digest(token))
        else:
            stats.unchanged += 1
    for token in existing:
        if token not in keep:
            store.remove_token(addr, token)
            stats.evicted += 1


def run_import(
    store: MetadataStore,
    mailboxes_dir: Path,
    dry_run: bool = False,
    clock: Callable[[], float] = time.time,
) -> ImportStats:
    """Scan ``mailboxes_dir`` and import every ``<addr>/metadata.json``."""
    stats = ImportStats()
    now = int(clock())
    for entry in sorted(mailboxes_dir.iterdir()):
        if not is_address_dir(entry):
            continue
        stats.addresses += 1
        path = entry / METADATA_FILE
        if not path.exists():
            continue
        stats.files += 1
        try:
            entries = read_token_file(path, now)
        except CorruptFile as exc:
            stats.corrupt += 1
            log.warning("corrupt token file %s: %s", path, exc)
            continue
        try:
            with store.transaction():
                import_address(store, entry.name, entries, now, stats)
                if dry_run:
                    raise _DryRun
        except _DryRun:
            pass
    return stats


def read_queue_file(path: Path) -> tuple[str, int, str]:
    """``(addr, start_ts, token)`` of one upstream queue file; raise CorruptFile."""
    try:
        addr, start_ts, token = path.read_bytes().decode("utf-8").split("\n", 2)
    except (OSError, ValueError) as exc:  # unreadable, not UTF-8, too few lines
        raise CorruptFile(f"{type(exc).__name__}: {str(exc)[:200]}") from None
    try:
        started = int(start_ts)
    except ValueError:  # int()'s message quotes the line, which may be a token
        raise CorruptFile(f"line 2 is not a start time ({len(start_ts)} chars)") from None
    if not addr or _valid_token(token) is None:
        raise CorruptFile("no address or no usable token")
    return addr, started, token


def run_queue_import(
    jobs: JobStore,
    queue_dir: Path,
    policy: RetryPolicy,
    dry_run: bool = False,
    clock: Callable[[], float] = time.time,
) -> QueueStats:
    """Enqueue every pending push of upstream's ``queue_dir`` (one transaction)."""
    stats = QueueStats()
    if not queue_dir.is_dir():
        return stats
    now = clock()
    try:
        with MetadataStore(jobs.conn).transaction():
            for path in sorted(queue_dir.iterdir()):
                if path.name.endswith(".tmp"):
                    stats.spurious += 1
                    continue
                if not path.is_file():
                    continue
                stats.files += 1
                try:
                    addr, started, token = read_queue_file(path)
                except CorruptFile as exc:
                    stats.corrupt += 1
                    log.warning("skipping queue file %s: %s", path.name, exc)
                    continue
                if started + policy.deadline <= now:  # nothing left to send it in
                    stats.expired += 1
                    continue
                # created = due = start_ts: due at once, deadline start_ts + policy.deadline
                if jobs.enqueue(addr, [token], started, policy):
                    stats.imported += 1
                else:
                    stats.coalesced += 1
                log.debug("%s: queued push to %s", addr, token_digest(token))
            if dry_run:
                raise _DryRun
    except _DryRun:
        pass
    return stats


def staged(root: Path | None, path: Path) -> Path:
    """``path`` below the staging ``root`` (``--root``), as install-relay stages files."""
    return root / path.relative_to(path.anchor) if root else path


def open_database(db_path: Path, synchronous: str, dry_run: bool):
    """The database; a dry run of a relay without one counts against an empty one in memory
    (so a dry run creates no file)."""
    if dry_run and not db_path.exists():
        return connect(":memory:")
    return connect(db_path, synchronous)


def report_error(prog: str, exc: Exception, db_path: Path | None) -> int:
    """One line on stderr naming the thing at fault; the exit status 1."""
    if isinstance(exc, sqlite3.Error):  # busy past the timeout: "database is locked"
        exc = f"database {db_path}: {exc}"
    print(f"{prog}: error: {exc}", file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="chatmail-metadata-import",
        description="Import upstream chatmaild's <mailboxes_dir>/<addr>/metadata.json push "
        "tokens into the chatmail-metadata database (idempotent).",
    )
    p.add_argument("config", metavar="CHATMAIL_INI", help="chatmail.ini of the relay")
    p.add_argument("--db", type=Path, help="database path (default: as chatmail-metadata)")
    p.add_argument(
        "--mailboxes-dir",
        type=Path,
        help="directory holding the <addr>/ directories (default: [params] mailboxes_dir)",
    )
    p.add_argument(
        "--pending",
        action="store_true",
        help="also import upstream's queued pushes (<mailboxes_dir>/pending_notifications)",
    )
    p.add_argument(
        "--root", type=Path, help="the ini's paths are below this directory (staged relay)"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="report what would be imported, write nothing"
    )
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    db_path = None
    try:
        config = read_config(args.config)
        mailboxes_dir = args.mailboxes_dir or staged(args.root, config.mailboxes_dir)
        if not mailboxes_dir.is_dir():
            raise ConfigError(f"mailboxes directory does not exist: {mailboxes_dir}")
        db_path = args.db or staged(args.root, config.database_path)
        conn = open_database(db_path, config.synchronous, args.dry_run)
        try:
            stats = run_import(MetadataStore(conn), mailboxes_dir, dry_run=args.dry_run)
            queue = None
            if args.pending:
                policy = config.notifier.retry_policy()
                queue = run_queue_import(
                    JobStore(conn), mailboxes_dir / QUEUE_DIR, policy, dry_run=args.dry_run
                )
        finally:
            conn.close()
    except (ConfigError, DatabaseError, OSError, sqlite3.Error) as exc:
        return report_error("chatmail-metadata-import", exc, db_path)
    print(f"tokens: {stats.summary(args.dry_run)}")
    if queue is not None:
        print(f"queue: {queue.summary(args.dry_run)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
