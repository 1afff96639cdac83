"""The Profile section's plots (matplotlib, Agg): gen's kernels and gaps on a timeline, and
the SM clock and power per telemetry tick with the clock-event reasons marked."""

from __future__ import annotations

from pathlib import Path

from coserve.profile.records import KERNEL_CLASSES
from coserve.report.profile_section import profiled_reps

CLASS_COLOURS = dict(
    zip(
        KERNEL_CLASSES,
        ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#999999"),
        strict=True,
    )
)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def make(run_dir: Path, order: list[str], out_dir: Path) -> dict[str, Path]:
    """{"profile_timeline": png, "profile_clocks": png}, each only when there is data."""
    out = {}
    for key, fn in (("profile_timeline", timeline_plot), ("profile_clocks", clocks_plot)):
        made = fn(run_dir, order, out_dir / f"{key}.png")
        if made is not None:
            out[key] = made
    return out


def timeline_plot(run_dir: Path, order: list[str], path: Path) -> Path | None:
    """One row per profiled rep: gen's kernels over its first steps, coloured by class; the
    white between them is the gaps. None when no rep has a gen timeline."""
    reps = [r for r in profiled_reps(run_dir, order) if "gen" in r.profile.roles]
    reps = [r for r in reps if r.profile.roles["gen"].timeline]
    if not reps:
        return None
    from matplotlib.patches import Patch

    plt = _plt()

    fig, ax = plt.subplots(figsize=(11, 1.7 + 0.6 * len(reps)))
    for row, r in enumerate(reps):
        spans = r.profile.roles["gen"].timeline
        for cls in KERNEL_CLASSES:
            bars = [
                (s.start_us / 1e3, max(s.dur_us, 1e-3) / 1e3)
                for s in spans
                if s.kernel_class == cls
            ]
            if bars:
                ax.broken_barh(bars, (row - 0.35, 0.7), facecolors=CLASS_COLOURS[cls])
    ax.set_yticks(range(len(reps)), [r.label for r in reps])
    ax.set_ylim(-0.6, len(reps) - 0.4)
    ax.set_xlabel("ms from the window's first step")
    ax.set_title("Gen's kernels over the first profiled steps (gaps are white)")
    fig.legend(
        handles=[Patch(color=CLASS_COLOURS[c], label=c) for c in KERNEL_CLASSES],
        loc="lower center",
        ncol=len(KERNEL_CLASSES),
        fontsize=8,
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0.1 + 0.1 / len(reps), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def clocks_plot(run_dir: Path, order: list[str], path: Path) -> Path | None:
    """SM clock (MHz) and power (W) per tick of each profiled rep's telemetry, first device;
    ticks with the power cap active marked x, thermal slowdown marked v. None without
    telemetry (a CPU run)."""
    reps = [r for r in profiled_reps(run_dir, order) if r.profile.clocks]
    if not reps:
        return None
    plt = _plt()
    fig, (ax_clk, ax_pow) = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
    for r in reps:
        device = r.profile.clocks[0].device
        ticks = [c for c in r.profile.clocks if c.device == device]
        t = [c.t_rel_s for c in ticks]
        (line,) = ax_clk.plot(t, [c.sm_clock_mhz for c in ticks], label=r.label)
        ax_pow.plot(t, [c.power_w for c in ticks], color=line.get_color())
        for flag, marker in (("power_capped", "x"), ("thermal", "v")):
            hit = [c for c in ticks if getattr(c, flag)]
            if hit and all(c.sm_clock_mhz is not None for c in hit):
                ax_clk.scatter(
                    [c.t_rel_s for c in hit],
                    [c.sm_clock_mhz for c in hit],
                    marker=marker,
                    color=line.get_color(),
                )
    ax_clk.set_ylabel("SM clock (MHz)")
    ax_pow.set_ylabel("power (W)")
    ax_pow.set_xlabel("s since telemetry started (warm-up, then window)")
    ax_clk.set_title("Clocks and power per tick (x: power cap active, v: thermal slowdown)")
    ax_clk.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
