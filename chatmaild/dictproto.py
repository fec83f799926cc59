"""Dovecot 2.3 dict protocol ("proxy:" dict), sans-I/O.

Nothing here touches a socket.  :class:`DictConnection` is a small state machine:
feed it raw bytes with :meth:`DictConnection.receive_data`, pull :class:`Event`
objects with :meth:`DictConnection.next_event`, and turn the answers into bytes
with the ``*_reply`` functions.  The adapter (``dictserver.py``) only moves bytes.

Why the shape: a reply that breaks Dovecot's expectations crashes its imap
process (unknown letter -> SIGSEGV, iterate key outside the prefix or without a
TAB -> assertion panic, stray line -> silent desync).  So the only way to produce
output is through the events that *owe* a reply (lookup, iterate, commit) and the
reply builders below, which can only emit the letters O, N and F.  Commands that
get no reply (H B S U A T V R) never produce an event that could be answered.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

DEFAULT_MAX_LINE = 1 << 20  # 1 MiB, see DESIGN.md (Dovecot sends lines far over 64 KiB)

# Dovecot iterate flags (dict.h)
ITER_RECURSE = 0x01
ITER_NO_VALUE = 0x08
ITER_EXACT_KEY = 0x10

_ESCAPES = {
    0x01: b"\x011",
    0x09: b"\x01t",
    0x0A: b"\x01n",
    0x0D: b"\x01r",
    0x00: b"\x010",
}
_UNESCAPES = {ord("1"): 0x01, ord("t"): 0x09, ord("n"): 0x0A, ord("r"): 0x0D, ord("0"): 0x00}
_NEEDS_ESCAPE = bytes(_ESCAPES)


def tabescape(data: bytes) -> bytes:
    """Escape one field the way Dovecot's ``str_append_tabescaped_n`` does."""
    if not any(b in data for b in _NEEDS_ESCAPE):
        return data
    return (
        data.replace(b"\x01", b"\x011")
        .replace(b"\t", b"\x01t")
        .replace(b"\n", b"\x01n")
        .replace(b"\r", b"\x01r")
        .replace(b"\x00", b"\x010")
    )


def tabunescape(field: bytes) -> bytes:
    """Undo :func:`tabescape`; ``\\x01`` followed by any other byte yields that byte."""
    if b"\x01" not in field:
        return field
    out = bytearray()
    i = 0
    n = len(field)
    while i < n:
        b = field[i]
        if b == 0x01 and i + 1 < n:
            nxt = field[i + 1]
            out.append(_UNESCAPES.get(nxt, nxt))
            i += 2
        else:
            out.append(b)
            i += 1
    return bytes(out)


def split_fields(body: bytes) -> list[bytes]:
    """Split on raw TAB first, then unescape each field (never strip anything)."""
    return [tabunescape(f) for f in body.split(b"\t")]


# ---------------------------------------------------------------------------
# Events


@dataclass(frozen=True, slots=True)
class Hello:
    """``H``: protocol version and the dict name (no reply is ever sent)."""

    major: int
    minor: int
    dict_name: str


@dataclass(frozen=True, slots=True)
class Lookup:
    """``L``: owes exactly one reply built by :func:`lookup_reply`."""

    key: bytes
    user: str


@dataclass(frozen=True, slots=True)
class Iterate:
    """``I``: owes rows plus one end line, built by :func:`iterate_reply`."""

    flags: int
    max_rows: int
    prefix: bytes
    user: str


@dataclass(frozen=True, slots=True)
class SetOp:
    key: bytes
    value: bytes


@dataclass(frozen=True, slots=True)
class UnsetOp:
    key: bytes


@dataclass(frozen=True, slots=True)
class IncOp:
    key: bytes
    diff: int


Op = SetOp | UnsetOp | IncOp


@dataclass(frozen=True, slots=True)
class Commit:
    """``C``/``D``: a transaction to apply atomically; owes :func:`commit_reply`."""

    txid: str
    user: str
    ops: tuple[Op, ...]
    dict_name: str


