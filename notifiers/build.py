"""From settings to a :class:`NotifyService`: the configured providers, each behind its limiter.

Each token kind is served by the first provider in registry order whose
factory builds one (:mod:`notifiers.providers.registry`; the log provider,
when on, stands in for all).  Every provider is put behind the limiter of the
push service that owns the kind, one limiter per service and label: the kinds
of one service share it (APNs production and sandbox), so the configured
limits are that service's total.  Each push service logs one line at start,
enabled or disabled and why; a broken key file is a ProviderConfigError.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from . import forwarding, openpgp
from .debounce import Debouncer
from .heartbeat_loop import heartbeats_from_settings
from .metrics import ProxyMetrics
from .providers.base import Provider
from .providers.registry import LABEL, PROVIDERS
from .ratelimit import RateLimitedProvider
from .service import NotifyService
from .settings import ProxySettings
from .tokens import Kind

log = logging.getLogger(__name__)


def build_providers(settings: ProxySettings) -> dict[Kind, Provider]:
    """The enabled providers by token kind, rate-limited."""
    limits = settings.limits
    providers: dict[Kind, Provider] = {}
    for spec in PROVIDERS:
        wanted = [kind for kind in spec.kinds if kind not in providers]
        if not wanted:
            continue
        built = spec.build(settings)
        if built is None:
            if spec.is_service:
                log.warning("%s: disabled (%s)", spec.name, spec.disabled)
            continue
        log.log(built.level, "%s: enabled (%s)", spec.name, built.detail)
        limited: dict[str, Provider] = {}
        for kind in wanted:
            label = LABEL[kind]
            if label not in limited:
                limited[label] = RateLimitedProvider.limiting(built.provider, limits[label])
            providers[kind] = limited[label]
    return providers


def build_service(
    settings: ProxySettings,
    *,
    metrics: ProxyMetrics | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> NotifyService:
    """A :class:`NotifyService` with the enabled providers, debouncer and metrics.
    ``clock`` times the debounce windows (a test holds it still to stay inside one)."""
    providers = build_providers(settings)
    decryptor = openpgp.build(settings)
    upstream = forwarding.build(settings)
    if decryptor is not None and upstream is None:
        # The policy answers GONE to a token for a key we do not hold (it can never be
        # delivered here), and relays then delete it: right for a proxy that serves only
        # clients of its own app, fatal for a relay in front of the central service.
        log.warning(
            "openpgp: tokens for keys not in the keyring are answered 410 (relays delete them); "
            "stock Delta Chat clients encrypt to notifications.delta.chat: set --upstream-url "
            "to forward those instead"
        )
    metrics = metrics if metrics is not None else ProxyMetrics()
    return NotifyService(
        providers,
        metrics=metrics,
        heartbeats=heartbeats_from_settings(settings, providers, metrics),
        debouncer=Debouncer(settings.debounce_seconds, settings.debounce_max_entries),
        decryptor=decryptor,
        upstream=upstream,
        forward_all=settings.forward_all,
        clock=clock,
    )
