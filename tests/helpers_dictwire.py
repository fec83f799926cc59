"""Talking raw bytes to a running ``chatmail-metadata`` and checking every reply's shape.

The fault and fuzz tests send whatever they like; which lines owe a reply is decided
from the first byte alone (the reply grammar of both Dovecot releases, see
reference/dovecot-dict-protocol.md and dovecot-2.4-dict-protocol.md):

* ``L``: one line ``O<value>``, ``N`` or ``F<reason>``;
* ``I``: rows ``O<key>\\t<value>``, then an empty line; or one ``F<reason>`` instead;
* ``C`` (and ``D`` on 2.3): one line ``O<id>``, ``N<id>`` or ``F<id>\\t<reason>``;
* every other line (``H B S U A T R V``, garbage, empty): nothing at all.

The checker is written from that grammar, not from the server's parser, so a server
that answers a line it should not, or skips one, is caught.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from chatmaild import dictproto as dp


class BadReply(AssertionError):
    """The server broke the reply grammar (the message quotes what it sent)."""


def owed_kinds(version: dp.ProtocolVersion, lines: list[bytes]) -> list[tuple[int, bytes]]:
    """``(letter, line)`` for each line sent (without its LF) that owes a reply, in order."""
    return [(line[0], line) for line in lines if line and version.owes_reply(line[0])]


def _txid_of(line: bytes) -> bytes | None:
    """The id a ``C`` reply must echo, when it is plain enough to predict (no escapes);
    an over-long line is refused unread, so its id is not known (``F\t<reason>``)."""
    if len(line) > dp.DEFAULT_MAX_LINE:
        return None
    field = line[1:].split(b"\t", 1)[0]
    return field if field.isalnum() else None


def check_replies(owed: list[tuple[int, bytes]], data: bytes) -> int:
    """Check ``data`` answers ``owed`` exactly; returns the count checked (raises BadReply)."""
    lines = data.split(b"\n")
    if lines[-1] != b"":
        raise BadReply(f"reply stream does not end with LF: ...{data[-80:]!r}")
    lines.pop()
    pos = 0

    def take(what: bytes) -> bytes:
        nonlocal pos
        if pos >= len(lines):
            raise BadReply(f"no reply to {what[:60]!r}")
        pos += 1
        return lines[pos - 1]

    for letter, line in owed:
        if letter == ord("I"):
            while True:
                row = take(line)
                if row == b"" or row.startswith(b"F"):
                    break
                if not row.startswith(b"O") or b"\t" not in row:
                    raise BadReply(f"iterate row {row[:80]!r} for {line[:60]!r}")
            continue
        reply = take(line)
        if not reply or reply[0] not in b"ONF":
            raise BadReply(f"reply {reply[:80]!r} to {line[:60]!r}")
        if letter in b"CD":
            txid = _txid_of(line)
            head = reply[1:].split(b"\t", 1)[0]
            if txid is not None and head != txid:
                raise BadReply(f"commit reply {reply[:80]!r} to {line[:60]!r}")
    if pos != len(lines):
        raise BadReply(f"{len(lines) - pos} extra reply line(s): {lines[pos][:80]!r}")
    return len(owed)


def replies_complete(owed: list[tuple[int, bytes]], data: bytes) -> bool:
    """Whether ``data`` holds at least as many complete replies as ``owed`` (cheap count)."""
    lines = data.split(b"\n")[:-1]
    pos = 0
    for letter, _ in owed:
        if letter == ord("I"):
            while pos < len(lines) and not (lines[pos] == b"" or lines[pos].startswith(b"F")):
                pos += 1
        if pos >= len(lines):
            return False
        pos += 1
    return True


@dataclass
class Exchange:
    """One connection's bytes out and replies in."""

    version: dp.ProtocolVersion
    dict_name: str
    lines: list[bytes]
    chunk: int = 4096
    # one line of ``huge_size`` bytes starting ``huge_head`` goes in before lines[huge_at]
    # (kept out of ``lines`` so a falsifying example prints short)
    huge_at: int | None = None
    huge_head: bytes = b""
    huge_size: int = 0  # send in pieces of this size: lines split across writes
    tail: bytes = b""  # a partial line sent last (only with abrupt)
    abrupt: bool = False  # close without reading the replies
    cut: float = 1.0  # with abrupt: the share of the bytes sent before closing
    received: bytes = field(default=b"", init=False)

    def all_lines(self) -> list[bytes]:
        if self.huge_at is None:
            return self.lines
        huge = self.huge_head + b"a" * (self.huge_size - len(self.huge_head))
        return [*self.lines[: self.huge_at], huge, *self.lines[self.huge_at :]]

    def payload(self) -> bytes:
        body = b"".join(li + b"\n" for li in self.all_lines())
        return self.version.hello_line(self.dict_name) + body + (self.tail if self.abrupt else b"")

    def owed(self) -> list[tuple[int, bytes]]:
        return owed_kinds(self.version, self.all_lines())


def run(path: Path, ex: Exchange, timeout: float = 30.0) -> Exchange:
    """Send ``ex`` (writer thread, so a server pausing on backpressure cannot deadlock us)
    and read until every owed reply arrived; an abrupt one is just cut off."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        data = ex.payload()
        if ex.abrupt:
            with contextlib.suppress(OSError):  # the server may have cut us off first
                sock.sendall(data[: max(1, int(len(data) * ex.cut))])
            return ex
        errors: list[BaseException] = []

        def write() -> None:
            try:
                for i in range(0, len(data), ex.chunk):
                    sock.sendall(data[i : i + ex.chunk])
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        owed = ex.owed()
        deadline = time.monotonic() + timeout
        while not replies_complete(owed, ex.received):
            if time.monotonic() > deadline:
                raise BadReply(f"replies not complete after {timeout} s: {ex.received[-200:]!r}")
            chunk = sock.recv(1 << 16)
            if not chunk:
                raise BadReply(f"server closed the connection; got {ex.received[-200:]!r}")
            ex.received += chunk
        writer.join(timeout)
        if errors:
            raise errors[0]
        sock.settimeout(0.05)  # anything more than owed is a grammar error
        try:
            while more := sock.recv(1 << 16):
                ex.received += more
        except TimeoutError:
            pass
        check_replies(owed, ex.received)
        return ex


def session(path: Path, dict_name: str, lines: list[bytes], version=dp.DOVECOT_2_3) -> list[bytes]:
    """Send ``lines`` on one connection; the reply lines (grammar checked)."""
    ex = run(path, Exchange(version, dict_name, lines))
    return ex.received.split(b"\n")[:-1]


def set_lines(txid: str, user: str, key: bytes, value: bytes) -> list[bytes]:
    t = txid.encode()
    return [
        b"B" + t + b"\t" + user.encode(),
        b"S" + t + b"\t" + dp.tabescape(key) + b"\t" + dp.tabescape(value),
        b"C" + t,
    ]


def lookup_line(key: bytes, user: str) -> bytes:
    return b"L" + dp.tabescape(key) + b"\t" + user.encode()
