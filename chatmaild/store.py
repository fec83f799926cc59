"""Attribute and device-token storage on top of :mod:`chatmaild.database`.

Pure data access: no protocol, no key parsing.  Every method that writes expects
to run inside a transaction opened with :meth:`MetadataStore.transaction`, so one
dict commit is one SQLite transaction.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass

from .database import database_file, write_lock

TOKEN_VALIDITY = 90 * 24 * 3600  # seconds after the last set
TOKEN_FUTURE_GUARD = 60  # a timestamp further in the future is invalid
MAX_TOKENS_PER_USER = 32


@dataclass(frozen=True, slots=True)
class TokenPolicy:
    validity: int = TOKEN_VALIDITY
    future_guard: int = TOKEN_FUTURE_GUARD
    max_per_user: int = MAX_TOKENS_PER_USER

    def is_valid(self, set_at: int, now: int) -> bool:
        return now - self.validity < set_at < now + self.future_guard


class MetadataStore:
    """Generic attributes (``priv/...``, ``shared/...``) and device tokens per user."""

    def __init__(self, conn: sqlite3.Connection, policy: TokenPolicy | None = None) -> None:
        self.conn = conn
        self.policy = policy or TokenPolicy()
        self._write_lock = write_lock(database_file(conn) or f":memory:{id(conn)}")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic write transaction (BEGIN IMMEDIATE ... COMMIT, ROLLBACK on error)."""
        conn = self.conn
        with self._write_lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # also when COMMIT itself failed
                    conn.execute("ROLLBACK")
                raise

    # -- attributes -------------------------------------------------------
    def get_attribute(self, user: str, key: bytes) -> bytes | None:
        row = self.conn.execute(
            "SELECT value FROM attributes WHERE user=? AND key=?", (user, key)
        ).fetchone()
        return None if row is None else row[0]

    def iter_attributes(
        self, user: str, prefix: bytes, limit: int = 0
    ) -> list[tuple[bytes, bytes]]:
        """All (key, value) of ``user`` whose key starts with ``prefix``, sorted by key."""
        sql = "SELECT key, value FROM attributes WHERE user=? AND key>=?"
        args: list[object] = [user, prefix]
        upper = _prefix_upper_bound(prefix)
        if upper is not None:
            sql += " AND key<?"
            args.append(upper)
        sql += " ORDER BY key"
        if limit > 0:
            sql += " LIMIT ?"
            args.append(limit)
        return [(bytes(k), bytes(v)) for k, v in self.conn.execute(sql, args)]

    def set_attribute(self, user: str, key: bytes, value: bytes) -> bool:
        """Store ``value``; True if the key is new (only then can the count limit be hit)."""
        cur = self.conn.execute(
            "UPDATE attributes SET value=? WHERE user=? AND key=?", (value, user, key)
        )
        if cur.rowcount:
            return False
        self.conn.execute(
            "INSERT INTO attributes(user, key, value) VALUES (?,?,?)", (user, key, value)
        )
        return True

    def unset_attribute(self, user: str, key: bytes) -> None:
        self.conn.execute("DELETE FROM attributes WHERE user=? AND key=?", (user, key))

    def count_attributes(self, user: str) -> int:
        return self.conn.execute(
            "SELECT count(*) FROM attributes WHERE user=?", (user,)
        ).fetchone()[0]

    # -- device tokens ----------------------------------------------------
    def valid_tokens(self, user: str, now: int) -> list[str]:
        """Valid tokens in first-set order; invalid ones found on the way are deleted."""
        rows = self.conn.execute(
            "SELECT token, set_at FROM tokens WHERE user=? ORDER BY created, rowid", (user,)
        ).fetchall()
        valid = [tok for tok, set_at in rows if self.policy.is_valid(set_at, now)]
        if len(valid) != len(rows):
            self._prune(user, now)
        return valid

    def token_guids(self, user: str, now: int) -> list[str]:
        """Mailbox GUIDs under which the user's valid tokens were set (for listings)."""
        rows = self.conn.execute(
            "SELECT DISTINCT guid FROM tokens WHERE user=? AND set_at>? AND set_at<? ORDER BY guid",
            (user, now - self.policy.validity, now + self.policy.future_guard),
        ).fetchall()
        return [g for (g,) in rows]

    def add_token(self, user: str, token: str, now: int, guid: str = "") -> None:
        """Add or refresh ``token``; keep ``max_per_user``, evicting the least recently set."""
        self.conn.execute(
            "INSERT INTO tokens(user, token, guid, created, set_at, touched) VALUES (?,?,?,?,?,"
            " (SELECT coalesce(max(touched), 0) + 1 FROM tokens WHERE user=?)) "
            "ON CONFLICT(user, token) DO UPDATE SET set_at=excluded.set_at, guid=excluded.guid,"
            " touched=excluded.touched",
            (user, token, guid, now, now, user),
        )
        self._prune(user, now)
        self.conn.execute(
            "DELETE FROM tokens WHERE user=? AND rowid NOT IN ("
            " SELECT rowid FROM tokens WHERE user=? ORDER BY set_at DESC, touched DESC LIMIT ?)",
            (user, user, self.policy.max_per_user),
        )

    def import_token(self, user: str, token: str, set_at: int) -> bool:
        """Insert a token with a given timestamp (migration); True if it was new or newer."""
        cur = self.conn.execute(
            "INSERT INTO tokens(user, token, created, set_at, touched) VALUES (?,?,?,?,"
            " (SELECT coalesce(max(touched), 0) + 1 FROM tokens WHERE user=?)) "
            "ON CONFLICT(user, token) DO UPDATE SET set_at=excluded.set_at "
            "WHERE excluded.set_at > tokens.set_at",
            (user, token, set_at, set_at, user),
        )
        return cur.rowcount > 0

    def remove_token(self, user: str, token: str) -> bool:
        cur = self.conn.execute("DELETE FROM tokens WHERE user=? AND token=?", (user, token))
        return cur.rowcount > 0

    def remove_tokens(self, user: str, guid: str | None = None) -> int:
        """Remove the user's tokens: those set on mailbox ``guid`` if given, plus the
        imported ones (no mailbox known), which a NIL on any mailbox removes."""
        if guid is None:
            return self.conn.execute("DELETE FROM tokens WHERE user=?", (user,)).rowcount
        return self.conn.execute(
            "DELETE FROM tokens WHERE user=? AND (guid=? OR guid='')", (user, guid)
        ).rowcount

    def _prune(self, user: str, now: int) -> None:
        self.conn.execute(
            "DELETE FROM tokens WHERE user=? AND (set_at<=? OR set_at>=?)",
            (user, now - self.policy.validity, now + self.policy.future_guard),
        )


def _prefix_upper_bound(prefix: bytes) -> bytes | None:
    """Smallest byte string greater than every string starting with ``prefix``."""
    p = bytearray(prefix)
    while p and p[-1] == 0xFF:
        p.pop()
    if not p:
        return None
    p[-1] += 1
    return bytes(p)
