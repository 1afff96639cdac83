"""Open-loop load, goodput, chat and the accounting of requests that do not complete, each
against the stream test server on loopback with known timings."""

import numpy as np
import pytest

from coserve.bench import stream_server
from coserve.bench.config import LoadConfig
from coserve.bench.loadgen import run_load, run_sync


def _load(**kw):
    kw.setdefault("warmup_s", 0.5)
    kw.setdefault("duration_s", 2.0)
    return run_sync(run_load(LoadConfig(**kw)))


@pytest.fixture(scope="module")
def server():
    with stream_server.spawn(ttft_ms=20, itl_ms=5, embed_latency_ms=20) as srv:
        yield srv


def test_the_achieved_rate_tracks_the_offered_one(server):
    # both endpoints open-loop at once
    r = _load(
        gen_url=server.url,
        embed_url=server.url,
        gen_rate=40.0,
        embed_rate=150.0,
        arrival="constant",
        output_len=10,
        duration_s=3.0,
    )
    s = r.summary()
    for part, rate in (("gen", 40.0), ("embed", 150.0)):
        ep = s[part]
        assert ep["mode"] == "rate" and ep["offered_rate_rps"] == rate
        assert abs(ep["achieved_rate_rps"] - rate) <= 0.03 * rate, ep["achieved_rate_rps"]
        assert ep["kept_up"] is True and ep["warning"] is None and ep["failed"] == 0
        assert ep["scheduled_in_window"] == int(rate * 3.0)
    # sequences counted by completion inside the 3 s window: on a loaded 2-core machine the
    # last requests' completions slip past its end (1,152 of 1,200 with two suites running)
    assert abs(s["embed"]["sequences_per_s"] - 150 * 8) <= 0.05 * 150 * 8
    # requests leave at their scheduled time (a shared 2-core VM: a loose tail)
    late = np.array([x.start_s - x.scheduled_s for x in r.records if x.start_s >= 0.5])
    assert late.min() >= 0 and np.median(late) < 0.002 and np.percentile(late, 95) < 0.02
    assert s["embed"]["send_late_ms"]["n"] == 450 and s["embed"]["send_late_ms"]["p50"] < 2
    assert s["load"]["arrival"] == "constant" and s["load"]["embed_rate"] == 150.0


def test_one_endpoint_open_the_other_closed(server):
    s = _load(
        gen_url=server.url,
        embed_url=server.url,
        gen_concurrency=4,
        output_len=10,
        embed_rate=50.0,
        duration_s=1.5,
    ).summary()
    assert s["gen"]["mode"] == "closed" and s["gen"]["offered_rate_rps"] is None
    assert s["embed"]["mode"] == "rate" and s["embed"]["kept_up"] is True
    assert s["gen"]["completed"] > 0 and s["embed"]["completed"] > 0


def test_a_server_that_cannot_keep_up_is_said_so():
    # 100 req/s of 200 ms each needs 20 in flight; the cap of 4 allows 20 req/s
    with stream_server.spawn(embed_latency_ms=200) as srv:
        s = _load(
            embed_url=srv.url,
            embed_rate=100.0,
            embed_concurrency=4,
            arrival="constant",
            warmup_s=0.3,
            duration_s=1.5,
        ).summary()
    e = s["embed"]
    assert e["kept_up"] is False and e["cap_waits"] > 0
    assert "did not keep up" in e["warning"] and "sent" in e["warning"]
    assert e["achieved_rate_rps"] < 0.5 * 100
    # the cap is full nearly all the window: each slot frees every 200 ms and is taken at once
    assert 0.8 * 1.5 < e["cap_wait_s"] <= 1.5 and "held at the cap of 4" in e["warning"]
    # the queue at the cap holds arrivals from the warm-up: the window's sends are theirs
    assert "of them arrivals from before it" in e["warning"]


def test_goodput_is_exact_on_a_scripted_server():
    # one request at a time, so request i is the server's (i+1)-th: every 4th gen request
    # starts 100 ms late, every 4th embed request is answered 100 ms late
    with stream_server.spawn(
        ttft_ms=10, itl_ms=2, embed_latency_ms=10, slow_every=4, slow_ms=100
    ) as srv:
        r = _load(
            gen_url=srv.url,
            embed_url=srv.url,
            gen_concurrency=1,
            embed_concurrency=1,
            output_len=10,
            goodput_ttft_ms=60.0,
            goodput_tpot_ms=10.0,
            embed_slo_ms=60.0,
            warmup_s=0.3,
            duration_s=1.5,
        )
    s = r.summary()
    ws, we = 0.3, 1.8
    done = {
        k: [x for x in r.records if x.endpoint == k and x.status == "ok" and ws <= x.end_s < we]
        for k in ("gen", "embed")
    }
    fast_gen = [x for x in done["gen"] if (x.i + 1) % 4]
    fast_embed = [x for x in done["embed"] if (x.i + 1) % 4]
    assert 0 < len(fast_gen) < len(done["gen"]) and 0 < len(fast_embed) < len(done["embed"])
    g, e = s["gen"]["goodput"], s["embed"]["goodput"]
    assert g["requests"] == len(fast_gen)
    assert g["requests_per_s"] == round(len(fast_gen) / 1.5, 4)
    assert g["output_tokens_per_s"] == round(10 * len(fast_gen) / 1.5, 3)
    assert e["requests"] == len(fast_embed)
    assert e["sequences_per_s"] == round(8 * len(fast_embed) / 1.5, 3)


