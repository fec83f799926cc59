"""A job for a token with no push in flight is written claimed by the dict commit itself."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_notifier import USER, Relay, wait_until

from chatmail_common.outcome import Outcome
from chatmaild import jobcommit
from chatmaild.jobstore import JobStore
from chatmaild.outcomelog import SENT, PushRecord, counts_since, record_many
from chatmaild.pushtransport import PushAnswer
from devstack.pushsink import PushSink


@pytest.fixture
def relay(tmp_path: Path, sink: PushSink) -> Iterator[Relay]:
    """A started relay whose one user has the token ``phone``; the sink holds its answers
    (every push stays in flight) until the test calls ``sink.release_answers()``."""
    sink.hold_answers()
    r = Relay(tmp_path, sink.url)
    r.notifier.start()
    r.add_token("phone")
    # Jobs are written claimed only for a worker already waiting: start() returns before
    # the worker threads reach the queue (CI once committed the first job before that).
    wait_until(lambda: r.notifier.queue.idle_takers() == r.notifier.workers)
    yield r
    sink.release_answers()  # a test that failed holding them: the workers stop at once
    r.close()


def _attempts(relay: Relay) -> list[int]:
    return [a for (a,) in relay.conn.execute("SELECT attempts FROM jobs ORDER BY id")]


def test_first_attempt_is_on_disk_with_the_commit_and_needs_no_claim(
    relay: Relay, sink: PushSink
) -> None:
    assert relay.new_mail().startswith(b"O")
    # Right after the C reply: the attempt is counted, before any request is sent.
    assert _attempts(relay) == [1]
    sink.release_answers()
    sink.wait_for(1)
    wait_until(lambda: relay.jobs() == 0)
    commits = relay.notifier._commits
    assert commits is not None
    assert commits.ops == 1  # the finish; no claim was written


def test_second_delivery_in_flight_waits_fresh_and_coalesces(relay: Relay, sink: PushSink) -> None:
    relay.new_mail()
    relay.new_mail()  # the first push is in flight (or about to be): a fresh job
    relay.new_mail()  # absorbed by that fresh job
    assert sorted(_attempts(relay)) == [0, 1]
    sink.release_answers()
    sink.wait_for(2)
    wait_until(lambda: relay.jobs() == 0)
    time.sleep(0.1)
    assert sink.bodies() == [b"phone", b"phone"]


def test_without_workers_jobs_stay_fresh(tmp_path: Path, sink: PushSink) -> None:
    relay = Relay(tmp_path, sink.url)  # not started: nobody would send a claimed job
    try:
        relay.add_token("phone")
        relay.new_mail()
        relay.new_mail()
        assert _attempts(relay) == [0]
    finally:
        relay.close()


def test_outcomes_of_a_batch_are_one_bucket_pruned_once_a_minute() -> None:
    conn = sqlite3.connect(":memory:")
    conn.execute(
        "CREATE TABLE push_outcomes (minute INTEGER, outcome TEXT, answer TEXT, count INTEGER,"
        " last_at REAL, PRIMARY KEY (minute, outcome, answer))"
    )
    now = 1_000_000.0
    conn.execute("INSERT INTO push_outcomes VALUES (1, 'sent', '200', 7, 60.0)")  # old bucket
    cutoff = record_many(conn, [PushRecord(SENT, "200", now + i) for i in range(3)])
    assert cutoff is not None
    assert counts_since(conn, now - 60) == {
        SENT: {"200": 3},
        "gone": {},
        "retried": {},
        "dropped": {},
    }
    assert conn.execute("SELECT count(*) FROM push_outcomes WHERE minute = 1").fetchone() == (0,)
    conn.execute("INSERT INTO push_outcomes VALUES (2, 'sent', '200', 1, 120.0)")
    # The same minute again: the cutoff has not moved, so nothing is deleted this time.
    assert record_many(conn, [PushRecord(SENT, "200", now + 5)], cutoff) == cutoff
    assert conn.execute("SELECT count(*) FROM push_outcomes WHERE minute = 2").fetchone() == (1,)
    assert conn.execute(
        "SELECT count, last_at FROM push_outcomes WHERE minute = ?", (int(now // 60),)
    ).fetchone() == (4, now + 5)


class _ScriptedTransport:
    """Answers GONE for the tokens in ``gone``, SENT otherwise; records every push."""

    def __init__(self, gone: set[str]) -> None:
        self.gone = gone
        self.pushed: list[str] = []

    def push(self, token: str) -> PushAnswer:
        self.pushed.append(token)
        if token in self.gone:
            return PushAnswer(Outcome.GONE, "410")
        return PushAnswer(Outcome.SENT, "200")

    def close(self) -> None:
        pass


def test_a_stale_ticket_takes_nobody_elses_job_and_ids_are_not_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ticket left over for a deleted job (parked behind a push answered GONE) finds its
    row gone and does nothing.  Job ids are never handed out again (AUTOINCREMENT): with plain
    rowids the next job took the deleted one's id, so the stale ticket claimed another
    token's job written claimed since (its attempt counted twice) and, before the tickets
    were matched by token, freed the wrong key (that token's pushes parked for good)."""
    relay = Relay(tmp_path, "http://127.0.0.1:9/unused", workers=0)  # tickets run by hand
    relay.notifier.start()
    notifier = relay.notifier
    # The tickets are run by this test, standing in for idle workers: jobs are written
    # claimed only while a worker waits to take them.
    monkeypatch.setattr(notifier.queue, "idle_takers", lambda: 4)
    store = JobStore.open(relay.db_path)
    transport = _ScriptedTransport(gone={"dead"})
    try:
        for user, token in [
            ("keep@x.org", "keep"),
            (USER, "dead"),
            ("b@x.org", "b"),
            ("d@x.org", "d"),
        ]:
            relay.add_token(token, user=user)
        relay.new_mail("keep@x.org")  # job 1, stays on disk (its ticket is never run)
        relay.new_mail()  # job 2, written claimed: the push to "dead"
        relay.new_mail()  # job 3, fresh: waits for it
        tickets = {notifier.queue.get()[0]: None for _ in range(3)}
        assert sorted(tickets) == [1, 2, 3]
        notifier._run(store, transport, (3, USER, "dead"))  # parked behind job 2
        notifier._run(store, transport, (2, USER, "dead"))  # GONE: jobs 2 and 3 deleted
        assert transport.pushed == ["dead"]
        stale = notifier.queue.get()
        assert stale == (3, USER, "dead")  # job 3's ticket is back, its row is gone
        relay.new_mail("b@x.org")
        relay.new_mail("d@x.org")  # written claimed for "d"
        ids = [i for (i,) in relay.conn.execute("SELECT id FROM jobs ORDER BY id")]
        assert ids == [1, 4, 5]  # not 2 and 3 again
        notifier._run(store, transport, stale)
        assert relay.conn.execute("SELECT id, attempts FROM jobs WHERE id = 5").fetchall() == [
            (5, 1)  # the claim at enqueue only
        ]
        for _ in range(2):
            notifier._run(store, transport, notifier.queue.get())
        assert sorted(transport.pushed) == ["b", "d", "dead"]  # "d" once, by its own ticket
        assert ("d@x.org", "d") not in notifier._in_flight
        relay.new_mail("d@x.org")  # the next delivery to "d" is sent, not parked for good
        notifier._run(store, transport, notifier.queue.get())
        assert transport.pushed.count("d") == 2
    finally:
        store.close()
        relay.close()


