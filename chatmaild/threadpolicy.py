"""Scheduling of the notifier's background threads: they never preempt the dict server's loop.

The workers and the job committer share one GIL with the dict server's event loop.
Woken by the loop thread (a job handed over), by the push proxy's answer or by a
timer, Linux's default policy lets a thread preempt the loop thread on its core at
once, only to find the GIL held and sleep again: two useless thread switches, and
the loop thread's own involuntary switch, many times per push.  ``SCHED_BATCH``
keeps the same nice value and share of CPU; it only drops the preemption on wake-up,
so a woken worker runs on an idle core at once and otherwise when the running
thread blocks (which is when it releases the GIL anyway).

Under a seccomp filter (systemd's ``SystemCallFilter=``) a refused
``sched_setscheduler`` may kill the whole process rather than fail, and
``@resources``, which the shipped unit refuses, holds it.  So the call is made only
where no filter is in effect, or where the environment says the filter lets it
through (:data:`ALLOWED_ENV`, set by ``systemd/chatmail-metadata.service`` next to
the line that allows it); elsewhere the threads run as before.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

#: "1": the process's seccomp filter allows ``sched_setscheduler`` (the shipped unit).
ALLOWED_ENV = "CHATMAIL_SCHED_SETSCHEDULER_ALLOWED"


def seccomp_filtered() -> bool:
    """A seccomp filter is in effect for this process (or that cannot be read)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Seccomp:"):
                    return line.split()[1:2] != ["0"]
    except OSError:
        return True
    return False  # a kernel without seccomp


def no_wakeup_preemption() -> bool:
    """Put the calling thread (only it: Linux schedules threads) under ``SCHED_BATCH``.

    Lowering one's own policy needs no privilege; where it is not available (not Linux,
    a seccomp filter not known to allow it, a sandbox refusing the call) the thread
    runs as before.  True if it was set.
    """
    batch = getattr(os, "SCHED_BATCH", None)
    if batch is None:
        return False
    if os.environ.get(ALLOWED_ENV) != "1" and seccomp_filtered():
        return False
    try:
        os.sched_setscheduler(0, batch, os.sched_param(0))
    except OSError as exc:
        log.debug("SCHED_BATCH not set for this thread: %s", exc)
        return False
    return True
