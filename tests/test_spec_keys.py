"""`coserve run --spec-keys`: every key a spec accepts, with its default, from the spec's own
dataclasses."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tomllib

from coserve.spec import Spec, loads_spec
from coserve.spec_keys import TABLES, key_lines

SUB_TABLES = {"servers", "load", "telemetry", "conditions", "sweep", "report"}  # own tables


def test_every_table_lists_exactly_its_keys():
    for table, cls in TABLES:
        lines = key_lines(table, cls)
        listed = [ln.split(" = ")[0].strip() for ln in lines[1:]]
        want = [
            f.name
            for f in dataclasses.fields(cls)
            if not f.metadata.get("internal") and not (cls is Spec and f.name in SUB_TABLES)
        ]
        assert listed == want, table


def test_the_listed_defaults_are_the_ones_a_spec_gets():
    # a spec of only the required keys, read back: each listed default is what it holds
    spec = loads_spec(
        'name = "x"\n[servers.gen]\nmodel = "tiny-dense"\n[servers.embed]\nmodel = "tiny-embed"\n'
        '[[conditions]]\nname = "c"\n'
    )
    for table, obj in (
        ("[load]", spec.load),
        ("[servers.gen] / [servers.embed]", spec.servers["gen"]),
    ):
        cls = type(obj)
        for line in key_lines(table, cls)[1:]:
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
    assert (
        "[[conditions]]" in r.stdout and "  gen_tpot_slo_pct = unset  (>= 0; <= 1000)" in r.stdout
    )
    assert "  slo_guard = false" in r.stdout  # TOML's spelling of a bool
    assert '  servers = ["gen", "embed"]  (each one of gen, embed)' in r.stdout  # a list's items
    assert "tiny-dense" in r.stdout.split("  model = ")[1].splitlines()[0]  # the presets
