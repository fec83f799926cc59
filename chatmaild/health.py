"""Is the service doing its job?  The decision behind systemd's watchdog and ``STATUS=``.

A watchdog fed unconditionally only proves the event loop runs.  Pushing can stop
while it does: every worker hung on a push that never ends, or none left alive.
So the watchdog is fed only when

- the event loop is not blocked: the probe that pings was not late by more than
  ``max_loop_lag`` (the ping itself comes from the loop, so a loop stuck for good
  sends none), and
- the notifier makes progress on due jobs: no job has been due for longer than
  ``stall`` while no worker took or finished a job within ``stall``.  Jobs due but
  a worker busy with them is progress; a long queue worked through slowly is too.

Sans-I/O: :func:`check` maps a snapshot to a verdict; ``cli`` takes the snapshot,
sends ``WATCHDOG=1`` and ``STATUS=`` (and logs when feeding stops or resumes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .notifier import Notifier


@dataclass(frozen=True)
class NotifierSnapshot:
    """What the notifier's health is judged by, at one moment."""

    workers_live: int
    workers: int  # configured
    queued: int  # jobs in the in-memory queue (due or not)
    due: int  # of those, due now
    overdue: int  # of those, due for longer than the stall bound
    since_progress: float  # seconds since a worker last took or finished a job


@dataclass(frozen=True)
class HealthSnapshot:
    loop_lag: float  # seconds the probe's sleep overran
    notifier: NotifierSnapshot | None  # None: the notifier is off


@dataclass(frozen=True)
class Verdict:
    feed: bool  # send WATCHDOG=1
    status: str  # the STATUS= text
    problem: str | None = None  # why not fed


def check(snapshot: HealthSnapshot, max_loop_lag: float, stall: float) -> Verdict:
    """The watchdog verdict for ``snapshot`` (see the module docstring)."""
    n = snapshot.notifier
    if n is None:
        status = "notifier off"
    else:
        status = (
            f"{n.workers_live}/{n.workers} workers, {n.queued} jobs queued,"
            f" {n.due} due, {n.overdue} overdue"
        )
    problem = None
    if snapshot.loop_lag > max_loop_lag:
        problem = f"event loop blocked for {snapshot.loop_lag:.1f} s"
    elif n is not None and n.overdue and n.since_progress > stall:
        problem = f"job(s) due for over {stall:g} s and no worker progress within {stall:g} s"
    if problem is not None:
        return Verdict(False, f"{status}; watchdog not fed: {problem}", problem)
    return Verdict(True, status)


def notifier_snapshot(notifier: Notifier, stall: float) -> NotifierSnapshot:
    """Read the running notifier's figures (cheap enough for every watchdog tick)."""
    now = notifier.clock()
    due, overdue = notifier.queue.count_due(now, stall)
    return NotifierSnapshot(
        workers_live=notifier.live_workers,
        workers=notifier.workers,
        queued=len(notifier.queue),
        due=due,
        overdue=overdue,
        since_progress=max(0.0, now - notifier.last_progress),
    )
