"""The report's building blocks: a Block (heading, paragraph, table, image ...) and the
number formats every table uses."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from coserve.report.aggregate import ConditionStats
from coserve.stats import Delta, Summary


@dataclass
class Block:
    kind: str  # "h2" | "h3" | "p" | "table" | "img" | "ul" | "pre"
    text: str = ""
    headers: list[str] | None = None
    rows: list[list[str]] | None = None
    items: list[str] | None = None
    path: Path | None = None
    align: str = ""  # per table column: "l" or "r" (default: first left, the rest right)

    def aligns(self) -> str:
        n = len(self.headers or [])
        return (self.align or "l" + "r" * (n - 1)).ljust(n, "r")


# ------------------------------------------------------------------ number formats


def num(v: float | None) -> str:
    if v is None:
        return "-"
    a = abs(v)
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def frac(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def with_ci(s: Summary | None, fmt=num) -> str:
    if s is None:
        return "-"
    if s.half_width is None:
        return fmt(s.mean)
    return f"{fmt(s.mean)} ± {fmt(s.half_width)}"


def pct(d: Delta | None) -> str:
    if d is None:
        return "-"
    text = f"**{d.pct:+.1f}%**"
    if d.ci_low is None:
        return text + " (n=1: no CI)"
    return f"{text} [{d.ci_low:+.1f}, {d.ci_high:+.1f}]"


def status_text(c: ConditionStats) -> str:
    return {
        "complete": f"{len(c.ok)}/{c.planned}",
        "partial": f"{len(c.ok)}/{c.planned} (partial)",
        "failed": f"0/{c.planned} (failed)",
        "not run": f"0/{c.planned} (not run)",
    }[c.status]
