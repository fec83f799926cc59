"""IMAP clients for the dev-stack Dovecot: :mod:`imaplib` and a raw socket.

:class:`ImapClient` (on :mod:`imaplib`, quoted strings only) is what Delta Chat
does in the common case; :class:`RawImap` sends exact bytes, for ``{N}`` and
``{N+}`` literals and byte-exact values.  :func:`parse_metadata` reads the
``* METADATA`` responses of both.
"""

from __future__ import annotations

import contextlib
import imaplib
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass

from devstack.loopback import HOST

imaplib.Commands.setdefault("SETMETADATA", ("AUTH", "SELECTED"))
imaplib.Commands.setdefault("GETMETADATA", ("AUTH", "SELECTED"))


class LoginFailed(RuntimeError):
    """The server refused LOGIN; ``text`` is its answer (e.g. ``[AUTHENTICATIONFAILED] ...``)."""

    def __init__(self, user: str, text: str) -> None:
        super().__init__(f"LOGIN as {user} failed: {text}")
        self.user = user
        self.text = text


@dataclass(frozen=True)
class Literal:
    """An IMAP literal argument for :meth:`RawImap.command`: ``{N}`` or ``{N+}``."""

    data: bytes
    plus: bool = True


@dataclass
class ImapResponse:
    tag: bytes
    status: str  # OK, NO or BAD
    text: bytes  # the tagged line after the status, without CRLF
    untagged: list[list[bytes]]  # each: [text, literal, text, literal, ..., text]

    @property
    def raw_untagged(self) -> bytes:
        """The untagged responses as they came over the wire (literal markers removed)."""
        return b"\n".join(b"".join(parts) for parts in self.untagged)

    def metadata(self) -> dict[str, bytes | None]:
        """Entries of all ``* METADATA`` responses (entry name -> value, NIL -> None)."""
        result: dict[str, bytes | None] = {}
        for parts in self.untagged:
            if parts[0].startswith(b"METADATA "):
                result.update(parse_metadata([parts[0][len(b"METADATA ") :], *parts[1:]]))
        return result


