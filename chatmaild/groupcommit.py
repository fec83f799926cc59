"""Group commit: the dict transactions that arrive together are written in one SQLite transaction.

Every dict server connection is served on one event-loop thread, so 32 connections
committing at once used to be 32 write transactions in a row, each with its own
BEGIN IMMEDIATE / COMMIT (and, with ``synchronous=FULL``, its own fsync).  Here a
commit is queued instead and the queue is written at the end of the current
event-loop turn: everything that arrived in the same turn goes into one transaction,
and each connection gets its ``O`` only after that COMMIT returned.  A connection
waits for its reply before it handles its next event, so replies stay in order and
a connection reads its own writes.

The backend's ``commit_many`` decides what a failing transaction does to the others
(see :meth:`chatmaild.metadata.MetadataDict.commit_many`); this module only batches.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from . import dictproto as dp

log = logging.getLogger(__name__)

CommitMany = Callable[[Sequence[dp.Commit]], list[dp.CommitReply]]
ReplyCallback = Callable[[dp.CommitReply], None]


class GroupCommitter:
    """Collects commits during one event-loop turn and writes them with ``commit_many``."""

    def __init__(self, commit_many: CommitMany, loop: asyncio.AbstractEventLoop) -> None:
        self._commit_many = commit_many
        self._loop = loop
        self._events: list[dp.Commit] = []
        self._callbacks: list[ReplyCallback] = []
        self.groups = 0  # how many SQLite transactions (for tests and metrics)
        self.largest = 0

    def submit(self, ev: dp.Commit, on_reply: ReplyCallback) -> None:
        """Queue ``ev``; ``on_reply(reply)`` is called once its group is durable (or failed)."""
        if not self._events:
            self._loop.call_soon(self._flush)
        self._events.append(ev)
        self._callbacks.append(on_reply)

    def _flush(self) -> None:
        events, self._events = self._events, []
        callbacks, self._callbacks = self._callbacks, []
        if not events:
            return
        self.groups += 1
        self.largest = max(self.largest, len(events))
        try:
            replies = self._commit_many(events)
        except Exception as exc:  # a bug: still one reply each, never a half answer
            log.exception("group commit of %d transactions failed", len(events))
            replies = [dp.Failure(f"internal error: {exc}")] * len(events)
        for on_reply, reply in zip(callbacks, replies, strict=True):
            try:
                on_reply(reply)
            except Exception:  # one broken connection must not cost the others their reply
                log.exception("delivering a commit reply failed")
