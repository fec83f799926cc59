"""The one small interface every provider client implements (like Sygnal's pushkins).

A provider turns a parsed :class:`~notifiers.tokens.PushToken` into one request to
its push service and reports a :class:`Delivery`.  It never raises for remote
failures: transport errors, timeouts and error statuses all become a Delivery,
so the service maps outcomes to ``/notify`` statuses in one place.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

from chatmail_common.outcome import Outcome

from ..tokens import PushToken

__all__ = ["Delivery", "Outcome", "Provider", "ProviderConfigError"]


@dataclass(frozen=True, slots=True)
class Delivery:
    """Result of one send.

    ``reason`` is the ``notification_failures_total`` label: the HTTP status as a
    decimal string, or a symbolic cause (``send``, ``no_certificate``,
    ``no_api_key``, ``api_key_fetch``, ``no_vapid_key``, ``invalid_token``).
    ``details`` is the provider's short error code (e.g. APNs ``Unregistered``).
    ``retry_after`` (seconds) is set on 429 so the rate limiter can back the
    whole provider off.
    """

    outcome: Outcome
    reason: str = ""
    details: str = ""
    retry_after: float | None = None

    @classmethod
    def sent(cls) -> Delivery:
        return cls(Outcome.SENT)


class Provider(abc.ABC):
    """A push service client.  ``name`` is the metric label (APNS, FCM, UBports, WebPush)."""

    name: str = ""

    @abc.abstractmethod
    async def send(self, token: PushToken) -> Delivery:
        """Send one visible "new messages" push to ``token``."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


class ProviderConfigError(Exception):
    """a provider's key or certificate file is missing or broken"""
