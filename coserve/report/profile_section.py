"""The report's "Profile" section, from the reps `coserve profile` ran (their
profile/summary.json, records.RepProfile): per condition a table per server (step wall time,
device busy time, gaps between kernels, kernel classes), gen's heaviest kernels, the clocks,
power and clock-event reasons over the load (the plots: profile_plots.py).
A run without profiled reps has no such section."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from coserve.profile.analyze import read_summary
from coserve.profile.records import KERNEL_CLASSES, ClockSecond, RepProfile, RoleProfile
from coserve.report.blocks import Block, num

TOP_KERNELS = 10
log = logging.getLogger("coserve.report")


@dataclass
class Profiled:
    """A rep's profile and where it sits in the run."""

    condition: str
    rep: int
    profile: RepProfile

    @property
    def label(self) -> str:
        return f"{self.condition} (rep {self.rep})"


@dataclass
class ProfileScan:
    """The run's profiled reps, and the summaries it has but could not read
    ("reps/C/rep-N/profile/summary.json: not read (why)")."""

    reps: list[Profiled]
    unread: list[str]


def scan(run_dir: Path, order: list[str]) -> ProfileScan:
    """Every rep's profile/summary.json: read, in the spec's condition order, or named."""
    out, unread = [], []
    for path in sorted(Path(run_dir).glob("reps/*/rep-*/profile/summary.json")):
        rep_dir = path.parent.parent
        if not rep_dir.name[4:].isdigit():
            continue
        try:
            prof = read_summary(path)
        except ValueError as e:
            unread.append(f"{path.relative_to(run_dir)}: not read ({e})")
            continue
        out.append(Profiled(rep_dir.parent.name, int(rep_dir.name[4:]), prof))
    rank = {name: i for i, name in enumerate(order)}
    out.sort(key=lambda p: (rank.get(p.condition, len(rank)), p.condition, p.rep))
    return ProfileScan(out, unread)


def profiled_reps(run_dir: Path, order: list[str]) -> list[Profiled]:
    """Every rep with a readable profile/summary.json, in the spec's condition order."""
    return scan(run_dir, order).reps


def missing_traces(run_dir: Path, profile: RepProfile) -> list[str]:
    """A note per server whose Chrome trace the summary names but the folder lacks."""
    return [
        f"{role}: the Chrome trace {p.trace} is missing"
        for role, p in profile.roles.items()
        if p.trace and not (Path(run_dir) / p.trace).exists()
    ]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def clock_means(clocks: list[ClockSecond]) -> dict[str, float | None]:
    """Means over the ticks: SM and memory clock (MHz), power (W), and the fraction of ticks
    with each clock-event reason active."""
    return {
        "sm_clock_mhz": _mean([c.sm_clock_mhz for c in clocks]),
        "mem_clock_mhz": _mean([c.mem_clock_mhz for c in clocks]),
        "power_w": _mean([c.power_w for c in clocks]),
        "power_capped": _mean(
            [None if c.power_capped is None else float(c.power_capped) for c in clocks]
        ),
        "thermal": _mean([None if c.thermal is None else float(c.thermal) for c in clocks]),
        "sync_boost": _mean(
            [None if c.sync_boost is None else float(c.sync_boost) for c in clocks]
        ),
    }


ROLE_HEADERS = [
    "Server",
    "Kernels from",
    "Steps (decode)",
    "Step wall ms",
    "Busy ms",
    "Busy",
    "Collective ms",
    "Gaps",
    "Gap mean µs",
    "Gap p50 µs",
    "Gap p99 µs",
    *[f"{c} share" for c in KERNEL_CLASSES],
]


def role_row(p: RoleProfile) -> list[str]:
    shares = {c.kernel_class: c.share for c in p.classes}
    wall, busy = p.step_wall_ms, p.step_busy_ms
    return [
        p.role,
        p.source,
        f"{len(p.steps)} ({sum(1 for s in p.steps if s.decode)})",
        num(wall),
        num(busy),
        _pct(busy / wall) if wall and busy is not None else "-",
        num(p.step_collective_ms),
        str(p.gaps.count),
        num(p.gaps.mean_us),
        num(p.gaps.p50_us),
        num(p.gaps.p99_us),
        *[_pct(shares.get(c)) for c in KERNEL_CLASSES],
    ]


def kernel_table(p: RoleProfile) -> Block:
    rows = [
        [
            k.name[:80],
            k.kernel_class,
            str(k.count),
            num(k.mean_us),
            num(k.p50_us),
            num(k.p99_us),
            num(k.total_ms),
        ]
        for k in p.kernels[:TOP_KERNELS]
    ]
    return Block(
        "table",
        headers=["Kernel", "Class", "Count", "Mean µs", "p50 µs", "p99 µs", "Total ms"],
        rows=rows,
        align="ll",
    )


def launch_table(p: RoleProfile) -> Block:
    rows = [
        [a.name, str(a.count), num(a.mean_us), num(a.p50_us), num(a.p99_us)] for a in p.launches
    ]
    return Block(
        "table", headers=["Launch call", "Count", "Mean µs", "p50 µs", "p99 µs"], rows=rows
    )


def _cpu_pair(r: Profiled) -> bool:
    """Both servers of the rep were profiled, on a CPU (ops, not CUDA kernels)."""
    roles = r.profile.roles
    return {"gen", "embed"} <= set(roles) and any(
        p.source != "cuda kernels" for p in roles.values()
    )


