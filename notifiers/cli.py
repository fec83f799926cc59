"""``notifiers``: run the push proxy's HTTP API (and optionally its metrics listener).

Startup logs which providers are enabled.  A broken key or certificate file, or
an address it cannot listen on, is one line on stderr naming the file or the
address, and exit status 1 (not a traceback), because that is what an operator
sees in ``systemctl status``.  With ``--db`` the heartbeat loop runs once the
listeners are up.  SIGTERM and SIGINT stop the heartbeats and the listeners,
let requests in flight finish, close the provider connections and exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from aiohttp import web

from chatmail_common.fdlimit import raise_open_files_limit
from chatmail_common.logsetup import configure_logging
from chatmail_common.systemd import notify

from .app import make_app, make_metrics_app, start_listener, tune_gc_for_serving
from .build import build_service
from .heartbeat_store import HeartbeatStoreError
from .providers.base import ProviderConfigError
from .settings import ProxySettings, settings_from_args

log = logging.getLogger("notifiers")


async def serve(settings: ProxySettings, stop: asyncio.Event | None = None) -> None:
    """Serve until ``stop`` is set or SIGTERM/SIGINT arrives."""
    service = build_service(settings)
    heartbeats = service.heartbeats
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runners: list[web.AppRunner] = []
    try:
        app = make_app(service, body_limit=settings.body_limit, read_timeout=settings.read_timeout)
        timeouts = settings.listener_timeouts
        paused = service.metrics.listener_accept_pauses.inc
        runners.append(
            await start_listener(
                app, settings.host, settings.port, timeouts=timeouts, on_pause=paused
            )
        )
        log.info("listening on http://%s:%d", settings.host, settings.port)
        address = settings.metrics_address
        if address is not None:
            metrics_app = make_metrics_app(service.metrics)
            runners.append(
                await start_listener(metrics_app, *address, timeouts=timeouts, on_pause=paused)
            )
            log.info("metrics on http://%s:%d/metrics", *address)
        if heartbeats is not None:
            await heartbeats.start()
        notify("READY=1")  # Type=notify: the listeners are up
        await stop.wait()
        notify("STOPPING=1")
        log.info("shutting down")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if heartbeats is not None:  # before the providers it sends through are closed
            await heartbeats.aclose()
        for runner in reversed(runners):
            await runner.cleanup()
        await service.aclose()  # idempotent; also when the app never started


def main(argv: Sequence[str] | None = None) -> int:
    settings = settings_from_args(argv)
    configure_logging(settings.log_level.upper())
    log.info("%s", raise_open_files_limit().describe())
    tune_gc_for_serving()
    try:
        asyncio.run(serve(settings))
    except (ProviderConfigError, HeartbeatStoreError, OSError) as exc:  # a broken file, a port
        print(f"notifiers: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
