"""A small HTTP/2-over-TLS server built on ``h2`` and asyncio, run in a thread.

Why not hypercorn: tests need to count TLS connections exactly and to send
GOAWAY or drop a connection on demand, which an ASGI app cannot do.  The
server runs its own event loop in a background thread, so it works from sync
and async tests alike and never shares the test's loop.

Scripting: ``server.script(Reply(...), ...)`` queues replies used in order;
when the queue is empty ``server.default`` answers.  A ``handler`` callable
(request -> Reply | None) runs first and may answer instead (auth checks).

``max_concurrent_streams`` makes the server advertise that limit (a client
opening more streams gets its connection closed); ``peak_streams`` is the
most requests one connection had open at once.  ``goaway_all(keep_open=True)``
is a graceful GOAWAY after which the server still answers the streams it
accepted.  Reply bodies larger than the client's flow-control window are sent
as the window allows.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from notifiers.hpackmemo import MemoDecoder, MemoEncoder


@dataclass
class Request:
    """One request as the server saw it."""

    method: str
    path: str
    headers: list[tuple[str, str]]  # regular headers in wire order, names lower-case
    body: bytes
    http_version: str  # "2" when ALPN negotiated h2
    connection: int  # 1-based number of the TLS connection that carried it
    peer_cert: dict | None = None  # the client certificate (mTLS), as ssl.getpeercert()

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def header_dict(self) -> dict[str, str]:
        return dict(self.headers)


@dataclass
class Reply:
    """A scripted answer.  ``action``: ``goaway`` (answer, then GOAWAY),
    ``refuse`` (GOAWAY that rejects this stream, no answer), ``close`` (drop the
    TCP connection, no answer).  ``delay`` postpones the answer (timeouts)."""

    status: int = 200
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    action: str = ""
    delay: float = 0.0

    @classmethod
    def json(cls, status: int, text: str, **kw) -> Reply:
        return cls(status, text.encode(), [("content-type", "application/json")], **kw)


#: Streams opened between two of h2's walks over its stream table (``_ServerConnection``).
SWEEP_BATCH = 64


class _ServerConnection(h2.connection.H2Connection):
    """An ``H2Connection`` that walks its stream table less often.

    h2 asks ``open_inbound_streams`` for every HEADERS frame received, to refuse a
    stream past our ``MAX_CONCURRENT_STREAMS``, and answers by walking every stream
    it holds (dropping the closed ones): with 64 requests in flight that walk was a
    twentieth of the fake's CPU per request.  ``len(self.streams)`` bounds the open
    count from above, so while it is below the limit the check passes exactly as with
    the true count; the walk runs once ``SWEEP_BATCH`` more streams are held than
    after the last one (keeping the table bounded) or near the limit, where the
    true count decides as before.
    """

    _sweep_at = SWEEP_BATCH

    @property
    def open_inbound_streams(self) -> int:
        held = len(self.streams)
        if held < self._sweep_at and held + 1 < self.local_settings.max_concurrent_streams:
            return held
        count = super().open_inbound_streams
        self._sweep_at = len(self.streams) + SWEEP_BATCH
        return count


class _Protocol(asyncio.Protocol):
    def __init__(self, server: FakeH2Server) -> None:
        self.server = server
        self.streams: dict[int, tuple[list[tuple[bytes, bytes]], bytearray]] = {}
        self.open_streams: set[int] = set()  # received, not yet answered
        self.unsent: dict[int, memoryview] = {}  # reply bodies waiting for window
        # True while data_received handles a batch of events: replies made meanwhile
        # are written once at its end, as real servers coalesce their output (one TLS
        # write per reply made the fake cost more than the client it serves)
        self.batching = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.number = self.server._new_connection(self)
        ssl_object = transport.get_extra_info("ssl_object")
        self.alpn = ssl_object.selected_alpn_protocol() if ssl_object else None
        self.peer_cert = ssl_object.getpeercert() if ssl_object else None
        # Replies are not validated (their headers are the fakes' and the tests' own, and
        # re-checking them per reply cost a fifth of the fake's CPU); requests are, unless
        # the server says otherwise (validate_requests): that is what tells a client that
        # sends malformed headers.  Received headers stay bytes (validated all the
        # same): request_done decodes them in one loop instead of h2's generator per header.
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_outbound_headers=False,
            validate_inbound_headers=self.server.validate_requests,
        )
        self.conn = _ServerConnection(config=config)
        # Replies repeat the same few headers: the proxy's memoizing HPACK encoder (same
        # bytes as hpack's) spares re-encoding them per reply (a fifteenth of the fake's CPU).
        self.conn.encoder = MemoEncoder()
        # Requests repeat the same few headers too: the memoizing decoder (same headers and
        # checks as hpack's) decodes a one-byte indexed field once per table state.
        self.conn.decoder = MemoDecoder.replacing(self.conn.decoder)
        if self.server.max_concurrent_streams is not None:
            self.conn.local_settings = h2.settings.Settings(
                client=False,
                initial_values={
                    h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: (
                        self.server.max_concurrent_streams
                    )
                },
            )
        self.conn.initiate_connection()
        self.flush()

    def flush(self, *, now: bool = False) -> None:
        """Write what h2 has queued (``now``: even in a batch, before dropping the line)."""
        if self.batching and not now:
            return
        data = self.conn.data_to_send()
        if data and not self.transport.is_closing():
            self.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._protocols.discard(self)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.flush()
            self.transport.close()
            return
        self.batching = True
        try:
            self._handle(events)
        finally:
            self.batching = False
        self.flush()

    def _handle(self, events: list[h2.events.Event]) -> None:
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self.streams[event.stream_id] = (list(event.headers), bytearray())
                self.open_streams.add(event.stream_id)
                self.server._note_open_streams(len(self.open_streams))
            elif isinstance(event, h2.events.DataReceived):
                if event.stream_id in self.streams:
                    self.streams[event.stream_id][1].extend(event.data)
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                self.request_done(event.stream_id)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.flush(now=True)
                self.transport.close()
            elif isinstance(event, h2.events.StreamReset):
                self.streams.pop(event.stream_id, None)
                self.open_streams.discard(event.stream_id)
                self.unsent.pop(event.stream_id, None)
            elif isinstance(event, h2.events.WindowUpdated):
                for stream_id in list(self.unsent):
                    self.send_body(stream_id)

    def send_body(self, stream_id: int) -> None:
        """Send as much of a reply body as the client's windows allow."""
        data = self.unsent.pop(stream_id)
        while data:
            window = self.conn.local_flow_control_window(stream_id)
            size = min(window, self.conn.max_outbound_frame_size)
            if size <= 0:
                self.unsent[stream_id] = data
                return
            chunk, data = data[:size], data[size:]
            self.conn.send_data(stream_id, bytes(chunk), end_stream=not data)
        self.flush()

    def request_done(self, stream_id: int) -> None:
        raw_headers, body = self.streams.pop(stream_id)
        pseudo: dict[bytes, bytes] = {}
        headers: list[tuple[str, str]] = []
        for name, value in raw_headers:
            if name[:1] == b":":
                pseudo[name] = value
            else:
                headers.append((name.decode("utf-8"), value.decode("utf-8")))
        request = Request(
            method=pseudo.get(b":method", b"").decode("utf-8"),
            path=pseudo.get(b":path", b"").decode("utf-8"),
            headers=headers,
            body=bytes(body),
            http_version="2" if self.alpn == "h2" else str(self.alpn),
            connection=self.number,
            peer_cert=self.peer_cert,
        )
        reply = self.server._answer(request)
        if reply.action == "close":
            self.flush(now=True)  # the replies made before it still go out
            self.transport.abort()
            return
        if reply.action == "refuse":
            self.conn.close_connection(last_stream_id=max(stream_id - 2, 0))
            self.flush()
            return
        if reply.delay:
            loop = asyncio.get_running_loop()
            loop.call_later(reply.delay, self.respond, stream_id, reply)
        else:
            self.respond(stream_id, reply)

    def respond(self, stream_id: int, reply: Reply) -> None:
        self.open_streams.discard(stream_id)
        if self.transport.is_closing():
            return
        headers = [(":status", str(reply.status)), *reply.headers]
        headers.append(("content-length", str(len(reply.body))))
        try:
            self.conn.send_headers(stream_id, headers, end_stream=not reply.body)
            if reply.body:
                self.unsent[stream_id] = memoryview(reply.body)
                self.send_body(stream_id)
        except h2.exceptions.StreamClosedError:
            return  # the client gave up (timeout) and reset the stream
        if reply.action == "goaway":
            self.conn.close_connection(last_stream_id=stream_id)
        self.flush()


