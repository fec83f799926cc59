"""A dict connection's socket on the event loop, without an asyncio transport.

Dovecot 2.3 opens a dict connection per IMAP command by default, so what a
connection costs to set up and tear down is paid on every command.  An asyncio
``_SelectorSocketTransport`` schedules ``connection_made`` and its ``add_reader``
through ``call_soon``, keeps a weak reference in the loop's transport table and
schedules ``connection_lost`` again; without it a short connection (hello, one
lookup, close) cost ~20 us less CPU in one process measuring both ends, and a Delta
Chat login's two connections (token commit, six lookups) ~70 us less (~640 -> ~570 us,
client included).  :class:`SocketConnection` does only what the dict server needs: one
``add_reader`` on the accepted socket, ``recv`` straight into the protocol, replies
written with ``send`` at once and only what the kernel did not take buffered and
written from an ``add_writer`` callback.

It offers the protocol the part of ``asyncio.Transport`` that
:class:`chatmaild.dictserver.DictProtocol` uses (``write``, ``is_closing``,
``pause_reading``/``resume_reading``, ``set_write_buffer_limits``, ``close``,
``get_write_buffer_size``) and calls the protocol as a transport would
(``connection_made``, ``data_received``, ``pause_writing``/``resume_writing`` as the
buffer crosses its marks, ``connection_lost`` once), so the protocol and its tests are
the same either way.  Differences from asyncio's transport, on purpose:

- ``connection_made`` and ``connection_lost`` are called directly, not scheduled: the
  connection is accepted and closed from loop callbacks of its own, never from inside
  the protocol, except a write failing (``EPIPE``/``ECONNRESET`` while replying), whose
  ``connection_lost`` is scheduled so the protocol is not re-entered mid-write.
- The first ``recv`` is tried at once after accept: Dovecot writes its hello and
  first command right after ``connect()``, so they are usually there already, and the
  reply leaves without waiting for the next loop iteration.
- End of input closes the connection once what is buffered has been written (as
  asyncio does when ``eof_received`` returns nothing); replies still owed after that
  are dropped, as they were.
- On the stock selector loop, the reader a connection starts and ends with is
  registered with the loop's selector directly (the same key and ``(reader, writer)``
  handles ``add_reader`` makes, so the loop and its other methods see no difference):
  ``add_reader`` plus ``remove_reader`` cost ~10 us of Python per connection (three
  ``KeyError``s caught on the way), the selector's own register and unregister ~4 us.
"""

from __future__ import annotations

import asyncio
import asyncio.selector_events
import errno
import logging
import selectors
import socket
from typing import Protocol

log = logging.getLogger(__name__)

#: Bytes asked of one ``recv``: under glibc's mmap threshold (a 256 KiB buffer, asyncio's
#: size, is an mmap and munmap per read until the threshold adapts); a longer line
#: simply takes more reads.
RECV_BYTES = 64 * 1024

#: ``send``/``recv`` errors that mean the peer went away: closed quietly, no traceback.
PEER_GONE_ERRNOS = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ECONNABORTED})


class TransportUser(Protocol):
    """What :class:`SocketConnection` calls on its protocol (as an asyncio transport would)."""

    def connection_made(self, transport: SocketConnection) -> None: ...
    def data_received(self, data: bytes) -> None: ...
    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...
    def connection_lost(self, exc: Exception | None) -> None: ...


