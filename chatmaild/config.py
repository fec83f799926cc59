"""Reading ``chatmail.ini``: upstream's ``[params]`` unchanged, plus our ``[metadata]`` section.

An upstream ``chatmail.ini`` must work as it is, so everything this project adds
lives in an optional ``[metadata]`` section (upstream's deploy tool only warns
about unknown keys in ``[params]``, and we add none there).  An unknown key in
``[metadata]`` is an error, as in ``[notifiers]``: a typo must not silently keep
a default.
"""

from __future__ import annotations

import configparser
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from .jobqueue import RetryPolicy

DEFAULT_TURN_SOCKET = "/run/chatmail-turn/turn.socket"
DEFAULT_NOTIFY_URL = "https://notifications.delta.chat/notify"
PACKAGED_APPVERSIONS = Path(__file__).parent / "data" / "appversions.json"
_UPSTREAM_RETRY = RetryPolicy()


class ConfigError(Exception):
    """The ini file is missing or invalid; the message is one line for the operator."""


@dataclass(slots=True)
class Limits:
    """Per-user limits on generic IMAP METADATA attributes."""

    max_attributes: int = 256
    max_value_bytes: int = 64 * 1024
    max_line_bytes: int = 1 << 20


@dataclass(slots=True)
class NotifierSettings:
    """How push jobs are sent (see chatmaild.notifier).

    ``url`` is the proxy's ``/notify`` URL, or ``embedded`` to run the push proxy
    in-process with the options of the ini's ``[notifiers]`` section, or ``off``.
    """

    url: str = DEFAULT_NOTIFY_URL
    workers: int = 12
    timeout: float = 60.0
    retry_delays: tuple[float, ...] = _UPSTREAM_RETRY.delays
    max_attempts: int = _UPSTREAM_RETRY.max_attempts
    deadline: float = _UPSTREAM_RETRY.deadline

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(self.retry_delays, self.max_attempts, self.deadline)


@dataclass(slots=True)
class Config:
    mail_domain: str
    mailboxes_dir: Path
    iroh_relay: str | None
    turn_socket_path: str
    appversions_path: Path
    max_smtp_recipients: int = 1000
    database: Path | None = None
    delivery_dict: str | None = None
    synchronous: str = "NORMAL"
    limits: Limits = field(default_factory=Limits)
    notifier: NotifierSettings = field(default_factory=NotifierSettings)
    proxy_options: dict[str, str] = field(default_factory=dict)
    path: Path | None = None

    @property
    def database_path(self) -> Path:
        return self.database or (self.mailboxes_dir / "chatmail-metadata.sqlite3")

    @property
    def turn_hostname(self) -> str:
        return self.mail_domain


def check_notify_url(url: str, where: str) -> str:
    """``embedded``, ``off`` or an http(s) URL with a host; a typo must not start a
    notifier whose every push fails and is dropped after its retries."""
    if url in ("embedded", "off"):
        return url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"{where}: notify_url must be an http(s) URL, 'embedded' or 'off', got {url!r}"
        )
    return url


def read_config(path: str | Path) -> Config:
    """Parse ``path``; raise :class:`ConfigError` with a one-line reason on any problem."""
    path = Path(path)
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with path.open(encoding="utf-8") as fp:
            parser.read_file(fp)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    except configparser.Error as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"invalid config file {path}: {first}") from None
    if not parser.has_section("params"):
        raise ConfigError(f"{path}: missing [params] section")
    params = parser["params"]
    mail_domain = params.get("mail_domain", "").strip()
    if not mail_domain:
        raise ConfigError(f"{path}: [params] mail_domain is required")
    mailboxes_dir = params.get("mailboxes_dir", "").strip() or f"/home/vmail/mail/{mail_domain}"
    iroh = params.get("iroh_relay")
    iroh_relay = f"https://{mail_domain}" if iroh is None else (iroh.strip() or None)
    cfg = Config(
        mail_domain=mail_domain,
        mailboxes_dir=Path(mailboxes_dir),
        iroh_relay=iroh_relay,
        turn_socket_path=params.get("turn_socket_path", "").strip() or DEFAULT_TURN_SOCKET,
        appversions_path=PACKAGED_APPVERSIONS,
        path=path,
    )
    if parser.has_section("metadata"):
        section = _AskedKeys(parser["metadata"])
        _apply_metadata_section(cfg, section, path)
        _refuse_unknown_keys(section, parser.defaults(), path)
    if parser.has_section("notifiers"):
        # Options of the embedded push proxy (notify_url = embedded), read by notifiers.settings.
        cfg.proxy_options = dict(parser["notifiers"])
    return cfg


