"""The push proxy's settings: its own options and every provider's, from argv or an ini section.

One :class:`ProxySettings` serves both ways of running the proxy: the
``notifiers`` program (:func:`settings_from_args`) and the relay's embedded
mode, which reads the ``[notifiers]`` section of ``chatmail.ini``
(:func:`settings_from_mapping`).  Every option is declared once
(:class:`~notifiers.options.Option`): the proxy's own below, each provider's
in its module, gathered by :mod:`notifiers.providers.registry`.  So an ini key
is the long option's name with ``_`` for ``-`` (``--fcm-key-path`` is
``fcm_key_path``), and both take the same values.

Secrets never come from argv (any user can read a process's command line): the
APNs certificate password comes from ``--password-file`` or the environment
variable ``NOTIFIERS_CERT_PASSWORD``.  ``--db`` and ``--interval`` are
upstream's heartbeat options (:mod:`notifiers.heartbeat`): heartbeats run only
with ``--db``, an SQLite file (upstream's default, a sled directory, is not
read), so a proxy started without it keeps no state on disk.

Turning settings into a running service is :mod:`notifiers.build`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from typing import Any

from chatmail_common.hostport import parse_host_port

from . import forwarding, openpgp
from .app import (
    DEFAULT_BODY_LIMIT,
    DEFAULT_KEEPALIVE_TIMEOUT,
    DEFAULT_READ_TIMEOUT,
    ListenerTimeouts,
)
from .debounce import DEFAULT_MAX_ENTRIES, DEFAULT_WINDOW
from .heartbeat import parse_duration
from .options import (
    Option,
    add_arguments,
    host_port,
    ini_key,
    integer,
    log_level,
    number,
    parse_values,
    path,
    refused_on_argv,
    secret_note,
    text,
)
from .providers.registry import PROVIDERS, SERVICES, options_of
from .ratelimit import LimitSettings

__all__ = [
    "OPTIONS",
    "LimitSettings",
    "ProxySettings",
    "build_parser",
    "embedded_settings_from_mapping",
    "settings_from_args",
    "settings_from_mapping",
]

#: The proxy's own options (the providers declare theirs).
PROXY_OPTIONS: tuple[Option, ...] = (
    Option("host", text, "127.0.0.1", "bind address of the API", metavar="HOST"),
    Option("port", integer(0, 65535), 9000, "port of the API", metavar="PORT"),
    Option(
        "metrics",
        host_port,
        help="serve GET /metrics on this separate listener",
        metavar="HOST:PORT",
    ),
    Option("body_limit", integer(64), DEFAULT_BODY_LIMIT, "request body limit", metavar="BYTES"),
    Option(
        "keepalive_timeout",
        number(0, exclusive=True),
        DEFAULT_KEEPALIVE_TIMEOUT,
        "close a connection idle this long, or still sending its request headers",
        metavar="S",
    ),
    Option(
        "read_timeout",
        number(0, exclusive=True),
        DEFAULT_READ_TIMEOUT,
        "answer 408 and close when a request body takes longer than this",
        metavar="S",
    ),
    Option(
        "debounce_seconds",
        number(0, exclusive=True),
        DEFAULT_WINDOW,
        "debounce window",
        metavar="S",
    ),
    Option(
        "debounce_max_entries",
        integer(1),
        DEFAULT_MAX_ENTRIES,
        "debouncer memory cap in tokens",
        metavar="N",
    ),
    Option(
        "ca_file",
        path,
        help="PEM CA bundle to verify the push services' TLS certificates with, instead of "
        "the system's (private endpoints, tests)",
        metavar="PATH",
    ),
    Option(
        "db",
        path,
        help="SQLite file of the heartbeat schedule: with it, APNs tokens POSTed to /register "
        "get a silent push every --interval (old iOS clients; chatmail core removed "
        "heartbeats in 2026); without it, heartbeats are off",
        metavar="PATH",
    ),
    Option(
        "interval",
        parse_duration,
        help="heartbeat period, e.g. 20m or 1h 5m, jittered by 5%% (default 20m)",
        metavar="DURATION",
    ),
    Option("log_level", log_level, "INFO", "DEBUG, INFO, WARNING or ERROR", metavar="LEVEL"),
)

#: Groups of options that belong to neither the proxy's core nor a provider: (title, options).
FEATURE_GROUPS: tuple[tuple[str, tuple[Option, ...]], ...] = (
    ("openpgp: tokens", openpgp.OPTIONS),
    ("upstream forwarding", forwarding.OPTIONS),
)

#: Every option: the proxy's, the features', then each provider's (with its limits).
OPTIONS: tuple[Option, ...] = (
    PROXY_OPTIONS
    + tuple(option for _, options in FEATURE_GROUPS for option in options)
    + tuple(option for spec in PROVIDERS for option in options_of(spec))
)


class ProxySettings:
    """The value of every option in :data:`OPTIONS`, as the attribute the option names.

    :func:`settings_from_mapping` and :func:`settings_from_args` parse and check
    the values; keyword arguments set them directly (tests:
    ``ProxySettings(log_provider=True)``), and an option not given has its
    default.  Paths are not opened here; secrets are left out of ``repr``.
    """

    __slots__ = tuple(option.attribute for option in OPTIONS)

    def __init__(self, **values: Any) -> None:
        unknown = set(values).difference(self.__slots__)
        if unknown:
            raise TypeError(f"ProxySettings: no such setting: {', '.join(sorted(unknown))}")
        for option in OPTIONS:
            setattr(self, option.attribute, values.get(option.attribute, option.default))

    def __repr__(self) -> str:
        shown = (f"{o.attribute}={getattr(self, o.attribute)!r}" for o in OPTIONS if not o.secret)
        return f"ProxySettings({', '.join(shown)})"

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        return parse_host_port(self.metrics) if self.metrics else None

    @property
    def listener_timeouts(self) -> ListenerTimeouts:
        return ListenerTimeouts(keepalive=self.keepalive_timeout, read=self.read_timeout)

    @property
    def limits(self) -> dict[str, LimitSettings]:
        """Each push service's limits, by its metric label."""
        return {str(spec.label): LimitSettings.of(self, str(spec.label)) for spec in SERVICES}

    @property
    def tls_verify(self) -> str | bool:
        """How providers verify the push services' certificates: ``ca_file``, else the system's."""
        return str(self.ca_file) if self.ca_file else True


