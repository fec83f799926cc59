"""Open-file headroom: raise the soft ``RLIMIT_NOFILE`` to the hard limit at start.

Why: both programs hold one descriptor per client connection (Dovecot keeps a
dict connection per IMAP session; the relay's notifier keeps HTTP connections
to the proxy), and the usual soft limit of 1024 is reached long before the
hard one (at 1,145 sockets the proxy stopped answering).  Raising the soft
limit needs no privilege.  It is only attempted when the soft limit is below
the hard one: under the systemd units ``LimitNOFILE=`` already sets both, and
their ``SystemCallFilter=~@resources`` must not be tested for nothing.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass


@dataclass(frozen=True)
class OpenFilesLimit:
    """The soft limit found at start (``before``) and the limits in effect now."""

    before: int
    soft: int
    hard: int
    error: str | None = None

    def describe(self) -> str:
        """One log line's worth: the figure, and whether (and why not) it was raised."""
        if self.error:
            hard = _figure(self.hard)
            return f"open files limit: {self.soft} (hard {hard}; not raised: {self.error})"
        if self.soft != self.before:
            return f"open files limit: raised from {self.before} to {self.soft}"
        return f"open files limit: {self.soft} (hard {_figure(self.hard)})"


def _figure(limit: int) -> str:
    return "unlimited" if limit == resource.RLIM_INFINITY else str(limit)


def raise_open_files_limit() -> OpenFilesLimit:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; never raises.

    An unlimited hard limit (not possible on Linux, where the kernel caps it at
    ``fs.nr_open``) leaves the soft limit as it is: there is no figure to raise it to.
    """
    before, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if before >= hard or hard == resource.RLIM_INFINITY:
        return OpenFilesLimit(before, before, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as exc:
        return OpenFilesLimit(before, before, hard, error=str(exc))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return OpenFilesLimit(before, soft, hard)
