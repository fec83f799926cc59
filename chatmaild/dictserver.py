"""asyncio adapter: a Unix-socket server moving bytes between Dovecot and the sans-I/O protocol.

Uses the ``asyncio.Protocol`` interface (not streams) because Dovecot opens a connection
per IMAP command and lookups are answered synchronously from SQLite: the hot path is
``data_received -> parse -> SQLite -> write`` with no task switches.  The server runs
each connection on a :class:`~chatmaild.sockconn.SocketConnection` (a socket on the loop,
no asyncio transport: cheaper to set up and tear down, which Dovecot's per-command
connections pay every time); :class:`DictProtocol` works on an asyncio transport as well.
A reply that needs I/O (TURN) pauses the connection's event processing until it is
written, so replies always leave in command order.

Flow control: a client that pipelines lookups and does not read would otherwise make
the server buffer every reply (a 60 KiB value 1,500 times is 90 MB).  Past
``WRITE_HIGH_WATER`` bytes in the transport's write buffer the connection stops
reading and stops taking buffered events from its ``DictConnection``; when the buffer
drains to the low-water mark it resumes both, so replies stay in order.

The backend returns typed replies (``dp.Found``, ``dp.COMMITTED``, ``dp.Failure``, ...);
every byte written comes from ``DictConnection.send``, which refuses a reply the event
cannot take.  A backend that raises, or returns something else, still ends in the one
failure reply the event owes.  Protocol problems the connection reports are logged here.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from chatmail_common.acceptguard import GuardedServer
from chatmail_common.logclip import clip

from . import dictproto as dp
from .groupcommit import GroupCommitter
from .metadata import MetadataDict
from .sockconn import SocketConnection

log = logging.getLogger(__name__)

#: Connections the kernel queues for accept().  Kept at 4096, the socket unit's
#: ``Backlog=``: after a restart every Dovecot process reconnects at once, and with
#: socket activation the connections made while the service restarts wait here
#: instead of failing.  A long queue is cheap since accepting backs off at the fd
#: limit (:mod:`chatmail_common.acceptguard`): with 3,000 clients that gave up queued
#: at a 64-descriptor limit, a fresh lookup was answered in 0.09 s after release,
#: where asyncio's accept loop left it unanswered for over 60 s (the 10 s the finding
#: measured was that storm, not the queue's length).
LISTEN_BACKLOG = 4096

# Per-connection output bound: pause above the high mark, resume below the low one.
WRITE_HIGH_WATER = 1024 * 1024
WRITE_LOW_WATER = 256 * 1024
# Replies are written in batches of about this size, so a pause takes effect in time.
FLUSH_BYTES = 64 * 1024


class DictProtocol(asyncio.Protocol):
    """One Dovecot dict connection."""

    def __init__(
        self,
        backend: MetadataDict,
        max_line: int,
        stats: ServerStats,
        group: GroupCommitter | None = None,
    ) -> None:
        self.backend = backend
        self.group = group
        self.conn = dp.DictConnection(max_line, backend.limits.max_value_bytes)
        self.stats = stats
        self.transport: asyncio.Transport | None = None
        self._busy = False  # a reply that needs I/O is pending
        self._paused = False  # the write buffer is past its high-water mark
        self._version_counted = False
        self._handlers: dict[type, Callable[[Any], object]] = {
            dp.Lookup: backend.lookup,
            dp.Commit: backend.commit if group is None else self._group_commit,
            dp.Iterate: backend.iterate,
            dp.Refusal: _own_failure,
        }

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        self.stats.connections += 1
        self.stats.open_connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        # The handler table holds ``self._group_commit``, a cycle only the cyclic GC would
        # free, with the connection's buffers behind it: Dovecot 2.3 makes a connection
        # per command, so that was ~10 objects of garbage per IMAP command.  Nothing
        # dispatches after this (a late group-commit reply sees no transport).
        self._handlers.clear()
        self.stats.open_connections -= 1
        if self.conn.open_transactions:
            log.debug("connection closed with %d open transaction(s)", self.conn.open_transactions)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        if not self._busy and not self._paused:
            self._process()

    # -- flow control (asyncio calls these as the write buffer crosses its marks) --
    def pause_writing(self) -> None:
        self._paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused = False
        if self.transport is None:
            return
        self.transport.resume_reading()
        if not self._busy:
            self._process()  # the events already buffered while paused

    def _process(self) -> None:
        # Per line, this loop is most of the server's own CPU: locals instead of attribute
        # lookups, and the lookup's counter and conn.send without a call of their own.
        conn = self.conn
        next_event = conn.next_event
        send = conn.send
        handlers = self._handlers
        stats = self.stats
        reply_types = dp.REPLY_TYPES
        need_data = dp.NEED_DATA
        lookup = dp.Lookup
        out: list[bytes] = []
        out_bytes = 0
        while not self._paused and (ev := next_event()) is not need_data:
            kind = type(ev)
            handler = handlers.get(kind)
            if handler is None:
                self._hello(ev)  # type: ignore[arg-type]
                continue
            if kind is lookup:
                stats.lookups += 1
            else:
                stats.count(kind)
            try:
                reply = handler(ev)
            except Exception as exc:  # one reply is owed whatever happened
                log.exception("error handling %s", kind.__name__)
                reply = _internal_error(exc)
            if reply is GROUPED:  # answered when its group is durable: wait for it, in order
                self._write(out)
                out = []
                self._busy = True
                break
            if type(reply) in reply_types or reply is None or not inspect.isawaitable(reply):
                try:
                    data = send(ev, reply)  # type: ignore[arg-type]
                except dp.LocalProtocolError as exc:
                    data = self._refused(ev, exc)  # type: ignore[arg-type]
                out.append(data)
                out_bytes += len(data)
                if out_bytes >= FLUSH_BYTES:  # may pause_writing(), ending the loop
                    self._write(out)
                    out, out_bytes = [], 0
                continue
            # An answer that needs I/O: flush what we have, then wait for it in order.
            self._write(out)
            out = []
            self._busy = True
            asyncio.ensure_future(self._finish(ev, reply))  # type: ignore[arg-type]
            break
        self._write(out)
        if conn.problems:
            _log_problems(conn)

    def _group_commit(self, ev: dp.Commit) -> object:
        assert self.group is not None
        self.group.submit(ev, lambda reply: self._resume(ev, reply))
        return GROUPED

    def _resume(self, ev: dp.ReplyOwing, reply: object) -> None:
        """Send the reply the connection was waiting for, then carry on with its events."""
        self._write([self._send(ev, reply)])
        self._busy = False
        if self.transport is not None and not self._paused:
            self._process()

    def _hello(self, hello: dp.Hello) -> None:
        if not self._version_counted:
            self._version_counted = True
            self.stats.count_version(self.conn.version)

    def _send(self, ev: dp.ReplyOwing, reply: object) -> bytes:
        """``conn.send``; a reply the event cannot take becomes the failure it owes."""
        try:
            return self.conn.send(ev, reply)
        except dp.LocalProtocolError as exc:
            return self._refused(ev, exc)

    def _refused(self, ev: dp.ReplyOwing, exc: dp.LocalProtocolError) -> bytes:
        """The failure ``ev`` owes instead of a reply it cannot take (a backend bug)."""
        log.error("backend reply refused: %s", exc)
        return self.conn.send(ev, _internal_error(exc))

    async def _finish(self, ev: dp.ReplyOwing, pending: Awaitable[object]) -> None:
        try:
            reply = await pending
        except Exception as exc:  # never leave Dovecot without its one reply
            log.exception("lookup failed")
            reply = _internal_error(exc)
        self._resume(ev, reply)

    def _write(self, chunks: list[bytes]) -> None:
        if chunks and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(chunks))


def _internal_error(exc: BaseException) -> dp.Failure:
    """The failure owed for ``exc``, its text clipped: it may quote a client's 1 MiB value."""
    return dp.Failure(f"internal error: {clip(exc)}")


