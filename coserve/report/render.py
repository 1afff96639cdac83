"""The report: one list of blocks (headings, paragraphs, tables, images) rendered twice, as
`report.md` (images linked) and as a self-contained `report.html` (images inlined base64)."""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import re
from dataclasses import dataclass
from pathlib import Path

from coserve.experiment.fingerprint import describe_gpus
from coserve.experiment.rep import read_trace
from coserve.experiment.rundir import write_atomic
from coserve.report import plots, profile_plots
from coserve.report.aggregate import RunStats, aggregate, embed_baseline
from coserve.report.blocks import Block
from coserve.report.load_tables import equal_work_blocks, goodput_blocks, load_blocks
from coserve.report.profile_section import profile_blocks
from coserve.report.sections import (
    cost_note,
    environment_blocks,
    latency_tables,
    per_rep_table,
    problems_blocks,
    settings_blocks,
    sweep_blocks,
    throughput_table,
)
from coserve.report.telemetry_section import telemetry_blocks
from coserve.report.tradeoff import equal_work_checks, tradeoff
from coserve.report.verdict import verdict


def _embed_baseline_text(run: RunStats) -> str:
    """The report's sentence on what embed deltas are against, and why there are none."""
    emb = embed_baseline(run.spec)
    if emb is None:
        return "no condition runs embed alone, so there are no embed deltas."
    if not any(c.ok for c in run.conditions if c.name == emb):
        return f"embed deltas against **{emb}**, which finished no rep: none yet."
    return f"embed deltas against **{emb}**."


def build(run: RunStats, plot_paths: dict[str, Path]) -> list[Block]:
    spec = run.spec
    done = sum(len(c.ok) for c in run.conditions)
    planned = sum(c.planned for c in run.conditions)
    blocks = [Block("h1", f"coserve report: {spec.name}")]
    if run.unreadable:
        blocks.append(Block("p", f"**Warning:** {run.unreadable_text()}"))
    if spec.description:
        blocks.append(Block("p", spec.description.strip()))
    blocks.append(
        Block(
            "p",
            f"{done} of {planned} reps finished; {describe_gpus(run.fingerprint)}. "
            f"Gen deltas are against **{spec.baseline}** (unless a condition names its own "
            "baseline); " + _embed_baseline_text(run),
        )
    )
    line = verdict(run)
    if line:
        blocks.append(Block("p", line))
    blocks += [
        Block("h2", "Throughput"),
        throughput_table(run),
        Block(
            "p",
            "Mean over finished reps ± the 95% CI half-width (Student's t). Delta: "
            "condition mean / baseline mean - 1, with its 95% CI [low, high] "
            "(delta method, Welch degrees of freedom). Throughput counts what arrived "
            "inside the measurement window." + cost_note(run, run.matrix),
        ),
        *equal_work_blocks(run),
    ]
    if "tradeoff" in plot_paths:
        blocks.append(
            Block("img", "Trade-off: gen against achieved embed work", path=plot_paths["tradeoff"])
        )
    turns = tradeoff(run).turns_sentence()
    if turns:
        blocks.append(Block("p", turns))
    if "tradeoff" in plot_paths:
        if run.spec.report.reference != "none":
            blocks.append(
                Block(
                    "p",
                    "Marked X: the published figures named in the spec's "
                    "[report] reference, drawn beside ours, not measured here.",
                )
            )
    blocks += load_blocks(run)
    blocks += goodput_blocks(run)
    if "throughput" in plot_paths:
        blocks.append(Block("img", "Throughput per condition", path=plot_paths["throughput"]))
    rep_table = per_rep_table(run)
    if rep_table is not None:
        blocks += [Block("h3", "Gen throughput per rep (tok/s)"), rep_table]
    blocks += [Block("h2", "Latency"), *latency_tables(run)]
    if "tpot" in plot_paths:
        blocks.append(Block("img", "TPOT distribution", path=plot_paths["tpot"]))
    blocks += telemetry_blocks(run)
    if "telemetry" in plot_paths:
        blocks.append(Block("img", "GPU telemetry over time", path=plot_paths["telemetry"]))
    blocks += _guard_blocks(run, plot_paths)
    blocks += sweep_blocks(run)
    if "sweep" in plot_paths:
        blocks.append(
            Block("img", f"{run.spec.sweep.knob.capitalize()} sweep", path=plot_paths["sweep"])
        )
    blocks += profile_blocks(run.run_dir.path, _order(run), plot_paths)
    blocks += problems_blocks(run)
    blocks += settings_blocks(run)
    blocks += environment_blocks(run)
    return blocks


