"""``chatmail-metadata SOCKET CHATMAIL_INI``: the relay's dict server and notifier.

The positional arguments are upstream's invocation, so an existing systemd unit
keeps working.  Startup problems end with one clear line on stderr and exit 1.

``chatmail-metadata status CHATMAIL_INI`` (:mod:`chatmaild.status`) is told apart by
its first word: a dict socket literally named ``status`` in the working directory has
to be spelled ``./status`` (upstream's unit passes an absolute path).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

from chatmail_common.fdlimit import raise_open_files_limit
from chatmail_common.gctuning import tune_gc_for_serving
from chatmail_common.hostport import parse_host_port
from chatmail_common.logsetup import configure_logging
from chatmail_common.systemd import listen_fds, notify, watchdog_interval

from .checkpointer import Checkpointer
from .config import Config, ConfigError, check_notify_url, read_config
from .database import DatabaseError, connect
from .dictserver import ServerStats, bind_unix_socket, start_dict_server
from .health import HealthSnapshot, check, notifier_snapshot
from .instancelock import hold_database
from .jobstore import JobStore
from .metadata import MetadataDict
from .notifier import Notifier
from .pushtransport import EmbeddedPushTransport, HttpPushTransport, PushTransport
from .relaymetrics import RelayMetrics
from .serverkeys import ServerKeys
from .servicerow import ServiceRow, announce, mark_stopped
from .store import MetadataStore
from .tokensweep import TokenSweeper

log = logging.getLogger("chatmail-metadata")


def octal_mode(text: str) -> int:
    """``--socket-mode``: permission bits in octal, as chmod takes them (0660, 660)."""
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o7777:
        raise argparse.ArgumentTypeError(f"expected an octal mode such as 0660, got {text!r}")
    return mode


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="chatmail-metadata",
        description="Dovecot dict server for IMAP METADATA, push-token store and new-mail "
        "notifier of a chatmail relay.",
        epilog="See also: chatmail-metadata status CHATMAIL_INI [--json] [--check] "
        "(a socket file named 'status' in the working directory: pass ./status).",
    )
    p.add_argument("socket", help="path of the dict Unix socket Dovecot connects to")
    p.add_argument("config", help="chatmail.ini ([params] as upstream, optional [metadata])")
    p.add_argument(
        "--db",
        type=Path,
        help="SQLite database path (default: <mailboxes_dir>/"
        "chatmail-metadata.sqlite3 or [metadata] database)",
    )
    p.add_argument(
        "--socket-mode",
        type=octal_mode,
        metavar="MODE",
        default=None,
        help="octal mode for the socket file, e.g. 0660 (default: keep the umask)",
    )
    p.add_argument(
        "--delivery-dict",
        default=None,
        help="dict name (from proxy:...:NAME) that may trigger pushes with "
        "messagenew; others are refused (default: [metadata] delivery_dict, else any)",
    )
    p.add_argument(
        "--notify-url",
        default=None,
        help="push proxy /notify URL, 'embedded' for the in-process proxy configured by the "
        "ini's [notifiers] section, or 'off' (default: [metadata] notify_url, else "
        "https://notifications.delta.chat/notify)",
    )
    p.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        default=None,
        help="serve Prometheus metrics on this address (default: off)",
    )
    p.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="default: INFO",
    )
    return p


def load(args: argparse.Namespace) -> Config:
    config = read_config(args.config)
    if args.db is not None:
        config.database = args.db
    if args.delivery_dict:
        config.delivery_dict = args.delivery_dict
    if args.notify_url:
        config.notifier.url = check_notify_url(args.notify_url, "--notify-url")
    if args.metrics:
        try:
            parse_host_port(args.metrics)
        except ValueError as exc:
            raise ConfigError(f"--metrics: {exc}") from None
    if config.database is None and not config.mailboxes_dir.is_dir():
        raise ConfigError(
            f"mailboxes_dir {config.mailboxes_dir} does not exist (create it or pass --db)"
        )
    return config


def listening_socket(fds: list[int], args: argparse.Namespace) -> socket.socket:
    """The dict socket systemd passed in ``fds`` (socket activation), else bound at
    ``args.socket``; a failure is a ConfigError naming the socket."""
    if fds:
        try:
            sock = socket.socket(fileno=fds[0])
        except OSError as exc:
            raise ConfigError(f"socket from systemd (fd {fds[0]}): {exc.strerror or exc}") from None
        sock.setblocking(False)
        return sock
    try:
        return bind_unix_socket(args.socket, args.socket_mode)
    except OSError as exc:  # e.g. EACCES, whose message names no path, or a too long path
        raise ConfigError(f"cannot listen on socket {args.socket}: {exc.strerror or exc}") from None


async def serve(config: Config, args: argparse.Namespace) -> int:
    # Signals first: a SIGTERM while the notifier and dict server start (systemd stopping
    # a unit that is still starting) is a clean shutdown once they are up, not exit -15.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # No commit of the service checkpoints the WAL: the checkpointer thread does (its doc).
    # Opened before the lock is taken: its errors name the database or its directory.
    conn = connect(config.database_path, config.synchronous, autocheckpoint=False)
    try:
        lock = hold_database(config.database_path)  # one service per database
    except BaseException:
        conn.close()
        raise
    fds = listen_fds()
    try:
        sock = listening_socket(fds, args)
    except BaseException:
        conn.close()
        lock.close()
        raise
    metrics = RelayMetrics()
    proxy = notifier = None
    checkpointer = Checkpointer(config.database_path)
    sweeper = TokenSweeper(config.database_path, config.synchronous)
    try:
        checkpointer.start()
        sweeper.start()
        announce(conn, _service_row(config, args))  # with the socket: status can find both
        if args.metrics:  # before the notifier, so a taken port sends nothing
            try:
                metrics.serve(args.metrics)
            except OSError as exc:
                raise ConfigError(f"--metrics {args.metrics}: {exc.strerror or exc}") from exc
            log.info("metrics on http://%s/metrics", args.metrics)
        proxy, notifier = start_notifier(config, metrics)
        backend = MetadataDict(
            MetadataStore(conn, cache_attributes=True),  # the sole writer of attributes
            ServerKeys(config, on_turn_failure=metrics.turn_failures.inc),
            limits=config.limits,
            hook=notifier,
            delivery_dict=config.delivery_dict,
        )
        stats = ServerStats()
        metrics.track_dict_server(stats)  # before the socket serves: scrapes always see them
        server, _ = await start_dict_server(
            backend, sock, config.limits.max_line_bytes, stats=stats
        )
        await _run_until_signalled(args, config, notifier, stop)
        mark_stopped(conn, os.getpid(), time.time())
        server.close()
        await server.wait_closed()
    finally:
        if notifier is not None:
            await asyncio.to_thread(notifier.stop)
        if proxy is not None:
            await asyncio.to_thread(proxy.stop)
        sweeper.stop()
        checkpointer.stop()
        conn.close()
        lock.close()
        if not fds:
            with contextlib.suppress(OSError):
                os.unlink(args.socket)
    return 0


def _service_row(config: Config, args: argparse.Namespace) -> ServiceRow:
    """What ``status`` needs to find this process: socket, metrics listener, pid."""
    url = config.notifier.url
    return ServiceRow(
        pid=os.getpid(),
        started=time.time(),
        socket=os.path.abspath(args.socket),
        metrics=args.metrics or "",
        notify_url=url,
        workers=0 if url == "off" else config.notifier.workers,
    )


async def _run_until_signalled(
    args: argparse.Namespace, config: Config, notifier: Notifier | None, stop: asyncio.Event
) -> None:
    log.info("serving dict on %s, database %s", args.socket, config.database_path)
    notify("READY=1")
    interval = watchdog_interval()
    watchdog = asyncio.create_task(_watchdog(interval, notifier)) if interval else None
    await stop.wait()
    if watchdog is not None:
        watchdog.cancel()
    log.info("shutting down")
    notify("STOPPING=1")


async def _watchdog(interval: float, notifier: Notifier | None) -> None:
    """Feed systemd's watchdog while the service works (:mod:`.health`), every ``interval``
    (half ``WatchdogSec=``) from the event loop; ``STATUS=`` when the figures change.

    The stall bound is ``WatchdogSec=`` itself: no worker progress while jobs have been
    due that long, and systemd restarts the service one ``WatchdogSec=`` later.
    """
    loop = asyncio.get_running_loop()
    stall = 2 * interval
    lag = 0.0
    status = None
    fed = True
    while True:
        snap = notifier_snapshot(notifier, stall) if notifier is not None else None
        verdict = check(HealthSnapshot(lag, snap), max_loop_lag=interval, stall=stall)
        if verdict.feed:
            notify("WATCHDOG=1")
        if verdict.feed != fed:  # one line per change, not per tick
            fed = verdict.feed
            if fed:
                log.info("feeding the systemd watchdog again: %s", verdict.status)
            else:
                log.error("not feeding the systemd watchdog: %s", verdict.problem)
        if verdict.status != status:
            status = verdict.status
            notify(f"STATUS={status}")
        started = loop.time()
        await asyncio.sleep(interval)
        lag = max(0.0, loop.time() - started - interval)


def start_notifier(config: Config, metrics: RelayMetrics) -> tuple[object | None, Notifier | None]:
    """Start the notifier (and the embedded proxy if configured); (proxy, notifier)."""
    settings = config.notifier
    metrics.workers_configured.set(0 if settings.url == "off" else settings.workers)
    if settings.url == "off":
        log.warning("notifier is off: new mail triggers no push")
        return None, None
    proxy = None
    if settings.url == "embedded":
        # The one place chatmaild uses the notifiers package: the in-process proxy.
        from notifiers.embedded import start_embedded

        try:
            proxy = start_embedded(config.proxy_options)
        except Exception as exc:  # a broken key file etc.: one line for the operator
            raise ConfigError(f"embedded push proxy ([notifiers] of {config.path}): {exc}") from exc
        metrics.track_embedded_proxy(lambda: proxy.running)

        def factory() -> PushTransport:
            return EmbeddedPushTransport(proxy, settings.timeout)

        target = "the embedded proxy"
    else:

        def factory() -> PushTransport:
            return HttpPushTransport(settings.url, settings.timeout)

        target = settings.url
    notifier = Notifier(
        functools.partial(
            JobStore.open, config.database_path, config.synchronous, autocheckpoint=False
        ),
        factory,
        workers=settings.workers,
        policy=settings.retry_policy(),
        metrics=metrics,
    )
    notifier.start()
    log.info("pushing to %s", target)
    return proxy, notifier


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["status"]:
        from .status import main as status_main

        return status_main(argv[1:])
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    log.info("%s", raise_open_files_limit().describe())
    tune_gc_for_serving()  # as notifiers.cli does (GC: 8% -> 5% of CPU, a connection per command)
    # httpx logs every request at INFO; the notifier logs each outcome itself.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        config = load(args)
        return asyncio.run(serve(config, args))
    except (ConfigError, DatabaseError) as exc:
        print(f"chatmail-metadata: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"chatmail-metadata: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
