"""Notifier workers survive what kills a thread: no transport or database yet, a stray exception.

Issue 10, finding 1: at the fd limit every worker died building its HTTP client and
no push left until a restart.  Workers now retry opening their resources with backoff,
and a worker whose loop raises is replaced and counted.
"""

from __future__ import annotations

import errno
import sqlite3
import threading
import time
from pathlib import Path

from test_notifier import wait_until

from chatmaild.database import connect
from chatmaild.jobqueue import RetryPolicy
from chatmaild.jobstore import JobStore
from chatmaild.notifier import Notifier
from chatmaild.pushtransport import HttpPushTransport, PushTransport
from devstack.pushsink import PushSink

USER = "alice@example.org"
FAST = RetryPolicy(delays=(0.05, 0.05, 0.05), max_attempts=4, deadline=60.0)


def new_mail(notifier: Notifier, db: Path, *tokens: str) -> None:
    conn = connect(db)
    try:
        notifier.message_new(conn, USER, list(tokens), time.time())
        notifier.committed()
    finally:
        conn.close()


def gauge(metric) -> float:
    return metric.collect()[0].samples[0].value


class FlakyFactory:
    """Raises EMFILE the first ``failures`` times, as httpx.Client did at the fd limit."""

    def __init__(self, url: str, failures: int) -> None:
        self.url = url
        self.failures = failures
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self) -> PushTransport:
        with self._lock:
            self.calls += 1
            if self.calls <= self.failures:
                raise OSError(errno.EMFILE, "Too many open files")
        return HttpPushTransport(self.url, timeout=2.0)


def test_transport_failures_at_start_are_retried_until_pushes_go_out(
    tmp_path: Path, sink: PushSink, caplog
) -> None:
    db = tmp_path / "db.sqlite3"
    connect(db).close()
    factory = FlakyFactory(sink.url, failures=10)
    notifier = Notifier(lambda: JobStore.open(db), factory, workers=3, policy=FAST)
    notifier.start()
    try:
        new_mail(notifier, db, "tok-a", "tok-b")
        sink.wait_for(2)  # no restart of the Notifier
        assert sorted(sink.bodies()) == [b"tok-a", b"tok-b"]
        assert factory.calls > 10
        wait_until(lambda: gauge(notifier.metrics.workers_live) == 3)
        assert notifier.metrics.worker_restarts._value.get() == 0  # retried, not died
    finally:
        notifier.stop()
    # one line per failure episode per worker, not one per retry
    failing = [r for r in caplog.records if "cannot open" in r.getMessage()]
    assert 1 <= len(failing) <= 3
    assert "Too many open files" in failing[0].getMessage()


def test_database_failures_at_start_are_retried(tmp_path: Path, sink: PushSink) -> None:
    db = tmp_path / "db.sqlite3"
    connect(db).close()
    opened = {"n": 0}
    lock = threading.Lock()

    def open_jobs() -> JobStore:
        with lock:
            opened["n"] += 1
            # the first call is start()'s resume read; the next five are the worker's
            if 2 <= opened["n"] <= 6:
                raise OSError(errno.EMFILE, "Too many open files")
        return JobStore.open(db)

    notifier = Notifier(
        open_jobs, lambda: HttpPushTransport(sink.url, timeout=2.0), workers=1, policy=FAST
    )
    notifier.start()
    try:
        new_mail(notifier, db, "tok-a")
        sink.wait_for(1)
        assert opened["n"] >= 7
    finally:
        notifier.stop()


def test_worker_killed_outside_the_job_try_is_replaced_and_counted(
    tmp_path: Path, sink: PushSink
) -> None:
    db = tmp_path / "db.sqlite3"
    connect(db).close()
    notifier = Notifier(
        lambda: JobStore.open(db),
        lambda: HttpPushTransport(sink.url, timeout=2.0),
        workers=2,
        policy=FAST,
    )
    real_get = notifier.queue.get
    kills = {"left": 2}
    lock = threading.Lock()

    def get_that_dies_twice():
        with lock:
            if kills["left"]:
                kills["left"] -= 1
                raise RuntimeError("unexpected bug outside the per-job try")
        return real_get()

    notifier.queue.get = get_that_dies_twice  # type: ignore[method-assign]
    notifier.start()
    try:
        new_mail(notifier, db, "tok-a", "tok-b")
        sink.wait_for(2)
        assert sorted(sink.bodies()) == [b"tok-a", b"tok-b"]
        wait_until(lambda: notifier.metrics.worker_restarts._value.get() == 2)
        wait_until(lambda: gauge(notifier.metrics.workers_live) == 2)
    finally:
        notifier.stop()
    assert gauge(notifier.metrics.workers_live) == 0


class FailingWrites(JobStore):
    """A job store whose first ``failures`` write batches fail, as on a full disk."""

    failures = 2

    def apply(self, ops):
        if self.failures:
            self.failures -= 1
            raise sqlite3.OperationalError("database or disk is full")
        return super().apply(ops)


def test_a_claim_that_cannot_be_written_is_one_line_and_retried(
    tmp_path: Path, sink: PushSink, caplog
) -> None:
    db = tmp_path / "db.sqlite3"
    connect(db).close()
    opened = {"n": 0}

    def open_jobs() -> JobStore:
        opened["n"] += 1  # the first is start()'s resume read: it becomes the committer's
        return FailingWrites(connect(db)) if opened["n"] == 1 else JobStore.open(db)

    notifier = Notifier(
        open_jobs, lambda: HttpPushTransport(sink.url, timeout=2.0), workers=1, policy=FAST
    )
    notifier.start()
    try:
        new_mail(notifier, db, "tok-a")
        sink.wait_for(1)  # retried once the writes work again
    finally:
        notifier.stop()
    assert sink.bodies() == [b"tok-a"]
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []  # no traceback
    assert any("database or disk is full" in r.getMessage() for r in caplog.records)
