"""VAPID (RFC 8292): who we are to a Web Push service, sans-I/O.

Every push request carries ``Authorization: vapid t=<JWT>, k=<public key>``:
an ES256 JWT whose ``aud`` is the origin of the push endpoint, ``exp`` at most
24 hours ahead (we use 12 h, as upstream) and ``sub`` a contact URI for the
push service's operator (``mailto:`` or ``https:``).  ``k`` is the public key
as an uncompressed P-256 point in base64url without padding: the same string
a client puts into its subscription as ``applicationServerKey``, which is why
the proxy logs it at start.

A signature costs far more than the rest of a send, and a JWT is valid for
hours, so :class:`Vapid` keeps one per audience and re-signs it when less than
an hour of its validity is left.
"""

from __future__ import annotations

import base64
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .base import ProviderConfigError

#: How long a JWT is valid (RFC 8292 allows at most 24 h).
JWT_LIFETIME = 12 * 3600
#: A cached JWT is replaced when less than this is left of it.
JWT_RENEW_BEFORE = 3600
#: Audiences (push service origins) whose JWT is kept; there are a handful in practice.
MAX_CACHED_AUDIENCES = 1024
DEFAULT_SUBJECT = "mailto:postmaster@localhost.invalid"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The VAPID P-256 private key from a PEM file (PKCS#8, as upstream's ``openssl pkcs8``).

    Every problem is a :class:`ProviderConfigError` of one line naming the file.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ProviderConfigError(f"VAPID key {path}: {exc.strerror or exc}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:
        raise ProviderConfigError(f"VAPID key {path}: encrypted keys are not supported") from exc
    except ValueError as exc:
        raise ProviderConfigError(f"VAPID key {path}: not a PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ProviderConfigError(f"VAPID key {path}: not a P-256 (prime256v1) EC key")
    return key


def check_subject(value: str) -> str:
    """The ``--vapid-subject`` option: a ``mailto:`` or ``https:`` URI (RFC 8292 §2.1)."""
    if not (value.startswith("mailto:") and len(value) > 7) and not value.startswith("https://"):
        raise ValueError(f"expected a mailto: or https:// URI, got {value!r}")
    return value


def audience(endpoint: str) -> str:
    """The origin of ``endpoint`` (scheme, host, and the port only when it is not 443)."""
    url = urllib.parse.urlsplit(endpoint)
    host = url.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = url.port
    return f"https://{host}" + (f":{port}" if port not in (None, 443) else "")


class Vapid:
    """Makes the ``Authorization`` header for an endpoint; JWTs cached per audience."""

    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey,
        subject: str = DEFAULT_SUBJECT,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key = key
        self.subject = subject
        self._clock = clock
        point = key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        self.public_key = b64url(point)
        self._cache: dict[str, tuple[str, float]] = {}

    def header(self, endpoint: str) -> str:
        """``vapid t=<JWT>, k=<public key>`` for a request to ``endpoint``."""
        aud = audience(endpoint)
        now = self._clock()
        cached = self._cache.get(aud)
        if cached is None or cached[1] - now < JWT_RENEW_BEFORE:
            if len(self._cache) >= MAX_CACHED_AUDIENCES:
                self._cache.clear()
            expires = int(now) + JWT_LIFETIME
            claims = {"aud": aud, "exp": expires, "sub": self.subject}
            token = jwt.encode(claims, self._key, algorithm="ES256", headers={"typ": "JWT"})
            cached = self._cache[aud] = (token, float(expires))
        return f"vapid t={cached[0]}, k={self.public_key}"
