"""Group commit (issue 11): concurrent dict transactions in one SQLite transaction.

Each transaction is still answered as if alone: ``O`` only once its data is committed,
``F`` for one that fails, and a failing one leaves nothing behind and costs the others
nothing.  The ``messagenew`` job stays atomic with its transaction.
"""

from __future__ import annotations

import asyncio
import sqlite3

from helpers_chatmaild import ALICE, BOB, Clock, make_backend, priv, wire

from chatmaild import dictproto as dp
from chatmaild.dictserver import DictProtocol, ServerStats
from chatmaild.groupcommit import GroupCommitter
from chatmaild.jobqueue import RetryPolicy
from chatmaild.jobstore import JobStore

HELLO = b"H3\t2\t0\t\tmetadata\n"
CAROL = "carol@example.org"


class JobHook:
    """The notifier's part that matters here: jobs written through the commit's conn."""

    def __init__(self) -> None:
        self.staged: list[int] = []
        self.woken: list[int] = []
        self.rollbacks = 0

    def message_new(self, conn: sqlite3.Connection, user, tokens, now) -> None:
        self.staged += [j.id for j in JobStore(conn).enqueue(user, tokens, now, RetryPolicy())]

    def rolled_back(self) -> None:
        self.rollbacks += 1
        self.staged.clear()

    def committed(self) -> None:
        self.woken += self.staged
        self.staged = []


def _backend(tmp_path, hook=None):
    return make_backend(tmp_path, clock=Clock(), hook=hook)


def _commit(txid: str, user: str, *ops: dp.Op) -> dp.Commit:
    return dp.Commit(txid, user, tuple(ops), "metadata")


def _rows(backend, sql: str) -> list[tuple]:
    return backend.store.conn.execute(sql).fetchall()


def _jobs(backend) -> list[tuple]:
    return _rows(backend, "SELECT user, token FROM jobs ORDER BY user")


def test_a_failing_transaction_costs_the_others_nothing(tmp_path):
    hook = JobHook()
    backend = _backend(tmp_path, hook)
    assert backend.commit(_commit("0", CAROL, dp.SetOp(priv("devicetoken"), b"tc"))) == dp.COMMITTED
    replies = backend.commit_many(
        [
            _commit("1", ALICE, dp.SetOp(priv("devicetoken"), b"ta")),
            # a good op before the refused one: it must not be half-written
            _commit("2", BOB, dp.SetOp(priv("x"), b"v"), dp.SetOp(b"bad/key", b"v")),
            _commit("3", CAROL, dp.SetOp(priv("messagenew"), b"")),
        ]
    )
    assert replies[0] == dp.COMMITTED and replies[2] == dp.COMMITTED
    assert isinstance(replies[1], dp.Failure) and "unsupported key" in replies[1].reason
    assert backend.store.valid_tokens(ALICE, int(backend.clock())) == ["ta"]
    assert backend.store.get_attribute(BOB, priv("x")) is None
    assert _jobs(backend) == [(CAROL, "tc")]
    assert hook.woken == [j for (j,) in _rows(backend, "SELECT id FROM jobs")]


def test_a_failure_after_a_staged_job_keeps_the_job_atomic(tmp_path):
    hook = JobHook()
    backend = _backend(tmp_path, hook)
    backend.commit(_commit("0", CAROL, dp.SetOp(priv("devicetoken"), b"tc")))
    replies = backend.commit_many(
        [
            _commit("1", CAROL, dp.SetOp(priv("messagenew"), b"")),
            _commit("2", BOB, dp.SetOp(priv("devicetoken"), b"")),  # refused: empty token
        ]
    )
    assert replies[0] == dp.COMMITTED and isinstance(replies[1], dp.Failure)
    assert hook.rollbacks == 1  # the first attempt's staged job was forgotten ...
    (job_id,) = _rows(backend, "SELECT id FROM jobs")[0]
    assert hook.woken == [job_id]  # ... and the job that is on disk is the one woken


def test_every_transaction_of_a_group_failing_alone(tmp_path):
    backend = _backend(tmp_path)
    replies = backend.commit_many(
        [_commit(str(i), ALICE, dp.SetOp(b"nope", b"v")) for i in range(3)]
    )
    assert all(isinstance(r, dp.Failure) for r in replies)


def test_when_commit_itself_fails_each_is_retried_on_its_own(tmp_path, monkeypatch):
    backend = _backend(tmp_path)
    real = backend.store.transaction
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise sqlite3.OperationalError("database is locked")
        return real()

    monkeypatch.setattr(backend.store, "transaction", flaky)
    replies = backend.commit_many(
        [_commit(str(i), ALICE, dp.SetOp(priv(f"k{i}"), b"v")) for i in range(3)]
    )
    assert replies == [dp.COMMITTED] * 3
    assert len(calls) == 4  # the group, then one transaction each
    assert [backend.store.get_attribute(ALICE, priv(f"k{i}")) for i in range(3)] == [b"v"] * 3


class FakeTransport:
    def __init__(self):
        self.written = b""

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return False

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass


def test_commits_arriving_together_share_one_transaction_and_replies_wait_for_it(tmp_path):
    backend = _backend(tmp_path)

    async def main():
        group = GroupCommitter(backend.commit_many, asyncio.get_running_loop())
        conns = []
        for _ in range(8):
            proto = DictProtocol(backend, dp.DEFAULT_MAX_LINE, ServerStats(), group)
            transport = FakeTransport()
            proto.connection_made(transport)
            conns.append((proto, transport))
        for i, (proto, _t) in enumerate(conns):
            key = b"bad/key" if i == 3 else priv("k")
            user = f"u{i}@example.org".encode()
            # a lookup behind the commit on the same connection: answered after it, and
            # it sees the committed value
            proto.data_received(
                HELLO
                + wire(b"B1\t" + user, b"S1\t" + key + b"\tv" + str(i).encode(), b"C1")
                + wire(b"L" + priv("k") + b"\t" + user)
            )
        assert all(t.written == b"" for _p, t in conns)  # nothing answered before COMMIT
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return group, [t.written for _p, t in conns]

    group, written = asyncio.run(main())
    assert group.groups == 1 and group.largest == 8
    for i, out in enumerate(written):
        if i == 3:
            assert out.startswith(b"F1\t") and out.endswith(b"\nN\n")
        else:
            assert out == b"O1\nOv" + str(i).encode() + b"\n"
    assert backend.store.get_attribute("u3@example.org", priv("k")) is None
