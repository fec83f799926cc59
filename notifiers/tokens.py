"""Token grammar, sans-I/O: which provider a (decrypted) token belongs to.

Prefixes are checked in upstream's order: ``fcm-<package>:<token>``, ``ubports-``,
``webpush:<endpoint>|<p256dh>|<auth>``, ``sandbox:<hex>``, anything else is an
APNs production device token.  (``openpgp:`` tokens are decrypted before this.)
"""

from __future__ import annotations

import enum
import string
from dataclasses import dataclass

from chatmail_common.digest import token_digest


class Kind(enum.Enum):
    APNS = "APNS"
    APNS_SANDBOX = "APNS_SANDBOX"
    FCM = "FCM"
    UBPORTS = "UBports"
    WEBPUSH = "WebPush"


class TokenError(ValueError):
    """The token does not follow the grammar (a client or relay bug, never a dead token)."""


@dataclass(frozen=True, slots=True)
class PushToken:
    """A parsed plaintext token.

    ``device`` is what the provider needs: the APNs hex token, the FCM registration
    token, the UBports token, or the Web Push endpoint URL; ``package`` is the FCM
    package name; ``p256dh``/``auth`` are the Web Push subscription keys.
    """

    kind: Kind
    raw: str
    device: str
    package: str = ""
    p256dh: str = ""
    auth: str = ""

    @property
    def digest(self) -> str:
        return token_digest(self.raw)


def parse_token(raw: str) -> PushToken:
    """Classify ``raw``; raise :class:`TokenError` when it is malformed."""
    if not raw:
        raise TokenError("empty token")
    if raw.startswith("fcm-"):
        package, sep, device = raw[4:].partition(":")
        if not sep or not device:
            raise TokenError("invalid FCM token: expected fcm-<package>:<token>")
        return PushToken(Kind.FCM, raw, device, package=package)
    if raw.startswith("ubports-"):
        device = raw[8:]
        if not device:
            raise TokenError("invalid UBports token: empty")
        return PushToken(Kind.UBPORTS, raw, device)
    if raw.startswith("webpush:"):
        parts = raw[8:].split("|", 2)
        if len(parts) < 3 or not all(parts):
            raise TokenError("invalid web push token: expected webpush:<endpoint>|<p256dh>|<auth>")
        return PushToken(Kind.WEBPUSH, raw, parts[0], p256dh=parts[1], auth=parts[2])
    if raw.startswith("sandbox:"):
        return PushToken(Kind.APNS_SANDBOX, raw, _apns_device(raw[8:]))
    return PushToken(Kind.APNS, raw, _apns_device(raw))


def _apns_device(device: str) -> str:
    """APNs device tokens are hex.  Anything else (an unknown prefix, a stray newline)
    is a client or relay bug: a 400, never a 410 that would delete the token."""
    if not device or not all(c in _HEXDIGITS for c in device):
        raise TokenError("invalid APNs token: expected hex digits (or an unknown prefix)")
    return device


_HEXDIGITS = frozenset(string.hexdigits)
