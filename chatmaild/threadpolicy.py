"""Scheduling of the notifier's background threads: they never preempt the dict server's loop.

The workers and the job committer share one GIL with the dict server's event loop.
Woken by the loop thread (a job handed over), by the push proxy's answer or by a
timer, Linux's default policy lets a thread preempt the loop thread on its core at
once, only to find the GIL held and sleep again: two useless thread switches, and
the loop thread's own involuntary switch, many times per push.  ``SCHED_BATCH``
keeps the same nice value and share of CPU; it only drops the preemption on wake-up,
so a woken worker runs on an idle core at once and otherwise when the running
thread blocks (which is when it releases the GIL anyway).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def no_wakeup_preemption() -> bool:
    """Put the calling thread (only it: Linux schedules threads) under ``SCHED_BATCH``.

    Lowering one's own policy needs no privilege; where it is not available (not Linux,
    a sandbox refusing the call) the thread runs as before.  True if it was set.
    """
    batch = getattr(os, "SCHED_BATCH", None)
    if batch is None:
        return False
    try:
        os.sched_setscheduler(0, batch, os.sched_param(0))
    except OSError as exc:
        log.debug("SCHED_BATCH not set for this thread: %s", exc)
        return False
    return True
