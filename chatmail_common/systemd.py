"""systemd integration: readiness/watchdog notifications and socket activation.

Uses systemd-python's ``daemon`` module when installed (the ``systemd`` extra);
without it, the two tiny protocols are spoken directly so a relay without
``libsystemd-dev`` still gets ``Type=notify`` and socket activation.
"""

from __future__ import annotations

import os
import socket

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
