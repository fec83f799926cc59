"""The relay's notifier: new mail -> durable jobs -> worker threads -> push proxy.

:class:`Notifier` is the dict server's :class:`~chatmaild.metadata.NewMailHook`.
``message_new`` writes jobs inside the dict commit's SQLite transaction (so the
``C`` reply means "on disk"), ``committed`` hands them to a :class:`DueQueue`
served by worker threads.  Each worker owns its SQLite connection and its push
transport (one keep-alive HTTP client), claims a job (counting the attempt first),
pushes the token and records the verdict: SENT done, GONE delete that token,
RETRY on the :class:`~chatmaild.jobqueue.RetryPolicy` schedule.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from chatmail_common.digest import token_digest
from chatmail_common.outcome import Outcome

from . import jobqueue
from .database import connect, write_lock
from .duequeue import Closed, DueQueue
from .jobqueue import Job, RetryPolicy
from .pushtransport import PushTransport
from .relaymetrics import RelayMetrics

log = logging.getLogger(__name__)


Ticket = tuple[int, str, str]


def _ticket(job: Job) -> Ticket:
    return (job.id, job.user, job.token)


class Notifier:
    def __init__(
        self,
        db_path: Path | str,
        transport_factory: Callable[[], PushTransport],
        workers: int = 12,
        policy: RetryPolicy | None = None,
        metrics: RelayMetrics | None = None,
        synchronous: str = "NORMAL",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db_path = db_path
        self.transport_factory = transport_factory
        self.workers = workers
        self.policy = policy or RetryPolicy()
        self.metrics = metrics or RelayMetrics()
        self.synchronous = synchronous
        self.clock = clock
        # Items are (job id, user, token): a worker knows the job's key without a read.
        self.queue: DueQueue[Ticket] = DueQueue(clock)
        self._write_lock = write_lock(db_path)
        self._staged: list[Job] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._in_flight: set[tuple[str, str]] = set()
        self._parked: dict[tuple[str, str], set[Ticket]] = {}
        self.metrics.queue_depth.set_function(lambda: len(self.queue))

    # -- NewMailHook (runs in the dict server's thread) ---------------------
    def message_new(
        self, conn: sqlite3.Connection, user: str, tokens: list[str], now: float
    ) -> None:
        jobs = jobqueue.enqueue(conn, user, tokens, now, self.policy)
        coalesced = len(tokens) - len(jobs)
        if coalesced:
            self.metrics.coalesced.inc(coalesced)
        self._staged.extend(jobs)

    def rolled_back(self) -> None:
        self._staged.clear()

    def committed(self) -> None:
        staged, self._staged = self._staged, []
        if staged:
            self.metrics.queued.inc(len(staged))
            self.queue.put_many([(job.due, _ticket(job)) for job in staged])

    # -- life cycle ---------------------------------------------------------
    def start(self) -> int:
        """Resume every job on disk, then start the workers; returns the number resumed."""
        conn = connect(self.db_path, self.synchronous)
        try:
            jobs = jobqueue.pending(conn)
        finally:
            conn.close()
        self.queue.put_many([(job.due, _ticket(job)) for job in jobs])
        for i in range(self.workers):
            t = threading.Thread(target=self._worker, name=f"notifier-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        log.info(
            "notifier started: %d worker(s), %d pending job(s) resumed", self.workers, len(jobs)
        )
        return len(jobs)

    def stop(self, timeout: float = 5.0) -> None:
        self.queue.close()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._threads.clear()

    # -- workers ------------------------------------------------------------
    def _worker(self) -> None:
        conn = connect(self.db_path, self.synchronous)
        transport = self.transport_factory()
        try:
            while True:
                try:
                    ticket = self.queue.get()
                except Closed:
                    return
                try:
                    self._run(conn, transport, ticket)
                except Exception:  # a worker must survive anything one job does
                    log.exception("notifier job %d failed unexpectedly", ticket[0])
                    self.queue.put(self.clock() + self.policy.delays[0], ticket)
        finally:
            transport.close()
            conn.close()

    def _run(self, conn: sqlite3.Connection, transport: PushTransport, ticket: Ticket) -> None:
        """One push at a time per (user, token): a job whose token is in flight waits.

        While it waits it stays unattempted, so further deliveries coalesce into it:
        a burst of mail costs at most the push in flight plus one more.
        """
        key = ticket[1], ticket[2]
        with self._lock:
            if key in self._in_flight:
                self._parked.setdefault(key, set()).add(ticket)
                return
            self._in_flight.add(key)
        try:
            self._attempt(conn, transport, ticket[0])
        finally:
            with self._lock:
                self._in_flight.discard(key)
                parked = self._parked.pop(key, ())
            for waiting in parked:
                self.queue.put(self.clock(), waiting)

    def _attempt(self, conn: sqlite3.Connection, transport: PushTransport, job_id: int) -> None:
        with self._write_lock:
            job = jobqueue.claim(conn, job_id)
        if job is None:
            return  # finished, removed with its token, or never committed
        digest = token_digest(job.token)
        now = self.clock()
        if job.attempts > self.policy.max_attempts or now > job.deadline:
            with self._write_lock:
                jobqueue.finish(conn, job.id)
            self.metrics.dropped.inc()
            log.error(
                "push to %s for %s dropped: %d attempt(s), deadline passed=%s",
                digest,
                job.user,
                job.attempts - 1,
                now > job.deadline,
            )
            return
        start = time.perf_counter()
        answer = transport.push(job.token)
        self.metrics.latency.observe(time.perf_counter() - start)
        if answer.outcome is Outcome.SENT:
            with self._write_lock:
                jobqueue.finish(conn, job.id)
            self.metrics.sent.inc()
            log.debug("push to %s for %s sent (attempt %d)", digest, job.user, job.attempts)
        elif answer.outcome is Outcome.GONE:
            with self._write_lock:
                removed, _ = jobqueue.remove_token(conn, job.user, job.token)
            self.metrics.tokens_removed.inc(int(removed))
            log.info("push to %s for %s: token gone (%s), removed", digest, job.user, answer.detail)
        else:
            self._retry(conn, job, digest, answer.detail)

    def _retry(self, conn: sqlite3.Connection, job: Job, digest: str, outcome: str) -> None:
        due = self.policy.next_due(job.attempts, job.deadline, self.clock())
        if due is None:
            with self._write_lock:
                jobqueue.finish(conn, job.id)
            self.metrics.dropped.inc()
            log.error(
                "push to %s for %s failed: %s; dropped after %d attempt(s)",
                digest,
                job.user,
                outcome,
                job.attempts,
            )
            return
        with self._write_lock:
            jobqueue.reschedule(conn, job.id, due)
        self.metrics.retried.inc()
        log.warning(
            "push to %s for %s failed: %s; retry %d in %.0f s",
            digest,
            job.user,
            outcome,
            job.attempts,
            due - self.clock(),
        )
        self.queue.put(due, _ticket(job))
