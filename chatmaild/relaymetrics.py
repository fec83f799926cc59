"""Prometheus metrics of the relay side (dict server and notifier), on an optional listener.

Each instance has its own registry (no global state), so tests and an embedded
proxy can live in one process without name clashes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from chatmail_common.hostport import parse_host_port

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _DictStatsCollector(Collector):
    """Reads the dict server's plain-int counters at scrape time (no cost per command)."""

    COUNTERS = (
        ("connections", "Dict connections accepted"),
        ("lookups", "Dict lookups (L) answered"),
        ("iterations", "Dict iterations (I) answered"),
        ("commits", "Dict transactions (C) answered"),
        ("refusals", "Dict commands refused as malformed or unknown"),
        ("accept_pauses", "Episodes of accepting paused because descriptors ran out"),
    )

    def __init__(self, stats: object) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        for name, doc in self.COUNTERS:
            yield CounterMetricFamily(f"chatmail_dict_{name}", doc, value=getattr(self.stats, name))
        by_version = CounterMetricFamily(
            "chatmail_dict_connections_by_protocol",
            "Dict connections by the Dovecot release their hello (H line) speaks for",
            labels=["dovecot"],
        )
        for release, count in sorted(self.stats.connections_by_version.items()):
            by_version.add_metric([release], count)
        yield by_version
        yield GaugeMetricFamily(
            "chatmail_dict_open_connections",
            "Dict connections open",
            value=self.stats.open_connections,
        )


class RelayMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"chatmail_push_{name}", doc, registry=r)

        self.queued = counter("jobs_queued", "Push jobs written to the queue")
        self.coalesced = counter(
            "jobs_coalesced", "New-mail events absorbed by a queued, not yet attempted job"
        )
        self.sent = counter("jobs_sent", "Push jobs the proxy accepted (200)")
        self.retried = counter("jobs_retried", "Push attempts that failed and were rescheduled")
        self.dropped = counter(
            "jobs_dropped", "Push jobs dropped after their last attempt or deadline"
        )
        self.tokens_removed = counter("tokens_removed", "Device tokens removed after a 410 answer")
        self.turn_failures = Counter(
            "chatmail_turn_helper_failures",
            "Asks of the TURN helper that failed (lookups inside the cached failure not counted)",
            registry=r,
        )
        self.queue_depth = Gauge(
            "chatmail_push_queue_depth", "Push jobs waiting in the in-memory queue", registry=r
        )
        self.queue_overdue = Gauge(
            "chatmail_push_queue_overdue_seconds",
            "How long the earliest due push job has waited past its due time (0: none waiting)",
            registry=r,
        )
        # Alert thresholds from the configuration, so rules need no copied constants.
        self.retry_first_delay = Gauge(
            "chatmail_push_retry_first_delay_seconds",
            "Delay before a failed push job's first retry (the retry policy's first delay)",
            registry=r,
        )
        self.latency = Histogram(
            "chatmail_push_send_seconds",
            "Time of one push request to the proxy",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

        # Worker supervision (issue 10): a dead worker is replaced, never silently lost.
        self.workers_live = Gauge(
            "chatmail_notifier_workers_live",
            "Notifier worker threads with their job store and transport open, serving jobs",
            registry=r,
        )
        self.worker_restarts = Counter(
            "chatmail_notifier_worker_restarts",
            "Notifier workers replaced after an exception escaped their loop",
            registry=r,
        )

        # What `chatmail-metadata status` and the alerts compare against (issue 12).
        self.start_time = Gauge(
            "chatmail_metadata_start_time_seconds",
            "When this chatmail-metadata process started (unix time)",
            registry=r,
        )
        self.start_time.set(time.time())
        self.workers_configured = Gauge(
            "chatmail_notifier_workers_configured",
            "Notifier worker threads configured ([metadata] notify_workers); 0 if the notifier "
            "is off",
            registry=r,
        )
        self.embedded_proxy_up = Gauge(
            "chatmail_embedded_proxy_up",
            "1 while the in-process push proxy (notify_url = embedded) runs, else 0",
            registry=r,
        )

    def track_embedded_proxy(self, running: Callable[[], bool]) -> None:
        self.embedded_proxy_up.set_function(lambda: int(running()))

    def track_dict_server(self, stats: object) -> None:
        """Expose the dict server's live counters (a ``dictserver.ServerStats``) on scrape."""
        self.registry.register(_DictStatsCollector(stats))

    def serve(self, hostport: str) -> None:
        """Start the ``/metrics`` HTTP listener (a daemon thread) on ``HOST:PORT``."""
        host, port = parse_host_port(hostport)
        start_http_server(port, addr=host, registry=self.registry)
