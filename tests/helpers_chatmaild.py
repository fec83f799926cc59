"""Shared helpers for the chatmaild unit tests (not a conftest: plain imports)."""

from __future__ import annotations

import asyncio
import inspect
import sqlite3
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from chatmaild import dictproto as dp
from chatmaild.config import Config, read_config
from chatmaild.database import connect
from chatmaild.metadata import MetadataDict
from chatmaild.serverkeys import ServerKeys
from chatmaild.store import MetadataStore

GUID = "0db9f01b8afe096b1c28000083ecc375"
GUID_B = "64079f38bffe096b912e000083ecc375"
ALICE = "alice@example.org"
BOB = "bob@example.org"
SERVER = f"shared/{GUID}/vendor/vendor.dovecot/pvt/server/vendor/deltachat/".encode()
T0 = 1_800_000_000  # a fixed "now" for the injectable clock
DAY = 86400


def write_ini(tmp_path: Path, params: str = "", metadata: str | None = None, **kw) -> Path:
    """A chatmail.ini in ``tmp_path`` with ``mail_domain`` and ``mailboxes_dir`` set."""
    mailboxes = tmp_path / "mailboxes"
    mailboxes.mkdir(exist_ok=True)
    text = f"[params]\nmail_domain = example.org\nmailboxes_dir = {mailboxes}\n"
    text += textwrap.dedent(params)
    if metadata is not None:
        text += "\n[metadata]\n" + textwrap.dedent(metadata)
    path = tmp_path / kw.get("name", "chatmail.ini")
    path.write_text(text)
    return path


class Clock:
    """Injectable clock: ``clock()`` returns the current fake time."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class RecordingHook:
    """A NewMailHook test double recording what it was given."""

    calls: list[tuple[str, list[str], float, bool]] = field(default_factory=list)
    committed_calls: int = 0
    events: list[str] = field(default_factory=list)
    fail: bool = False

    def message_new(
        self, conn: sqlite3.Connection, user: str, tokens: list[str], now: float
    ) -> None:
        self.calls.append((user, list(tokens), now, conn.in_transaction))
        self.events.append("message_new")
        if self.fail:
            raise RuntimeError("hook failure")

    def committed(self) -> None:
        self.committed_calls += 1
        self.events.append("committed")


def make_config(tmp_path: Path, params: str = "", metadata: str | None = None) -> Config:
    return read_config(write_ini(tmp_path, params, metadata))


def make_backend(
    tmp_path: Path,
    *,
    clock: Clock | None = None,
    hook: RecordingHook | None = None,
    delivery_dict: str | None = None,
    params: str = "",
    metadata: str | None = None,
) -> MetadataDict:
    config = make_config(tmp_path, params, metadata)
    conn = connect(tmp_path / "db.sqlite3")
    store = MetadataStore(conn, cache_attributes=True)  # as the service opens it
    return MetadataDict(
        store,
        ServerKeys(config),
        limits=config.limits,
        hook=hook,
        delivery_dict=delivery_dict,
        clock=clock or Clock(),
    )


def answer(backend: MetadataDict, ev: dp.Event) -> object:
    """The backend's typed reply to ``ev`` (awaitables run to completion); None for a Hello
    or a Refusal (which the connection answers with its own failure)."""
    if isinstance(ev, dp.Lookup):
        reply = backend.lookup(ev)
        if inspect.isawaitable(reply):

            async def _wait():
                return await reply

            reply = asyncio.run(_wait())
        return reply
    if isinstance(ev, dp.Iterate):
        return backend.iterate(ev)
    if isinstance(ev, dp.Commit):
        return backend.commit(ev)
    return None


def reply_bytes(ev: dp.Event, reply: object) -> bytes:
    """What ``reply`` to ``ev`` looks like on the wire, for events built by hand in a test
    (a server answers through ``DictConnection.send``, which also checks the event is owed)."""
    return dp.encode_reply(ev, reply)


class Session:
    """Drive a backend through one DictConnection, like the server does, synchronously."""

    def __init__(
        self,
        backend: MetadataDict,
        dict_name: str = "metadata",
        version: dp.ProtocolVersion = dp.DOVECOT_2_3,
    ) -> None:
        self.backend = backend
        self.conn = dp.DictConnection()
        self.send(version.hello_line(dict_name))

    def send(self, data: bytes) -> bytes:
        self.conn.receive_data(data)
        out = []
        while (ev := self.conn.next_event()) is not dp.NEED_DATA:
            if isinstance(ev, dp.Hello):
                continue
            out.append(self.conn.send(ev, answer(self.backend, ev)))
        return b"".join(out)

    def lookup(self, key: bytes, user: str = ALICE) -> bytes:
        return self.send(b"L" + dp.tabescape(key) + b"\t" + user.encode() + b"\n")

    def set(self, key: bytes, value: bytes, user: str = ALICE, txid: str = "1") -> bytes:
        t = txid.encode()
        return self.send(
            b"B" + t + b"\t" + user.encode() + b"\n"
            b"S" + t + b"\t" + dp.tabescape(key) + b"\t" + dp.tabescape(value) + b"\n"
            b"C" + t + b"\n"
        )

    def unset(self, key: bytes, user: str = ALICE, txid: str = "1") -> bytes:
        t = txid.encode()
        return self.send(
            b"B" + t + b"\t" + user.encode() + b"\n"
            b"U" + t + b"\t" + dp.tabescape(key) + b"\n"
            b"C" + t + b"\n"
        )

    def iterate(self, prefix: bytes, user: str = ALICE, flags: int = 0, max_rows: int = 0):
        return self.send(
            f"I{flags}\t{max_rows}\t".encode() + dp.tabescape(prefix) + f"\t{user}\n".encode()
        )


def wire(*lines: bytes) -> bytes:
    """Protocol lines (each given without its LF) as one byte string."""
    return b"".join(line + b"\n" for line in lines)


def priv(entry: str, guid: str = GUID) -> bytes:
    return f"priv/{guid}/{entry}".encode()


def shared(entry: str, guid: str = GUID) -> bytes:
    return f"shared/{guid}/{entry}".encode()
