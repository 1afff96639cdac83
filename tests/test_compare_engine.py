"""benchmarks/compare_engine.py on recorded runs (results/): the figures engine_gen.py printed
for that call come back side by side with their change; a phase a run skipped is "-"; a
missing file or a gen run against an embed one is a usage error naming them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "compare_engine.py"
RUNS = ROOT / "results" / "nvidia-h200-2026-12-02"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60
    )


def _row(out: str, label: str) -> list[str]:
    (line,) = [x for x in out.splitlines() if x.startswith(label)]
    return line[len(label) :].split()


def test_gen_before_after_of_one_call():
    r = _run(RUNS / "sorted-inter" / "before", RUNS / "sorted-inter" / "after" / "engine_gen.json")
    assert r.returncode == 0, r.stderr
    # as engine_gen.py printed them in that call (docs/performance.md, seventeenth session)
    assert _row(r.stdout, "offline, graphs (tok/s)") == ["28,786", "29,134", "+1.2", "%"]
    assert _row(r.stdout, "served (tok/s)") == ["28,761", "29,004", "+0.8", "%"]
    tpot99 = [x.split()[3:5] for x in r.stdout.splitlines() if x.startswith("  TPOT p99 (ms)")]
    assert tpot99 == [["22.35", "17.68"], ["18.22", "17.97"]]  # offline, then served
    assert _row(r.stdout, "graph replay (ms)") == ["16.94", "16.75", "-1.2", "%"]
    assert _row(r.stdout, "  MoE GEMMs (Triton FP8) (ms)") == ["9.31", "9.12", "-2.1", "%"]
    assert _row(r.stdout, "offline, eager (tok/s)") == ["-", "-", "-"]  # --skip eager


def test_a_phase_only_one_run_measured():
    r = _run(RUNS / "sorted-inter" / "after", RUNS / "final-figures" / "gen")
    assert r.returncode == 0, r.stderr
    assert _row(r.stdout, "offline, eager (tok/s)") == ["-", "7,168", "-"]
    assert _row(r.stdout, "served (tok/s)") == ["29,004", "-", "-"]


def test_embed_runs():
    embed = RUNS / "final-figures" / "embed"
    r = _run(embed, embed)
    assert r.returncode == 0, r.stderr
    assert _row(r.stdout, "served (seq/s)") == ["1,390", "1,390", "+0.0", "%"]
    assert "cuBLAS" in r.stdout  # its kernel classes


def test_bad_inputs_are_named(tmp_path):
    r = _run(RUNS / "final-figures" / "embed", RUNS / "sorted-inter" / "after")
    assert r.returncode == 2 and "is an engine_embed run" in r.stderr
    r = _run(tmp_path, RUNS / "sorted-inter" / "after")
    assert r.returncode == 2 and "no engine_gen.json or engine_embed.json in it" in r.stderr
    bad = tmp_path / "engine_gen.json"
    bad.write_text("{")
    r = _run(bad, bad)
    assert r.returncode == 2 and "not JSON" in r.stderr and "Traceback" not in r.stderr