def _check_names() -> None:
    attributes = [option.attribute for option in OPTIONS]
    if len(attributes) != len(set(attributes)):
        raise RuntimeError("a provider declares an option the proxy already has")


_check_names()


def settings_from_mapping(
    values: Mapping[str, str], env: Mapping[str, str] | None = None
) -> ProxySettings:
    """Settings from string values, e.g. ``chatmail.ini``'s ``[notifiers]`` section.

    Keys are the long option names with ``_`` (``-`` is accepted too).  ValueError
    naming the key for an unknown key (a typo must not silently disable a
    provider), a bad value, or a secret given inline (``password``).  ``env``
    (for the secrets' environment variables) defaults to ``os.environ``.
    """
    parsed = parse_values(OPTIONS, values, os.environ if env is None else env)
    if parsed.get("forward_all") and not parsed.get("upstream_url"):
        raise ValueError("forward_all: needs upstream_url (where to forward to)")
    return ProxySettings(**parsed)


_NO_HTTP_API = "the embedded proxy has no HTTP API (chatmail-metadata calls it in-process)"

#: Options of the ``notifiers`` program that would do nothing inside ``chatmail-metadata``,
#: with the reason.  ``metrics``, ``keepalive_timeout`` and ``read_timeout`` do work there
#: (they configure the metrics listener), as do ``db`` and ``interval`` (heartbeats).
NOT_EMBEDDED: dict[str, str] = {
    "host": _NO_HTTP_API,
    "port": _NO_HTTP_API,
    "body_limit": _NO_HTTP_API,
    "log_level": "the embedded proxy logs at chatmail-metadata's --log-level",
}


def embedded_settings_from_mapping(
    values: Mapping[str, str], env: Mapping[str, str] | None = None
) -> ProxySettings:
    """:func:`settings_from_mapping` for the embedded proxy (``[notifiers]`` of chatmail.ini).

    Why: an operator who writes ``port = 9100`` expects a listener there; an option
    the embedded proxy cannot honour is refused (ValueError naming the key) rather than
    read and silently ignored.
    """
    for raw_key in values:
        key = ini_key(raw_key)
        if key in NOT_EMBEDDED:
            raise ValueError(f"{key}: not used, {NOT_EMBEDDED[key]}; remove it from [notifiers]")
    return settings_from_mapping(values, env)


def build_parser() -> argparse.ArgumentParser:
    """The ``notifiers`` command line: upstream's long options plus ours, from :data:`OPTIONS`."""
    parser = argparse.ArgumentParser(
        prog="notifiers",
        description="chatmail push proxy: POST /notify with a device token, and the proxy "
        "sends one push through the push service the token belongs to.",
        epilog=" ".join(secret_note(option) for option in OPTIONS if option.secret),
    )
    add_arguments(parser, PROXY_OPTIONS)
    for title, options in FEATURE_GROUPS:
        add_arguments(parser.add_argument_group(title), options)
    for spec in PROVIDERS:
        options = options_of(spec)
        if options:
            add_arguments(parser.add_argument_group(spec.name, spec.description or None), options)
    return parser


def settings_from_args(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> ProxySettings:
    """Parse the command line; exits with status 2 and a usage message on bad options."""
    parser = build_parser()
    given = {
        key: value for key, value in vars(parser.parse_args(argv)).items() if value is not None
    }
    refusal = refused_on_argv(OPTIONS, given)
    if refusal:
        parser.error(refusal)
    try:
        return settings_from_mapping(given, env)
    except ValueError as exc:
        parser.error(str(exc))
