"""A small, bounded log of push outcomes in SQLite, so ``status`` can tell whether pushes flow.

The metrics listener knows the same counts, but only while the process runs and only
if it is configured; this log survives restarts and needs nothing but the database.
One row per (minute, outcome, answer) with a count: writing is one UPSERT inside the
transaction that already finishes, reschedules or drops the job, and rows older than
:data:`KEEP_SECONDS` are pruned on the way (a range delete on the primary key).
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Mapping
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
    minute = int(rec.at // 60)
    conn.execute(
        "INSERT INTO push_outcomes(minute, outcome, answer, count, last_at) VALUES (?,?,?,1,?) "
        "ON CONFLICT(minute, outcome, answer) DO UPDATE SET count = count + 1, "
        "last_at = max(last_at, excluded.last_at)",
        (minute, rec.outcome, answer_label(rec.answer), rec.at),
    )
    conn.execute("DELETE FROM push_outcomes WHERE minute < ?", (minute - KEEP_SECONDS // 60,))


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
