"""asyncio adapter: a Unix-socket server moving bytes between Dovecot and the sans-I/O protocol.

Uses ``asyncio.Protocol`` (not streams) because Dovecot opens a connection per IMAP
command and lookups are answered synchronously from SQLite: the hot path is
``data_received -> parse -> SQLite -> write`` with no task switches.  A reply that
needs I/O (TURN) pauses the connection's event processing until it is written, so
replies always leave in command order.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import socket
import stat
from collections.abc import Awaitable
from pathlib import Path

from . import dictproto as dp
from .metadata import MetadataDict

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 4096


class DictProtocol(asyncio.Protocol):
    """One Dovecot dict connection."""

    def __init__(self, backend: MetadataDict, max_line: int, stats: ServerStats) -> None:
        self.backend = backend
        self.conn = dp.DictConnection(max_line, backend.limits.max_value_bytes)
        self.stats = stats
        self.transport: asyncio.Transport | None = None
        self._busy = False
        self._handlers = {
            dp.Lookup: backend.lookup,
            dp.Commit: backend.commit,
            dp.Iterate: backend.iterate,
            dp.Refusal: _refusal_reply,
        }

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.stats.connections += 1
        self.stats.open_connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.stats.open_connections -= 1
        if self.conn.open_transactions:
            log.debug("connection closed with %d open transaction(s)", self.conn.open_transactions)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        if not self._busy:
            self._process()

    def _process(self) -> None:
        conn = self.conn
        handlers = self._handlers
        out: list[bytes] = []
        while (ev := conn.next_event()) is not None:
            kind = type(ev)
            handler = handlers.get(kind)
            if handler is None:
                continue  # Hello: never answered
            self.stats.count(kind)
            try:
                reply = handler(ev)
            except Exception as exc:  # one reply is owed whatever happened
                log.exception("error handling %s", kind.__name__)
                reply = _failure(ev, exc)
            if type(reply) is bytes:
                out.append(reply)
                continue
            if not inspect.isawaitable(reply):
                log.error("backend returned %r for %s", type(reply), kind.__name__)
                out.append(_failure(ev, TypeError("no reply")))
                continue
            # An answer that needs I/O: flush what we have, then wait for it in order.
            self._write(out)
            out = []
            self._busy = True
            asyncio.ensure_future(self._finish(ev, reply))
            return
        self._write(out)

    async def _finish(self, ev: dp.Event, pending: Awaitable[bytes]) -> None:
        try:
            reply = await pending
        except Exception as exc:  # never leave Dovecot without its one reply
            log.exception("lookup failed")
            reply = _failure(ev, exc)
        self._write([reply])
        self._busy = False
        if self.transport is not None:
            self._process()

    def _write(self, chunks: list[bytes]) -> None:
        if chunks and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(chunks))


def _refusal_reply(ev: dp.Refusal) -> bytes:
    return ev.reply


def _failure(ev: dp.Event, exc: BaseException) -> bytes:
    """The failure reply of the kind ``ev`` owes (commit, iterate or lookup)."""
    if isinstance(ev, dp.Commit):
        return dp.commit_reply(ev.txid, f"internal error: {exc}")
    if isinstance(ev, dp.Iterate):
        return dp.iterate_failure(f"internal error: {exc}")
    return dp.lookup_failure(f"internal error: {exc}")


class ServerStats:
    """Counters the metrics endpoint and the tests read."""

    __slots__ = (
        "connections",
        "open_connections",
        "lookups",
        "iterations",
        "commits",
        "refusals",
    )

    def count(self, kind: type) -> None:
        if kind is dp.Lookup:
            self.lookups += 1
        elif kind is dp.Commit:
            self.commits += 1
        elif kind is dp.Iterate:
            self.iterations += 1
        else:
            self.refusals += 1

    def __init__(self) -> None:
        self.connections = 0
        self.open_connections = 0
        self.lookups = 0
        self.iterations = 0
        self.commits = 0
        self.refusals = 0


def bind_unix_socket(path: str | Path, mode: int | None) -> socket.socket:
    """Bind a listening Unix socket, replacing a stale socket file (not any other file)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise OSError(f"socket directory does not exist: {path.parent}")
    try:
        st = path.lstat()
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(f"refusing to replace {path}: it exists and is not a socket")
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        if mode is not None:
            os.chmod(path, mode)
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


async def start_dict_server(
    backend: MetadataDict,
    sock: socket.socket,
    max_line: int = dp.DEFAULT_MAX_LINE,
    stats: ServerStats | None = None,
) -> tuple[asyncio.AbstractServer, ServerStats]:
    """Serve ``backend`` on an already bound listening socket (bound here or by systemd)."""
    stats = stats or ServerStats()
    loop = asyncio.get_running_loop()
    server = await loop.create_unix_server(
        lambda: DictProtocol(backend, max_line, stats), sock=sock, backlog=LISTEN_BACKLOG
    )
    return server, stats
