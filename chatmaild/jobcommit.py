"""Group commit of the notifier workers' job writes: one transaction per batch.

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
  counted attempt, never a lost job).  The next claim carries them, or the
  committing thread writes them at most :data:`LINGER` (20 ms) after they came, so
  that window is 20 ms long: while finishes keep coming it writes every 20 ms
  without being woken for them, and an idle thread is woken by the first one.
  (Most jobs need no claim of their own, see :mod:`chatmaild.notifier`, so mostly
  the next dict commit with new mail carries them, :meth:`take_ends`, and else the
  thread writes them: no transaction of their own while mail flows, one per 20 ms
  of finishes when it does not.)  :meth:`close` writes what is still queued.

Once closed (the notifier stopping), an operation is made in its caller's own
transaction, as before batching, so a worker still finishing its job loses nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from .jobqueue import Job
from .jobstore import CLAIM, FINISH, RESCHEDULE, JobOp, JobStore
from .outcomelog import PushRecord
from .threadpolicy import no_wakeup_preemption

log = logging.getLogger(__name__)

# A failed batch is tried again after 0.1 s, doubling to 5 s.
RETRY_FIRST = 0.1
RETRY_MAX = 5.0
# Finishes with no claim to carry them are written this long after the first of them:
# 5 ms wrote about one finish per transaction at 300 pushes/s, 20 ms about six.
LINGER = 0.020


@dataclass(slots=True)
class _Claim:
    """A claim waiting for its batch to commit (``done`` is read and set under the lock)."""

    job_id: int
    done: bool = False
    job: Job | None = None
    error: BaseException | None = None


class JobCommitter:
    """Batches claims, finishes and reschedules of many worker threads into one commit each.

    Whoever needs a claim while no batch is being written writes the batch itself, in
    its own thread (the queued finishes and reschedules with it): a thread hand-off
    per claim cost a worker about as long as its HTTP request.  Claims that arrive
    while a batch is written wait for it and then the next one is written by one of
    them (or by the committing thread, which also writes finishes nobody carries and
    retries failed batches with backoff).  Only one batch is written at a time, on
    the committer's own connection.
    """

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self._cond = threading.Condition()
        self._claims: list[_Claim] = []
        self._ends: list[JobOp] = []  # finishes and reschedules, in the order they came
        self._closed = False
        self._busy = False  # a batch is being written (by a worker or the thread)
        self._failing = False  # the last batch failed: only the thread retries, with backoff
        self._idle = False  # the committing thread waits with nothing queued, untimed
        self._arrived = 0  # ends queued so far (a window in which some came is not idle)
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
            if self._failing:  # the committing thread retries: wake it for this claim
                self._cond.notify_all()
            while not waiter.done:
                if not (self._busy or self._failing):
                    claims, ends = self._take()
                    break
                self._cond.wait()
            else:
                return self._result(waiter)
        error = self._write(claims, ends)
        if error is not None:
            _log_failure(len(claims) + len(ends), error, RETRY_FIRST)
        return self._result(waiter)

    @staticmethod
    def _result(waiter: _Claim) -> Job | None:
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
                self._arrived += 1
                # Only an idle committing thread is woken (to start its linger window):
                # waking it for each end cost a thread switch per push, and for the first
                # of each batch one per batch.
                if self._idle:
                    self._cond.notify_all()
                return
        own.apply([op])

    def take_ends(self) -> list[JobOp]:
        """The queued finishes and reschedules, for a transaction being written anyway.

        The dict commit that writes new jobs takes them (:meth:`JobStore.carry`): under
        a steady flow of mail no batch of its own is written, and this thread is not
        woken for them.  The caller holds the database's write lock, so any batch taken
        before is written before them (or after them, holding no end of theirs: an end
        follows the commit of its job's claim).  Not committed after all: :meth:`give_back`.
        """
        with self._cond:
            if self._closed or not self._ends:
                return []
            ends, self._ends = self._ends, []
            return ends

    def give_back(self, own: JobStore, ends: list[JobOp]) -> None:
        """The transaction that took ``ends`` rolled back: they go in the next batch."""
        if not ends:
            return
        with self._cond:
            if not self._closed:
                self._ends[:0] = ends  # ahead of the later ones, in order
                self._cond.notify_all()
                return
        own.apply(ends)

    def queued(self) -> int:
        """Operations waiting for the next batch."""
        with self._cond:
            return len(self._claims) + len(self._ends)

    # -- writing a batch ------------------------------------------------------
    def _take(self) -> tuple[list[_Claim], list[JobOp]]:
        """Everything queued becomes the batch this thread writes (under the lock)."""
        self._busy = True
        claims, self._claims = self._claims, []
        ends, self._ends = self._ends, []
        return claims, ends

    def _write(self, claims: list[_Claim], ends: list[JobOp]) -> BaseException | None:
        """Commit one batch and answer its claims; the error if it failed (ends kept)."""
        # Ends first: a job finished and claimed again in one batch stays finished.
        ops = ends + [(CLAIM, c.job_id, 0.0, None) for c in claims]
        try:
            results = self.store.apply(ops)
        except Exception as exc:
            with self._cond:
                for c in claims:  # the worker puts its job back in the queue
                    c.error = exc
                    c.done = True
                self._ends[:0] = ends  # kept, in order, for the next batch
                self._busy = False
                self._failing = True
                self._cond.notify_all()
            return exc
        with self._cond:
            self.batches += 1
            self.ops += len(ops)
            for c, job in zip(claims, results[len(ends) :], strict=True):
                c.job = job
                c.done = True
            self._busy = False
            self._failing = False
            self._cond.notify_all()  # the claims answered, and the next batch's writer
        return None

    # -- the committing thread -----------------------------------------------
    def close(self) -> None:
        """Write what is queued, stop the thread and close the store."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()
        self.store.close()

    def _run(self) -> None:
        no_wakeup_preemption()
        delay = RETRY_FIRST
        # The linger window: finishes that come in it are written at its end, and need no
        # wake-up (a worker woke the thread for the first finish of each batch, a thread
        # switch and a GIL hand-off per batch).  It starts at the first finish after the
        # thread went idle, and again after each batch or each window in which finishes
        # came (the dict commits may have carried them all); a window without any ends it.
        window_end: float | None = None
        arrived = self._arrived
        while True:
            with self._cond:
                while True:
                    if self._busy:
                        self._cond.wait()  # the batch's writer notifies when it is done
                        continue
                    if self._claims or self._closed:
                        break
                    now = time.monotonic()
                    if window_end is None:
                        if not self._ends:
                            self._idle = True  # the next end wakes the thread
                            try:
                                self._cond.wait()
                            finally:
                                self._idle = False
                            continue
                        window_end, arrived = now + LINGER, self._arrived
                    if now >= window_end:
                        if self._ends:
                            break
                        window_end = now + LINGER if self._arrived != arrived else None
                        arrived = self._arrived
                        continue
                    self._cond.wait(window_end - now)
                if not (self._claims or self._ends):
                    return  # closed, and everything is written
                claims, ends = self._take()
                arrived = self._arrived
            error = self._write(claims, ends)
            if error is None:
                delay = RETRY_FIRST
                window_end = time.monotonic() + LINGER
                continue
            window_end = None
            with self._cond:
                closed = self._closed
                # Stopping: no next batch, so the claims that queued meanwhile fail
                # too (their workers would otherwise wait forever).
                late, self._claims = (self._claims, []) if closed else ([], self._claims)
                for c in late:
                    c.error = error
                    c.done = True
                self._cond.notify_all()
            _log_failure(len(claims) + len(ends), error, delay)
            if closed:
                return  # stopping: the rows stay on disk with their attempts counted
            threading.Event().wait(delay)
            delay = min(delay * 2, RETRY_MAX)


def _log_failure(count: int, exc: BaseException, delay: float) -> None:
    log.error("notifier cannot write %d job update(s): %s; retrying in %.1f s", count, exc, delay)
