"""Two runs of benchmarks/engine_gen.py (or two of engine_embed.py) side by side: throughput,
TPOT or latency percentiles, graph replay and GPU time per kernel class, each with its change.
Made for the before/after of one device call (two trees run one after the other), whose
figures are the comparison to read: separate calls spread ~3 % (docs/performance.md).

    python3 benchmarks/compare_engine.py BEFORE AFTER

BEFORE and AFTER are engine_gen.json / engine_embed.json files or folders holding one (the
--out-dir of each run). A figure a run did not measure (a skipped phase) shows as "-". Needs
no GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# (label, path into the JSON, unit); "%" rows are higher-is-better throughputs
GEN_ROWS = (
    ("offline, graphs", ("offline_graphs", "output_tokens_per_s"), "tok/s"),
    ("  TPOT p50", ("offline_graphs", "tpot_ms", "p50"), "ms"),
    ("  TPOT p99", ("offline_graphs", "tpot_ms", "p99"), "ms"),
    ("  full decode step p50", ("offline_graphs", "full_decode_step_ms", "p50"), "ms"),
    ("offline, eager", ("offline_eager", "output_tokens_per_s"), "tok/s"),
    ("served", ("served", "gen", "output_tokens_per_s"), "tok/s"),
    ("  TPOT p50", ("served", "gen", "tpot_ms", "p50"), "ms"),
    ("  TPOT p99", ("served", "gen", "tpot_ms", "p99"), "ms"),
    ("graph replay", ("profile", "graph_replay_ms"), "ms"),
    ("kernels per step", ("profile", "gpu_kernel_ms_per_step"), "ms"),
)
EMBED_ROWS = (
    ("offline", ("offline", "sequences_per_s"), "seq/s"),
    ("served", ("served", "embed", "sequences_per_s"), "seq/s"),
    ("  latency p50", ("served", "embed", "latency_ms", "p50"), "ms"),
    ("  latency p99", ("served", "embed", "latency_ms", "p99"), "ms"),
    ("kernels per pass", ("profile", "gpu_kernel_ms_per_pass"), "ms"),
)


def load(path: str) -> tuple[str, dict]:
    """("gen" | "embed", the run's JSON) from a file or a folder holding one. Raises
    FileNotFoundError (no such file, or a folder with neither) or ValueError (not JSON)."""
    p = Path(path)
    if p.is_dir():
        found = [p / n for n in ("engine_gen.json", "engine_embed.json") if (p / n).exists()]
        if not found:
            raise FileNotFoundError(f"{path}: no engine_gen.json or engine_embed.json in it")
        p = found[0]
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not JSON ({e})") from None
    return ("embed" if "gpu_kernel_ms_per_pass" in data.get("profile", {}) else "gen"), data


def dig(data: dict, keys: tuple[str, ...]) -> float | None:
    for k in keys:
        if not isinstance(data, dict) or data.get(k) is None:
            return None
        data = data[k]
    return float(data) if isinstance(data, int | float) else None


def rows(kind: str, before: dict, after: dict) -> list[tuple[str, float | None, float | None]]:
    """(label with unit, before, after) for every figure, kernel classes last (the union of
    both runs' classes, largest first by the before run)."""
    table = [
        (f"{label} ({unit})", dig(before, keys), dig(after, keys))
        for label, keys, unit in (GEN_ROWS if kind == "gen" else EMBED_ROWS)
    ]
    key = "classes_ms_per_step" if kind == "gen" else "classes_ms_per_pass"
    b, a = before.get("profile", {}).get(key, {}), after.get("profile", {}).get(key, {})
    for name in sorted({*b, *a}, key=lambda n: -b.get(n, a.get(n, 0.0))):
        table.append((f"  {name} (ms)", b.get(name), a.get(name)))
    return table


def render(table: list[tuple[str, float | None, float | None]]) -> str:
    def fmt(v: float | None) -> str:
        if v is None:
            return "-"
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:,.2f}"

    width = max(len(label) for label, _, _ in table)
    lines = [f"{'':{width}}  {'before':>10}  {'after':>10}  {'change':>8}"]
    for label, b, a in table:
        change = f"{100 * (a - b) / b:+.1f} %" if a is not None and b else "-"
        lines.append(f"{label:{width}}  {fmt(b):>10}  {fmt(a):>10}  {change:>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("before", help="engine_gen.json / engine_embed.json, or its folder")
    p.add_argument("after", help="the same for the other run")
    a = p.parse_args(argv)
    try:
        (kind_b, before), (kind_a, after) = load(a.before), load(a.after)
    except (OSError, ValueError) as e:
        p.error(str(e))
    if kind_b != kind_a:
        p.error(f"{a.before} is an engine_{kind_b} run, {a.after} an engine_{kind_a} one")
    print(render(rows(kind_b, before, after)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
