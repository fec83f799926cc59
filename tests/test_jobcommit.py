"""The notifier's group commit: many workers' claims and finishes in one transaction each,
an attempt on disk before ``claim`` returns, nothing queued lost at ``close``."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest
from helpers_chatmaild import T0

from chatmaild import jobcommit
from chatmaild.database import Writer, write_lock
from chatmaild.jobcommit import JobCommitter
from chatmaild.jobqueue import Job, RetryPolicy
from chatmaild.jobstore import CLAIM, FINISH, RESCHEDULE, JobStore


def make_jobs(path: Path, count: int) -> list[Job]:
    store = JobStore.open(path)
    try:
        with Writer(store.conn).transaction():
            return [
                job
                for i in range(count)
                for job in store.enqueue(f"u{i}", [f"t{i}"], T0, RetryPolicy())
            ]
    finally:
        store.close()


def on_disk(path: Path) -> dict[int, tuple[int, float]]:
    """id -> (attempts, due), read on a connection of its own (what a restart would see)."""
    conn = sqlite3.connect(path)
    try:
        return {i: (a, d) for i, a, d in conn.execute("SELECT id, attempts, due FROM jobs")}
    finally:
        conn.close()


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "db.sqlite3"


def test_apply_runs_claims_finishes_and_reschedules_in_order_in_one_transaction(db):
    a, b, c = make_jobs(db, 3)
    store = JobStore.open(db)
    try:
        results = store.apply(
            [
                (CLAIM, a.id, 0.0, None),
                (FINISH, b.id, 0.0, None),
                (RESCHEDULE, c.id, T0 + 8, None),
                (CLAIM, b.id, 0, None),
            ]
        )
    finally:
        store.close()
    assert results[0] is not None and results[0].attempts == 1
    assert results[1:] == [None, None, None]  # b was finished before its claim: gone
    assert on_disk(db) == {a.id: (1, T0), c.id: (0, T0 + 8)}


def test_claims_and_finishes_that_queue_during_a_commit_share_the_next_one(db):
    jobs = make_jobs(db, 9)
    own = JobStore.open(db)
    committer = JobCommitter(JobStore.open(db))
    committer.start()
    claimed: list[Job | None] = []
    try:
        with write_lock(db):  # the committer is stuck on its first batch
            committer.finish(own, jobs[0].id)
            wait_until(lambda: committer.queued() == 0)  # taken into the stuck batch
            threads = [
                threading.Thread(target=lambda j=j: claimed.append(committer.claim(own, j.id)))
                for j in jobs[1:5]
            ]
            for t in threads:
                t.start()
            for j in jobs[5:]:
                committer.finish(own, j.id)
            wait_until(lambda: committer.queued() == 8)
            assert claimed == []  # no claim returns before its attempt is on disk
        for t in threads:
            t.join(10)
        assert committer.batches == 2 and committer.ops == 9
        assert sorted(j.attempts for j in claimed if j is not None) == [1, 1, 1, 1]
        assert on_disk(db) == {j.id: (1, T0) for j in jobs[1:5]}
    finally:
        committer.close()
        own.close()


@pytest.fixture
def running(db: Path):
    """A started committer and a worker's own store."""
    own = JobStore.open(db)
    committer = JobCommitter(JobStore.open(db))
    committer.start()
    yield committer, own
    committer.close()
    own.close()


def test_an_attempt_is_on_disk_when_claim_returns(db, running):
    committer, own = running
    (job,) = make_jobs(db, 1)
    assert committer.claim(own, job.id).attempts == 1
    assert on_disk(db) == {job.id: (1, T0)}  # another connection sees it: committed


def test_a_finish_not_yet_committed_leaves_the_counted_job_on_disk(db, running):
    """kill -9 between a push and its batch: the job is still there, attempt counted."""
    committer, own = running
    (job,) = make_jobs(db, 1)
    assert committer.claim(own, job.id).attempts == 1
    with write_lock(db):
        committer.finish(own, job.id)
        assert on_disk(db) == {job.id: (1, T0)}  # what a restart would resume
    wait_until(lambda: on_disk(db) == {})


def test_close_writes_what_is_queued_and_later_writes_use_the_callers_store(db):
    a, b = make_jobs(db, 2)
    own = JobStore.open(db)
    committer = JobCommitter(JobStore.open(db))
    committer.start()
    try:
        with write_lock(db):
            committer.reschedule(own, a.id, T0 + 64)
            wait_until(lambda: committer.queued() == 0)
            committer.finish(own, b.id)
            closing = threading.Thread(target=committer.close)
            closing.start()
        closing.join(10)
        assert on_disk(db) == {a.id: (0, T0 + 64)}
        committer.finish(own, a.id)  # after close: the caller's own transaction
        assert committer.claim(own, b.id) is None
        assert on_disk(db) == {}
    finally:
        own.close()


