"""`run_load` against the stream test server on loopback (in its own process): the numbers
come out as the server was told to stream them, failures are counted, edges are honest."""

import asyncio
import os
import signal
import threading
import time

import pytest

from coserve.bench import stream_server
from coserve.bench.config import LoadConfig
from coserve.bench.loadgen import BenchError, EndpointDead, run_load, run_sync
from coserve.bench.workers import DEAD_AFTER_S
from coserve.procs import free_port

TTFT_MS, ITL_MS, EMBED_MS = 50.0, 10.0, 80.0


def _load(**kw):
    kw.setdefault("warmup_s", 0.6)
    kw.setdefault("duration_s", 2.0)
    return run_sync(run_load(LoadConfig(**kw)))


@pytest.fixture(scope="module")
def server():
    with stream_server.spawn(
        ttft_ms=TTFT_MS, itl_ms=ITL_MS, embed_latency_ms=EMBED_MS, model="test-model"
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def both(server):
    """One run driving gen and embed at once; several tests read it."""
    return _load(
        gen_url=server.url,
        embed_url=server.url,
        gen_concurrency=8,
        output_len=20,
        embed_concurrency=4,
        embed_batch=8,
        warmup_s=0.8,
        duration_s=2.5,
    )


def _close(measured, expected, rel):
    return abs(measured - expected) <= rel * expected


def test_gen_numbers_match_the_server_timing(both):
    g = both.summary()["gen"]
    n = 20
    # a request: TTFT, then n-1 gaps; closed loop of 8
    cycle_s = (TTFT_MS + (n - 1) * ITL_MS) / 1e3
    assert _close(g["output_tokens_per_s"], 8 * n / cycle_s, 0.05), g["output_tokens_per_s"]
    assert _close(g["requests_per_s"], 8 / cycle_s, 0.12), g["requests_per_s"]
    assert _close(g["ttft_ms"]["p50"], TTFT_MS, 0.06), g["ttft_ms"]
    assert _close(g["tpot_ms"]["mean"], ITL_MS, 0.03), g["tpot_ms"]
    assert _close(g["tpot_ms"]["p50"], ITL_MS, 0.03), g["tpot_ms"]
    assert _close(g["itl_ms"]["mean"], ITL_MS, 0.03), g["itl_ms"]
    assert _close(g["itl_ms"]["p50"], ITL_MS, 0.05), g["itl_ms"]
    assert g["model"] == "test-model"  # the first entry of /v1/models
    assert g["failed"] == 0 and g["completed"] > 0
    assert g["mean_output_tokens"] == n
    assert g["totals"]["usage_mismatch"] == 0


def test_embed_numbers_match_the_server_timing(both):
    e = both.summary()["embed"]
    # 4 in flight, 8 sequences each, 80 ms each (+ a little loopback and parsing)
    assert _close(e["sequences_per_s"], 4 * 8 / (EMBED_MS / 1e3), 0.06), e["sequences_per_s"]
    assert _close(e["latency_ms"]["p50"], EMBED_MS, 0.06), e["latency_ms"]
    assert e["failed"] == 0 and e["batch"] == 8 and e["model"] == "test-model"
    assert e["encoding"] == "base64" and e["dim"] == 8  # the openai client's default


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_embed_answers_in_either_encoding_are_counted_and_their_shape_read(encoding):
    with stream_server.spawn(embed_latency_ms=EMBED_MS, embed_dim=1024) as srv:
        r = _load(
            embed_url=srv.url,
            embed_concurrency=4,
            embed_batch=8,
            warmup_s=0.4,
            duration_s=1.2,
            embed_encoding=encoding,
        )
    e = r.summary()["embed"]
    assert e["encoding"] == encoding and e["dim"] == 1024
    assert e["failed"] == 0 and e["totals"]["failed"] == 0
    assert _close(e["sequences_per_s"], 4 * 8 / (EMBED_MS / 1e3), 0.08), e["sequences_per_s"]
    ok = [x for x in r.records if x.status == "ok"]
    assert ok and all(x.dim == 1024 and x.sequences == 8 for x in ok)


def test_records_are_consistent_with_the_summary(both):
    s = both.summary()
    ok = [r for r in both.records if r.status == "ok" and r.endpoint == "gen"]
    assert ok and all(r.output_tokens == 20 and r.chunks == 20 for r in ok)
    assert all(r.usage_tokens == 20 and r.prompt_tokens == 30 for r in ok)
    assert {r.endpoint for r in both.records} == {"gen", "embed"}
    # tokens in the window: the per-request counts add up to the endpoint's
    gen = [r for r in both.records if r.endpoint == "gen"]
    assert all(
        r.tokens_in_window is not None for r in gen
    )  # a record without its count must fail, not add 0
    in_window = sum(r.tokens_in_window for r in gen)
    assert in_window > 0 and in_window == s["gen"]["output_tokens_in_window"]
    # the closed loop kept exactly C in flight: requests cancelled at the end == C
    cancelled = [r for r in both.records if r.status == "cancelled"]
    assert sum(r.endpoint == "gen" for r in cancelled) == 8
    assert sum(r.endpoint == "embed" for r in cancelled) == 4


def test_window_edges_count_only_what_arrived_inside(server):
    # One request of 1000 tokens (10 s): it neither starts nor ends in the 1.5 s window,
    # yet every token arriving inside counts: 100 tok/s, no request completed.
    r = _load(
        gen_url=server.url,
        gen_concurrency=1,
        output_len=1000,
        warmup_s=0.5,
        duration_s=1.5,
        record_chunks=True,
    )
    g = r.summary()["gen"]
    assert g["completed"] == 0 and g["requests_per_s"] == 0 and g["ttft_ms"]["n"] == 0
    assert _close(g["output_tokens_per_s"], 1000 / ITL_MS, 0.03), g["output_tokens_per_s"]
    rec = r.records[0]
    inside = [t for t in rec.chunk_times_s if 0.5 <= rec.start_s + t < 2.0]
    assert abs(len(inside) - g["output_tokens_in_window"]) <= 1  # rounding of stored times
    assert rec.status == "cancelled" and g["itl_ms"]["n"] >= len(inside) - 1


def test_token_ids_and_usage_count_tokens_honestly():
    # 4 tokens a chunk, said by token_ids: counted as 4 each
    with stream_server.spawn(ttft_ms=20, itl_ms=5, tokens_per_chunk=4, token_ids=True) as srv:
        g = _load(gen_url=srv.url, gen_concurrency=4, output_len=40, duration_s=1.5)
    s = g.summary()["gen"]
    ok = [r for r in g.records if r.status == "ok"]
    assert ok and all(r.chunks == 10 and r.chunk_tokens == 40 for r in ok)
    cycle_s = (20 + 9 * 4 * 5) / 1e3
    assert _close(s["output_tokens_per_s"], 4 * 40 / cycle_s, 0.06), s
    assert s["totals"]["usage_mismatch"] == 0
    # 4 tokens a chunk, not said: usage corrects the count
    with stream_server.spawn(ttft_ms=20, itl_ms=5, tokens_per_chunk=4) as srv:
        g = _load(gen_url=srv.url, gen_concurrency=4, output_len=40, duration_s=1.5)
    s = g.summary()["gen"]
    ok = [r for r in g.records if r.status == "ok"]
    assert ok and all(r.chunk_tokens == 10 and r.output_tokens == 40 for r in ok)
    assert s["totals"]["usage_mismatch"] == len(ok)
    assert _close(s["output_tokens_per_s"], 4 * 40 / cycle_s, 0.08), s
    # no usage at all: the chunks are the count; a server that stops early (EOS) is believed
    with stream_server.spawn(ttft_ms=20, itl_ms=5, usage=False, tokens=7) as srv:
        g = _load(gen_url=srv.url, gen_concurrency=2, output_len=40, duration_s=1.0)
    ok = [r for r in g.records if r.status == "ok"]
    assert ok and all(r.output_tokens == 7 and r.usage_tokens is None for r in ok)
    assert abs(g.summary()["gen"]["tpot_ms"]["p50"] - 5) < 0.3


def test_non_2xx_answers_are_counted_with_status_and_message():
    with stream_server.spawn(
        ttft_ms=10,
        itl_ms=5,
        embed_latency_ms=10,
        fail_every=4,
        fail_status=503,
        fail_message="overloaded, try later",
    ) as srv:
        r = _load(
            gen_url=srv.url,
            embed_url=srv.url,
            gen_concurrency=4,
            output_len=10,
            embed_concurrency=2,
            warmup_s=0.3,
            duration_s=1.2,
        )
    s = r.summary()
    for part in ("gen", "embed"):
        ep = s[part]
        assert ep["failed"] > 0 and ep["completed"] > 0
        # every 4th request fails: a quarter of those that ended in the window
        assert 0.15 < ep["failed"] / (ep["failed"] + ep["completed"]) < 0.35
        assert ep["errors"][0]["status"] == 503
        assert ep["errors"][0]["message"] == "overloaded, try later"
    failed = [x for x in r.records if x.status == "failed"]
    assert failed and all(x.http_status == 503 for x in failed)


def test_dropped_connections_are_failures():
    with stream_server.spawn(ttft_ms=10, itl_ms=5, drop_every=3, drop_after=2) as srv:
        r = _load(gen_url=srv.url, gen_concurrency=3, output_len=10, warmup_s=0.3, duration_s=1.2)
    g = r.summary()["gen"]
    assert g["failed"] > 0 and g["completed"] > 0
    failed = [x for x in r.records if x.status == "failed"]
    assert all(x.http_status is None and x.chunks == 2 for x in failed)
    assert all(x.error for x in failed)


def test_a_server_dying_mid_run_ends_it_within_a_second_with_the_reason():
    srv = stream_server.spawn(ttft_ms=10, itl_ms=5)
    try:
        threading.Timer(1.0, lambda: os.kill(srv.proc.pid, signal.SIGKILL)).start()
        t = time.monotonic()
        with pytest.raises(EndpointDead) as e:
            _load(gen_url=srv.url, gen_concurrency=8, output_len=10, warmup_s=0.5, duration_s=20)
        took = time.monotonic() - t
    finally:
        srv.stop()
    assert took < 1.0 + DEAD_AFTER_S + 1.0, took  # noticed about a second after the death
    assert "gen server" in str(e.value) and "connection errors" in str(e.value)
    r = e.value.result
    assert r.aborted == str(e.value) and r.summary()["aborted"] == str(e.value)
    g = r.summary()["gen"]
    assert g["totals"]["completed"] > 0
    # refused connections are probed with back-off, one at a time, not every 10 ms by 8
    refused = [x for x in r.records if x.status == "failed" and x.http_status is None]
    assert 0 < len(refused) < 30, len(refused)


def test_unreachable_url_fails_at_once_with_a_clear_message(server):
    url = f"http://127.0.0.1:{free_port()}"
    t = time.monotonic()
    with pytest.raises(BenchError) as e:
        _load(gen_url=server.url, embed_url=url, warmup_s=5, duration_s=5)
    assert time.monotonic() - t < 3
    assert "embed" in str(e.value) and url in str(e.value) and "reach" in str(e.value)


def test_model_names_and_api_key():
    with stream_server.spawn(ttft_ms=5, itl_ms=2, api_key="sekrit", model="first") as srv:
        with pytest.raises(BenchError, match="401"):
            _load(gen_url=srv.url, duration_s=0.5, warmup_s=0)
        r = _load(
            gen_url=srv.url,
            gen_model="mine",
            api_key="sekrit",
            gen_concurrency=2,
            output_len=5,
            warmup_s=0.2,
            duration_s=0.5,
        )
    g = r.summary()["gen"]
    assert g["model"] == "mine" and g["completed"] > 0 and g["failed"] == 0


def test_stop_event_cuts_the_run_short(server):
    async def go():
        stop = asyncio.Event()

        def on_progress(p):  # stop 1.5 s into the load, 1 s into the window
            if p.elapsed_s >= 1.5:
                stop.set()

        return await run_load(
            LoadConfig(
                gen_url=server.url, gen_concurrency=4, output_len=20, warmup_s=0.5, duration_s=30
            ),
            on_progress=on_progress,
            stop=stop,
            progress_interval_s=0.05,
        )

    t = time.monotonic()
    r = run_sync(go())
    assert time.monotonic() - t < 8
    s = r.summary()
    assert s["cut_short"] is True and s["stopped_in"] == "measure"
    assert 0.9 < s["duration_s"] < 1.4 and s["planned_duration_s"] == 30
    cycle_s = (TTFT_MS + 19 * ITL_MS) / 1e3
    # a window of about four request cycles: the phase of the streams moves the count a bit
    assert _close(s["gen"]["output_tokens_per_s"], 4 * 20 / cycle_s, 0.15)


def test_plain_asyncio_loop_too(server):
    r = run_sync(
        run_load(
            LoadConfig(
                gen_url=server.url, gen_concurrency=4, output_len=20, warmup_s=0.4, duration_s=1.0
            )
        ),
        "asyncio",
    )
    g = r.summary()["gen"]
    assert _close(g["tpot_ms"]["p50"], ITL_MS, 0.03) and g["failed"] == 0
