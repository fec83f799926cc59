"""Shared helpers for the push proxy's openpgp and forwarding tests (plain imports)."""

from __future__ import annotations

import time

from notifiers.metrics import ProxyMetrics
from notifiers.providers.base import Delivery, Provider

APNS = "0155b93b7eb8" + "ab" * 26


class Recording(Provider):
    """Records the raw tokens it is asked to send and answers ``answer``: a Delivery
    (sent, unless told otherwise), or an exception it raises."""

    def __init__(self, name: str = "APNS", answer: Delivery | Exception | None = None) -> None:
        self.name = name
        self.answer = answer if answer is not None else Delivery.sent()
        self.sent: list[str] = []

    async def send(self, token):
        self.sent.append(token.raw)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


class HeldClock:
    """``time.monotonic``, except that it stands still between ``hold()`` and ``release()``.

    A test whose steps must all fall inside one debounce window holds the clock for them:
    however slow the machine, the window cannot end halfway (a real 0.3 s window did end
    on a loaded one).  Released, it runs on from where it stood, so the trailing sends come
    one real window later, as they would.
    """

    def __init__(self) -> None:
        self._offset = 0.0
        self._held_at: float | None = None

    def __call__(self) -> float:
        if self._held_at is not None:
            return self._held_at
        return time.monotonic() - self._offset

    def hold(self) -> None:
        self._held_at = self()

    def release(self) -> None:
        assert self._held_at is not None, "the clock was not held"
        self._offset = time.monotonic() - self._held_at
        self._held_at = None


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
