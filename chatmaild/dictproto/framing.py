"""Framing: the byte stream into LF-terminated lines, with a limit on line length.

Dovecot sends lines far over 64 KiB (a 300 KiB value is one ``S`` line), so the limit
is configurable (default 1 MiB).  A longer line is not buffered: its bytes are dropped
as they arrive and the line is reported once, as :class:`Oversized` with its first
bytes, so the parser can still answer the command it began (``F`` where a reply is due)
and fail the transaction it named.  Nothing here knows what a line means.
"""

from __future__ import annotations

from .sentinels import NEED_DATA

DEFAULT_MAX_LINE = 1 << 20  # 1 MiB, see DESIGN.md (Dovecot sends lines far over 64 KiB)
OVERSIZED_HEAD = 64  # bytes of a dropped line kept: enough for its letter and transaction id


class Oversized:
    """A line longer than the limit, dropped; ``head`` is its first bytes."""

    __slots__ = ("head",)

    def __init__(self, head: bytes) -> None:
        self.head = head

    def __repr__(self) -> str:
        return f"Oversized({self.head!r})"


class LineBuffer:
    """Buffers received bytes and hands out one complete line (without its LF) at a time."""

    __slots__ = ("max_line", "_buf", "_scan_from", "_discarding", "_discard_head")

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        self.max_line = max_line
        self._buf = bytearray()
        self._scan_from = 0  # no LF before this offset: do not search it again
        self._discarding = False  # inside an oversized line whose LF has not come yet
        self._discard_head = b""

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes held (bounded by about ``max_line`` plus one received chunk)."""
        return len(self._buf)

    def next_line(self) -> bytes | Oversized | type[NEED_DATA]:
        buf = self._buf
        if not buf:  # the usual end of a batch: every line was taken
            return NEED_DATA
        nl = buf.find(b"\n", self._scan_from)
        if nl < 0:
            if len(buf) > self.max_line:
                if not self._discarding:
                    self._discarding = True
                    self._discard_head = bytes(buf[:OVERSIZED_HEAD])
                buf.clear()
            self._scan_from = len(buf)
            return NEED_DATA
        self._scan_from = 0
        if self._discarding or nl > self.max_line:
            head = self._discard_head if self._discarding else bytes(buf[:OVERSIZED_HEAD])
            self._discarding = False
            del buf[: nl + 1]
            return Oversized(head)
        line = bytes(buf[:nl])
        del buf[: nl + 1]
        return line
