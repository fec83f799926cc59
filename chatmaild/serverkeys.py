"""Server metadata Delta Chat reads with ``GETMETADATA ""``: iroh, TURN, limits, app versions.

These keys are answered from configuration, not from the attribute store, and
are read-only.  Any failure (TURN helper down, broken JSON file) answers "not
found" so that a client simply falls back to its defaults.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from .config import Config

log = logging.getLogger(__name__)

SERVER_KEY_PREFIX = b"vendor/vendor.dovecot/pvt/server/vendor/deltachat/"
TURN_PORT = 3478
TURN_TIMEOUT = 5.0
#: After a failed ask of the TURN helper, ``turn`` answers "not found" at once for this
#: long: Delta Chat reads the key on every login, so a missing helper would otherwise cost
#: a socket attempt (and, before, a log line) per GETMETADATA.  Short, so that a helper
#: that comes back is used again within seconds.
TURN_FAILURE_CACHE_SECONDS = 5.0
#: Credentials the helper gave are answered from memory for at most this long, so that
#: Delta Chat's read on every login costs no I/O.  Only credentials that carry their
#: expiry (``<unix time>:<password>``, as chatmail-turn makes them) are kept, and never
#: closer than ``TURN_EXPIRY_MARGIN`` to that expiry.
TURN_CACHE_SECONDS = 60.0
TURN_EXPIRY_MARGIN = 600.0
#: Names answered from configuration; listings (``I``) show these, sorted.
STATIC_NAMES = (b"appversions", b"irohrelay", b"maxsmtprecipients")
#: Answered by asking the TURN helper (I/O), so only on a lookup, never in a listing.
TURN = b"turn"
#: Every served name; the one copy of the list (the README prints it for users).
NAMES = frozenset({*STATIC_NAMES, TURN})


def server_key_name(key: bytes) -> bytes | None:
    """``shared/<guid>/vendor/.../deltachat/<name>`` -> ``name`` for the served names, else None."""
    if not key.startswith(b"shared/"):
        return None
    parts = key.split(b"/", 2)
    if len(parts) != 3 or not parts[2].startswith(SERVER_KEY_PREFIX):
        return None
    name = parts[2][len(SERVER_KEY_PREFIX) :]
    return name if name in NAMES else None


def read_appversions(path: Path) -> bytes | None:
    """The JSON file re-serialised compactly on one line, or None if missing or invalid."""
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.error("cannot serve appversions from %s: %s", path, exc)
        return None
    return json.dumps(data, separators=(",", ":"), ensure_ascii=True).encode()


async def read_turn_credentials(socket_path: str, timeout: float | None = None) -> str:
    """One line from the chatmail-turn helper's Unix socket (raises on any failure)."""
    if timeout is None:
        timeout = TURN_TIMEOUT

    async def _read() -> bytes:
        reader, writer = await asyncio.open_unix_connection(socket_path)
        try:
            return await reader.readline()
        finally:
            writer.close()

    line = await asyncio.wait_for(_read(), timeout)
    cred = line.decode("utf-8").strip()
    if not cred:
        raise ValueError("empty answer from TURN helper")
    return cred


def turn_expiry(cred: str) -> int | None:
    """The Unix time a ``<expiry>:<password>`` credential runs out, or None if it has none."""
    head, sep, _ = cred.partition(":")
    if not sep or not head.isdigit():
        return None
    return int(head)


#: :meth:`ServerKeys.cached_turn` when the answer needs an ask of the helper.
TURN_UNKNOWN = object()


