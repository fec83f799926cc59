"""What the dict keys mean: the ``mail_attribute_dict`` backend of a chatmail relay.

:class:`MetadataDict` turns the events of :mod:`chatmaild.dictproto` into replies.
Keys arrive as ``priv/<mailbox-guid>/<entry>`` or ``shared/<mailbox-guid>/<entry>``;
identity always comes from the user field of ``L``/``I``/``B``, never from the GUID.

Special entries, handled on top of the generic attribute store:

* ``priv/<guid>/devicetoken``: set adds or refreshes a push token of the user,
  unset removes the tokens set on that mailbox, lookup answers the valid tokens space-joined.
* ``priv/<guid>/messagenew``: written by the LMTP Lua hook on delivery; triggers the
  new-mail hook (the notifier) and is never stored.
* ``shared/<guid>/vendor/vendor.dovecot/pvt/server/vendor/deltachat/<name>``: the
  read-only server keys of :mod:`chatmaild.serverkeys`.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from chatmail_common.digest import token_digest
from chatmail_common.logclip import clip

from . import dictproto as dp
from .config import Limits
from .serverkeys import (
    SERVER_KEY_PREFIX,
    STATIC_NAMES,
    TURN,
    TURN_UNKNOWN,
    ServerKeys,
    server_key_name,
)
from .store import MetadataStore

log = logging.getLogger(__name__)


class StorageEpisode:
    """Commits failing for a storage error (a full disk), logged once per episode.

    Why: every commit on a full disk fails the same way, and Dovecot retries; one ERROR
    per refused commit floods the journal on the very disk that is full.  The first
    failure is one ERROR, the rest are counted, and the first commit that works again
    ends the episode with one INFO line saying how long it lasted and how many were
    refused.  Each refused commit is still answered ``F``.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.started: float | None = None
        self.refused = 0

    @property
    def ongoing(self) -> bool:
        return self.started is not None

    def failed(self, user: str, exc: sqlite3.Error) -> None:
        self.refused += 1
        if self.started is None:
            self.started = self.clock()
            log.error(
                "commit failed for %s: %s; commits are refused (F) until storage works, "
                "logged again then",
                clip(user),
                exc,
            )

    def worked(self) -> None:
        if self.started is None:
            return
        log.info(
            "commits work again after %.1f s: %d commits refused for a storage error",
            self.clock() - self.started,
            self.refused,
        )
        self.started, self.refused = None, 0


DEVICETOKEN = b"devicetoken"
MESSAGENEW = b"messagenew"
MAX_TOKEN_BYTES = 4096


class NewMailHook(Protocol):
    """Receives new-mail events inside the commit's SQLite transaction.

    ``message_new`` runs before the ``C`` reply is sent and must only write through
    ``conn`` (so its writes commit or roll back with the dict transaction);
    ``committed`` runs after COMMIT, e.g. to wake worker threads.  A hook may also
    define ``rolled_back()``, called when the transaction is undone, to forget what
    ``message_new`` staged (SQLite may reuse the rolled-back row ids).
    """

    def message_new(
        self, conn: sqlite3.Connection, user: str, tokens: list[str], now: float
    ) -> None: ...

    def committed(self) -> None: ...


class CommitRefused(Exception):
    """A transaction that must be answered with ``F`` (the IMAP client gets ``NO``)."""


def split_key(key: bytes) -> tuple[bytes, bytes, bytes] | None:
    """``ns/guid/rest`` for ``priv``/``shared`` keys, else None."""
    parts = key.split(b"/", 2)
    if len(parts) != 3 or parts[0] not in (b"priv", b"shared"):
        return None
    return parts[0], parts[1], parts[2]