class Failing(JobStore):
    failures = 0

    def apply(self, ops):
        if self.failures:
            self.failures -= 1
            raise sqlite3.OperationalError("disk I/O error")
        return super().apply(ops)


def test_a_failed_batch_fails_its_claims_and_keeps_its_finishes(db, caplog):
    a, b = make_jobs(db, 2)
    own = JobStore.open(db)
    store = Failing.open(db)
    committer = JobCommitter(store)
    committer.start()
    try:
        store.failures = 1
        with pytest.raises(sqlite3.OperationalError):
            committer.claim(own, b.id)  # the worker puts the job back in the queue
        assert on_disk(db)[b.id] == (0, T0)
        store.failures = 1
        committer.finish(own, a.id)
        wait_until(lambda: a.id not in on_disk(db))  # written by the retried batch
        assert caplog.text.count("cannot write 1 job update(s): disk I/O error") == 2
    finally:
        committer.close()
        own.close()


class Blocking(JobStore):
    """apply() waits for ``release``, then fails (a disk error while the notifier stops)."""

    def __init__(self, conn) -> None:
        super().__init__(conn)
        self.entered = threading.Event()
        self.release = threading.Event()

    def apply(self, ops):
        self.entered.set()
        self.release.wait(10)
        raise sqlite3.OperationalError("disk I/O error")


def test_a_claim_queued_while_a_failing_batch_meets_close_still_returns(db):
    """The batch fails after close() began: every waiting claim gets its answer, none hangs."""
    a, b = make_jobs(db, 2)
    store = Blocking(JobStore.open(db).conn)
    committer = JobCommitter(store)
    committer.start()
    errors: dict[str, BaseException | None] = {}

    def claim(name: str, job_id: int) -> None:
        own = JobStore.open(db)
        try:
            committer.claim(own, job_id)
            errors[name] = None
        except BaseException as exc:
            errors[name] = exc
        finally:
            own.close()

    first = threading.Thread(target=claim, args=("a", a.id), daemon=True)
    first.start()
    assert store.entered.wait(10)  # the batch with a's claim is being written
    second = threading.Thread(target=claim, args=("b", b.id), daemon=True)
    second.start()
    wait_until(lambda: committer.queued() == 1)  # b's claim waits for the next batch
    closing = threading.Thread(target=committer.close, daemon=True)
    closing.start()
    wait_until(lambda: committer._closed)
    store.release.set()
    for t in (first, second, closing):
        t.join(10)
        assert not t.is_alive(), f"{t.name} hangs"
    assert isinstance(errors["a"], sqlite3.OperationalError)
    assert "b" in errors  # answered (an error: the worker puts the job back)
    assert on_disk(db) == {a.id: (0, T0), b.id: (0, T0)}


def test_ends_taken_by_a_transaction_are_written_by_it_or_given_back(db, monkeypatch):
    """The dict commit carries the queued finishes; rolled back, they go in a batch again."""
    monkeypatch.setattr(jobcommit, "LINGER", 60.0)  # no batch of its own during the test
    a, b = make_jobs(db, 2)
    own = JobStore.open(db)
    dict_conn = JobStore.open(db)  # the dict server's connection, its own transaction
    committer = JobCommitter(JobStore.open(db))
    committer.start()
    try:
        committer.finish(own, a.id)
        with Writer(dict_conn.conn).transaction():
            carried = committer.take_ends()
            dict_conn.carried(dict_conn.carry(carried))
        assert committer.queued() == 0 and committer.batches == 0
        assert on_disk(db) == {b.id: (0, T0)}  # a's row went with that commit
        committer.finish(own, b.id)
        with pytest.raises(RuntimeError), Writer(dict_conn.conn).transaction():
            carried = committer.take_ends()
            dict_conn.carry(carried)
            raise RuntimeError("the dict commit fails")
        committer.give_back(own, carried)
        assert on_disk(db) == {b.id: (0, T0)}  # rolled back: b still there, and still owed
        assert committer.queued() == 1
    finally:
        committer.close()  # writes what is queued
        own.close()
        dict_conn.close()
    assert on_disk(db) == {}
