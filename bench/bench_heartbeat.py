"""Section "heartbeat": draining the heartbeat schedule after downtime (issue 8).

100,000 APNs tokens (10,000 with ``--quick``) are in the SQLite schedule, all
overdue, as after a long downtime.  A :class:`~notifiers.heartbeat_loop.Heartbeats`
with its default 50 workers drains them through the APNs provider (.p12, behind
the default limiter, as ``build_service`` wires it) to the fake APNs of
devstack/fakes in another process, writing every verdict back.  Baseline in
the same run: the same number of visible pushes through the same limited
client, 50 at a time, with no schedule (the cost of the push itself).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

from bench.bench_proxy import P12_PASSWORD, TOPIC, fake_apns_server
from bench.common import ChildServer, run_child, temp_dir
from bench.table import Figure, at_least, print_table, ratio

CONCURRENCY = 50


def drain(apns: dict, db: str, n: int) -> dict:
    """Child process: fill the schedule, drain it; then the baseline on the same client."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    from notifiers.heartbeat import HeartbeatPolicy
    from notifiers.heartbeat_loop import Heartbeats
    from notifiers.heartbeat_store import HeartbeatStore
    from notifiers.metrics import ProxyMetrics
    from notifiers.providers.apns import ApnsEnvironments, ApnsProvider
    from notifiers.ratelimit import LimitSettings, RateLimitedProvider
    from notifiers.tokens import Kind, parse_token

    HeartbeatStore(Path(db)).close()  # the schema
    with sqlite3.connect(db) as conn:
        now = time.time()
        conn.executemany(
            "INSERT INTO heartbeats (token, due) VALUES (?, ?)",
            ((f"{i:064x}", now - 3600 + i * 1e-3) for i in range(1, n + 1)),
        )

    def client(sandbox: bool) -> ApnsProvider:
        return ApnsProvider.from_p12(
            Path(apns["p12"]),
            P12_PASSWORD,
            topic=TOPIC,
            sandbox=sandbox,
            base_url=apns["url"],
            verify=apns["ca"],
        )

    async def main() -> dict:
        limited = RateLimitedProvider.limiting(
            ApnsEnvironments(client(False), client(True)), LimitSettings()
        )
        providers = {Kind.APNS: limited, Kind.APNS_SANDBOX: limited}
        metrics = ProxyMetrics()
        beats = Heartbeats(HeartbeatStore(Path(db)), HeartbeatPolicy(1200.0), providers, metrics)
        sent = metrics.heartbeat_notifications
        cpu0, t0 = time.process_time(), time.perf_counter()
        await beats.start()
        while sent._value.get() < n:  # noqa: SLF001 - read the counter without rendering
            await asyncio.sleep(0.01)
        while beats.store.due(time.time(), 1):  # every verdict written back
            await asyncio.sleep(0.01)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        await beats.aclose()

        tokens = [parse_token(f"{i:064x}") for i in range(1, n + 1)]
        queue = iter(tokens)
        answers: list[bool] = []

        async def worker() -> None:
            for token in queue:
                answers.append((await limited.send(token)).reason == "")

        bcpu0, b0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        belapsed, bcpu = time.perf_counter() - b0, time.process_time() - bcpu0
        await limited.aclose()
        return {
            "rate": n / elapsed,
            "cpu": cpu / elapsed,
            "left": beats.store.count,
            "base_rate": n / belapsed,
            "base_cpu": bcpu / belapsed,
            "base_ok": sum(answers),
        }

    return asyncio.run(main())


def run(quick: bool) -> list[Figure]:
    n = 10_000 if quick else 100_000
    with temp_dir("heartbeat") as workdir:
        apns = ChildServer(fake_apns_server, str(workdir))
        try:
            r = run_child(drain, apns.info, str(workdir / "heartbeats.sqlite3"), n, timeout=900)
        finally:
            apns._stop.set()
            apns_requests = apns._parent.recv() if apns._parent.poll(15) else None
            apns.close()
    print_table(
        f"heartbeat: {n:,} overdue tokens drained to the fake APNs (answered {apns_requests} "
        f"requests in all), {CONCURRENCY} workers, vs. as many visible pushes on the same client",
        ["what", "count", "per s", "vs baseline", "proxy CPU", "tokens left"],
        [
            ["heartbeat drain (schedule + silent push)", n, r["rate"],
             ratio(r["rate"], r["base_rate"]), f"{100 * r['cpu']:.0f}%", r["left"]],
            ["baseline: visible pushes, bare limited APNs client", r["base_ok"], r["base_rate"],
             "", f"{100 * r['base_cpu']:.0f}%", ""],
        ],
    )  # fmt: skip
    return [at_least(f"heartbeat drain of {n:,} tokens", r["rate"], 1000, "/s")]
