"""The report's per-GPU telemetry: on a run over several GPUs, each GPU's activity and power
in the measurement window, next to which servers it held (the device-wide means of the
telemetry table cannot tell the dedicated gen GPU from the dedicated embed GPU)."""

from __future__ import annotations

from dataclasses import dataclass

from coserve import stats
from coserve.experiment.rep import read_telemetry, role_devices, window_telemetry
from coserve.report.aggregate import ConditionStats, RunStats
from coserve.report.blocks import Block, frac, num, with_ci

METRICS = ("sm_active", "dram_active", "tensor_active", "power_w", "mem_used_mib")


@dataclass(frozen=True)
class GpuRow:
    """One GPU of one condition: its metrics over the condition's finished reps."""

    condition: str
    device: str
    roles: tuple[str, ...]  # the servers with a rank on this GPU
    summary: dict[str, stats.Summary]


def _obj(v) -> dict:
    """`v` when it is a JSON object, else {} (a hand-edited or foreign rep.json is no crash)."""
    return v if isinstance(v, dict) else {}


def _window(run: RunStats, cs: ConditionStats, rec: dict) -> dict:
    """The rep's window telemetry with per-device keys; runs recorded before the rep kept
    them get them from the rep's telemetry.jsonl."""
    window = _obj(_obj(rec.get("telemetry")).get("window"))
    if any("/" in k for k in window):
        return window
    path = run.run_dir.rep_dir(cs.name, rec["rep"]) / "telemetry.jsonl"
    try:
        rows = read_telemetry(path)
    except OSError:
        return window
    return window_telemetry(rows, _obj(rec.get("bench")))


def _roles(rec: dict, device: str) -> tuple[str, ...]:
    """The servers the rep ran with a rank on `device`: the strategy gives every role GPUs,
    also a role the condition runs no server of (a TP=2 gen-alone condition's embed)."""
    ran = _obj(rec.get("servers"))
    return tuple(
        r for r, devices in role_devices(rec).items() if device in devices and (not ran or r in ran)
    )


def gpu_rows(run: RunStats) -> list[GpuRow]:
    """Rows for every matrix condition whose reps sampled more than one GPU."""
    out = []
    for cs in run.matrix:
        per_dev: dict[str, dict[str, list[float]]] = {}
        roles: dict[str, tuple[str, ...]] = {}
        for rec in cs.ok:
            for key, v in _window(run, cs, rec).items():
                metric, _, dev = key.partition("/")
                mean = _obj(v).get("mean")
                if dev and metric in METRICS and isinstance(mean, int | float):
                    per_dev.setdefault(dev, {}).setdefault(metric, []).append(float(mean))
                    roles.setdefault(dev, _roles(rec, dev))
        for dev in sorted(per_dev, key=lambda d: (len(d), d)):
            summary = {m: stats.summarize(vals) for m, vals in per_dev[dev].items()}
            out.append(GpuRow(cs.name, dev, roles[dev], summary))
    return out


def per_gpu_blocks(run: RunStats) -> list[Block]:
    rows = gpu_rows(run)
    if not rows:
        return []

    def mem(s: stats.Summary | None) -> str:
        return "-" if s is None else num(s.mean / 1024)

    table = [
        [
            r.condition,
            r.device,
            ", ".join(r.roles) or "-",
            with_ci(r.summary.get("sm_active"), frac),
            with_ci(r.summary.get("dram_active"), frac),
            with_ci(r.summary.get("tensor_active"), frac),
            with_ci(r.summary.get("power_w")),
            mem(r.summary.get("mem_used_mib")),
        ]
        for r in rows
    ]
    return [
        Block("h3", "Per GPU"),
        Block(
            "table",
            headers=[
                "Condition",
                "GPU",
                "Servers on it",
                "SM active",
                "DRAM active",
                "Tensor active",
                "Power (W)",
                "Memory used (GiB)",
            ],
            rows=table,
        ),
        Block(
            "p",
            "Each GPU's samples inside the measurement window, mean over reps ± the 95% CI "
            "half-width; GPU: the index the strategy used (CUDA_VISIBLE_DEVICES); servers: "
            "those with a process (a rank) on it.",
        ),
    ]
