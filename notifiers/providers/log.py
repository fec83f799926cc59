"""A provider that only logs: for local runs, tests and the relay's embedded demo.

It accepts every token kind and "sends" by writing one log line with the kind
and the token's short digest (never the token), then reports SENT, so the whole
pipeline (debouncing, metrics, status mapping) can run without any push service.

Registered as a stand-in (:data:`PROVIDER`, listed first in the registry): with
``--log-provider`` it serves every token kind in place of the push services,
which are then not built at all, under their metric labels and limits.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..options import Option, boolean
from ..tokens import Kind, PushToken
from .base import Delivery, Provider
from .spec import Built, ProviderSpec

if TYPE_CHECKING:
    from ..settings import ProxySettings

log = logging.getLogger(__name__)


class LogProvider(Provider):
    name = "Log"

    def __init__(self) -> None:
        self.sent_count = 0

    async def send(self, token: PushToken) -> Delivery:
        self.sent_count += 1
        log.info("log provider: would send %s push to token %s", token.kind.value, token.digest)
        return Delivery.sent()


def build(settings: ProxySettings) -> Built | None:
    if not settings.log_provider:
        return None
    detail = "no push service is contacted, pushes are only logged"
    return Built(LogProvider(), detail, logging.WARNING)


PROVIDER = ProviderSpec(
    name="log provider",
    kinds=tuple(Kind),
    options=(
        Option(
            "log_provider",
            boolean,
            False,
            help="do not contact any push service: log what would be sent (local runs, demos)",
        ),
    ),
    build=build,
)
