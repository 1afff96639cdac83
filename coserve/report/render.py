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

from coserve.experiment.failure import why
from coserve.experiment.fingerprint import describe_gpus
from coserve.experiment.preflight import GPU_STRATEGIES
from coserve.experiment.rundir import write_atomic
from coserve.report import plots
from coserve.report.aggregate import ConditionStats, RunStats, aggregate, embed_baseline
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
    return {"complete": f"{len(c.ok)}/{c.planned}", "partial": f"{len(c.ok)}/{c.planned} (partial)",
            "failed": f"0/{c.planned} (failed)", "not run": f"0/{c.planned} (not run)"}[c.status]


# ------------------------------------------------------------------ sections


def on_cpu(run: RunStats) -> bool:
    """A run whose servers all ran on the CPU (strategies and GPU settings mean nothing there):
    built-in servers on device cpu (or auto on a machine without GPUs), others only on a
    machine without GPUs, and no GPU-only strategy in the spec (those cannot run on a CPU)."""
    conds = run.spec.all_conditions()
    no_gpu = not run.fingerprint.get("gpus")
    if any(c.strategy in GPU_STRATEGIES for c in conds):
        return False
    servers = [c.server(run.spec, role) for c in conds for role in c.servers]
    return all(s.device == "cpu" or no_gpu and (s.device == "auto" or s.launcher != "builtin")
               for s in servers)


def strategy_text(run: RunStats, c) -> str:
    """The strategy, or on a CPU run what it amounts to (both servers on the same cores)."""
    if not on_cpu(run):
        return c.strategy
    return "CPU, shared" if len(c.servers) > 1 else "CPU"


def verdict(run: RunStats) -> str | None:
    """One line (markdown): what co-location cost each server against running alone; on a CPU
    run, why the figures say nothing about GPUs (and about co-located gen coming out faster).
    None when no condition runs both servers."""
    both = [c for c in run.matrix if {"gen", "embed"} <= set(c.condition.servers)
            and (c.gen_delta or c.embed_delta)]
    if not both:
        return None
    parts = [f"{c.name}: gen {pct(c.gen_delta)}, embed {pct(c.embed_delta)}" for c in both]
    text = "**Verdict:** co-located against each server alone: " + "; ".join(parts) + "."
    if on_cpu(run):
        text += (" This ran on a CPU: both servers' threads and the load generator share the same "
                 "cores, so these deltas measure how the OS schedules them, not how GPUs are shared.")
        faster = [c.name for c in both if c.gen_delta and c.gen_delta.pct > 0]
        if faster:
            text += (f" Gen came out faster co-located ({', '.join(faster)}) than alone: a CPU "
                     "scheduling effect (co-location gives it no extra compute) that says nothing "
                     "about GPUs.")
    return text


def throughput_table(run: RunStats) -> Block:
    rows = []
    for c in run.matrix:
        gen = c.summary.get("gen_tok_s")
        if "gen" not in c.condition.servers:
            gen_cell, gd = "-", "-"
        else:
            gen_cell = with_ci(gen) if gen else "(none)"
            gd = "baseline" if c.gen_baseline == c.name else pct(c.gen_delta)
        if "embed" not in c.condition.servers:
            emb_cell, ed = "-", "-"
        else:
            emb_cell = with_ci(c.summary.get("embed_seq_s")) if c.summary.get("embed_seq_s") else "(none)"
            ed = "baseline" if c.embed_baseline == c.name else pct(c.embed_delta)
        rows.append([c.name, strategy_text(run, c.condition), status_text(c), gen_cell, gd, emb_cell, ed])
    return Block("table", headers=["Condition", "Strategy", "Reps", "Gen (tok/s)", "Gen delta",
                                   "Embed (seq/s)", "Embed delta"], rows=rows, align="llr")


