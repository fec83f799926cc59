"""Per-token debouncing with a leading and a trailing edge, sans-I/O.

Why: a token can be stored twice on a relay (an app reinstalled with the same
device token encrypts it to two different ciphertexts), and a burst of mails
produces a burst of ``/notify`` calls.  Only the proxy sees the plaintext, so it
coalesces: the first notification for a token is sent at once and opens a
window; further notifications inside the window are folded into at most one
send at the window's end, which opens the next window.  Suppressed hits do not
extend the window.  So no wake-up is lost and no phone is woken twice in a window.

The class does no I/O and reads no clock: every call gets ``now`` (a monotonic
time in seconds, never going backwards) from the caller, which also decides when
to call :meth:`Debouncer.due` (see :meth:`Debouncer.next_due`).

Memory (the design target is 1,000,000 live entries in well under 200 MB):

* entries are keyed by a 16-byte BLAKE2b digest of the token, not by the token
  (FCM tokens are ~200 bytes), and the value is the window start as a float;
* the plaintext is kept only for entries that owe a trailing send;
* expiry uses two *generations* (plain dicts) instead of a per-entry heap: once
  the older generation's newest entry is a window old, the whole dict is dropped
  in O(1).  An entry lives at most about two windows after its last send.
* the entry count is capped; past the cap the older generation is evicted first
  (an evicted entry that owes a trailing send is handed out by the next
  :meth:`~Debouncer.due` instead of being lost).
"""

from __future__ import annotations

import hashlib
import heapq
import math

DEFAULT_WINDOW = 10.0
DEFAULT_MAX_ENTRIES = 1_000_000