def interleave_table(reps: list[Profiled]) -> Block | None:
    rows = []
    for r in reps:
        x = r.profile.interleave
        if x is None:
            continue
        share = x.gen_kernel_overlapped_ms / x.gen_kernel_ms if x.gen_kernel_ms > 0 else None
        filled = x.gen_gap_filled_ms / x.gen_gap_ms if x.gen_gap_ms > 0 else None
        rows.append(
            [
                r.label,
                num(x.window_ms),
                str(x.embed_kernels),
                num(x.gen_kernel_ms),
                _pct(share),
                num(x.gen_gap_ms),
                _pct(filled),
            ]
        )
    if not rows:
        return None
    return Block(
        "table",
        headers=[
            "Condition",
            "Both captured ms",
            "Embed kernels",
            "Gen kernel ms",
            "Gen kernel time beside an embed kernel",
            "Gen gap ms",
            "Gen gaps filled by embed",
        ],
        rows=rows,
    )


def clocks_table(reps: list[Profiled]) -> Block:
    rows = []
    for r in reps:
        m = clock_means(r.profile.clocks)
        rows.append(
            [
                r.label,
                str(len(r.profile.clocks)),
                num(m["sm_clock_mhz"]),
                num(m["mem_clock_mhz"]),
                num(m["power_w"]),
                _pct(m["power_capped"]),
                _pct(m["thermal"]),
                _pct(m["sync_boost"]),
            ]
        )
    return Block(
        "table",
        headers=[
            "Condition",
            "Ticks",
            "SM MHz",
            "Mem MHz",
            "Power W",
            "Power-capped",
            "Thermal",
            "Sync boost",
        ],
        rows=rows,
    )


def profile_blocks(run_dir: Path, order: list[str], plot_paths: dict[str, Path]) -> list[Block]:
    """The section's blocks ([] when no rep was profiled)."""
    found = scan(run_dir, order)
    reps = found.reps
    if not reps and not found.unread:
        return []
    blocks = [
        Block("h2", "Profile"),
        Block(
            "p",
            "A window of engine steps per server, captured with the torch profiler (CUPTI "
            "kernels on a GPU; on a CPU the top-level torch ops stand in for kernels) after the "
            "load's warm-up. Step wall ms: the host's `coserve.step` range, mean over decode "
            "steps (gen) or all steps (embed); busy ms: the union of kernels inside it; "
            "collective ms: the same for the collective kernels (all-reduce, all-gather) alone, "
            "which on a tensor-parallel server run until every rank reaches them, so they "
            "include the wait for the other ranks (only rank 0 is captured). Gaps: "
            "idle time between consecutive kernels of the server over the window (0 where "
            "kernels overlap). Shares: of all kernel time, by kernel name. Chrome traces: "
            "reps/CONDITION/rep-N/profile/ROLE/trace.json.gz (ui.perfetto.dev).",
        ),
    ]
    for line in found.unread:
        log.warning("%s", line)
    if found.unread:
        blocks += [Block("p", "Left out:"), Block("ul", items=found.unread)]
    for r in reps:
        blocks.append(Block("h3", f"Profile: {r.label}"))
        roles = [r.profile.roles[k] for k in ("gen", "embed") if k in r.profile.roles]
        if roles:
            blocks.append(
                Block("table", headers=ROLE_HEADERS, rows=[role_row(p) for p in roles], align="ll")
            )
        if "gen" in r.profile.roles:
            blocks.append(Block("p", f"Gen's {TOP_KERNELS} heaviest kernels:"))
            blocks.append(kernel_table(r.profile.roles["gen"]))
            if r.profile.roles["gen"].launches:
                blocks.append(Block("p", "Gen's CUDA launch calls (host time per call):"))
                blocks.append(launch_table(r.profile.roles["gen"]))
        notes = [*r.profile.notes, *missing_traces(run_dir, r.profile)]
        if notes:
            blocks.append(Block("ul", items=notes))
    cross = interleave_table(reps)
    if cross is not None:
        blocks += [
            Block("h3", "Gen's kernels beside embed's"),
            cross,
            Block(
                "p",
                "Over the time both servers' windows cover, on the host's clock: gen kernel "
                "time during which an embed kernel also ran (the two sharing the SMs), and the "
                "idle time between gen's kernels during which an embed kernel ran (interleaving).",
            ),
        ]
    elif any(_cpu_pair(r) for r in reps):
        blocks.append(
            Block(
                "p",
                "No \"Gen's kernels beside embed's\" table: it compares CUDA kernels, and these "
                "servers ran on a CPU, where both servers' ops share the cores rather than a GPU.",
            )
        )
    if any(r.profile.clocks for r in reps):
        blocks += [
            Block("h3", "Clocks, power and clock-event reasons over the load"),
            clocks_table(reps),
            Block(
                "p",
                "Means over the telemetry ticks of warm-up and window; a reason's figure is the "
                "share of ticks NVML reported it (power-capped: software power cap or hardware "
                "power brake; thermal: software or hardware thermal slowdown).",
            ),
        ]
    if "profile_clocks" in plot_paths:
        blocks.append(
            Block(
                "img",
                "SM clock and power per tick, reasons marked",
                path=plot_paths["profile_clocks"],
            )
        )
    if "profile_timeline" in plot_paths:
        blocks.append(
            Block(
                "img",
                "Gen's kernels and the gaps between them",
                path=plot_paths["profile_timeline"],
            )
        )
    return blocks
