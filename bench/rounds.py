"""Pairs measured in alternating rounds, judged by the median ratio and its spread.

On a loaded machine one figure against one baseline flips with the noise; the same
pair measured several times, ours first in one round and the baseline first in the
next, gives a ratio per round whose median (and min..max) means something.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

from bench.table import Figure

ROUNDS = 5


@dataclass(frozen=True)
class Ratios:
    """Per-round ratios ours/baseline of one pair."""

    ours: list[float]
    base: list[float]

    @property
    def ratios(self) -> list[float]:
        return [o / b if b else 0.0 for o, b in zip(self.ours, self.base, strict=True)]

    @property
    def median(self) -> float:
        return statistics.median(self.ratios)

    def spread(self) -> str:
        r = self.ratios
        return f"{min(r):.2f}-{max(r):.2f}x"

    def shown(self) -> str:
        return f"{self.median:.2f}x ({self.spread()}, {len(self.ratios)} rounds)"


def alternate(ours: Callable[[], float], base: Callable[[], float], rounds: int = ROUNDS) -> Ratios:
    """Run ``ours`` and ``base`` ``rounds`` times each, alternating which goes first."""
    got_ours: list[float] = []
    got_base: list[float] = []
    for k in range(rounds):
        if k % 2 == 0:
            got_ours.append(ours())
            got_base.append(base())
        else:
            got_base.append(base())
            got_ours.append(ours())
        print(
            f"  round {k + 1}: ours {got_ours[-1]:,.0f}/s, baseline {got_base[-1]:,.0f}/s, "
            f"{got_ours[-1] / got_base[-1]:.2f}x",
            flush=True,
        )
    return Ratios(got_ours, got_base)


def ratio_figure(name: str, pair: Ratios, target: float) -> Figure:
    """A summary line judging the median ratio; the spread goes with the name."""
    return Figure(
        f"{name} (spread {pair.spread()}, {len(pair.ratios)} rounds)",
        pair.median,
        "x",
        f">= {target:.2f}x",
        pair.median >= target,
    )