def per_rep_table(run: RunStats) -> Block | None:
    most = max((c.planned for c in run.matrix), default=0)
    if most < 2:
        return None
    rows = []
    for c in run.matrix:
        if "gen_tok_s" not in c.values and "embed_seq_s" not in c.values:
            continue
        by_rep = {r["rep"]: r for r in c.ok}
        cells = []
        for k in range(1, most + 1):
            v = (by_rep.get(k) or {}).get("bench", {}) or {}
            g = (v.get("gen") or {}).get("output_tokens_per_s")
            cells.append(num(g) if g is not None else ("failed" if any(f["rep"] == k for f in c.failed) else "-"))
        s = c.summary.get("gen_tok_s")
        std = f"{s.std / s.mean * 100:.1f}%" if s and s.std is not None and s.mean else "-"
        rows.append([c.name, *cells, num(c.mean("gen_tok_s")), std, num(c.mean("embed_seq_s"))])
    return Block("table", headers=["Condition", *[f"Rep {k}" for k in range(1, most + 1)],
                                   "Gen mean", "Gen std", "Embed mean"], rows=rows)


def latency_tables(run: RunStats) -> list[Block]:
    out = []
    gen = [c for c in run.matrix if "gen" in c.condition.servers and c.ok]
    if gen:
        out.append(Block("h3", "Per-token decode latency (TPOT, ms)"))
        out.append(Block("table", headers=["Condition", "p50", "p95", "p99", "mean"],
                         rows=[[c.name, *(with_ci(c.summary.get(f"tpot_{p}")) for p in ("p50", "p95", "p99", "mean"))]
                               for c in gen]))
        out.append(Block("h3", "Time to first token (TTFT, ms)"))
        out.append(Block("table", headers=["Condition", "p50", "p95", "p99", "mean"],
                         rows=[[c.name, *(with_ci(c.summary.get(f"ttft_{p}")) for p in ("p50", "p95", "p99", "mean"))]
                               for c in gen]))
    emb = [c for c in run.matrix if "embed" in c.condition.servers and c.ok]
    if emb:
        out.append(Block("h3", "Embed request latency (ms, one request = a batch)"))
        out.append(Block("table", headers=["Condition", "p50", "p95", "p99", "mean"],
                         rows=[[c.name, *(with_ci(c.summary.get(f"embed_lat_{p}")) for p in ("p50", "p95", "p99", "mean"))]
                               for c in emb]))
    if out:
        out.append(Block("p", "Each cell: the mean over reps of that rep's percentile, ± the 95% CI "
                              "half-width; requests that ended inside the measurement window."))
    return out


def telemetry_blocks(run: RunStats) -> list[Block]:
    out = [Block("h2", "GPU telemetry")]
    rows = []
    for c in run.matrix:
        if any(m in c.summary for m in ("sm_active", "sm_occupancy", "tensor_active", "dram_active")):
            rows.append([c.name, *(with_ci(c.summary.get(m), frac) for m in
                                   ("sm_active", "sm_occupancy", "tensor_active", "dram_active")),
                         with_ci(c.summary.get("power_w"))])
    if rows:
        out.append(Block("table", headers=["Condition", "SM active", "SM occupancy", "Tensor active",
                                           "DRAM active", "Power (W)"], rows=rows))
        out.append(Block("p", "NVML GPM metrics (the study's DCGM fields), fractions 0-1, mean over "
                              "the samples inside the measurement window. GPM is device-wide: on a "
                              "shared GPU it cannot split gen from embed."))
        return out
    notes = set()
    for c in run.matrix:
        for r in c.ok:
            t = r.get("telemetry") or {}
            if t.get("status"):
                notes.add(t["status"])
    why = "; ".join(sorted(notes)) or describe_gpus(run.fingerprint)
    out.append(Block("p", f"No GPU telemetry in this run: {why}."))
    return out