class FakeH2Server:
    """HTTP/2 over TLS on 127.0.0.1, in a background thread.

    ``ssl_context`` is the server context (certificate, optional client-cert
    requirement).  ``url`` is ``https://127.0.0.1:<port>``.  ``requests`` lists
    every :class:`Request`; ``connections`` counts accepted TLS connections.
    """

    #: Check every request's headers as RFC 9113 demands (h2's inbound validation).  A
    #: real server must, so the tests and the benchmark's fake APNs keep it on (a fake
    #: doing less than Apple must would flatter the client it measures).
    validate_requests = True

    def __init__(
        self,
        ssl_context: ssl.SSLContext,
        handler: Callable[[Request], Reply | None] | None = None,
        *,
        max_concurrent_streams: int | None = None,
    ) -> None:
        ssl_context.set_alpn_protocols(["h2"])
        self.max_concurrent_streams = max_concurrent_streams
        self.peak_streams = 0
        self._ssl_context = ssl_context
        self.handler = handler
        self.default = Reply(200)
        self.requests: list[Request] = []
        self.connections = 0
        self._replies: collections.deque[Reply] = collections.deque()
        self._lock = threading.Lock()
        self._protocols: set[_Protocol] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> FakeH2Server:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        self._server = future.result(timeout=10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _listen(self) -> asyncio.base_events.Server:
        return await self._loop.create_server(
            lambda: _Protocol(self), "127.0.0.1", 0, ssl=self._ssl_context
        )

    def stop(self) -> None:
        async def shutdown() -> None:
            self._server.close()
            for protocol in list(self._protocols):
                protocol.transport.abort()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> FakeH2Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- scripting -----------------------------------------------------------

    def script(self, *replies: Reply) -> None:
        """Queue replies; each request takes the next one, then ``default``."""
        with self._lock:
            self._replies.extend(replies)

    def close_connections(self) -> None:
        """Drop every open connection now (as a restarting server would)."""
        for protocol in list(self._protocols):
            self._loop.call_soon_threadsafe(protocol.transport.abort)

    def goaway_all(self, *, last_stream_id: int | None = None, keep_open: bool = False) -> None:
        """Send GOAWAY (no error) on every open connection, as APNs does when draining.

        ``keep_open``: keep answering streams up to ``last_stream_id`` (default:
        the highest received), RFC 9113 section 6.8's graceful shutdown, which
        h2's state machine does not model (python-hyper/h2#1181).
        """

        def goaway() -> None:
            for protocol in list(self._protocols):
                state = protocol.conn.state_machine.state
                protocol.conn.close_connection(last_stream_id=last_stream_id)
                if keep_open:
                    protocol.conn.state_machine.state = state
                protocol.flush()

        self._loop.call_soon_threadsafe(goaway)

    def _note_open_streams(self, count: int) -> None:
        with self._lock:
            self.peak_streams = max(self.peak_streams, count)

    def _new_connection(self, protocol: _Protocol) -> int:
        with self._lock:
            self.connections += 1
            self._protocols.add(protocol)
            return self.connections

    def _answer(self, request: Request) -> Reply:
        with self._lock:
            self.requests.append(request)
        if self.handler is not None:
            reply = self.handler(request)
            if reply is not None:
                return reply
        with self._lock:
            return self._replies.popleft() if self._replies else self.default
