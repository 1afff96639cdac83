"""Spec parsing: every shipped spec validates; every bad field is named with what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from coserve.spec import SpecError, load_spec, loads_spec, parse_spec

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"

BASE = """
name = "t"
repetitions = 2
[servers.gen]
model = "tiny-dense"
[servers.embed]
model = "all-minilm-l6-v2"
random_weights = false
[[conditions]]
name = "gen-only"
servers = ["gen"]
[[conditions]]
name = "ts"
"""


def problems(text: str) -> list[str]:
    with pytest.raises(SpecError) as e:
        loads_spec(text, "x.toml")
    return e.value.problems


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_specs_validate(path):
    spec = load_spec(path)
    assert spec.schedule(), "a spec with nothing to run"
    assert spec.baseline in [c.name for c in spec.conditions]
    # the validated form reads back to the same spec
    assert parse_spec(spec.to_dict()).digest() == spec.digest()


def test_the_shipped_set_is_there():
    names = {p.name for p in EXPERIMENTS.glob("*.toml")}
    assert {
        "demo.toml",
        "seed-single-gpu.toml",
        "seed-eager-vs-graphs.toml",
        "seed-mig.toml",
        "seed-tp2.toml",
        "seed-tp2-equal-work.toml",
        "seed-embed-sweep.toml",
    } <= names


def test_seed_specs_carry_the_studys_settings():
    s = load_spec(EXPERIMENTS / "seed-single-gpu.toml")
    gen, emb = s.servers["gen"], s.servers["embed"]
    assert (gen.model, gen.gpu_memory_utilization, gen.max_model_len, gen.max_num_seqs) == (
        "qwen3-30b-a3b",
        0.5,
        4096,
        512,
    )
    assert (emb.model, emb.gpu_memory_utilization, emb.max_model_len) == (
        "qwen3-embedding-8b",
        0.3,
        512,
    )
    ld = s.load
    assert (
        ld.gen_concurrency,
        ld.input_len,
        ld.output_len,
        ld.embed_concurrency,
        ld.embed_batch,
        ld.warmup_s,
        ld.duration_s,
    ) == (512, 30, 512, 64, 8, 30, 60)
    assert s.repetitions == 3 and s.order == "alternate"
    assert [c.strategy for c in s.conditions] == ["timeslice", "timeslice", "timeslice", "mps"]
    eager = load_spec(EXPERIMENTS / "seed-eager-vs-graphs.toml")
    assert {c.name: c.server(eager, "gen").enforce_eager for c in eager.conditions} == {
        "graphs-gen-only": False,
        "graphs-mps": False,
        "graphs-timeslice": False,
        "eager-gen-only": True,
        "eager-mps": True,
        "eager-timeslice": True,
    }
    assert eager.condition("eager-mps").baseline_name(eager) == "eager-gen-only"
    mig = load_spec(EXPERIMENTS / "seed-mig.toml")
    assert mig.condition("mig-gen-only").server(mig, "gen").gpu_memory_utilization == 0.85
    tp2 = load_spec(EXPERIMENTS / "seed-tp2.toml")
    assert {c.name: c.strategy for c in tp2.conditions if c.gpus == ["0", "1"]} == {
        "exclusive-tp1": "exclusive",
        "tp2-gen-alone": "tp+timeslice",
        "tp2-embed-alone": "tp+timeslice",
        "tp2-timeslice": "tp+timeslice",
        "tp2-mps": "tp+mps",
        "tp2-mps-sm50-lowprio": "tp+mps",
        "tp2-mps-guard5": "tp+mps",
        "tp2-mps-guard-tp1": "tp+mps",
        "tp2-mps-sm50-guard-tp1": "tp+mps",
        "tp2-ep-gen-alone": "tp+timeslice",
        "tp2-ep-mps": "tp+mps",
        "tp2-nccl-gen-alone": "tp+timeslice",
        "tp2-nccl-mps": "tp+mps",
        "tp2-mps-sm50-guard-19": "tp+mps",
    }  # tests/test_spec_tp2.py checks the rest of seed-tp2.toml


def test_defaults_and_overrides():
    s = loads_spec(
        BASE + '\nstrategy = "mps"\ngen = {max_num_seqs = 4}\nload = {embed_concurrency = 2}\n'
    )
    ts = s.condition("ts")
    assert ts.strategy == "mps" and ts.servers == ["gen", "embed"] and ts.gpus == ["0"]
    assert ts.server(s, "gen").max_num_seqs == 4
    assert s.condition("gen-only").server(s, "gen").max_num_seqs == 256
    assert ts.load_for(s).embed_concurrency == 2 and s.load.embed_concurrency == 64
    assert s.baseline == "gen-only"  # the first condition that runs gen


def test_alternate_and_sequential_order():
    s = loads_spec(BASE)
    assert [(c.name, r) for c, r in s.schedule()] == [
        ("gen-only", 1),
        ("ts", 1),
        ("gen-only", 2),
        ("ts", 2),
    ]
    s = loads_spec(BASE.replace("repetitions = 2", 'repetitions = 2\norder = "sequential"'))
    assert [(c.name, r) for c, r in s.schedule()] == [
        ("gen-only", 1),
        ("gen-only", 2),
        ("ts", 1),
        ("ts", 2),
    ]
    assert [(c.name, r) for c, r in s.schedule(["ts"])] == [("ts", 1), ("ts", 2)]


def test_sweep_points_follow_the_matrix():
    s = loads_spec(BASE + "[sweep]\nconcurrency = [4, 8]\n")
    names = [(c.name, r) for c, r in s.schedule()]
    assert names[-2:] == [("gen-only.gen-c4", 1), ("gen-only.gen-c8", 1)]
    pt = s.condition("gen-only.gen-c8")
    assert pt.sweep == ("gen", 8, "gen-only", "concurrency") and pt.load_for(s).gen_concurrency == 8


def test_embed_sweep_over_several_conditions():
    s = loads_spec(BASE + '[sweep]\nrole = "embed"\nconcurrency = [2, 16]\nconditions = ["ts"]\n')
    pts = [c for c in s.all_conditions() if c.sweep]
    assert [c.name for c in pts] == ["ts.embed-c2", "ts.embed-c16"]
    assert pts[1].load_for(s).embed_concurrency == 16 and pts[1].load_for(s).gen_concurrency == 512
    found = problems(
        BASE + '[sweep]\nrole = "embed"\nconcurrency = [2]\nconditions = ["gen-only"]\n'
    )
    assert any(p.startswith("sweep.conditions[0]") and "does not run embed" in p for p in found)


def test_digest_ignores_layout_but_not_values():
    a = loads_spec(BASE)
    b = loads_spec(
        "# a comment\n" + BASE.replace('model = "tiny-dense"', 'model   =   "tiny-dense"')
    )
    c = loads_spec(BASE.replace("repetitions = 2", "repetitions = 3"))
    assert a.digest() == b.digest() != c.digest()


@pytest.mark.parametrize(
    "edit, field, allowed",
    [
        (
            ('[[conditions]]\nname = "ts"', '[[conditions]]\nname = "ts"\nstrategy = "mpss"'),
            "conditions[1].strategy",
            "exclusive, timeslice, mps, mig",
        ),
        (("repetitions = 2", "repetitions = 0"), "repetitions", "at least 1"),
        (("repetitions = 2", "repetitions = 2\nbogus = 1"), "bogus", "allowed: baseline"),
        (
            ("[servers.gen]", '[servers.gen]\nlauncher = "vlm"'),
            "servers.gen.launcher",
            "builtin, vllm",
        ),
        (
            ("[servers.gen]", "[servers.gen]\nmax_num_seq = 3"),
            "servers.gen.max_num_seq",
            "max_num_seqs",
        ),
        (
            ("[servers.gen]", "[servers.gen]\ngpu_memory_utilization = 1.5"),
            "servers.gen.gpu_memory_utilization",
            "at most 1.0",
        ),
        (
            ("[servers.gen]", "[servers.gen]\nenforce_eager = 1"),
            "servers.gen.enforce_eager",
            "true/false",
        ),
        (
            ('servers = ["gen"]', 'servers = ["gen", "gpu"]'),
            "conditions[0].servers[1]",
            "gen, embed",
        ),
        (
            ('name = "ts"', 'name = "ts"\ngen = {max_num_seqs = 0}'),
            "conditions[1].gen.max_num_seqs",
            "at least 1",
        ),
        (
            ('name = "ts"', 'name = "ts"\nload = {warmup = 3}'),
            "conditions[1].load.warmup",
            "warmup_s",
        ),
        (
            (
                'name = "ts"',
                'name = "ts"\nstrategy = "mps"\noptions = {active_thread_percentage = 500}',
            ),
            "conditions[1].options.active_thread_percentage",
            "(0, 100]",
        ),
        (
            ('name = "ts"', 'name = "ts"\nstrategy = "exclusive"'),
            "conditions[1].strategy",
            "needs 2 GPUs",
        ),
        (('name = "ts"', 'name = "gen-only"'), "conditions[1].name", "used twice"),
        (('name = "ts"', 'name = "t s"'), "conditions[1].name", "letters, digits"),
        (
            ("repetitions = 2", 'repetitions = 2\nbaseline = "nope"'),
            "baseline",
            "conditions: gen-only, ts",
        ),
        (
            ("repetitions = 2", 'repetitions = 2\n[load]\nduration_s = "60"'),
            "load.duration_s",
            "a number",
        ),
        (
            ("repetitions = 2", 'repetitions = 2\n[sweep]\nconcurrency = [4]\nconditions = ["x"]'),
            "sweep.conditions[0]",
            "not a condition",
        ),
        (
            ("repetitions = 2", "repetitions = 2\n[load]\nembed_rate = 0"),
            "load.embed_rate",
            "greater than 0",
        ),
        (
            ("repetitions = 2", 'repetitions = 2\n[load]\ngen_rate = "fast"'),
            "load.gen_rate",
            "a number",
        ),
        (
            ("repetitions = 2", 'repetitions = 2\n[load]\narrival = "gamma"'),
            "load.arrival",
            "poisson, constant",
        ),
        (
            ("repetitions = 2", "repetitions = 2\n[load]\nburstiness = -1"),
            "load.burstiness",
            "greater than 0",
        ),
        (
            ("repetitions = 2", "repetitions = 2\n[load]\ngoodput_tpot_ms = 0"),
            "load.goodput_tpot_ms",
            "greater than 0",
        ),
        (
            ("repetitions = 2", "repetitions = 2\n[load]\nembed_slo_ms = true"),
            "load.embed_slo_ms",
            "a number",
        ),
        (
            ("repetitions = 2", 'repetitions = 2\n[load]\ngen_endpoint = "responses"'),
            "load.gen_endpoint",
            "completions, chat",
        ),
        (
            ('name = "ts"', 'name = "ts"\nload = {embed_rate = -5}'),
            "conditions[1].load.embed_rate",
            "greater than 0",
        ),
        (
            ('name = "ts"', 'name = "ts"\nload = {goodput_ttft = 5}'),
            "conditions[1].load.goodput_ttft",
            "goodput_ttft_ms",
        ),
        (
            (
                "repetitions = 2",
                'repetitions = 2\n[sweep]\nrole = "embed"\nrate = [7.5, 0]\nconditions = ["ts"]',
            ),
            "sweep.rate[1]",
            "must be at least 1e-05",
        ),
        (
            ("repetitions = 2", "repetitions = 2\n[sweep]\nrate = [1, 2]\nconcurrency = [4]"),
            "sweep.rate",
            "not both",
        ),
        (
            ("repetitions = 2", 'repetitions = 2\n[sweep]\nrole = "gen"'),
            "sweep.concurrency",
            "rate = [...]",
        ),
        (("repetitions = 2", "repetitions = 2\n[sweep]\nrate = [2, 2.0]"), "sweep.rate", "repeat"),
        (("repetitions = 2", "repetitions = 2\n[sweep]\nrate = []"), "sweep.rate", "empty"),
        (
            ("repetitions = 2", 'repetitions = 2\n[report]\nreference = "vllm"'),
            "report.reference",
            "none, seed",
        ),
    ],
)
def test_bad_fields_are_named(edit, field, allowed):
    old, new = edit
    assert old in BASE
    found = problems(BASE.replace(old, new, 1))
    hits = [p for p in found if p.startswith(field + ":")]
    assert hits, f"no problem names {field}: {found}"
    assert allowed in hits[0], hits[0]


def test_all_problems_are_listed_at_once():
    text = BASE.replace("repetitions = 2", 'repetitions = -1\norder = "random"').replace(
        "[servers.embed]", '[servers.embed]\ndevice = "tpu"'
    )
    found = problems(text)
    assert {p.split(":")[0] for p in found} >= {"repetitions", "order", "servers.embed.device"}


def test_missing_things():
    assert any(
        p.startswith("conditions:") for p in problems('name = "x"\n[servers.gen]\nmodel = "m"\n')
    )
    assert any(p.startswith("name:") for p in problems(BASE.replace('name = "t"\n', "")))
    assert any(
        "no [servers.embed]" in p
        for p in problems(
            BASE.replace(
                '[servers.embed]\nmodel = "all-minilm-l6-v2"\nrandom_weights = false\n', ""
            )
        )
    )
    assert any(
        p.startswith("servers.gen.url")
        for p in problems(
            BASE.replace(
                '[servers.gen]\nmodel = "tiny-dense"', '[servers.gen]\nlauncher = "external"'
            )
        )
    )


def test_bad_toml_and_missing_file(tmp_path):
    with pytest.raises(SpecError, match="not valid TOML"):
        loads_spec("name = ")
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path / "nope.toml")


def test_cli_dry_run_and_bad_spec(tmp_path, capsys):
    from coserve.cli import main

    assert (
        main(["run", str(EXPERIMENTS / "demo.toml"), "--out", str(tmp_path / "r"), "--dry-run"])
        == 0
    )
    assert not (tmp_path / "r").exists()  # a dry run writes nothing
    capsys.readouterr()
    cpu = tmp_path / "cpu.toml"
    cpu.write_text((EXPERIMENTS / "demo.toml").read_text().replace('"auto"', '"cpu"'))
    assert main(["run", str(cpu), "--out", str(tmp_path / "r"), "--dry-run"]) == 0
    shown = capsys.readouterr()
    rows = [x for x in (shown.out + shown.err).splitlines() if "timeslice" in x]
    assert len(rows) == 3 and all("│ CPU " in x for x in rows)  # no GPU index for CPU servers
    bad = tmp_path / "bad.toml"
    bad.write_text(BASE.replace("repetitions = 2", 'repetitions = 2\norder = "random"'))
    assert main(["run", str(bad), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "order" in err and "alternate, sequential" in err
    assert not (tmp_path / "r").exists()  # nothing started


def test_open_loop_load_fields_and_overrides():
    s = loads_spec(
        BASE.replace(
            "repetitions = 2",
            """repetitions = 2
