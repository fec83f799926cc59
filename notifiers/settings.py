"""Configuration of the push proxy, from the command line or from an ini section.

One :class:`ProxySettings` serves both ways of running the proxy: the
``notifiers`` program (:func:`settings_from_args`) and the relay's embedded mode,
which reads the ``[notifiers]`` section of ``chatmail.ini``
(:func:`settings_from_mapping`).  Both go through the same string parser, so an
ini key is the long option's name with ``_`` for ``-`` (``--fcm-key-path`` is
``fcm_key_path``), and flags take ``true``/``false``.

Secrets never come from argv (any user can read a process's command line): the
APNs certificate password comes from ``--password-file`` or the environment
variable ``NOTIFIERS_CERT_PASSWORD``.

:func:`build_service` turns settings into a :class:`NotifyService`; every provider
is optional, and a broken key file is a :class:`ProviderConfigError` with a
one-line message.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatmail_common.hostport import parse_host_port

from .debounce import DEFAULT_MAX_ENTRIES, DEFAULT_WINDOW, Debouncer
from .metrics import PROVIDERS, ProxyMetrics
from .providers.base import Provider, ProviderConfigError
from .ratelimit import RateLimitedProvider
from .service import NotifyService
from .tokens import Kind

log = logging.getLogger(__name__)

PASSWORD_ENV = "NOTIFIERS_CERT_PASSWORD"
DEFAULT_BODY_LIMIT = 8 * 1024


@dataclass(slots=True)
class LimitSettings:
    """Per-provider limits (see :mod:`notifiers.ratelimit`); ``rps`` 0 = unlimited."""

    concurrency: int = 50
    rps: float = 0.0
    max_wait: float = 10.0


def _default_limits() -> dict[str, LimitSettings]:
    return {name: LimitSettings() for name in PROVIDERS}


@dataclass(slots=True)
class ProxySettings:
    """Everything needed to build and serve the proxy.  Paths are not opened here."""

    host: str = "127.0.0.1"
    port: int = 9000
    metrics: str | None = None  # "HOST:PORT" of the separate /metrics listener
    body_limit: int = DEFAULT_BODY_LIMIT
    debounce_seconds: float = DEFAULT_WINDOW
    debounce_max_entries: int = DEFAULT_MAX_ENTRIES
    limits: dict[str, LimitSettings] = field(default_factory=_default_limits)
    # APNs: a .p12 certificate, or a .p8 signing key with its key id and team id
    certificate_file: Path | None = None
    certificate_password: bytes | None = field(default=None, repr=False)
    apns_key_file: Path | None = None
    apns_key_id: str | None = None
    apns_team_id: str | None = None
    topic: str | None = None
    apns_url: str | None = None
    apns_sandbox_url: str | None = None
    # FCM HTTP v1
    fcm_key_path: Path | None = None
    fcm_project_id: str | None = None
    fcm_url: str | None = None
    fcm_token_url: str | None = None
    # UBports needs no credentials; enabled unless switched off (as upstream)
    ubports: bool = True
    ubports_url: str | None = None
    vapid_key_path: Path | None = None
    openpgp_keyring_path: Path | None = None
    # PEM CA bundle that verifies the push services' TLS certificates instead of the
    # system's (private endpoints, tests); None = the default trust store
    ca_file: Path | None = None
    # accepted for compatibility with upstream's command line; heartbeats are not implemented
    db: Path | None = None
    interval: str | None = None
    log_provider: bool = False
    log_level: str = "INFO"

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        return parse_host_port(self.metrics) if self.metrics else None


# -- the option table shared by argv and ini ----------------------------------------

_FLAGS = {"log_provider", "ubports"}
_PATHS = {
    "certificate_file",
    "apns_key_file",
    "fcm_key_path",
    "vapid_key_path",
    "openpgp_keyring_path",
    "db",
    "ca_file",
}
_INTS = {"port", "body_limit", "debounce_max_entries"}
_FLOATS = {"debounce_seconds"}
_STRINGS = {
    "host",
    "metrics",
    "topic",
    "apns_key_id",
    "apns_team_id",
    "apns_url",
    "apns_sandbox_url",
    "fcm_project_id",
    "fcm_url",
    "fcm_token_url",
    "ubports_url",
    "interval",
    "log_level",
}
_LIMIT_KEYS = {
    f"{name.lower()}_{what}": (name, what)
    for name in PROVIDERS
    for what in ("concurrency", "rps", "max_wait")
}
_KNOWN = _FLAGS | _PATHS | _INTS | _FLOATS | _STRINGS | set(_LIMIT_KEYS) | {"password_file"}


def _parse_bool(key: str, value: str) -> bool:
    text = value.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{key}: expected true or false, got {value!r}")


def _read_password(path: Path) -> bytes:
    try:
        return path.read_bytes().rstrip(b"\r\n")
    except OSError as exc:
        raise ValueError(f"password_file {path}: {exc.strerror or exc}") from None


def settings_from_mapping(
    values: Mapping[str, str], env: Mapping[str, str] | None = None
) -> ProxySettings:
    """Settings from string values, e.g. ``chatmail.ini``'s ``[notifiers]`` section.

    Keys are the long option names with ``_`` (``-`` is accepted too); unknown
    keys raise ValueError (a typo must not silently disable a provider), and
    so does ``password`` (use ``password_file`` or ``NOTIFIERS_CERT_PASSWORD``).
    ``env`` defaults to ``os.environ``.
    """
    env = os.environ if env is None else env
    s = ProxySettings()
    for raw_key, raw_value in values.items():
        key = raw_key.strip().lower().replace("-", "_")
        value = str(raw_value).strip()
        if key == "password":
            raise ValueError(
                "the certificate password is not accepted as an option; "
                f"use password_file or the {PASSWORD_ENV} environment variable"
            )
        if key not in _KNOWN:
            raise ValueError(f"unknown notifiers option {raw_key!r}")
        try:
            if key in _FLAGS:
                setattr(s, key, _parse_bool(key, value))
            elif key in _PATHS:
                setattr(s, key, Path(value) if value else None)
            elif key in _INTS:
                setattr(s, key, int(value))
            elif key in _FLOATS:
                setattr(s, key, float(value))
            elif key in _STRINGS:
                setattr(s, key, value or None)
            elif key in _LIMIT_KEYS:
                name, what = _LIMIT_KEYS[key]
                limit = s.limits[name]
                setattr(limit, what, int(value) if what == "concurrency" else float(value))
            elif key == "password_file":
                s.certificate_password = _read_password(Path(value)) if value else None
        except ValueError as exc:
            if str(exc).startswith(key):
                raise
            raise ValueError(f"{key}: invalid value {value!r}") from None
    if s.certificate_password is None and env.get(PASSWORD_ENV):
        s.certificate_password = env[PASSWORD_ENV].encode()
    _validate(s)
    return s


def _validate(s: ProxySettings) -> None:
    if s.host is None:
        s.host = "127.0.0.1"
    if not 0 <= s.port <= 65535:
        raise ValueError(f"port: out of range: {s.port}")
    if s.metrics:
        parse_host_port(s.metrics)
    if s.debounce_seconds <= 0:
        raise ValueError("debounce_seconds: must be positive")
    if s.debounce_max_entries < 1:
        raise ValueError("debounce_max_entries: must be at least 1")
    if s.body_limit < 64:
        raise ValueError("body_limit: must be at least 64 bytes")
    for name, limit in s.limits.items():
        if limit.concurrency < 1 or limit.rps < 0 or limit.max_wait < 0:
            raise ValueError(f"{name.lower()} limits: concurrency >= 1, rps and max_wait >= 0")
    if s.log_level.upper() not in logging.getLevelNamesMapping():
        raise ValueError(f"log_level: unknown level {s.log_level!r}")


def build_parser() -> argparse.ArgumentParser:
    """The ``notifiers`` command line: upstream's long options plus ours."""
    p = argparse.ArgumentParser(
        prog="notifiers",
        description="chatmail push proxy: POST /notify with a device token, "
        "the proxy sends one push through APNs, FCM, UBports or Web Push.",
        epilog=f"The APNs certificate password is read from --password-file or the "
        f"{PASSWORD_ENV} environment variable, never from the command line.",
    )
    add = p.add_argument
    add("--host", help="bind address of the API (default 127.0.0.1)")
    add("--port", help="port of the API (default 9000)")
    add("--metrics", metavar="HOST:PORT", help="serve GET /metrics on this separate listener")
    add("--certificate-file", metavar="PATH", help="APNs client certificate (.p12)")
    add("--password-file", metavar="PATH", help="file holding the .p12 password")
    add("--password", help=argparse.SUPPRESS)  # refused with a clear message
    add("--topic", help="apns-topic header (the iOS bundle id)")
    add(
        "--apns-key-file",
        metavar="PATH",
        help="APNs token-auth signing key (.p8), instead of a .p12",
    )
    add("--apns-key-id", help="key id of --apns-key-file")
    add("--apns-team-id", help="Apple team id for --apns-key-file")
    add("--apns-url", metavar="URL", help="APNs production base URL (tests)")
    add("--apns-sandbox-url", metavar="URL", help="APNs sandbox base URL (tests)")
    add("--fcm-key-path", metavar="PATH", help="Google service-account JSON key for FCM HTTP v1")
    add("--fcm-project-id", help="Firebase project id (default: from the key file)")
    add("--fcm-url", metavar="URL", help="FCM base URL (tests)")
    add("--fcm-token-url", metavar="URL", help="OAuth token URL (tests)")
    add("--ubports-url", metavar="URL", help="UBports push base URL")
    add(
        "--ca-file",
        metavar="PATH",
        help="PEM CA bundle to verify the push services' TLS certificates with, instead of "
        "the system's (private endpoints, tests)",
    )
    add(
        "--no-ubports",
        dest="ubports",
        action="store_const",
        const="false",
        help="disable UBports (enabled by default; it needs no credentials)",
    )
    add("--vapid-key-path", metavar="PATH", help="PKCS#8 PEM P-256 VAPID key for Web Push")
    add(
        "--openpgp-keyring-path",
        metavar="PATH",
        help="secret keys for openpgp: tokens (decryption is not implemented yet: "
        "openpgp: tokens are answered 500)",
    )
    add(
        "--interval",
        help="accepted for compatibility; heartbeats are not implemented "
        "(chatmail core removed them in 2026)",
    )
    add("--db", metavar="PATH", help="accepted for compatibility; heartbeats are not implemented")
    add(
        "--log-provider",
        action="store_const",
        const="true",
        help="do not contact any push service: log what would be sent (local runs, demos)",
    )
    add("--debounce-seconds", metavar="S", help=f"debounce window (default {DEFAULT_WINDOW:g})")
    add(
        "--debounce-max-entries",
        metavar="N",
        help=f"debouncer memory cap in tokens (default {DEFAULT_MAX_ENTRIES})",
    )
    add("--body-limit", metavar="BYTES", help=f"request body limit (default {DEFAULT_BODY_LIMIT})")
    for name in PROVIDERS:
        low = name.lower()
        add(f"--{low}-concurrency", metavar="N", help=f"parallel {name} requests (default 50)")
        add(f"--{low}-rps", metavar="R", help=f"{name} requests per second (default unlimited)")
        add(
            f"--{low}-max-wait",
            metavar="S",
            help=f"longest wait for {name} back-off/rate limit before answering 500 (default 10)",
        )
    add("--log-level", help="DEBUG, INFO (default), WARNING, ERROR")
    return p


