"""The push proxy inside another process (the relay's ``chatmail-metadata``).

Why: a relay operator who runs their own push credentials should not need a
second daemon.  :class:`EmbeddedProxy` runs a :class:`NotifyService` on its own
asyncio event loop in a daemon thread; the relay's (synchronous) notifier worker
threads call :meth:`EmbeddedProxy.notify` instead of making an HTTP request.
It is the same service as behind ``POST /notify``, so verdicts, debouncing and
metrics are identical, but the verdict is handed over as it is: no HTTP status
is made up and decoded again.  Optionally the metrics get their own listener.

:func:`start_embedded` is the one entry point ``chatmaild`` uses.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Mapping

from aiohttp import web

from chatmail_common.outcome import Outcome

from .app import make_metrics_app, start_listener
from .build import build_service
from .service import NotifyResult, NotifyService
from .settings import ProxySettings, embedded_settings_from_mapping

log = logging.getLogger(__name__)

#: When the proxy is not running: the relay keeps the job and retries.
NOT_RUNNING = NotifyResult(Outcome.RETRY, "embedded proxy not running")
#: When ``notify`` got no verdict in time (like an HTTP client timeout: retry).
TIMED_OUT = NotifyResult(Outcome.RETRY, "embedded proxy timed out")


def start_embedded(options: Mapping[str, str]) -> EmbeddedProxy:
    """Parse ``[notifiers]`` ini options and start a proxy; ValueError or
    ProviderConfigError (one line) when they are wrong or name an option that does
    nothing here (``port``: there is no HTTP API), OSError naming the address when
    the metrics listener cannot start."""
    proxy = EmbeddedProxy(embedded_settings_from_mapping(options))
    proxy.start()
    return proxy


class EmbeddedProxy:
    """A push proxy on a private event loop thread.

    ``start()`` builds the providers (raising :class:`ProviderConfigError` for a
    broken key file, or OSError if the metrics port is taken) and returns once
    the service runs; ``stop()`` shuts it down; ``notify()`` may be called from
    any thread.
    """

    def __init__(self, settings: ProxySettings, *, service: NotifyService | None = None) -> None:
        self.settings = settings
        self._service = service
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self._metrics_runner: web.AppRunner | None = None
        self._lock = threading.Lock()

    @property
    def service(self) -> NotifyService | None:
        return self._service

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._loop is not None

    def start(self, timeout: float = 30.0) -> None:
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("EmbeddedProxy already started")
            ready: concurrent.futures.Future[None] = concurrent.futures.Future()
            self._thread = threading.Thread(
                target=self._run, args=(ready,), name="notifiers-embedded", daemon=True
            )
            self._thread.start()
        try:
            ready.result(timeout)
        except BaseException:
            self._thread.join(timeout)
            self._thread = None
            raise

    def _run(self, ready: concurrent.futures.Future[None]) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._main(loop, ready))
        except BaseException as exc:  # only reached if start-up failed
            if not ready.done():
                ready.set_exception(exc)
        finally:
            self._loop = None
            loop.close()

    async def _main(
        self, loop: asyncio.AbstractEventLoop, ready: concurrent.futures.Future[None]
    ) -> None:
        if self._service is None:
            self._service = build_service(self.settings)
        service = self._service
        heartbeats = service.heartbeats
        self._stopping = asyncio.Event()
        try:
            await service.start()
            if heartbeats is not None:  # no /register here, but a schedule is drained
                await heartbeats.start()
            address = self.settings.metrics_address
            if address is not None:
                self._metrics_runner = await start_listener(
                    make_metrics_app(service.metrics),
                    *address,
                    timeouts=self.settings.listener_timeouts,
                    on_pause=service.metrics.listener_accept_pauses.inc,
                )
                log.info("embedded proxy metrics on http://%s:%d/metrics", *address)
            self._loop = loop
            ready.set_result(None)
            await self._stopping.wait()
        finally:
            if heartbeats is not None:
                await heartbeats.aclose()
            if self._metrics_runner is not None:
                await self._metrics_runner.cleanup()
            await service.aclose()

    def notify(self, token: str, timeout: float = 60.0) -> NotifyResult:
        """Send ``token`` as ``POST /notify`` would and return the service's verdict.

        RETRY with :data:`NOT_RUNNING` or :data:`TIMED_OUT` when the proxy is not
        running or gave no verdict within ``timeout`` seconds.
        """
        loop, service = self._loop, self._service
        if loop is None or service is None or not self.running:
            return NOT_RUNNING
        try:
            future = asyncio.run_coroutine_threadsafe(service.notify(token), loop)
        except RuntimeError:  # the loop closed meanwhile
            return NOT_RUNNING
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            return TIMED_OUT
        except concurrent.futures.CancelledError:
            return NOT_RUNNING

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the service (sends in flight finish) and join the thread."""
        with self._lock:
            thread, loop, stopping = self._thread, self._loop, self._stopping
            if thread is None:
                return
            if loop is not None and stopping is not None:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(stopping.set)
            thread.join(timeout)
            self._thread = None

    def __enter__(self) -> EmbeddedProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
