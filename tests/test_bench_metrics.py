"""Records -> summary: window accounting and the DESIGN.md contract, on hand-made records."""

from array import array

from coserve.bench.config import LoadConfig
from coserve.bench.loadgen import BenchResult, EndpointRun
from coserve.bench.metrics import dist

CONTRACT = {
    "gen": {"output_tokens_per_s", "requests_per_s", "completed", "failed", "tpot_ms",
            "ttft_ms", "itl_ms"},
    "embed": {"sequences_per_s", "requests_per_s", "completed", "failed", "latency_ms"},
}


def _gen_rec(i, start, end, ttft, n, status="ok"):
    r = {"endpoint": "gen", "i": i, "start_s": start, "end_s": end, "status": status}
    if status == "ok":
        e2e = (end - start) * 1e3
        r.update(ttft_ms=ttft, e2e_ms=e2e, tpot_ms=(e2e - ttft) / (n - 1), output_tokens=n)
    return r


def _result(gen=None, embed=None, warmup=10.0, duration=20.0, stopped=None):
    cfg = LoadConfig(gen_url="http://g" if gen else None, embed_url="http://e" if embed else None,
                     warmup_s=warmup, duration_s=duration)
    t0 = 1000.0
    return BenchResult(config=cfg, started_at="2026-11-25T00:00:00Z", t0=t0,
                       window_start=t0 + warmup, window_end=t0 + warmup + duration,
                       stopped_at=t0 + (stopped if stopped is not None else warmup + duration),
                       cut_short=stopped is not None, gen=gen, embed=embed)


def test_gen_window_accounting():
    ep = EndpointRun("gen", "http://g", "m", 4)
    ep.records = [
        _gen_rec(0, 0.0, 9.9, 100.0, 50),    # ends in warm-up: not counted
        _gen_rec(1, 5.0, 10.0, 200.0, 50),   # ends exactly at the window start: counted
        _gen_rec(2, 12.0, 29.999, 300.0, 50),  # inside
        _gen_rec(3, 25.0, 30.0, 400.0, 50),  # ends exactly at the window end: not counted
        _gen_rec(4, 20.0, 21.0, 0, 0, status="failed"),
        _gen_rec(5, 1.0, 2.0, 0, 0, status="failed"),  # failed in warm-up
        {"endpoint": "gen", "i": 6, "start_s": 29.0, "end_s": 30.0, "status": "cancelled"},
    ]
    ep.tokens_window = 1234.0
    ep.itl_window = array("d", [0.010, 0.011, 0.012])
    s = _result(gen=ep).summary()
    g = s["gen"]
    assert s["warmup_s"] == 10.0 and s["duration_s"] == 20.0 and s["cut_short"] is False
    assert g["completed"] == 2 and g["failed"] == 1
    assert g["output_tokens_per_s"] == 1234.0 / 20.0
    assert g["requests_per_s"] == 2 / 20.0
    assert g["ttft_ms"]["mean"] == 250.0 and g["ttft_ms"]["n"] == 2
    assert abs(g["itl_ms"]["mean"] - 11.0) < 1e-9
    assert s["embed"] is None


def test_embed_window_accounting_and_contract_keys():
    ep = EndpointRun("embed", "http://e", "m", 2)
    ep.records = [
        {"endpoint": "embed", "i": 0, "start_s": 9.0, "end_s": 9.5, "status": "ok",
         "latency_ms": 500.0, "sequences": 8},
        {"endpoint": "embed", "i": 1, "start_s": 9.5, "end_s": 10.5, "status": "ok",
         "latency_ms": 1000.0, "sequences": 8},
    ]
    ep.tokens_window = 8
    gen = EndpointRun("gen", "http://g", "m", 1)
    s = _result(gen=gen, embed=ep).summary()
    e = s["embed"]
    assert e["completed"] == 1 and e["sequences_per_s"] == 8 / 20.0
    assert e["latency_ms"]["p50"] == 1000.0
    for part, keys in CONTRACT.items():
        assert keys <= set(s[part]), part
        for k in keys:
            if k.endswith("_ms"):
                assert {"mean", "p50", "p95", "p99"} <= set(s[part][k])
    # nothing completed in the window: distributions are empty, rates zero
    assert s["gen"]["completed"] == 0 and s["gen"]["ttft_ms"]["n"] == 0
    assert s["gen"]["ttft_ms"]["p99"] is None and s["gen"]["output_tokens_per_s"] == 0


def test_cut_short_window_is_what_was_measured():
    ep = EndpointRun("gen", "http://g", "m", 1)
    ep.tokens_window = 500.0
    ep.records = [_gen_rec(0, 10.0, 14.0, 10.0, 10), _gen_rec(1, 14.0, 16.0, 10.0, 10)]
    s = _result(gen=ep, stopped=15.0).summary()
    assert s["cut_short"] is True and s["stopped_in"] == "measure"
    assert s["duration_s"] == 5.0 and s["planned_duration_s"] == 20.0
    assert s["gen"]["output_tokens_per_s"] == 100.0
    assert s["gen"]["completed"] == 1  # the one ending after the stop is outside
    s = _result(gen=ep, stopped=3.0).summary()
    assert s["stopped_in"] == "warmup" and s["duration_s"] == 0
    assert s["gen"]["output_tokens_per_s"] == 0


def test_dist_percentiles():
    d = dist([float(x) for x in range(1, 101)])
    assert d["n"] == 100 and d["mean"] == 50.5 and d["min"] == 1 and d["max"] == 100
    assert abs(d["p50"] - 50.5) < 1e-9 and abs(d["p99"] - 99.01) < 1e-9


def test_live_progress_renders_on_a_terminal_and_is_quiet_elsewhere():
    import io

    from rich.console import Console

    from coserve.bench.loadgen import Progress
    from coserve.bench.progress import LiveProgress

    p = Progress(phase="measure", elapsed_s=12.0, total_s=20.0, gen_tok_s=24363.0,
                 embed_seq_s=492.0, gen_in_flight=512, embed_in_flight=64, gen_completed=10,
                 embed_completed=300, gen_failed=2, embed_failed=0)
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=100)
    with LiveProgress(10.0, 10.0, console=console) as lp:
        assert lp.enabled
        lp.update(p)
        console.print(lp._render(p))
    out = buf.getvalue()
    assert "24,363 tok/s" in out and "492 seq/s" in out and "measuring" in out and "512" in out
    quiet = io.StringIO()
    with LiveProgress(10.0, 10.0, console=Console(file=quiet)) as lp:  # not a terminal
        assert not lp.enabled
        lp.update(p)
    assert quiet.getvalue() == ""
