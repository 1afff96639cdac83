"""The study's conditions that tests/test_export*.py export: one of every way of sharing."""

from __future__ import annotations

from pathlib import Path

from coserve.export.model import build_deployment
from coserve.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
EXP = ROOT / "experiments"

# (spec file, condition, engine, mig GPU)
CASES = [
    ("seed-single-gpu", "timeslice", "vllm", None),
    ("seed-single-gpu", "mps", "vllm", None),
    ("seed-single-gpu", "mps", "builtin", None),
    ("demo", "co-located", None, None),
    ("demo", "gen-only", None, None),
    ("seed-tp2", "exclusive-tp1", "vllm", None),
    ("seed-tp2", "tp2-timeslice", "vllm", None),
    ("seed-tp2", "tp2-mps", "vllm", None),
    ("seed-mig", "mig-colocated", "vllm", "H200"),
    ("seed-mig", "mig-gen-only", "builtin", "H200"),
    ("co-scheduling", "mps-sm50", "vllm", None),
    ("co-scheduling", "mps-low-priority", "builtin", None),
    ("co-scheduling", "timeslice-guard5", "builtin", None),
    ("demo-equal-work", "timeslice.embed-r2", None, None),
]
IDS = [f"{s}:{c}:{e or 'spec'}" for s, c, e, _ in CASES]
K8S_CASES = [c for c in CASES if c[1] not in ("tp2-timeslice", "tp2-mps")]


def deployment(spec: str, cond: str, engine: str | None = None, mig_gpu: str | None = None):
    return build_deployment(load_spec(EXP / f"{spec}.toml"), cond, engine=engine, mig_gpu=mig_gpu)
