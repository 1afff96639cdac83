"""A tensor-parallel degree the model's attention heads cannot be split by is refused by the
spec check (so by `coserve run --dry-run`), naming the field that set it, for built-in
presets; the serve path refuses it with the same words."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from coserve.engine.presets import tp_split_problem
from coserve.spec import SpecError, loads_spec

ROOT = Path(__file__).resolve().parent.parent

SPEC = """
name = "tp"
repetitions = 1
[servers.gen]
model = "tiny-dense"
device = "cpu"
{gen}
[servers.embed]
model = "all-minilm-l6-v2"
device = "cpu"
[[conditions]]
name = "gen-only"
servers = ["gen"]
{more}
"""


def problems(gen: str = "", more: str = "") -> list[str]:
    try:
        loads_spec(SPEC.format(gen=gen, more=more))
    except SpecError as e:
        return e.problems
    return []


@pytest.mark.parametrize("n", [3, 1000000])
def test_a_server_tp_size_the_heads_cannot_split_names_the_field(n):
    assert problems(f"tensor_parallel_size = {n}") == [
        f"servers.gen.tensor_parallel_size (in conditions[0]): tiny-dense: num_attention_heads "
        f"(4) is not divisible by tensor_parallel_size {n} (num_key_value_heads 2)"
    ]


def test_the_degrees_a_condition_sets_are_named_where_they_are_set():
    more = """
[[conditions]]
name = "over"
servers = ["gen"]
gen = { tensor_parallel_size = 3 }
[[conditions]]
name = "tp"
strategy = "tp"
gpus = ["0", "1", "2"]
options = { tp = { gen = 3, embed = 1 } }
[[conditions]]
name = "tp-gpus"
strategy = "tp+mps"
servers = ["embed"]
gpus = ["0", "1", "2", "3", "4"]
"""
    got = problems(more=more)
    assert [p.split(":")[0] for p in got] == [
        "conditions[1].gen.tensor_parallel_size",
        "conditions[2].options.tp.gen",
        "conditions[3].gpus",  # TP = the GPU count; minilm has 12 heads
    ]
    assert "all-minilm-l6-v2: num_attention_heads (12) is not divisible by" in got[2]


def test_degrees_the_heads_split_by_pass():
    ok = """
[[conditions]]
name = "tp"
strategy = "tp"
gpus = ["0", "1", "2", "3"]
options = { gen_tp = 4, embed_tp = 2 }
"""
    assert problems("tensor_parallel_size = 2", ok) == []


@pytest.mark.parametrize(
    "options, field, got",
    [
        ('{ tp = "2" }', "options.tp", "'2'"),
        ('{ gen_tp = "2" }', "options.gen_tp", "'2'"),
        ('{ tp = { gen = "2" } }', "options.tp.gen", "'2'"),
        ("{ tp = 1.0 }", "options.tp", "1.0"),
        ("{ tp = true }", "options.tp", "True"),
    ],
)
def test_a_tp_degree_that_is_no_integer_is_refused_naming_the_field(options, field, got):
    # a string "2" was taken as 2 while every other spec number refuses a string
    more = f"""
[[conditions]]
name = "tp"
strategy = "tp"
gpus = ["0", "1"]
options = {options}
"""
    assert problems(more=more) == [
        f"conditions[1].{field}: expected an integer >= 1 (a TP degree), got {got}"
    ]


def test_key_value_heads_neither_dividing_nor_divided():
    cfg = {"num_attention_heads": 12, "num_key_value_heads": 4}
    assert tp_split_problem(cfg, 6) == (
        "num_key_value_heads (4) is neither divisible by tensor_parallel_size 6 nor a "
        "divisor of it (num_attention_heads 12)"
    )
    assert tp_split_problem(cfg, 2) is None and tp_split_problem(cfg, 12) is None


def test_dry_run_refuses_it_with_exit_2(tmp_path):
    spec = tmp_path / "tp.toml"
    spec.write_text(SPEC.format(gen="tensor_parallel_size = 3", more=""))
    proc = subprocess.run(
        [sys.executable, "-m", "coserve", "run", str(spec), "--out", str(tmp_path / "out")]
        + ["--dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "servers.gen.tensor_parallel_size (in conditions[0]): tiny-dense" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
