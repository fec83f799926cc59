"""Plain-text tables for the benchmark output (no dependencies)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def fmt(value: object, digits: int = 0) -> str:
    """Numbers with thousands separators; floats below 100 get a few decimals."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if digits:
            return f"{value:,.{digits}f}"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:,.1f}"
        return f"{value:,.2f}"
    return str(value)


def ratio(value: float | None, base: float | None) -> str:
    if not value or not base:
        return "-"
    return f"{value / base:.2f}x"


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))

    def line(items: Sequence[str]) -> str:
        out = []
        for i, c in enumerate(items):
            out.append(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]))
        return "  ".join(out).rstrip()

    print()
    print(f"== {title}")
    print(line(list(headers)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print(line(row))
    print(flush=True)


@dataclass
class Figure:
    """One line of the final summary: a measured figure against its target."""

    name: str
    value: float | None
    unit: str
    target: str
    met: bool | None

    def row(self) -> list[object]:
        shown = "failed" if self.value is None else f"{fmt(self.value)} {self.unit}".strip()
        met = "-" if self.met is None else ("yes" if self.met else "NO")
        return [self.name, shown, self.target, met]


def at_least(name: str, value: float | None, target: float, unit: str) -> Figure:
    met = None if value is None else value >= target
    return Figure(name, value, unit, f">= {fmt(target)} {unit}".strip(), met)


def at_most(name: str, value: float | None, target: float, unit: str) -> Figure:
    met = None if value is None else value <= target
    return Figure(name, value, unit, f"<= {fmt(target)} {unit}".strip(), met)


def print_summary(figures: Sequence[Figure]) -> None:
    print_table("summary", ["figure", "value", "target", "met"], [f.row() for f in figures])
