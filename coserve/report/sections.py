"""The report's sections as blocks: throughput, latency, sweep, problems, settings and
environment (telemetry: telemetry_section.py)."""

from __future__ import annotations

import json
from pathlib import Path

from coserve.experiment.failure import why
from coserve.experiment.fingerprint import describe_gpus
from coserve.experiment.preflight import GPU_STRATEGIES
from coserve.report.aggregate import RunStats
from coserve.report.blocks import Block, num, pct, status_text, with_ci
from coserve.report.load_tables import load_text
from coserve.report.tradeoff import embed_capacity, equal_work_checks


def on_cpu(run: RunStats) -> bool:
    """A run whose servers all ran on the CPU (strategies and GPU settings mean nothing there):
    built-in servers on device cpu (or auto on a machine without GPUs), others only on a
    machine without GPUs, and no GPU-only strategy in the spec (those cannot run on a CPU)."""
    conds = run.spec.all_conditions()
    no_gpu = not run.fingerprint.get("gpus")
    if any(c.strategy in GPU_STRATEGIES for c in conds):
        return False
    servers = [c.server(run.spec, role) for c in conds for role in c.servers]
    return all(
        s.device == "cpu" or no_gpu and (s.device == "auto" or s.launcher != "builtin")
        for s in servers
    )


def strategy_text(run: RunStats, c) -> str:
    """The strategy, or on a CPU run what it amounts to (both servers on the same cores)."""
    if not on_cpu(run):
        return c.strategy
    return "CPU, shared" if len(c.servers) > 1 else "CPU"


def cost_note(run: RunStats, conds) -> str:
    """The sentence that reads a "Gen tokens per embed" column ("" where none of `conds` has
    one): what the figure is, and what taking turns on the device would trade in this run (gen
    alone's tok/s over embed alone's seq/s at capacity), or that the run did not measure it."""
    costs = [v for v in map(run.gen_tokens_per_embed, conds) if v is not None]
    if not costs:
        return ""
    text = (
        " Gen tokens per embed: gen tok/s lost against gen alone per embed seq/s served (means;"
        " the study's section 3 calls it cost per embed)."
    )
    if min(costs) < 0:
        text += (
            " A negative one: gen served more beside embed than alone (noise, or on a CPU how"
            " the OS scheduled them), so the embeddings cost it nothing this run could measure."
        )
    device = "CPU" if on_cpu(run) else "GPU"
    text += (
        f" Taking turns on the {device} (gen alone, then embed alone at capacity) trades gen"
        " alone's tok/s over embed alone's seq/s"
    )
    gen, cap = run.alone("gen"), embed_capacity(run)
    if gen is None or cap is None or not gen.mean("gen_tok_s"):
        return text + ": not measured in this run (no embed alone at capacity)."
    rate = gen.mean("gen_tok_s") / cap.seq_s.mean
    return (
        text + f": {rate:,.1f} here ({gen.name} over {cap.condition}); a condition below it "
        "shared better than taking turns."
    )


def throughput_table(run: RunStats) -> Block:
    rows = []
    costs = {c.name: run.gen_tokens_per_embed(c) for c in run.matrix}
    cost_col = any(v is not None for v in costs.values())
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
            emb_cell = (
                with_ci(c.summary.get("embed_seq_s")) if c.summary.get("embed_seq_s") else "(none)"
            )
            ed = "baseline" if c.embed_baseline == c.name else pct(c.embed_delta)
        rows.append(
            [
                c.name,
                strategy_text(run, c.condition),
                status_text(c),
                gen_cell,
                gd,
                emb_cell,
                ed,
                *([_cost_text(costs[c.name])] if cost_col else []),
            ]
        )
    return Block(
        "table",
        headers=[
            "Condition",
            "Strategy",
            "Reps",
            "Gen (tok/s)",
            "Gen delta",
            "Embed (seq/s)",
            "Embed delta",
            *(["Gen tokens per embed"] if cost_col else []),
        ],
        rows=rows,
        align="llr",
    )


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
            cells.append(
                num(g)
                if g is not None
                else ("failed" if any(f["rep"] == k for f in c.failed) else "-")
            )
        s = c.summary.get("gen_tok_s")
        std = f"{s.std / s.mean * 100:.1f}%" if s and s.std is not None and s.mean else "-"
        rows.append([c.name, *cells, num(c.mean("gen_tok_s")), std, num(c.mean("embed_seq_s"))])
    return Block(
        "table",
        headers=[
            "Condition",
            *[f"Rep {k}" for k in range(1, most + 1)],
            "Gen mean",
            "Gen std",
            "Embed mean",
        ],
        rows=rows,
    )


