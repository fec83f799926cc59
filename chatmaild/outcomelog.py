"""A small, bounded log of push outcomes in SQLite, so ``status`` can tell whether pushes flow.

The metrics listener knows the same counts, but only while the process runs and only
if it is configured; this log survives restarts and needs nothing but the database.
One row per (minute, outcome, answer) with a count: writing is one UPSERT per bucket inside
the transaction that already finishes, reschedules or drops the jobs, and rows older than
:data:`KEEP_SECONDS` are pruned on the way (a range delete on the primary key).
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

KEEP_SECONDS = 2 * 86400

SENT = "sent"
GONE = "gone"
RETRIED = "retried"
DROPPED = "dropped"
OUTCOMES = (SENT, GONE, RETRIED, DROPPED)

_MAX_ANSWER = 40
_ERROR = re.compile(r"error \((\w+)")


@dataclass(frozen=True, slots=True)
class PushRecord:
    """What happened to one push attempt (or to a job dropped without one), and when."""

    outcome: str  # one of OUTCOMES
    answer: str  # the transport's detail; made a bounded label by answer_label
    at: float


def answer_label(detail: str) -> str:
    """A low-cardinality label for a transport's detail: ``503`` stays, ``error (ConnectError:
    [Errno 111] ...)`` becomes ``error:ConnectError``, anything else its first 40 characters."""
    if m := _ERROR.match(detail):
        return f"error:{m.group(1)}"
    return detail.strip()[:_MAX_ANSWER] or "-"


def record(conn: sqlite3.Connection, rec: PushRecord) -> None:
    """Count ``rec`` (inside the caller's write transaction) and prune old buckets."""
    record_many(conn, [rec])


def record_many(
    conn: sqlite3.Connection, recs: Iterable[PushRecord], pruned_before: int | None = None
) -> int | None:
    """Count ``recs`` (inside the caller's write transaction): one UPSERT per bucket.

    A batch of the notifier's finishes (:meth:`chatmaild.jobstore.JobStore.apply`)
    mostly falls into one (minute, outcome, answer) bucket: one statement for all of
    them instead of one per push.  Buckets before the batch's cutoff are pruned unless
    this connection already pruned up to that cutoff (``pruned_before``, what the last
    call returned): the cutoff moves once a minute, so the range delete runs once a
    minute, not once per push.  Returns the cutoff pruned up to (None: nothing counted).
    """
    buckets: dict[tuple[int, str, str], list[float]] = {}  # -> [count, last_at]
    for rec in recs:
        key = int(rec.at // 60), rec.outcome, answer_label(rec.answer)
        bucket = buckets.get(key)
        if bucket is None:
            buckets[key] = [1, rec.at]
        else:
            bucket[0] += 1
            bucket[1] = max(bucket[1], rec.at)
    if not buckets:
        return pruned_before
    conn.executemany(
        "INSERT INTO push_outcomes(minute, outcome, answer, count, last_at) VALUES (?,?,?,?,?) "
        "ON CONFLICT(minute, outcome, answer) DO UPDATE SET count = count + excluded.count, "
        "last_at = max(last_at, excluded.last_at)",
        [(*key, int(count), at) for key, (count, at) in buckets.items()],
    )
    cutoff = max(minute for minute, _, _ in buckets) - KEEP_SECONDS // 60
    if pruned_before is None or cutoff > pruned_before:
        conn.execute("DELETE FROM push_outcomes WHERE minute < ?", (cutoff,))
        return cutoff
    return pruned_before


Counts = dict[str, dict[str, int]]  # outcome -> answer -> count


def counts_since(conn: sqlite3.Connection, since: float) -> Counts:
    """Pushes per outcome and answer in the buckets from ``since`` on (whole minutes)."""
    rows = conn.execute(
        "SELECT outcome, answer, sum(count) FROM push_outcomes WHERE minute >= ? "
        "GROUP BY outcome, answer ORDER BY outcome, answer",
        (int(since // 60),),
    ).fetchall()
    counts: Counts = {outcome: {} for outcome in OUTCOMES}
    for outcome, answer, count in rows:
        counts.setdefault(outcome, {})[answer] = count
    return counts


def total(counts: Mapping[str, Mapping[str, int]], *outcomes: str) -> int:
    return sum(sum(counts.get(o, {}).values()) for o in outcomes)


def last_success(conn: sqlite3.Connection) -> float | None:
    """When the latest push was accepted (within the kept two days), else None."""
    return conn.execute(
        "SELECT max(last_at) FROM push_outcomes WHERE outcome = ?", (SENT,)
    ).fetchone()[0]
