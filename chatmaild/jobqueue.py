"""What a push job is and when it is tried again: pure values, no SQL, no threads, no HTTP.

A job is one (user, token) push owed after a delivery.  :class:`RetryPolicy` is
upstream's schedule and the one copy of its defaults (``chatmaild.config`` takes
them from here); :mod:`chatmaild.jobstore` keeps the jobs on disk and states the
durability contract.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Upstream's schedule: retry at +8 s, +64 s, +512 s, +4096 s; at most 5 attempts or 5 h."""

    delays: tuple[float, ...] = (8.0, 64.0, 512.0, 4096.0)
    max_attempts: int = 5
    deadline: float = 5 * 3600.0

    def __post_init__(self) -> None:
        # The last delay repeats for attempts past the list, and a worker that hits an
        # unexpected error retries after the first one: an empty list has neither.
        if not self.delays:
            raise ValueError("a retry policy needs at least one delay (max_attempts=1: no retry)")

    def next_due(self, attempts: int, deadline: float, now: float) -> float | None:
        """When to try again after ``attempts`` failed attempts, or None to drop the job."""
        if attempts >= self.max_attempts:
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
