"""The cyclic GC's young-generation threshold of a serving process.

Why: with Python's default of 700, the proxy's pushes (aiohttp request, h2 stream and
events, futures) triggered a young collection every few requests, each scanning the
state of every request in flight and promoting it to be scanned again: about a
twentieth of the proxy's CPU per push.  chatmail-metadata with a dict connection per
command (Dovecot's default without ``idle_msecs``) spent 8% of its CPU in the GC
(1,274 young collections per 72,775 connections, 7.3 us of GC per connection); with
10,000 it was 5% (83 collections per 79,308, 4.3 us).  With persistent connections it
collects next to nothing either way (0.1% of its CPU).  A request is now usually
answered, and its objects freed by reference counting, before a collection would have
looked at them; reference cycles wait a little longer (bounded by the threshold, a few
MB at most).
"""

from __future__ import annotations

import gc

#: Allocations (net, of objects the cyclic GC tracks) between two young-generation
#: collections while serving; Python's default is 700.
SERVING_GC_THRESHOLD = 10_000


def tune_gc_for_serving() -> None:
    """Collect the young generation every :data:`SERVING_GC_THRESHOLD` allocations.

    Process-wide: call it from the serving process's entry point, not from a library.
    The older generations keep their thresholds.
    """
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(SERVING_GC_THRESHOLD, older, oldest)
