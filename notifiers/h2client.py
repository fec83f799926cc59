"""A small asyncio HTTP/2-over-TLS client built on ``h2``, for exactly what APNs needs.

Why not httpx: with ``http2=True`` the push proxy was CPU-bound at about 1,100
notifications/s on one core against a fake APNs on loopback, and a py-spy
profile put ~76% of the proxy's CPU inside httpx/httpcore's HTTP/2 client
(per-stream locks and events, one TLS write per frame).  This client keeps the
protocol work in ``h2`` (a sans-I/O state machine) and makes the I/O cheap:

* one multiplexed connection per origin, connected lazily (ALPN ``h2``
  required), shared by all concurrent requests;
* a request is a future resolved from the protocol callback, no per-stream
  locks or tasks;
* outgoing frames are accumulated in h2 and written with one TLS write per
  event-loop iteration, however many streams produced them;
* at most the server's ``MAX_CONCURRENT_STREAMS`` streams (and
  ``max_streams_cap``) are open; further requests wait for a free stream,
  bounded by their timeout;
* flow control both ways: received data is acknowledged, bodies larger than
  the send window wait for ``WINDOW_UPDATE``;
* GOAWAY: the connection takes no new streams and drains the ones the server
  promised to finish; streams above ``last_stream_id`` (never processed) are
  repeated once on a new connection, as is a request whose connection died;
* a lost connection fails its pending streams with :class:`ConnectionLost`;
  the next request reconnects.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from dataclasses import dataclass
from urllib.parse import urlsplit

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
from hpack import NeverIndexedHeaderTuple

from chatmail_common.tls import Verify, make_ssl_context

from .hpackmemo import MemoDecoder, MemoEncoder

log = logging.getLogger(__name__)

#: Longest wait for TCP, TLS and the server's first SETTINGS frame.
CONNECT_TIMEOUT = 10.0
#: Headers kept out of the HPACK compression context (h2's own rule, RFC 7541 section 7.1.3).
SECRET_HEADERS = frozenset({"authorization", "proxy-authorization"})
#: After a request timed out, how long a PING may go unanswered before the
#: connection counts as dead.
PING_TIMEOUT = 5.0
#: Streams opened between two of h2's walks over its stream table (see
#: ``_DrainingH2Connection.open_outbound_streams``).
SWEEP_BATCH = 64


class H2Error(Exception):
    """Base class: the request got no HTTP answer."""


class ConnectError(H2Error):
    """TCP connect, TLS handshake or ALPN negotiation of ``h2`` failed."""


class ConnectionLost(H2Error):
    """The connection died (or was closed) while the request was pending."""


class StreamRefused(H2Error):
    """The server did not process the stream (GOAWAY above it, REFUSED_STREAM)."""


class StreamReset(H2Error):
    """The server reset the stream with an error code."""


@dataclass(frozen=True, slots=True)
class H2Response:
    """A complete response: ``headers`` are the regular ones, names lower-case."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (lower-case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


class _DrainingH2Connection(h2.connection.H2Connection):
    """An ``H2Connection`` that keeps receiving after a GOAWAY.

    h2 moves its connection state machine to CLOSED on a received GOAWAY and
    then rejects the answers to the streams the server promised to finish
    (python-hyper/h2#1181), although RFC 9113 section 6.8 lets them complete.
    This restores the previous state; the client itself never opens a stream
    on a connection after its GOAWAY.
    """

    def _receive_goaway_frame(self, frame):  # type: ignore[no-untyped-def]
        state = self.state_machine.state
        frames, events = super()._receive_goaway_frame(frame)
        self.state_machine.state = state
        return frames, events

    _sweep_at = SWEEP_BATCH

    @property
    def open_outbound_streams(self) -> int:
        """The open outbound streams, or an upper bound that is below the peer's limit.

        h2 asks this in every ``send_headers`` to refuse a stream past the peer's
        ``MAX_CONCURRENT_STREAMS``, and answers by walking every stream it holds
        (and dropping the closed ones): with 64 pushes in flight that walk was a
        tenth of the proxy's CPU per push.  ``len(self.streams)`` counts the open
        streams and the closed ones not yet dropped, so while it is below the limit
        the check passes exactly as with the true count; h2's walk runs once
        ``SWEEP_BATCH`` more streams have been opened since the last one (dropping
        the closed streams, so the table stays bounded) or near the limit.
        """
        held = len(self.streams)
        if held < self._sweep_at and held + 1 < self.remote_settings.max_concurrent_streams:
            return held
        count = super().open_outbound_streams
        self._sweep_at = len(self.streams) + SWEEP_BATCH
        return count


