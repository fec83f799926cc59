"""RateLimitedProvider: concurrency cap, requests per second, back-off on 429 (fake time)."""

from __future__ import annotations

import asyncio
import heapq

from notifiers.providers.base import Delivery, Outcome, Provider
from notifiers.ratelimit import MAX_BACKOFF, RateLimitedProvider
from notifiers.tokens import parse_token

TOKEN = parse_token("fcm-chat.delta:abc")


class FakeTime:
    """Virtual time: sleeps wait on timers that :meth:`gather` fires in time order."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._timers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = 0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._seq += 1
        heapq.heappush(self._timers, (self.now + seconds, self._seq, fut))
        await fut

    async def gather(self, *aws):
        """Like asyncio.gather, advancing virtual time whenever every task is asleep."""
        task = asyncio.gather(*aws)
        while not task.done():
            for _ in range(20):
                await asyncio.sleep(0)
            if task.done() or not self._timers:
                continue
            when, _, fut = heapq.heappop(self._timers)
            self.now = max(self.now, when)
            fut.set_result(None)
        return await task


class Scripted(Provider):
    """Answers from a list of deliveries (the last one repeats); records send times."""

    name = "FCM"

    def __init__(self, answers: list[Delivery], time: FakeTime | None = None, hold=None):
        self.answers = answers
        self.time = time
        self.calls: list[float] = []
        self.hold = hold
        self.active = 0
        self.max_active = 0

    async def send(self, token):
        self.calls.append(self.time.now if self.time else 0.0)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.hold is not None:
                await self.hold.wait()
            return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        finally:
            self.active -= 1


def test_passes_deliveries_through_and_keeps_the_name():
    async def main():
        inner = Scripted([Delivery(Outcome.GONE, "404", "UNREGISTERED")])
        p = RateLimitedProvider(inner)
        assert p.name == "FCM"
        assert await p.send(TOKEN) == Delivery(Outcome.GONE, "404", "UNREGISTERED")

    asyncio.run(main())


def test_concurrency_cap():
    async def main():
        hold = asyncio.Event()
        inner = Scripted([Delivery.sent()], hold=hold)
        p = RateLimitedProvider(inner, concurrency=3)
        tasks = [asyncio.create_task(p.send(TOKEN)) for _ in range(10)]
        for _ in range(5):
            await asyncio.sleep(0)
        assert inner.active == 3
        assert p.in_flight == 3
        hold.set()
        results = await asyncio.gather(*tasks)
        assert all(r.outcome is Outcome.SENT for r in results)
        assert inner.max_active == 3
        assert len(inner.calls) == 10

    asyncio.run(main())


def test_requests_per_second_cap():
    async def main():
        t = FakeTime()
        inner = Scripted([Delivery.sent()], t)
        p = RateLimitedProvider(inner, rps=2, max_wait=60, clock=t.clock, sleep=t.sleep)
        results = await t.gather(*(p.send(TOKEN) for _ in range(10)))
        assert all(r.outcome is Outcome.SENT for r in results)
        # a burst of 2, then one every 0.5 s: 10 sends need 4 s
        span = max(inner.calls) - min(inner.calls)
        assert 3.9 <= span <= 4.1, inner.calls

    asyncio.run(main())


def test_rate_limit_wait_beyond_max_wait_gives_retry():
    async def main():
        t = FakeTime()
        inner = Scripted([Delivery.sent()], t)
        p = RateLimitedProvider(inner, rps=1, max_wait=2, clock=t.clock, sleep=t.sleep)
        results = await t.gather(*(p.send(TOKEN) for _ in range(6)))
        reasons = [r.reason for r in results if r.outcome is Outcome.RETRY]
        assert reasons and set(reasons) == {"ratelimit"}
        assert sum(r.outcome is Outcome.SENT for r in results) == 3  # now, +1 s, +2 s

    asyncio.run(main())


def test_429_backs_off_the_whole_provider_and_later_sends_wait():
    async def main():
        t = FakeTime()
        throttled = Delivery(Outcome.RETRY, "429", "QUOTA_EXCEEDED", retry_after=5.0)
        inner = Scripted([throttled, Delivery.sent()], t)
        p = RateLimitedProvider(inner, max_wait=10, clock=t.clock, sleep=t.sleep)
        first = await p.send(TOKEN)
        assert first.outcome is Outcome.RETRY and first.reason == "429"  # never 410
        assert p.backoff_until == 1005.0
        (second,) = await t.gather(p.send(TOKEN))
        assert second.outcome is Outcome.SENT
        assert inner.calls == [1000.0, 1005.0]  # waited out the back-off

    asyncio.run(main())


def test_backoff_longer_than_max_wait_answers_retry_backoff_without_calling():
    async def main():
        t = FakeTime()
        inner = Scripted([Delivery(Outcome.RETRY, "429", retry_after=120.0), Delivery.sent()], t)
        p = RateLimitedProvider(inner, max_wait=10, clock=t.clock, sleep=t.sleep)
        await p.send(TOKEN)
        result = await p.send(TOKEN)
        assert result == Delivery(Outcome.RETRY, "backoff")
        assert len(inner.calls) == 1
        t.now += 120
        assert (await p.send(TOKEN)).outcome is Outcome.SENT

    asyncio.run(main())


def test_backoff_is_capped_and_never_shortened():
    t = FakeTime()
    p = RateLimitedProvider(Scripted([Delivery.sent()]), clock=t.clock, sleep=t.sleep)
    p.back_off(10**9)
    assert p.backoff_until == t.now + MAX_BACKOFF
    p.back_off(1)
    assert p.backoff_until == t.now + MAX_BACKOFF


def test_429_while_others_queue_for_a_slot_holds_them_back():
    async def main():
        t = FakeTime()
        hold = asyncio.Event()
        inner = Scripted(
            [Delivery(Outcome.RETRY, "429", retry_after=3.0), Delivery.sent()], t, hold
        )
        p = RateLimitedProvider(inner, concurrency=1, max_wait=10, clock=t.clock, sleep=t.sleep)
        first = asyncio.ensure_future(p.send(TOKEN))
        second = asyncio.ensure_future(p.send(TOKEN))  # passes back-off check, waits for the slot
        await asyncio.sleep(0)
        hold.set()
        results = await t.gather(first, second)
        assert [r.outcome for r in results] == [Outcome.RETRY, Outcome.SENT]
        assert inner.calls == [1000.0, 1003.0]

    asyncio.run(main())
