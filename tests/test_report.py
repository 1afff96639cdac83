"""The report from stored results: tables like the study's, self-contained HTML, plots, and
what is missing or failed said plainly."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_experiment_runner import SPEC, FakeBackend, runner

from coserve.report.aggregate import aggregate
from coserve.report.render import render


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    text = SPEC + "[sweep]\nconcurrency = [4, 8]\n"
    b = FakeBackend(interrupt_at=("timeslice", 2), fail_at=("embed-only", 2))
    with pytest.raises(KeyboardInterrupt):
        runner(tmp, b, text=text, only=["gen-only", "embed-only", "timeslice"]).run()
    # the sweep points run in a later call; mps never runs
    runner(
        tmp, FakeBackend(), text=text, resume=True, only=["gen-only.gen-c4", "gen-only.gen-c8"]
    ).run()
    render(tmp / "run")
    return tmp / "run"


def test_stats_per_condition(run_dir):
    run = aggregate(run_dir)
    st = {c.name: c for c in run.conditions}
    assert st["gen-only"].status == "complete" and len(st["gen-only"].values["gen_tok_s"]) == 2
    assert st["embed-only"].status == "partial" and st["embed-only"].failed[0]["rep"] == 2
    assert st["timeslice"].status == "partial" and st["mps"].status == "not run"
    g = st["gen-only"].summary["gen_tok_s"]
    assert g.n == 2 and g.ci_low < g.mean < g.ci_high
    ts = st["timeslice"]
    assert ts.gen_baseline == "gen-only" and ts.embed_baseline == "embed-only"
    assert ts.gen_delta.pct == pytest.approx((ts.mean("gen_tok_s") / g.mean - 1) * 100)
    assert ts.gen_delta.ci_low is None  # one rep: no CI
    assert st["gen-only"].mean("sm_active") == pytest.approx(0.82)
    assert set(run.sweep_optimum()) == {"gen-only"}


def test_markdown_tables(run_dir):
    md = (run_dir / "report.md").read_text()
    assert (
        "| Condition | Strategy | Reps | Gen (tok/s) | Gen delta | Embed (seq/s) | Embed delta |"
        in md
    )
    assert re.search(
        r"\| gen-only \| timeslice \| 2/2 \| [\d,]+ ± [\d,.]+ \| baseline \| - \| - \|", md
    )
    assert re.search(
        r"\| timeslice \| timeslice \| 1/2 \(partial\) \| [\d,]+ \| \*\*[+-]\d+\.\d%\*\* \(n=1: no "
        r"CI\)",
        md,
    )
    assert "| mps | mps | 0/2 (not run) | (none) |" in md
    for heading in (
        "Per-token decode latency (TPOT, ms)",
        "Time to first token",
        "GPU telemetry",
        "Concurrency sweep (gen)",
        "Missing or failed",
        "Environment",
        "Settings",
    ):
        assert heading in md
    assert (
        "| Condition | SM active | SM occupancy | Tensor active | DRAM active | Power (W) | "
        "SM clock (MHz) | Power-capped |" in md
    )
    assert (
        "| gen-only | 0.820 ± 0.000 | 0.180 ± 0.000 | 0.200 ± 0.000 | 0.300 ± 0.000 | "
        "500 ± 0.00 | 1,847 ± 0.00 | 67% ± 0% |" in md
    )
    # the window holds ticks 1-3, two of them capped
    assert (
        "At the power limit: gen-only (67% of seconds, 500 W of a 700 W limit; 120 W before "
        "the load), embed-only (67% of seconds, 500 W of a 700 W limit; 120 W before the load)"
        in md
    )
    assert "| embed-only | rep 2 failed | ConnectionError: gen endpoint unreachable |" in md
    assert "| mps | not run | 2 of 2 rep(s) not run yet" in md
    assert "| timeslice | not run | 1 of 2 rep(s) not run yet" in md
    assert "Throughput-optimal concurrency: **gen-only: C=" in md
    for name in ("tradeoff", "throughput", "tpot", "telemetry", "sweep"):
        assert (
            f"(plots/{name}.png)" in md
            and (run_dir / "plots" / f"{name}.png").stat().st_size > 5000
        )


def test_a_condition_below_the_power_cap_share_is_not_named():
    from types import SimpleNamespace as NS

    from coserve.report.telemetry_section import POWER_CAPPED_NOTABLE, power_limited
    from coserve.stats import summarize

    def cond(name, shares):
        return NS(name=name, summary={"power_capped": summarize(shares)})

    below = POWER_CAPPED_NOTABLE - 0.05
    run = NS(matrix=[cond("cool", [below, below]), cond("hot", [0.9, 1.0])])
    note = power_limited(run)
    assert "hot (95% of seconds)" in note and "cool" not in note
    assert power_limited(NS(matrix=[cond("cool", [below])])) is None


def test_html_is_self_contained(run_dir):
    html = (run_dir / "report.html").read_text()
    assert html.count("src='data:image/png;base64,") == 5
    assert not re.search(r"""(src|href)=['"](?!data:)""", html)  # nothing fetched from elsewhere
    assert "<table>" in html and "<b>" in html and "baseline" in html


def test_report_command_rerenders(run_dir, capsys):
    from coserve.cli import main

    before = (run_dir / "report.md").read_text()
    (run_dir / "report.md").unlink()
    assert main(["report", str(run_dir), "--no-plots"]) == 0
    after = (run_dir / "report.md").read_text()

    def table(md):
        return md.split("## Throughput\n\n")[1].split("\n\n")[0]

    assert table(after) == table(before) and "| gen-only |" in table(after)
    out = capsys.readouterr().out
    assert "gen-only" in out
    verdict = next(ln for ln in after.splitlines() if ln.startswith("**Verdict:**"))
    assert verdict.replace("**", "") in " ".join(out.split())  # as `coserve run` prints it
    assert main(["report", str(run_dir.parent)]) == 2
    assert "not a coserve run folder" in capsys.readouterr().err
    # a path that is not there was called "not a coserve run folder", on stdout
    assert main(["report", str(run_dir / "nope")]) == 2
    assert f"{run_dir / 'nope'} does not exist" in capsys.readouterr().err


def test_embed_sweep_plots_the_trade_off(tmp_path):
    from coserve.report import plots
    from coserve.report.tradeoff import tradeoff

    text = (
        SPEC + '[sweep]\nrole = "embed"\nconcurrency = [4, 16]\nconditions = ["timeslice", "mps"]\n'
    )
    names = ["timeslice.embed-c4", "timeslice.embed-c16", "mps.embed-c4", "mps.embed-c16"]
    runner(tmp_path, FakeBackend(), text=text, only=names).run()
    run = aggregate(tmp_path / "run")
    assert {c.name for c in run.sweep if c.ok} == set(names)
    assert set(run.sweep_optimum()) == {"timeslice", "mps"}
    assert plots.sweep(run, tmp_path / "sweep.png").stat().st_size > 5000
    curves = {c.label: [p.condition for p in c.points] for c in tradeoff(run).curves}
    assert curves == {
        "timeslice": sorted(names[:2], key=lambda n: run.get(n).mean("embed_seq_s")),
        "mps": sorted(names[2:], key=lambda n: run.get(n).mean("embed_seq_s")),
    }
    assert plots.tradeoff(run, tmp_path / "tradeoff.png").stat().st_size > 5000


def test_unreadable_files_are_named_not_a_traceback(run_dir, tmp_path, capsys):
    import shutil

    from coserve.cli import main

    bad = tmp_path / "run"
    shutil.copytree(run_dir, bad)
    cut = bad / "reps" / "gen-only" / "rep-1" / "rep.json"
    cut.write_text(cut.read_text()[: len(cut.read_text()) // 2])
    (bad / "reps" / "gen-only" / "rep-2" / "rep.json").write_text("[]")
    (bad / "fingerprint.json").write_text("{garbage")
    assert main(["report", str(bad), "--no-plots"]) == 0
    assert "warning: could not read 3 file(s)" in " ".join(capsys.readouterr().out.split())
    md = (bad / "report.md").read_text()
    assert "**Warning:** could not read 3 file(s)" in md
    assert "rep-2/rep.json: not a JSON object (holds a list)" in md
    assert "fingerprint.json: not valid JSON" in md
    # a lost fingerprint.json is one more file it could not read, not the end of the report
    (bad / "fingerprint.json").unlink()
    assert main(["report", str(bad), "--no-plots"]) == 0
    md = (bad / "report.md").read_text()
    assert "fingerprint.json: No such file or directory" in md and "| gen-only |" in md


def test_junk_lines_in_a_telemetry_series_are_skipped(run_dir, tmp_path):
    import json
    import shutil

    from coserve.cli import main
    from coserve.report.rep_series import telemetry_series

    bad = tmp_path / "run"
    shutil.copytree(run_dir, bad)
    path = bad / "reps" / "gen-only" / "rep-1" / "telemetry.jsonl"
    good = [json.loads(line) for line in path.read_text().splitlines()]
    odd = {**good[0], "sm_active": "high", "t": good[0]["t"] + 0.5}
    path.write_bytes(b"[1]\n42\n\xff\n" + path.read_bytes() + json.dumps(odd).encode() + b"\n{")
    rows, _bench = telemetry_series(aggregate(bad), aggregate(bad).get("gen-only"))
    assert [r["t"] for r in rows] == [r["t"] for r in good] + [odd["t"]]
    assert main(["report", str(bad)]) == 0
    assert (bad / "plots" / "telemetry.png").stat().st_size > 5000


# env "x": environment_blocks' .get on it was an AttributeError traceback out of `coserve report`
@pytest.mark.parametrize("key, value, kind", [("bench", [1], "list"), ("env", "x", "str")])
def test_a_rep_record_whose_parts_are_no_objects_is_named(run_dir, tmp_path, key, value, kind):
    import json
    import shutil

    from coserve.cli import main

    bad = tmp_path / "run"
    shutil.copytree(run_dir, bad)
    path = bad / "reps" / "gen-only" / "rep-1" / "rep.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
    assert main(["report", str(bad), "--no-plots"]) == 0
    md = (bad / "report.md").read_text()
    assert f"rep-1/rep.json: '{key}' is a {kind}, not an object" in md
    assert aggregate(bad).get("gen-only").status == "partial"


# each was a traceback out of `coserve report` (AttributeError in load_warnings, TypeError in
# the per-rep table's num); a list where a metric's number goes was left out without a word
@pytest.mark.parametrize(
    "gen, said",
    [
        ("x", "bench.gen is a str, not an object"),
        ({"output_tokens_per_s": "x"}, "bench.gen.output_tokens_per_s is 'x', not a number"),
        ({"requests_per_s": [1]}, "bench.gen.requests_per_s is [1], not a number"),
        # an int beyond any float was an OverflowError traceback
        ({"output_tokens_per_s": 10**400}, "bench.gen.output_tokens_per_s is 1000000000"),
        # a negative rate priced each embedding at -200 gen tokens against taking turns
        ({"output_tokens_per_s": -10.0}, "bench.gen.output_tokens_per_s is -10.0, a negative"),
    ],
)
def test_a_rep_whose_bench_figures_are_no_numbers_is_named(run_dir, tmp_path, gen, said):
    import json
    import shutil

    from coserve.cli import main

    bad = tmp_path / "run"
    shutil.copytree(run_dir, bad)
    path = bad / "reps" / "gen-only" / "rep-1" / "rep.json"
    rec = json.loads(path.read_text())
    rec["bench"]["gen"] = gen if isinstance(gen, str) else {**rec["bench"]["gen"], **gen}
    path.write_text(json.dumps(rec))
    assert main(["report", str(bad), "--no-plots"]) == 0
    assert f"rep-1/rep.json: {said}" in (bad / "report.md").read_text()


# a rep folder copied by hand to another condition counted towards the one its record named:
# gen-only's baseline had a rep more than the spec plans, and the copy's folder none
def test_a_rep_record_in_the_folder_of_another_rep_is_named_not_counted(run_dir, tmp_path):
    import shutil

    from coserve.cli import main

    bad = tmp_path / "run"
    shutil.copytree(run_dir, bad)
    shutil.copytree(bad / "reps" / "gen-only" / "rep-1", bad / "reps" / "mps" / "rep-1")
    shutil.copytree(bad / "reps" / "gen-only" / "rep-1", bad / "reps" / "gen-only" / "rep-7")
    assert [r["rep"] for r in aggregate(bad).get("gen-only").ok] == [1, 2]
    assert main(["report", str(bad), "--no-plots"]) == 0
    md = (bad / "report.md").read_text()
    assert "mps/rep-1/rep.json: it says condition 'gen-only' rep 1, but lies in the folder of" in md
    assert "gen-only/rep-7/rep.json: it says condition 'gen-only' rep 1" in md


# each was a traceback out of `coserve report`: an AttributeError in the failures table, a
# TypeError in the header's GPU line
def test_an_odd_error_or_fingerprint_is_named(run_dir, tmp_path):
    import json
    import shutil

    from coserve.cli import main

    bad = tmp_path / "run"
    shutil.copytree(run_dir, bad)
    path = bad / "reps" / "gen-only" / "rep-1" / "rep.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "error": {"a": [1]}}))
    fp = bad / "fingerprint.json"
    fp.write_text(json.dumps({**json.loads(fp.read_text()), "gpus": 5}))
    assert main(["report", str(bad), "--no-plots"]) == 0
    md = (bad / "report.md").read_text()
    assert "rep-1/rep.json: 'error' is a dict, not a string" in md
    assert "fingerprint.json: gpus is a int, not a list" in md
    fp.write_text(json.dumps({"gpus": [{"name": 1}], "packages": []}))
    assert main(["report", str(bad), "--no-plots"]) == 0
    assert (
        "fingerprint.json: gpus holds an entry with no string 'name'"
        in (bad / "report.md").read_text()
    )


def test_a_plot_that_cannot_be_drawn_is_left_out_and_said(run_dir, tmp_path, capsys):
    # finite figures too large for an axis were a ValueError traceback out of matplotlib
    import json
    import shutil

    from coserve.cli import main

    bad = tmp_path / "run"
    shutil.copytree(run_dir, bad)
    for path in (bad / "reps").glob("*/rep-*/rep.json"):
        rec = json.loads(path.read_text())
        if (rec.get("bench") or {}).get("gen"):
            rec["bench"]["gen"]["output_tokens_per_s"] = 1.7e308
            path.write_text(json.dumps(rec))
    assert main(["report", str(bad)]) == 0
    said = capsys.readouterr().err
    assert "coserve report: plot tradeoff left out: it cannot be drawn" in said, said
    assert not (bad / "plots" / "tradeoff.png").exists()
    assert (bad / "plots" / "telemetry.png").exists() and (bad / "report.md").exists()


def test_a_cut_or_junk_records_file_gives_what_it_holds(run_dir, tmp_path):
    import gzip
    import shutil

    from coserve.cli import main
    from coserve.report.rep_series import request_values

    bad = tmp_path / "run"
    shutil.copytree(run_dir, bad)
    one = bad / "reps" / "gen-only" / "rep-1" / "bench.records.jsonl.gz"
    two = bad / "reps" / "gen-only" / "rep-2" / "bench.records.jsonl.gz"
    two.write_bytes(gzip.compress(gzip.decompress(two.read_bytes()) * 400))  # some 400 kB
    whole = request_values(aggregate(bad), aggregate(bad).get("gen-only"), "tpot_ms", "gen")
    one.write_bytes(b"garbage")
    two.write_bytes(two.read_bytes()[: two.stat().st_size // 2])
    left = request_values(aggregate(bad), aggregate(bad).get("gen-only"), "tpot_ms", "gen")
    assert 0 < len(left) < len(whole) and set(left) <= set(whole)
    assert main(["report", str(bad)]) == 0


def test_a_folder_it_cannot_write_in_is_one_line_not_a_traceback(run_dir, tmp_path, capsys):
    import shutil

    from coserve.cli import main

    bad = tmp_path / "run"
    shutil.copytree(run_dir, bad)
    (bad / "report.md").unlink()
    (bad / "report.md").mkdir()  # what root meets instead of a read-only folder
    assert main(["report", str(bad), "--no-plots"]) == 2
    err = capsys.readouterr()
    assert "Traceback" not in err.out + err.err
    assert f"coserve report: cannot write the report in {bad}: Is a directory" in err.err


def test_a_spec_without_embed_alone_says_there_are_no_embed_deltas(run_dir, tmp_path):
    import json
    import shutil

    bad = tmp_path / "run"
    shutil.copytree(run_dir, bad)
    spec = json.loads((bad / "spec.json").read_text())
    spec["conditions"] = [c for c in spec["conditions"] if c["name"] != "embed-only"]
    (bad / "spec.json").write_text(json.dumps(spec))
    render(bad, with_plots=False)
    md = (bad / "report.md").read_text()
    assert "embed deltas against **-**" not in md
    assert "no condition runs embed alone, so there are no embed deltas" in md


def test_an_embed_baseline_without_a_finished_rep_is_said(run_dir, tmp_path):
    """The TP=2 closed loop's embed deltas were all "-": its embed-alone condition had not
    run, which only the "Missing or failed" table said."""
    import shutil

    bad = tmp_path / "run"
    shutil.copytree(run_dir, bad)
    shutil.rmtree(bad / "reps" / "embed-only")
    render(bad, with_plots=False)
    md = (bad / "report.md").read_text()
    assert "embed deltas against **embed-only**, which finished no rep: none yet." in md
    assert "embed deltas against **embed-only**." in (run_dir / "report.md").read_text()


def test_settings_name_the_server_flags_a_condition_adds():
    """tp2-mps and tp2-symm-mps read alike in Settings although their gen all-reduces
    differed (a new-user pass, 2026-11-30)."""
    from types import SimpleNamespace

    from coserve.report.sections import settings_blocks
    from coserve.spec import load_spec

    spec = load_spec(Path(__file__).resolve().parent.parent / "experiments" / "seed-tp2.toml")
    run = SimpleNamespace(spec=spec, fingerprint={"gpus": [{"index": 0}, {"index": 1}]})
    rows = {r[0]: r[3] for r in settings_blocks(run)[-1].rows}
    assert "TP=2, --tp-all-reduce nccl)" in rows["tp2-nccl-mps"].split("; embed")[0]
    assert "--tp-all-reduce" not in rows["tp2-mps"]
    assert "TP=2, --enable-expert-parallel)" in rows["tp2-ep-mps"]


def test_the_environment_names_the_files_a_dirty_tree_changed(run_dir, tmp_path):
    """A warm lent machine's git metadata lagged its copied tree (two H200s, 2026-11-30):
    the report said only "ccd5f9c (with local changes)", not that the spec was what differed."""
    import json
    import shutil

    from coserve.cli import main
    from coserve.experiment.fingerprint import changed_paths

    porcelain = " M experiments/a.toml\nM  coserve/b.py\nR  old.py -> new.py\n"
    assert changed_paths(porcelain) == ["experiments/a.toml", "coserve/b.py", "new.py"]
    bad = tmp_path / "run"
    shutil.copytree(run_dir, bad)
    fp = json.loads((bad / "fingerprint.json").read_text())
    git = {"commit": "c" * 40, "dirty": True, "changed": ["experiments/a.toml"]}
    (bad / "fingerprint.json").write_text(json.dumps({**fp, "git": {**git, "changed_count": 3}}))
    assert main(["report", str(bad), "--no-plots"]) == 0
    md = (bad / "report.md").read_text()
    assert "commit cccccccccccc (with local changes: experiments/a.toml and 2 more);" in md
    (bad / "fingerprint.json").write_text(json.dumps({**fp, "git": {**git, "changed": []}}))
    assert main(["report", str(bad), "--no-plots"]) == 0
    assert "commit cccccccccccc (with local changes);" in (bad / "report.md").read_text()


def test_the_console_table_can_hold_some_conditions_alone(run_dir):
    # a profile of one condition printed every condition of its spec, the rest "not run"
    from coserve.report.render import console_table

    run = aggregate(run_dir)
    names = list(console_table(run, {"gen-only"}).columns[0].cells)
    assert names == ["gen-only"]
    every = list(console_table(run).columns[0].cells)
    assert "mps" in every and len(every) > 1