@dataclass(frozen=True, slots=True)
class Refusal:
    """A command that owes a reply but cannot be served: answer ``reply`` as is."""

    reply: bytes
    reason: str


Event = Hello | Lookup | Iterate | Commit | Refusal


# ---------------------------------------------------------------------------
# Reply builders: the only way to produce bytes for the peer.


def _clean_error(text: str) -> bytes:
    return tabescape(text.encode("utf-8", "replace"))


def lookup_reply(value: bytes | None) -> bytes:
    """``O<value>`` when found, ``N`` when not."""
    if value is None:
        return b"N\n"
    return b"O" + tabescape(value) + b"\n"


def lookup_failure(reason: str) -> bytes:
    return b"F" + _clean_error(reason) + b"\n"


def iterate_reply(
    prefix: bytes, rows: Iterable[tuple[bytes, bytes]], flags: int, max_rows: int
) -> bytes:
    """Rows ``O<key>\\t<value>`` strictly under ``prefix``, then the empty end line.

    Keys outside the prefix are dropped here (Dovecot asserts on them), values are
    left out with ITER_NO_VALUE, EXACT_KEY keeps only the prefix itself, and
    ``max_rows`` > 0 caps the count.
    """
    parts: list[bytes] = []
    no_value = bool(flags & ITER_NO_VALUE)
    exact = bool(flags & ITER_EXACT_KEY)
    count = 0
    for key, value in rows:
        if not key.startswith(prefix) or (exact and key != prefix):
            continue
        if max_rows > 0 and count >= max_rows:
            break
        parts.append(b"O" + tabescape(key) + b"\t" + (b"" if no_value else tabescape(value)))
        count += 1
    parts.append(b"")
    return b"\n".join(parts) + b"\n"


def iterate_failure(reason: str) -> bytes:
    return b"F" + _clean_error(reason) + b"\n"


def commit_notfound(txid: str) -> bytes:
    """``N<id>``: success for Dovecot, used when an increment found no key."""
    return b"N" + tabescape(txid.encode()) + b"\n"


def commit_reply(txid: str, error: str | None = None) -> bytes:
    """``O<id>`` on success, ``F<id>\\t<reason>`` on failure."""
    tid = tabescape(txid.encode())
    if error is None:
        return b"O" + tid + b"\n"
    return b"F" + tid + b"\t" + _clean_error(error) + b"\n"


# ---------------------------------------------------------------------------
# The state machine


@dataclass(slots=True)
class _Transaction:
    user: str
    ops: list[Op] = field(default_factory=list)
    failure: str | None = None
    size: int = 0  # bytes of the buffered values


_REPLY_DUE = frozenset(b"LICD")
TRANSACTION_VALUES_FACTOR = 64
_MAX_OPEN_TRANSACTIONS = 1024