class SocketConnection:
    """One accepted, non-blocking stream socket served by ``protocol`` (see the module doc)."""

    __slots__ = (
        "_loop",
        "_selector",
        "_sock",
        "_fd",
        "_protocol",
        "_out",
        "_reading",
        "_writing",
        "_closing",
        "_lost",
        "_high",
        "_low",
        "_protocol_paused",
    )

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, protocol: TransportUser
    ) -> None:
        self._loop = loop
        self._selector = _loop_selector(loop)
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        self._out = bytearray()  # what the kernel has not taken yet
        self._reading = False
        self._writing = False  # an add_writer callback is registered
        self._closing = False
        self._lost = False  # connection_lost called (or scheduled)
        self._high = 64 * 1024  # asyncio's defaults until the protocol sets its own
        self._low = 16 * 1024
        self._protocol_paused = False

    @classmethod
    def serve(
        cls, loop: asyncio.AbstractEventLoop, sock: socket.socket, protocol: TransportUser
    ) -> SocketConnection:
        """Start serving ``sock`` (blocking or not) with ``protocol``; reads what is there."""
        sock.setblocking(False)
        conn = cls(loop, sock, protocol)
        protocol.connection_made(conn)
        conn._reading = True
        conn._on_readable()  # usually the hello and first command are already there
        if conn._reading:
            selector = conn._selector
            if selector is None or conn._writing:
                loop.add_reader(conn._fd, conn._on_readable)
            else:  # what add_reader does for an fd not yet registered (see the module doc)
                reader = asyncio.Handle(conn._on_readable, (), loop, None)
                selector.register(conn._fd, selectors.EVENT_READ, (reader, None))
        return conn

    # -- the transport interface the protocol uses ------------------------------
    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = 64 * 1024 if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        self._check_high_water()

    def get_write_buffer_size(self) -> int:
        return len(self._out)

    def is_closing(self) -> bool:
        return self._closing

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self._sock if name == "socket" else default

    def write(self, data: bytes) -> None:
        if self._closing or not data:
            return
        if not self._out:
            try:
                sent = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._fail(exc)
                return
            if sent == len(data):
                return
            data = memoryview(data)[sent:]  # type: ignore[assignment]
            self._loop.add_writer(self._fd, self._on_writable)
            self._writing = True
        self._out += data
        self._check_high_water()

    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            selector = self._selector
            if selector is None or self._writing:
                self._loop.remove_reader(self._fd)
            else:  # what remove_reader does when no writer is registered
                try:
                    key = selector.unregister(self._fd)
                except KeyError:  # closed in serve()'s first read: never registered
                    return
                key.data[0].cancel()

    def resume_reading(self) -> None:
        if not self._reading and not self._closing:
            self._reading = True
            self._loop.add_reader(self._fd, self._on_readable)

    def close(self) -> None:
        """Stop reading; close once what is buffered has been written."""
        if self._closing:
            return
        self._closing = True
        self.pause_reading()
        if not self._out:
            self._finish(None)

    def abort(self) -> None:
        """Close now, dropping what is buffered."""
        self._drop()
        self._finish(None)

    # -- loop callbacks -------------------------------------------------------
    def _on_readable(self) -> None:
        try:
            data = self._sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._gone(exc)
            return
        if not data:
            self.close()
            return
        try:
            self._protocol.data_received(data)
        except Exception as exc:  # a bug in the protocol: this connection only
            log.exception("dict connection failed; closing it")
            self._gone(exc)

    def _on_writable(self) -> None:
        out = self._out
        try:
            sent = self._sock.send(out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._gone(exc)
            return
        del out[:sent]
        if not out:
            self._loop.remove_writer(self._fd)
            self._writing = False
        if self._protocol_paused and len(out) <= self._low:
            self._protocol_paused = False
            self._protocol.resume_writing()
        if not out and self._closing:
            self._finish(None)

    # -- internals ------------------------------------------------------------
    def _check_high_water(self) -> None:
        if not self._protocol_paused and len(self._out) > self._high:
            self._protocol_paused = True
            self._protocol.pause_writing()

    def _gone(self, exc: Exception) -> None:
        """The peer went away (or the protocol broke) in a loop callback of ours."""
        if isinstance(exc, OSError):
            _log_unless_peer_gone(exc)
        self._drop()
        self._finish(exc)

    def _fail(self, exc: OSError) -> None:
        """A write failed inside the protocol's own call: close, tell it afterwards."""
        _log_unless_peer_gone(exc)
        self._drop()
        self._release()
        if not self._lost:
            self._lost = True
            self._loop.call_soon(self._protocol.connection_lost, exc)

    def _drop(self) -> None:
        """Closing from now on: no more reading, and what is buffered will not be sent."""
        self._closing = True
        self.pause_reading()
        self._out.clear()

    def _release(self) -> None:
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)
        if self._fd >= 0:
            self._fd = -1
            self._sock.close()

    def _finish(self, exc: Exception | None) -> None:
        self._release()
        if not self._lost:
            self._lost = True
            self._protocol.connection_lost(exc)


def _loop_selector(loop: asyncio.AbstractEventLoop) -> selectors.BaseSelector | None:
    """The stock selector loop's selector (not public API), None on any other loop."""
    if isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop):
        return getattr(loop, "_selector", None)
    return None


def _log_unless_peer_gone(exc: OSError) -> None:
    """A peer that went away is routine (Dovecot killed, a client reset); anything else
    is one warning line."""
    if exc.errno not in PEER_GONE_ERRNOS:
        log.warning("dict connection failed: %s", exc)
