"""The SLO guard's baseline as a function of gen's work. The case is the H200's (2026-11-30,
co-scheduling-2, mps-guard5): gen alone's probes alternated between ~16.4 and ~20 ms as a
closed loop of 512 sequences refilled in waves, and the median of the last probes swung the
budget with them. Here gen alone's step time follows a known linear law of its work, and its
probes alternate between a light level (16.5 ms: long contexts, no prompts) and a heavy one
(20 ms: a refill's prompt tokens beside younger, shorter contexts)."""

from __future__ import annotations

import pytest

from coserve.engine.types import StepWork
from coserve.server.slo_guard import GenSample, GuardConfig, SloGuard
from coserve.server.slo_guard_fit import ProbePoint, fit_baseline
from coserve.server.slo_guard_io import BadGenPage, guard_metrics, parse_gen_metrics

MS = 1e-3
DT = 0.25
BATCH, X, Y, P = 512, 250_000, 200_000, 4096  # kv tokens light (X) / heavy (Y), prompt tokens
PER_KV = 4e-8  # s per KV token read
BASE = 16.5 * MS - PER_KV * X
PER_PREFILL = (20 * MS - BASE - PER_KV * Y) / P
DRIFT = 1500  # KV tokens each probe's level drifts by (sequences age, the mix changes)


def alone(work: StepWork) -> float:
    return BASE + PER_KV * work.kv_tokens + PER_PREFILL * work.prefill_tokens


LIGHT, HEAVY = StepWork(BATCH, 0, X), StepWork(BATCH, P, Y)
assert alone(LIGHT) == pytest.approx(16.5 * MS) and alone(HEAVY) == pytest.approx(20 * MS)


def probe_work(k: int) -> StepWork:
    """Gen's work while probe k runs: the levels alternate, each drifting a little."""
    level = LIGHT if k % 2 == 0 else HEAVY
    return StepWork(BATCH, level.prefill_tokens, level.kv_tokens + DRIFT * (k % 5 - 2))


def probed(with_work: bool, probes: int = 8, **cfg) -> tuple[SloGuard, list[float], float]:
    """A +5 % guard polled every DT until `probes` probes ended; gen's page carries its work
    when `with_work`, and beside embed gen runs 2 % over alone. Returns the guard, its
    budget after each probe, and when the last probe ended."""
    g = SloGuard(
        GuardConfig(
            over_alone_pct=5, max_tokens=8192, settle_s=0.25, calibrate_s=0.5, probe_s=0.5,
            probe_interval_s=2.0, cooldown_s=0.0, **cfg,
        )
    )  # fmt: skip
    budgets, ended, t, holding = [], 0.0, 0.0, False
    while g.state.probes < probes:
        t += DT
        work = probe_work(g.state.probes)
        step = alone(work) * (1.0 if holding else 1.02)
        before = g.state.probes
        holding = g.update(GenSample(step, 30, work if with_work else None), t).hold
        if g.state.probes > before:
            budgets.append(g.state.budget_s)
            ended = t
    return g, budgets, ended


def test_the_median_of_probes_swings_the_budget_and_cuts_gen_alone_s_own_heavy_steps():
    g, budgets, _ = probed(with_work=False, probe_keep=3)  # the guard as it was
    assert not g.state.fit.fitted
    late = budgets[3:]
    assert max(late) / min(late) > 1.15  # 1.05 x 16.5 ms <-> 1.05 x 20 ms, probe by probe
    assert min(late) < alone(HEAVY)  # gen alone doing heavy work reads as over budget


def test_the_fit_predicts_each_level_and_judges_readings_by_their_work():
    g, budgets, ended = probed(with_work=True)
    fit = g.state.fit
    assert fit.fitted
    assert fit.predict(LIGHT) == pytest.approx(16.5 * MS, rel=0.02)
    assert fit.predict(HEAVY) == pytest.approx(20 * MS, rel=0.02)
    # the drift within each level is followed too (the ridge shares the slope between KV
    # and prompt tokens, which move together across levels, without losing the level)
    for k in range(8):
        assert fit.predict(probe_work(k)) == pytest.approx(alone(probe_work(k)), rel=0.005)
    tokens, cuts = g.tokens, g.state.cuts
    # 20.5 ms at the heavy work is 2.5 % over gen alone doing it: within the +5 % budget
    a = g.update(GenSample(20.5 * MS, 30, HEAVY), ended + 0.75)
    assert g.state.cuts == cuts and a.tokens_per_forward >= tokens and not a.hold
    assert g.state.baseline_s == pytest.approx(20 * MS, rel=0.02)
    assert g.state.budget_s == pytest.approx(21 * MS, rel=0.02)
    # 18.5 ms at the light work is 12 % over: cut
    b = g.update(GenSample(18.5 * MS, 30, LIGHT), ended + 1.0)
    assert g.state.cuts == cuts + 1 and b.tokens_per_forward < a.tokens_per_forward
    assert g.state.budget_s == pytest.approx(1.05 * 16.5 * MS, rel=0.02)
    rows = {name: v for name, _, _, v in guard_metrics(g.state, 0.0)}
    assert rows["coserve:slo_guard_fit"] == 1
    assert rows["coserve:slo_guard_fit_seconds_per_kv_token"] == fit.per_feature_s[0] > 0
    assert rows["coserve:slo_guard_gen_alone_seconds"] == pytest.approx(16.5 * MS, rel=0.02)


