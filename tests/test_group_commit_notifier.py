"""Group commit with the real Notifier as the new-mail hook: every delivery whose
transaction committed wakes exactly its job, once; a rolled-back one wakes none, also
when the group is rolled back and retried (without the failing one, or one at a time)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3

from helpers_chatmaild import ALICE, BOB, Clock, make_backend, priv, wire
from test_group_commit import FakeTransport

from chatmaild import dictproto as dp
from chatmaild.dictserver import DictProtocol, ServerStats
from chatmaild.groupcommit import GroupCommitter
from chatmaild.jobstore import JobStore
from chatmaild.notifier import Notifier

CAROL = "carol@example.org"


def _commit(txid: str, user: str, *ops: dp.Op) -> dp.Commit:
    return dp.Commit(txid, user, tuple(ops), "metadata")


def _new_mail(txid: str, user: str) -> dp.Commit:
    return _commit(txid, user, dp.SetOp(priv("messagenew"), b""))


def _setup(tmp_path):
    notifier = Notifier(
        functools.partial(JobStore.open, tmp_path / "db.sqlite3"), lambda: None, workers=1
    )
    backend = make_backend(tmp_path, clock=Clock(), hook=notifier)
    for user, token in ((ALICE, "ta"), (CAROL, "tc")):
        backend.commit(_commit("t", user, dp.SetOp(priv("devicetoken"), token.encode())))
    return backend, notifier


def _queued(notifier: Notifier) -> list[tuple[int, str, str]]:
    return sorted(item for _due, _seq, item in notifier.queue._heap)


def _on_disk(backend) -> list[tuple[int, str, str]]:
    return sorted(backend.store.conn.execute("SELECT id, user, token FROM jobs").fetchall())


def test_a_refused_transaction_in_the_group_wakes_nothing_and_the_others_once(tmp_path):
    backend, notifier = _setup(tmp_path)
    replies = backend.commit_many(
        [
            _new_mail("1", ALICE),
            _commit("2", BOB, dp.SetOp(b"bad/key", b"v")),
            _new_mail("3", CAROL),
            _new_mail("4", ALICE),  # a second delivery: coalesced into the fresh job
        ]
    )
    assert [type(r) for r in replies] == [type(dp.COMMITTED), dp.Failure, *[type(dp.COMMITTED)] * 2]
    assert _queued(notifier) == _on_disk(backend)
    assert [(u, t) for _, u, t in _queued(notifier)] == [(ALICE, "ta"), (CAROL, "tc")]
    assert notifier.metrics.queued._value.get() == 2


def test_a_group_whose_commit_fails_is_retried_one_by_one_and_enqueued_once(tmp_path, monkeypatch):
    backend, notifier = _setup(tmp_path)
    real = backend.store.transaction
    calls = []

    @contextlib.contextmanager
    def commit_fails_once():
        calls.append(1)
        with real() as conn:
            yield conn
            if len(calls) == 1:  # the group's statements ran; its COMMIT fails
                raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(backend.store, "transaction", commit_fails_once)
    replies = backend.commit_many([_new_mail("1", ALICE), _new_mail("2", CAROL)])
    assert replies == [dp.COMMITTED, dp.COMMITTED]
    assert len(calls) == 3
    assert _queued(notifier) == _on_disk(backend)
    assert len(_on_disk(backend)) == 2
    assert notifier.metrics.queued._value.get() == 2  # staged once each, not per round


def test_a_connection_lost_while_its_commit_waits_costs_the_others_nothing(tmp_path):
    """Its transaction is still written (Dovecot may not learn it); the others get their
    replies in order, one per commit, pipelined commits each in a later group."""
    backend, notifier = _setup(tmp_path)
    hello = b"H3\t2\t0\t\tmetadata\n"

    async def main():
        group = GroupCommitter(backend.commit_many, asyncio.get_running_loop())
        conns = [
            (DictProtocol(backend, dp.DEFAULT_MAX_LINE, ServerStats(), group), FakeTransport())
            for _ in range(2)
        ]
        for proto, transport in conns:
            proto.connection_made(transport)
        (alice, ta), (carol, tc) = conns
        alice.data_received(
            hello
            + wire(b"B1\t" + ALICE.encode(), b"S1\t" + priv("messagenew") + b"\t", b"C1")
            + wire(b"B2\t" + ALICE.encode(), b"S2\t" + priv("k") + b"\tv", b"C2")
        )
        carol.data_received(
            hello + wire(b"B1\t" + CAROL.encode(), b"S1\t" + priv("messagenew") + b"\t", b"C1")
        )
        tc.is_closing = lambda: True  # closed: nothing may be written any more
        carol.connection_lost(None)
        for _ in range(4):
            await asyncio.sleep(0)
        return group, ta.written, tc.written

    group, alice_out, carol_out = asyncio.run(main())
    assert alice_out == b"O1\nO2\n"
    assert carol_out == b""
    assert group.groups == 2
    assert [u for _, u, _ in _queued(notifier)] == [ALICE, CAROL]
    assert backend.store.get_attribute(ALICE, priv("k")) == b"v"


def test_a_group_retried_without_its_refused_one_counts_and_logs_each_commit_once(tmp_path, caplog):
    """The rounds before the final COMMIT were rolled back: what they counted and logged
    never happened. A coalesced delivery counts once, a token removal is logged once."""
    backend, notifier = _setup(tmp_path)
    backend.commit(_commit("t", BOB, dp.SetOp(priv("devicetoken"), b"tb")))
    backend.commit(_new_mail("0", ALICE))  # a fresh job: the next delivery coalesces into it
    assert notifier.metrics.coalesced._value.get() == 0
    caplog.set_level("INFO", logger="chatmaild.metadata")
    replies = backend.commit_many(
        [
            _new_mail("1", ALICE),
            _commit("2", BOB, dp.UnsetOp(priv("devicetoken"))),
            _commit("3", CAROL, dp.SetOp(b"bad/key", b"v")),
        ]
    )
    assert [type(r) for r in replies] == [*[type(dp.COMMITTED)] * 2, dp.Failure]
    assert notifier.metrics.coalesced._value.get() == 1
    removals = [r.getMessage() for r in caplog.records if "device tokens" in r.getMessage()]
    assert removals == [f"removed 1 device tokens of {BOB}"]
