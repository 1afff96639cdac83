"""The report's per-GPU telemetry: the window's samples split by device, each GPU named with the
servers a strategy put on it, and runs recorded before reps kept per-device figures read from
their telemetry.jsonl."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from coserve.experiment.rep import read_telemetry, window_telemetry
from coserve.report.per_gpu import gpu_rows, per_gpu_blocks

STARTED = "2026-11-30T05:00:00+00:00"
T0 = 1796014800.0  # STARTED as a Unix time
BENCH = {"started_at": STARTED, "warmup_s": 10, "duration_s": 20}


def _rows(sm: dict[str, float]) -> list[dict]:
    """Samples every second from the load's start to past its window, one per device."""
    return [
        {"t": T0 + s, "t_rel_s": s, "device": d, "sm_active": v, "power_w": 100 + 500 * v}
        for s in range(0, 40)
        for d, v in sm.items()
    ]


def test_the_window_is_split_by_device_when_there_are_several():
    rows = _rows({"0": 0.8, "1": 0.2})
    rows.append({"t": T0 + 5, "device": "0", "sm_active": 0.0})  # warm-up: left out
    w = window_telemetry(rows, BENCH)
    assert w["sm_active"]["mean"] == pytest.approx(0.5)
    assert w["sm_active/0"]["mean"] == pytest.approx(0.8)
    assert w["sm_active/1"]["mean"] == pytest.approx(0.2)
    assert w["sm_active/0"]["n"] == 21  # seconds 10..30 of the load
    one = window_telemetry(_rows({"0": 0.8}), BENCH)
    assert not any("/" in k for k in one)


def _rep(rep: int, roles: dict[str, list[str]], window: dict | None) -> dict:
    return {
        "condition": "dedicated",
        "rep": rep,
        "status": "ok",
        "bench": BENCH,
        "strategy_info": {"roles": {r: {"devices": d} for r, d in roles.items()}},
        "telemetry": {"window": window or {}},
    }


def _run(tmp_path: Path, recs: list[dict]):
    def rep_dir(name: str, rep: int) -> Path:
        return tmp_path / name / f"rep-{rep}"

    cs = SimpleNamespace(name="dedicated", ok=recs)
    return SimpleNamespace(matrix=[cs], run_dir=SimpleNamespace(rep_dir=rep_dir))


def test_each_gpu_gets_its_servers_and_its_own_figures(tmp_path):
    roles = {"gen": ["0"], "embed": ["1"]}
    new = _rep(1, roles, window_telemetry(_rows({"0": 0.8, "1": 0.3}), BENCH))
    old = _rep(2, roles, {"sm_active": {"mean": 0.5}})  # recorded before per-device keys
    d = tmp_path / "dedicated" / "rep-2"
    d.mkdir(parents=True)
    (d / "telemetry.jsonl").write_text(
        "\n".join(json.dumps(r) for r in _rows({"0": 0.9, "1": 0.1}))
    )
    rows = gpu_rows(_run(tmp_path, [new, old]))
    assert [(r.device, r.roles) for r in rows] == [("0", ("gen",)), ("1", ("embed",))]
    assert rows[0].summary["sm_active"].mean == pytest.approx(0.85)
    assert rows[1].summary["sm_active"].mean == pytest.approx(0.2)
    assert rows[1].summary["sm_active"].n == 2
    table = per_gpu_blocks(_run(tmp_path, [new, old]))[1]
    assert table.rows[0][:3] == ["dedicated", "0", "gen"]


def test_a_gpu_names_only_the_servers_the_condition_ran(tmp_path):
    """A TP=2 gen-alone rep (H200 x2, 2026-11-30): its strategy gives embed GPUs 0 and 1 too,
    and the table said "gen, embed" on both."""
    rec = _rep(1, {"gen": ["0", "1"], "embed": ["0", "1"]}, None)
    rec["telemetry"]["window"] = window_telemetry(_rows({"0": 0.6, "1": 0.6}), BENCH)
    rec["servers"] = {"gen": {"url": "http://127.0.0.1:9"}}
    assert [(r.device, r.roles) for r in gpu_rows(_run(tmp_path, [rec]))] == [
        ("0", ("gen",)),
        ("1", ("gen",)),
    ]


def test_one_gpu_runs_have_no_per_gpu_table(tmp_path):
    rec = _rep(1, {"gen": ["0"], "embed": ["0"]}, window_telemetry(_rows({"0": 0.7}), BENCH))
    assert gpu_rows(_run(tmp_path, [rec])) == []
    assert per_gpu_blocks(_run(tmp_path, [rec])) == []


def test_bool_and_non_finite_samples_are_no_figures():
    rows = _rows({"0": 0.8, "1": 0.2})
    rows += [{"t": T0 + 15, "device": "0", "sm_active": x} for x in (True, float("nan"), "high")]
    w = window_telemetry(rows, BENCH)
    assert w["sm_active/0"]["mean"] == pytest.approx(0.8)
    assert w["sm_active/0"]["n"] == 21


def test_telemetry_lines_that_are_no_sample_are_skipped(tmp_path):
    good = _rows({"0": 0.9, "1": 0.1})
    path = tmp_path / "telemetry.jsonl"
    junk = [b"[1, 2]", b"42", b'{"t": "x", "device": "0", "sm_active": 0.0}', b"\xff\xfe\x00"]
    lines = junk + [json.dumps(r).encode() for r in good]
    path.write_bytes(b"\n".join(lines) + b'\n{"t": 17960148')  # cut by a crash
    assert read_telemetry(path) == good


def test_a_record_or_telemetry_of_another_shape_is_no_crash(tmp_path):
    d = tmp_path / "dedicated" / "rep-1"
    d.mkdir(parents=True)
    (d / "telemetry.jsonl").write_bytes(
        b"[1]\n" + "\n".join(json.dumps(r) for r in _rows({"0": 0.9, "1": 0.1})).encode()
    )
    odd = _rep(1, {}, None)
    odd["strategy_info"] = ["gen"]
    odd["telemetry"] = [1]
    roles_list = _rep(2, {}, {"sm_active/0": 5, "sm_active/1": {"mean": "x"}})
    roles_list["strategy_info"] = {"roles": ["gen"]}
    info_str = _rep(3, {}, {"sm_active/0": {"mean": 0.5}, "sm_active/1": {"mean": 0.5}})
    info_str["strategy_info"] = {"roles": {"gen": "0", "embed": {"devices": [1]}}}
    rows = gpu_rows(_run(tmp_path, [odd, roles_list, info_str]))
    assert [(r.device, r.roles) for r in rows] == [("0", ()), ("1", ())]
    assert rows[0].summary["sm_active"].n == 2
    assert per_gpu_blocks(_run(tmp_path, [info_str]))[1].rows[1][:3] == ["dedicated", "1", "embed"]


@pytest.mark.timeout(10)
def test_a_fifo_in_place_of_telemetry_is_refused_not_read(tmp_path):
    import os

    path = tmp_path / "telemetry.jsonl"
    os.mkfifo(path)  # a read would block until a writer came, which none will
    with pytest.raises(OSError, match="not a regular file"):
        read_telemetry(path)
