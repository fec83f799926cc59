"""Web Push (``webpush:`` tokens): registered, but without a client yet.

Why registered: upstream's metrics expose ``webpush_notifications`` and answer
``webpush:`` tokens with the failure reason ``no_vapid_key`` when Web Push is
off, and both stay so.  Until the client lands (VAPID key option, aes128gcm
encryption), :func:`build` never builds a provider, so ``webpush:`` tokens are
answered 500 with that reason, except under the log provider, which serves
every kind.  The client and its ``--vapid-key-path`` option belong in this file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..tokens import Kind
from .spec import Built, ProviderSpec

if TYPE_CHECKING:
    from ..settings import ProxySettings


def build(settings: ProxySettings) -> Built | None:
    return None


PROVIDER = ProviderSpec(
    name="WebPush",
    description="not implemented yet: webpush: tokens are answered 500 "
    "(its limits apply to the log provider)",
    kinds=(Kind.WEBPUSH,),
    options=(),
    build=build,
    disabled="not implemented yet: webpush: tokens are answered 500",
    label="WebPush",
    success=("webpush_notifications", "Number of web push notifications"),
    not_configured="no_vapid_key",
)
