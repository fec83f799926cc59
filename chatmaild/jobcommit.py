"""Group commit of the notifier workers' job writes: one thread, one transaction per batch.

A push used to cost the workers two write transactions of their own (claim, finish)
under the database's one write lock: twelve workers queued on it, and each commit
handed the GIL around.  Here the writes that arrive while one batch is being
committed go into the next single transaction (:meth:`JobStore.apply`).

The durability contract of :mod:`chatmaild.jobstore` holds:

* :meth:`JobCommitter.claim` returns only after the transaction that counted the
  attempt has committed, so an attempt is on disk before its request is sent;
* :meth:`finish` and :meth:`reschedule` do not wait: the push is already made and
  the job's row is still on disk with its attempt counted, so a ``kill -9`` before
  the next batch commits at worst sends that job once more after the restart (a
  counted attempt, never a lost job).  The next batch starts as soon as the previous
  one is committed, so that window is one transaction long.  :meth:`close` writes
  what is still queued.

Once closed (the notifier stopping), an operation is made in its caller's own
transaction, as before batching, so a worker still finishing its job loses nothing.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from .jobqueue import Job
from .jobstore import CLAIM, FINISH, RESCHEDULE, JobOp, JobStore
from .outcomelog import PushRecord

log = logging.getLogger(__name__)

# A failed batch is tried again after 0.1 s, doubling to 5 s.
RETRY_FIRST = 0.1
RETRY_MAX = 5.0


@dataclass(slots=True)
class _Claim:
    """A claim waiting for its batch to commit."""

    job_id: int
    done: threading.Event = field(default_factory=threading.Event)
    job: Job | None = None
    error: BaseException | None = None


class JobCommitter:
    """Batches claims, finishes and reschedules of many worker threads into one commit each."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self._cond = threading.Condition()
        self._claims: list[_Claim] = []
        self._ends: list[JobOp] = []  # finishes and reschedules, in the order they came
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="notifier-commit", daemon=True)
        #: Transactions committed and operations written (for tests and the bench).
        self.batches = 0
        self.ops = 0

    def start(self) -> None:
        self._thread.start()

    # -- what workers call ---------------------------------------------------
    def claim(self, own: JobStore, job_id: int) -> Job | None:
        """:meth:`JobStore.claim`, committed in the next batch; waits until it is on disk."""
        waiter = _Claim(job_id)
        with self._cond:
            if self._closed:
                return own.claim(job_id)
            self._claims.append(waiter)
            self._cond.notify()
        waiter.done.wait()
        if waiter.error is not None:
            raise waiter.error
        return waiter.job

    def finish(self, own: JobStore, job_id: int, outcome: PushRecord | None = None) -> None:
        """The job is done (sent, or dropped): its row is deleted in the next batch."""
        self._end(own, (FINISH, job_id, 0.0, outcome))

    def reschedule(
        self, own: JobStore, job_id: int, due: float, outcome: PushRecord | None = None
    ) -> None:
        """The job's next attempt is at ``due``: written in the next batch."""
        self._end(own, (RESCHEDULE, job_id, due, outcome))

    def _end(self, own: JobStore, op: JobOp) -> None:
        with self._cond:
            if not self._closed:
                self._ends.append(op)
                self._cond.notify()
                return
        own.apply([op])

    def queued(self) -> int:
        """Operations waiting for the next batch."""
        with self._cond:
            return len(self._claims) + len(self._ends)

    # -- the committing thread -----------------------------------------------
    def close(self) -> None:
        """Write what is queued, stop the thread and close the store."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join()
        self.store.close()

    def _run(self) -> None:
        delay = RETRY_FIRST
        while True:
            with self._cond:
                while not (self._claims or self._ends or self._closed):
                    self._cond.wait()
                if not (self._claims or self._ends):
                    return  # closed, and everything is written
                claims, self._claims = self._claims, []
                ends, self._ends = self._ends, []
            # Ends first: a job finished and claimed again in one batch stays finished.
            ops = ends + [(CLAIM, c.job_id, 0.0, None) for c in claims]
            try:
                results = self.store.apply(ops)
            except Exception as exc:
                for c in claims:  # the worker puts its job back in the queue
                    c.error = exc
                    c.done.set()
                with self._cond:
                    self._ends[:0] = ends  # kept, in order, for the next batch
                    closed = self._closed
                    # Stopping: no next batch, so the claims that queued meanwhile fail
                    # too (their workers would otherwise wait forever).
                    late, self._claims = (self._claims, []) if closed else ([], self._claims)
                for c in late:
                    c.error = exc
                    c.done.set()
                log.error(
                    "notifier cannot write %d job update(s): %s; retrying in %.1f s",
                    len(ops),
                    exc,
                    delay,
                )
                if closed:
                    return  # stopping: the rows stay on disk with their attempts counted
                threading.Event().wait(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            delay = RETRY_FIRST
            self.batches += 1
            self.ops += len(ops)
            for c, job in zip(claims, results[len(ends) :], strict=True):
                c.job = job
                c.done.set()
