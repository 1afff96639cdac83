"""PNG plots of a run (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

from coserve.report.aggregate import TELEMETRY, RunStats
from coserve.report.rep_series import request_values, telemetry_series
from coserve.report.tradeoff import tradeoff as curves_of
from coserve.stats import finite_number

LABELS = {
    "sm_active": "SM active",
    "sm_occupancy": "SM occupancy",
    "tensor_active": "Tensor active",
    "dram_active": "DRAM active",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "figure.dpi": 100,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
        }
    )
    return plt


def _bars(ax, run: RunStats, metric: str, title: str, unit: str) -> bool:
    rows = [c for c in run.matrix if metric in c.summary]
    if not rows:
        ax.set_visible(False)
        return False
    names = [c.name for c in rows]
    means = [c.summary[metric].mean for c in rows]
    err = [c.summary[metric].half_width or 0.0 for c in rows]
    colors = [
        "#4c72b0"
        if c.name != (c.gen_baseline if metric.startswith("gen") else c.embed_baseline)
        else "#8c8c8c"
        for c in rows
    ]
    ax.bar(range(len(rows)), means, yerr=err, capsize=5, color=colors)
    for i, c in enumerate(rows):  # the reps themselves, as dots
        vals = c.values[metric]
        ax.scatter([i] * len(vals), vals, color="black", s=12, zorder=3)
    ax.set_xticks(range(len(rows)), names, rotation=20, ha="right")
    ax.set_ylabel(unit)
    ax.set_title(title)
    return True


def throughput(run: RunStats, path: Path) -> Path | None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    a = _bars(axes[0], run, "gen_tok_s", "Gen throughput", "tokens/s")
    b = _bars(axes[1], run, "embed_seq_s", "Embed throughput", "sequences/s")
    if not (a or b):
        plt.close(fig)
        return None
    fig.suptitle(
        "bars: mean over reps with its 95% CI; dots: the reps; grey: the baseline", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def tpot_distribution(run: RunStats, path: Path) -> Path | None:
    """Empirical CDF of per-request TPOT (requests that ended inside the window, all reps)."""
    import numpy as np

    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    drawn = False
    for c in run.matrix:
        vals = request_values(run, c, "tpot_ms", "gen")
        if not vals:
            continue
        x = np.sort(np.asarray(vals))
        y = np.arange(1, len(x) + 1) / len(x)
        ax.step(x, y, where="post", label=f"{c.name} (n={len(x)})")
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    for q in (0.5, 0.95, 0.99):
        ax.axhline(q, color="gray", lw=0.6, ls=":")
    ax.set_xlabel("time per output token (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("TPOT distribution per condition")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def telemetry(run: RunStats, path: Path) -> Path | None:
    """SM active / SM occupancy / tensor active / DRAM active over time, first rep of each."""
    series = [(c, telemetry_series(run, c)) for c in run.matrix]
    series = [(c, s) for c, s in series if s is not None]
    series = [
        (c, s) for c, s in series if any(finite_number(r.get(m)) for r in s[0] for m in TELEMETRY)
    ]
    if not series:
        return None
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5), sharex=True)
    for ax, metric in zip(axes.flat, TELEMETRY, strict=True):
        for c, (rows, _bench) in series:
            pts = [(r["t_load_s"], r[metric]) for r in rows if finite_number(r.get(metric))]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=c.name, lw=1.2)
        warm = float(series[0][1][1].get("warmup_s", 0))
        ax.axvspan(min(0.0, warm), warm, color="gray", alpha=0.12)
        ax.set_title(LABELS[metric])
        ax.set_ylim(0, 1.05)
    for ax in axes[1]:
        ax.set_xlabel("seconds since load start (grey: warm-up)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _guard_points(rows: list[dict], key: str, scale: float = 1.0) -> list[tuple[float, float]]:
    """(seconds since load start, figure x scale) of the rows that carry a finite `key`."""
    return [
        (r["t_load_s"], scale * r[key])
        for r in rows
        if finite_number(r.get(key)) and math.isfinite(scale * r[key])
    ]


def guard(run: RunStats, path: Path) -> Path | None:
    """The SLO guard over time, first rep of each guarded condition: gen's step time against
    its budget (ms), and embed's tokens per forward and pause between forwards. Rows without
    a figure (a failed read, a value that is no number) leave a gap; None without any."""
    series = [(c, telemetry_series(run, c, "slo_guard.jsonl")) for c in run.matrix]
    series = [
        (c, s) for c, s in series if s is not None and _guard_points(s[0], "gen_step_seconds")
    ]
    if not series:
        return None
    plt = _plt()
    fig, (top, mid, low) = plt.subplots(3, 1, figsize=(11, 8), sharex=True)
    for c, (rows, _bench) in series:
        (line,) = top.plot(*zip(*_guard_points(rows, "gen_step_seconds", 1e3), strict=True))
        line.set_label(c.name)
        color = line.get_color()
        for ax, key, scale, style in (
            (top, "budget_seconds", 1e3, "--"),
            (mid, "tokens_per_forward", 1.0, "-"),
            (low, "pause_seconds", 1e3, "-"),
        ):
            pts = _guard_points(rows, key, scale)
            if pts:
                ax.plot(*zip(*pts, strict=True), ls=style, color=color)
        held = [r for r in rows if r.get("holding") == 1]
        held_pts = _guard_points(held, "gen_step_seconds", 1e3)
        if held_pts:
            top.scatter(*zip(*held_pts, strict=True), marker="x", color=color)
    warm = series[0][1][1].get("warmup_s", 0)
    warm = float(warm) if finite_number(warm) else 0.0
    for ax in (top, mid, low):
        ax.axvspan(min(0.0, warm), warm, color="gray", alpha=0.12)
    top.set_ylabel("gen step (solid; x: a probe),\nbudget (dashed), ms")
    mid.set_ylabel("embed tokens\nper forward")
    low.set_ylabel("pause between\nforwards, ms")
    low.set_xlabel("seconds since load start (grey: warm-up)")
    top.set_title("SLO guard over time (0 budget: gen alone not yet measured)")
    top.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def sweep(run: RunStats, path: Path) -> Path | None:
    """The swept role's throughput against the swept concurrency or offered rate."""
    if run.spec.sweep is None:
        return None
    sw = run.spec.sweep
    metric = "gen_tok_s" if sw.role == "gen" else "embed_seq_s"
    groups: dict[str, list] = {}
    for c in run.sweep:
        if metric in c.summary:
            groups.setdefault(c.condition.sweep.base, []).append(c)
    if not groups:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for base, cs in groups.items():
        cs.sort(key=lambda c: c.condition.sweep.value)
        ax.errorbar(
            [c.condition.sweep.value for c in cs],
            [c.summary[metric].mean for c in cs],
            yerr=[c.summary[metric].half_width or 0 for c in cs],
            marker="o",
            capsize=4,
            label=base,
        )
    ax.set_xscale("log", base=2)
    ticks = sorted({c.condition.sweep.value for cs in groups.values() for c in cs})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel(
        f"{sw.role} offered rate (req/s)" if sw.knob == "rate" else f"{sw.role} concurrency"
    )
    ax.set_ylabel("tokens/s" if sw.role == "gen" else "sequences/s")
    ax.set_title(
        f"{sw.role} throughput vs {'offered rate' if sw.knob == 'rate' else 'concurrency'}"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _hw(s) -> float:
    return (s.half_width or 0.0) if s is not None else 0.0


def _taking_turns(ax, data) -> None:
    """From each gen-alone star toward embed alone's capacity on the x axis: the work taking
    turns on the GPU does, drawn across the points' range only (capacity is often far
    beyond it, and the curves would shrink to a corner), and ending at capacity where that
    lies inside it (past it the line would run below zero gen)."""
    cap = data.embed_capacity.seq_s.mean
    right = ax.get_xlim()[1]
    end = min(right, cap)
    held = {s.gen_alone for s in data.shares}  # a gen alone on a MIG slice is no yardstick
    for i, b in enumerate(b for b in data.baselines if b.condition in held):
        g = b.gen_tok_s.mean
        ax.plot(
            [0, end],
            [g, g * (1 - end / cap)],
            color="gray",
            lw=1,
            ls="--",
            label=f"taking turns ({b.condition}, then {data.embed_capacity.condition} at "
            f"{cap:,.0f} seq/s)"
            if i == 0
            else None,
        )
    ax.set_xlim(right=right)


def tradeoff(run: RunStats, path: Path) -> Path | None:
    """The headline: gen tok/s and gen TPOT p99 against achieved embed seq/s, one line per
    strategy (each point a condition: mean over reps with 95% CI on both axes), the gen-alone
    baseline at zero embed work, and the spec's reference figures marked apart."""
    data = curves_of(run)
    if not data.curves:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, key, unit in (
        (axes[0], "gen_tok_s", "gen tokens/s"),
        (axes[1], "tpot_p99_ms", "gen TPOT p99 (ms)"),
    ):
        for curve in data.curves:
            pts = [p for p in curve.points if getattr(p, key) is not None]
            if pts:
                ax.errorbar(
                    [p.embed_seq_s.mean for p in pts],
                    [getattr(p, key).mean for p in pts],
                    xerr=[_hw(p.embed_seq_s) for p in pts],
                    yerr=[_hw(getattr(p, key)) for p in pts],
                    marker="o",
                    capsize=3,
                    label=curve.label,
                )
        for b in data.baselines:
            v = getattr(b, key)
            if v is not None:
                ax.errorbar(
                    [0],
                    [v.mean],
                    yerr=[_hw(v)],
                    marker="*",
                    ms=12,
                    color="gray",
                    capsize=3,
                    ls="none",
                    label=f"{b.condition} (gen alone)",
                )
                ax.axhline(v.mean, color="gray", lw=0.7, ls=":")
        ref = data.reference
        if ref is not None:
            base = ref.baseline_tok_s if key == "gen_tok_s" else ref.baseline_tpot_p99_ms
            pts = [
                (p.embed_seq_s, p.gen_tok_s if key == "gen_tok_s" else p.tpot_p99_ms, p)
                for p in ref.points
            ]
            pts = [(x, y, p) for x, y, p in pts if y is not None]
            ax.scatter(
                [x for x, _, _ in pts],
                [y for _, y, _ in pts],
                marker="X",
                s=70,
                color="black",
                zorder=4,
                label=ref.label,
            )
            for x, y, p in pts:
                ax.annotate(
                    f"{p.strategy} {p.gen_delta_pct:+.1f}%",
                    (x, y),
                    fontsize=7,
                    xytext=(4, 4),
                    textcoords="offset points",
                )
            if base is not None:
                ax.scatter([0], [base], marker="x", s=50, color="black", zorder=4)
        if key == "gen_tok_s" and data.embed_capacity is not None:
            _taking_turns(ax, data)
        ax.set_xlabel("achieved embed sequences/s")
        ax.set_ylabel(unit)
        ax.set_xlim(left=-0.03 * ax.get_xlim()[1])  # the gen-alone star sits at 0, not on the edge
    axes[0].set_title("gen throughput vs embed work")
    axes[1].set_title("gen tail latency vs embed work")
    # Below the axes: inside, a legend of several strategies hid the gen-alone star.
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle("points: mean over reps with 95% CI; star: gen alone", fontsize=9)
    fig.tight_layout(rect=(0, 0.06 * ((len(labels) + 1) // 2), 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path


def make_all(run: RunStats, out_dir: Path) -> dict[str, Path]:
    """Each plot that has data, by name; a plot matplotlib cannot draw (figures too large for
    an axis, from a damaged rep.json) is left out, saying so on stderr, and the report goes on."""
    import sys

    out_dir.mkdir(parents=True, exist_ok=True)
    made = {}
    for name, fn in (
        ("tradeoff", tradeoff),
        ("throughput", throughput),
        ("tpot", tpot_distribution),
        ("telemetry", telemetry),
        ("guard", guard),
        ("sweep", sweep),
    ):
        try:
            p = fn(run, out_dir / f"{name}.png")
        except (ValueError, OverflowError) as e:
            _plt().close("all")
            print(
                f"coserve report: plot {name} left out: it cannot be drawn ({e})", file=sys.stderr
            )
            p = None
        if p is not None:
            made[name] = p
        else:
            (out_dir / f"{name}.png").unlink(missing_ok=True)
    return made
