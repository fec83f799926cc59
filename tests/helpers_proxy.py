"""Shared helpers for the push proxy's openpgp and forwarding tests (plain imports)."""

from __future__ import annotations

from notifiers.metrics import ProxyMetrics
from notifiers.providers.base import Delivery, Provider

APNS = "0155b93b7eb8" + "ab" * 26


class Recording(Provider):
    """Records the raw tokens it is asked to send and reports them sent."""

    def __init__(self, name: str = "APNS") -> None:
        self.name = name
        self.sent: list[str] = []

    async def send(self, token):
        self.sent.append(token.raw)
        return Delivery.sent()


def sample(metrics: ProxyMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


def fake_apns_options(fake_apns, apns_key, ca_path) -> dict[str, str]:
    """``[notifiers]`` options that point APNs (token auth) at a fake APNs, UBports off."""
    return {
        "apns_key_file": str(apns_key.path),
        "apns_key_id": apns_key.key_id,
        "apns_team_id": apns_key.team_id,
        "topic": "chat.delta",
        "apns_url": fake_apns.url,
        "apns_sandbox_url": fake_apns.url,
        "ca_file": str(ca_path),
        "ubports": "false",
    }