def _percentile_table(title: str, conds: list, prefix: str) -> list[Block]:
    """A heading and one row per condition: the metric's p50, p95, p99 and mean with CIs."""
    stats = ("p50", "p95", "p99", "mean")
    rows = [[c.name, *(with_ci(c.summary.get(f"{prefix}_{p}")) for p in stats)] for c in conds]
    return [Block("h3", title), Block("table", headers=["Condition", *stats], rows=rows)]


def latency_tables(run: RunStats) -> list[Block]:
    out = []
    gen = [c for c in run.matrix if "gen" in c.condition.servers and c.ok]
    if gen:
        out += _percentile_table("Per-token decode latency (TPOT, ms)", gen, "tpot")
        out += _percentile_table("Time to first token (TTFT, ms)", gen, "ttft")
    emb = [c for c in run.matrix if "embed" in c.condition.servers and c.ok]
    if emb:
        out += _percentile_table(
            "Embed request latency (ms, one request = a batch)", emb, "embed_lat"
        )
    if out:
        out.append(
            Block(
                "p",
                "Each cell: the mean over reps of that rep's percentile, ± the 95% CI "
                "half-width; requests that ended inside the measurement window.",
            )
        )
    return out


def sweep_blocks(run: RunStats) -> list[Block]:
    if run.spec.sweep is None:
        return []
    sw = run.spec.sweep
    rate = sw.knob == "rate"
    out = [Block("h2", f"{'Rate' if rate else 'Concurrency'} sweep ({sw.role})")]
    rows = []
    # deltas exist where the baseline ran the same sweep point (same offered load), or runs
    # gen alone while embed's load is swept
    deltas = any(c.gen_delta for c in run.sweep)
    costs = {c.name: run.gen_tokens_per_embed(c) for c in run.sweep}
    cost_col = any(v is not None for v in costs.values())
    # the throughput table's order (the spec's), so the baseline's row leads as it does there
    order = {c.name: i for i, c in enumerate(run.matrix)}
    for c in sorted(
        run.sweep,
        key=lambda c: (order.get(c.condition.sweep.base, len(order)), c.condition.sweep.value),
    ):
        pt = c.condition.sweep
        row = [
            pt.base,
            f"{pt.value:g}",
            status_text(c),
            with_ci(c.summary.get("gen_tok_s")),
            *([_sweep_delta(c)] if deltas else []),
            *([_cost_text(costs[c.name])] if cost_col else []),
            with_ci(c.summary.get("tpot_p50")),
            with_ci(c.summary.get("tpot_p99")),
            with_ci(c.summary.get("embed_seq_s")),
            with_ci(c.summary.get("embed_lat_p50")),
        ]
        if rate:
            row.append(with_ci(c.summary.get(f"{sw.role}_achieved_rps")))
        rows.append(row)
    headers = [
        "Condition",
        f"{sw.role} rate (req/s)" if rate else f"{sw.role} C",
        "Reps",
        "Gen (tok/s)",
        *(["Gen delta"] if deltas else []),
        *(["Gen tokens per embed"] if cost_col else []),
        "TPOT p50 (ms)",
        "TPOT p99 (ms)",
        "Embed (seq/s)",
        "Embed p50 (ms)",
    ]
    if rate:
        headers.append(f"{sw.role.capitalize()} achieved (req/s)")
    out.append(Block("table", align="lr", headers=headers, rows=rows))
    if deltas:
        bases = [run.get(c.gen_baseline) for c in run.sweep if c.gen_delta]
        points = sorted({b.condition.sweep.base for b in bases if b.condition.sweep})
        alone = sorted({b.name for b in bases if not b.condition.sweep})
        # a base held against gen alone in its turn has no row marked baseline
        marked = {c.condition.sweep.base for c in run.sweep if c.gen_baseline == c.name}
        against = []
        if points:
            against.append(
                f"{', '.join(points)} at the same {sw.role} {sw.knob}"
                + (" (the row marked baseline)" if set(points) <= marked else "")
            )
        if alone:
            against.append(
                f"{', '.join(alone)} (gen alone; the {sw.role} {sw.knob} leaves gen's load as "
                "it is)"
            )
        out.append(
            Block(
                "p",
                f"Gen delta: against {'; '.join(against)}, with its 95% CI (as in the "
                "throughput table)." + cost_note(run, run.sweep),
            )
        )
    items = [e.sentence() for e in equal_work_checks(run) if e.scope == "sweep"]
    if items:
        out.append(Block("ul", items=items))
    if rate:  # an open loop's throughput follows the offered rate: no optimum to pick
        return out
    best = run.sweep_optimum()
    unit = "tok/s" if sw.role == "gen" else "seq/s"
    if best:
        out.append(
            Block(
                "p",
                "Throughput-optimal concurrency: "
                + "; ".join(
                    f"**{base}: C={conc:g}** ({num(v)} {unit})" for base, (conc, v) in best.items()
                ),
            )
        )
    else:
        out.append(Block("p", "No sweep point has finished yet."))
    return out


