"""Opening the one SQLite database that holds attributes, tokens and the push queue.

WAL mode lets the dict server (event-loop thread) and the notifier workers (their
own threads, their own connections) read and write concurrently.
``synchronous=NORMAL`` keeps every committed transaction across a process crash
(``kill -9``): the WAL pages are in the OS page cache before COMMIT returns.  Only
a power loss can drop the last transactions; ``synchronous=FULL`` closes that gap
at a measured cost (see ``bench/``) and is a config switch.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

SCHEMA_VERSION = 2

# The push queue's columns: in the schema, and in the rebuild of an older file's table.
_JOBS_COLUMNS = """\
    id       INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: see _JOBS_WITH_AUTOINCREMENT
    user     TEXT NOT NULL,
    token    TEXT NOT NULL,
    created  REAL NOT NULL,
    deadline REAL NOT NULL,
    due      REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0
"""

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS attributes (
    user  TEXT NOT NULL,
    key   BLOB NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (user, key)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS tokens (
    user    TEXT NOT NULL,
    token   TEXT NOT NULL,
    guid    TEXT NOT NULL DEFAULT '',
    created INTEGER NOT NULL,
    set_at  INTEGER NOT NULL,
    touched INTEGER NOT NULL DEFAULT 0,  -- per-user sequence of sets: orders sets within a second
    PRIMARY KEY (user, token)
);

CREATE TABLE IF NOT EXISTS jobs (
{_JOBS_COLUMNS});
-- At most one not-yet-attempted job per (user, token): this is the coalescing rule.
CREATE UNIQUE INDEX IF NOT EXISTS jobs_fresh ON jobs (user, token) WHERE attempts = 0;
"""

# What each version adds to the one before; a database opened at version N gets
# every step above N, each with its user_version bump, in one transaction.
_MIGRATIONS: dict[int, str] = {
    2: """
-- Pushes per minute by outcome (sent/gone/retried/dropped) and answer (200, 410,
-- 503, error:ConnectTimeout, ...), for `chatmail-metadata status`; pruned to two days
-- (chatmaild.outcomelog), so it stays a few thousand rows at most.
CREATE TABLE IF NOT EXISTS push_outcomes (
    minute  INTEGER NOT NULL,  -- unix time // 60
    outcome TEXT NOT NULL,
    answer  TEXT NOT NULL,
    count   INTEGER NOT NULL,
    last_at REAL NOT NULL,     -- the latest push in this bucket
    PRIMARY KEY (minute, outcome, answer)
) WITHOUT ROWID;

-- The running service (one row): how `status` finds its socket, metrics listener and
-- process without being told; `stopped` is set at a clean shutdown.
CREATE TABLE IF NOT EXISTS service (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    pid        INTEGER NOT NULL,
    started    REAL NOT NULL,
    stopped    REAL,
    socket     TEXT NOT NULL,
    metrics    TEXT NOT NULL DEFAULT '',
    notify_url TEXT NOT NULL,
    workers    INTEGER NOT NULL
);
""",
}


# Job ids never come back (AUTOINCREMENT): a plain rowid is reused once the highest row
# is deleted, which every finished push does, while the notifier may still hold a ticket
# of the deleted job (a retry's, due hours later).  A reused id made that ticket claim
# another token's job (an attempt counted twice) or hold a new job of the same token
# back until the old retry's due time.  Measured: ~9 us more per inserting transaction
# (the sqlite_sequence row).  Not a schema version of its own: the queries are the same,
# so a version 2 program rolled back to still opens the file.
_JOBS_WITH_AUTOINCREMENT = f"""
CREATE TABLE jobs_autoincrement (
{_JOBS_COLUMNS});
INSERT INTO jobs_autoincrement (id, user, token, created, deadline, due, attempts)
    SELECT id, user, token, created, deadline, due, attempts FROM jobs;
DROP TABLE jobs;
ALTER TABLE jobs_autoincrement RENAME TO jobs;
CREATE UNIQUE INDEX jobs_fresh ON jobs (user, token) WHERE attempts = 0;
"""


_WRITE_LOCKS: dict[str, threading.Lock] = {}
_WRITE_LOCKS_GUARD = threading.Lock()


def write_lock(path: str | Path) -> threading.Lock:
    """The process-wide lock every write transaction on ``path`` takes.

    SQLite allows one writer; a second one gets SQLITE_BUSY and its busy handler
    sleeps in steps of milliseconds, which showed as 200+ ms p99 in the notifier
    bench. Threads of one process queue on this lock instead (microseconds).
    """
    key = os.path.realpath(path)
    with _WRITE_LOCKS_GUARD:
        return _WRITE_LOCKS.setdefault(key, threading.Lock())


