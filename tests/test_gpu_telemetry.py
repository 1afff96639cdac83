"""Telemetry against a fake NVML that returns known values: the series written to the run folder
and the summaries (mean, p50); MIG targets; and a machine without GPU/NVML, which records
nothing and says so."""

from __future__ import annotations

import csv
import json
import logging
import time

import pytest

from coserve.gpu.fakes import FakeNvml, fake_gpu
from coserve.gpu.telemetry import COLUMNS, METRICS, TelemetrySampler


def test_series_and_summary_from_known_values(tmp_path):
    nv = FakeNvml([fake_gpu()])  # utilisation 50,70,...; GPM SM util 80,90,...; power 300,500 W ...
    out = tmp_path / "telemetry.csv"
    s = TelemetrySampler(
        ["0"], interval_s=60, out_path=out, nvml=nv
    ).start()  # ticks taken by hand below
    try:
        rows = [s.sample_once()[0] for _ in range(4)]
    finally:
        summary = s.stop()
    assert [r["gpu_util"] for r in rows] == [50.0, 70.0, 50.0, 70.0]
    # start() read the budget first: the limit, and the draw before any tick
    assert s.at_start == {"0": {"power_limit_w": 700.0, "power_w": 300.0}}
    assert [r["power_w"] for r in rows] == [500.0, 300.0, 500.0, 300.0]
    assert [r["mem_used_mib"] for r in rows] == [1000.0, 3000.0, 1000.0, 3000.0]
    assert [r["sm_clock_mhz"] for r in rows] == [1980.0] * 4
    # GPM: each tick covers the interval since the previous sample; fractions like DCGM
    assert [r["sm_active"] for r in rows] == [0.8, 0.9, 0.8, 0.9]
    assert [r["sm_occupancy"] for r in rows] == [0.18, 0.2, 0.18, 0.2]
    assert [r["tensor_active"] for r in rows] == [0.17, 0.21, 0.17, 0.21]
    assert [r["dram_active"] for r in rows] == [0.3, 0.32, 0.3, 0.32]
    assert rows[1]["fp16_active"] == 0.03 and rows[1]["fp32_active"] == 0.07
    assert summary["gpu_util"] == {"mean": 60.0, "p50": 60.0}
    assert summary["sm_active"] == pytest.approx({"mean": 0.85, "p50": 0.85})
    assert summary["power_w"] == {"mean": 400.0, "p50": 400.0}
    assert set(summary) == set(METRICS)
    with open(out) as f:
        written = list(csv.DictReader(f))
    assert [float(r["sm_active"]) for r in written] == [0.8, 0.9, 0.8, 0.9]
    assert list(written[0]) == list(COLUMNS)
    assert nv.init_count == 0  # NVML shut down at stop


def test_clock_event_reasons_as_flags_per_tick():
    # 0x1 idle; 0x4 software power cap; 0x80 hardware power brake; 0x20|0x10 thermal + sync boost
    nv = FakeNvml([fake_gpu(clock_reasons=[0x1, 0x4, 0x80, 0x30])])
    s = TelemetrySampler(["0"], interval_s=60, nvml=nv, gpm=False).start()
    try:
        rows = [s.sample_once()[0] for _ in range(4)]
    finally:
        summary = s.stop()
    assert [r["power_capped"] for r in rows] == [0, 1, 1, 0]
    assert [r["thermal"] for r in rows] == [0, 0, 0, 1]
    assert [r["sync_boost"] for r in rows] == [0, 0, 0, 1]
    assert [r["clock_reasons"] for r in rows] == ["0x1", "0x4", "0x80", "0x30"]
    assert summary["power_capped"] == {"mean": 0.5, "p50": 0.5}


