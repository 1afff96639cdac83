"""Records -> summary: window accounting and the DESIGN.md contract, on hand-made records."""

import json
from array import array

import pytest

from coserve.bench.config import LoadConfig
from coserve.bench.metrics import dist
from coserve.bench.records import BenchResult, EndpointRun, RequestRecord

CONTRACT = {
    "gen": {
        "output_tokens_per_s",
        "requests_per_s",
        "completed",
        "failed",
        "tpot_ms",
        "ttft_ms",
        "itl_ms",
    },
    "embed": {"sequences_per_s", "requests_per_s", "completed", "failed", "latency_ms"},
}


def _gen_rec(i, start, end, ttft, n, status="ok"):
    r = RequestRecord("gen", i, start, status=status, end_s=end)
    if status == "ok":
        e2e = (end - start) * 1e3
        r.ttft_ms, r.e2e_ms, r.output_tokens = ttft, e2e, n
        r.tpot_ms = (e2e - ttft) / (n - 1)
    return r


def _result(gen=None, embed=None, warmup=10.0, duration=20.0, stopped=None):
    cfg = LoadConfig(
        gen_url="http://g" if gen else None,
        embed_url="http://e" if embed else None,
        warmup_s=warmup,
        duration_s=duration,
    )
    t0 = 1000.0
    return BenchResult(
        config=cfg,
        started_at="2026-11-25T00:00:00Z",
        t0=t0,
        window_start=t0 + warmup,
        window_end=t0 + warmup + duration,
        stopped_at=t0 + (stopped if stopped is not None else warmup + duration),
        cut_short=stopped is not None,
        gen=gen,
        embed=embed,
    )


