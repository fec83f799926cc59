"""A provider that only logs: for local runs, tests and the relay's embedded demo.

It accepts every token kind and "sends" by writing one log line with the kind
and the token's short digest (never the token), then reports SENT, so the whole
pipeline (debouncing, metrics, status mapping) can run without any push service.
"""

from __future__ import annotations

import logging

from ..tokens import PushToken
from .base import Delivery, Provider

log = logging.getLogger(__name__)


class LogProvider(Provider):
    name = "Log"

    def __init__(self) -> None:
        self.sent_count = 0

    async def send(self, token: PushToken) -> Delivery:
        self.sent_count += 1
        log.info("log provider: would send %s push to token %s", token.kind.value, token.digest)
        return Delivery.sent()
