"""Live progress of a load run with `rich`: phase and time, tok/s, seq/s, in flight, errors.
Shown only on a terminal; elsewhere (CI, logs, a runner capturing output) it stays quiet."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from coserve.bench.records import Progress


def _fmt(v: float | None, unit: str) -> str:
    return "-" if v is None else f"{v:,.0f} {unit}"


class LiveProgress:
    """`with LiveProgress(warmup_s, duration_s) as lp: run_load(cfg, on_progress=lp.update)`.
    Does nothing when the console is not a terminal (or `enabled` is False)."""

    def __init__(
        self,
        warmup_s: float,
        duration_s: float,
        console: Console | None = None,
        enabled: bool | None = None,
    ):
        self.console = console or Console(stderr=True)
        self.enabled = self.console.is_terminal if enabled is None else enabled
        self.warmup_s = warmup_s
        self.duration_s = duration_s
        self._live: Live | None = None
        self.last: Progress | None = None

    def __enter__(self) -> LiveProgress:
        if self.enabled:
            self._live = Live(
                self._render(None), console=self.console, refresh_per_second=4, transient=True
            )
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)
            self._live = None

    def update(self, p: Progress) -> None:
        self.last = p
        if self._live is not None:
            self._live.update(self._render(p))

    def _render(self, p: Progress | None):
        if p is None:
            return Text("starting load ...")
        if p.phase == "warmup":
            head = f"warm-up   {p.elapsed_s:6.1f} / {self.warmup_s:g} s"
            frac = p.elapsed_s / max(self.warmup_s, 1e-9)
        else:
            t = p.elapsed_s - self.warmup_s
            head = f"measuring {t:6.1f} / {self.duration_s:g} s"
            frac = t / max(self.duration_s, 1e-9)
        width = 30
        filled = int(max(0.0, min(1.0, frac)) * width)
        bar = "[" + "#" * filled + "." * (width - filled) + "]"
        table = Table(box=None, show_header=True, header_style="bold", pad_edge=False)
        table.add_column("")
        table.add_column("rate", justify="right")
        table.add_column("in flight", justify="right")
        table.add_column("completed", justify="right")
        table.add_column("errors", justify="right")
        if p.gen_tok_s is not None:
            table.add_row(
                "gen",
                _fmt(p.gen_tok_s, "tok/s"),
                str(p.gen_in_flight),
                str(p.gen_completed),
                Text(str(p.gen_failed), style="red" if p.gen_failed else ""),
            )
        if p.embed_seq_s is not None:
            table.add_row(
                "embed",
                _fmt(p.embed_seq_s, "seq/s"),
                str(p.embed_in_flight),
                str(p.embed_completed),
                Text(str(p.embed_failed), style="red" if p.embed_failed else ""),
            )
        grid = Table.grid()
        grid.add_row(Text(f"{head}  {bar}", style="bold cyan"))
        grid.add_row(table)
        return grid


def is_terminal() -> bool:
    return sys.stderr.isatty()