[load]
embed_rate = 61.25
embed_concurrency = 256
arrival = "constant"
goodput_ttft_ms = 500
goodput_tpot_ms = 30
goodput_e2el_ms = 20000
embed_slo_ms = 250
gen_endpoint = "chat"
""",
        )
        + "load = {embed_rate = 7, gen_rate = 3.5}\n"
    )
    ld = s.load
    assert (ld.embed_rate, ld.embed_concurrency, ld.arrival, ld.burstiness, ld.gen_endpoint) == (
        61.25,
        256,
        "constant",
        1.0,
        "chat",
    )
    assert (ld.goodput_ttft_ms, ld.goodput_tpot_ms, ld.goodput_e2el_ms, ld.embed_slo_ms) == (
        500.0,
        30.0,
        20000.0,
        250.0,
    )
    assert isinstance(ld.goodput_ttft_ms, float) and ld.gen_rate is None
    ts = s.condition("ts").load_for(s)
    assert (ts.embed_rate, ts.gen_rate, ts.arrival) == (7.0, 3.5, "constant")
    assert parse_spec(s.to_dict()).digest() == s.digest()


def test_load_spec_takes_its_defaults_from_load_config():
    import dataclasses

    from coserve.bench.config import LoadConfig
    from coserve.spec_load import LOAD_CHECKS, LoadSpec

    config = {f.name: f.default for f in dataclasses.fields(LoadConfig)}
    spec = {f.name: f.default for f in dataclasses.fields(LoadSpec)}
    assert set(spec) == set(LOAD_CHECKS) and {"gen_rate", "embed_rate", "gen_endpoint"} <= set(spec)
    assert spec == {k: config[k] for k in spec}


def test_rate_sweep_points():
    s = loads_spec(BASE + '[sweep]\nrole = "embed"\nrate = [7.5, 15, 120]\nconditions = ["ts"]\n')
    pts = [c for c in s.all_conditions() if c.sweep]
    assert [c.name for c in pts] == ["ts.embed-r7.5", "ts.embed-r15", "ts.embed-r120"]
    assert pts[0].sweep == ("embed", 7.5, "ts", "rate")
    ld = pts[2].load_for(s)
    assert (ld.embed_rate, ld.embed_concurrency, ld.gen_rate) == (120.0, 64, None)
    assert [(c.name, r) for c, r in s.schedule()][-3:] == [
        ("ts.embed-r7.5", 1),
        ("ts.embed-r15", 1),
        ("ts.embed-r120", 1),
    ]
    g = loads_spec(BASE + "[sweep]\nrate = [2]\n")
    assert g.condition("gen-only.gen-r2").load_for(g).gen_rate == 2.0
    found = problems(
        BASE.replace('name = "ts"', 'name = "gen-only.gen-r2"') + "[sweep]\nrate = [2]\n"
    )
    assert any(p.startswith("sweep: its point 'gen-only.gen-r2' has the name") for p in found), (
        found
    )


def test_digest_of_specs_hashed_before_the_open_loop_fields():
    """Fields added later are left out of the digest at their defaults: a run folder written
    before them still matches its spec on resume and in the report."""
    import json

    for run in sorted((EXPERIMENTS.parent / "results").glob("*/*/spec.json")):
        fp = json.loads((run.parent / "fingerprint.json").read_text())
        assert parse_spec(json.loads(run.read_text())).digest() == fp["spec"]["hash"], run
    a = loads_spec(BASE)
    assert "report" not in a.to_dict() and "embed_rate" not in a.to_dict()["load"]
    b = loads_spec(BASE.replace("repetitions = 2", "repetitions = 2\n[load]\nembed_rate = 5"))
    assert b.digest() != a.digest() and b.to_dict()["load"]["embed_rate"] == 5.0
    c = loads_spec(BASE.replace("repetitions = 2", 'repetitions = 2\n[report]\nreference = "seed"'))
    assert c.report.reference == "seed" and c.digest() != a.digest()


def test_seed_equal_work_fixes_the_embed_load_at_the_studys_throughput():
    s = load_spec(EXPERIMENTS / "seed-equal-work.toml")
    single = load_spec(EXPERIMENTS / "seed-single-gpu.toml")
    assert s.servers == single.servers and s.report.reference == "seed"
    assert [(c.name, c.strategy, c.servers) for c in s.conditions] == [
        (c.name, c.strategy, c.servers) for c in single.conditions
    ]
    for c in s.all_conditions():
        ld = c.load_for(s)
        assert (ld.gen_concurrency, ld.gen_rate, ld.input_len, ld.output_len) == (
            512,
            None,
            30,
            512,
        )
        if "embed" in c.servers and c.sweep is None:
            assert ld.embed_rate * ld.embed_batch == 490 and ld.embed_concurrency == 256
    pts = [c for c in s.all_conditions() if c.sweep]
    assert {c.sweep.base for c in pts} == {"timeslice", "mps"}
    assert sorted({c.load_for(s).embed_rate * 8 for c in pts}) == [60, 120, 240, 480, 960]
    assert "timeslice.embed-r7.5" in [c.name for c in pts]
    twin = load_spec(EXPERIMENTS / "demo-equal-work.toml")
    assert (
        {c.servers[0] if len(c.servers) == 1 else "both" for c in twin.conditions}
        == {"gen", "embed", "both"}
        and twin.load.embed_rate
        and twin.sweep.knob == "rate"
    )
    assert {twin.servers[r].device for r in ("gen", "embed")} == {"cpu"}


def test_load_checks_across_fields_come_from_load_config(monkeypatch):
    """LoadConfig.validate owns the checks that span fields; the spec reports what it finds
    at the table that set the field ([load] or the condition's override)."""
    from coserve.bench.config import ConfigError, LoadConfig

    def validate(self):
        if self.arrival == "constant" and self.burstiness != 1.0:
            raise ConfigError("burstiness", "constant arrivals have no gaps to shape")
        return self

    monkeypatch.setattr(LoadConfig, "validate", validate)
    found = problems(
        BASE.replace("repetitions = 2", 'repetitions = 2\n[load]\narrival = "constant"')
        + "load = {burstiness = 2.0}\n"
    )
    assert found == ["conditions[1].load.burstiness: constant arrivals have no gaps to shape"]
    found = problems(
        BASE.replace(
            "repetitions = 2", 'repetitions = 2\n[load]\narrival = "constant"\nburstiness = 3.0'
        )
        + "load = {embed_rate = 2.0}\n"
    )
    assert found == ["load.burstiness: constant arrivals have no gaps to shape"]
    loads_spec(BASE.replace("repetitions = 2", 'repetitions = 2\n[load]\narrival = "constant"'))
