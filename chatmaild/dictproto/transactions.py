"""Connection state: the transactions open on one dict connection.

Kept per connection and per id: Dovecot reuses id 1 on many connections at once and
may keep several transactions open on one.  Each holds bounded memory until its
``C``: a value over ``max_value`` fails its transaction when it arrives (and is not
kept), and so does a transaction whose values pass ``TRANSACTION_VALUES_FACTOR *
max_value`` bytes.  A failed transaction keeps nothing more and is refused at commit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from chatmail_common.logclip import clip

from .errors import RemoteProtocolError
from .events import Commit, Op, Refusal, SetOp

TRANSACTION_VALUES_FACTOR = 64
MAX_OPEN_TRANSACTIONS = 1024


@dataclass(slots=True)
class _Transaction:
    user: str
    expire_secs: int
    ops: list[Op] = field(default_factory=list)
    failure: str | None = None
    size: int = 0  # bytes of the buffered values

    def fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
        self.ops.clear()


class OpenTransactions:
    __slots__ = ("max_value", "_open")

    def __init__(self, max_value: int | None = None) -> None:
        self.max_value = max_value
        self._open: dict[str, _Transaction] = {}

    def __len__(self) -> int:
        return len(self._open)

    def begin(self, txid: str, user: str, expire_secs: int) -> None:
        if txid not in self._open and len(self._open) >= MAX_OPEN_TRANSACTIONS:
            raise RemoteProtocolError("too many open transactions")
        self._open[txid] = _Transaction(user, expire_secs)

    def _get(self, txid: str) -> _Transaction:
        tx = self._open.get(txid)
        if tx is None:
            raise RemoteProtocolError(f"unknown transaction id {clip(repr(txid))}")
        return tx

    def check_open(self, txid: str) -> None:
        self._get(txid)

    def add(self, txid: str, op: Op) -> None:
        tx = self._get(txid)
        if tx.failure is not None:
            return  # refused at commit anyway: keep nothing more
        limit = self.max_value
        if limit is not None and type(op) is SetOp:
            size = len(op.value)
            if size > limit:
                tx.fail(f"value of {size} bytes exceeds the limit of {limit} bytes")
                return
            tx.size += size
            if tx.size > TRANSACTION_VALUES_FACTOR * limit:
                tx.fail("transaction too large")
                return
        tx.ops.append(op)

    def fail(self, txid: str, reason: str) -> None:
        """Fail ``txid`` if it is open (a line of it could not be read)."""
        tx = self._open.get(txid)
        if tx is not None:
            tx.fail(reason)

    def rollback(self, txid: str) -> None:
        if self._open.pop(txid, None) is None:
            raise RemoteProtocolError("rollback of unknown transaction")

    def drop(self, txid: str) -> None:
        self._open.pop(txid, None)

    def finish(self, txid: str, command: str, dict_name: str) -> Commit | Refusal | None:
        """Close ``txid``: its commit, its refusal if it failed, None if it is not open."""
        tx = self._open.pop(txid, None)
        if tx is None:
            return None
        if tx.failure is not None:
            return Refusal(command, tx.failure, txid)
        return Commit(txid, tx.user, tuple(tx.ops), dict_name, tx.expire_secs)
