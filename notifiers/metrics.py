"""Prometheus metrics of the push proxy, compatible with upstream's (reference §11).

Names, types, label names, HELP texts and registration order are upstream's, so
existing dashboards and alerts keep working; ``notification_latency_seconds``,
``openpgp_decryption_failures_by_key`` (the upstream counter by key and reason;
upstream's own stays unlabelled so its sample keeps its name) and
``forwarded_notifications`` (by the upstream proxy's answer) are ours.  The
push services' success counters (``direct_notifications``, ``fcm_notifications``,
...) are declared by the providers and come first, in registry order.  Each
:class:`ProxyMetrics` owns its
:class:`~prometheus_client.CollectorRegistry` (no process-global state), so
tests and an embedded proxy next to other code do not collide.  The exposition
is OpenMetrics text; the ``*_created`` samples that the Python client adds are
left out because upstream does not have them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import partial

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from .providers.registry import SUCCESS_METRICS

#: Content-Type of :meth:`ProxyMetrics.render` (OpenMetrics 1.0.0).
CONTENT_TYPE = CONTENT_TYPE_LATEST

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
    """Every upstream metric (same registration order) plus per-provider latency.

    ``success``: label -> (name, HELP text) of each push service's success
    counter (default: the registry's).
    """

    def __init__(self, success: Mapping[str, tuple[str, str]] = SUCCESS_METRICS) -> None:
        inner = CollectorRegistry(auto_describe=True)
        counter = partial(Counter, registry=inner)
        gauge = partial(Gauge, registry=inner)
        self.success = {label: counter(name, text) for label, (name, text) in success.items()}
        self.debounced_notifications = counter(
            "debounced_notifications", "Number of debounced notifications"
        )
        self.debounced_set_size = gauge("debounced_set_size", "Number of tokens notified recently.")
        self.heartbeat_notifications = counter(
            "heartbeat_notifications", "Number of heartbeat notifications"
        )
        self.heartbeat_registrations = counter(
            "heartbeat_registrations", "Number of heartbeat registrations"
        )
        self.heartbeat_tokens = gauge(
            "heartbeat_tokens", "Number of tokens registered for heartbeat notifications"
        )
        self.openpgp_decryption_failures = counter(
            "openpgp_decryption_failures", "Number of failures to decrypt OpenPGP-encrypted token"
        )
        self.notification_failures = counter(
            "notification_failures",
            "Number of failed notifications by provider and error type",
            ["provider", "reason", "details"],
        )
        self.notification_latency = Histogram(
            "notification_latency_seconds",
            "Time spent sending one notification to the push provider, by provider",
            ["provider"],
            buckets=_LATENCY_BUCKETS,
            registry=inner,
        )
        self.openpgp_failures_by_key = counter(
            "openpgp_decryption_failures_by_key",
            "Number of openpgp: tokens answered 410, by our key's fingerprint (empty: none of "
            "ours) and reason",
            ["key", "reason"],
        )
        self.forwarded_notifications = counter(
            "forwarded_notifications",
            "Number of notifications forwarded to the upstream proxy, by its HTTP status "
            "(send: no answer)",
            ["status"],
        )
        self.listener_accept_pauses = counter(
            "listener_accept_pauses",
            "Episodes of accepting connections paused because descriptors ran out",
        )
        self._latency: dict[str, Histogram] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_WithoutCreated(inner))

    def latency(self, provider: str) -> Histogram:
        """The latency histogram of ``provider``; ``labels()`` looked it up under a lock and
        built a tuple on every push, so each child is kept here after its first use."""
        child = self._latency.get(provider)
        if child is None:
            child = self._latency[provider] = self.notification_latency.labels(provider)
        return child

    def sent(self, provider: str) -> None:
        """Count an accepted push for the push service labelled ``provider``."""
        counter = self.success.get(provider)
        if counter is not None:
            counter.inc()

    def openpgp_failed(self, key: str, reason: str) -> None:
        """Count an ``openpgp:`` token answered GONE: upstream's counter and ours by label."""
        self.openpgp_decryption_failures.inc()
        self.openpgp_failures_by_key.labels(key, reason).inc()

    def forwarded(self, status: str) -> None:
        self.forwarded_notifications.labels(status).inc()

    def failed(self, provider: str, reason: str, details: str = "") -> None:
        self.notification_failures.labels(provider, reason, details).inc()

    def render(self) -> bytes:
        """OpenMetrics text, ending with ``# EOF``."""
        return generate_latest(self.registry)
