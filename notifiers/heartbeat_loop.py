"""The heartbeat loop: drains the schedule into silent APNs pushes, on the proxy's event loop.

Three kinds of task share one :class:`Heartbeats`:

* the *fetcher* asks the store for the oldest due tokens (as many as there is
  room for), queues them and sleeps until the next due time, a registration,
  or at most :data:`MAX_SLEEP` (so a wall-clock jump is noticed);
* :data:`WORKERS` *workers* (upstream: 50) send one silent push each through
  the APNs provider and its rate limiter (:class:`~notifiers.providers.apns.BackgroundPush`);
* the *writer* writes the verdicts back in batches (one transaction for all
  that finished meanwhile): SENT and RETRY move the token one jittered
  interval on, GONE removes it (:class:`~notifiers.heartbeat.HeartbeatPolicy`).

A token is *taken* from the moment it is queued until its verdict is written,
and the fetcher skips taken tokens, so no token is sent twice at once and the
number taken (queue, in flight, being written) is bounded.  After downtime
every overdue token is due; they are drained oldest first at the rate the
workers and the limiter allow.  All SQLite calls run on one private thread, so
a commit's fsync never stalls the event loop.  Logs carry token digests only.

:func:`heartbeats_from_settings` builds it from ``--db`` / ``--interval``;
the programs start and stop it around the service (``notifiers.cli``,
``notifiers.embedded``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from chatmail_common.digest import token_digest
from chatmail_common.outcome import Outcome

from .heartbeat import DEFAULT_INTERVAL, HEARTBEAT_KINDS, HeartbeatPolicy, format_duration
from .heartbeat_store import HeartbeatStore, HeartbeatStoreError
from .metrics import ProxyMetrics
from .providers.apns import BackgroundPush
from .providers.base import Delivery, Provider
from .providers.registry import LABEL
from .tokens import Kind, PushToken, TokenError, parse_token

if TYPE_CHECKING:
    from .settings import ProxySettings

log = logging.getLogger(__name__)

#: Parallel heartbeat sends (upstream: 50 tasks on one HTTP/2 connection).
WORKERS = 50

#: Tokens taken at most per worker (queued, in flight or being written back).
TAKEN_PER_WORKER = 4

#: The fetcher looks at the clock at least this often (seconds).
MAX_SLEEP = 60.0

#: After a failed write of verdicts, wait this long before trying again (seconds).
WRITE_RETRY_DELAY = 1.0

_T = TypeVar("_T")


class Heartbeats:
    """The schedule and the tasks that drain it.  ``clock`` is seconds since the epoch
    (due times outlive the process); all methods run on one event loop."""

    def __init__(
        self,
        store: HeartbeatStore,
        policy: HeartbeatPolicy,
        providers: Mapping[Kind, Provider],
        metrics: ProxyMetrics,
        *,
        workers: int = WORKERS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if workers < 1:
            raise ValueError("heartbeats need at least one worker")
        self.store = store
        self.policy = policy
        self.providers = providers
        self.metrics = metrics
        self.workers = workers
        self._clock = clock
        self._capacity = workers * TAKEN_PER_WORKER
        self._thread = concurrent.futures.ThreadPoolExecutor(1, "heartbeat-db")
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        # token -> the due time it had when taken: a GONE removes it only if still so
        self._taken: dict[str, float] = {}
        self._verdicts: list[tuple[str, float | None]] = []
        self._verdicts_ready = asyncio.Event()
        self._wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        # Read at scrape time: the count changes on the database thread, and a value set
        # after each write came back to the loop lagged it (a scrape saw a stale count).
        metrics.heartbeat_tokens.set_function(lambda: store.count)

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Start the fetcher, the workers and the writer."""
        if self._tasks or self._closed:
            return
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._fetch_loop(), name="heartbeat-fetcher"))
        self._tasks.append(loop.create_task(self._write_loop(), name="heartbeat-writer"))
        for number in range(self.workers):
            self._tasks.append(loop.create_task(self._work_loop(), name=f"heartbeat-{number}"))

    async def aclose(self) -> None:
        """Stop the tasks, write the verdicts already made, close the database.

        Sends in flight are abandoned: their tokens keep their old due time, so
        they are the first ones sent after the next start.
        """
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        try:
            if self._verdicts:
                await self._run(self.store.apply, self._verdicts, dict(self._taken))
                self._verdicts = []
            await self._run(self.store.close)
        except HeartbeatStoreError as exc:
            log.error("%s", exc)
        finally:
            self._thread.shutdown(wait=True)

    def wake(self) -> None:
        """Look at the schedule now (a registration, or a test that moved the clock)."""
        self._wakeup.set()

    # -- /register --------------------------------------------------------------------

    async def register(self, token: PushToken) -> None:
        """Schedule ``token`` (an APNs token: the caller refuses others) one interval from now.

        Raises :class:`HeartbeatStoreError` if it cannot be stored; it is counted
        only once committed.
        """
        due = self.policy.after_registration(self._clock())
        new = await self._run(self.store.register, token.raw, due)
        self.metrics.heartbeat_registrations.inc()
        log.info(
            "heartbeat registration for %s token %s (%s)",
            token.kind.value,
            token.digest,
            "new" if new else "again, postponed",
        )
        self.wake()

    def forget(self, token: PushToken) -> None:
        """Unschedule ``token``: a push to it (``/notify``) found it gone.

        Queued for the writer like a heartbeat's verdict (no database I/O here); a
        token that was never registered costs one DELETE that finds nothing.
        """
        if token.kind not in HEARTBEAT_KINDS or self._closed:
            return
        self._verdicts.append((token.raw, None))
        self._verdicts_ready.set()

    # -- the tasks ----------------------------------------------------------------------

    async def _run(self, function: Callable[..., _T], *args: Any) -> _T:
        """``function(*args)`` on the database thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, functools.partial(function, *args))

    async def _fetch_loop(self) -> None:
        while True:
            self._wakeup.clear()
            room = self._capacity - len(self._taken)
            if room <= 0:  # the writer wakes us when verdicts free room
                await self._wakeup.wait()
                continue
            now = self._clock()
            try:
                batch = await self._run(self.store.due, now, room, frozenset(self._taken))
                later = (
                    None if len(batch) == room else await self._run(self.store.next_due_after, now)
                )
            except HeartbeatStoreError as exc:
                log.error("%s", exc)
                batch, later = [], now + WRITE_RETRY_DELAY
            for token, due in batch:
                self._taken[token] = due
                self._queue.put_nowait(token)
            if len(batch) == room:
                continue  # maybe more are due
            delay = MAX_SLEEP if later is None else min(max(later - self._clock(), 0), MAX_SLEEP)
            # A timer that sets the event, rather than wait_for: cancelling a task
            # inside 3.11's wait_for could leave it stuck in "cancelling".
            timer = asyncio.get_running_loop().call_later(delay, self._wakeup.set)
            try:
                await self._wakeup.wait()
            finally:
                timer.cancel()

    async def _work_loop(self) -> None:
        while True:
            token = await self._queue.get()
            try:
                due = await self._beat(token)
            except Exception:  # never lose the token to a bug: keep it, one interval on
                log.exception("heartbeat to %s failed", token_digest(token))
                due = self.policy.after(Outcome.RETRY, self._clock())
            self._verdicts.append((token, due))
            self._verdicts_ready.set()

    async def _beat(self, raw: str) -> float | None:
        """Send one heartbeat; the token's next due time, or None to remove it."""
        try:
            token = parse_token(raw)
        except TokenError as exc:  # only a hand-edited database holds such a token
            log.warning("removing malformed heartbeat token %s: %s", token_digest(raw), exc)
            return None
        if token.kind not in HEARTBEAT_KINDS:  # as upstream: only APNs tokens get heartbeats
            log.info("removing %s token %s from the heartbeats", token.kind.value, token.digest)
            return None
        provider = self.providers.get(token.kind)
        if provider is None:
            log.debug("no APNs provider: heartbeat to %s postponed", token.digest)
            return self.policy.after(Outcome.RETRY, self._clock())
        try:
            delivery = await provider.send(BackgroundPush.of(token))
        except Exception as exc:  # providers should not raise; never let it remove a token
            log.exception("APNs provider raised for heartbeat to %s", token.digest)
            delivery = Delivery(Outcome.RETRY, "send", type(exc).__name__)
        self._count(token, delivery)
        return self.policy.after(delivery.outcome, self._clock())

    def _count(self, token: PushToken, delivery: Delivery) -> None:
        if delivery.outcome is Outcome.SENT:
            self.metrics.heartbeat_notifications.inc()
            log.debug("heartbeat sent to %s", token.digest)
            return
        reason = delivery.reason or "send"
        self.metrics.failed(LABEL[token.kind], reason, delivery.details)
        if delivery.outcome is Outcome.GONE:
            log.info("removing heartbeat token %s: %s %s", token.digest, reason, delivery.details)
        else:
            log.debug("heartbeat to %s failed, kept: %s %s", token.digest, reason, delivery.details)

    async def _write_loop(self) -> None:
        while True:
            await self._verdicts_ready.wait()
            self._verdicts_ready.clear()
            batch, self._verdicts = self._verdicts, []
            if not batch:
                continue
            try:
                await self._run(self.store.apply, batch, dict(self._taken))
            except HeartbeatStoreError as exc:
                log.error("%s; retrying", exc)
                self._verdicts[:0] = batch
                await asyncio.sleep(WRITE_RETRY_DELAY)
                self._verdicts_ready.set()
                continue
            for token, _ in batch:
                self._taken.pop(token, None)
            self.wake()


def heartbeats_from_settings(
    settings: ProxySettings, providers: Mapping[Kind, Provider], metrics: ProxyMetrics
) -> Heartbeats | None:
    """The heartbeats ``--db`` asks for (None without it), and one startup line saying so.

    Raises :class:`HeartbeatStoreError` (one line naming the file) if the
    database cannot be opened.
    """
    interval = settings.interval or DEFAULT_INTERVAL
    if settings.db is None:
        log.info("heartbeats: off (no --db); /register answers 200 and schedules nothing")
        return None
    store = HeartbeatStore(settings.db)
    policy = HeartbeatPolicy(interval)
    log.info(
        "heartbeats: every %s (±%s) to APNs tokens registered at /register; schedule %s, %d tokens",
        format_duration(interval),
        format_duration(policy.jitter),
        settings.db,
        store.count,
    )
    if not any(kind in providers for kind in HEARTBEAT_KINDS):
        log.warning("heartbeats: APNs is not configured: registrations are kept, none is sent")
    return Heartbeats(store, policy, providers, metrics)
