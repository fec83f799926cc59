"""Hypothesis settings for the live fuzz tests (plain imports)."""

from __future__ import annotations

from hypothesis import HealthCheck, settings


def bounded(max_examples: int) -> settings:
    """A fixed, replayable run: derandomized, no example database, no deadline (a live
    server on a loaded machine is slow, and slowness is not what these tests judge)."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
