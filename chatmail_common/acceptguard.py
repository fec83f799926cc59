"""Accept connections without an error storm when descriptors run out.

Why not asyncio's own accept loop: at ``EMFILE``/``ENFILE``/``ENOBUFS``/``ENOMEM``
CPython 3.11-3.13 (``selector_events._accept_connection``) logs "socket.accept()
out of system resource" with a traceback, removes the reader and schedules a retry,
but then goes on calling ``accept()`` up to ``backlog`` times in the same tick:
with a backlog of 4096 that is 4096 tracebacks and 4096 scheduled retries per
readiness (measured: 118,729 tracebacks, 54 MB of log and most of a core in 12 s).

:class:`GuardedServer` serves listening sockets with ``add_reader`` and
``connect_accepted_socket`` (on the stock selector loop, the transport constructor that
API wraps: see :func:`_transport_maker`), so it behaves the same on every Python from
3.11 on.  A server that needs no asyncio transport (the dict server: its connections
are cheaper without one, :mod:`chatmaild.sockconn`) passes ``on_socket`` instead of a
protocol factory and is handed each accepted socket.  When ``accept()`` fails for want
of a resource it stops reading that socket for :data:`PAUSE_SECONDS` and tries again;
the connections waiting meanwhile stay in the kernel's backlog.  An episode is one
warning when it starts (naming the errno, the soft ``RLIMIT_NOFILE`` and the
descriptors open) and one info line once accepting has worked for
:data:`EPISODE_QUIET_SECONDS` (how long it failed, how many attempts failed);
``on_pause`` is called once per episode, for a metrics counter.
"""

from __future__ import annotations

import asyncio
import asyncio.selector_events
import errno
import logging
import os
import resource
import socket
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

#: accept() errors that mean "no resource now", not "this connection is bad".
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: How long accepting pauses after such an error: short, so a lookup waits little
#: once descriptors are free, long enough that a process at its limit does not spin.
PAUSE_SECONDS = 0.1
#: The first retry after accepts worked again since the last failure (``_Episode.failed``).
QUICK_RETRY_SECONDS = 0.001
#: An episode ends once accepting has worked this long without a resource failure:
#: a process hovering at its limit (connections closing and opening) is one episode,
#: not a warning every time one descriptor comes free.
EPISODE_QUIET_SECONDS = 2.0
#: Connections accepted per readiness at most (the rest at the next loop iteration),
#: so a burst of connections cannot starve the connections already open.  Accepting
#: until ``EAGAIN`` costs a failing ``accept()`` per readiness (~7 us: the kernel
#: allocates a socket and a file before it looks at the queue), but one accept per
#: readiness was measured worse: Dovecot 2.3's per-command connections, accepted one
#: per loop iteration, no longer had their commits in one group commit (dict CPU per
#: IMAP pair +40-80 us, 32 sessions).
ACCEPT_BATCH = 128


def _open_descriptors() -> str:
    """How many descriptors this process has open, as text ("all" when none is free)."""
    try:
        return str(len(os.listdir("/proc/self/fd")) - 1)  # minus listdir's own
    except OSError as exc:
        return "all" if exc.errno == errno.EMFILE else "?"


