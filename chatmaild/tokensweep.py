"""Deleting expired device tokens off the hot path, a bounded batch at a time.

Why: a dict commit prunes only the tokens of the user it is about (a new token, a
delivery), and a refresh of a stored token is one statement that prunes nothing
(:meth:`chatmaild.store.MetadataStore.add_token`).  So the tokens of a user who
never sets a token and never gets mail again would stay in the table forever.
Reads already skip them; this thread deletes them, so the table does not grow
without bound.

Every :data:`INTERVAL` seconds (and once at start) it looks at the next
:data:`BATCH` rows in rowid order, in one short write transaction on its own
connection, and wraps around at the end: the write lock is held for one bounded
step, never for a scan of the whole table.  At the defaults it passes over
~8 million rows a day, while a token lives 90 days.  A failing step (a full disk)
is one log line per episode and is tried again at the next interval.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .database import connect
from .store import MetadataStore

log = logging.getLogger(__name__)

#: Seconds between two steps.
INTERVAL = 10.0
#: Token rows looked at per step (one indexed range of the rowid: well under a millisecond).
BATCH = 1000


class TokenSweeper:
    """A daemon thread deleting expired tokens of ``path``, :data:`BATCH` rows per step."""

    def __init__(
        self,
        path: Path | str,
        synchronous: str = "NORMAL",
        interval: float = INTERVAL,
        batch: int = BATCH,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.synchronous = synchronous
        self.interval = interval
        self.batch = batch
        self.clock = clock
        self.deleted = 0  # tokens deleted so far (tests, logs)
        self._cursor = 0
        self._failing = False
        self._store: MetadataStore | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="token-sweep", daemon=True)

    def start(self) -> None:
        self._store = MetadataStore(connect(self.path, self.synchronous, autocheckpoint=False))
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self._store is not None:
            self._store.conn.close()
            self._store = None

    def step(self) -> int:
        """One bounded batch; how many tokens it deleted."""
        assert self._store is not None, "start() first"
        with self._store.transaction():
            self._cursor, deleted = self._store.prune_expired_batch(
                self._cursor, self.batch, int(self.clock())
            )
        self.deleted += deleted
        if deleted:
            log.debug("deleted %d expired device tokens", deleted)
        return deleted

    def _run(self) -> None:
        while True:
            try:
                self.step()
            except sqlite3.Error as exc:  # one line per episode, not one per interval
                if not self._failing:
                    self._failing = True
                    log.error("deleting expired tokens failed: %s; retrying", exc)
            else:
                if self._failing:
                    self._failing = False
                    log.info("deleting expired tokens works again")
            if self._stop.wait(self.interval):
                return
