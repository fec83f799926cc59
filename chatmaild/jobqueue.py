"""What a push job is and when it is tried again: pure values, no SQL, no threads, no HTTP.

A job is one (user, token) push owed after a delivery.  :class:`RetryPolicy` is
upstream's schedule and the one copy of its defaults (``chatmaild.config`` takes
them from here); :mod:`chatmaild.jobstore` keeps the jobs on disk and states the
durability contract.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Upstream's schedule: retry at +8 s, +64 s, +512 s, +4096 s; at most 5 attempts or 5 h.

    The last attempt is at the deadline: a retry that would land past it is made at the
    deadline instead (while attempts remain), so a short deadline cuts the schedule short
    rather than dropping the job early.  A job is dropped when its attempts are used up or
    its deadline has come.
    """

    #: A job's attempt at its deadline is claimed a moment after it (the queue wakes a worker
    #: at the due time); a claim later than this past the deadline (after a restart, or behind
    #: a backlog) is stale and sends nothing.
    LATE_CLAIM_SECONDS: ClassVar[float] = 1.0

    delays: tuple[float, ...] = (8.0, 64.0, 512.0, 4096.0)
    max_attempts: int = 5
    deadline: float = 5 * 3600.0

    def __post_init__(self) -> None:
        # The last delay repeats for attempts past the list, and a worker that hits an
        # unexpected error retries after the first one: an empty list has neither.
        if not self.delays:
            raise ValueError("a retry policy needs at least one delay (max_attempts=1: no retry)")

    def next_due(self, attempts: int, deadline: float, now: float) -> float | None:
        """When to try again after ``attempts`` failed attempts, or None to drop the job:
        the next delay from ``now``, but never past ``deadline``; None once the attempts are
        used up or ``now`` is at or past the deadline."""
        if attempts >= self.max_attempts or now >= deadline:
            return None
        delay = self.delays[min(attempts, len(self.delays)) - 1] if attempts > 0 else 0.0
        return min(now + delay, deadline)

    def expired(self, deadline: float, now: float) -> bool:
        """A job claimed at ``now`` is past its deadline: drop it unsent."""
        return now > deadline + self.LATE_CLAIM_SECONDS


@dataclass(frozen=True, slots=True)
class Job:
    id: int
    user: str
    token: str
    deadline: float
    due: float
    attempts: int