def sweep_blocks(run: RunStats) -> list[Block]:
    if run.spec.sweep is None:
        return []
    sw = run.spec.sweep
    out = [Block("h2", f"Concurrency sweep ({sw.role})")]
    rows = []
    for c in sorted(run.sweep, key=lambda c: (c.condition.sweep[2], c.condition.sweep[1])):
        _, conc, base = c.condition.sweep
        rows.append([base, str(conc), status_text(c), with_ci(c.summary.get("gen_tok_s")),
                     with_ci(c.summary.get("tpot_p50")), with_ci(c.summary.get("embed_seq_s")),
                     with_ci(c.summary.get("embed_lat_p50"))])
    out.append(Block("table", align="lr", headers=["Condition", f"{sw.role} C", "Reps", "Gen (tok/s)", "TPOT p50 (ms)",
                                       "Embed (seq/s)", "Embed p50 (ms)"], rows=rows))
    best = run.sweep_optimum()
    unit = "tok/s" if sw.role == "gen" else "seq/s"
    if best:
        out.append(Block("p", "Throughput-optimal concurrency: " + "; ".join(
            f"**{base}: C={conc}** ({num(v)} {unit})" for base, (conc, v) in best.items())))
    else:
        out.append(Block("p", "No sweep point has finished yet."))
    return out


def problems_blocks(run: RunStats) -> list[Block]:
    rows = []
    for c in run.conditions:
        if c.status == "complete":
            continue
        if c.failed:
            for f in c.failed:
                rows.append([c.name, f"rep {f['rep']} failed", why(f.get("error"))])
        missing = c.planned - len(c.ok) - len(c.failed)
        if missing > 0:
            rows.append([c.name, "not run", f"{missing} of {c.planned} rep(s) not run yet "
                                            f"(`coserve run SPEC --out DIR --resume`)"])
    if not rows:
        return []
    return [Block("h2", "Missing or failed"),
            Block("p", "These conditions are not complete; their figures above (if any) come from "
                       "the reps that finished."),
            Block("table", headers=["Condition", "Status", "Detail"], rows=rows, align="lll")]


def environment_blocks(run: RunStats) -> list[Block]:
    fp = run.fingerprint
    pk = ", ".join(f"{k} {v}" for k, v in fp.get("packages", {}).items() if v)
    git = fp.get("git") or {}
    items = [
        f"GPU: {describe_gpus(fp)}" + (f", CUDA driver {fp['cuda_driver']}" if fp.get("cuda_driver") else ""),
        f"CPU: {fp.get('cpu', {}).get('model')} x {fp.get('cpu', {}).get('count')}; host {fp.get('host')}",
        f"coserve {fp.get('coserve')}, commit {str(git.get('commit'))[:12]}{' (with local changes)' if git.get('dirty') else ''}; "
        f"Python {fp.get('python')}; {pk}",
        f"Spec `{run.spec.name}` hash {run.spec.digest()[:12]}; run folder started {fp.get('created')}",
    ]
    hosts = {json.dumps((r.get("env") or {}).get("git"), sort_keys=True) for c in run.conditions for r in c.ok}
    if len(hosts) > 1:
        items.append("Reps ran at different commits (resumed runs); each rep's rep.json says which.")
    return [Block("h2", "Environment"), Block("ul", items=items)]


def tensor_parallel_size(c, role: str, configured: int) -> int:
    """The TP degree a condition runs `role` with (tp strategies decide it themselves)."""
    if not c.strategy.startswith("tp"):
        return configured
    from coserve.gpu.strategies import make_strategy

    return make_strategy(c.strategy, list(c.gpus), dict(c.options), Path(".")).tensor_parallel_size(role)


def settings_blocks(run: RunStats) -> list[Block]:
    spec = run.spec
    rows = []
    for c in spec.conditions:
        parts = []
        for role in c.servers:
            s = c.server(spec, role)
            what = s.url if s.launcher == "external" else s.model
            extra = []
            if s.launcher != "external" and not on_cpu(run):
                extra.append(f"util {s.gpu_memory_utilization:g}")
                if s.enforce_eager:
                    extra.append("eager")
                tp = tensor_parallel_size(c, role, s.tensor_parallel_size)
                if tp > 1:
                    extra.append(f"TP={tp}")
            detail = s.launcher + (f"; {', '.join(extra)}" if extra else "")
            parts.append(f"{role}: {what} ({detail})")
        load = c.load_for(spec)
        loads = []
        if "gen" in c.servers:
            loads.append(f"gen C={load.gen_concurrency}, {load.input_len} in / {load.output_len} out")
        if "embed" in c.servers:
            loads.append(f"embed C={load.embed_concurrency} x batch {load.embed_batch}, {load.embed_input_len} tok")
        rows.append([c.name, strategy_text(run, c), "CPU" if on_cpu(run) else ",".join(c.gpus),
                     "; ".join(parts), "; ".join(loads)])
    load = spec.load
    return [Block("h2", "Settings"),
            Block("p", f"{spec.repetitions} rep(s) per condition, order {spec.order}; "
                       f"{load.warmup_s:g} s warm-up, {load.duration_s:g} s measurement window; seed {spec.seed}."),
            Block("table", headers=["Condition", "Strategy", "Device" if on_cpu(run) else "GPUs", "Servers", "Load"], rows=rows,
                  align="lllll")]


