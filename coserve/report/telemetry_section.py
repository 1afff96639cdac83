"""The report's GPU telemetry section: GPM activity, power and clocks per condition, and
which conditions ran at the card's power limit; per-GPU rows where a run used several."""

from __future__ import annotations

from coserve.experiment.fingerprint import describe_gpus
from coserve.report.aggregate import TELEMETRY, RunStats
from coserve.report.blocks import Block, frac, with_ci
from coserve.report.per_gpu import per_gpu_blocks


def telemetry_blocks(run: RunStats) -> list[Block]:
    out = [Block("h2", "GPU telemetry")]
    rows = []
    for c in run.matrix:
        if any(m in c.summary for m in TELEMETRY):
            rows.append(
                [
                    c.name,
                    *(with_ci(c.summary.get(m), frac) for m in TELEMETRY),
                    with_ci(c.summary.get("power_w")),
                    with_ci(c.summary.get("sm_clock_mhz")),
                    with_ci(c.summary.get("power_capped"), share),
                ]
            )
    if rows:
        out.append(
            Block(
                "table",
                headers=[
                    "Condition",
                    "SM active",
                    "SM occupancy",
                    "Tensor active",
                    "DRAM active",
                    "Power (W)",
                    "SM clock (MHz)",
                    "Power-capped",
                ],
                rows=rows,
            )
        )
        out.append(
            Block(
                "p",
                "SM active to DRAM active: NVML GPM metrics (the study's DCGM fields), "
                "fractions 0-1; power and SM clock: NVML; power-capped: the share of samples "
                "with NVML's power-cap clock event. Each a mean over the samples inside the "
                "measurement window. GPM is device-wide: on a shared GPU it cannot split gen "
                "from embed.",
            )
        )
        capped = power_limited(run)
        if capped:
            out.append(Block("p", capped))
        return out + per_gpu_blocks(run)
    notes = set()
    for c in run.matrix:
        for r in c.ok:
            t = r.get("telemetry") or {}
            if t.get("status"):
                notes.add(t["status"])
    why = "; ".join(sorted(notes)) or describe_gpus(run.fingerprint)
    out.append(Block("p", f"No GPU telemetry in this run: {why}."))
    return out


# A condition at its power limit this share of the window or more has its speed set partly by
# its clocks: a delta against it mixes sharing with the card's power budget.
POWER_CAPPED_NOTABLE = 0.2


def share(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def _capped_text(c) -> str:
    """'gen-only (48% of seconds, 682 W of a 700 W limit; 121 W before the load)', the budget
    where the reps recorded it (runs before 2026-12-01 did not)."""
    s = c.summary
    text = f"{c.name} ({100 * s['power_capped'].mean:.0f}% of seconds"
    power, limit = s.get("power_w"), s.get("power_limit_w")
    if power is not None and limit is not None:
        text += f", {power.mean:,.0f} W of a {limit.mean:,.0f} W limit"
    if (idle := s.get("power_before_load_w")) is not None:
        text += f"; {idle.mean:,.0f} W before the load"
    return text + ")"


def power_limited(run: RunStats) -> str | None:
    """A sentence naming the conditions whose GPU reported NVML's power-cap clock event in at
    least POWER_CAPPED_NOTABLE of the window's samples (mean over reps), or None."""
    hit = [
        c
        for c in run.matrix
        if (s := c.summary.get("power_capped")) is not None and s.mean >= POWER_CAPPED_NOTABLE
    ]
    if not hit:
        return None
    names = ", ".join(_capped_text(c) for c in hit)
    return (
        f"At the power limit: {names}. Power-capped is the share of the window's one-second "
        "samples in which NVML reported the power-cap clock event (SW power cap or HW power "
        "brake); there the card lowers its clocks to stay within its limit, so what these "
        "conditions got was set in part by the power budget, not by how the GPU was shared. "
        "A co-located condition cannot draw more than its limit: where gen alone is already "
        "near it, any embed work beside gen costs gen clock speed."
    )
