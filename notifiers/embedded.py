"""The push proxy inside another process (the relay's ``chatmail-metadata``).

Why: a relay operator who runs their own push credentials should not need a
second daemon.  :class:`EmbeddedProxy` runs a :class:`NotifyService` on its own
asyncio event loop in a daemon thread; the relay's (synchronous) notifier worker
threads call :meth:`EmbeddedProxy.notify` instead of making an HTTP request.
It is the same service as behind ``POST /notify``, so statuses, debouncing and
metrics are identical; optionally the metrics are served on their own listener.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading

from aiohttp import web

from .app import make_metrics_app
from .service import NotifyService
from .settings import ProxySettings, build_service

log = logging.getLogger(__name__)

#: Status when the proxy is not running (the relay keeps the job and retries).
STATUS_UNAVAILABLE = 503
#: Status when ``notify`` timed out (like an HTTP client timeout: retry).
STATUS_TIMEOUT = 504


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
        self._stopping = asyncio.Event()
        try:
            await service.start()
            address = self.settings.metrics_address
            if address is not None:
                self._metrics_runner = web.AppRunner(make_metrics_app(service.metrics))
                await self._metrics_runner.setup()
                await web.TCPSite(self._metrics_runner, *address).start()
                log.info("embedded proxy metrics on http://%s:%d/metrics", *address)
            self._loop = loop
            ready.set_result(None)
            await self._stopping.wait()
        finally:
            if self._metrics_runner is not None:
                await self._metrics_runner.cleanup()
            await service.aclose()

    def notify(self, token: str, timeout: float = 60.0) -> int:
        """Send ``token`` as ``POST /notify`` would; return the HTTP-equivalent status.

        200 done, 410 delete the token, anything else retry later: 503 if the
        proxy is not running, 504 if no answer came within ``timeout`` seconds.
        """
        loop, service = self._loop, self._service
        if loop is None or service is None or not self.running:
            return STATUS_UNAVAILABLE
        try:
            future = asyncio.run_coroutine_threadsafe(service.notify(token), loop)
        except RuntimeError:  # the loop closed meanwhile
            return STATUS_UNAVAILABLE
        try:
            return future.result(timeout).status
        except concurrent.futures.TimeoutError:
            future.cancel()
            return STATUS_TIMEOUT
        except concurrent.futures.CancelledError:
            return STATUS_UNAVAILABLE

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
