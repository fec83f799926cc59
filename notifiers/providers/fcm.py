"""Firebase Cloud Messaging HTTP v1 client with service-account OAuth.

The access token comes from the OAuth 2.0 JWT-bearer grant: an RS256 JWT
signed with the service account's key is exchanged at ``token_uri`` for a
bearer token, which is cached and renewed a minute before it expires.  One
refresh serves all concurrent sends (single flight).

Only permanent token errors are GONE (``UNREGISTERED``, and ``INVALID_ARGUMENT``
about the registration token); auth, quota, 429 and 5xx are RETRY, because
upstream deleting tokens on any 4xx lost live devices (reference §17.1).
``SENDER_ID_MISMATCH`` (403) stays RETRY too: it usually means our own
project configuration is wrong, not that the device is gone.  A token outside
the grammar never gets here (``/notify`` answers 400); :meth:`FcmProvider.send`
repeats the check as a guard, RETRY and never GONE.

The end of the module registers FCM with the proxy (:data:`PROVIDER`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from ..options import Option, path, text
from ..tokens import Kind, PushToken
from .base import Delivery, Outcome, Provider, ProviderConfigError
from .common import (
    Verify,
    http2_client,
    label,
    post,
    post_push,
    refuse_malformed,
    retry_later,
)
from .spec import Built, ProviderSpec

if TYPE_CHECKING:
    from ..settings import ProxySettings

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://fcm.googleapis.com"
DEFAULT_TOKEN_URI = "https://oauth2.googleapis.com/token"
SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"

#: Renew the access token this many seconds before it expires.
REFRESH_MARGIN = 60.0
#: Lifetime claimed for the assertion JWT (Google's maximum).
ASSERTION_LIFETIME = 3600
#: Back-off for a 429 without ``Retry-After`` (FCM quota windows are coarse).
DEFAULT_RETRY_AFTER = 10.0


class _TokenFetchError(Exception):
    """The OAuth token endpoint gave no usable access token."""


@dataclass(frozen=True)
class ServiceAccount:
    client_email: str
    private_key: rsa.RSAPrivateKey
    token_uri: str
    project_id: str

    @classmethod
    def load(cls, path: Path) -> ServiceAccount:
        """Parse a Google service-account JSON key; errors are ProviderConfigError."""
        try:
            info = json.loads(Path(path).read_text())
            key = serialization.load_pem_private_key(info["private_key"].encode(), None)
            email = info["client_email"]
        except OSError as exc:
            raise ProviderConfigError(f"FCM key {path}: {exc.strerror or exc}") from exc
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ProviderConfigError(
                f"FCM key {path}: not a service-account key: {exc!r}"
            ) from exc
        if not isinstance(key, rsa.RSAPrivateKey) or not isinstance(email, str):
            raise ProviderConfigError(f"FCM key {path}: needs an RSA private_key and client_email")
        return cls(
            client_email=email,
            private_key=key,
            token_uri=str(info.get("token_uri") or DEFAULT_TOKEN_URI),
            project_id=str(info.get("project_id") or ""),
        )


class FcmProvider(Provider):
    """FCM v1 sender for one Firebase project."""

    name = "FCM"

    def __init__(
        self,
        account: ServiceAccount,
        *,
        project_id: str,
        base_url: str | None = None,
        token_url: str | None = None,
        timeout: float = 60.0,
        verify: Verify = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Prefer :meth:`from_service_account`."""
        self._account = account
        self.project_id = project_id
        self.base_url = (base_url or DEFAULT_BASE_URL).rstrip("/")
        self.token_url = token_url or account.token_uri
        self.send_url = f"{self.base_url}/v1/projects/{project_id}/messages:send"
        self.timeout = timeout
        self._clock = clock
        self._access_token = ""
        self._expires_at = 0.0
        self._refresh_lock = asyncio.Lock()
        self._client = http2_client(verify, timeout)

    @classmethod
    def from_service_account(
        cls,
        key_path: Path,
        *,
        project_id: str | None = None,
        base_url: str | None = None,
        token_url: str | None = None,
        timeout: float = 60.0,
        verify: Verify = True,
        clock: Callable[[], float] = time.time,
    ) -> FcmProvider:
        """Load the key file; the project id comes from it unless ``project_id`` is given."""
        account = ServiceAccount.load(key_path)
        project = project_id or account.project_id
        if not project:
            raise ProviderConfigError(f"FCM key {key_path}: no project_id; pass one explicitly")
        return cls(
            account,
            project_id=project,
            base_url=base_url,
            token_url=token_url,
            timeout=timeout,
            verify=verify,
            clock=clock,
        )

    # -- OAuth ---------------------------------------------------------------

    def _cached_token(self) -> str:
        if self._access_token and self._clock() < self._expires_at - REFRESH_MARGIN:
            return self._access_token
        return ""

    async def _token(self) -> str:
        token = self._cached_token()
        if token:
            return token
        async with self._refresh_lock:  # single flight: waiters reuse the winner's token
            token = self._cached_token()
            if not token:
                token = await self._fetch_token()
            return token

    async def _fetch_token(self) -> str:
        now = self._clock()
        assertion = jwt.encode(
            {
                "iss": self._account.client_email,
                "aud": self._account.token_uri,
                "scope": SCOPE,
                "iat": int(now),
                "exp": int(now) + ASSERTION_LIFETIME,
            },
            self._account.private_key,
            algorithm="RS256",
        )
        try:
            response = await post(
                self._client,
                self.token_url,
                timeout=self.timeout,
                data={"grant_type": GRANT_TYPE, "assertion": assertion},
            )
        except (httpx.HTTPError, OSError, TimeoutError) as exc:
            raise _TokenFetchError(type(exc).__name__) from exc
        if response.status_code != 200:
            raise _TokenFetchError(str(response.status_code))
        try:
            body = response.json()
            token = body["access_token"]
            expires_in = float(body.get("expires_in", 3600))
            token_type = str(body.get("token_type", "Bearer"))
        except (ValueError, KeyError, TypeError) as exc:
            raise _TokenFetchError("bad_response") from exc
        if not isinstance(token, str) or not token or token_type.lower() != "bearer":
            raise _TokenFetchError("bad_response")
        self._access_token = token
        self._expires_at = now + expires_in
        log.info("FCM access token refreshed, valid for %d s", expires_in)
        return token

    def _forget_token(self, token: str) -> None:
        """Drop ``token`` after a 401, unless a concurrent send already replaced it."""
        if self._access_token == token:
            self._access_token = ""
            self._expires_at = 0.0

    # -- sending -------------------------------------------------------------

    async def send(self, token: PushToken) -> Delivery:
        refused = refuse_malformed(token, self.name)
        if refused is not None:
            return refused
        try:
            access_token = await self._token()
        except _TokenFetchError as exc:
            log.warning("FCM access token fetch failed: %s", exc)
            return Delivery(Outcome.RETRY, "api_key_fetch", label(str(exc)))
        body = json.dumps(
            {
                "message": {
                    "token": token.device,
                    "data": {"level": "awesome"},
                    "android": {"priority": "high"},
                }
            },
            separators=(",", ":"),
        ).encode()
        headers = {"authorization": f"Bearer {access_token}", "content-type": "application/json"}
        delivery = await post_push(
            self._client,
            self.send_url,
            token,
            provider=self.name,
            timeout=self.timeout,
            map_response=_map_response,
            headers=headers,
            content=body,
        )
        if delivery.reason == "401":
            self._forget_token(access_token)
        return delivery

    async def aclose(self) -> None:
        await self._client.aclose()


