"""A thread-safe priority queue ordered by due time, for the notifier's worker threads.

``queue.PriorityQueue`` hands out the earliest item even when it is not due yet,
and a worker sleeping on a future item would miss an earlier one that arrives
meanwhile.  Here ``get`` only returns items that are due and re-checks whenever
an earlier item is put.

An item wakes the thread that went idle LAST (a stack of waiters, where
``threading.Condition`` wakes the one idle longest): under a flow of pushes one or
two workers serve them, their stacks, objects and connections still in the caches,
instead of each push going to the coldest of twelve threads.
"""

from __future__ import annotations

import _thread
import heapq
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Closed(Exception):
    """The queue was closed: worker threads exit."""


class DueQueue(Generic[T]):
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._heap: list[tuple[float, int, T]] = []
        self._lock = threading.Lock()
        self._seq = 0
        self._closed = False
        self._members: set[T] = set()
        # Threads blocked in get(), each on its own lock, the latest idle last; and those
        # woken that have not taken the queue's lock again yet (still takers).
        self._idle: list[_thread.LockType] = []
        self._woken = 0
        self.clock = clock

    def _wake(self, count: int) -> None:
        """Wake up to ``count`` idle threads, the latest idle first (under the lock)."""
        idle = self._idle
        while count > 0 and idle:
            idle.pop().release()
            self._woken += 1
            count -= 1

    def put(self, due: float, item: T) -> None:
        """Schedule ``item``; an item already waiting in the queue is not added twice."""
        with self._lock:
            if item in self._members:
                return
            self._members.add(item)
            self._seq += 1
            heapq.heappush(self._heap, (due, self._seq, item))
            if self._heap[0][1] == self._seq:
                self._wake(1)

    def put_many(self, items: list[tuple[float, T]]) -> None:
        """Schedule several items; wakes as many workers as items were added, not all of
        them (a commit of one job used to wake every idle worker only for one to get it)."""
        with self._lock:
            added = 0
            for due, item in items:
                if item in self._members:
                    continue
                self._members.add(item)
                self._seq += 1
                self._heap.append((due, self._seq, item))
                added += 1
            if added:
                heapq.heapify(self._heap)
                self._wake(added)

    def get(self) -> T:
        """Block until the earliest item is due; raise :class:`Closed` after :meth:`close`."""
        with self._lock:
            while True:
                if self._closed:
                    raise Closed
                if self._heap:
                    wait = self._heap[0][0] - self.clock()
                    if wait <= 0:
                        item = heapq.heappop(self._heap)[2]
                        self._members.discard(item)
                        if self._heap:
                            self._wake(1)  # the next one may be due too
                        return item
                    timeout = min(wait, 60.0)
                else:
                    timeout = -1  # no item: until one is put
                waiter = _thread.allocate_lock()
                waiter.acquire()
                self._idle.append(waiter)
                self._lock.release()
                try:
                    woken = waiter.acquire(True, timeout)
                finally:
                    self._lock.acquire()
                if not woken:
                    try:
                        self._idle.remove(waiter)
                        continue
                    except ValueError:  # woken after its timeout, before it took the lock
                        pass
                self._woken -= 1

    def idle_takers(self) -> int:
        """Threads waiting in :meth:`get` that no item due now is already owed to.

        Why: the notifier writes a job claimed (its attempt counted) at enqueue only when
        a worker will take it at once; a job that would wait behind a backlog must stay
        unattempted, or a kill -9 costs it an attempt never made.  Counting the due items
        walks only the part of the heap that is due, at most ``waiting`` entries.
        """
        with self._lock:
            spare = len(self._idle) + self._woken
            if not spare or not self._heap:
                return spare
            now, heap, stack = self.clock(), self._heap, [0]
            while stack and spare:
                i = stack.pop()
                if i < len(heap) and heap[i][0] <= now:
                    spare -= 1
                    stack += (2 * i + 1, 2 * i + 2)
            return spare

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._wake(len(self._idle))

    def overdue_seconds(self) -> float:
        """How long the earliest item has been due and not taken (0: none is due).

        Exported as a gauge: a value that keeps growing means the workers do not keep up
        or cannot take jobs (all of them stuck or dead)."""
        with self._lock:
            if not self._heap:
                return 0.0
            return max(0.0, self.clock() - self._heap[0][0])

    def count_due(self, now: float, overdue_after: float) -> tuple[int, int]:
        """(items due at ``now``, items due for longer than ``overdue_after`` seconds),
        for the service's health check (a scan, so only every few seconds)."""
        with self._lock:
            dues = [due for due, _, _ in self._heap if due <= now]
        return len(dues), sum(1 for due in dues if due < now - overdue_after)

    def __len__(self) -> int:
        with self._lock:
            return len(self._heap)
