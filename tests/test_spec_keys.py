"""`coserve run --spec-keys`: every key a spec accepts, with its default, from the spec's own
dataclasses."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import tomllib

import pytest

from coserve.gpu.strategy_base import STRATEGIES
from coserve.spec import ServerConfig, Spec, SpecError, loads_spec
from coserve.spec_keys import TABLES, key_lines, option_lines
from coserve.spec_load import LoadSpec

SUB_TABLES = {"servers", "load", "telemetry", "conditions", "sweep", "report"}  # own tables
BASE = 'name = "x"\n[servers.gen]\nmodel = "tiny-dense"\n[servers.embed]\nmodel = "tiny-embed"\n'


def _listed(table) -> list[str]:
    return [ln.split(" = ")[0].strip() for ln in key_lines(table)[1:]]


def test_every_table_lists_exactly_its_keys():
    for table in TABLES:
        want = [
            f.name
            for f in dataclasses.fields(table.cls)
            if not f.metadata.get("internal")
            and not (table.cls is Spec and f.name in SUB_TABLES)
            and f.metadata.get("role") == table.role
        ]
        assert _listed(table) == want, table.title
    # the server tables together: every field of ServerConfig, once
    server = [k for t in TABLES if t.cls is ServerConfig for k in _listed(t)]
    assert sorted(server) == sorted(f.name for f in dataclasses.fields(ServerConfig))


def test_the_guard_keys_are_listed_for_embed_alone_as_the_parser_takes_them():
    (shared,) = [t for t in TABLES if t.cls is ServerConfig and t.role is None]
    (embed,) = [t for t in TABLES if t.cls is ServerConfig and t.role == "embed"]
    assert "slo_guard" in _listed(embed) and "slo_guard" not in _listed(shared)
    assert "embed" in embed.title and "gen" not in embed.title
    for line in key_lines(embed)[1:]:  # each is refused under gen, taken under embed
        key, rest = line.strip().split(" = ", 1)
        value = "true" if rest.startswith("false") else "5"
        with pytest.raises(SpecError) as e:
            loads_spec(BASE + f'[[conditions]]\nname = "c"\ngen = {{ {key} = {value} }}\n')
        assert f"conditions[0].gen.{key}: the SLO guard runs in the embed server" in str(e.value)
    loads_spec(
        BASE + '[[conditions]]\nname = "c"\nembed = { slo_guard = true, gen_tpot_slo_ms = 5 }\n'
    )


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_options_listed_per_strategy_are_those_it_takes(strategy):
    (line,) = [ln for ln in option_lines() if ln.startswith(f"  {strategy}")]
    listed = line.split(": ", 1)[1]
    with pytest.raises(SpecError) as e:
        loads_spec(
            BASE + f'[[conditions]]\nname = "c"\nstrategy = "{strategy}"\ngpus = ["0", "1"]\n'
            "options = { no_such_option = 1 }\n"
        )
    assert re.search(r"allowed: (.*)", str(e.value)).group(1) == listed


def test_the_listed_defaults_are_the_ones_a_spec_gets():
    # a spec of only the required keys, read back: each listed default is what it holds
    spec = loads_spec(BASE + '[[conditions]]\nname = "c"\n')
    for table in TABLES:
        if table.cls not in (LoadSpec, ServerConfig):
            continue
        obj = spec.load if table.cls is LoadSpec else spec.servers["embed"]
        for line in key_lines(table)[1:]:
            key, rest = line.strip().split(" = ", 1)
            if key in ("model",):
                continue
            shown = rest.split("  ")[0]
            if shown == "unset":
                assert getattr(obj, key) is None, key
            else:
                assert tomllib.loads(f"v = {shown}")["v"] == getattr(obj, key), key


def test_the_flag_prints_the_list_without_a_spec():
    r = subprocess.run(
        [sys.executable, "-m", "coserve", "run", "--spec-keys"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "[[conditions]]" in r.stdout and "  gen_tpot_slo_pct = unset  (> 0; <= 1000)" in r.stdout
    assert "\n  mig: apply_mig, profiles\n" in r.stdout  # a condition's options
    assert "  slo_guard = false" in r.stdout  # TOML's spelling of a bool
    assert '  servers = ["gen", "embed"]  (each one of gen, embed)' in r.stdout  # a list's items
    assert "tiny-dense" in r.stdout.split("  model = ")[1].splitlines()[0]  # the presets