class _Stream:
    """One request in flight: its future and what has arrived so far."""

    __slots__ = ("future", "status", "headers", "body", "unsent")

    def __init__(self, future: asyncio.Future[H2Response]) -> None:
        self.future = future
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.body: bytes | bytearray = b""  # the first DATA frame's bytes, then a bytearray
        self.unsent: bytes | memoryview = b""  # body bytes waiting for flow-control window


class _Connection(asyncio.Protocol):
    """One HTTP/2 connection: the h2 state machine plus its transport callbacks."""

    def __init__(self, authority: str, max_streams_cap: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._authority = authority
        self._cap = max_streams_cap
        # Outbound validation and normalisation re-checked and rewrote every header of
        # every request (a fifth of the proxy's CPU per push); the callers send fixed
        # lower-case names and grammar-checked values, and the one rule of h2's
        # normalisation that matters (credentials are never indexed) is kept in request().
        # Received headers stay bytes (h2 still validates them): _on_headers decodes the
        # ones kept, in one loop instead of h2's generator per header.
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self._h2 = _DrainingH2Connection(config=config)
        self._h2.encoder = MemoEncoder()  # before any header is encoded
        self._h2.decoder = MemoDecoder.replacing(self._h2.decoder)  # and decoded
        self._transport: asyncio.Transport | None = None
        self._streams: dict[int, _Stream] = {}
        self._blocked: set[int] = set()  # streams with body bytes waiting for window
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._flush_scheduled = False
        self._prefixes: dict[str, tuple[tuple[str, str], ...]] = {}
        self.ready: asyncio.Future[None] = self._loop.create_future()
        self.goaway = False
        self.closed = False
        self._ping: asyncio.TimerHandle | None = None  # a liveness PING awaiting its ACK
        # (deadline, stream id) of requests given a deadline, in sending order with
        # deadlines that never decrease; one timer, for the first, expires them all.
        self._deadlines: collections.deque[tuple[float, int]] = collections.deque()
        self._deadline_timer: asyncio.TimerHandle | None = None

    # -- state -------------------------------------------------------------

    @property
    def accepting(self) -> bool:
        """True while new streams may be opened here."""
        return not (self.goaway or self.closed)

    def _pseudo_headers(self, method: str) -> tuple[tuple[str, str], ...]:
        """``:method``, ``:scheme`` and ``:authority`` of a request, built once per method."""
        prefix = self._prefixes.get(method)
        if prefix is None:
            prefix = ((":method", method), (":scheme", "https"), (":authority", self._authority))
            if len(self._prefixes) < 8:  # callers use one or two methods
                self._prefixes[method] = prefix
        return prefix

    def _free_streams(self) -> int:
        limit = min(self._cap, self._h2.remote_settings.max_concurrent_streams)
        return limit - len(self._streams)

    # -- requests ----------------------------------------------------------

    def takes_deadline(self, deadline: float) -> bool:
        """Whether :meth:`request` with ``deadline`` opens a stream at once and keeps the
        deadline itself (no waiting, and no deadline before one already queued)."""
        return (
            self.accepting
            and self._free_streams() > 0
            and (not self._deadlines or self._deadlines[-1][0] <= deadline)
        )

    async def request(
        self,
        method: str,
        path: str,
        headers: list[tuple[str, str]],
        body: bytes,
        deadline: float | None = None,
    ) -> H2Response:
        """Send one request on a free stream and wait for the whole response.

        ``deadline`` (loop time; only when :meth:`takes_deadline`): past it the
        stream is reset and TimeoutError raised, by this connection's one deadline
        timer instead of a timer and a task cancellation per request.
        """
        if not (self.accepting and self._free_streams() > 0):
            await self._acquire_stream()
        try:
            stream_id = self._h2.get_next_available_stream_id()
        except h2.exceptions.NoAvailableStreamIDError as exc:
            # 2**30 requests on this connection: retire it (it drains), retry on a new one.
            self.goaway = True
            if not self._streams:
                self.close()
            raise StreamRefused("stream ids exhausted on this connection") from exc
        future: asyncio.Future[H2Response] = self._loop.create_future()
        stream = _Stream(future)
        request_headers = [
            *self._pseudo_headers(method),
            # Never indexed: a path is one device's (not for the compression context),
            # and unique paths filled HPACK's dynamic table, whose linear search per
            # header then cost more than the rest of the request.
            NeverIndexedHeaderTuple(":path", path),
            *[
                NeverIndexedHeaderTuple(name, value) if name in SECRET_HEADERS else (name, value)
                for name, value in headers
            ],
            ("content-length", str(len(body))),
        ]
        h2conn = self._h2
        try:
            h2conn.send_headers(stream_id, request_headers, end_stream=not body)
        except h2.exceptions.ProtocolError as exc:  # e.g. TooManyStreamsError: nothing sent
            raise StreamRefused(f"cannot open a stream: {exc!r}") from exc
        self._streams[stream_id] = stream
        if deadline is not None:
            self._deadlines.append((deadline, stream_id))
            if self._deadline_timer is None:
                self._deadline_timer = self._loop.call_at(deadline, self._expire)
        if body:
            size = len(body)
            if size <= h2conn.max_outbound_frame_size and size <= h2conn.local_flow_control_window(
                stream_id
            ):
                # The usual case (a push payload): the whole body in one DATA frame, without
                # the chunking loop and its copies.
                h2conn.send_data(stream_id, body, end_stream=True)
            else:
                stream.unsent = memoryview(body)
                self._send_body(stream_id, stream)
        self._schedule_flush()
        try:
            return await future
        except asyncio.CancelledError:
            self._cancel_stream(stream_id)
            self.check_alive()
            raise

    def check_alive(self, timeout: float | None = None) -> None:
        """Send a PING; without its ACK in ``timeout`` s the connection is dropped.

        Called when a request timed out: a peer or NAT that silently lost the
        connection would otherwise keep every push timing out until TCP gives up
        (about 15 minutes), since nothing else tells a dead connection from a slow one.
        """
        if self.closed or self._ping is not None:
            return
        try:
            self._h2.ping(b"chatmail")
        except h2.exceptions.H2Error:
            return
        self._schedule_flush()
        self._ping = self._loop.call_later(
            PING_TIMEOUT if timeout is None else timeout, self._ping_timed_out
        )

    def _expire(self) -> None:
        """Time out the requests whose deadline passed; re-arm for the next one."""
        self._deadline_timer = None
        now = self._loop.time()
        deadlines = self._deadlines
        while deadlines:
            deadline, stream_id = deadlines[0]
            if stream_id not in self._streams:
                deadlines.popleft()  # answered (or failed) in time
            elif deadline <= now:
                deadlines.popleft()
                future = self._streams[stream_id].future
                self._cancel_stream(stream_id)
                if not future.done():
                    future.set_exception(TimeoutError())
                self.check_alive()
            else:
                self._deadline_timer = self._loop.call_at(deadline, self._expire)
                return

    def _ping_timed_out(self) -> None:
        self._ping = None
        log.warning("no PING ACK from %s: dropping the connection", self._authority)
        self._lose(ConnectionLost("no PING ACK"))

    async def _acquire_stream(self) -> None:
        """Wait until a stream may be opened; StreamRefused once this connection takes none."""
        while True:
            if not self.accepting:
                raise StreamRefused("connection is closing")
            if self._free_streams() > 0:
                return
            waiter: asyncio.Future[None] = self._loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake_waiters(1)  # pass the wake-up on
                raise

    def _wake_waiters(self, count: int) -> None:
        while count > 0 and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                count -= 1

    def _wake_all_waiters(self) -> None:
        self._wake_waiters(len(self._waiters))

    def _send_body(self, stream_id: int, stream: _Stream) -> None:
        """Send as much of the body as the flow-control windows allow."""
        h2conn = self._h2
        data = stream.unsent
        while data:
            size = min(h2conn.local_flow_control_window(stream_id), h2conn.max_outbound_frame_size)
            if size <= 0:
                break
            chunk, data = data[:size], data[size:]
            h2conn.send_data(stream_id, bytes(chunk), end_stream=not data)
        stream.unsent = data
        if data:
            self._blocked.add(stream_id)
        else:
            self._blocked.discard(stream_id)

    def _cancel_stream(self, stream_id: int) -> None:
        """The caller gave up (timeout): reset the stream and free its slot."""
        if self._streams.pop(stream_id, None) is None:
            return
        self._blocked.discard(stream_id)
        if not self.closed:
            self._reset(stream_id)
        self._stream_done()

    def _reset(self, stream_id: int) -> None:
        try:
            self._h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        except h2.exceptions.H2Error:
            return  # already closed on the h2 side
        self._schedule_flush()

    def _stream_done(self) -> None:
        deadlines = self._deadlines
        while deadlines and deadlines[0][1] not in self._streams:
            deadlines.popleft()  # keep the queue as short as the requests in flight
        self._wake_waiters(1)
        if self.goaway and not self._streams and not self.closed:
            self.close()  # drained

    def _finish(self, stream_id: int, error: H2Error | None = None) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            return
        if stream.unsent:  # (only such streams are in _blocked)
            self._blocked.discard(stream_id)
            if not self.closed:
                self._reset(stream_id)  # answered before the body was sent: stop sending
        if not stream.future.done():
            if error is not None:
                stream.future.set_exception(error)
            else:
                response = H2Response(stream.status, stream.headers, bytes(stream.body))
                stream.future.set_result(response)
        self._stream_done()

    # -- output batching ---------------------------------------------------

    def _schedule_flush(self) -> None:
        """Write h2's pending bytes once, at the next loop iteration (one TLS write per batch)."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        data = self._h2.data_to_send()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    # -- asyncio.Protocol --------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        ssl_object = transport.get_extra_info("ssl_object")
        alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        if alpn != "h2":
            self._fail_ready(ConnectError(f"server did not negotiate h2 (ALPN {alpn!r})"))
            transport.close()
            return
        self._h2.initiate_connection()
        self._flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            log.warning("HTTP/2 protocol error from %s: %s", self._authority, exc)
            self._flush()  # h2 queued a GOAWAY
            self._lose(ConnectionLost(f"HTTP/2 protocol error: {exc}"))
            return
        for event in events:
            self._handle(event)
        self._schedule_flush()

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f"connection lost: {exc}" if exc else "connection closed by the server"
        self._lose(ConnectionLost(reason))

    # -- events ------------------------------------------------------------

    def _handle(self, event: h2.events.Event) -> None:
        # Ordered by frequency: every answer is a ResponseReceived and a StreamEnded.
        if isinstance(event, h2.events.ResponseReceived):
            stream = self._streams.get(event.stream_id)  # type: ignore[arg-type]
            if stream is not None:
                self._on_headers(stream, event.headers)  # type: ignore[arg-type]
        elif isinstance(event, h2.events.StreamEnded):
            self._finish(event.stream_id)  # type: ignore[arg-type]
        elif isinstance(event, h2.events.DataReceived):
            self._on_data(event)
        elif isinstance(event, h2.events.StreamReset):
            self._on_reset(event)
        elif isinstance(event, h2.events.WindowUpdated):
            self._on_window_update()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            if not self.ready.done():
                self.ready.set_result(None)
            self._wake_all_waiters()  # MAX_CONCURRENT_STREAMS may have grown
            self._on_window_update()  # so may INITIAL_WINDOW_SIZE (no WindowUpdated then)
        elif isinstance(event, h2.events.PingAckReceived):
            if self._ping is not None:
                self._ping.cancel()
                self._ping = None
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._on_goaway(event)

    def _on_headers(self, stream: _Stream, headers: list[tuple[bytes, bytes]]) -> None:
        for name, value in headers:
            if name == b":status":
                stream.status = int(value)
            elif not name.startswith(b":"):
                stream.headers.append((name.decode("utf-8"), value.decode("utf-8")))

    def _on_data(self, event: h2.events.DataReceived) -> None:
        stream_id: int = event.stream_id  # type: ignore[assignment]
        stream = self._streams.get(stream_id)
        if stream is not None:
            if not stream.body:
                stream.body = event.data  # type: ignore[assignment]  # one frame: no copy
            else:
                if not isinstance(stream.body, bytearray):
                    stream.body = bytearray(stream.body)
                stream.body += event.data  # type: ignore[operator]
        # Always give the window back, also for streams we no longer track.
        self._h2.acknowledge_received_data(event.flow_controlled_length, stream_id)  # type: ignore[arg-type]

    def _on_reset(self, event: h2.events.StreamReset) -> None:
        code = event.error_code
        if code == h2.errors.ErrorCodes.REFUSED_STREAM:
            error: H2Error = StreamRefused("stream refused by the server")
        else:
            error = StreamReset(f"stream reset by the server: {code!r}")
        self._finish(event.stream_id, error)  # type: ignore[arg-type]

    def _on_window_update(self) -> None:
        for stream_id in list(self._blocked):
            stream = self._streams.get(stream_id)
            if stream is not None:
                self._send_body(stream_id, stream)

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> None:
        """Take no new streams; refuse those above ``last_stream_id``; drain the rest."""
        last: int = event.last_stream_id or 0  # type: ignore[assignment]
        log.info(
            "GOAWAY from %s (%r, last stream %d, %d streams open)",
            self._authority,
            event.error_code,
            last,
            len(self._streams),
        )
        self.goaway = True
        self._fail_ready(ConnectError("GOAWAY during connection setup"))
        for stream_id in [s for s in self._streams if s > last]:
            self._finish(stream_id, StreamRefused(f"GOAWAY: stream {stream_id} > {last}"))
        self._wake_all_waiters()
        if not self._streams:
            self.close()

    # -- shutdown ----------------------------------------------------------

    def _fail_ready(self, error: H2Error) -> None:
        if not self.ready.done():
            self.ready.set_exception(error)
            self.ready.exception()  # retrieved: nobody may be waiting any more

    def _lose(self, error: H2Error) -> None:
        """Fail every pending stream and waiter; the connection is unusable."""
        self.closed = True
        if self._ping is not None:
            self._ping.cancel()
            self._ping = None
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        self._fail_ready(ConnectError(str(error)))
        for stream_id in list(self._streams):
            self._finish(stream_id, error)
        self._wake_all_waiters()
        if self._transport is not None:
            self._transport.close()

    def close(self) -> None:
        """Say GOAWAY (best effort) and close the transport; pending streams fail."""
        if self.closed:
            return
        if self._transport is not None and not self._transport.is_closing():
            with contextlib.suppress(h2.exceptions.H2Error):
                self._h2.close_connection()
            self._flush()
        self._lose(ConnectionLost("connection closed by the client"))


class H2Client:
    """HTTP/2 client for one ``https://host[:port]`` origin over one multiplexed connection.

    ``ssl_context`` carries the client certificate if any; ``verify`` semantics
    as the providers take them are accepted too (a CA file path, True for the
    default trust store, False for none).  ALPN ``h2`` is set on the context
    and required from the server.  Nothing touches the event loop before the
    first request.
    """

    def __init__(
        self,
        origin: str,
        ssl_context: Verify,
        *,
        max_streams_cap: int = 1000,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        parts = urlsplit(origin)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"not an https origin: {origin!r}")
        self._host = parts.hostname
        self._port = parts.port or 443
        self._authority = self._host if self._port == 443 else f"{self._host}:{self._port}"
        if ":" in self._host:  # IPv6 literal
            self._authority = f"[{self._host}]" + ("" if self._port == 443 else f":{self._port}")
        self._ssl = make_ssl_context(ssl_context)
        self._ssl.set_alpn_protocols(["h2"])
        self._cap = max_streams_cap
        self._connect_timeout = connect_timeout
        self._current: _Connection | None = None
        self._connecting: asyncio.Task[_Connection] | None = None
        self._connections: set[_Connection] = set()
        self._closed = False

    async def request(
        self,
        method: str,
        path: str,
        headers: list[tuple[str, str]],
        body: bytes,
        timeout: float,
    ) -> H2Response:
        """One request with a total deadline of ``timeout`` seconds (TimeoutError).

        ``headers`` are sent as given (names lower-case, values without surrounding
        whitespace: h2's normalisation is off); ``authorization`` is never indexed.

        Repeated once on a new connection if its stream was refused (never
        processed) or its connection died: a repeat can deliver a push twice,
        which the APNs collapse id and the proxy's debouncing make harmless,
        whereas failing it would delay the wake-up by the relay's retry interval.
        """
        deadline = asyncio.get_running_loop().time() + timeout
        connection = self._current
        if connection is not None and not self._closed and connection.takes_deadline(deadline):
            # The usual case: a free stream now, so the connection keeps the deadline
            # (an asyncio.timeout per request was a tenth of the proxy's CPU per push).
            try:
                return await connection.request(method, path, headers, body, deadline)
            except (StreamRefused, ConnectionLost) as exc:
                log.debug("repeating %s request after %s", method, type(exc).__name__)
                async with asyncio.timeout_at(deadline):
                    return await self._attempt(method, path, headers, body)
        async with asyncio.timeout_at(deadline):
            try:
                return await self._attempt(method, path, headers, body)
            except (StreamRefused, ConnectionLost) as exc:
                # (the path holds the device token: not logged)
                log.debug("repeating %s request after %s", method, type(exc).__name__)
                return await self._attempt(method, path, headers, body)

    async def _attempt(
        self, method: str, path: str, headers: list[tuple[str, str]], body: bytes
    ) -> H2Response:
        connection = self._current
        if connection is None or not connection.accepting or self._closed:
            connection = await self._connection()
        return await connection.request(method, path, headers, body)

    async def _connection(self) -> _Connection:
        """The connection taking new streams, connecting (once, shared) if there is none."""
        if self._closed:
            raise ConnectionLost("client closed")
        current = self._current
        if current is not None and current.accepting:
            return current
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
            self._connecting.add_done_callback(self._connect_done)
        return await asyncio.shield(self._connecting)

    def _connect_done(self, task: asyncio.Task[_Connection]) -> None:
        self._connecting = None
        if not task.cancelled() and task.exception() is None:
            self._current = task.result()

    async def _connect(self) -> _Connection:
        """TCP + TLS + the server's SETTINGS, within ``connect_timeout``.

        Every request waits on this one shared attempt, so it must end: a server
        that completes TLS but never sends SETTINGS would otherwise stall all
        pushes to this origin until the peer closed the socket.
        """
        try:
            async with asyncio.timeout(self._connect_timeout):
                return await self._connect_unbounded()
        except TimeoutError:
            raise ConnectError(
                f"{self._authority}: no HTTP/2 connection within {self._connect_timeout:g} s"
            ) from None

    async def _connect_unbounded(self) -> _Connection:
        loop = asyncio.get_running_loop()
        connection = _Connection(self._authority, self._cap)
        try:
            await loop.create_connection(
                lambda: connection,
                self._host,
                self._port,
                ssl=self._ssl,
                server_hostname=self._host,
            )
        except OSError as exc:  # includes ssl.SSLError and refused/unreachable
            raise ConnectError(f"{self._authority}: {exc}") from exc
        self._connections.add(connection)
        try:
            await connection.ready  # the server's SETTINGS: stream limit known
        except BaseException:
            self._connections.discard(connection)
            connection.close()
            raise
        if self._closed:
            connection.close()
            raise ConnectionLost("client closed")
        self._prune()
        return connection

    def _prune(self) -> None:
        self._connections = {c for c in self._connections if not c.closed}

    async def aclose(self) -> None:
        """Close every connection; pending requests fail with ConnectionLost."""
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        for connection in list(self._connections):
            connection.close()
        self._connections.clear()
        self._current = None
