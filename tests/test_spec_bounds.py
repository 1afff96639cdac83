"""Spec values that would never end or never fit are refused naming the field, and spec errors
print the user's text verbatim (never read as rich markup)."""

from __future__ import annotations

import pytest

from coserve.bench.config import MAX_LEN, WATCH_S
from coserve.cli import main
from coserve.spec import MAX_REPETITIONS, SpecError, loads_spec

BASE = """
name = "b"
repetitions = 1
[servers.gen]
model = "tiny-dense"
ready_timeout_s = 60
[load]
warmup_s = 1
duration_s = 2
[[conditions]]
name = "gen-only"
servers = ["gen"]
"""


def problems(old: str, new: str) -> list[str]:
    assert old in BASE
    with pytest.raises(SpecError) as e:
        loads_spec(BASE.replace(old, new))
    return e.value.problems


@pytest.mark.parametrize(
    "field, old",
    [
        ("load.duration_s", "duration_s = 2"),
        ("load.warmup_s", "warmup_s = 1"),
        ("servers.gen.ready_timeout_s", "ready_timeout_s = 60"),
    ],
)
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1" + "0" * 400])
def test_numbers_must_be_finite(field, old, value):
    key = old.split(" = ")[0]
    assert problems(old, f"{key} = {value}") == [f"{field}: {value} is not a finite number"]


@pytest.mark.parametrize("key", ["warmup_s", "duration_s", "stall_s"])
def test_load_seconds_are_bounded_by_one_day(key):
    # 1e12 s is a typo that would hold the servers for ever: refused where it was set
    base = "\n".join(line for line in BASE.splitlines() if not line.startswith(key))
    with pytest.raises(SpecError) as e:
        loads_spec(base.replace("[load]", f"[load]\n{key} = 1e12"))
    [load] = e.value.problems
    assert load.startswith(f"load.{key}: ") and "86400" in load, load
    with pytest.raises(SpecError) as e:
        loads_spec(f"{base}\nload = {{{key} = 1e12}}")
    [cond] = e.value.problems
    assert cond.startswith(f"conditions[0].load.{key}: ") and "86400" in cond, cond


def test_stall_is_bounded_below_by_the_runs_watch():
    # as --stall: a silence shorter than the time between two looks cannot be seen
    assert problems("[load]", "[load]\nstall_s = 1e-9") == [
        f"load.stall_s: 1e-09 must be at least {WATCH_S:g}"
    ]
    loads_spec(BASE.replace("[load]", f"[load]\nstall_s = {WATCH_S}"))


def test_concurrency_is_bounded():
    # one connection and one task per request in flight: 1e9 is a typo that exhausts memory
    assert problems("[load]", "[load]\ngen_concurrency = 1000000000") == [
        "load.gen_concurrency: 1000000000 must be at most 65536"
    ]
    sweep = "\n[sweep]\nconcurrency = [8, 1000000000]"
    with pytest.raises(SpecError) as e:
        loads_spec(BASE + sweep)
    assert e.value.problems == ["sweep.concurrency[1]: 1000000000 must be at most 65536"]


def test_inputs_per_embed_request_are_bounded():
    # the OpenAI embeddings API's limit; 100,000 took the bench's CPU for a minute
    assert problems("[load]", "[load]\nembed_batch = 100000") == [
        "load.embed_batch: 100000 must be at most 2048"
    ]


@pytest.mark.parametrize("key", ["input_len", "output_len", "embed_input_len"])
def test_lengths_are_bounded_by_the_longest_context(key):
    # as --input-len, --output-len, --embed-input-len: a longer one is refused by every server
    assert problems("[load]", f"[load]\n{key} = {MAX_LEN + 1}") == [
        f"load.{key}: {MAX_LEN + 1} must be at most {MAX_LEN}"
    ]
    loads_spec(BASE.replace("[load]", f"[load]\n{key} = {MAX_LEN}"))


def test_rates_are_bounded_below():
    # a rate that rounds the mean gap to infinity was a traceback when the load started
    assert problems("[load]", "[load]\ngen_rate = 4e-324") == [
        "load.gen_rate: 4.94066e-324 req/s is below 1e-05 req/s (about one a day): no load"
    ]
    with pytest.raises(SpecError) as e:
        loads_spec(BASE + "\n[sweep]\nrate = [1e-320]")
    assert e.value.problems == ["sweep.rate[0]: 1e-320 must be at least 1e-05"]


def test_a_spec_that_is_no_text_is_named(tmp_path, capsys):
    # was a UnicodeDecodeError traceback out of `coserve run SPEC --dry-run`
    spec = tmp_path / "s.toml"
    spec.write_bytes(b"\xff\xfe\x00name = 1")
    assert main(["run", str(spec), "--dry-run", "--out", str(tmp_path / "o")]) == 2
    said = capsys.readouterr()
    out = " ".join((said.out + said.err).split())
    assert "not UTF-8 text (byte 0)" in out, out


def test_a_server_url_that_is_no_http_url_is_named():
    # was accepted by --dry-run; every rep then failed on it
    ext = 'launcher = "external"\nurl = "ftp://x"\nmodel = "tiny-dense"'
    assert problems('model = "tiny-dense"', ext) == [
        "servers.gen.url (in conditions[0]): 'ftp://x' is not an http(s) URL "
        "(e.g. http://127.0.0.1:8000)"
    ]
    ok = ext.replace("ftp://x", "http://127.0.0.1:9")
    with pytest.raises(SpecError) as e:
        loads_spec(BASE.replace('model = "tiny-dense"', ok) + 'gen = {url = "file:///x"}')
    assert e.value.problems == [
        "conditions[0].gen.url: 'file:///x' is not an http(s) URL (e.g. http://127.0.0.1:8000)"
    ]


def test_repetitions_are_bounded():
    assert problems("repetitions = 1", "repetitions = 1000000000") == [
        f"repetitions: 1000000000 must be at most {MAX_REPETITIONS}"
    ]
    assert problems(
        "[[conditions]]", "[sweep]\nconcurrency = [1]\nrepetitions = 1000000000\n[[conditions]]"
    ) == [f"sweep.repetitions: 1000000000 must be at most {MAX_REPETITIONS}"]
    assert (
        loads_spec(BASE.replace("repetitions = 1", f"repetitions = {MAX_REPETITIONS}")).repetitions
        == MAX_REPETITIONS
    )


def test_negative_gpu_indices_are_refused():
    for gpus in ("[-1]", '["-1"]', '[""]'):
        (p,) = problems('servers = ["gen"]', f'servers = ["gen"]\ngpus = {gpus}')
        assert p.startswith("conditions[0].gpus: ") and "is not a GPU index" in p


def test_errors_print_the_users_text_verbatim(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(
        BASE.replace('name = "b"', 'name = "x[/red] [bold]y"').split("[[conditions]]")[0]
    )
    assert main(["run", str(bad), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "'x[/red] [bold]y'" in err
    assert "at least one [[conditions]] table is needed" in err


@pytest.mark.parametrize(
    "value, problem",
    [
        ('"--tp-all-reduce symm-mem"', ": '--tp-all-reduce symm-mem' is not a list of strings"),
        ("5", ": 5 is not a list of strings"),
        ('["--tp-all-reduce", 5]', "[1]: 5 is not a string"),
    ],
)
def test_extra_args_of_another_type_are_named(value, problem):
    got = problems('model = "tiny-dense"', f'model = "tiny-dense"\nextra_args = {value}')
    assert got == [f"servers.gen.extra_args{problem}"]
