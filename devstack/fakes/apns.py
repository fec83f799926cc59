"""A fake APNs: real HTTP/2 over TLS, mTLS or JWT checks, Apple-style error bodies."""

from __future__ import annotations

import json

import jwt
import trustme
from cryptography.hazmat.primitives.asymmetric import ec

from .h2server import FakeH2Server, Reply, Request
from .keys import server_context


def apns_error(status: int, reason: str, retry_after: str | None = None) -> Reply:
    """An APNs error answer: ``{"reason": ...}`` plus an ``apns-id``."""
    reply = Reply.json(status, json.dumps({"reason": reason}))
    reply.headers.append(("apns-id", "00000000-0000-0000-0000-000000000001"))
    if retry_after is not None:
        reply.headers.append(("retry-after", retry_after))
    return reply


class FakeApns(FakeH2Server):
    """Certificate mode (``client_ca`` set: TLS demands a client cert signed by it)
    or token mode (``jwt_key`` set: every request must carry a valid ES256 JWT
    with ``kid``/``iss``, else 403 ``MissingProviderToken``/``InvalidProviderToken``).
    ``jwts`` records each verified (header, claims) pair."""

    def __init__(
        self,
        ca: trustme.CA,
        *,
        client_ca: trustme.CA | None = None,
        jwt_key: ec.EllipticCurvePublicKey | None = None,
        key_id: str = "",
        team_id: str = "",
    ) -> None:
        super().__init__(server_context(ca, client_ca), handler=self._check)
        self.jwt_key = jwt_key
        self.key_id = key_id
        self.team_id = team_id
        self.jwts: list[tuple[dict, dict]] = []
        self.default = Reply(200, headers=[("apns-id", "00000000-0000-0000-0000-000000000000")])

    def _check(self, request: Request) -> Reply | None:
        if request.method != "POST" or not request.path.startswith("/3/device/"):
            return apns_error(404, "BadPath")
        if self.jwt_key is None:
            return None
        auth = request.header("authorization")
        if not auth or not auth.startswith("bearer "):
            return apns_error(403, "MissingProviderToken")
        token = auth[len("bearer ") :]
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(
                token,
                self.jwt_key,
                algorithms=["ES256"],
                options={"require": ["iss", "iat"], "verify_iat": False},
            )
        except jwt.PyJWTError:
            return apns_error(403, "InvalidProviderToken")
        if header.get("kid") != self.key_id or claims.get("iss") != self.team_id:
            return apns_error(403, "InvalidProviderToken")
        self.jwts.append((header, claims))
        return None
