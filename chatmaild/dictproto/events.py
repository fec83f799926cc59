"""The events a :class:`DictConnection` hands to the server, and what each one owes.

Only :class:`Lookup`, :class:`Iterate`, :class:`Commit` and :class:`Refusal` owe a
reply (exactly one, through :meth:`DictConnection.send`); :class:`Hello` owes none.
The commands ``B S U A T V R`` produce no event at all: they only change the
connection's open transactions, so there is nothing a server could answer them with.
"""

from __future__ import annotations

from dataclasses import dataclass

# Dovecot iterate flags (dict.h)
ITER_RECURSE = 0x01
ITER_NO_VALUE = 0x08
ITER_EXACT_KEY = 0x10


@dataclass(frozen=True, slots=True)
class Hello:
    """``H``: the protocol version the peer speaks and the dict name.  Never answered."""

    major: int
    minor: int
    dict_name: str


@dataclass(frozen=True, slots=True)
class Lookup:
    """``L``: owes one of ``Found``, ``NOT_FOUND`` or ``Failure``."""

    key: bytes
    user: str


@dataclass(frozen=True, slots=True)
class Iterate:
    """``I``: owes ``Rows`` (sent as rows under ``prefix`` plus the end line) or ``Failure``."""

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
    """``C`` (or 2.3's ``D``): a transaction to apply atomically.

    Owes ``COMMITTED``, ``COMMIT_NOTFOUND`` or ``Failure``.  ``expire_secs`` is the
    third field of Dovecot 2.4's ``B`` (0, the only value seen, means no expiry).
    """

    txid: str
    user: str
    ops: tuple[Op, ...]
    dict_name: str
    expire_secs: int = 0


@dataclass(frozen=True, slots=True)
class Refusal:
    """A command that owes a reply but cannot be served (malformed, unknown id, too long).

    ``command`` is its letter (``L``, ``I``, ``C`` or ``D``); ``txid`` the transaction
    a commit named (empty when unreadable).  Answered with its own failure:
    ``send(refusal)`` gives ``F<reason>``, or ``F<id>\\t<reason>`` for a commit.
    """

    command: str
    reason: str
    txid: str = ""


Event = Hello | Lookup | Iterate | Commit | Refusal
ReplyOwing = Lookup | Iterate | Commit | Refusal
