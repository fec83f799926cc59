"""Logging to stderr, journald-aware: one setup for both programs.

Under systemd stderr is the journal: lines then carry ``<N>`` priority prefixes
(sd-daemon(3)) and no timestamps of our own, so journald stores each line with its
real level and its own time.  Elsewhere lines get a timestamp and the level name.
"""

from __future__ import annotations

import logging
import os
import sys

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