def _key(token: str) -> bytes:
    return hashlib.blake2b(token.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class Debouncer:
    """Leading + trailing edge debouncer keyed per plaintext token.

    ``hit(token, now)`` returns True when the notification must be sent now;
    False when it is covered by a send that already happened in the current window
    or by a trailing send that is scheduled (:meth:`due` will return the token).
    """

    __slots__ = (
        "window",
        "max_entries",
        "_cur",
        "_prev",
        "_cur_opened",
        "_cur_newest",
        "_prev_newest",
        "_pending",
        "_heap",
        "_seq",
        "_ready",
    )

    def __init__(
        self, window: float = DEFAULT_WINDOW, max_entries: int = DEFAULT_MAX_ENTRIES
    ) -> None:
        if window <= 0:
            raise ValueError("debounce window must be positive")
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.window = float(window)
        self.max_entries = int(max_entries)
        # digest -> start of the token's current window (time of its last send)
        self._cur: dict[bytes, float] = {}
        self._prev: dict[bytes, float] = {}
        self._cur_opened = -math.inf
        self._cur_newest = -math.inf
        self._prev_newest = -math.inf
        # digest -> (plaintext, due time) for entries that owe one trailing send
        self._pending: dict[bytes, tuple[str, float]] = {}
        # (due, seq, digest) for pending entries; stale rows are skipped lazily
        self._heap: list[tuple[float, int, bytes]] = []
        self._seq = 0
        # digest -> plaintext: owed sends to hand out at once (evicted while pending)
        self._ready: dict[bytes, str] = {}

    def __len__(self) -> int:
        """Number of tokens with a live (or not yet collected) window."""
        return len(self._cur) + len(self._prev)

    @property
    def pending_count(self) -> int:
        """Tokens that owe a trailing send (scheduled or already due)."""
        return len(self._pending) + len(self._ready)

    @property
    def owes_now(self) -> bool:
        """Whether :meth:`due` would hand out a send at once (an evicted entry owed one):
        the caller's cue that its trailing-send timer must run now."""
        return bool(self._ready)

    def hit(self, token: str, now: float) -> bool:
        """Record a notification for ``token`` at ``now``; True means "send it now"."""
        self._rotate(now)
        key = _key(token)
        if key in self._pending or key in self._ready:
            return False  # the owed trailing send covers this hit
        start = self._cur.get(key)
        if start is None:
            start = self._prev.get(key)
        if start is not None and now - start < self.window:
            due = start + self.window
            self._pending[key] = (token, due)
            self._seq += 1
            heapq.heappush(self._heap, (due, self._seq, key))
            return False
        self._open(key, now)
        return True

    def due(self, now: float) -> list[str]:
        """Tokens whose trailing send is due at ``now``; each opens a new window at ``now``.

        The caller must send every returned token (that is what makes "nothing is
        lost" true).  The window starts when the token is handed out, not at its
        nominal due time, so a late caller cannot cause two sends within a window.
        """
        self._rotate(now)
        out: dict[bytes, str] = self._ready
        self._ready = {}
        heap = self._heap
        while heap and heap[0][0] <= now:
            due, _, key = heapq.heappop(heap)
            entry = self._pending.get(key)
            if entry is None or entry[1] != due:
                continue  # stale row: evicted, or re-pended with a later due time
            del self._pending[key]
            out[key] = entry[0]
        for key in out:
            self._open(key, now)
        return list(out.values())

    def next_due(self) -> float | None:
        """When :meth:`due` has something to return next: ``-inf`` if already, None if never."""
        if self._ready:
            return -math.inf
        heap = self._heap
        while heap:
            due, _, key = heap[0]
            entry = self._pending.get(key)
            if entry is not None and entry[1] == due:
                return due
            heapq.heappop(heap)
        return None

    def forget(self, token: str, opened_at: float) -> None:
        """Close the window ``token``'s failed send opened at ``opened_at``, so the next
        hit sends again.

        Without this a relay's retry of a failed push (8 s later) would fall into
        the window, be answered 200 "debounced", and the wake-up would be lost.  Only
        that window is closed: a slow failure (APNs times out after 20 s) must not
        erase a newer window that a later, successful send opened.
        """
        key = _key(token)
        for generation in (self._cur, self._prev):
            if generation.get(key) == opened_at:
                del generation[key]

    def defer(self, token: str, due: float) -> None:
        """Owe ``token`` a send at ``due`` again: its trailing send failed (retryable).

        The relay got 200 for the hits a trailing send covers, so the proxy itself
        must try again; :meth:`due` hands the token out at ``due``.
        """
        key = _key(token)
        self._ready.pop(key, None)
        self._pending[key] = (token, due)
        self._seq += 1
        heapq.heappush(self._heap, (due, self._seq, key))

    # -- internals -------------------------------------------------------------

    def _open(self, key: bytes, now: float) -> None:
        """Start a new window for ``key`` at ``now`` (it was just sent)."""
        self._prev.pop(key, None)
        if key not in self._cur:
            while len(self._cur) + len(self._prev) >= self.max_entries:
                self._evict_one(now)
        self._cur[key] = now
        self._cur_newest = now

    def _evict_one(self, now: float) -> None:
        if not self._prev:
            # Everything is in the young generation: age it so that eviction
            # keeps taking from the older half.
            self._prev, self._prev_newest = self._cur, self._cur_newest
            self._cur, self._cur_opened = {}, now
        # popitem() is O(1); it takes the newest of the older generation, which
        # is still older than anything in the young one.
        key, _ = self._prev.popitem()
        entry = self._pending.pop(key, None)
        if entry is not None:
            self._ready[key] = entry[0]

    def _rotate(self, now: float) -> None:
        """Drop the older generation once all its windows are over; age the young one."""
        if self._prev and now - self._prev_newest >= self.window:
            # Every window in it has ended.  Owed trailing sends stay in
            # self._pending (they do not need the window start), so none is lost.
            self._prev = {}
        if now - self._cur_opened >= self.window and not self._prev:
            self._prev, self._prev_newest = self._cur, self._cur_newest
            self._cur, self._cur_opened = {}, now