class ServerKeys:
    """Answers the served names; ``turn`` is the only one that needs I/O.

    A ``turn`` answer is remembered (credentials until shortly before their expiry, at
    most ``TURN_CACHE_SECONDS``; a failure for ``TURN_FAILURE_CACHE_SECONDS``), and
    lookups that arrive while the helper is being asked share that one ask.

    The TURN helper's state is logged once per change (a WARNING when it fails, an INFO
    when it answers again); ``on_turn_failure`` is called for every failed ask (the
    relay metrics count them).
    """

    def __init__(
        self,
        config: Config,
        on_turn_failure: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._appversions_cache: tuple[tuple[int, int, int] | None, bytes | None] | None = None
        self._appversions_path: Path | None = None
        self._appversions_str = ""
        self._on_turn_failure = on_turn_failure
        self._clock = clock
        self._wall_clock = wall_clock
        self._turn_down = False
        self._turn_retry_at = 0.0
        self._turn_value: bytes | None = None
        self._turn_valid_until = 0.0  # monotonic; _turn_value is answered before this
        self._turn_ask: asyncio.Future[bytes | None] | None = None

    def static_value(self, name: bytes) -> bytes | None:
        if name == b"irohrelay":
            relay = self.config.iroh_relay
            return relay.encode() if relay else None
        if name == b"maxsmtprecipients":
            return str(self.config.max_smtp_recipients).encode()
        if name == b"appversions":
            return self._appversions()
        raise KeyError(name)

    def _appversions(self) -> bytes | None:
        """The file's value, re-read only when its identity, size or mtime changed.

        Delta Chat reads the key on every login, so this is one ``os.stat`` of a
        pre-converted path per lookup (no ``Path`` object work), never a read.
        """
        path = self.config.appversions_path
        try:
            st = os.stat(self._appversions_fspath(path))
            stamp: tuple[int, int, int] | None = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            stamp = None
        cached = self._appversions_cache
        if cached is None or cached[0] != stamp:
            cached = (stamp, read_appversions(path))
            self._appversions_cache = cached
        return cached[1]

    def _appversions_fspath(self, path: Path) -> str:
        if self._appversions_path is not path:  # a config reloaded with another path
            self._appversions_path = path
            self._appversions_str = os.fspath(path)
        return self._appversions_str

    def cached_turn(self) -> bytes | None | object:
        """The ``turn`` answer without I/O, or ``TURN_UNKNOWN`` if the helper must be asked."""
        now = self._clock()
        if self._turn_down and now < self._turn_retry_at:
            return None  # failed moments ago: no socket attempt, no log line
        if self._turn_value is not None and now < self._turn_valid_until:
            return self._turn_value
        return TURN_UNKNOWN

    async def turn(self) -> bytes | None:
        cached = self.cached_turn()
        if cached is not TURN_UNKNOWN:
            return cached  # type: ignore[return-value]
        if self._turn_ask is None:  # the first asker asks; the others wait for its answer
            self._turn_ask = asyncio.ensure_future(self._ask_turn())
            self._turn_ask.add_done_callback(self._turn_asked)
        return await asyncio.shield(self._turn_ask)

    def _turn_asked(self, ask: asyncio.Future[bytes | None]) -> None:
        if self._turn_ask is ask:
            self._turn_ask = None

    async def _ask_turn(self) -> bytes | None:
        path = self.config.turn_socket_path
        try:
            cred = await read_turn_credentials(path)
        except Exception as exc:  # any failure of the helper answers N
            self._turn_retry_at = self._clock() + TURN_FAILURE_CACHE_SECONDS
            if self._on_turn_failure is not None:
                self._on_turn_failure()
            if not self._turn_down:
                self._turn_down = True
                log.warning("TURN credentials unavailable (%s): %r", path, exc)
            return None
        if self._turn_down:
            self._turn_down = False
            log.info("TURN helper answers again (%s)", path)
        value = f"{self.config.turn_hostname}:{TURN_PORT}:{cred}".encode()
        self._remember_turn(value, turn_expiry(cred))
        return value

    def _remember_turn(self, value: bytes, expiry: int | None) -> None:
        if expiry is None:
            self._turn_value = None  # no expiry to respect: ask again next time
            return
        ttl = min(TURN_CACHE_SECONDS, expiry - TURN_EXPIRY_MARGIN - self._wall_clock())
        if ttl > 0:
            self._turn_value = value
            self._turn_valid_until = self._clock() + ttl
        else:
            self._turn_value = None
