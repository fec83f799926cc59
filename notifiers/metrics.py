"""Prometheus metrics of the push proxy, compatible with upstream's (reference §11).

Names, types, label names and HELP texts are upstream's, so existing dashboards
and alerts keep working; ``notification_latency_seconds`` is ours.  Each
:class:`ProxyMetrics` owns its :class:`~prometheus_client.CollectorRegistry` (no
process-global state), so tests and an embedded proxy next to other code do not
collide.  The exposition is OpenMetrics text; the ``*_created`` samples that the
Python client adds are left out because upstream does not have them.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

#: Content-Type of :meth:`ProxyMetrics.render` (OpenMetrics 1.0.0).
CONTENT_TYPE = CONTENT_TYPE_LATEST

#: Provider label values, as upstream (the Rust enum variant names).
PROVIDERS = ("APNS", "FCM", "UBports", "WebPush")

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 60.0)


class _WithoutCreated(Collector):
    """Re-exports a registry's metrics without the ``*_created`` samples."""

    def __init__(self, inner: CollectorRegistry) -> None:
        self._inner = inner

    def collect(self) -> Iterable[Metric]:
        for metric in self._inner.collect():
            metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric


class ProxyMetrics:
    """Every upstream metric (same registration order) plus per-provider latency."""

    def __init__(self) -> None:
        inner = CollectorRegistry(auto_describe=True)
        self.direct_notifications = Counter(
            "direct_notifications", "Number of direct APNS notifications", registry=inner
        )
        self.fcm_notifications = Counter(
            "fcm_notifications", "Number of FCM notifications", registry=inner
        )
        self.ubports_notifications = Counter(
            "ubports_notifications", "Number of UBports notifications", registry=inner
        )
        self.webpush_notifications = Counter(
            "webpush_notifications", "Number of web push notifications", registry=inner
        )
        self.debounced_notifications = Counter(
            "debounced_notifications", "Number of debounced notifications", registry=inner
        )
        self.debounced_set_size = Gauge(
            "debounced_set_size", "Number of tokens notified recently.", registry=inner
        )
        self.heartbeat_notifications = Counter(
            "heartbeat_notifications", "Number of heartbeat notifications", registry=inner
        )
        self.heartbeat_registrations = Counter(
            "heartbeat_registrations", "Number of heartbeat registrations", registry=inner
        )
        self.heartbeat_tokens = Gauge(
            "heartbeat_tokens",
            "Number of tokens registered for heartbeat notifications",
            registry=inner,
        )
        self.openpgp_decryption_failures = Counter(
            "openpgp_decryption_failures",
            "Number of failures to decrypt OpenPGP-encrypted token",
            registry=inner,
        )
        self.notification_failures = Counter(
            "notification_failures",
            "Number of failed notifications by provider and error type",
            ["provider", "reason", "details"],
            registry=inner,
        )
        self.notification_latency = Histogram(
            "notification_latency_seconds",
            "Time spent sending one notification to the push provider, by provider",
            ["provider"],
            buckets=_LATENCY_BUCKETS,
            registry=inner,
        )
        self._success = {
            "APNS": self.direct_notifications,
            "FCM": self.fcm_notifications,
            "UBports": self.ubports_notifications,
            "WebPush": self.webpush_notifications,
        }
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_WithoutCreated(inner))

    def sent(self, provider: str) -> None:
        """Count an accepted push for ``provider`` (one of :data:`PROVIDERS`)."""
        counter = self._success.get(provider)
        if counter is not None:
            counter.inc()

    def failed(self, provider: str, reason: str, details: str = "") -> None:
        self.notification_failures.labels(provider, reason, details).inc()

    def render(self) -> bytes:
        """OpenMetrics text, ending with ``# EOF``."""
        return generate_latest(self.registry)
