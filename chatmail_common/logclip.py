"""Cap client-supplied text in log lines: a client decides how long its values are, not the log.

A dict line may be a mebibyte long (a transaction id, a key, a user name); quoted in
full it makes one log line of that size.  Only logs are capped: a reply echoes what the
protocol requires, exactly.
"""

from __future__ import annotations

#: Bytes of a quoted value kept in a log line: enough to recognise it, small enough
#: that a hostile client cannot make one line longer than a terminal screen.
LOG_VALUE_LIMIT = 200


def clip(value: object, limit: int = LOG_VALUE_LIMIT) -> str:
    """``str(value)`` cut to ``limit`` characters, saying how long it was when cut."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} chars)"
