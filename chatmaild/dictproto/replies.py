"""Replies: what a server may answer each event with, and the bytes Dovecot gets for it.

A server never writes bytes of its own.  It answers an event with a typed reply:

* ``Lookup``: ``Found(value)`` (``O<value>``), ``NOT_FOUND`` (``N``) or ``Failure``
  (``F<reason>``);
* ``Iterate``: ``Rows(rows)`` (``O<key>\\t<value>`` per row under the prefix, then an
  empty line) or ``Failure`` (``F<reason>`` instead of the end line);
* ``Commit``: ``COMMITTED`` (``O<id>``), ``COMMIT_NOTFOUND`` (``N<id>``) or ``Failure``
  (``F<id>\\t<reason>``);
* ``Refusal``: nothing (its own failure) or a ``Failure``, as for its command;

and :meth:`DictConnection.send` (the only way a server produces output) checks that
the event is owed a reply, then calls :func:`encode_reply`, which refuses any other
pairing with :class:`LocalProtocolError`.  Why so strict: a reply Dovecot does not
expect crashes its imap process (unknown letter: SIGSEGV on 2.3; an iterate key outside
the prefix or without a TAB: assertion panic) or silently shifts later answers.  The
builders below can only emit the letters O, N and F, rows only under the prefix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .errors import LocalProtocolError
from .escaping import tabescape
from .events import ITER_EXACT_KEY, ITER_NO_VALUE, Commit, Iterate, Lookup, Refusal
from .sentinels import Sentinel

# ---------------------------------------------------------------------------
# Typed replies


@dataclass(frozen=True, slots=True)
class Found:
    """A lookup's value."""

    value: bytes


class NOT_FOUND(Sentinel, metaclass=Sentinel):
    """A lookup of a key that has no value (IMAP ``NIL``)."""


@dataclass(frozen=True, slots=True)
class Rows:
    """An iteration's ``(key, value)`` rows; those outside the prefix are dropped."""

    rows: Iterable[tuple[bytes, bytes]]


class COMMITTED(Sentinel, metaclass=Sentinel):
    """The transaction was applied."""


class COMMIT_NOTFOUND(Sentinel, metaclass=Sentinel):
    """Applied, but an increment found no key (success for Dovecot)."""


@dataclass(frozen=True, slots=True)
class Failure:
    """Any event's failure; ``reason`` reaches Dovecot's log (and the IMAP ``NO``)."""

    reason: str


LookupReply = Found | type[NOT_FOUND] | Failure
IterateReply = Rows | Failure
CommitReply = type[COMMITTED] | type[COMMIT_NOTFOUND] | Failure
Reply = Found | type[NOT_FOUND] | Rows | type[COMMITTED] | type[COMMIT_NOTFOUND] | Failure


def lookup_result(value: bytes | None) -> Found | type[NOT_FOUND]:
    """``Found(value)``, or ``NOT_FOUND`` for None."""
    return NOT_FOUND if value is None else Found(value)


# ---------------------------------------------------------------------------
# Wire builders: one line each (iterate: rows plus the end line), letters O, N, F only.


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


iterate_failure = lookup_failure  # the same line: F<reason> instead of the end line


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
# Which reply each event takes, and its bytes


def _refusal(ev: Refusal, reason: str) -> bytes:
    if ev.command in ("C", "D"):
        return commit_reply(ev.txid, reason)
    return lookup_failure(reason)


def _found(ev: Lookup, reply: Found) -> bytes:
    return b"O" + tabescape(reply.value) + b"\n"  # lookup_reply, one call less: the hot path


Encoder = Callable[[Any, Any], bytes]
# event type -> reply type -> bytes; a pairing missing here is a LocalProtocolError.
ENCODERS: dict[type, dict[type, Encoder]] = {
    Lookup: {
        Found: _found,
        NOT_FOUND: lambda ev, r: b"N\n",
        Failure: lambda ev, r: lookup_failure(r.reason),
    },
    Iterate: {
        Rows: lambda ev, r: iterate_reply(ev.prefix, r.rows, ev.flags, ev.max_rows),
        Failure: lambda ev, r: iterate_failure(r.reason),
    },
    Commit: {
        COMMITTED: lambda ev, r: commit_reply(ev.txid),
        COMMIT_NOTFOUND: lambda ev, r: commit_notfound(ev.txid),
        Failure: lambda ev, r: commit_reply(ev.txid, r.reason),
    },
    Refusal: {
        type(None): lambda ev, r: _refusal(ev, ev.reason),
        Failure: lambda ev, r: _refusal(ev, r.reason),
    },
}
REPLY_TYPES = frozenset(kind for table in ENCODERS.values() for kind in table) - {type(None)}


def encode_reply(event: object, reply: object = None) -> bytes:
    """The bytes for ``reply`` to ``event``; :class:`LocalProtocolError` if it cannot take it.

    Stateless: whether the event is still owed a reply is the connection's business
    (:meth:`DictConnection.send`, which servers use).
    """
    table = ENCODERS.get(type(event))
    if table is None:
        raise LocalProtocolError(f"{type(event).__name__} owes no reply")
    encode = table.get(type(reply))
    if encode is None:
        allowed = ", ".join(_name(kind) for kind in table)
        raise LocalProtocolError(
            f"a {type(event).__name__} is answered with {allowed}, not {_name(type(reply))}"
        )
    return encode(event, reply)


def _name(kind: type) -> str:
    return "nothing" if kind is type(None) else kind.__name__
