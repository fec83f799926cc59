"""systemd integration: readiness/watchdog notifications and socket activation.

Uses systemd-python's ``daemon`` module when installed (the ``systemd`` extra);
without it, the two tiny protocols are spoken directly so a relay without
``libsystemd-dev`` still gets ``Type=notify`` and socket activation.
"""

from __future__ import annotations

import logging
import os
import socket
import sys

SD_LISTEN_FDS_START = 3

try:  # pragma: no cover - depends on the optional extra
    from systemd import daemon as _sd_daemon
except ImportError:  # pragma: no cover
    _sd_daemon = None


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``READY=1``) to the service manager; False when not under systemd."""
    if _sd_daemon is not None:
        return bool(_sd_daemon.notify(state))
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(state.encode(), addr)
        except OSError:
            return False
    return True


def watchdog_interval() -> float | None:
    """Half the ``WatchdogSec=`` the service manager expects pings within, or None."""
    if os.environ.get("WATCHDOG_PID", str(os.getpid())) != str(os.getpid()):
        return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


def listen_fds() -> list[int]:
    """File descriptors passed by socket activation (empty when started directly)."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    return list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count))


# sd-daemon(3) priority prefixes, understood by journald on a service's stderr
_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class _JournalPriority(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.sd_priority = _PRIORITY.get(record.levelno, 6)
        return True


def configure_logging(level: str | int) -> None:
    """Log to stderr; under systemd (``JOURNAL_STREAM`` set, stderr is the journal)
    without our own timestamps and with ``<N>`` priority prefixes, so journald
    stores each line with its real level and its own time."""
    handler = logging.StreamHandler(sys.stderr)
    if _stderr_is_journal():
        handler.addFilter(_JournalPriority())
        handler.setFormatter(logging.Formatter("<%(sd_priority)d>%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _stderr_is_journal() -> bool:
    """systemd sets JOURNAL_STREAM=<dev>:<inode> of the journal stream it connected."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))
