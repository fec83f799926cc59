"""The connection: bytes in, events out, replies back through the same object.

Framing (``framing.py``), parsing (``parsing.py``) and the open transactions
(``transactions.py``) each do one job; this module joins them and keeps the one
promise Dovecot depends on: every ``L``, ``I`` and ``C`` gets exactly one reply, in
command order, and nothing else ever gets one.  Events that owe a reply are queued
when they are handed out; :meth:`DictConnection.send` only answers the oldest of them,
once, with a reply of its kind, and raises :class:`LocalProtocolError` otherwise.

No logging and no I/O here: protocol errors are counted in ``errors`` and their
descriptions queued in ``problems`` for the caller to log.
"""

from __future__ import annotations

from collections import deque

from chatmail_common.logclip import clip

from .errors import LocalProtocolError, RemoteProtocolError
from .events import Event, Hello, Iterate, Lookup, Refusal, ReplyOwing, SetOp
from .framing import DEFAULT_MAX_LINE, LineBuffer, Oversized
from .parsing import (
    PARSERS_BY_VERSION,
    AddOp,
    Begin,
    CommitRequest,
    Rollback,
    TuneTransaction,
    parse_line,
)
from .replies import ENCODERS, encode_reply
from .sentinels import NEED_DATA
from .transactions import OpenTransactions
from .versions import DEFAULT_VERSION, VERSIONS, ProtocolVersion, version_for

_L = ord("L")
_H = ord("H")
_S = ord("S")
MAX_PROBLEMS = 64  # descriptions kept until the caller takes them (``errors`` counts all)
#: H lines already parsed, and their (immutable) Hello: every connection starts with one
#: of the few lines the Dovecot releases send, and Dovecot 2.3 makes a connection per
#: IMAP command, so parsing it again cost ~2 us of each.  Bounded in count and length.
_HELLOS: dict[bytes, Hello] = {}
MAX_HELLOS = 16
MAX_HELLO_LINE = 128
# Looked up by identity-free keys: a ProtocolVersion hashes all its fields on every lookup,
# and a connection per IMAP command (Dovecot 2.3's default) makes this per command.
_DEFAULT_PARSERS = PARSERS_BY_VERSION[DEFAULT_VERSION]
_PARSERS_BY_MAJOR = {v.major: PARSERS_BY_VERSION[v] for v in VERSIONS}