def database_file(conn: sqlite3.Connection) -> str:
    """The file behind ``conn`` (empty for an in-memory database)."""
    return conn.execute("PRAGMA database_list").fetchone()[2]


class Writer:
    """The one way anything writes ``conn``: a transaction under the file's write lock.

    The stores (:mod:`chatmaild.store`, :mod:`chatmaild.jobstore`) open every write
    transaction here, so BEGIN IMMEDIATE / COMMIT / ROLLBACK and the lock exist once.
    The lock is looked up on the first write: a store built for one statement inside
    a caller's transaction (a job written in the dict commit) never needs it.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self._lock: threading.Lock | None = None

    def transaction(self) -> WriteTransaction:
        """One atomic write transaction (BEGIN IMMEDIATE ... COMMIT, ROLLBACK on error)."""
        if self._lock is None:
            self._lock = write_lock(database_file(self.conn) or f":memory:{id(self.conn)}")
        return WriteTransaction(self.conn, self._lock)


class WriteTransaction:
    """``with``: the write lock, BEGIN IMMEDIATE; COMMIT at the end, ROLLBACK on an error.

    A class, not a ``contextlib.contextmanager``: every dict commit opens one, and the
    generator, its wrapper and their calls cost ~2 us of a ~30 us token refresh.
    """

    __slots__ = ("_conn", "_lock")

    def __init__(self, conn: sqlite3.Connection, lock: threading.Lock) -> None:
        self._conn = conn
        self._lock = lock

    def __enter__(self) -> sqlite3.Connection:
        self._lock.acquire()
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._lock.release()
            raise
        return self._conn

    def __exit__(self, exc_type: type[BaseException] | None, exc: object, tb: object) -> None:
        conn = self._conn
        try:
            if exc_type is None:
                try:
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:  # COMMIT itself failed
                        conn.execute("ROLLBACK")
                    raise
            elif conn.in_transaction:
                conn.execute("ROLLBACK")
        finally:
            self._lock.release()


class DatabaseError(Exception):
    """The database cannot be opened or has an unexpected format."""


def connect(
    path: str | Path, synchronous: str = "NORMAL", autocheckpoint: bool = True
) -> sqlite3.Connection:
    """Open (and create if needed) the database with the pragmas every user needs.

    ``autocheckpoint=False``: no commit on this connection checkpoints the WAL; the
    service's connections open so, and :mod:`chatmaild.checkpointer` does it instead.
    """
    path = Path(path)
    if str(path) != ":memory:" and not path.parent.is_dir():
        raise DatabaseError(f"database directory does not exist: {path.parent}")
    try:
        conn = sqlite3.connect(
            str(path), isolation_level=None, check_same_thread=False, timeout=30.0
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={_synchronous(synchronous)}")
        conn.execute("PRAGMA foreign_keys=ON")
        if not autocheckpoint:
            conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.executescript(_SCHEMA)
        _migrate(conn, path)
        _ids_never_reused(conn)
    except sqlite3.DatabaseError as exc:
        raise DatabaseError(f"cannot open database {path}: {exc}") from exc
    return conn


def schema_version(conn: sqlite3.Connection) -> int:
    return conn.execute("PRAGMA user_version").fetchone()[0]


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Bring the schema to :data:`SCHEMA_VERSION` (a new file is at 0, a v1 file gets v2)."""
    version = schema_version(conn)
    if version > SCHEMA_VERSION:
        raise DatabaseError(
            f"{path}: schema version {version} is newer than this program ({SCHEMA_VERSION})"
        )
    if version == SCHEMA_VERSION:
        return
    with Writer(conn).transaction():
        version = max(schema_version(conn), 1)  # 0: just created by _SCHEMA, which is v1
        for step in range(version + 1, SCHEMA_VERSION + 1):
            for statement in _statements(_MIGRATIONS[step]):
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")


def _ids_never_reused(conn: sqlite3.Connection) -> None:
    """Rebuild a ``jobs`` table made without AUTOINCREMENT (by an earlier version; see
    above), once per file."""

    def rebuilt() -> bool:
        sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'jobs'").fetchone()[0]
        return "AUTOINCREMENT" in sql.upper()

    if rebuilt():
        return
    with Writer(conn).transaction():
        if not rebuilt():  # another process may have done it while we waited
            for statement in _statements(_JOBS_WITH_AUTOINCREMENT):
                conn.execute(statement)


def _statements(script: str) -> list[str]:
    """The statements of a migration (executescript would COMMIT the open transaction)."""
    lines = [line.split("--", 1)[0] for line in script.splitlines()]
    return [stmt.strip() for stmt in "\n".join(lines).split(";") if stmt.strip()]


def _synchronous(value: str) -> str:
    value = value.upper()
    if value not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
        raise DatabaseError(f"invalid synchronous mode {value!r}")
    return value
