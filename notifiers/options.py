"""Option declarations: one :class:`Option` is both a ``--long-option`` and a ``[notifiers]`` key.

Why: the proxy is configured two ways, by the ``notifiers`` command line and by
the ``[notifiers]`` section of the relay's ``chatmail.ini`` (embedded proxy),
and both must take the same names with the same meaning.  So each option is
declared once, with a parser from text.  argparse only collects strings
(``--fcm-key-path`` is the key ``fcm_key_path``; a flag gives ``"true"`` or
``"false"``) and both sources go through :func:`parse_values`.

Rules that follow from the declaration:

* a boolean option with default False is the flag ``--<name>``; one with
  default True is ``--no-<name>``; in an ini both take ``true``/``false``;
* an empty ini value means the option's default;
* a *secret* never comes from argv (any user can read a process's command
  line) nor from the ini value itself: ``--<name>`` and ``<name> =`` are refused
  with a message naming the alternatives; the secret is read from the file
  named by ``--<name>-file`` / ``<name>_file``, else from the option's
  environment variable.
"""

from __future__ import annotations

import argparse
import difflib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from chatmail_common.hostport import parse_host_port

#: Turns the option's text into its value; raises ValueError with a short reason.
Parser = Callable[[str], Any]


class ArgumentContainer(Protocol):
    """An argparse parser or argument group."""

    def add_argument(self, *names: str, **kwargs: Any) -> Any: ...


@dataclass(frozen=True, slots=True)
class Option:
    """One setting.  ``name`` is the ini key, ``--name-with-dashes`` on argv, and the
    attribute of :class:`~notifiers.settings.ProxySettings` (unless ``dest`` is given)."""

    name: str
    parse: Parser
    default: Any = None
    help: str = ""
    metavar: str | None = None
    #: read from ``<name>_file`` or ``env``, never given inline (see the module docstring)
    secret: bool = False
    env: str | None = None
    dest: str | None = None

    @property
    def attribute(self) -> str:
        return self.dest or self.name

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def file_key(self) -> str:
        """The key that names a secret's file (``password`` -> ``password_file``)."""
        return f"{self.name}_file"

    @property
    def is_switch(self) -> bool:
        return self.parse is boolean

    def refusal(self, *, argv: bool) -> str:
        """Why a secret given inline is refused, and what to use instead."""
        if argv:
            return f"{self.flag} is not accepted; use {self.flag}-file or {self.env}"
        return (
            f"{self.name} is not accepted (a secret is never written inline); "
            f"use {self.file_key} or the {self.env} environment variable"
        )


# -- parsers -----------------------------------------------------------------------


def text(value: str) -> str:
    return value


def path(value: str) -> Path:
    return Path(value)


def boolean(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def integer(minimum: int, maximum: int | None = None) -> Parser:
    """A parser for whole numbers from ``minimum`` to ``maximum`` (inclusive)."""
    wanted = f"from {minimum} to {maximum}" if maximum is not None else f">= {minimum}"

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = None
        if number is None or number < minimum or (maximum is not None and number > maximum):
            raise ValueError(f"expected an integer {wanted}, got {value!r}")
        return number

    return parse


def number(minimum: float, *, exclusive: bool = False) -> Parser:
    """A parser for decimal numbers >= ``minimum`` (> with ``exclusive``)."""
    wanted = f"> {minimum:g}" if exclusive else f">= {minimum:g}"

    def parse(value: str) -> float:
        try:
            result = float(value)
        except ValueError:
            result = float("nan")
        if not (result > minimum if exclusive else result >= minimum):  # NaN fails both
            raise ValueError(f"expected a number {wanted}, got {value!r}")
        return result

    return parse


def host_port(value: str) -> str:
    """``HOST:PORT`` (kept as text; :func:`parse_host_port` splits it)."""
    parse_host_port(value)
    return value


def log_level(value: str) -> str:
    level = value.upper()
    if level not in logging.getLevelNamesMapping():
        raise ValueError(f"unknown level {value!r}")
    return level


def secret_file(value: str) -> bytes:
    """A secret's file: its content without the trailing newline."""
    try:
        return Path(value).read_bytes().rstrip(b"\r\n")
    except OSError as exc:
        raise ValueError(f"{value}: {exc.strerror or exc}") from None


# -- argv and ini ------------------------------------------------------------------


def _help(option: Option) -> str:
    default = option.default
    if default is None or isinstance(default, bool):
        return option.help
    shown = f"{default:g}" if isinstance(default, float) else str(default)
    return f"{option.help} (default {shown})"


def add_arguments(group: ArgumentContainer, options: Iterable[Option]) -> None:
    """Add ``options`` to an argparse parser or group; every value stays a string."""
    for option in options:
        if option.secret:
            group.add_argument(
                f"{option.flag}-file",
                dest=option.file_key,
                metavar="PATH",
                help=f"file holding {option.help}",
            )
            group.add_argument(option.flag, dest=option.name, help=argparse.SUPPRESS)
        elif option.is_switch:
            negated = bool(option.default)
            group.add_argument(
                f"--no-{option.flag[2:]}" if negated else option.flag,
                dest=option.name,
                action="store_const",
                const="false" if negated else "true",
                help=option.help,
            )
        else:
            group.add_argument(
                option.flag, dest=option.name, metavar=option.metavar, help=_help(option)
            )


def secret_note(option: Option) -> str:
    """One sentence for ``--help`` saying where a secret comes from."""
    what = option.help[:1].upper() + option.help[1:]
    return (
        f"{what} is read from {option.flag}-file or the {option.env} environment variable, "
        "never from the command line."
    )


def refused_on_argv(options: Iterable[Option], given: Mapping[str, Any]) -> str | None:
    """The refusal message if a secret was given inline on argv, else None."""
    for option in options:
        if option.secret and given.get(option.name) is not None:
            return option.refusal(argv=True)
    return None


def ini_key(raw_key: str) -> str:
    """The option name an ini key means: case and ``-``/``_`` do not matter."""
    return raw_key.strip().lower().replace("-", "_")


def parse_values(
    options: Iterable[Option], values: Mapping[str, str], env: Mapping[str, str]
) -> dict[str, Any]:
    """Parse option texts (ini keys, ``-`` or ``_``) into ``{attribute: value}``.

    ValueError, with the key first, for an unknown key (a typo must not silently
    disable a provider), a secret given inline, or a value its parser refuses.
    Secrets not given by file come from their environment variable.
    """
    options = tuple(options)
    by_key = {option.name: option for option in options}
    by_key.update({option.file_key: option for option in options if option.secret})
    parsed: dict[str, Any] = {}
    for raw_key, raw_value in values.items():
        key = ini_key(raw_key)
        option = by_key.get(key)
        if option is None:
            raise ValueError(_unknown(raw_key, key, by_key))
        if option.secret and key == option.name:
            raise ValueError(option.refusal(argv=False))
        value = str(raw_value).strip()
        try:
            parsed[option.attribute] = option.parse(value) if value else option.default
        except ValueError as exc:
            raise ValueError(f"{key}: {exc}") from None
    for option in options:
        if option.secret and parsed.get(option.attribute) is None and env.get(option.env or ""):
            parsed[option.attribute] = env[option.env or ""].encode()
    return parsed


def _unknown(raw_key: str, key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown notifiers option {raw_key!r}{hint}"