def test_probes_of_the_same_work_fall_back_to_their_median():
    g = SloGuard(
        GuardConfig(
            over_alone_pct=10, max_tokens=1024, settle_s=0.25, calibrate_s=0.5, probe_s=0.5,
            probe_interval_s=1.0,
        )
    )  # fmt: skip
    figures = iter([0.010, 0.012, 0.011, 0.013, 0.011])
    t, step = 0.0, next(figures)
    while g.state.probes < 5:
        t += DT
        before = g.state.probes
        g.update(GenSample(step, 20, LIGHT), t)
        if g.state.probes > before and g.state.probes < 5:
            step = next(figures)
    assert not g.state.fit.fitted
    assert g.state.baseline_s == pytest.approx(0.011)
    assert g.state.budget_s == pytest.approx(0.0121)
    rows = {name: v for name, _, _, v in guard_metrics(g.state, 0.0)}
    assert (
        rows["coserve:slo_guard_fit"] == 0 and rows["coserve:slo_guard_fit_intercept_seconds"] == 0
    )


@pytest.mark.parametrize(
    "points",
    [
        [ProbePoint(0.02, LIGHT)],
        [ProbePoint(0.0165, LIGHT), ProbePoint(0.02, HEAVY)],  # 2 probes, 3 parameters
        [ProbePoint(0.0165, LIGHT), ProbePoint(0.02, None), ProbePoint(0.0166, LIGHT)],
        [ProbePoint(s, StepWork(BATCH, 0, X + 1e-9 * i)) for i, s in enumerate((1, 2, 3))],
    ],
)
def test_probes_that_do_not_span_the_work_give_the_median(points):
    b = fit_baseline(points)
    median = sorted(p.step_s for p in points)[(len(points) - 1) // 2 : len(points) // 2 + 1]
    assert not b.fitted and b.predict(HEAVY) == pytest.approx(sum(median) / len(median))


def test_a_prediction_far_outside_the_probes_is_held_near_them():
    work = [StepWork(BATCH, 0, kv) for kv in (100_000, 200_000, 300_000)]
    b = fit_baseline([ProbePoint(s * MS, w) for s, w in zip((10, 20, 30), work, strict=True)])
    assert b.fitted and b.predict(work[1]) == pytest.approx(20 * MS, rel=0.01)
    assert b.predict(StepWork(BATCH, 0, 0)) == pytest.approx(0.5 * 10 * MS)  # not ~0
    assert b.predict(StepWork(BATCH, 0, 10**7)) == pytest.approx(2 * 30 * MS)
    assert b.predict(None) == b.median_s == 20 * MS
    with pytest.raises(ValueError, match="^points"):
        fit_baseline([])


PAGE = (
    'coserve:engine_step_seconds_mean{model_name="m"} 0.0201\n'
    'coserve:engine_step_seconds_p99{model_name="m"} 0.0215\n'
    'coserve:engine_steps_window{model_name="m"} 23\n'
    'coserve:engine_step_batch_mean{model_name="m"} 511.5\n'
    'coserve:engine_step_prefill_tokens_mean{model_name="m"} 128.0\n'
)


def test_gen_s_page_carries_its_work_only_when_every_figure_is_there():
    assert parse_gen_metrics(PAGE) == GenSample(0.0201, 23)  # no KV figure: no work
    full = PAGE + 'coserve:engine_step_kv_tokens_mean{model_name="m"} 200000.0\n'
    assert parse_gen_metrics(full) == GenSample(0.0201, 23, StepWork(511.5, 128.0, 200000.0))
    with pytest.raises(BadGenPage, match="engine_step_kv_tokens_mean"):
        parse_gen_metrics(PAGE + "coserve:engine_step_kv_tokens_mean inf\n")