class DictConnection:
    """One dict client connection: framing, parsing and transactions.

    Transactions are kept per connection and per id (Dovecot reuses id 1 on many
    connections at once, and may keep several open on one connection).
    """

    def __init__(self, max_line: int = DEFAULT_MAX_LINE, max_value: int | None = None) -> None:
        """``max_value``: a set whose value is longer fails its transaction when it
        arrives, and the value is not buffered; a transaction also fails once its
        buffered values pass ``TRANSACTION_VALUES_FACTOR * max_value`` bytes.  So an
        open transaction holds bounded memory until its ``C``.
        """
        self.max_line = max_line
        self.max_value = max_value
        self.dict_name = ""
        self.protocol_major = 0
        self._buf = bytearray()
        self._scan_from = 0
        self._discarding = False
        self._discard_head = b""
        self._transactions: dict[str, _Transaction] = {}
        self.errors = 0

    # -- input ------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        self._buf += data

    @property
    def open_transactions(self) -> int:
        return len(self._transactions)

    def next_event(self) -> Event | None:
        """The next event (owed a reply, or carrying state), or None until more bytes arrive."""
        while True:
            line = self._next_line()
            if line is None:
                return None
            if line is _OVERSIZED:
                ev = self._oversized(self._discard_head)
            else:
                ev = self._handle_line(line)  # type: ignore[arg-type]
            if ev is not None:
                return ev

    def events(self) -> list[Event]:
        out: list[Event] = []
        while (ev := self.next_event()) is not None:
            out.append(ev)
        return out

    def _next_line(self) -> bytes | object | None:
        buf = self._buf
        nl = buf.find(b"\n", self._scan_from)
        if nl < 0:
            if len(buf) > self.max_line:
                if not self._discarding:
                    self._discarding = True
                    self._discard_head = bytes(buf[:64])
                del buf[:]
            self._scan_from = len(buf)
            return None
        if self._discarding or nl > self.max_line:
            if not self._discarding:
                self._discard_head = bytes(buf[:64])
            self._discarding = False
            del buf[: nl + 1]
            self._scan_from = 0
            return _OVERSIZED
        line = bytes(buf[:nl])
        del buf[: nl + 1]
        self._scan_from = 0
        return line

    # -- parsing ----------------------------------------------------------
    def _fail(self, letter: int | None, reason: str) -> Event | None:
        self.errors += 1
        log.warning("dict protocol error: %s", reason)
        if letter is None or letter not in _REPLY_DUE:
            return None
        if letter in b"CD":
            return Refusal(b"F\t" + _clean_error(reason) + b"\n", reason)
        return Refusal(b"F" + _clean_error(reason) + b"\n", reason)

    def _oversized(self, head: bytes) -> Event | None:
        letter = head[0] if head else None
        reason = f"line longer than {self.max_line} bytes"
        if letter in (ord("S"), ord("A"), ord("U")):
            txid = head[1:].split(b"\t", 1)[0]
            tx = self._transactions.get(txid.decode("ascii", "replace"))
            if tx is not None:
                tx.failure = tx.failure or reason
        if letter in (ord("C"), ord("D")):
            txid = head[1:].split(b"\t", 1)[0].decode("ascii", "replace")
            self._transactions.pop(txid, None)
        return self._fail(letter, reason)

    def _handle_line(self, line: bytes) -> Event | None:
        if not line:
            return self._fail(None, "empty line")
        letter = line[0]
        try:
            fields = split_fields(line[1:])
            return _HANDLERS.get(letter, DictConnection._unknown)(self, fields)
        except _BadCommand as exc:
            return self._fail(letter, f"{chr(letter)!r}: {exc}")

    def _unknown(self, fields: list[bytes]) -> Event | None:
        raise _BadCommand("unknown command")

    def _hello(self, f: list[bytes]) -> Event | None:
        if len(f) < 2:
            raise _BadCommand("short hello")
        self.protocol_major = _int(f[0])
        minor = _int(f[1])
        self.dict_name = _text(f[4]) if len(f) >= 5 else ""
        return Hello(self.protocol_major, minor, self.dict_name)

    def _lookup(self, f: list[bytes]) -> Event | None:
        if len(f) < 2:
            raise _BadCommand("lookup without user")
        return Lookup(f[0], _user(f[1]))

    def _iterate(self, f: list[bytes]) -> Event | None:
        if len(f) < 4:
            raise _BadCommand("iterate needs flags, max_rows, prefix and user")
        return Iterate(_int(f[0]), _int(f[1]), f[2], _user(f[3]))

    def _begin(self, f: list[bytes]) -> Event | None:
        if len(f) < 2:
            raise _BadCommand("begin without user")
        txid = _text(f[0])
        if not txid:
            raise _BadCommand("empty transaction id")
        if txid not in self._transactions and len(self._transactions) >= _MAX_OPEN_TRANSACTIONS:
            raise _BadCommand("too many open transactions")
        self._transactions[txid] = _Transaction(_user(f[1]))
        return None

    def _tx(self, f: list[bytes]) -> _Transaction:
        if not f:
            raise _BadCommand("missing transaction id")
        tx = self._transactions.get(_text(f[0]))
        if tx is None:
            raise _BadCommand(f"unknown transaction id {_text(f[0])!r}")
        return tx

    def _set(self, f: list[bytes]) -> Event | None:
        tx = self._tx(f)
        if len(f) < 3:
            tx.failure = tx.failure or "set without value"
            raise _BadCommand("set without value")
        if tx.failure is not None:
            return None  # already refused at commit: keep nothing more
        value = f[2]
        limit = self.max_value
        if limit is not None:
            if len(value) > limit:
                tx.failure = f"value of {len(value)} bytes exceeds the limit of {limit} bytes"
                tx.ops.clear()
                return None
            tx.size += len(value)
            if tx.size > TRANSACTION_VALUES_FACTOR * limit:
                tx.failure = "transaction too large"
                tx.ops.clear()
                return None
        tx.ops.append(SetOp(f[1], value))
        return None

    def _unset(self, f: list[bytes]) -> Event | None:
        tx = self._tx(f)
        if len(f) < 2:
            tx.failure = tx.failure or "unset without key"
            raise _BadCommand("unset without key")
        tx.ops.append(UnsetOp(f[1]))
        return None

    def _atomic_inc(self, f: list[bytes]) -> Event | None:
        tx = self._tx(f)
        try:
            if len(f) < 3:
                raise _BadCommand("atomic increment needs key and diff")
            tx.ops.append(IncOp(f[1], _int(f[2], signed=True)))
        except _BadCommand:
            tx.failure = tx.failure or "bad atomic increment"
            raise
        return None

    def _no_reply_tx_option(self, f: list[bytes]) -> Event | None:
        # T (timestamp) and V (hide log values) only tune a transaction.
        self._tx(f)
        return None

    def _rollback(self, f: list[bytes]) -> Event | None:
        if not f or self._transactions.pop(_text(f[0]), None) is None:
            raise _BadCommand("rollback of unknown transaction")
        return None

    def _commit(self, f: list[bytes]) -> Event | None:
        if not f:
            raise _BadCommand("commit without id")
        txid = _text(f[0])
        tx = self._transactions.pop(txid, None)
        if tx is None:
            self.errors += 1
            log.warning("dict protocol error: commit of unknown transaction %r", txid)
            return Refusal(commit_reply(txid, "unknown transaction"), "unknown transaction")
        if tx.failure is not None:
            return Refusal(commit_reply(txid, tx.failure), tx.failure)
        return Commit(txid, tx.user, tuple(tx.ops), self.dict_name)


class _BadCommand(Exception):
    pass


_OVERSIZED = object()


def _int(raw: bytes, signed: bool = False) -> int:
    s = raw.strip(b" ")
    body = s[1:] if signed and s[:1] == b"-" else s
    if not body.isdigit() or len(body) > 20:
        raise _BadCommand(f"not a number: {raw[:20]!r}")
    return int(s)


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _BadCommand("field is not UTF-8") from None


def _user(raw: bytes) -> str:
    user = _text(raw)
    if not user:
        raise _BadCommand("empty user name")
    return user


_HANDLERS = {
    ord("H"): DictConnection._hello,
    ord("L"): DictConnection._lookup,
    ord("I"): DictConnection._iterate,
    ord("B"): DictConnection._begin,
    ord("S"): DictConnection._set,
    ord("U"): DictConnection._unset,
    ord("A"): DictConnection._atomic_inc,
    ord("T"): DictConnection._no_reply_tx_option,
    ord("V"): DictConnection._no_reply_tx_option,
    ord("R"): DictConnection._rollback,
    ord("C"): DictConnection._commit,
    ord("D"): DictConnection._commit,
}