def _error(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {}


def _error_codes(error: dict[str, Any]) -> tuple[str, bool]:
    """(FCM errorCode or gRPC status, whether the error is about message.token)."""
    code = ""
    about_token = "registration token" in str(error.get("message", "")).lower()
    details = error.get("details")
    for detail in details if isinstance(details, list) else []:
        if not isinstance(detail, dict):
            continue
        if detail.get("errorCode"):
            code = str(detail["errorCode"])
        violations = detail.get("fieldViolations")
        for violation in violations if isinstance(violations, list) else []:
            if isinstance(violation, dict) and violation.get("field") == "message.token":
                about_token = True
    return code or str(error.get("status", "")), about_token


def _map_response(response: httpx.Response) -> Delivery:
    status = response.status_code
    if 200 <= status < 300:
        return Delivery.sent()
    code, about_token = _error_codes(_error(response))
    details = label(code)
    if code == "UNREGISTERED":
        return Delivery(Outcome.GONE, str(status), details)
    if status == 400 and code == "INVALID_ARGUMENT" and about_token:
        return Delivery(Outcome.GONE, str(status), details)
    return retry_later(status, details, response.headers.get("retry-after"), DEFAULT_RETRY_AFTER)


# -- registration ------------------------------------------------------------------

OPTIONS = (
    Option(
        "fcm_key_path",
        path,
        help="Google service-account JSON key for FCM HTTP v1",
        metavar="PATH",
    ),
    Option(
        "fcm_project_id",
        text,
        help="Firebase project id (default: from the key file)",
        metavar="ID",
    ),
    Option("fcm_url", text, help="FCM base URL (tests)", metavar="URL"),
    Option("fcm_token_url", text, help="OAuth token URL (tests)", metavar="URL"),
)


def build(settings: ProxySettings) -> Built | None:
    """The FCM sender for the key file's project; None without ``--fcm-key-path``."""
    key = settings.fcm_key_path
    if key is None:
        return None
    provider = FcmProvider.from_service_account(
        key,
        project_id=settings.fcm_project_id,
        base_url=settings.fcm_url,
        token_url=settings.fcm_token_url,
        verify=settings.tls_verify,
    )
    return Built(provider, f"key {key}, project {provider.project_id}")


PROVIDER = ProviderSpec(
    name="FCM",
    description="Firebase Cloud Messaging HTTP v1, with a service-account key",
    kinds=(Kind.FCM,),
    options=OPTIONS,
    build=build,
    disabled="no --fcm-key-path",
    label="FCM",
    success=("fcm_notifications", "Number of FCM notifications"),
    not_configured="no_api_key",
)
