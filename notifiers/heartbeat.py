"""Heartbeats (``/register``): what is due when, sans-I/O.

Why heartbeats still exist: iOS clients of chatmail core before 2.57 on
classic mail servers (no ``XDELTAPUSH``) POST their APNs token to
``/register`` and expect a silent push about every ``--interval`` that lets
the app fetch mail.  Core removed this in July 2026 (core PR #8452), but
those clients are still in the field, so the proxy keeps the schedule,
compatible with upstream and cheap (reference proxy-notifiers.md §2.1, §8).

This module holds only the decisions, so they can be tested without a
database or an event loop:

* :func:`parse_duration`: upstream's ``--interval`` syntax (Rust ``humantime``:
  ``20m``, ``1h 5m``, ``30s``, ``1day``);
* :class:`HeartbeatPolicy`: the next due time, jittered around the interval
  (upstream: ±60 s at 20 min, i.e. ±5 %), after a registration and after each
  verdict.  Only GONE (a permanent token error from APNs) drops a token;
  upstream also dropped it on any APNs error (429 and 5xx included), which
  loses live tokens to a bad minute at Apple.

The SQLite store is :mod:`notifiers.heartbeat_store`, the asyncio loop that
drains it :mod:`notifiers.heartbeat_loop`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from chatmail_common.outcome import Outcome

from .tokens import Kind

#: The token kinds that get heartbeats: APNs, both environments (upstream: same).
HEARTBEAT_KINDS = frozenset({Kind.APNS, Kind.APNS_SANDBOX})

#: Upstream's default ``--interval``.
DEFAULT_INTERVAL = 20 * 60.0

#: The jitter is this fraction of the interval either way (upstream: ±60 s at 20 min).
JITTER_FRACTION = 0.05

#: humantime's units, in seconds (a month is 30.44 days, a year 365.25 days, as humantime).
_UNITS: dict[str, float] = {}
for _names, _seconds in (
    (("nsec", "ns"), 1e-9),
    (("usec", "us"), 1e-6),
    (("msec", "ms"), 1e-3),
    (("seconds", "second", "sec", "s"), 1.0),
    (("minutes", "minute", "min", "m"), 60.0),
    (("hours", "hour", "hr", "h"), 3600.0),
    (("days", "day", "d"), 86400.0),
    (("weeks", "week", "w"), 7 * 86400.0),
    (("months", "month", "M"), 30.44 * 86400.0),
    (("years", "year", "y"), 365.25 * 86400.0),
):
    for _name in _names:
        _UNITS[_name] = _seconds

_COMPONENT = re.compile(r"\s*(\d+)\s*([A-Za-z]+)")


def parse_duration(text: str) -> float:
    """Seconds of a humantime duration such as ``20m`` or ``1h 5m``; ValueError otherwise.

    As humantime: whole numbers, each with a unit, components optionally
    separated by spaces; a bare number is refused (``20`` could be seconds or
    minutes).  The result must be positive.
    """
    position, total, value = 0, 0.0, text.strip()
    while position < len(value):
        match = _COMPONENT.match(value, position)
        if match is None or match.group(2) not in _UNITS:
            raise ValueError(f"expected a duration like 20m or 1h 5m, got {text!r}")
        total += int(match.group(1)) * _UNITS[match.group(2)]
        position = match.end()
    if total <= 0:
        raise ValueError(f"expected a duration greater than zero, like 20m, got {text!r}")
    return total


def format_duration(seconds: float) -> str:
    """``1200.0`` -> ``20m``: the interval as the startup log shows it."""
    whole = int(seconds)
    if whole != seconds or whole == 0:
        return f"{seconds:g}s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if whole >= size:
            parts.append(f"{whole // size}{unit}")
            whole %= size
    return " ".join(parts)


@dataclass(slots=True)
class HeartbeatPolicy:
    """When a token is due next.  ``uniform(a, b)`` is injectable for tests.

    Due times are seconds since the epoch, because they outlive the process.
    """

    interval: float = DEFAULT_INTERVAL
    uniform: Callable[[float, float], float] = field(default=random.uniform)

    def __post_init__(self) -> None:
        if not self.interval > 0:
            raise ValueError("the heartbeat interval must be positive")

    @property
    def jitter(self) -> float:
        """How far either way from one interval a due time may fall."""
        return self.interval * JITTER_FRACTION

    def next_due(self, now: float) -> float:
        """One interval after ``now``, jittered, so that tokens registered together spread out."""
        return now + self.interval + self.uniform(-self.jitter, self.jitter)

    def after_registration(self, now: float) -> float:
        """The first heartbeat comes about one interval after registering (as upstream); a
        token registered again is postponed the same way."""
        return self.next_due(now)

    def after(self, outcome: Outcome, now: float) -> float | None:
        """The next due time after a heartbeat with ``outcome``, or None to drop the token.

        SENT and RETRY (throttled, timed out, APNs 5xx, APNs not configured) both
        wait one interval: a missed heartbeat is made up by the next one, and
        retrying sooner would only add load where Apple is already struggling.
        """
        if outcome is Outcome.GONE:
            return None
        return self.next_due(now)