class DictConnection:
    """One dict client connection, sans I/O.

    ``receive_data(bytes)``, then ``next_event()`` until it returns ``NEED_DATA``;
    answer each event that owes a reply with ``send(event, reply)`` and write the
    bytes it returns.  ``max_value``: see ``transactions.py``.
    """

    def __init__(self, max_line: int = DEFAULT_MAX_LINE, max_value: int | None = None) -> None:
        self._lines = LineBuffer(max_line)
        self._transactions = OpenTransactions(max_value)
        self._owed: deque[ReplyOwing] = deque()
        self.version: ProtocolVersion = DEFAULT_VERSION
        self._parsers = _DEFAULT_PARSERS
        self._warned_version = False
        self.protocol_major = 0  # as the peer said it (0 before its H line)
        self.dict_name = ""
        self.errors = 0
        self.problems: deque[str] = deque(maxlen=MAX_PROBLEMS)

    @property
    def max_line(self) -> int:
        return self._lines.max_line

    @property
    def buffered_bytes(self) -> int:
        return self._lines.buffered

    @property
    def open_transactions(self) -> int:
        return len(self._transactions)

    @property
    def replies_owed(self) -> int:
        """Events handed out and not yet answered."""
        return len(self._owed)

    # -- input ------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        self._lines.feed(data)

    def next_event(self) -> Event | type[NEED_DATA]:
        """The next event (owed a reply, or a Hello), or NEED_DATA until more bytes arrive."""
        lines = self._lines
        while True:
            line = lines.next_line()
            if line is NEED_DATA:
                return NEED_DATA
            if type(line) is Oversized:
                ev = self._oversized(line.head)
            elif not line:
                ev = self._refuse(None, "empty line")
            elif line[0] == _L and b"\x01" not in line:  # type: ignore[index]
                # The hot path (Delta Chat's login reads four server keys, one L each):
                # what parse_lookup makes of a line with nothing escaped, in one step.
                fields = line[1:].split(b"\t")  # type: ignore[index]
                if len(fields) >= 2 and fields[1]:
                    try:
                        lookup = Lookup(fields[0], fields[1].decode("utf-8"))
                    except UnicodeDecodeError:
                        pass  # the general path below reports it
                    else:
                        self._owed.append(lookup)
                        return lookup
                ev = self._parse(line)  # type: ignore[arg-type]
            elif line[0] == _S and b"\x01" not in line and self._set_unescaped(line):  # type: ignore
                continue  # the transaction took it: nothing to hand out
            elif line[0] == _H and (hello := _HELLOS.get(line)) is not None:  # type: ignore
                ev = self._hello(hello)
            else:
                ev = self._parse(line)  # type: ignore[arg-type]
            if ev is not None:
                return ev

    def _set_unescaped(self, line: bytes) -> bool:
        """An ``S`` line with nothing escaped (every device-token refresh: a ~1 KB line)
        added to its open transaction as parse_set and ``_add_op`` would; False, having
        changed nothing, for anything they would refuse (the general path reports it)."""
        fields = line[1:].split(b"\t")
        if len(fields) < 3:
            return False
        try:
            self._transactions.add(fields[0].decode("utf-8"), SetOp(fields[1], fields[2]))
        except (UnicodeDecodeError, RemoteProtocolError):  # add raises before it changes
            return False
        return True

    def _parse(self, line: bytes) -> Event | None:
        """Any non-empty line: the event it makes, or None for a transaction command."""
        try:
            parsed = parse_line(line, self._parsers, self.version)
            kind = type(parsed)
            if kind is Lookup or kind is Iterate:  # no state to change
                self._owed.append(parsed)  # type: ignore[arg-type]
                return parsed  # type: ignore[return-value]
            if kind is Hello and len(line) <= MAX_HELLO_LINE and len(_HELLOS) < MAX_HELLOS:
                _HELLOS[line] = parsed  # type: ignore[assignment]
            return _APPLY[kind](self, parsed)  # type: ignore[operator]
        except RemoteProtocolError as exc:
            return self._remote_error(line[0], exc)

    def events(self) -> list[Event]:
        """All events the buffered bytes make (tests and tools; servers use next_event)."""
        out: list[Event] = []
        while (ev := self.next_event()) is not NEED_DATA:
            out.append(ev)  # type: ignore[arg-type]
        return out

    # -- output -----------------------------------------------------------
    def send(self, event: Event, reply: object = None) -> bytes:
        """The bytes answering ``event`` with ``reply`` (a ``Refusal`` takes none).

        Raises :class:`LocalProtocolError`, writing nothing and changing nothing, when
        ``event`` is not the oldest event still owed a reply (already answered, owes
        none, or out of command order) or ``reply`` is not of its kind.
        """
        owed = self._owed
        if not owed or owed[0] is not event:
            raise LocalProtocolError(self._not_owed(event))
        encode = ENCODERS[type(event)].get(type(reply))
        if encode is None:
            encode_reply(event, reply)  # raises, naming the replies the event takes
        data = encode(event, reply)  # type: ignore[misc]
        owed.popleft()
        return data

    def _not_owed(self, event: object) -> str:
        name = type(event).__name__
        if any(ev is event for ev in self._owed):
            return f"this {name} is answered out of command order: answer the older event first"
        if isinstance(event, Hello):
            return "a Hello owes no reply"
        return f"this {name} owes no reply (already answered, or not an event of this connection)"

    # -- applying what was parsed -------------------------------------------
    def _owe(self, ev: ReplyOwing) -> ReplyOwing:
        self._owed.append(ev)
        return ev

    def _hello(self, hello: Hello) -> Hello:
        version, known = version_for(hello.major)
        if not known and not self._warned_version:
            self._warned_version = True
            self.problems.append(
                f"dict client speaks protocol {hello.major}.{hello.minor}, which no known"
                f" Dovecot does; serving it as Dovecot {version.dovecot}"
            )
        self.version = version
        self._parsers = _PARSERS_BY_MAJOR[version.major]
        self.protocol_major = hello.major
        self.dict_name = hello.dict_name
        return hello

    def _begin(self, cmd: Begin) -> None:
        self._transactions.begin(cmd.txid, cmd.user, cmd.expire_secs)

    def _add_op(self, cmd: AddOp) -> None:
        self._transactions.add(cmd.txid, cmd.op)

    def _tune(self, cmd: TuneTransaction) -> None:
        self._transactions.check_open(cmd.txid)

    def _rollback(self, cmd: Rollback) -> None:
        self._transactions.rollback(cmd.txid)

    def _commit(self, cmd: CommitRequest) -> Event:
        done = self._transactions.finish(cmd.txid, cmd.command, self.dict_name)
        if done is None:
            self._problem(f"commit of unknown transaction {clip(repr(cmd.txid))}")
            done = Refusal(cmd.command, "unknown transaction", cmd.txid)
        return self._owe(done)

    # -- lines that cannot be served ---------------------------------------
    def _problem(self, reason: str) -> None:
        self.errors += 1
        self.problems.append(f"dict protocol error: {reason}")

    def _remote_error(self, letter: int, exc: RemoteProtocolError) -> Refusal | None:
        if exc.txid is not None:
            self._transactions.fail(exc.txid, exc.reason)
        return self._refuse(letter, f"{chr(letter)!r}: {exc.reason}")

    def _refuse(self, letter: int | None, reason: str, txid: str = "") -> Refusal | None:
        """Count and report the problem; a Refusal if the command owes a reply."""
        self._problem(reason)
        if letter is None or not self.version.owes_reply(letter):
            return None
        return self._owe(Refusal(chr(letter), reason, txid))

    def _oversized(self, head: bytes) -> Refusal | None:
        letter = head[0] if head else None
        reason = f"line longer than {self.max_line} bytes"
        if letter is not None and letter in self.version.commands:
            txid = head[1:].split(b"\t", 1)[0].decode("ascii", "replace")
            if letter in b"SAU":
                self._transactions.fail(txid, reason)  # its commit is refused
            elif letter in b"CD":
                self._transactions.drop(txid)  # the refusal below is its one reply
        return self._refuse(letter, reason)


#: What each parsed command does to the connection (one table for all connections: a
#: connection per IMAP command is Dovecot's default, so construction is a hot path too).
_APPLY = {
    Hello: DictConnection._hello,
    Begin: DictConnection._begin,
    AddOp: DictConnection._add_op,
    TuneTransaction: DictConnection._tune,
    Rollback: DictConnection._rollback,
    CommitRequest: DictConnection._commit,
}