def _guard_blocks(run: RunStats, plot_paths: dict[str, Path]) -> list[Block]:
    """The SLO guard section: its plot, and a note naming each finished rep's
    `slo_guard.jsonl` with lines that are no sample (skipped, by the plot too). [] with
    neither."""
    skipped = []
    for c in run.conditions:
        for r in c.ok:
            path = run.run_dir.rep_dir(c.name, r["rep"]) / "slo_guard.jsonl"
            try:
                n = read_trace(path).skipped if path.exists() else 0
            except OSError:  # no trace to plot either
                continue
            if n:
                skipped.append(f"{n} line(s) of `{path.relative_to(run.run_dir.path)}`")
    out = []
    if "guard" in plot_paths:
        out += [
            Block(
                "p",
                "The guard's figures sampled through the load (of each guarded condition, "
                "the first finished rep whose `slo_guard.jsonl` holds figures): gen's step "
                "time against the budget, "
                "the probes that hold embed to measure gen alone, and embed's allowance.",
            ),
            Block("img", "SLO guard over time", path=plot_paths["guard"]),
        ]
    if skipped:
        out.append(
            Block(
                "p",
                "**Note:** lines of the guard's trace that are no JSON sample (cut short, or "
                "junk) were skipped: " + "; ".join(skipped) + ".",
            )
        )
    return [Block("h2", "SLO guard"), *out] if out else []


def _order(run: RunStats) -> list[str]:
    return [c.name for c in run.spec.all_conditions()]


# ------------------------------------------------------------------ renderers


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list[Block], base: Path) -> str:
    out = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            out.append("#" * int(b.kind[1]) + " " + b.text)
        elif b.kind == "p":
            out.append(b.text)
        elif b.kind == "ul":
            out.append("\n".join(f"- {i}" for i in b.items or []))
        elif b.kind == "pre":
            out.append(f"```\n{b.text}\n```")
        elif b.kind == "img":
            out.append(f"![{b.text}]({b.path.relative_to(base).as_posix()})")
        elif b.kind == "table":
            lines = [
                "| " + " | ".join(b.headers) + " |",
                "|" + "|".join("---:" if a == "r" else "---" for a in b.aligns()) + "|",
            ]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows or []]
            out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
    s = html.escape(text, quote=False)
    s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", s)


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;
margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #4c72b0;padding-bottom:.2em}h2{margin-top:1.6em;color:#2a4a80}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.3em .7em}th{background:#eef2f8}
.r{text-align:right}.l{text-align:left}tr:nth-child(even) td{background:#fafafa}
img{max-width:100%;border:1px solid #ddd;margin:.5em 0}code{background:#f2f2f2;padding:0 .2em}
"""


def to_html(blocks: list[Block], title: str) -> str:
    out = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body>"
    ]
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            out.append(f"<{b.kind}>{_inline(b.text)}</{b.kind}>")
        elif b.kind == "p":
            out.append(f"<p>{_inline(b.text)}</p>")
        elif b.kind == "ul":
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b.items or []) + "</ul>")
        elif b.kind == "pre":
            out.append(f"<pre>{html.escape(b.text)}</pre>")
        elif b.kind == "img":
            data = base64.b64encode(b.path.read_bytes()).decode()
            out.append(
                f"<figure><img alt='{html.escape(b.text)}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{html.escape(b.text)}</figcaption></figure>"
            )
        elif b.kind == "table":
            al = b.aligns()
            head = "".join(
                f"<th class='{a}'>{_inline(h)}</th>" for h, a in zip(b.headers, al, strict=True)
            )
            body = "".join(
                "<tr>"
                + "".join(
                    f"<td class='{a}'>{_inline(c)}</td>" for c, a in zip(row, al, strict=True)
                )
                + "</tr>"
                for row in b.rows or []
            )
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    out.append(
        "<p style='color:#888;font-size:.8em'>Rendered by coserve report, "
        f"{stamp}.</p></body></html>"
    )
    return "\n".join(out) + "\n"


@dataclass
class Rendered:
    run: RunStats
    markdown: Path
    html: Path
    stats: Path
    plots: dict[str, Path]


def render(path: str | Path, with_plots: bool = True) -> Rendered:
    """(Re-)render DIR/report.md, DIR/report.html, DIR/stats.json and DIR/plots/*.png."""
    run = aggregate(path)
    base = run.run_dir.path
    plot_paths = plots.make_all(run, base / "plots") if with_plots else {}
    if with_plots:
        plot_paths.update(profile_plots.make(base, _order(run), base / "plots"))
    blocks = build(run, plot_paths)
    md, htm, st = base / "report.md", base / "report.html", base / "stats.json"
    write_atomic(md, to_markdown(blocks, base))
    write_atomic(htm, to_html(blocks, f"coserve report: {run.spec.name}"))
    st_data = {**run.to_dict(), "equal_work": [e.to_dict() for e in equal_work_checks(run)]}
    write_atomic(st, json.dumps(st_data, indent=2) + "\n")
    return Rendered(run, md, htm, st, plot_paths)


def console_table(run: RunStats, only: set[str] | None = None):
    """The throughput table as a rich Table, for the terminal; its caption says whether the
    compared conditions did equal embed work. `only`: the rows of these conditions (and their
    sweep points) alone, as for a profile of some of a spec's conditions."""
    from rich.markup import escape
    from rich.table import Table

    b = throughput_table(run)
    caption = "\n".join(escape(e.sentence().replace("**", "")) for e in equal_work_checks(run))
    t = Table(
        title=f"{run.spec.name}: throughput (mean ± 95% CI)",
        caption=caption or None,
        caption_justify="left",
    )
    for h, a in zip(b.headers, b.aligns(), strict=True):
        t.add_column(h, justify="right" if a == "r" else "left")
    for row in b.rows:
        if only is None or row[0].split(".")[0] in only:
            t.add_row(*[c.replace("**", "") for c in row])
    return t
