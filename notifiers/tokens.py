"""Token grammar, sans-I/O: which provider a (decrypted) token belongs to.

Prefixes are checked in upstream's order: ``fcm-<package>:<token>``, ``ubports-``,
``webpush:<endpoint>|<p256dh>|<auth>``, ``sandbox:<hex>``, anything else is an
APNs production device token.  (``openpgp:`` tokens are decrypted before this.)

The grammar also fixes the characters each kind allows, so that a malformed
token is refused here, once for every kind: ``/notify`` answers it 400 before
any provider sees it.  A malformed token is a client or relay bug, never a dead
device, so no provider may answer it 410 (which makes the relay delete it).

* APNs (both environments): hex digits, the form of Apple's device token;
* FCM and UBports: ASCII letters, digits, ``_``, ``:`` and ``-`` (upstream's
  check; it also keeps the token from breaking the JSON it is spliced into).
  The FCM package name is not checked: it is parsed but not used;
* Web Push: an ``https://`` endpoint URL of visible ASCII (no spaces or
  control characters) with a host and no user info, and the RFC 8291
  subscription keys in base64url (padding tolerated): ``p256dh`` an
  uncompressed P-256 point (65 bytes, first byte 4), ``auth`` 16 bytes.
  Whether the endpoint's host may be contacted at all (allow-list, private
  addresses) is the provider's policy, not grammar.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
import urllib.parse
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
        token = PushToken(Kind.FCM, raw, device, package=package)
    elif raw.startswith("ubports-"):
        token = PushToken(Kind.UBPORTS, raw, raw[8:])
    elif raw.startswith("webpush:"):
        parts = raw[8:].split("|", 2)
        if len(parts) < 3:
            raise TokenError("invalid web push token: expected webpush:<endpoint>|<p256dh>|<auth>")
        token = PushToken(Kind.WEBPUSH, raw, parts[0], p256dh=parts[1], auth=parts[2])
    elif raw.startswith("sandbox:"):
        token = PushToken(Kind.APNS_SANDBOX, raw, raw[8:])
    else:
        token = PushToken(Kind.APNS, raw, raw)
    problem = _problem(token)
    if problem:
        raise TokenError(problem)
    return token


def well_formed(token: PushToken) -> bool:
    """Whether ``token`` keeps its kind's character rules (:func:`parse_token` made sure;
    providers call this as a guard for tokens built by hand)."""
    return _problem(token) is None


_APNS_DEVICE = re.compile(r"[0-9A-Fa-f]+")
_SAFE_DEVICE = re.compile(r"[A-Za-z0-9_:\-]+")
_VISIBLE_ASCII = re.compile(r"[!-~]+")
_BASE64URL = re.compile(r"[A-Za-z0-9_\-]+={0,2}")


def _problem(token: PushToken) -> str | None:
    """What is wrong with ``token`` under its kind's character rules, or None."""
    kind, device = token.kind, token.device
    if kind in (Kind.APNS, Kind.APNS_SANDBOX):
        # Anything else (an unknown prefix, a stray newline) is a client or relay bug.
        if not _APNS_DEVICE.fullmatch(device):
            return "invalid APNs token: expected hex digits (or an unknown prefix)"
    elif kind in (Kind.FCM, Kind.UBPORTS):
        if not _SAFE_DEVICE.fullmatch(device):
            return f"invalid {kind.value} token: expected ASCII letters, digits, '_', ':' or '-'"
    elif kind is Kind.WEBPUSH:
        return _webpush_problem(token)
    return None


#: RFC 8291: the user agent's public key is an uncompressed P-256 point, the auth secret 16 bytes.
P256DH_BYTES = 65
AUTH_BYTES = 16


def base64url_bytes(text: str) -> bytes | None:
    """The bytes of base64url ``text`` (padding optional), or None if it is not base64url."""
    if not _BASE64URL.fullmatch(text):
        return None
    stripped = text.rstrip("=")
    try:
        return base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4))
    except (binascii.Error, ValueError):
        return None


def _webpush_problem(token: PushToken) -> str | None:
    endpoint = token.device
    if not _VISIBLE_ASCII.fullmatch(endpoint):
        return "invalid web push token: the endpoint has spaces or non-ASCII characters"
    try:
        url = urllib.parse.urlsplit(endpoint)
        url.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        return "invalid web push token: the endpoint is not a URL"
    if url.scheme.lower() != "https" or not url.hostname or "@" in url.netloc:
        return "invalid web push token: the endpoint must be an https:// URL with a host"
    p256dh = base64url_bytes(token.p256dh)
    if p256dh is None or len(p256dh) != P256DH_BYTES or p256dh[0] != 4:
        return "invalid web push token: p256dh must be a base64url uncompressed P-256 key"
    auth = base64url_bytes(token.auth)
    if auth is None or len(auth) != AUTH_BYTES:
        return "invalid web push token: auth must be 16 bytes in base64url"
    return None