class MetadataDict:
    """The dict backend: lookups, iteration and atomic commits."""

    def __init__(
        self,
        store: MetadataStore,
        server_keys: ServerKeys,
        limits: Limits | None = None,
        hook: NewMailHook | None = None,
        delivery_dict: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.server_keys = server_keys
        self.limits = limits or Limits()
        self.hook = hook
        self.delivery_dict = delivery_dict
        self.clock = clock
        # Log lines (format, args) of the transaction being applied, logged once it commits.
        self._after_commit: list[tuple[str, tuple[object, ...]]] = []
        self.storage_episode = StorageEpisode()

    # -- lookups ----------------------------------------------------------
    def lookup(self, ev: dp.Lookup) -> dp.LookupReply | Awaitable[dp.LookupReply]:
        """The reply, or an awaitable of it when I/O is needed (TURN)."""
        name = server_key_name(ev.key)
        if name is not None:
            if name == TURN:
                cached = self.server_keys.cached_turn()
                if cached is TURN_UNKNOWN:
                    return self._turn_reply()
                return dp.lookup_result(cached)  # type: ignore[arg-type]
            return dp.lookup_result(self.server_keys.static_value(name))
        parts = split_key(ev.key)
        if parts is None:
            return dp.NOT_FOUND
        ns, _guid, rest = parts
        if ns == b"priv" and rest == DEVICETOKEN:
            tokens = self.store.valid_tokens(ev.user, int(self.clock()))
            return dp.lookup_result(" ".join(tokens).encode() if tokens else None)
        if ns == b"priv" and rest == MESSAGENEW:
            return dp.NOT_FOUND
        return dp.lookup_result(self.store.get_attribute(ev.user, ev.key))

    async def _turn_reply(self) -> dp.LookupReply:
        return dp.lookup_result(await self.server_keys.turn())

    # -- iteration --------------------------------------------------------
    def iterate(self, ev: dp.Iterate) -> dp.IterateReply:
        rows = self.store.iter_attributes(ev.user, ev.prefix)
        rows.extend(self._virtual_rows(ev))
        rows.sort()
        return dp.Rows(rows)  # the connection keeps only rows under ev.prefix, per ev.flags

    def _virtual_rows(self, ev: dp.Iterate) -> list[tuple[bytes, bytes]]:
        """Device tokens and server keys also show up in listings, like stored attributes."""
        rows: list[tuple[bytes, bytes]] = []
        want_values = not ev.flags & dp.ITER_NO_VALUE
        if ev.prefix.startswith(b"priv/") or b"priv/".startswith(ev.prefix):
            guids = self.store.token_guids(ev.user, int(self.clock()))
            if guids:
                value = b""
                if want_values:
                    value = " ".join(self.store.valid_tokens(ev.user, int(self.clock()))).encode()
                for guid in guids:
                    key = b"priv/" + guid.encode() + b"/" + DEVICETOKEN
                    if key.startswith(ev.prefix) and guid:
                        rows.append((key, value))
        parts = ev.prefix.split(b"/", 2)
        if len(parts) >= 2 and parts[0] == b"shared" and len(parts[1]) == 32:
            base = b"shared/" + parts[1] + b"/" + SERVER_KEY_PREFIX
            for name in STATIC_NAMES:
                key = base + name
                if key.startswith(ev.prefix):
                    value = self.server_keys.static_value(name)
                    if value is not None:
                        rows.append((key, value if want_values else b""))
        return rows

    # -- transactions -----------------------------------------------------
    def _commit(self, ev: dp.Commit) -> dp.CommitReply:
        notfound = False
        new_mail = False
        try:
            with self.store.transaction() as conn:
                notfound, new_mail = self._apply(conn, ev)
        except BaseException:
            self._rolled_back()
            raise
        self._log_committed()
        self.storage_episode.worked()
        if new_mail and self.hook is not None:
            self.hook.committed()
        if notfound:
            return dp.COMMIT_NOTFOUND
        return dp.COMMITTED

    def _log_committed(self) -> None:
        """Log what the transaction just committed did; a rolled-back round did nothing."""
        notes, self._after_commit = self._after_commit, []
        for msg, args in notes:
            log.info(msg, *args)

    def _rolled_back(self) -> None:
        """Forget what the undone transaction staged: its log lines and the hook's jobs."""
        self._after_commit.clear()
        rolled_back = getattr(self.hook, "rolled_back", None)
        if rolled_back is not None:
            rolled_back()

    def commit(self, ev: dp.Commit) -> dp.CommitReply:
        """Apply ``ev.ops`` in one SQLite transaction; ``COMMITTED`` or a ``Failure``."""
        try:
            return self._commit(ev)
        except (CommitRefused, sqlite3.Error) as exc:
            return self._failure(ev, exc)

    def _failure(self, ev: dp.Commit, exc: Exception) -> dp.Failure:
        """The ``F`` a refused or failed transaction is answered with, logged once."""
        if isinstance(exc, CommitRefused):
            log.warning(
                "commit refused for %s (dict %s): %s",
                clip(ev.user),
                clip(repr(ev.dict_name)),
                clip(exc),
            )
            return dp.Failure(str(exc))
        if isinstance(exc, sqlite3.Error):
            self.storage_episode.failed(ev.user, exc)
            return dp.Failure(f"storage error: {exc}")
        log.error("error handling Commit", exc_info=exc)
        return dp.Failure(f"internal error: {exc}")

    def commit_many(self, evs: Sequence[dp.Commit]) -> list[dp.CommitReply]:
        """Group commit: ``evs`` in ONE SQLite transaction, each answered as if alone.

        Replies are computed only after COMMIT returned, so an ``O`` still means durable.
        A transaction that fails (refused, a statement error, a bug) is answered ``F``
        and leaves nothing behind: the whole group is rolled back and the others are
        applied again without it, in a new transaction (each round drops one, so this
        ends).  If COMMIT itself fails, each transaction is retried on its own.
        """
        if len(evs) == 1:
            return [self.commit(evs[0])]
        replies: list[dp.CommitReply | None] = [None] * len(evs)
        todo = list(range(len(evs)))
        while todo:
            failed = None
            try:
                with self.store.transaction() as conn:
                    outcomes = []
                    for i in todo:
                        try:
                            outcomes.append(self._apply(conn, evs[i]))
                        except Exception as exc:
                            failed = (i, exc)
                            raise
            except Exception as exc:
                self._rolled_back()
                if failed is None:  # BEGIN or COMMIT failed: nobody's fault, one at a time
                    if not self.storage_episode.ongoing:  # else the episode's line says it
                        log.warning("group commit of %d failed (%s): one at a time", len(todo), exc)
                    for i in todo:
                        try:
                            replies[i] = self.commit(evs[i])
                        except Exception as one:
                            replies[i] = self._failure(evs[i], one)
                    break
                i, why = failed
                replies[i] = self._failure(evs[i], why)
                todo.remove(i)
                continue
            self._log_committed()
            self.storage_episode.worked()
            if any(new_mail for _nf, new_mail in outcomes) and self.hook is not None:
                self.hook.committed()
            for i, (notfound, _nm) in zip(todo, outcomes, strict=True):
                replies[i] = dp.COMMIT_NOTFOUND if notfound else dp.COMMITTED
            break
        return replies  # type: ignore[return-value]

    def _apply(self, conn: sqlite3.Connection, ev: dp.Commit) -> tuple[bool, bool]:
        user = ev.user
        now = self.clock()
        notfound = False
        new_mail = False
        new_keys = False
        for op in ev.ops:
            parts = split_key(op.key)
            if parts is None:
                raise CommitRefused(f"unsupported key {op.key[:80]!r}")
            ns, guid, rest = parts
            if server_key_name(op.key) is not None:
                if isinstance(op, dp.UnsetOp):
                    continue
                raise CommitRefused("server metadata keys are read-only")
            if ns == b"priv" and rest == DEVICETOKEN:
                self._apply_devicetoken(op, user, guid, int(now))
            elif ns == b"priv" and rest == MESSAGENEW:
                if isinstance(op, dp.SetOp):
                    self._message_new(conn, ev, now)
                    new_mail = True
            elif isinstance(op, dp.SetOp):
                if len(op.value) > self.limits.max_value_bytes:
                    raise CommitRefused(
                        f"value of {len(op.value)} bytes exceeds the limit of "
                        f"{self.limits.max_value_bytes} bytes"
                    )
                if self.store.set_attribute(user, op.key, op.value):
                    new_keys = True
            elif isinstance(op, dp.UnsetOp):
                self.store.unset_attribute(user, op.key)
            else:
                current = self.store.get_attribute(user, op.key)
                if current is None:
                    notfound = True
                    continue
                self.store.set_attribute(user, op.key, _incremented(current, op.diff))
        if new_keys:
            count = self.store.count_attributes(user)
            if count > self.limits.max_attributes:
                raise CommitRefused(
                    f"{count} attributes exceed the limit of {self.limits.max_attributes}"
                )
        return notfound, new_mail

    def _apply_devicetoken(self, op: dp.Op, user: str, guid: bytes, now: int) -> None:
        if isinstance(op, dp.UnsetOp):
            # Only the tokens set on that mailbox: deleting another mailbox (Dovecot
            # unsets every listed entry) must not drop the INBOX tokens.
            removed = self.store.remove_tokens(user, guid.decode("ascii", "replace"))
            self._after_commit.append(("removed %d device tokens of %s", (removed, user)))
            return
        if not isinstance(op, dp.SetOp):
            raise CommitRefused("devicetoken does not support increments")
        token = _validate_token(op.value)
        self.store.add_token(user, token, now, guid.decode("ascii", "replace"))
        if log.isEnabledFor(logging.DEBUG):  # the digest is a hash of ~1 KB on every connect
            log.debug("stored device token %s for %s", token_digest(token), user)

    def _message_new(self, conn: sqlite3.Connection, ev: dp.Commit, now: float) -> None:
        if self.delivery_dict is not None and ev.dict_name != self.delivery_dict:
            raise CommitRefused(
                f"messagenew is only accepted from the delivery dict {self.delivery_dict!r}"
            )
        # Pruning here (in the commit, under the write lock) keeps lookups read-only.
        tokens = self.store.tokens_to_push(ev.user, int(now))
        log.debug("new mail for %s: %d token(s)", ev.user, len(tokens))
        if tokens and self.hook is not None:
            self.hook.message_new(conn, ev.user, tokens, now)


def _incremented(current: bytes, diff: int) -> bytes:
    """``current + diff`` as decimal text; refused when ``current`` is no number or the
    result is past Python's int/str conversion limit (4,300 digits), which raises
    ``ValueError`` on either side of the addition."""
    try:
        return str(int(current) + diff).encode()
    except ValueError:
        raise CommitRefused(
            "atomic increment of a non-numeric value or of one past 4300 digits"
        ) from None


#: The bytes a device token may consist of: printable ASCII without the space.
_TOKEN_BYTES = bytes(range(0x21, 0x7F))


def _validate_token(raw: bytes) -> str:
    if not raw:
        raise CommitRefused("empty device token")
    if len(raw) > MAX_TOKEN_BYTES:
        raise CommitRefused(f"device token longer than {MAX_TOKEN_BYTES} bytes")
    # Every Delta Chat connect sends its ~930-byte token: one C pass over the bytes
    # decides the usual case (~1 us, where decoding and str.isprintable took ~3.5 us);
    # the checks below name what is wrong with any other.
    if not raw.translate(None, _TOKEN_BYTES):
        return raw.decode("ascii")
    try:
        token = raw.decode("ascii")
    except UnicodeDecodeError:
        raise CommitRefused("device token is not ASCII") from None
    if not token.isprintable() or " " in token:
        raise CommitRefused("device token contains spaces or control characters")
    return token
