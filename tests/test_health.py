"""The watchdog verdict (chatmaild.health.check): fed only while the service works."""

from __future__ import annotations

from chatmaild.duequeue import DueQueue
from chatmaild.health import HealthSnapshot, NotifierSnapshot, check

STALL = 60.0


def notifier(**kw) -> NotifierSnapshot:
    figures = dict(workers_live=12, workers=12, queued=0, due=0, overdue=0, since_progress=1.0)
    return NotifierSnapshot(**{**figures, **kw})


def verdict(lag: float = 0.0, **kw):
    return check(HealthSnapshot(lag, notifier(**kw)), max_loop_lag=30.0, stall=STALL)


def test_an_idle_service_is_fed_and_says_so():
    v = verdict(queued=5, since_progress=3600.0)  # nothing due: nothing to progress on
    assert v.feed and v.problem is None
    assert v.status == "12/12 workers, 5 jobs queued, 0 due, 0 overdue"


def test_jobs_due_with_recent_progress_are_fed():
    assert verdict(queued=40, due=30, overdue=20, since_progress=5.0).feed


def test_overdue_jobs_without_progress_stop_the_feeding():
    v = verdict(workers_live=0, queued=3, due=3, overdue=3, since_progress=STALL + 1)
    assert not v.feed
    assert v.status.startswith("0/12 workers, 3 jobs queued, 3 due, 3 overdue; watchdog not fed")
    assert "no worker progress" in v.problem


def test_due_but_not_yet_overdue_jobs_are_fed_however_long_since_progress():
    assert verdict(queued=3, due=3, overdue=0, since_progress=STALL * 10).feed


def test_a_blocked_event_loop_stops_the_feeding():
    v = verdict(lag=31.0)
    assert not v.feed and "event loop blocked for 31.0 s" in v.problem


def test_without_a_notifier_only_the_loop_counts():
    v = check(HealthSnapshot(0.0, None), max_loop_lag=30.0, stall=STALL)
    assert v.feed and v.status == "notifier off"


def test_due_queue_counts_due_and_overdue_items():
    q: DueQueue[str] = DueQueue(clock=lambda: 1000.0)
    q.put_many([(900.0, "old"), (990.0, "recent"), (1000.0, "now"), (1100.0, "later")])
    assert q.count_due(1000.0, overdue_after=60.0) == (3, 1)
