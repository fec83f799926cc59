"""One ``chatmail-metadata`` per database: a second one started on it refuses to run.

Two services on one file would each push the same queued jobs (which jobs are in
flight is kept in memory, per process), and the dict server's attribute cache
(:class:`chatmaild.store.AttributeCache`) is exact only while its process is the one
writer of attributes.  The lock is ``flock`` on a file beside the database, held for
the process's life: the kernel drops it when the process dies, ``kill -9`` included,
so there is no stale lock to clean up.  A separate file, not the database itself:
SQLite locks the database with ``fcntl`` locks, which NFS would merge with ``flock``.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import BinaryIO

from .database import DatabaseError


def lock_path(database: Path) -> Path:
    return database.with_name(database.name + ".lock")


def hold_database(database: Path) -> BinaryIO:
    """Take the database's service lock; the open file holds it until it is closed.

    Raises :class:`DatabaseError` naming the database (and the holder's pid, which the
    holder writes into the file) when another process holds it.
    """
    path = lock_path(database)
    try:
        lock = open(path, "a+b")  # noqa: SIM115 - held open for the process's life
    except OSError as exc:
        raise DatabaseError(f"cannot open lock file {path}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read(32).decode("ascii", "replace").strip()
        lock.close()
        who = f" (pid {holder})" if holder.isdigit() else ""
        raise DatabaseError(
            f"database {database} is in use by another chatmail-metadata{who}"
        ) from None
    except OSError as exc:
        lock.close()
        raise DatabaseError(f"cannot lock {path}: {exc.strerror or exc}") from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n".encode())
    lock.flush()
    return lock
