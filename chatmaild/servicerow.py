"""The running service's one row in the database: how ``status`` finds it without being told.

``chatmail-metadata status CHATMAIL_INI`` gets only the ini; the dict socket and the
metrics listener are command-line options of the service (upstream's unit passes the
socket).  So the service writes them, with its pid and start time, when it starts
serving, and marks the row stopped at a clean shutdown.  A ``kill -9`` leaves it
"running"; ``status`` then sees that the pid is gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass

from .database import Writer

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServiceRow:
    pid: int
    started: float
    socket: str
    metrics: str  # HOST:PORT, or empty without a listener
    notify_url: str
    workers: int
    stopped: float | None = None

    def alive(self) -> bool:
        """Not cleanly stopped, and the pid exists (on this host) and is still that process."""
        if self.stopped is not None:
            return False
        try:
            os.kill(self.pid, 0)
        except PermissionError:  # someone else's process: it exists
            return True
        except OSError:
            return False
        # A pid reused after a kill -9 (or a reboot): that process began after the row.
        began = process_start(self.pid)
        return began is None or began <= self.started + PID_REUSE_SLACK


#: How much later than its row a process may seem to have started and still be the
#: service: ``btime`` has whole seconds, and the clock may have been stepped since boot.
PID_REUSE_SLACK = 2.0


def process_start(pid: int) -> float | None:
    """When process ``pid`` started (Unix time) from ``/proc``; None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open("/proc/stat", "rb") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
        ticks = int(stat.rsplit(b")", 1)[1].split()[19])  # field 22, starttime
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    return btime + ticks / os.sysconf("SC_CLK_TCK")


_COLUMNS = "pid, started, socket, metrics, notify_url, workers, stopped"


def announce(conn: sqlite3.Connection, row: ServiceRow) -> None:
    """Write ``row``; best effort (see :func:`_best_effort`)."""
    with _best_effort("record the service's start"), Writer(conn).transaction():
        conn.execute(
            f"INSERT OR REPLACE INTO service(id, {_COLUMNS}) VALUES (1,?,?,?,?,?,?,NULL)",
            (row.pid, row.started, row.socket, row.metrics, row.notify_url, row.workers),
        )


def mark_stopped(conn: sqlite3.Connection, pid: int, when: float) -> None:
    with _best_effort("record the service's stop"), Writer(conn).transaction():
        conn.execute("UPDATE service SET stopped=? WHERE id=1 AND pid=?", (when, pid))


@contextlib.contextmanager
def _best_effort(what: str) -> Iterator[None]:
    """The row is for ``status`` only: a database that cannot take the write (a full disk)
    must not keep the service from starting, or stopping cleanly, and serving what it has."""
    try:
        yield
    except sqlite3.Error as exc:
        log.warning("cannot %s in the database (%s): status may show an older row", what, exc)


def read(conn: sqlite3.Connection) -> ServiceRow | None:
    try:
        found = conn.execute(f"SELECT {_COLUMNS} FROM service WHERE id=1").fetchone()
    except sqlite3.OperationalError:  # a version 1 database: no such table yet
        return None
    return ServiceRow(*found) if found else None