def describe_resource_error(exc: OSError) -> str:
    """One line: which limit ``exc`` hit, with the figures an operator compares."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return (
        f"{os.strerror(exc.errno or 0)} ({name}); RLIMIT_NOFILE soft limit {soft},"
        f" descriptors open: {_open_descriptors()}"
    )


def _socket_name(sock: socket.socket) -> str:
    try:
        name = sock.getsockname()
    except OSError:
        return f"fd {sock.fileno()}"
    if isinstance(name, tuple):
        host, port = name[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(name) or "an unnamed socket"


class _Episode:
    """A run of resource failures on one listening socket."""

    def __init__(self) -> None:
        self.started = self.last_failure = time.monotonic()
        self.failures = 1
        self.accepted = 0  # since the last failure
        self.delay = PAUSE_SECONDS  # until the next retry
        self.end_timer: asyncio.TimerHandle | None = None  # armed while accepting works

    def failed(self) -> None:
        """Another failure: retry soon if accepts worked since the last one (descriptors
        are coming free: a backlog of clients that gave up drains as fast as their
        connections close), else back off (doubling) to the full pause: never a spin."""
        self.delay = QUICK_RETRY_SECONDS if self.accepted else min(self.delay * 2, PAUSE_SECONDS)
        self.failures += 1
        self.accepted = 0
        self.last_failure = time.monotonic()
        if self.end_timer is not None:
            self.end_timer.cancel()
            self.end_timer = None


def _transport_maker(
    loop: asyncio.AbstractEventLoop,
) -> Callable[..., object] | None:
    """The selector loop's transport constructor, or None on any other loop.

    ``connect_accepted_socket`` costs a task, a waiter future and four more loop
    callbacks per connection on top of what the transport itself schedules; the
    constructor asyncio's own accept loop calls does the same setup without them.  It
    is not public API, so it is used only on the stock selector loop (3.11-3.13 share
    its signature) and everything else takes the public path.
    """
    if not isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop):
        return None
    return getattr(loop, "_make_socket_transport", None)


class GuardedServer:
    """Serve ``protocol_factory`` on already bound listening sockets (see the module doc).

    Offers what callers use of ``asyncio.Server``: ``sockets``, ``close()``,
    ``wait_closed()`` and ``is_serving()``.  The sockets are closed by ``close()``.
    With ``on_socket`` instead of a protocol factory, each accepted socket (still in
    blocking mode) is handed to it and is its own from then on; if it raises, the
    socket is closed.
    """

    def __init__(
        self,
        sockets: list[socket.socket],
        protocol_factory: Callable[[], asyncio.BaseProtocol] | None = None,
        *,
        on_pause: Callable[[], object] | None = None,
        on_socket: Callable[[socket.socket], object] | None = None,
    ) -> None:
        if (protocol_factory is None) == (on_socket is None):
            raise TypeError("GuardedServer needs either protocol_factory or on_socket")
        self.sockets = sockets
        self.protocol_factory = protocol_factory
        self.on_pause = on_pause
        self._on_socket = on_socket
        self._loop = asyncio.get_running_loop()
        self._episodes: dict[int, _Episode] = {}  # by socket fd
        self._retries: dict[int, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task] = set()
        self._serving = False
        self._make_transport = _transport_maker(self._loop)

    def start(self) -> None:
        for sock in self.sockets:
            sock.setblocking(False)
            self._loop.add_reader(sock.fileno(), self._accept, sock)
        self._serving = True

    def is_serving(self) -> bool:
        return self._serving

    def close(self) -> None:
        if not self._serving:
            return
        self._serving = False
        for timer in self._retries.values():
            timer.cancel()
        self._retries.clear()
        for episode in self._episodes.values():
            if episode.end_timer is not None:
                episode.end_timer.cancel()
        self._episodes.clear()
        for sock in self.sockets:
            self._loop.remove_reader(sock.fileno())
            sock.close()

    async def wait_closed(self) -> None:
        """Connections being set up finish (or fail); open connections are the caller's."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- accepting ------------------------------------------------------------
    def _accept(self, sock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, peer = sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return  # nothing (more) waiting
            except OSError as exc:
                if exc.errno in RESOURCE_ERRNOS:
                    self._pause(sock, exc)
                else:  # not this socket's fault and not ours: one line, keep serving
                    log.warning("accept on %s failed: %s", _socket_name(sock), exc)
                return
            self._accepted(sock)
            if self._on_socket is not None:
                try:
                    self._on_socket(conn)
                except Exception as exc:  # refused by the callback: this connection only
                    conn.close()
                    log.debug("connection setup failed: %s", exc)
                continue
            if self._make_transport is not None:
                self._connect_now(conn, peer)
                continue
            task = self._loop.create_task(self._connect(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _connect_now(self, conn: socket.socket, peer: object) -> None:
        """The transport made at once, as the selector loop's own accept does: no task,
        no waiter future, and the peer's address from accept() instead of a
        ``getpeername()`` (Dovecot's default opens a dict connection per IMAP command)."""
        try:
            conn.setblocking(False)
            self._make_transport(  # type: ignore[misc]
                conn, self.protocol_factory(), extra={"peername": peer}
            )
        except Exception as exc:  # the protocol refused it
            conn.close()
            log.debug("connection setup failed: %s", exc)

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self.protocol_factory, conn)
        except Exception as exc:  # the peer went away, or the protocol refused it
            conn.close()
            log.debug("connection setup failed: %s", exc)

    def _pause(self, sock: socket.socket, exc: OSError) -> None:
        fd = sock.fileno()
        self._loop.remove_reader(fd)
        episode = self._episodes.get(fd)
        if episode is None:
            episode = self._episodes[fd] = _Episode()
            if self.on_pause is not None:
                self.on_pause()
            log.warning(
                "accepting paused on %s: %s; retrying within %.1f s",
                _socket_name(sock),
                describe_resource_error(exc),
                PAUSE_SECONDS,
            )
        else:
            episode.failed()
        self._retries[fd] = self._loop.call_later(episode.delay, self._resume, sock)

    def _resume(self, sock: socket.socket) -> None:
        self._retries.pop(sock.fileno(), None)
        if self._serving:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _accepted(self, sock: socket.socket) -> None:
        if not self._episodes:
            return
        episode = self._episodes.get(sock.fileno())
        if episode is None:
            return
        episode.accepted += 1
        if episode.end_timer is None:
            episode.end_timer = self._loop.call_later(EPISODE_QUIET_SECONDS, self._end, sock)

    def _end(self, sock: socket.socket) -> None:
        episode = self._episodes.pop(sock.fileno(), None)
        if episode is None:
            return
        log.info(
            "accepting again on %s: %d accept attempt(s) failed over %.1f s",
            _socket_name(sock),
            episode.failures,
            episode.last_failure - episode.started + PAUSE_SECONDS,
        )


async def bind_tcp(host: str, port: int, backlog: int) -> list[socket.socket]:
    """Listening TCP sockets for every address ``host`` resolves to, as
    ``loop.create_server`` binds them (``SO_REUSEADDR``; IPv6 sockets IPv6-only).

    Raises the resolver's or ``bind()``'s ``OSError`` unchanged (and closes what it bound).
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets
