"""A fake FCM HTTP v1 service plus its OAuth token endpoint, on one HTTP/2 server.

``POST /token`` checks the JWT-bearer assertion (RS256 signature with the
service account's public key, ``iss``/``aud``/``scope``/``exp``) and issues
``ya29.fake-<n>`` access tokens; ``POST /v1/projects/<id>/messages:send``
accepts only a live issued token (else 401 UNAUTHENTICATED) and then answers
the scripted replies.  ``token_script`` scripts the token endpoint separately.
"""

from __future__ import annotations

import collections
import json
import urllib.parse

import jwt
import trustme
from cryptography.hazmat.primitives.asymmetric import rsa

from .h2server import FakeH2Server, Reply, Request
from .keys import server_context

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"


def fcm_error(status: int, grpc_status: str, error_code: str | None = None, **extra) -> Reply:
    """An FCM v1 error body as Google sends it."""
    details: list[dict] = []
    if error_code:
        details.append(
            {
                "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                "errorCode": error_code,
            }
        )
    error = {"code": status, "message": extra.pop("message", grpc_status), "status": grpc_status}
    details.extend(extra.pop("more_details", []))
    if details:
        error["details"] = details
    reply = Reply.json(status, json.dumps({"error": error}))
    if "retry_after" in extra:
        reply.headers.append(("retry-after", extra.pop("retry_after")))
    return reply


def invalid_token_error() -> Reply:
    """What FCM answers for a malformed registration token (400 INVALID_ARGUMENT)."""
    return fcm_error(
        400,
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        message="The registration token is not a valid FCM registration token",
        more_details=[
            {
                "@type": "type.googleapis.com/google.rpc.BadRequest",
                "fieldViolations": [
                    {"field": "message.token", "description": "Invalid registration token"}
                ],
            }
        ],
    )


class FakeFcm(FakeH2Server):
    def __init__(self, ca: trustme.CA, *, project_id: str = "test-project") -> None:
        super().__init__(server_context(ca), handler=self._route)
        self.project_id = project_id
        self.client_email = ""
        self.public_key: rsa.RSAPublicKey | None = None
        self.expires_in = 3599
        self.issued: list[str] = []
        self.valid: set[str] = set()
        self.assertions: list[dict] = []
        self.token_script: collections.deque[Reply] = collections.deque()
        self.default = Reply.json(200, json.dumps({"name": f"projects/{project_id}/messages/1"}))

    @property
    def token_url(self) -> str:
        return f"{self.url}/token"

    @property
    def send_path(self) -> str:
        return f"/v1/projects/{self.project_id}/messages:send"

    @property
    def send_requests(self) -> list[Request]:
        return [r for r in self.requests if r.path != "/token"]

    @property
    def token_requests(self) -> list[Request]:
        return [r for r in self.requests if r.path == "/token"]

    def use_service_account(self, info: dict) -> None:
        """Trust the account written by :func:`devstack.fakes.keys.write_service_account`."""
        self.client_email = str(info["client_email"])
        self.public_key = info["public_key"]  # type: ignore[assignment]

    def revoke_all(self) -> None:
        """Make every issued access token invalid (as if it expired on Google's side)."""
        self.valid.clear()

    def _route(self, request: Request) -> Reply | None:
        if request.path == "/token":
            return self._token(request)
        if request.method != "POST" or request.path != self.send_path:
            return fcm_error(404, "NOT_FOUND", message="wrong path")
        auth = request.header("authorization") or ""
        if not auth.startswith("Bearer ") or auth[7:] not in self.valid:
            return fcm_error(401, "UNAUTHENTICATED", message="Request had invalid credentials.")
        return None

    def _token(self, request: Request) -> Reply:
        if self.token_script:
            return self.token_script.popleft()
        form = urllib.parse.parse_qs(request.body.decode())
        bad = Reply.json(400, '{"error":"invalid_grant","error_description":"bad assertion"}')
        if form.get("grant_type") != ["urn:ietf:params:oauth:grant-type:jwt-bearer"]:
            return bad
        try:
            header = jwt.get_unverified_header(form["assertion"][0])
            claims = jwt.decode(
                form["assertion"][0],
                self.public_key,
                algorithms=["RS256"],
                audience=[self.token_url, GOOGLE_TOKEN_URI],  # token_url override keeps aud
                options={
                    "require": ["iss", "aud", "iat", "exp", "scope"],
                    "verify_exp": False,  # tests drive the client with a fake clock
                    "verify_iat": False,
                },
            )
        except (KeyError, jwt.PyJWTError):
            return bad
        if (
            claims["iss"] != self.client_email
            or claims["scope"] != SCOPE
            or not 0 < claims["exp"] - claims["iat"] <= 3600
        ):
            return bad
        self.assertions.append({"header": header, "claims": claims})
        token = f"ya29.fake-{len(self.issued) + 1}"
        self.issued.append(token)
        self.valid.add(token)
        body = {"access_token": token, "expires_in": self.expires_in, "token_type": "Bearer"}
        return Reply.json(200, json.dumps(body))