class RawImap:
    """IMAP over a raw socket: exact bytes, synchronizing and LITERAL+ literals."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.file = self.sock.makefile("rb")
        self._tag = 0
        greeting = self.file.readline()
        if not greeting.startswith(b"* OK"):
            raise RuntimeError(f"unexpected IMAP greeting {greeting!r}")
        self.greeting = greeting

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(b"zz LOGOUT\r\n")
        self.file.close()
        self.sock.close()

    def __enter__(self) -> RawImap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def login(self, user: str, password: str) -> ImapResponse:
        resp = self.command(f"LOGIN {_quote(user)} {_quote(password)}")
        if resp.status != "OK":
            raise LoginFailed(user, resp.text.decode("utf-8", "replace"))
        return resp

    def command(self, *parts: bytes | str | Literal) -> ImapResponse:
        """Send ``<tag> `` + the parts concatenated exactly as given; read to the tagged reply.

        A :class:`Literal` is sent as ``{N+}`` (or ``{N}``, waiting for the ``+``
        continuation) followed by its bytes, e.g.
        ``command("SETMETADATA INBOX (/private/x ", Literal(value), ")")``.
        """
        self._tag += 1
        tag = b"r%d" % self._tag
        pending = tag + b" "
        for part in parts:
            if isinstance(part, Literal):
                marker = b"{%d%s}" % (len(part.data), b"+" if part.plus else b"")
                self.sock.sendall(pending + marker + b"\r\n")
                if not part.plus:
                    cont = self._readline()
                    if not cont.startswith(b"+"):
                        return self._read_until(tag, first=cont)
                pending = part.data
            else:
                pending += part.encode() if isinstance(part, str) else part
        self.sock.sendall(pending + b"\r\n")
        return self._read_until(tag)

    def _read_until(self, tag: bytes, first: bytes | None = None) -> ImapResponse:
        untagged: list[list[bytes]] = []
        line = first
        while True:
            if line is None:
                line = self._readline()
            if line.startswith(tag + b" "):
                rest = line[len(tag) + 1 :].rstrip(b"\r\n")
                status, _, text = rest.partition(b" ")
                return ImapResponse(tag, status.decode(), text, untagged)
            if line.startswith(b"* "):
                untagged.append(self._read_literals(line[2:]))
            line = None

    def _read_literals(self, line: bytes) -> list[bytes]:
        parts: list[bytes] = []
        while True:
            m = re.search(rb"\{(\d+)\}\r\n$", line)
            if not m:
                parts.append(line.rstrip(b"\r\n"))
                return parts
            parts.append(line[: m.start()])
            parts.append(self._readexact(int(m.group(1))))
            line = self._readline()

    def _readline(self) -> bytes:
        line = self.file.readline()
        if not line:
            raise ConnectionError("IMAP server closed the connection")
        return line

    def _readexact(self, n: int) -> bytes:
        data = self.file.read(n)
        if len(data) != n:
            raise ConnectionError("IMAP server closed the connection inside a literal")
        return data


class ImapClient(imaplib.IMAP4):
    """:mod:`imaplib` with SETMETADATA/GETMETADATA helpers (quoted strings only)."""

    def __init__(self, port: int, user: str, password: str, timeout: float = 30.0) -> None:
        super().__init__(HOST, port, timeout=timeout)
        self.login(user, password)

    def setmetadata(self, mailbox: str, entries: dict[str, str | None]) -> tuple[str, list]:
        """``SETMETADATA mailbox (entry value ...)``; None is sent as NIL."""
        body = " ".join(f"{e} {'NIL' if v is None else _quote(v)}" for e, v in entries.items())
        return self._simple_command("SETMETADATA", _quote(mailbox), f"({body})")

    def getmetadata(
        self, mailbox: str, *entries: str, depth: str | None = None
    ) -> tuple[str, dict[str, bytes | None]]:
        """``GETMETADATA [(DEPTH d)] mailbox (entries)`` -> (status, {entry: value})."""
        args = [f"(DEPTH {depth})"] if depth else []
        args += [_quote(mailbox), "(" + " ".join(entries) + ")"]
        typ, data = self._simple_command("GETMETADATA", *args)
        typ, data = self._untagged_response(typ, data, "METADATA")
        result: dict[str, bytes | None] = {}
        for item in _imaplib_responses(data):
            result.update(parse_metadata(item))
        return typ, result


def _imaplib_responses(data: list) -> Iterator[list[bytes]]:
    """imaplib's untagged data -> one [text, literal, ..., text] list per response.

    imaplib stores a response with literals as ``(line-up-to-{N}, literal)``
    tuples followed by the rest of the line as bytes.
    """
    current: list[bytes] = []
    for item in data:
        if isinstance(item, tuple):
            head, literal = item
            current += [re.sub(rb"\{\d+\}$", b"", head), literal]
        elif item is not None:
            current.append(item)
            yield current
            current = []
    if current:
        yield current


def _quote(s: str | bytes) -> str:
    if isinstance(s, bytes):
        s = s.decode()
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


_TOKEN_RE = re.compile(rb'\s*(?:(\()|(\))|"((?:[^"\\]|\\.)*)"|([^\s()"]+))')


def parse_metadata(parts: list[bytes]) -> dict[str, bytes | None]:
    """Parse ``mailbox (entry value entry value ...)`` given as [text, literal, text, ...].

    Values may be literals, quoted strings or NIL (-> None).  Raises ValueError on
    anything else, e.g. an empty ``()``.
    """
    tokens: list[tuple[str, bytes | None]] = []
    for i, part in enumerate(parts):
        if i % 2 == 1:
            tokens.append(("str", part))
            continue
        pos = 0
        while pos < len(part):
            m = _TOKEN_RE.match(part, pos)
            if not m or m.end() == pos:
                if part[pos:].strip():
                    raise ValueError(f"cannot parse {part[pos:]!r}")
                break
            pos = m.end()
            if m.group(1):
                tokens.append(("(", None))
            elif m.group(2):
                tokens.append((")", None))
            elif m.group(3) is not None:
                tokens.append(("str", re.sub(rb"\\(.)", rb"\1", m.group(3))))
            else:
                atom = m.group(4)
                tokens.append(("nil", None) if atom.upper() == b"NIL" else ("atom", atom))
    if len(tokens) < 3 or tokens[1][0] != "(" or tokens[-1][0] != ")":
        raise ValueError(f"not a METADATA response: {tokens!r}")
    body = tokens[2:-1]
    if not body or len(body) % 2:
        raise ValueError(f"bad entry list in METADATA response: {tokens!r}")
    result: dict[str, bytes | None] = {}
    for (kind, entry), (vkind, value) in zip(body[::2], body[1::2], strict=True):
        if kind not in ("atom", "str") or entry is None:
            raise ValueError(f"bad entry name {entry!r}")
        if vkind not in ("str", "nil"):
            raise ValueError(f"bad value for {entry!r}")
        result[entry.decode()] = value
    return result