def test_a_job_no_idle_worker_can_take_is_written_fresh(tmp_path: Path, sink: PushSink) -> None:
    """Pre-claiming counts the attempt at enqueue: only right for a job a worker takes at
    once.  One queued behind busy workers stays fresh, or a kill -9 would cost it an
    attempt it never made (with max_attempts=1 it would be dropped unsent)."""
    sink.hold_answers()  # the one worker stays busy with "phone" until released
    relay = Relay(tmp_path, sink.url, workers=1)
    try:
        relay.notifier.start()
        relay.add_token("phone", user="a@example.org")
        relay.add_token("tablet", user="b@example.org")
        wait_until(lambda: relay.notifier.queue.idle_takers() == 1)
        assert relay.new_mail(user="a@example.org").startswith(b"O")
        wait_until(lambda: relay.notifier.queue.idle_takers() == 0)  # busy with "phone"
        assert relay.new_mail(user="b@example.org").startswith(b"O")
        rows = dict(relay.conn.execute("SELECT token, attempts FROM jobs"))
        assert rows["tablet"] == 0
        sink.release_answers()
        sink.wait_for(2, timeout=10)
        wait_until(lambda: relay.jobs() == 0)
        assert sorted(sink.bodies()) == [b"phone", b"tablet"]
    finally:
        sink.release_answers()
        relay.close()


def test_idle_takers_are_waiting_threads_less_the_items_due() -> None:
    from chatmaild.duequeue import Closed, DueQueue

    now = [0.0]
    queue: DueQueue[str] = DueQueue(lambda: now[0])
    for due, item in ((10.0, "a"), (20.0, "b"), (30.0, "c")):
        queue.put(due, item)

    def take() -> None:
        with contextlib.suppress(Closed):
            queue.get()

    threads = [threading.Thread(target=take) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: queue.idle_takers() == 2)  # nothing due: both are spare
        now[0] = 15.0  # "a" is due (the sleepers have not looked yet): one is owed to it
        assert queue.idle_takers() == 1
        now[0] = 100.0  # three due, two waiting: none spare
        assert queue.idle_takers() == 0
    finally:
        queue.close()
        for t in threads:
            t.join(5)


def test_a_finish_rides_along_with_the_next_delivery(
    tmp_path: Path, sink: PushSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No batch of the committer's own: the next dict commit with new mail deletes the job."""
    monkeypatch.setattr(jobcommit, "LINGER", 60.0)  # the committer alone would wait a minute
    relay = Relay(tmp_path, sink.url)
    relay.notifier.start()
    try:
        relay.add_token("phone-a", user="a@example.org")
        relay.add_token("phone-b", user="b@example.org")
        relay.new_mail(user="a@example.org")
        sink.wait_for(1)
        commits = relay.notifier._commits
        assert commits is not None
        wait_until(lambda: commits.queued() == 1)  # a's finish, not written yet
        assert relay.new_mail(user="b@example.org").startswith(b"O")
        assert [u for (u,) in relay.conn.execute("SELECT user FROM jobs")] == ["b@example.org"]
        assert commits.batches == 0
        assert counts_since(relay.conn, 0)[SENT] == {"200": 1}  # a's outcome, same commit
    finally:
        relay.close()