def test_chat_is_measured_as_completions_are():
    with stream_server.spawn(ttft_ms=30, itl_ms=5) as srv:
        r = _load(
            gen_url=srv.url,
            gen_endpoint="chat",
            gen_concurrency=4,
            output_len=20,
            warmup_s=0.4,
            duration_s=1.5,
        )
    g = r.summary()["gen"]
    assert g["endpoint"] == "chat" and g["failed"] == 0 and g["completed"] > 0
    assert abs(g["ttft_ms"]["p50"] - 30) < 3 and abs(g["tpot_ms"]["p50"] - 5) < 0.3
    assert abs(g["itl_ms"]["mean"] - 5) < 0.25  # the mean: this shared VM jitters chunks
    ok = [x for x in r.records if x.status == "ok"]
    # the role chunk carries no token: 20 content chunks, 20 tokens, as usage says
    assert all(x.chunks == 20 and x.output_tokens == 20 and x.usage_tokens == 20 for x in ok)
    assert all(x.prompt_tokens == 30 for x in ok)  # 30 token ids -> 30 words
    cycle_s = (30 + 19 * 5) / 1e3
    assert abs(g["output_tokens_per_s"] - 4 * 20 / cycle_s) <= 0.06 * 4 * 20 / cycle_s


def test_an_embed_answer_in_another_encoding_is_measured_and_noted():
    with stream_server.spawn(
        embed_latency_ms=20, embed_dim=16, embed_answer_encoding="float"
    ) as srv:
        r = _load(embed_url=srv.url, embed_concurrency=2, warmup_s=0.2, duration_s=1.0)
    e = r.summary()["embed"]
    assert e["failed"] == 0 and e["completed"] > 0 and e["dim"] == 16
    assert e["sequences_per_s"] == e["sequences_in_window"] / 1.0 > 0
    m = e["encoding_mismatch"]
    assert m["asked"] == "base64" and m["answered"] == "float"
    assert m["answers"] == e["totals"]["completed"]


# ------------------------------------------------------------------ accounting, case by case


@pytest.mark.parametrize("as_error", [False, True], ids=["dropped", "error-event"])
def test_streams_that_all_fail_count_no_token(as_error):
    # every stream dropped (or ended by an error event) after 5 tokens, C=4: what the
    # failed streams delivered counts nothing (this once read 242 tok/s, 0 completed); only
    # the <= 4 streams the window's end cut, at most 5 tokens each, count what arrived
    with stream_server.spawn(
        ttft_ms=10, itl_ms=5, drop_every=1, drop_after=5, drop_as_error=as_error
    ) as srv:
        r = _load(gen_url=srv.url, gen_concurrency=4, output_len=20, warmup_s=0.3, duration_s=1.0)
    g = r.summary()["gen"]
    assert g["completed"] == 0 and g["failed"] > 10
    failed = [x for x in r.records if x.status == "failed"]
    cut = [x for x in r.records if x.status == "cancelled"]
    assert all(x.chunks == 5 and x.tokens_in_window == 0 for x in failed)
    assert len(cut) <= 4 and all(x.chunks <= 5 for x in cut)  # a worker may be pausing
    counted = sum(x.tokens_in_window for x in cut)
    assert g["output_tokens_in_window"] == counted <= 20
    assert g["output_tokens_per_s"] == counted / 1.0
    assert g["itl_ms"]["n"] <= sum(max(0, x.chunks - 1) for x in cut)
    assert g["totals"]["output_tokens"] == sum(x.chunks for x in cut)
    if as_error:
        assert all(x.http_status == 200 and "injected error event" in x.error for x in failed)
    else:
        assert all(x.http_status is None for x in failed)


def test_some_streams_failing_leave_exactly_the_others_tokens():
    # every 2nd stream dropped after 3 of 10 tokens: tok/s is the completed and the cut
    # (window's end) requests' tokens inside the window, nothing of the dropped ones
    with stream_server.spawn(ttft_ms=10, itl_ms=5, drop_every=2, drop_after=3) as srv:
        r = _load(gen_url=srv.url, gen_concurrency=4, output_len=10, warmup_s=0.3, duration_s=1.2)
    g = r.summary()["gen"]
    by = {k: [x for x in r.records if x.status == k] for k in ("ok", "failed", "cancelled")}
    assert by["ok"] and by["failed"] and by["cancelled"]
    assert all(x.tokens_in_window == 0 for x in by["failed"])
    counted = sum(x.tokens_in_window for x in by["ok"] + by["cancelled"])
    assert g["output_tokens_in_window"] == pytest.approx(counted)
    assert g["output_tokens_per_s"] == pytest.approx(counted / 1.2, rel=1e-3)
    # ITL gaps: 9 per completed request at most, none from a failed one
    inside_ok = [x for x in by["ok"] if 0.3 <= x.start_s and x.end_s < 1.5]
    assert g["itl_ms"]["n"] >= 9 * len(inside_ok)
    assert g["itl_ms"]["n"] <= 9 * (len(by["ok"]) + len(by["cancelled"]))
    assert g["totals"]["output_tokens"] == sum(x.chunk_tokens for x in by["ok"] + by["cancelled"])
