"""The durable push-job queue on disk: every SQL statement on the ``jobs`` table.

A job's row is written in the same SQLite transaction as the dict commit that
reported the new mail, so the ``C`` reply to Dovecot is only sent once the job is
on disk, and nothing acknowledged is lost on ``kill -9``.

Life of a row:

* inserted with ``attempts = 0`` and ``due = created`` (send at once).  A partial
  unique index allows one such fresh row per (user, token): a second delivery
  while the first push has not been attempted adds nothing (coalescing);
* claimed by a worker: ``attempts`` is incremented (and committed) *before* the
  request is sent, so a crash mid-request never repeats an attempt silently, and a
  claimed job no longer absorbs new deliveries (the phone may already have fetched).
  A job for a token with no push in flight is inserted claimed (``attempts = 1``, in
  the dict commit's transaction) and sent at once, without a claim transaction;
* finished (200), or removed with its token (410), or rescheduled with the next
  retry delay, or dropped when the attempts or the deadline are used up.

:class:`JobStore` is all the notifier knows of storage: each worker thread opens
its own (SQLite connections stay in their thread) and calls its methods; every
write is one transaction of :class:`chatmaild.database.Writer`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Container, Iterable, Sequence
from pathlib import Path

from .database import Writer, connect
from .jobqueue import Job, RetryPolicy
from .outcomelog import PushRecord, record, record_many
from .store import MetadataStore, Registration

_JOB_COLUMNS = "id, user, token, deadline, due, attempts"

#: What :meth:`JobStore.apply` does to a job: count an attempt (and read the job), delete
#: it (done: sent, or dropped), or set its next due time.
CLAIM, FINISH, RESCHEDULE = "claim", "finish", "reschedule"
#: (CLAIM | FINISH | RESCHEDULE, job id, due for RESCHEDULE, the attempt's outcome or None)
JobOp = tuple[str, int, float, PushRecord | None]


class JobStore:
    """Push jobs on one connection; a dead token is removed through :class:`MetadataStore`."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self._writer = Writer(conn)
        self._tokens = MetadataStore(conn)
        # The outcome log's cutoff this connection last pruned up to (outcomelog.record_many).
        self._pruned_before: int | None = None

    @classmethod
    def open(
        cls, path: Path | str, synchronous: str = "NORMAL", autocheckpoint: bool = True
    ) -> JobStore:
        """A store on its own connection (one per worker thread); :meth:`close` it.

        ``autocheckpoint``: see :func:`chatmaild.database.connect`."""
        return cls(connect(path, synchronous, autocheckpoint))

    def close(self) -> None:
        self.conn.close()

    # -- inside the dict commit's transaction ------------------------------
    def enqueue(
        self,
        user: str,
        tokens: Iterable[str],
        now: float,
        policy: RetryPolicy,
        claimed: Container[str] = (),
    ) -> list[Job]:
        """Insert one fresh job per token (inside the caller's transaction); return the new ones.

        Tokens that already have a fresh (never attempted) job are coalesced: no row, no job.
        A token in ``claimed`` gets its job with its first attempt already counted
        (``attempts = 1``, in this same transaction): the notifier hands such a job to a
        worker in memory, which sends it without a claim transaction of its own.  It
        absorbs no later delivery, as a claimed job; the notifier only claims so a
        token with no push in flight, so the next delivery waits in a fresh job.
        """
        deadline = now + policy.deadline
        new: list[Job] = []
        for token in tokens:
            attempts = 1 if token in claimed else 0
            cur = self.conn.execute(
                "INSERT OR IGNORE INTO jobs(user, token, created, deadline, due, attempts) "
                "VALUES (?,?,?,?,?,?)",
                (user, token, now, deadline, now, attempts),
            )
            if cur.rowcount:
                new.append(Job(cur.lastrowid, user, token, deadline, now, attempts))
        return new

    # -- the workers' operations, each its own transaction -----------------
    def claim(self, job_id: int) -> Job | None:
        """Count an attempt before it is made; None if the job is gone (finished or dropped)."""
        return self.apply([(CLAIM, job_id, 0.0, None)])[0]

    # Each takes the attempt's PushRecord, counted in the same transaction (chatmaild.outcomelog).
    def finish(self, job_id: int, outcome: PushRecord | None = None) -> None:
        """The job is done: sent, or dropped after its last attempt."""
        self.apply([(FINISH, job_id, 0.0, outcome)])

    def reschedule(self, job_id: int, due: float, outcome: PushRecord | None = None) -> None:
        self.apply([(RESCHEDULE, job_id, due, outcome)])

    def apply(self, ops: Sequence[JobOp]) -> list[Job | None]:
        """Claims, finishes and reschedules, in order, in ONE write transaction.

        The result of each claim is at its index (None for the other operations): the
        batch of several workers' operations costs one commit (:mod:`chatmaild.jobcommit`).
        A finish or reschedule carrying a :class:`PushRecord` counts it in the same commit.
        """
        with self._writer.transaction() as conn:
            results, pruned = self._write(conn, ops)
        self._pruned_before = pruned  # only once the prune is committed
        return results

    def carry(self, ops: Sequence[JobOp]) -> int | None:
        """:meth:`apply`'s finishes and reschedules inside the caller's transaction.

        The dict commit that writes new jobs writes the finished ones too
        (:meth:`chatmaild.jobcommit.JobCommitter.take_ends`): no transaction of their own.
        Returns the outcome log's prune cutoff, for :meth:`carried` once it committed.
        """
        return self._write(self.conn, ops)[1]

    def carried(self, pruned_before: int | None) -> None:
        """The transaction :meth:`carry` wrote in has committed (its prune with it)."""
        self._pruned_before = pruned_before

    def _write(
        self, conn: sqlite3.Connection, ops: Sequence[JobOp]
    ) -> tuple[list[Job | None], int | None]:
        results: list[Job | None] = []
        outcomes: list[PushRecord] = []
        for kind, job_id, due, outcome in ops:
            job = None
            if kind == CLAIM:
                rows = conn.execute(  # fetchall: the statement is done before COMMIT
                    f"UPDATE jobs SET attempts = attempts + 1 WHERE id=? RETURNING {_JOB_COLUMNS}",
                    (job_id,),
                ).fetchall()
                job = Job(*rows[0]) if rows else None
            elif kind == FINISH:
                conn.execute("DELETE FROM jobs WHERE id=?", (job_id,))
            else:
                conn.execute("UPDATE jobs SET due=? WHERE id=?", (due, job_id))
            if outcome is not None:
                outcomes.append(outcome)
            results.append(job)
        return results, record_many(conn, outcomes, self._pruned_before)

    def registration(self, user: str, token: str) -> Registration | None:
        """The token's registration now: what a GONE for the push about to go out removes."""
        return self._tokens.registration(user, token)

    def remove_token(
        self,
        user: str,
        token: str,
        outcome: PushRecord | None = None,
        sent_to: tuple[int, Registration | None] | None = None,
    ) -> tuple[bool, int]:
        """410: delete exactly that token of that user and every job still owed to it.

        ``sent_to`` (job id, the registration the push went to): if the device set the
        token again since, that fresh registration and its jobs stay; only the job is
        done.  True if the token was removed, and the number of jobs deleted.
        """
        with self._writer.transaction() as conn:
            if sent_to is not None and self._tokens.registration(user, token) not in (
                None,
                sent_to[1],
            ):
                removed = False
                jobs = conn.execute("DELETE FROM jobs WHERE id=?", (sent_to[0],)).rowcount
            else:
                removed = self._tokens.remove_token(user, token)
                jobs = conn.execute(
                    "DELETE FROM jobs WHERE user=? AND token=?", (user, token)
                ).rowcount
            if outcome is not None:
                record(conn, outcome)
        return removed, jobs

    # -- reads --------------------------------------------------------------
    def pending(self) -> list[Job]:
        """Every job on disk, for the queue to resume after a restart."""
        rows = self.conn.execute(f"SELECT {_JOB_COLUMNS} FROM jobs ORDER BY due").fetchall()
        return [Job(*row) for row in rows]

    def count(self) -> int:
        return self.conn.execute("SELECT count(*) FROM jobs").fetchone()[0]
