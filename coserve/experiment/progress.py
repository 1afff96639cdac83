"""What a run shows while it works: condition, rep, phase and live figures.

On a terminal a rich live panel redraws a few times a second; otherwise (CI, a log file)
one plain line per phase and per finished rep, so a log reads as a timeline."""

from __future__ import annotations

import time
from typing import Any

from coserve.experiment.failure import why


def _fmt(v: float | None, unit: str) -> str:
    return "-" if v is None else f"{v:,.1f} {unit}"


class Progress:
    def __init__(self, title: str, total: int, console: Any = None, live: bool | None = None):
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.title = title
        self.total = total
        self.index = 0
        self.condition = ""
        self.rep = ""
        self.phase_name = ""
        self.phase_t0 = time.monotonic()
        self.t0 = time.monotonic()
        self.figures: dict[str, Any] = {}
        self.done: list[str] = []
        self.live_on = self.console.is_terminal if live is None else live
        self._live = None

    # -- lifecycle
    def __enter__(self) -> Progress:
        if self.live_on:
            from rich.live import Live

            self._live = Live(
                self._render(),
                console=self.console,
                refresh_per_second=4,
                transient=False,
                get_renderable=self._render,
            )
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)
            self._live = None

    # -- events from the runner
    def start_rep(self, condition: str, rep: int, reps: int) -> None:
        self.index += 1
        self.condition, self.rep = condition, f"{rep}/{reps}"
        self.figures = {}
        self._line(f"[{self.index}/{self.total}] {condition} rep {self.rep}")

    def skip_rep(self, condition: str, rep: int, reps: int) -> None:
        self.index += 1
        self.done.append(f"{condition} rep {rep}/{reps}: done earlier")
        self._line(
            f"[{self.index}/{self.total}] {condition} rep {rep}/{reps}: finished earlier, skipped"
        )

    def phase(self, name: str) -> None:
        self.phase_name = name
        self.phase_t0 = time.monotonic()
        self.figures = {k: v for k, v in self.figures.items() if k not in ("elapsed_s", "total_s")}
        self._line(f"    {self.condition} rep {self.rep}: {name}")

    def load_progress(self, p: Any) -> None:
        """Called by the load generator about twice a second."""
        f = p if isinstance(p, dict) else vars(p)
        self.figures = f
        if self._live is None:
            return
        self.phase_name = {"warmup": "warm-up", "measure": "measuring"}.get(
            f.get("phase"), f.get("phase", "")
        )

    def end_rep(self, record: dict) -> None:
        line = f"{record['condition']} rep {record['rep']}: {record['status']}"
        bench = record.get("bench") or {}
        figs = []
        if bench.get("gen"):
            figs.append(f"gen {bench['gen']['output_tokens_per_s']:,.1f} tok/s")
        if bench.get("embed"):
            figs.append(f"embed {bench['embed']['sequences_per_s']:,.1f} seq/s")
        if record.get("error"):
            figs.append(why(record["error"]))
        text = f"{line} ({', '.join(figs)}; {record.get('elapsed_s', 0):.1f} s)" if figs else line
        self.done.append(text)
        self._line(f"    {text}", force=True)

    def message(self, text: str) -> None:
        self._line(text, force=True)

    # -- output
    def _line(self, text: str, force: bool = False) -> None:
        if self._live is not None:
            if force:
                self._live.console.print(text, markup=False, highlight=False)
            return
        print(text, file=self.console.file, flush=True)

    def _render(self):
        from rich.panel import Panel
        from rich.table import Table
        from rich.text import Text

        t = Table.grid(padding=(0, 2))
        t.add_column(style="bold")
        t.add_column()
        elapsed = time.monotonic() - self.t0
        t.add_row("rep", f"{self.index}/{self.total}   (elapsed {elapsed:,.0f} s)")
        t.add_row("condition", f"{self.condition}  rep {self.rep}")
        phase_s = time.monotonic() - self.phase_t0
        f = self.figures
        extra = ""
        if f.get("total_s"):
            extra = f"  {f.get('elapsed_s', 0):.1f} / {f['total_s']:.1f} s"
        t.add_row("phase", f"{self.phase_name}{extra or f'  {phase_s:.0f} s'}")
        if f:
            t.add_row(
                "gen",
                f"{_fmt(f.get('gen_tok_s'), 'tok/s')}   in flight {f.get('gen_in_flight', 0)}"
                f"   done {f.get('gen_completed', 0)}   failed {f.get('gen_failed', 0)}",
            )
            t.add_row(
                "embed",
                f"{_fmt(f.get('embed_seq_s'), 'seq/s')}   in flight {f.get('embed_in_flight', 0)}"
                f"   done {f.get('embed_completed', 0)}   failed {f.get('embed_failed', 0)}",
            )
        return Panel(t, title=Text(self.title), expand=False)  # a path, never markup
