"""The verdict of one push, as both the proxy and the relay's notifier understand it.

A provider reports it, the proxy's HTTP front end encodes it as a status (200,
410, anything else), the relay's HTTP transport decodes that status again, and
the in-process (embedded) path hands it over as it is.
"""

from __future__ import annotations

import enum


class Outcome(enum.Enum):
    SENT = "sent"  # accepted by the push service (or debounced) -> the job is done
    GONE = "gone"  # the token is permanently dead -> the relay deletes it
    RETRY = "retry"  # anything else: keep the token, try again later
