"""WAL checkpoints on a thread of their own, never inside a dict commit.

SQLite's automatic checkpoint runs inside the COMMIT that pushes the WAL past 1,000
pages: that commit copies the WAL into the database file and, with
``synchronous=NORMAL``, fsyncs both before it returns.  On the dict server that
COMMIT is the event loop's (group commit, :mod:`chatmaild.groupcommit`), or a notifier
thread's while it holds the write lock the loop waits for, so every ~1,000 pages all
32 waiting connections stalled for the checkpoint (7-9 ms measured for a group of 16
token refreshes, against well under 1 ms without it): the token refresh's p99.

The service's connections therefore open with ``autocheckpoint=False``
(:func:`chatmaild.database.connect`) and this thread runs a PASSIVE checkpoint every
:data:`INTERVAL` seconds on its own connection, once the WAL file has reached the size
at which SQLite's own checkpoint would have started (:data:`MIN_WAL_BYTES`): as
before, a small database's WAL only grows, so a commit on a full disk is refused
rather than written into WAL space a checkpoint freed (tests/test_fault_disk_full.py).
PASSIVE never blocks a writer or a reader and takes no write lock; the sqlite3 module
releases the GIL while it works, so it runs on the other core.  Durability is
unchanged: a transaction is durable when its COMMIT returns, in the WAL; a
checkpoint only moves it into the main file.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from pathlib import Path

log = logging.getLogger(__name__)

#: Seconds between checkpoints: at 20,000 token refreshes/s the WAL grows by a few
#: MB in that time, about what SQLite's own 1,000-page threshold lets it reach.
INTERVAL = 0.1
#: SQLite's default ``wal_autocheckpoint``: 1,000 frames of a 4 KiB page and its header.
MIN_WAL_BYTES = 1000 * (4096 + 24)


class Checkpointer:
    """A daemon thread checkpointing the WAL of ``path`` every ``interval`` seconds."""

    def __init__(
        self, path: Path | str, interval: float = INTERVAL, min_wal_bytes: int = MIN_WAL_BYTES
    ) -> None:
        self.path = str(path)
        self.interval = interval
        self.min_wal_bytes = min_wal_bytes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wal-checkpoint", daemon=True)
        self.checkpoints = 0  # completed checkpoint calls (tests)
        self._conn: sqlite3.Connection | None = None

    def start(self) -> None:
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._thread.start()

    def checkpoint(self) -> tuple[int, int, int]:
        """One PASSIVE checkpoint: (busy, WAL frames, frames checkpointed), as SQLite says."""
        assert self._conn is not None, "start() first"
        busy, frames, done = self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        self.checkpoints += 1
        return busy, frames, done

    def stop(self) -> None:
        """Stop the thread and close its connection (at exit SQLite checkpoints anyway)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _wal_bytes(self) -> int:
        try:
            return os.stat(self.path + "-wal").st_size
        except OSError:  # no WAL yet (or not in WAL mode): nothing to checkpoint
            return 0

    def _run(self) -> None:
        failing = False
        while not self._stop.wait(self.interval):
            if self._wal_bytes() < self.min_wal_bytes:
                continue
            try:
                self.checkpoint()
            except sqlite3.Error as exc:  # one line per episode, not one per interval
                if not failing:
                    failing = True
                    log.error("WAL checkpoint of %s failed: %s; retrying", self.path, exc)
                continue
            if failing:
                failing = False
                log.info("WAL checkpoint of %s works again", self.path)
