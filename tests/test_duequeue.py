"""The notifier's due queue wakes the thread idle LAST (a warm worker), not the coldest."""

from __future__ import annotations

import threading
import time

from chatmaild.duequeue import Closed, DueQueue


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_an_item_wakes_the_thread_that_went_idle_last() -> None:
    queue: DueQueue[str] = DueQueue()
    got: dict[str, str] = {}

    def taker(name: str) -> None:
        got[queue.get()] = name

    first = threading.Thread(target=taker, args=("first",))
    first.start()
    wait_until(lambda: queue.idle_takers() == 1)
    last = threading.Thread(target=taker, args=("last",))
    last.start()
    wait_until(lambda: queue.idle_takers() == 2)
    queue.put(0.0, "job-1")
    last.join(10)
    assert got == {"job-1": "last"}
    assert first.is_alive() and queue.idle_takers() == 1
    queue.put(0.0, "job-2")
    first.join(10)
    assert got == {"job-1": "last", "job-2": "first"}


def test_a_waiter_for_a_later_item_takes_it_when_due_and_close_wakes_everyone() -> None:
    now = [100.0]
    queue: DueQueue[str] = DueQueue(clock=lambda: now[0])
    queue.put(100.2, "later")
    taken: list[str] = []
    taker = threading.Thread(target=lambda: taken.append(queue.get()))
    taker.start()
    wait_until(lambda: queue.idle_takers() == 1)  # waiting in get()
    assert taken == []  # not due yet
    now[0] = 100.3
    taker.join(10)  # its timed wait ends at the due time (about 0.2 s)
    assert taken == ["later"]
    closed: list[bool] = []

    def wait_closed() -> None:
        try:
            queue.get()
        except Closed:
            closed.append(True)

    waiters = [threading.Thread(target=wait_closed) for _ in range(3)]
    for t in waiters:
        t.start()
    wait_until(lambda: queue.idle_takers() == 3)
    queue.close()
    for t in waiters:
        t.join(10)
    assert closed == [True, True, True]