class _AskedKeys:
    """A section that remembers which keys the reader asked for: those are the known
    ones, so the list of accepted keys is the reading code itself (no second copy)."""

    def __init__(self, section: configparser.SectionProxy) -> None:
        self.section = section
        self.asked: set[str] = set()

    def get(self, key: str, default: str | None = None) -> str | None:
        self.asked.add(key)
        return self.section.get(key, default)


def _refuse_unknown_keys(sec: _AskedKeys, inherited: Mapping[str, str], path: Path) -> None:
    for key in sec.section:
        if key in sec.asked or key in inherited:  # [DEFAULT] keys show up in every section
            continue
        close = difflib.get_close_matches(key, sorted(sec.asked), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{path}: [metadata] unknown key {key!r}{hint}")


def _apply_metadata_section(cfg: Config, sec: _AskedKeys, path: Path) -> None:
    """Read every key ``[metadata]`` knows (each one is asked for, present or not)."""

    def num(key: str, conv: type, default: object) -> object:
        raw = sec.get(key)
        if raw is None or not raw.strip():
            return default
        try:
            value = conv(raw.strip())
        except ValueError:
            raise ConfigError(f"{path}: [metadata] {key} must be a number, got {raw!r}") from None
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"{path}: [metadata] {key} must be a finite, non-negative number")
        return value

    if database := sec.get("database", "").strip():
        cfg.database = Path(database)
    if appversions := sec.get("appversions_path", "").strip():
        cfg.appversions_path = Path(appversions)
    cfg.delivery_dict = sec.get("delivery_dict", "").strip() or None
    cfg.synchronous = sec.get("synchronous", cfg.synchronous).strip().upper()
    if cfg.synchronous not in {"NORMAL", "FULL", "EXTRA"}:
        raise ConfigError(f"{path}: [metadata] synchronous must be NORMAL, FULL or EXTRA")
    cfg.max_smtp_recipients = num("max_smtp_recipients", int, cfg.max_smtp_recipients)
    lim = cfg.limits
    lim.max_attributes = num("max_attributes", int, lim.max_attributes)
    lim.max_value_bytes = num("max_value_bytes", int, lim.max_value_bytes)
    lim.max_line_bytes = num("max_line_bytes", int, lim.max_line_bytes)
    n = cfg.notifier
    n.url = check_notify_url(sec.get("notify_url", n.url).strip() or n.url, f"{path}: [metadata]")
    n.workers = max(1, num("notify_workers", int, n.workers))
    n.timeout = num("notify_timeout", float, n.timeout)
    n.max_attempts = max(1, num("notify_max_attempts", int, n.max_attempts))
    n.deadline = num("notify_deadline", float, n.deadline)
    delays = sec.get("notify_retry_delays", "").strip()
    if delays:
        try:
            n.retry_delays = tuple(float(x) for x in delays.replace(",", " ").split())
            if not n.retry_delays or not all(math.isfinite(d) and d >= 0 for d in n.retry_delays):
                raise ValueError
        except ValueError:
            raise ConfigError(
                f"{path}: [metadata] notify_retry_delays must be one or more non-negative numbers, "
                f"got {delays!r}"
            ) from None