def _cost_text(cost: float | None) -> str:
    return "-" if cost is None else f"{cost:,.1f}"


def _sweep_delta(c) -> str:
    if c.gen_baseline == c.name:
        return "baseline"
    return pct(c.gen_delta) if c.gen_delta else "-"


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
            rows.append(
                [
                    c.name,
                    "not run",
                    f"{missing} of {c.planned} rep(s) not run yet "
                    f"(`coserve run SPEC --out DIR --resume`)",
                ]
            )
    if not rows:
        return []
    return [
        Block("h2", "Missing or failed"),
        Block(
            "p",
            "These conditions are not complete; their figures above (if any) come from "
            "the reps that finished.",
        ),
        Block("table", headers=["Condition", "Status", "Detail"], rows=rows, align="lll"),
    ]


def _changes(git: dict) -> str:
    """The commit's suffix: ' (with local changes: a, b and 3 more)', or '' for a clean
    tree; a fingerprint from before the changed files were kept says only 'with local
    changes'."""
    if not git.get("dirty"):
        return ""
    shown = [str(p) for p in git.get("changed") or []]
    if not shown:
        return " (with local changes)"
    more = (git.get("changed_count") or len(shown)) - len(shown)
    return f" (with local changes: {', '.join(shown)}{f' and {more} more' if more > 0 else ''})"


def environment_blocks(run: RunStats) -> list[Block]:
    fp = run.fingerprint
    pk = ", ".join(f"{k} {v}" for k, v in fp.get("packages", {}).items() if v)
    git = fp.get("git") or {}
    items = [
        f"GPU: {describe_gpus(fp)}"
        + (f", CUDA driver {fp['cuda_driver']}" if fp.get("cuda_driver") else ""),
        f"CPU: {fp.get('cpu', {}).get('model')} x {fp.get('cpu', {}).get('count')}; host "
        f"{fp.get('host')}",
        f"coserve {fp.get('coserve')}, commit {str(git.get('commit'))[:12]}{_changes(git)}; "
        f"Python {fp.get('python')}; {pk}",
        f"Spec `{run.spec.name}` hash {run.spec.digest()[:12]}; run folder started "
        f"{fp.get('created')}",
    ]
    hosts = {
        json.dumps((r.get("env") or {}).get("git"), sort_keys=True)
        for c in run.conditions
        for r in c.ok
    }
    if len(hosts) > 1:
        items.append(
            "Reps ran at different commits (resumed runs); each rep's rep.json says which."
        )
    return [Block("h2", "Environment"), Block("ul", items=items)]


def tensor_parallel_size(c, role: str, configured: int) -> int:
    """The TP degree a condition runs `role` with (tp strategies decide it themselves)."""
    if not c.strategy.startswith("tp"):
        return configured
    from coserve.gpu.strategies import make_strategy

    return make_strategy(c.strategy, list(c.gpus), dict(c.options), Path(".")).tensor_parallel_size(
        role
    )


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
            if s.launcher == "builtin" and s.extra_args:  # a command launcher's is its command
                extra.append(" ".join(s.extra_args))
            detail = s.launcher + (f"; {', '.join(extra)}" if extra else "")
            parts.append(f"{role}: {what} ({detail})")
        load = c.load_for(spec)
        loads = []
        if "gen" in c.servers:
            loads.append(
                f"gen {load_text(load, 'gen')}, {load.input_len} in / {load.output_len} out"
                + (f", {load.gen_endpoint}" if load.gen_endpoint != "completions" else "")
            )
        if "embed" in c.servers:
            loads.append(
                f"embed {load_text(load, 'embed')} x batch {load.embed_batch}, "
                f"{load.embed_input_len} tok"
            )
        rows.append(
            [
                c.name,
                strategy_text(run, c),
                "CPU" if on_cpu(run) else ",".join(c.gpus),
                "; ".join(parts),
                "; ".join(loads),
            ]
        )
    load = spec.load
    return [
        Block("h2", "Settings"),
        Block(
            "p",
            f"{spec.repetitions} rep(s) per condition, order {spec.order}; "
            f"{load.warmup_s:g} s warm-up, {load.duration_s:g} s measurement window; seed "
            f"{spec.seed}.",
        ),
        Block(
            "table",
            headers=[
                "Condition",
                "Strategy",
                "Device" if on_cpu(run) else "GPUs",
                "Servers",
                "Load",
            ],
            rows=rows,
            align="lllll",
        ),
    ]