def build(run: RunStats, plot_paths: dict[str, Path]) -> list[Block]:
    spec = run.spec
    done = sum(len(c.ok) for c in run.conditions)
    planned = sum(c.planned for c in run.conditions)
    blocks = [Block("h1", f"coserve report: {spec.name}")]
    if spec.description:
        blocks.append(Block("p", spec.description.strip()))
    blocks.append(Block("p", f"{done} of {planned} reps finished; {describe_gpus(run.fingerprint)}. "
                             f"Gen deltas are against **{spec.baseline}** (unless a condition names its own "
                             f"baseline), embed deltas against **{embed_baseline(spec) or '-'}**."))
    line = verdict(run)
    if line:
        blocks.append(Block("p", line))
    blocks += [Block("h2", "Throughput"), throughput_table(run),
               Block("p", "Mean over finished reps ± the 95% CI half-width (Student's t). Delta: "
                          "condition mean / baseline mean - 1, with its 95% CI [low, high] "
                          "(delta method, Welch degrees of freedom). Throughput counts what arrived "
                          "inside the measurement window.")]
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
    blocks += sweep_blocks(run)
    if "sweep" in plot_paths:
        blocks.append(Block("img", "Concurrency sweep", path=plot_paths["sweep"]))
    blocks += problems_blocks(run)
    blocks += settings_blocks(run)
    blocks += environment_blocks(run)
    return blocks


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
            lines = ["| " + " | ".join(b.headers) + " |",
                     "|" + "|".join("---:" if a == "r" else "---" for a in b.aligns()) + "|"]
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
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{CSS}</style></head><body>"]
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
            out.append(f"<figure><img alt='{html.escape(b.text)}' src='data:image/png;base64,{data}'>"
                       f"<figcaption>{html.escape(b.text)}</figcaption></figure>")
        elif b.kind == "table":
            al = b.aligns()
            head = "".join(f"<th class='{a}'>{_inline(h)}</th>" for h, a in zip(b.headers, al, strict=True))
            body = "".join("<tr>" + "".join(f"<td class='{a}'>{_inline(c)}</td>" for c, a in zip(row, al, strict=True))
                           + "</tr>" for row in b.rows or [])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    out.append(f"<p style='color:#888;font-size:.8em'>Rendered by coserve report, {stamp}.</p></body></html>")
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
    blocks = build(run, plot_paths)
    md, htm, st = base / "report.md", base / "report.html", base / "stats.json"
    write_atomic(md, to_markdown(blocks, base))
    write_atomic(htm, to_html(blocks, f"coserve report: {run.spec.name}"))
    write_atomic(st, json.dumps(run.to_dict(), indent=2) + "\n")
    return Rendered(run, md, htm, st, plot_paths)


def console_table(run: RunStats):
    """The throughput table as a rich Table, for the terminal."""
    from rich.table import Table

    b = throughput_table(run)
    t = Table(title=f"{run.spec.name}: throughput (mean ± 95% CI)")
    for h, a in zip(b.headers, b.aligns(), strict=True):
        t.add_column(h, justify="right" if a == "r" else "left")
    for row in b.rows:
        t.add_row(*[c.replace("**", "") for c in row])
    return t


def stdout_console():
    """A console for printing tables: the terminal's width, or wide enough when piped."""
    import sys

    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=160)
