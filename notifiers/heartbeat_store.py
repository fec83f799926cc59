"""The heartbeat schedule on disk: one SQLite table, token -> next due time.

Why SQLite and not upstream's sled directory: one file, WAL (readers never
block the writer), crash-safe commits, and an index on the due time, so the
loop asks for "the next N due tokens, oldest first" instead of keeping every
token in a heap in memory (upstream's 14,000+ tokens cost nothing here, nor
would 10 million).  Each registration is committed with ``synchronous=FULL``
before ``/register`` answers (upstream flushes too), so an acknowledged
registration survives a crash or power loss; a token taken for a heartbeat
keeps its due time until the verdict is written, so a crash mid-send means
that token is sent again after the restart, never that it is lost.

Tokens are stored in plaintext (they must be sent to Apple) but never logged:
errors carry the file name only.  The class is synchronous and not
thread-safe: :mod:`notifiers.heartbeat_loop` calls it from one thread.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Collection, Iterable, Iterator, Mapping
from pathlib import Path

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS heartbeats (
    token TEXT PRIMARY KEY,
    due REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS heartbeats_by_due ON heartbeats (due, token);
"""


class HeartbeatStoreError(Exception):
    """The heartbeat database cannot be opened or used; the message names the file."""


class HeartbeatStore:
    """``token -> due`` (seconds since the epoch), ordered by due time."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise HeartbeatStoreError(
                f"heartbeat database {self.path}: is a directory (upstream's sled database "
                "cannot be read; give a file name for a new SQLite database)"
            )
        try:
            # Opened here, used only by the loop's database thread afterwards.
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=5000")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise HeartbeatStoreError(
                    f"heartbeat database {self.path}: schema version {version} is newer than "
                    f"this program's ({SCHEMA_VERSION})"
                )
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._count = self._db.execute("SELECT count(*) FROM heartbeats").fetchone()[0]
        except sqlite3.Error as exc:
            raise HeartbeatStoreError(f"heartbeat database {self.path}: {exc}") from exc

    @property
    def count(self) -> int:
        """How many tokens are scheduled (kept in step with every write)."""
        return self._count

    def register(self, token: str, due: float) -> bool:
        """Schedule ``token`` at ``due`` (re-registering moves it); True if it is new."""
        with self._errors(), self._transaction():
            new = self._db.execute(
                "INSERT OR IGNORE INTO heartbeats (token, due) VALUES (?, ?)", (token, due)
            ).rowcount
            if not new:
                self._db.execute("UPDATE heartbeats SET due = ? WHERE token = ?", (due, token))
        self._count += new
        return bool(new)

    def due(self, now: float, limit: int, skip: Collection[str] = ()) -> list[tuple[str, float]]:
        """Up to ``limit`` tokens due at ``now``, oldest due first, without those in ``skip``
        (tokens already taken and not yet written back)."""
        with self._errors():
            rows = self._db.execute(
                "SELECT token, due FROM heartbeats WHERE due <= ? ORDER BY due, token LIMIT ?",
                (now, limit + len(skip)),
            ).fetchall()
        return [row for row in rows if row[0] not in skip][:limit]

    def next_due_after(self, now: float) -> float | None:
        """The earliest due time later than ``now`` (None if there is none)."""
        with self._errors():
            return self._db.execute(
                "SELECT min(due) FROM heartbeats WHERE due > ?", (now,)
            ).fetchone()[0]

    def due_time(self, token: str) -> float | None:
        """When ``token`` is due, or None if it is not scheduled."""
        with self._errors():
            row = self._db.execute(
                "SELECT due FROM heartbeats WHERE token = ?", (token,)
            ).fetchone()
        return None if row is None else row[0]

    def apply(
        self,
        verdicts: Iterable[tuple[str, float | None]],
        taken: Mapping[str, float] | None = None,
    ) -> int:
        """Write back a batch of verdicts in one transaction: a due time reschedules the
        token, None removes it.  Returns how many tokens were removed.

        ``taken``: the due time each token had when it was taken for its send.  A
        removal of such a token happens only if the due time is still that one: a
        ``/register`` during the send moved it, and that fresh registration stays.
        """
        taken = taken or {}
        reschedule: list[tuple[float, str]] = []
        remove: list[tuple[str]] = []
        remove_if_due: list[tuple[str, float]] = []
        for token, due in verdicts:
            if due is not None:
                reschedule.append((due, token))
            elif token in taken:
                remove_if_due.append((token, taken[token]))
            else:
                remove.append((token,))
        with self._errors(), self._transaction():
            # UPDATE, not upsert: a token removed meanwhile stays removed.
            self._db.executemany("UPDATE heartbeats SET due = ? WHERE token = ?", reschedule)
            before = self._db.total_changes
            self._db.executemany("DELETE FROM heartbeats WHERE token = ?", remove)
            self._db.executemany(
                "DELETE FROM heartbeats WHERE token = ? AND due = ?", remove_if_due
            )
            removed = self._db.total_changes - before
        self._count -= removed
        return removed

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """sqlite3 errors as :class:`HeartbeatStoreError` naming the file."""
        try:
            yield
        except sqlite3.Error as exc:
            raise HeartbeatStoreError(f"heartbeat database {self.path}: {exc}") from exc
