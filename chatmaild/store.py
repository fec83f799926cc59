"""Attribute and device-token storage on top of :mod:`chatmaild.database`.

Pure data access: no protocol, no key parsing, and every SQL statement on the
``attributes`` and ``tokens`` tables.  Every method that writes expects to run
inside a transaction opened with :meth:`MetadataStore.transaction`, so one dict
commit is one SQLite transaction.  Reads never write: expired tokens are filtered
out by the query and deleted by :meth:`MetadataStore.prune_tokens` in a commit,
so a lookup on the event loop never waits for the write lock; those nobody's commit
touches again are swept out by :mod:`chatmaild.tokensweep`.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from .database import Writer, WriteTransaction

#: Bounds of the attribute read cache (:class:`AttributeCache`): entries kept, and the
#: largest value kept (a longer one is read from SQLite every time).
ATTRIBUTE_CACHE_ENTRIES = 4096
ATTRIBUTE_CACHE_VALUE_BYTES = 512

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

    def window(self, now: int) -> tuple[int, int]:
        """Valid ``set_at`` lie strictly between these two (the SQL form of :meth:`is_valid`)."""
        return now - self.validity, now + self.future_guard


@dataclass(frozen=True, slots=True)
class Registration:
    """One setting of a token (:meth:`MetadataStore.registration`)."""

    rowid: int
    created: int
    touched: int


class AttributeCache:
    """The committed value (or absence) of recently read attributes, by ``(user, key)``.

    Why: a lookup's SQLite point query is mostly the read transaction WAL mode opens and
    closes around every statement (~4 us of a ~10 us lookup); Delta Chat reads the same
    few keys (``/shared/comment``, ``/shared/admin``, usually absent) on every login.

    Exact only while the store that owns it is the one writer of the ``attributes``
    table: in the service that is the dict server's store (attributes are written by
    dict commits only; the importer, token sweep, job store and ``status`` never touch
    them).  A write drops its entry before its statement runs, and entries are filled
    only outside a transaction, so a value read inside one (uncommitted, perhaps rolled
    back later) is never kept.  Bounded: at most ``ATTRIBUTE_CACHE_ENTRIES`` entries
    (the oldest goes first), values up to ``ATTRIBUTE_CACHE_VALUE_BYTES``.
    """

    __slots__ = ("_entries", "max_entries", "max_value")

    def __init__(
        self,
        max_entries: int = ATTRIBUTE_CACHE_ENTRIES,
        max_value: int = ATTRIBUTE_CACHE_VALUE_BYTES,
    ) -> None:
        self._entries: dict[tuple[str, bytes], bytes | None] = {}
        self.max_entries = max_entries
        self.max_value = max_value

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, user: str, key: bytes) -> bytes | None | type[MISSING]:
        return self._entries.get((user, key), MISSING)

    def put(self, user: str, key: bytes, value: bytes | None) -> None:
        if value is not None and len(value) > self.max_value:
            return
        entries = self._entries
        if len(entries) >= self.max_entries:
            del entries[next(iter(entries))]
        entries[(user, key)] = value

    def drop(self, user: str, key: bytes) -> None:
        self._entries.pop((user, key), None)


class MISSING:
    """:meth:`AttributeCache.get`: nothing is known of that key (None means "no value")."""


class MetadataStore:
    """Generic attributes (``priv/...``, ``shared/...``) and device tokens per user.

    ``cache_attributes``: keep an :class:`AttributeCache` of attribute reads; only for
    the store that is the database's sole writer of attributes (the dict server's).
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        policy: TokenPolicy | None = None,
        cache_attributes: bool = False,
    ) -> None:
        self.conn = conn
        self.policy = policy or TokenPolicy()
        self._writer = Writer(conn)
        self._cache = AttributeCache() if cache_attributes else None
        # One cursor for the point query: conn.execute makes a new cursor per call.
        self._point_cursor = conn.cursor()

    def transaction(self) -> WriteTransaction:
        """One atomic write transaction (see :class:`chatmaild.database.Writer`)."""
        return self._writer.transaction()

    # -- attributes -------------------------------------------------------
    def get_attribute(self, user: str, key: bytes) -> bytes | None:
        cache = self._cache
        if cache is not None:
            value = cache.get(user, key)
            if value is not MISSING:
                return value  # type: ignore[return-value]
        row = self._point_cursor.execute(
            "SELECT value FROM attributes WHERE user=? AND key=?", (user, key)
        ).fetchone()
        value = None if row is None else row[0]
        if cache is not None and not self.conn.in_transaction:
            cache.put(user, key, value)
        return value

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
        if self._cache is not None:
            self._cache.drop(user, key)
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
        if self._cache is not None:
            self._cache.drop(user, key)
        self.conn.execute("DELETE FROM attributes WHERE user=? AND key=?", (user, key))

    def count_attributes(self, user: str) -> int:
        return self.conn.execute(
            "SELECT count(*) FROM attributes WHERE user=?", (user,)
        ).fetchone()[0]

    # -- device tokens ----------------------------------------------------
    def valid_tokens(self, user: str, now: int) -> list[str]:
        """Valid tokens in first-set order (read only: invalid ones are merely skipped)."""
        low, high = self.policy.window(now)
        rows = self.conn.execute(
            "SELECT token FROM tokens WHERE user=? AND set_at>? AND set_at<? "
            "ORDER BY created, rowid",
            (user, low, high),
        ).fetchall()
        return [tok for (tok,) in rows]

    def valid_token_stamps(self, user: str, now: int) -> dict[str, int]:
        """Valid tokens and when each was last set (the importer merges by timestamp)."""
        low, high = self.policy.window(now)
        rows = self.conn.execute(
            "SELECT token, set_at FROM tokens WHERE user=? AND set_at>? AND set_at<?",
            (user, low, high),
        )
        return dict(rows)

    def token_guids(self, user: str, now: int) -> list[str]:
        """Mailbox GUIDs under which the user's valid tokens were set (for listings)."""
        rows = self.conn.execute(
            "SELECT DISTINCT guid FROM tokens WHERE user=? AND set_at>? AND set_at<? ORDER BY guid",
            (user, *self.policy.window(now)),
        ).fetchall()
        return [g for (g,) in rows]

    def add_token(self, user: str, token: str, now: int, guid: str = "") -> None:
        """Add or refresh ``token``; keep ``max_per_user``, evicting the least recently set.

        A refresh of a token already stored (what every Delta Chat connect sends) is one
        statement: the user's row count did not grow, so there is nothing to evict, and
        the user's expired tokens are left to the next commit that adds a token or
        reports new mail (reads skip them meanwhile).  The row existed when its
        ``created`` (never updated) is not ``now``.
        """
        rows = self.conn.execute(  # fetchall: the statement is done before COMMIT
            "INSERT INTO tokens(user, token, guid, created, set_at, touched) VALUES (?,?,?,?,?,"
            " (SELECT coalesce(max(touched), 0) + 1 FROM tokens WHERE user=?)) "
            "ON CONFLICT(user, token) DO UPDATE SET set_at=excluded.set_at, guid=excluded.guid,"
            " touched=excluded.touched RETURNING created",
            (user, token, guid, now, now, user),
        ).fetchall()
        if rows and rows[0][0] != now:
            return
        self.prune_tokens(user, now)
        # The eviction statement sorts the user's tokens (~90 us, most of a refresh);
        # counting first (~3 us) skips it in the usual case of a user under the limit.
        self._evict_over_limit(user)

    def _evict_over_limit(self, user: str) -> bool:
        """Keep the user's ``max_per_user`` most recently set tokens; True if any went."""
        (count,) = self.conn.execute("SELECT count(*) FROM tokens WHERE user=?", (user,)).fetchone()
        if count <= self.policy.max_per_user:
            return False
        self.conn.execute(
            "DELETE FROM tokens WHERE user=? AND rowid NOT IN ("
            " SELECT rowid FROM tokens WHERE user=? ORDER BY set_at DESC, touched DESC LIMIT ?)",
            (user, user, self.policy.max_per_user),
        )
        return True

    def import_token(self, user: str, token: str, set_at: int) -> bool:
        """Insert a token with a given timestamp (migration); True if it was new or newer
        and is kept.  The limit holds as for :meth:`add_token`: a later refresh of a stored
        token (one statement) never evicts, so nothing may leave the user above it."""
        cur = self.conn.execute(
            "INSERT INTO tokens(user, token, created, set_at, touched) VALUES (?,?,?,?,"
            " (SELECT coalesce(max(touched), 0) + 1 FROM tokens WHERE user=?)) "
            "ON CONFLICT(user, token) DO UPDATE SET set_at=excluded.set_at "
            "WHERE excluded.set_at > tokens.set_at",
            (user, token, set_at, set_at, user),
        )
        if cur.rowcount <= 0:
            return False
        if not self._evict_over_limit(user):
            return True
        kept = self.conn.execute(
            "SELECT 1 FROM tokens WHERE user=? AND token=?", (user, token)
        ).fetchone()
        return kept is not None

    def registration(self, user: str, token: str) -> Registration | None:
        """Which setting of ``token`` is stored now (None if it is not stored).

        Why: a push answered GONE must delete the registration it was sent to, not one
        the device made while the push was out.  Every set changes ``touched`` (the
        user's sequence), and a row removed and added again gets a new ``created`` or
        ``rowid``, so two registrations are equal only if no set came between them.
        """
        row = self.conn.execute(
            "SELECT rowid, created, touched FROM tokens WHERE user=? AND token=?", (user, token)
        ).fetchone()
        return None if row is None else Registration(*row)

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

    def tokens_to_push(self, user: str, now: int) -> list[str]:
        """Inside a commit: the valid tokens in first-set order, the invalid ones deleted.

        What :meth:`prune_tokens` then :meth:`valid_tokens` give, in one statement when
        every token is valid (the usual case: one read instead of a delete and a read).
        """
        rows = self.conn.execute(
            "SELECT token, set_at FROM tokens WHERE user=? ORDER BY created, rowid", (user,)
        ).fetchall()
        low, high = self.policy.window(now)
        valid = [token for token, set_at in rows if low < set_at < high]
        if len(valid) != len(rows):
            self.prune_tokens(user, now)
        return valid

    def prune_tokens(self, user: str, now: int) -> int:
        """Delete the user's invalid tokens (inside a transaction); how many went."""
        return self.conn.execute(
            "DELETE FROM tokens WHERE user=? AND (set_at<=? OR set_at>=?)",
            (user, *self.policy.window(now)),
        ).rowcount

    def prune_expired_batch(self, after_rowid: int, limit: int, now: int) -> tuple[int, int]:
        """Inside a transaction: look at the next ``limit`` token rows after ``after_rowid``
        (rowid order, so the work is bounded whatever expired) and delete the invalid
        ones of any user; (the rowid to continue after, 0 once the end was reached;
        how many went).

        Why: :meth:`add_token`'s refresh and :meth:`tokens_to_push` prune only the user
        at hand, so the tokens of a user who neither sets a token nor gets mail again
        would stay forever; :mod:`chatmaild.tokensweep` walks the table with this.
        """
        count, last = self.conn.execute(
            "SELECT count(*), max(rowid) FROM"
            " (SELECT rowid FROM tokens WHERE rowid>? ORDER BY rowid LIMIT ?)",
            (after_rowid, limit),
        ).fetchone()
        if not count:
            return 0, 0
        deleted = self.conn.execute(
            "DELETE FROM tokens WHERE rowid>? AND rowid<=? AND (set_at<=? OR set_at>=?)",
            (after_rowid, last, *self.policy.window(now)),
        ).rowcount
        return (last if count == limit else 0), deleted


def _prefix_upper_bound(prefix: bytes) -> bytes | None:
    """Smallest byte string greater than every string starting with ``prefix``."""
    p = bytearray(prefix)
    while p and p[-1] == 0xFF:
        p.pop()
    if not p:
        return None
    p[-1] += 1
    return bytes(p)