def test_gen_window_accounting():
    ep = EndpointRun("gen", "http://g", "m", 4)
    ep.records = [
        _gen_rec(0, 0.0, 9.9, 100.0, 50),  # ends in warm-up: not counted
        _gen_rec(1, 5.0, 10.0, 200.0, 50),  # ends exactly at the window start: counted
        _gen_rec(2, 12.0, 29.999, 300.0, 50),  # inside
        _gen_rec(3, 25.0, 30.0, 400.0, 50),  # ends exactly at the window end: not counted
        _gen_rec(4, 20.0, 21.0, 0, 0, status="failed"),
        _gen_rec(5, 1.0, 2.0, 0, 0, status="failed"),  # failed in warm-up
        RequestRecord("gen", 6, 29.0, status="cancelled", end_s=30.0),
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
        RequestRecord("embed", 0, 9.0, end_s=9.5, latency_ms=500.0, sequences=8),
        RequestRecord("embed", 1, 9.5, end_s=10.5, latency_ms=1000.0, sequences=8),
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

    p = Progress(
        phase="measure",
        elapsed_s=12.0,
        total_s=20.0,
        gen_tok_s=24363.0,
        embed_seq_s=492.0,
        gen_in_flight=512,
        embed_in_flight=64,
        gen_completed=10,
        embed_completed=300,
        gen_failed=2,
        embed_failed=0,
    )
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


def test_closed_loop_rate_keys():
    ep = EndpointRun("gen", "http://g", "m", 4)
    ep.sent_window = 50
    g = _result(gen=ep).summary()["gen"]
    assert g["mode"] == "closed" and g["offered_rate_rps"] is None
    assert g["achieved_rate_rps"] == 2.5 and g["kept_up"] is True and g["warning"] is None
    assert g["goodput"] is None


def test_open_loop_kept_up_or_said_why():
    def summary(sent, scheduled, cap_waits=0):
        ep = EndpointRun("embed", "http://e", "m", 64, rate=10.0)
        ep.sent_window = ep.sent_of_scheduled = sent
        ep.scheduled_window, ep.cap_waits = scheduled, cap_waits
        return _result(embed=ep).summary()["embed"]

    e = summary(200, 203)
    assert e["mode"] == "rate" and e["offered_rate_rps"] == 10.0 and e["send_late_ms"]["n"] == 0
    assert e["achieved_rate_rps"] == 10.0 and e["kept_up"] is True and e["warning"] is None
    e = summary(190, 203)  # 93.6 % of the schedule: fell behind
    assert e["kept_up"] is False and "sent 190 of the 203" in e["warning"]
    e = summary(203, 203, cap_waits=3)  # all sent, but the cap made arrivals wait
    assert e["kept_up"] is False and "3 arrivals found all 64 slots" in e["warning"]
    assert "--embed-concurrency" in e["warning"]


def test_a_sender_held_at_the_cap_since_the_warm_up_says_so():
    """A throttled embed server (the SLO guard, H200, 2026-11-30) filled the 256-slot cap in
    the warm-up: the sender sat on a warm-up arrival all window, so none of the window's
    arrivals was looked at and the warning said only "sent 0 of the 1875"."""
    ep = EndpointRun("embed", "http://e", "m", 256, rate=61.25)
    ep.scheduled_window, ep.cap_wait_s = 1225, 20.0
    ep.sent_window = ep.sent_backlog = 165  # the cap's slots freed to warm-up arrivals only
    e = _result(embed=ep).summary()["embed"]
    assert e["kept_up"] is False and e["cap_waits"] == 0 and e["cap_wait_s"] == 20.0
    assert "sent 0 of the 1225" in e["warning"]
    assert "(165 sent in it, 165 of them arrivals from before it: 8.25 of 61.25" in e["warning"]
    assert "held at the cap of 256 in flight for 20 s of the 20 s window" in e["warning"]
    assert "0 arrivals" not in e["warning"] and "--embed-concurrency" in e["warning"]


def _embed_queue(rate, served, latency_s=0.1, warmup=10.0, duration=20.0):
    """An open-loop embed endpoint offered `rate` req/s that answers `served` req/s in order
    (a FIFO server): request i is sent at i / rate and ends at i / served + latency_s; the
    bench cuts what is still waiting when the window ends."""
    end_of_run = warmup + duration
    ep = EndpointRun("embed", "http://e", "m", 256, rate=rate)
    for i in range(int(rate * end_of_run)):
        start, end = i / rate, i / served + latency_s
        r = RequestRecord("embed", i, start, scheduled_s=start, end_s=min(end, end_of_run))
        r.status = "ok" if end < end_of_run else "cancelled"
        if r.status == "ok":
            r.latency_ms, r.sequences = (end - start) * 1e3, 8
        ep.records.append(r)
    in_window = [r for r in ep.records if warmup <= r.start_s < end_of_run]
    ep.scheduled_window = ep.sent_window = ep.sent_of_scheduled = len(in_window)
    return _result(embed=ep, warmup=warmup, duration=duration).summary()["embed"]


def test_an_open_loop_whose_queue_grows_did_not_keep_up_though_the_cap_was_never_hit():
    """The 18 ms SLO guard on two H200s (2026-11-30) served 431 of the 490 seq/s offered:
    every arrival was sent, the 256-slot cap was never reached in a 20 s window, and the
    summary said it kept up."""
    e = _embed_queue(rate=61.25, served=61.25)
    assert e["kept_up"] is True and e["warning"] is None
    e = _embed_queue(rate=61.25, served=54.0)  # 88 % served: ~145 more waiting at the end
    assert e["kept_up"] is False
    assert "requests in flight grew from" in e["warning"]
    assert "answered slower than they arrived" in e["warning"]
    # requests living longer than the warm-up: the queue still fills to its steady size
    # (20 req/s x 8 s = 160) inside the window, from 100 at its start, while the server keeps up
    e = _embed_queue(rate=20.0, served=20.0, latency_s=8.0, warmup=5.0)
    assert e["kept_up"] is True and e["warning"] is None
    # and one that falls behind with requests outliving the warm-up is still caught (a tiny
    # CPU embed server at twice its rate, 2.4 s answers: the check was skipped there)
    e = _embed_queue(rate=26.0, served=13.0, latency_s=2.4, warmup=3.0, duration=5.0)
    assert e["kept_up"] is False and "requests in flight grew from" in e["warning"]


def test_goodput_counts_requests_meeting_every_bound():
    ep = EndpointRun("gen", "http://g", "m", 4)
    # (ttft, e2e, n): tpot = (e2e - ttft) / (n - 1)
    recs = [
        (100, 1090, 100),  # tpot 10: good
        (600, 1590, 100),  # ttft over
        (100, 2080, 100),  # tpot 20 over
        (100, 100, 1),  # one token, no tpot: good
        (499.9, 1489.9, 100),
    ]  # good, just inside
    ep.records = []
    for i, (ttft, e2e, n) in enumerate(recs):
        r = _gen_rec(i, 11.0, 11.0 + e2e / 1e3, ttft, max(n, 2))
        r.output_tokens, r.tpot_ms = n, (e2e - ttft) / (n - 1) if n > 1 else None
        ep.records.append(r)
    cfg_kw = dict(goodput_ttft_ms=500.0, goodput_tpot_ms=15.0)
    res = _result(gen=ep)
    res.config = LoadConfig(gen_url="http://g", warmup_s=10.0, duration_s=20.0, **cfg_kw)
    g = res.summary()["gen"]
    assert g["goodput"]["requests"] == 3
    assert g["goodput"]["requests_per_s"] == 3 / 20.0
    assert g["goodput"]["output_tokens_per_s"] == (100 + 1 + 100) / 20.0
    assert g["goodput"]["bounds_ms"] == {"ttft": 500.0, "tpot": 15.0}
    res.config = LoadConfig(
        gen_url="http://g", warmup_s=10.0, duration_s=20.0, goodput_e2el_ms=1100.0, **cfg_kw
    )
    assert res.summary()["gen"]["goodput"]["requests"] == 2  # the 1,489.9 ms one is out
    s = res.summary()
    assert s["load"]["slo"] == {
        "ttft_ms": 500.0,
        "tpot_ms": 15.0,
        "e2el_ms": 1100.0,
        "embed_ms": None,
    }


def test_embed_goodput_and_encoding_note():
    ep = EndpointRun("embed", "http://e", "m", 2)
    ep.records = [
        RequestRecord("embed", i, 11.0, end_s=11.5, latency_ms=lat, sequences=8)
        for i, lat in enumerate([50.0, 100.0, 100.1, 300.0])
    ]
    ep.encoding_mismatch, ep.encoding_answered = 4, "float"
    res = _result(embed=ep)
    res.config = LoadConfig(
        embed_url="http://e", warmup_s=10.0, duration_s=20.0, embed_slo_ms=100.0
    )
    e = res.summary()["embed"]
    assert e["goodput"] == {"sequences_per_s": 16 / 20.0, "requests": 2, "slo_ms": 100.0}
    assert e["encoding_mismatch"] == {"asked": "base64", "answered": "float", "answers": 4}


def test_a_record_round_trips_through_its_json_line():
    r = RequestRecord(
        "gen",
        3,
        1.5,
        status="failed",
        end_s=2.0,
        worker=1,
        chunks=5,
        chunk_tokens=5,
        tokens_in_window=0,
    )
    line = r.to_json()
    d = json.loads(line)
    assert d["http_status"] is None and d["error"] is None  # "no HTTP answer" is written
    assert "ttft_ms" not in d and "scheduled_s" not in d
    assert RequestRecord.from_json(line) == r
    ok = RequestRecord("embed", 0, 0.1, end_s=0.2, http_status=200, latency_ms=100.0)
    assert "error" not in json.loads(ok.to_json())
    with pytest.raises(ValueError, match="not a request record"):
        RequestRecord.from_json('{"x": 1}')


def test_failures_that_quote_their_own_figures_are_counted_by_status():
    """33 prompts over the limit, each 400 quoting its own length, read "1 x 400 ... (of 33
    failures)": counted by message, every message was its own."""
    from coserve.bench.metrics import refused_all

    ep = EndpointRun("gen", "http://g", "m", 4)
    for i in range(33):
        ep.errors[(400, f"prompt of {100_000 + i} tokens is over 4096")] += 1
    ep.errors[(500, "boom")] += 2
    said = refused_all(ep)
    assert "33 x 400 e.g. prompt of 100000 tokens is over 4096 (of 35 failures)" in said, said
    one = EndpointRun("gen", "http://g", "m", 4)
    one.errors[(404, "no model nope")] += 5
    assert "5 x 404 no model nope (of 5 failures)" in refused_all(one)
