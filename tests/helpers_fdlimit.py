"""Start a program with a low soft RLIMIT_NOFILE, as a default of 1024 would be (plain imports)."""

from __future__ import annotations

import resource


def lowered_soft_limit(soft: int = 256):
    """A ``preexec_fn`` that starts the program with a low soft limit, as a default 1024 is."""

    def lower():
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, hard), hard))

    return lower


def hard_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]