#: What the commit handler returns when the reply comes later, from the group commit.
GROUPED = object()


def _own_failure(ev: dp.Refusal) -> None:
    """No reply of our own: ``send(refusal)`` answers a refusal with its own failure."""
    return None


def _log_problems(conn: dp.DictConnection) -> None:
    while conn.problems:
        log.warning("%s", clip(conn.problems.popleft()))


class ServerStats:
    """Counters the metrics endpoint and the tests read."""

    __slots__ = (
        "connections",
        "open_connections",
        "lookups",
        "iterations",
        "commits",
        "refusals",
        "accept_pauses",
        "connections_by_version",
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

    def count_version(self, version: dp.ProtocolVersion) -> None:
        """A connection's first H line: which Dovecot release it speaks for."""
        by_version = self.connections_by_version
        by_version[version.dovecot] = by_version.get(version.dovecot, 0) + 1

    def __init__(self) -> None:
        self.connections = 0
        self.open_connections = 0
        self.lookups = 0
        self.iterations = 0
        self.commits = 0
        self.refusals = 0
        self.accept_pauses = 0  # episodes of accept() failing at the fd limit
        # Dovecot release ("2.3", "2.4") -> connections that said hello as it
        self.connections_by_version: dict[str, int] = {v.dovecot: 0 for v in dp.VERSIONS}


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
) -> tuple[GuardedServer, ServerStats]:
    """Serve ``backend`` on an already bound listening socket (bound here or by systemd).

    Closing the server leaves the socket's path alone: the path belongs to whoever bound
    the socket.  A socket systemd passed in must outlive this process (the ``.socket``
    unit hands it to the next start); one we bound ourselves the caller unlinks at exit.
    Accepting goes through :class:`~chatmail_common.acceptguard.GuardedServer`, which
    pauses for a moment at the fd limit instead of logging a traceback storm.
    """
    stats = stats or ServerStats()
    sock.listen(LISTEN_BACKLOG)  # also a socket systemd passed in, as asyncio's server did
    loop = asyncio.get_running_loop()
    group = GroupCommitter(backend.commit_many, loop)

    def paused() -> None:
        stats.accept_pauses += 1

    def serve(conn: socket.socket) -> None:
        SocketConnection.serve(loop, conn, DictProtocol(backend, max_line, stats, group))

    server = GuardedServer([sock], on_pause=paused, on_socket=serve)
    server.start()
    return server, stats
