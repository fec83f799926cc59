"""aiohttp front end of :class:`~notifiers.service.NotifyService` (upstream's HTTP API).

``POST /notify`` takes the raw token as the body (no JSON, no trimming),
``POST /register`` takes ``{"token": ...}``, ``GET /`` says hello.  Bodies are
limited (default 8 KiB, 413 past it: a token is at most a few hundred bytes,
an encrypted one about 1 KiB) and must be UTF-8 (else 400).  Unknown paths are
404 and wrong methods 405 (aiohttp's router).  Metrics live on a separate app so
that they can be bound to a private address.  :func:`start_listener` serves
either app; its errors name the address, because "Name or service not known"
alone does not say which option is wrong.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from chatmail_common.acceptguard import GuardedServer, bind_tcp
from chatmail_common.gctuning import SERVING_GC_THRESHOLD as SERVING_GC_THRESHOLD  # re-exported
from chatmail_common.gctuning import tune_gc_for_serving as tune_gc_for_serving  # re-exported
from chatmail_common.outcome import Outcome

from .listener_log import RequestErrorLog, SafeAccessLogger
from .metrics import CONTENT_TYPE, ProxyMetrics
from .service import NotifyResult, NotifyService

DEFAULT_BODY_LIMIT = 8 * 1024
#: What aiohttp's ``TCPSite`` uses: the proxy's clients are a few relays' notifiers
#: with keep-alive connections, so connections arrive one by one, not in bursts.
LISTEN_BACKLOG = 128
#: Seconds a connection may sit idle, or take to send its request's headers.
DEFAULT_KEEPALIVE_TIMEOUT = 15.0
#: Seconds a request may take to send its body once its headers are in.
DEFAULT_READ_TIMEOUT = 10.0

log = logging.getLogger("notifiers.http")

SERVICE_KEY: web.AppKey[NotifyService] = web.AppKey("service", NotifyService)
METRICS_KEY: web.AppKey[ProxyMetrics] = web.AppKey("metrics", ProxyMetrics)
READ_TIMEOUT_KEY: web.AppKey[float] = web.AppKey("read_timeout", float)
BODY_LIMIT_KEY: web.AppKey[int] = web.AppKey("body_limit", int)


#: The relay contract on the wire: 200 done, 410 delete the token, else retry.
_STATUS = {Outcome.SENT: 200, Outcome.GONE: 410, Outcome.RETRY: 500}


def http_status(result: NotifyResult) -> int:
    """The HTTP status of a service result (400 for a malformed request, never 410)."""
    return 400 if result.malformed else _STATUS[result.outcome]


def _answer(result: NotifyResult) -> web.Response:
    return web.Response(status=http_status(result), text=result.message)


def _too_large() -> web.Response:
    return web.Response(status=413, text="request body too large")


async def _read_text(request: web.Request) -> str | web.Response:
    """The body as text, or the error response (413 too large, 400 not UTF-8 or empty,
    408 not received within the read timeout).  A client that goes away mid-body is
    a DEBUG line: nobody is left to answer, and it is no fault of the proxy."""
    try:
        content = request.content
        if content.is_eof():
            # The whole body arrived with the headers (a token always does): it is taken
            # from the buffer at once, with no timer (one per request was a tenth of the
            # handler's cost) and without read()'s loop of awaits and copies.
            raw = content.read_nowait()
            limit = request.app[BODY_LIMIT_KEY]
            if limit and len(raw) > limit:  # as read() checks client_max_size
                return _too_large()
        else:
            async with asyncio.timeout(request.app[READ_TIMEOUT_KEY]):
                raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return _too_large()
    except TimeoutError:
        log.debug("request body not received in time: 408")
        response = web.Response(status=408, text="request body not received in time")
        response.force_close()
        return response
    except ConnectionError as exc:
        log.debug("client went away mid-body (%s)", type(exc).__name__)
        return web.Response(status=400, text="client went away")
    if not raw:
        return web.Response(status=400, text="empty body")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return web.Response(status=400, text="body is not valid UTF-8")


async def _notify(request: web.Request) -> web.Response:
    body = await _read_text(request)
    if isinstance(body, web.Response):
        return body
    return _answer(await request.app[SERVICE_KEY].notify(body))


async def _register(request: web.Request) -> web.Response:
    body = await _read_text(request)
    if isinstance(body, web.Response):
        return body
    return _answer(await request.app[SERVICE_KEY].register(body))


async def _hello(request: web.Request) -> web.Response:
    return web.Response(text="Hello, world!")


def make_app(
    service: NotifyService,
    *,
    body_limit: int = DEFAULT_BODY_LIMIT,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
) -> web.Application:
    """The main API.  Starts the service's background task and closes it with the app."""
    app = web.Application(client_max_size=body_limit)
    app[SERVICE_KEY] = service
    app[READ_TIMEOUT_KEY] = read_timeout
    app[BODY_LIMIT_KEY] = body_limit
    app.router.add_post("/notify", _notify)
    app.router.add_post("/register", _register)
    app.router.add_get("/", _hello)

    async def lifecycle(app: web.Application):
        await service.start()
        yield
        await service.aclose()

    app.cleanup_ctx.append(lifecycle)
    return app


