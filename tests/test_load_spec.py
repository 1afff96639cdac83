"""A spec's load reaches the load generator whole: every LoadSpec field, set away from its
default in the spec, arrives in the LoadConfig the runner builds (sweep points included)."""

from __future__ import annotations

import dataclasses
import json

from coserve.bench.config import LoadConfig
from coserve.experiment.runner import Runner
from coserve.spec import loads_spec
from coserve.spec_load import LOAD_CHECKS, LoadSpec

SPEC = """
name = "conv"
[servers.gen]
model = "tiny-dense"
[servers.embed]
model = "all-minilm-l6-v2"
[load]
{load}
[[conditions]]
name = "gen-only"
servers = ["gen"]
[[conditions]]
name = "ts"
[sweep]
role = "embed"
rate = [7.5, 120]
conditions = ["ts"]
"""


def not_default(f: dataclasses.Field):
    checks = LOAD_CHECKS[f.name]
    if "choices" in checks:
        return checks["choices"][-1]
    if isinstance(f.default, bool):
        return not f.default
    if isinstance(f.default, int):
        return f.default + 3
    return (f.default or 0.0) + 7.25


def spec_with(want: dict):
    return loads_spec(
        SPEC.format(load="\n".join(f"{k} = {json.dumps(v)}" for k, v in want.items()))
    )


def test_every_load_field_reaches_load_config(tmp_path):
    # burstiness shapes poisson gaps only: arrival keeps its default here, and goes below
    want = {f.name: not_default(f) for f in dataclasses.fields(LoadSpec) if f.name != "arrival"}
    assert all(want[f.name] != f.default for f in dataclasses.fields(LoadSpec) if f.name in want)
    spec = spec_with(want)
    runner = Runner(spec, tmp_path / "run")
    urls = {"gen": "http://127.0.0.1:1", "embed": "http://127.0.0.1:2"}
    cfg = LoadConfig(**runner.load_config(spec.condition("ts"), urls))
    assert {k: getattr(cfg, k) for k in want} == want
    assert (cfg.gen_url, cfg.embed_url, cfg.seed) == (urls["gen"], urls["embed"], spec.seed)
    point = LoadConfig(**runner.load_config(spec.condition("ts.embed-r120"), urls))
    assert point.embed_rate == 120.0 and point.embed_concurrency == want["embed_concurrency"]
    assert {k: getattr(point, k) for k in want if k != "embed_rate"} == {
        k: v for k, v in want.items() if k != "embed_rate"
    }
    gen_only = LoadConfig(**runner.load_config(spec.condition("gen-only"), {"gen": urls["gen"]}))
    assert gen_only.embed_url is None and gen_only.gen_rate == want["gen_rate"]
    constant = spec_with({"arrival": "constant"})
    cfg = LoadConfig(
        **Runner(constant, tmp_path / "run2").load_config(constant.condition("ts"), urls)
    )
    assert cfg.arrival == "constant"
