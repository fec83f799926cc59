"""Parsing: one line (without its LF) into an event or a transaction command.

Pure functions, one per command letter; which letters exist and what ``B`` carries
comes from the :class:`ProtocolVersion` (see ``versions.py``).  A line that cannot be
read raises :class:`RemoteProtocolError`; the connection decides what that costs.
Fields are split on raw TAB and then unescaped; nothing is ever stripped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .errors import RemoteProtocolError
from .escaping import split_fields
from .events import Hello, IncOp, Iterate, Lookup, Op, SetOp, UnsetOp
from .versions import VERSIONS, ProtocolVersion

# -- transaction commands: what B S U A T V R C D mean to the connection state.
# They are not events: a server never sees them, so it can never answer them.


@dataclass(frozen=True, slots=True)
class Begin:
    txid: str
    user: str
    expire_secs: int


@dataclass(frozen=True, slots=True)
class AddOp:
    """``S``, ``U`` or ``A``: one more operation for an open transaction."""

    txid: str
    op: Op


@dataclass(frozen=True, slots=True)
class TuneTransaction:
    """``T`` (timestamp) or ``V`` (hide log values): only tunes a transaction."""

    txid: str


@dataclass(frozen=True, slots=True)
class Rollback:
    txid: str


@dataclass(frozen=True, slots=True)
class CommitRequest:
    txid: str
    command: str  # "C", or 2.3's "D"


Parsed = Hello | Lookup | Iterate | Begin | AddOp | TuneTransaction | Rollback | CommitRequest
Parser = Callable[[list[bytes], ProtocolVersion], Parsed]


# -- field readers


def read_int(raw: bytes, signed: bool = False) -> int:
    s = raw.strip(b" ")
    body = s[1:] if signed and s[:1] == b"-" else s
    if not body.isdigit() or len(body) > 20:
        raise RemoteProtocolError(f"not a number: {raw[:20]!r}")
    return int(s)


def read_text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RemoteProtocolError("field is not UTF-8") from None


def read_user(raw: bytes) -> str:
    user = read_text(raw)
    if not user:
        raise RemoteProtocolError("empty user name")
    return user


def read_txid(f: list[bytes]) -> str:
    if not f:
        raise RemoteProtocolError("missing transaction id")
    return read_text(f[0])


# -- one parser per command letter


def parse_hello(f: list[bytes], version: ProtocolVersion) -> Hello:
    if len(f) < 2:
        raise RemoteProtocolError("short hello")
    dict_name = read_text(f[4]) if len(f) >= 5 else ""
    return Hello(read_int(f[0]), read_int(f[1]), dict_name)


def parse_lookup(f: list[bytes], version: ProtocolVersion) -> Lookup:
    if len(f) < 2:
        raise RemoteProtocolError("lookup without user")
    return Lookup(f[0], read_user(f[1]))


def parse_iterate(f: list[bytes], version: ProtocolVersion) -> Iterate:
    if len(f) < 4:
        raise RemoteProtocolError("iterate needs flags, max_rows, prefix and user")
    return Iterate(read_int(f[0]), read_int(f[1]), f[2], read_user(f[3]))


def parse_begin(f: list[bytes], version: ProtocolVersion) -> Begin:
    if len(f) < 2:
        raise RemoteProtocolError("begin without user")
    txid = read_text(f[0])
    if not txid:
        raise RemoteProtocolError("empty transaction id")
    # Dovecot's own 2.4 server reads the expiry as optional; so do we.
    expire = read_int(f[2]) if version.begin_has_expire and len(f) >= 3 else 0
    return Begin(txid, read_user(f[1]), expire)


def parse_set(f: list[bytes], version: ProtocolVersion) -> AddOp:
    txid = read_txid(f)
    if len(f) < 3:
        raise RemoteProtocolError("set without value", txid)
    return AddOp(txid, SetOp(f[1], f[2]))


def parse_unset(f: list[bytes], version: ProtocolVersion) -> AddOp:
    txid = read_txid(f)
    if len(f) < 2:
        raise RemoteProtocolError("unset without key", txid)
    return AddOp(txid, UnsetOp(f[1]))


def parse_atomic_inc(f: list[bytes], version: ProtocolVersion) -> AddOp:
    txid = read_txid(f)
    if len(f) < 3:
        raise RemoteProtocolError("atomic increment needs key and diff", txid)
    try:
        return AddOp(txid, IncOp(f[1], read_int(f[2], signed=True)))
    except RemoteProtocolError as exc:
        raise RemoteProtocolError(exc.reason, txid) from None


def parse_tune(f: list[bytes], version: ProtocolVersion) -> TuneTransaction:
    return TuneTransaction(read_txid(f))


def parse_rollback(f: list[bytes], version: ProtocolVersion) -> Rollback:
    if not f:
        raise RemoteProtocolError("rollback of unknown transaction")
    return Rollback(read_text(f[0]))


def _commit_parser(command: str) -> Parser:
    def parse_commit(f: list[bytes], version: ProtocolVersion) -> CommitRequest:
        if not f:
            raise RemoteProtocolError("commit without id")
        return CommitRequest(read_text(f[0]), command)

    return parse_commit


PARSERS: dict[int, Parser] = {
    ord("H"): parse_hello,
    ord("L"): parse_lookup,
    ord("I"): parse_iterate,
    ord("B"): parse_begin,
    ord("S"): parse_set,
    ord("U"): parse_unset,
    ord("A"): parse_atomic_inc,
    ord("T"): parse_tune,
    ord("V"): parse_tune,
    ord("R"): parse_rollback,
    ord("C"): _commit_parser("C"),
    ord("D"): _commit_parser("D"),
}

# The parsers of each version's letters: one dict lookup per line finds the command.
PARSERS_BY_VERSION: dict[ProtocolVersion, dict[int, Parser]] = {
    v: {letter: PARSERS[letter] for letter in v.commands} for v in VERSIONS
}


def parse_line(line: bytes, parsers: dict[int, Parser], version: ProtocolVersion) -> Parsed:
    """One non-empty line; ``parsers`` is ``PARSERS_BY_VERSION[version]``."""
    parser = parsers.get(line[0])
    if parser is None:
        raise RemoteProtocolError("unknown command")
    return parser(split_fields(line[1:]), version)