def settings_from_args(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> ProxySettings:
    """Parse the command line; exits with status 2 and a usage message on bad options."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    values = {k: v for k, v in vars(ns).items() if v is not None}
    if "password" in values:
        parser.error(f"--password is not accepted; use --password-file or {PASSWORD_ENV}")
    try:
        return settings_from_mapping(values, env)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable


# -- building the service -------------------------------------------------------------


def _limited(provider: Provider, limit: LimitSettings) -> Provider:
    return RateLimitedProvider(
        provider, concurrency=limit.concurrency, rps=limit.rps or None, max_wait=limit.max_wait
    )


def _build_apns(s: ProxySettings) -> tuple[Provider, Provider] | None:
    if s.certificate_file and s.apns_key_file:
        raise ProviderConfigError(
            "APNs: give either --certificate-file or --apns-key-file, not both"
        )
    if not s.certificate_file and not s.apns_key_file:
        return None
    ApnsProvider = _provider_class("apns", "ApnsProvider")

    pair = []
    for sandbox, url in ((False, s.apns_url), (True, s.apns_sandbox_url)):
        if s.certificate_file:
            pair.append(
                ApnsProvider.from_p12(
                    s.certificate_file,
                    s.certificate_password,
                    topic=s.topic,
                    sandbox=sandbox,
                    base_url=url,
                    verify=_verify(s),
                )
            )
        else:
            if not s.apns_key_id or not s.apns_team_id:
                raise ProviderConfigError(
                    "APNs: --apns-key-file needs --apns-key-id and --apns-team-id"
                )
            assert s.apns_key_file is not None
            pair.append(
                ApnsProvider.from_p8(
                    s.apns_key_file,
                    key_id=s.apns_key_id,
                    team_id=s.apns_team_id,
                    topic=s.topic,
                    sandbox=sandbox,
                    base_url=url,
                    verify=_verify(s),
                )
            )
    return pair[0], pair[1]


def _verify(s: ProxySettings) -> str | bool:
    return str(s.ca_file) if s.ca_file else True


def _provider_class(module: str, name: str) -> Any:
    """Import a provider lazily: a missing module is a config error, not a traceback."""
    try:
        return getattr(importlib.import_module(f"{__package__}.providers.{module}"), name)
    except (ImportError, AttributeError):
        raise ProviderConfigError(f"{name}: not available in this version") from None


def _build_webpush(path: Path) -> Provider:
    provider_cls = _provider_class("webpush", "WebPushProvider")
    if hasattr(provider_cls, "from_vapid_key"):
        return provider_cls.from_vapid_key(path)
    return provider_cls(path)


def build_providers(s: ProxySettings) -> dict[Kind, Provider]:
    """Build the enabled providers, rate-limited; log one line per provider."""
    lim = s.limits
    if s.log_provider:
        from .providers.log import LogProvider

        log.warning("log provider: no push service is contacted, pushes are only logged")
        return {
            kind: _limited(LogProvider(), lim[label])
            for kind, label in (
                (Kind.APNS, "APNS"),
                (Kind.APNS_SANDBOX, "APNS"),
                (Kind.FCM, "FCM"),
                (Kind.UBPORTS, "UBports"),
                (Kind.WEBPUSH, "WebPush"),
            )
        }
    providers: dict[Kind, Provider] = {}
    apns = _build_apns(s)
    if apns:
        how = (
            f"certificate {s.certificate_file}" if s.certificate_file else f"key {s.apns_key_file}"
        )
        providers[Kind.APNS] = _limited(apns[0], lim["APNS"])
        providers[Kind.APNS_SANDBOX] = _limited(apns[1], lim["APNS"])
        log.info("APNS (production and sandbox): enabled (%s)", how)
    else:
        log.warning("APNS: disabled (no --certificate-file or --apns-key-file)")
    if s.fcm_key_path:
        FcmProvider = _provider_class("fcm", "FcmProvider")
        fcm = FcmProvider.from_service_account(
            s.fcm_key_path,
            project_id=s.fcm_project_id,
            base_url=s.fcm_url,
            token_url=s.fcm_token_url,
            verify=_verify(s),
        )
        providers[Kind.FCM] = _limited(fcm, lim["FCM"])
        log.info("FCM: enabled (key %s)", s.fcm_key_path)
    else:
        log.warning("FCM: disabled (no --fcm-key-path)")
    if s.ubports:
        UbportsProvider = _provider_class("ubports", "UbportsProvider")
        providers[Kind.UBPORTS] = _limited(
            UbportsProvider(base_url=s.ubports_url, verify=_verify(s)), lim["UBports"]
        )
        log.info("UBports: enabled")
    else:
        log.warning("UBports: disabled")
    if s.vapid_key_path:
        providers[Kind.WEBPUSH] = _limited(_build_webpush(s.vapid_key_path), lim["WebPush"])
        log.info("WebPush: enabled (VAPID key %s)", s.vapid_key_path)
    else:
        log.warning("WebPush: disabled (no --vapid-key-path)")
    return providers


def build_service(s: ProxySettings, *, metrics: ProxyMetrics | None = None) -> NotifyService:
    """A :class:`NotifyService` with the enabled providers, debouncer and metrics."""
    providers = build_providers(s)
    if s.openpgp_keyring_path:
        log.warning(
            "openpgp keyring %s given, but decryption is not implemented yet: "
            "openpgp: tokens are answered 500",
            s.openpgp_keyring_path,
        )
    if s.interval or s.db:
        log.info("--interval/--db accepted for compatibility; heartbeats are not implemented")
    return NotifyService(
        providers,
        metrics=metrics,
        debouncer=Debouncer(s.debounce_seconds, s.debounce_max_entries),
    )