async def _metrics(request: web.Request) -> web.Response:
    metrics = request.app[METRICS_KEY]
    return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE})


def make_metrics_app(metrics: ProxyMetrics) -> web.Application:
    """``GET /metrics`` in OpenMetrics text, for the separate metrics listener."""
    app = web.Application()
    app[METRICS_KEY] = metrics
    app.router.add_get("/metrics", _metrics)
    return app


class ListenError(OSError):
    """A listener could not start; the message names the address and the reason."""


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class ListenerTimeouts:
    """How long a client may hold a connection without finishing a request.

    ``keepalive``: idle between requests, and from connecting (or the last
    response) until the headers are in (aiohttp's keep-alive timer, which does
    not restart on partial data).  ``read``: the body once the headers are in
    (:func:`make_app`), also the most spent reading and discarding the rest of
    a refused body before closing.
    """

    keepalive: float = DEFAULT_KEEPALIVE_TIMEOUT
    read: float = DEFAULT_READ_TIMEOUT


class GuardedSite(web.BaseSite):
    """A TCP site accepting through :class:`~chatmail_common.acceptguard.GuardedServer`:
    at the fd limit it pauses accepting for a moment and logs one line per episode,
    where aiohttp's ``TCPSite`` (asyncio's accept loop) logs a traceback storm."""

    __slots__ = ("_host", "_port", "_on_pause")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        on_pause: Callable[[], object] | None = None,
    ) -> None:
        super().__init__(runner, backlog=LISTEN_BACKLOG)
        self._host, self._port, self._on_pause = host, port, on_pause

    @property
    def name(self) -> str:
        return f"http://{_address(self._host, self._port)}"

    async def start(self) -> None:
        await super().start()
        handler = self._runner.server
        assert handler is not None
        sockets = await bind_tcp(self._host, self._port, self._backlog)
        server = GuardedServer(sockets, handler, on_pause=self._on_pause)
        server.start()
        self._server = server  # type: ignore[assignment]  # close() is all stop() uses


async def start_listener(
    app: web.Application,
    host: str,
    port: int,
    *,
    timeouts: ListenerTimeouts | None = None,
    on_pause: Callable[[], object] | None = None,
) -> web.AppRunner:
    """Serve ``app`` on ``host:port``; the caller cleans the returned runner up.

    Slow clients are cut off (``timeouts``), and aiohttp's request logging is
    replaced by one that never quotes what the client sent (:mod:`.listener_log`).
    Raises :class:`ListenError` (``cannot listen on HOST:PORT: <reason>``) for an
    unknown host, a taken port or a port it may not bind.  ``on_pause`` is called once
    per episode of accepting paused at the fd limit (:class:`GuardedSite`).
    """
    timeouts = timeouts or ListenerTimeouts()
    runner = web.AppRunner(
        app,
        keepalive_timeout=timeouts.keepalive,
        lingering_time=timeouts.read,
        logger=RequestErrorLog(),
        access_log_class=SafeAccessLogger,
    )
    await runner.setup()
    try:
        await GuardedSite(runner, host, port, on_pause).start()
    except OSError as exc:
        await runner.cleanup()
        # asyncio's bind errors repeat the address in their text; the errno's text does not.
        reason = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else exc.strerror
        raise ListenError(f"cannot listen on {_address(host, port)}: {reason or exc}") from exc
    return runner
