"""Prometheus metrics of the relay side (dict server and notifier), on an optional listener.

Each instance has its own registry (no global state), so tests and an embedded
proxy can live in one process without name clashes.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class RelayMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.queued = Counter(
            "chatmail_push_jobs_queued", "Push jobs written to the queue", registry=r
        )
        self.coalesced = Counter(
            "chatmail_push_jobs_coalesced",
            "New-mail events absorbed by a queued, not yet attempted job",
            registry=r,
        )
        self.sent = Counter(
            "chatmail_push_jobs_sent", "Push jobs the proxy accepted (200)", registry=r
        )
        self.retried = Counter(
            "chatmail_push_jobs_retried",
            "Push attempts that failed and were rescheduled",
            registry=r,
        )
        self.dropped = Counter(
            "chatmail_push_jobs_dropped",
            "Push jobs dropped after their last attempt or deadline",
            registry=r,
        )
        self.tokens_removed = Counter(
            "chatmail_push_tokens_removed", "Device tokens removed after a 410 answer", registry=r
        )
        self.queue_depth = Gauge(
            "chatmail_push_queue_depth", "Push jobs waiting in the in-memory queue", registry=r
        )
        self.latency = Histogram(
            "chatmail_push_send_seconds",
            "Time of one push request to the proxy",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def serve(self, hostport: str) -> None:
        """Start the ``/metrics`` HTTP listener (a daemon thread) on ``HOST:PORT``."""
        host, _, port = hostport.rpartition(":")
        start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1", registry=self.registry)
