"""The durable push-job queue: SQLite rows plus the retry schedule, no threads and no HTTP.

A job is one (user, token) push owed after a delivery.  Its row is written in the
same SQLite transaction as the dict commit that reported the new mail, so the
``C`` reply to Dovecot is only sent once the job is on disk.

Life of a row:

* inserted with ``attempts = 0`` and ``due = created`` (send at once).  A partial
  unique index allows one such fresh row per (user, token): a second delivery
  while the first push has not been attempted adds nothing (coalescing);
* claimed by a worker: ``attempts`` is incremented *before* the request is sent,
  so a crash mid-request never repeats an attempt silently, and a claimed job no
  longer absorbs new deliveries (the phone may already have fetched);
* finished (200), or removed with its token (410), or rescheduled with the next
  retry delay, or dropped when the attempts or the deadline are used up.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Upstream's schedule: retry at +8 s, +64 s, +512 s, +4096 s; at most 5 attempts or 5 h."""

    delays: tuple[float, ...] = (8.0, 64.0, 512.0, 4096.0)
    max_attempts: int = 5
    deadline: float = 5 * 3600.0

    def next_due(self, attempts: int, deadline: float, now: float) -> float | None:
        """When to try again after ``attempts`` failed attempts, or None to drop the job."""
        if attempts >= self.max_attempts:
            return None
        if not self.delays:
            return None
        delay = self.delays[min(attempts, len(self.delays)) - 1] if attempts > 0 else 0.0
        due = now + delay
        if due > deadline:
            return None
        return due


@dataclass(frozen=True, slots=True)
class Job:
    id: int
    user: str
    token: str
    deadline: float
    due: float
    attempts: int


def enqueue(
    conn: sqlite3.Connection, user: str, tokens: Iterable[str], now: float, policy: RetryPolicy
) -> list[Job]:
    """Insert one fresh job per token (inside the caller's transaction); return the new ones.

    Tokens that already have a fresh (never attempted) job are coalesced: no row, no job.
    """
    deadline = now + policy.deadline
    new: list[Job] = []
    for token in tokens:
        cur = conn.execute(
            "INSERT OR IGNORE INTO jobs(user, token, created, deadline, due, attempts) "
            "VALUES (?,?,?,?,?,0)",
            (user, token, now, deadline, now),
        )
        if cur.rowcount:
            new.append(Job(cur.lastrowid, user, token, deadline, now, 0))
    return new


def claim(conn: sqlite3.Connection, job_id: int) -> Job | None:
    """Count an attempt before it is made; None if the job is gone (finished or dropped)."""
    row = conn.execute(
        "UPDATE jobs SET attempts = attempts + 1 WHERE id=? "
        "RETURNING id, user, token, deadline, due, attempts",
        (job_id,),
    ).fetchone()
    return None if row is None else Job(*row)


def finish(conn: sqlite3.Connection, job_id: int) -> None:
    conn.execute("DELETE FROM jobs WHERE id=?", (job_id,))


def reschedule(conn: sqlite3.Connection, job_id: int, due: float) -> None:
    conn.execute("UPDATE jobs SET due=? WHERE id=?", (due, job_id))


def remove_token(conn: sqlite3.Connection, user: str, token: str) -> tuple[bool, int]:
    """410: delete exactly that token of that user and every job still owed to it."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        removed = conn.execute(
            "DELETE FROM tokens WHERE user=? AND token=?", (user, token)
        ).rowcount
        jobs = conn.execute("DELETE FROM jobs WHERE user=? AND token=?", (user, token)).rowcount
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return removed > 0, jobs


def pending(conn: sqlite3.Connection) -> list[Job]:
    """Every job on disk, for the queue to resume after a restart."""
    rows = conn.execute(
        "SELECT id, user, token, deadline, due, attempts FROM jobs ORDER BY due"
    ).fetchall()
    return [Job(*row) for row in rows]


def count(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT count(*) FROM jobs").fetchone()[0]