def test_thread_samples_at_the_interval_to_jsonl(tmp_path):
    util0 = [10, 40, 100]  # any tick dropped, repeated or mixed with the other GPU moves the mean
    nv = FakeNvml([fake_gpu(util_gpu=util0), fake_gpu(index=1, uuid="GPU-fake-0001", util_gpu=[5])])
    out = tmp_path / "telemetry.jsonl"
    with TelemetrySampler(["0", "GPU-fake-0001"], interval_s=0.05, out_path=out, nvml=nv) as s:
        time.sleep(0.6)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) >= 8 and {r["device"] for r in lines} == {"0", "GPU-fake-0001"}
    ticks = sum(r["device"] == "0" for r in lines)
    expected0 = [util0[i % 3] for i in range(ticks)]  # what the fake answered, in order
    assert [r["gpu_util"] for r in lines if r["device"] == "0"] == expected0
    summary = s.summary()
    assert summary["gpu_util/GPU-fake-0001"]["mean"] == 5.0
    assert summary["gpu_util/0"]["mean"] == pytest.approx(sum(expected0) / ticks)
    assert "sm_active" in summary and "sm_active/0" in summary
    assert s.available and "ticks over 2 device(s)" in s.status()


def test_mig_device_target(tmp_path):
    devs = [{"uuid": "MIG-gen", "profile": "4g.40gb", "gi_id": 1, "memory_mib": 40192}]
    nv = FakeNvml([fake_gpu(mig=True, mig_devices=devs)])
    s = TelemetrySampler(["MIG-gen"], interval_s=60, out_path=tmp_path / "t.csv", nvml=nv).start()
    rows = [s.sample_once()[0] for _ in range(2)]
    summary = s.stop()
    # utilisation is not reported for MIG devices: recorded as missing and noted once
    assert rows[0]["gpu_util"] is None and any("utilization unavailable" in n for n in s.notes)
    # power is the parent GPU's (the budget read at start took its first value)
    assert rows[0]["power_w"] == 500.0 and s.at_start["MIG-gen"]["power_w"] == 300.0
    assert rows[0]["sm_active"] == 0.8  # GPM through nvmlGpmMigSampleGet
    assert "gpu_util" not in summary and summary["sm_active"]["mean"] == pytest.approx(0.85)


def test_a_power_limit_nvml_does_not_give_is_none():
    nv = FakeNvml([fake_gpu(power_limit_mw=None)])
    s = TelemetrySampler(["0"], interval_s=60, nvml=nv, gpm=False).start()
    s.stop()
    assert s.at_start == {"0": {"power_limit_w": None, "power_w": 300.0}}


def test_gpu_without_gpm(tmp_path):
    nv = FakeNvml([fake_gpu(gpm=False)])
    s = TelemetrySampler(["0"], interval_s=60, nvml=nv).start()
    row = s.sample_once()[0]
    s.stop()
    assert row["gpu_util"] == 50.0 and row["sm_active"] is None
    assert any("GPM not supported" in n for n in s.notes)


def test_no_gpu_records_nothing_and_says_so(tmp_path, caplog):
    out = tmp_path / "telemetry.csv"
    with caplog.at_level(logging.WARNING, logger="coserve.gpu.telemetry"):
        s = TelemetrySampler(
            ["0"],
            interval_s=0.05,
            out_path=out,
            nvml=FakeNvml(fail_init="NVML Shared Library Not Found"),
        ).start()
        time.sleep(0.15)
        assert s.stop() == {}
    assert not s.available and s.rows == []
    assert not out.exists()
    assert s.reason.startswith(
        "no GPU: NVML could not be initialised (NVML Shared Library Not Found)"
    )
    assert "recorded nothing" in s.status()
    assert "no GPU" in caplog.text


def test_this_machine_without_fakes(tmp_path):
    """Whatever this machine is: on CPU it says 'no GPU'; nothing raises either way."""
    s = TelemetrySampler(["0"], interval_s=0.1, out_path=tmp_path / "t.csv").start()
    time.sleep(0.3)
    summary = s.stop()
    if not s.available:
        assert s.reason.startswith("no GPU") and summary == {}
    else:  # pragma: no cover - GPU machine
        assert "power_w" in summary


def test_cpu_run_with_no_devices(tmp_path):
    s = TelemetrySampler([], out_path=tmp_path / "t.csv").start()
    assert s.stop() == {} and "no GPU devices" in s.reason


def test_bad_interval():
    with pytest.raises(ValueError):
        TelemetrySampler(["0"], interval_s=0)
