"""The relay's notifier: new mail -> durable jobs -> worker threads -> push proxy.

:class:`Notifier` is the dict server's :class:`~chatmaild.metadata.NewMailHook`.
``message_new`` writes jobs inside the dict commit's SQLite transaction (so the
``C`` reply means "on disk"), ``committed`` hands them to a :class:`DueQueue`
served by worker threads.  Each worker opens its own
:class:`~chatmaild.jobstore.JobStore` (with ``open_jobs``) and its push transport
(one keep-alive HTTP client), claims a job (counting the attempt first), pushes the
token and records the verdict.  A job for a token with no push in flight is written
claimed by the dict commit itself (its first attempt counted in that transaction) and
handed to a worker in memory: the common case, one delivery and one push, costs no
claim transaction.  Verdicts: SENT done, GONE delete that token, RETRY on the
:class:`~chatmaild.jobqueue.RetryPolicy` schedule.  Claims, finishes and reschedules
of all workers are group-committed by one :class:`~chatmaild.jobcommit.JobCommitter`
(one transaction per batch; a claim returns once it is on disk); the notifier knows
no SQL, no lock and no table.

Workers are supervised: a worker that cannot open its store or transport (at the fd
limit, ``OSError: Too many open files``) retries with capped backoff instead of dying,
and a worker whose loop raises is replaced and counted, so pushing never stops silently.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Callable

from chatmail_common.digest import token_digest
from chatmail_common.outcome import Outcome

from .duequeue import Closed, DueQueue
from .jobcommit import JobCommitter
from .jobqueue import Job, RetryPolicy
from .jobstore import JobOp, JobStore
from .outcomelog import DROPPED, GONE, RETRIED, SENT, PushRecord
from .pushtransport import PushTransport
from .relaymetrics import RelayMetrics
from .store import Registration
from .threadpolicy import no_wakeup_preemption

log = logging.getLogger(__name__)


Ticket = tuple[int, str, str]

# Reopening a worker's job store and transport after a failure: 0.1 s doubling to 5 s.
OPEN_RETRY_FIRST = 0.1
OPEN_RETRY_MAX = 5.0


def _ticket(job: Job) -> Ticket:
    return (job.id, job.user, job.token)


class Notifier:
    def __init__(
        self,
        open_jobs: Callable[[], JobStore],
        transport_factory: Callable[[], PushTransport],
        workers: int = 12,
        policy: RetryPolicy | None = None,
        metrics: RelayMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``open_jobs`` opens a job store on its own connection (called once per worker
        thread and once at start), e.g. ``functools.partial(JobStore.open, path)``."""
        self.open_jobs = open_jobs
        self.transport_factory = transport_factory
        self.workers = workers
        self.policy = policy or RetryPolicy()
        self.metrics = metrics or RelayMetrics()
        self.clock = clock
        # Items are (job id, user, token): a worker knows the job's key without a read.
        self.queue: DueQueue[Ticket] = DueQueue(clock)
        self._staged: list[Job] = []
        self._staged_coalesced = 0  # counted when the transaction commits, not when staged
        self._enqueuer: JobStore | None = None  # writes jobs in the dict commit's transaction
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._in_flight: set[tuple[str, str]] = set()
        self._parked: dict[tuple[str, str], set[Ticket]] = {}
        # Jobs written claimed by the dict commit (by id), for the worker that takes their
        # ticket, with the token's registration read in that commit; their keys are in
        # _in_flight.  _reserved: the keys of the transaction being written, freed if it
        # rolls back; _staged_sent_to: the registrations read in it (dict server's thread).
        self._claimed: dict[int, tuple[Job, Registration | None]] = {}
        self._reserved: list[tuple[str, str]] = []
        self._staged_sent_to: dict[int, Registration | None] = {}
        # Committed jobs (due now) not yet in the queue: handed over once the dict server's
        # loop turn is done (_hand_off); each is owed an idle worker already.
        self._handing: list[tuple[float, Ticket]] = []
        # The workers' finishes and reschedules the transaction being written carries
        # (None: it took none yet), and the outcome log's prune cutoff they moved to.
        self._carrying: list[JobOp] | None = None
        self._carry_pruned: int | None = None
        self._carried_from: JobCommitter | None = None  # gives them back if it rolls back
        self._stopping = threading.Event()
        self._live = 0  # workers with their resources open (under _lock)
        self._commits: JobCommitter | None = None  # from start() to stop()
        # clock() when a worker last took a job or finished one: the health check's
        # "the notifier makes progress" (chatmaild.health).
        self.last_progress = clock()
        self.metrics.queue_depth.set_function(lambda: len(self.queue))
        self.metrics.workers_live.set_function(lambda: self._live)
        self.metrics.workers_configured.set(workers)
        self.metrics.queue_overdue.set_function(self.queue.overdue_seconds)
        self.metrics.retry_first_delay.set(self.policy.delays[0])

    # -- NewMailHook (runs in the dict server's thread) ---------------------
    def message_new(
        self, conn: sqlite3.Connection, user: str, tokens: list[str], now: float
    ) -> None:
        enqueuer = self._enqueuer
        if enqueuer is None or enqueuer.conn is not conn:  # one per dict connection, kept
            enqueuer = self._enqueuer = JobStore(conn)
        claimed = self._reserve(user, tokens)
        jobs = enqueuer.enqueue(user, tokens, now, self.policy, claimed)
        self._staged_coalesced += len(tokens) - len(jobs)
        self._staged.extend(jobs)
        for job in jobs:
            if job.attempts:
                # What a GONE for this push removes, read here: this connection holds the
                # write transaction, its pages cached, where a worker's own read began a
                # read transaction that refetched them (every commit invalidates them).
                self._staged_sent_to[job.id] = enqueuer.registration(user, job.token)
        if self._carrying is None and self._commits is not None:
            # The finished pushes ride along: this transaction writes the jobs' pages
            # anyway, where a batch of the committer's own cost a transaction, its
            # thread's wake-up and a reread of the pages this one changed.
            self._carried_from = self._commits
            self._carrying = self._commits.take_ends()
            if self._carrying:
                self._carry_pruned = enqueuer.carry(self._carrying)

    def _reserve(self, user: str, tokens: list[str]) -> list[str]:
        """The tokens whose job is written claimed: no push in flight (nor reserved) for
        them, and a worker idle to take each at once.

        Their keys count as in flight from now on, so a second delivery before the push is
        made waits in a fresh job (coalescing as before) and no other job of the key is
        sent meanwhile; :meth:`rolled_back` frees them again.  Only as many as there are
        idle workers not yet owed a due job, a job reserved in this transaction or one
        committed and not yet handed over: a claim counts the attempt, and one that waited
        behind a backlog and was then lost to a kill -9 would cost the job an attempt never
        made (all of them at ``max_attempts = 1``).
        """
        if self._commits is None or self._stopping.is_set():
            return []  # no workers: every job waits on disk, fresh, for start()
        spare = self.queue.idle_takers() - len(self._reserved) - len(self._handing)
        if spare <= 0:
            return []
        with self._lock:
            claimed = [t for t in tokens if (user, t) not in self._in_flight][:spare]
            self._in_flight.update((user, t) for t in claimed)
        self._reserved.extend((user, t) for t in claimed)
        return claimed

    def rolled_back(self) -> None:
        carrying, self._carrying = self._carrying, None
        if carrying and self._carried_from is not None and self._enqueuer is not None:
            self._carried_from.give_back(self._enqueuer, carrying)  # closed: applied here
        self._staged.clear()
        self._staged_sent_to.clear()
        self._staged_coalesced = 0  # a group retried without one transaction counts again
        reserved, self._reserved = self._reserved, []
        for key in reserved:
            self._release(key)

    def committed(self) -> None:
        carrying, self._carrying = self._carrying, None
        if carrying and self._enqueuer is not None:
            self._enqueuer.carried(self._carry_pruned)
        staged, self._staged = self._staged, []
        coalesced, self._staged_coalesced = self._staged_coalesced, 0
        reserved, self._reserved = self._reserved, []
        sent_to, self._staged_sent_to = self._staged_sent_to, {}
        if coalesced:
            self.metrics.coalesced.inc(coalesced)
        claimed = {(job.user, job.token): job for job in staged if job.attempts}
        if claimed:  # on disk, claimed: the workers send them now
            with self._lock:
                self._claimed.update((job.id, (job, sent_to[job.id])) for job in claimed.values())
        for key in reserved:
            if key not in claimed:  # no row was written for it (never expected): free it
                self._release(key)
        if staged:
            self.metrics.queued.inc(len(staged))
            self._hand_off([(job.due, _ticket(job)) for job in staged])

    def _hand_off(self, items: list[tuple[float, Ticket]]) -> None:
        """Put committed jobs in the queue, on the dict server's loop after its turn.

        ``committed`` runs in the middle of the loop's turn, before the commit's ``O`` and
        the other replies of its group are written.  A worker woken there took the GIL
        from the loop thread at its next system call (the reply's send) and handed it
        back at its own (its connection check): about four more thread switches per push
        than a worker woken at the end of the turn, when the loop thread is about to wait
        in ``epoll`` and needs the GIL no more.  The jobs are on disk either way; what
        waits is only the wake-up.  Without a running loop (tests, a caller of its own)
        they are put at once.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.queue.put_many(items)
            return
        if not self._handing:
            loop.call_soon(self._handed_over)
        self._handing.extend(items)

    def _handed_over(self) -> None:
        items, self._handing = self._handing, []
        if items:
            self.queue.put_many(items)

    # -- life cycle ---------------------------------------------------------
    def start(self) -> int:
        """Resume every job on disk, then start the workers; returns the number resumed."""
        store = self.open_jobs()
        try:
            jobs = store.pending()
        except BaseException:
            store.close()
            raise
        # The resume read's connection becomes the committer's: one transaction per batch
        # of the workers' claims and finishes.
        self._commits = JobCommitter(store)
        self._commits.start()
        self.queue.put_many([(job.due, _ticket(job)) for job in jobs])
        self.last_progress = self.clock()
        self._stopping.clear()
        for i in range(self.workers):
            t = threading.Thread(target=self._supervise, name=f"notifier-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        log.info(
            "notifier started: %d worker(s), %d pending job(s) resumed", self.workers, len(jobs)
        )
        return len(jobs)

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self.queue.close()
        self._handing = []  # on disk: start() resumes them
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._threads.clear()
        if self._commits is not None:
            self._commits.close()  # writes the finishes still queued
            self._commits = None

    @property
    def live_workers(self) -> int:
        """Workers with their job store and transport open, serving jobs."""
        return self._live

    # -- workers ------------------------------------------------------------
    def _supervise(self) -> None:
        """Run a worker until the queue closes; one that dies is replaced (and counted)."""
        no_wakeup_preemption()
        restart_delay = OPEN_RETRY_FIRST
        while True:
            try:
                self._worker()
                return  # the queue was closed: a clean stop
            except Exception:
                if self._stopping.is_set():
                    return
                self.metrics.worker_restarts.inc()
                log.exception("notifier worker died; replacing it in %.1f s", restart_delay)
            if self._stopping.wait(restart_delay):
                return
            restart_delay = min(restart_delay * 2, OPEN_RETRY_MAX)

    def _open(self) -> tuple[JobStore, PushTransport] | None:
        """The worker's job store and transport, retried with backoff; None once stopping.

        One log line when opening starts failing and one when it works again, not one
        per retry: at the fd limit twelve workers would otherwise flood the log.
        """
        delay = OPEN_RETRY_FIRST
        failing = False
        while True:
            try:
                store = self.open_jobs()
                try:
                    transport = self.transport_factory()
                except BaseException:
                    store.close()
                    raise
            except Exception as exc:
                if not failing:
                    failing = True
                    log.error(
                        "notifier worker cannot open its job store or push transport: %s;"
                        " retrying every %.1f-%.0f s",
                        exc,
                        OPEN_RETRY_FIRST,
                        OPEN_RETRY_MAX,
                    )
                if self._stopping.wait(delay):
                    return None
                delay = min(delay * 2, OPEN_RETRY_MAX)
                continue
            if failing:
                log.info("notifier worker opened its job store and push transport again")
            return store, transport

    def _worker(self) -> None:
        opened = self._open()
        if opened is None:
            return
        store, transport = opened
        with self._lock:
            self._live += 1
        try:
            while True:
                try:
                    ticket = self.queue.get()
                except Closed:
                    return
                self.last_progress = self.clock()
                try:
                    self._run(store, transport, ticket)
                except sqlite3.Error as exc:  # a full disk, an I/O error: not a bug here
                    retry = self.policy.delays[0]
                    log.warning(
                        "notifier job %d not written: %s; retry in %.0f s", ticket[0], exc, retry
                    )
                    self.queue.put(self.clock() + retry, ticket)
                except Exception:  # a worker must survive anything one job does
                    log.exception("notifier job %d failed unexpectedly", ticket[0])
                    self.queue.put(self.clock() + self.policy.delays[0], ticket)
                self.last_progress = self.clock()
        finally:
            with self._lock:
                self._live -= 1
            try:
                transport.close()
            finally:
                store.close()

    def _run(self, store: JobStore, transport: PushTransport, ticket: Ticket) -> None:
        """One push at a time per (user, token): a job whose token is in flight waits.

        While it waits it stays unattempted, so further deliveries coalesce into it:
        a burst of mail costs at most the push in flight plus one more.
        """
        key = ticket[1], ticket[2]
        with self._lock:
            # Written claimed by the dict commit: its key is in flight already, for it.
            # (Job ids are never reused, AUTOINCREMENT, so the id names this ticket's job.)
            claimed = self._claimed.pop(ticket[0], None)
            if claimed is None:
                if key in self._in_flight:
                    self._parked.setdefault(key, set()).add(ticket)
                    return
                self._in_flight.add(key)
        try:
            self._attempt(store, transport, ticket, claimed)
        finally:
            self._release(key)

    def _release(self, key: tuple[str, str]) -> None:
        """The key's push is done (or its reservation void): its parked jobs go back in."""
        with self._lock:
            self._in_flight.discard(key)
            parked = self._parked.pop(key, ())
        for waiting in parked:
            self.queue.put(self.clock(), waiting)

    def _attempt(
        self,
        store: JobStore,
        transport: PushTransport,
        ticket: Ticket,
        claimed: tuple[Job, Registration | None] | None,
    ) -> None:
        """Claim the job (unless the dict commit wrote it claimed), push, record the verdict."""
        commits = self._commits
        assert commits is not None  # workers run between start() and stop()
        if claimed is not None:
            job, registration = claimed
        else:
            job, registration = commits.claim(store, ticket[0]), None
            if job is None:
                return  # finished, removed with its token, or never committed
        now = self.clock()
        expired = self.policy.expired(job.deadline, now)
        if job.attempts > self.policy.max_attempts or expired:
            # Claimed after a restart with nothing left: this claim sends nothing.
            why = "deadline passed" if expired else "no attempt left"
            self._drop(commits, store, job, f"not sent, {why}", job.attempts - 1, why)
            return
        if claimed is None:
            registration = store.registration(job.user, job.token)
        sent_to = job.id, registration  # a GONE removes only it
        start = time.perf_counter()
        answer = transport.push(job.token)
        self.metrics.latency.observe(time.perf_counter() - start)
        if answer.outcome is Outcome.SENT:
            commits.finish(store, job.id, PushRecord(SENT, answer.detail, self.clock()))
            self.metrics.sent.inc()
            if log.isEnabledFor(logging.DEBUG):  # the digest only when it is logged
                digest = token_digest(job.token)
                log.debug("push to %s for %s sent (attempt %d)", digest, job.user, job.attempts)
        elif answer.outcome is Outcome.GONE:
            gone = PushRecord(GONE, answer.detail, self.clock())
            removed, _ = store.remove_token(job.user, job.token, gone, sent_to)
            self.metrics.tokens_removed.inc(int(removed))
            digest = token_digest(job.token)
            done = "removed" if removed else "kept (set again during the push, or already gone)"
            log.info(
                "push to %s for %s: token gone (%s), %s", digest, job.user, answer.detail, done
            )
        else:
            self._retry(commits, store, job, answer.detail)

    def _retry(self, commits: JobCommitter, store: JobStore, job: Job, detail: str) -> None:
        due = self.policy.next_due(job.attempts, job.deadline, self.clock())
        if due is None:
            self._drop(commits, store, job, f"failed: {detail}", job.attempts, detail)
            return
        commits.reschedule(store, job.id, due, PushRecord(RETRIED, detail, self.clock()))
        self.metrics.retried.inc()
        log.warning(
            "push to %s for %s failed: %s; retry %d in %.0f s",
            token_digest(job.token),
            job.user,
            detail,
            job.attempts,
            due - self.clock(),
        )
        self.queue.put(due, _ticket(job))

    def _drop(
        self,
        commits: JobCommitter,
        store: JobStore,
        job: Job,
        why: str,
        attempts: int,
        answer: str,
    ) -> None:
        """The job's attempts or deadline are used up: delete it, count it, say why."""
        commits.finish(store, job.id, PushRecord(DROPPED, answer, self.clock()))
        self.metrics.dropped.inc()
        log.error(
            "push to %s for %s %s; dropped after %d attempt(s)",
            token_digest(job.token),
            job.user,
            why,
            attempts,
        )
