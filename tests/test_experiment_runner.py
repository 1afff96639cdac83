"""The runner with stand-ins for strategy, servers, telemetry and load: order, atomic
records, resume, failures, refusals, and tear-down on every way out."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from coserve.experiment.rundir import RunDir, read_json, write_json
from coserve.experiment.runner import Backend, Runner, RunRefused
from coserve.spec import loads_spec

SPEC = """
name = "fake"
repetitions = 2
[servers.gen]
model = "tiny-dense"
[servers.embed]
model = "all-minilm-l6-v2"
[load]
warmup_s = 1
duration_s = 2
[[conditions]]
name = "gen-only"
servers = ["gen"]
[[conditions]]
name = "embed-only"
servers = ["embed"]
[[conditions]]
name = "timeslice"
[[conditions]]
name = "mps"
strategy = "mps"
"""


class FakeServer:
    def __init__(self, backend, spec):
        self.backend, self.spec = backend, spec
        self.url = f"http://127.0.0.1:{9000 if spec.role == 'gen' else 9001}"
        self.pid = 4242
        backend.live.add(spec.role)

    def stop(self, timeout_s=20.0):
        self.backend.events.append(("stop", self.spec.role))
        self.backend.live.discard(self.spec.role)

    def check(self):
        if self.spec.role in self.backend.die_during_load:
            raise RuntimeError(f"{self.spec.role} server died (exit code 1); last lines: OOM")


class FakeStrategy:
    def __init__(self, backend, name, gpus):
        self.backend, self.name, self.gpus = backend, name, gpus

    def __enter__(self):
        self.backend.events.append(("strategy up", self.name))
        self.backend.live.add("strategy")
        return self

    def __exit__(self, *exc):
        self.backend.events.append(("strategy down", self.name))
        self.backend.live.discard("strategy")
        return False

    def env_for(self, role):
        return {"CUDA_VISIBLE_DEVICES": "0"}

    def tensor_parallel_size(self, role):
        return 1

    def telemetry_devices(self):
        return list(self.gpus)

    def describe(self):
        return {"strategy": self.name}


class FakeGuardTrace:
    """The SLO guard's sampler: 3 lines once started."""

    def __init__(self):
        self.started = False

    def start(self):
        self.started = True

    def stop(self):
        return 3 if self.started else 0


class FakeSampler:
    """Telemetry rows like the real sampler's, 4 ticks over the load."""

    def __init__(self, devices, out_path):
        self.devices, self.out_path, self.rows, self.available = devices, out_path, [], True
        self.at_start = {"0": {"power_limit_w": 700.0, "power_w": 120.0}}

    def start(self):
        return self

    def stop(self):
        t0 = 1_700_000_000.0
        self.rows = [
            {
                "t": t0 + i,
                "t_rel_s": float(i),
                "device": "0",
                "sm_active": 0.8 + 0.01 * i,
                "sm_occupancy": 0.18,
                "tensor_active": 0.2,
                "dram_active": 0.3,
                "power_w": 500.0,
                "sm_clock_mhz": 1980.0 - 200.0 * (i % 2),
                "power_capped": i % 2,
            }
            for i in range(4)
        ]
        with open(self.out_path, "w") as f:
            for r in self.rows:
                f.write(json.dumps(r) + "\n")
        return {"sm_active": {"mean": 0.815, "p50": 0.815}}

    def status(self):
        return "4 ticks over 1 device(s)"


def fake_summary(load: dict, rng: random.Random) -> dict:
    gen = None
    if load["gen_url"]:
        gen = {
            "output_tokens_per_s": rng.uniform(900, 1100),
            "requests_per_s": 2.0,
            "completed": 20,
            "failed": 0,
            "tpot_ms": {"mean": 10, "p50": 10, "p95": 12, "p99": 13},
            "ttft_ms": {"mean": 50, "p50": 40, "p95": 80, "p99": 90},
            "itl_ms": {"mean": 10, "p50": 10, "p95": 12, "p99": 13},
            "errors": [],
        }
    emb = None
    if load["embed_url"]:
        emb = {
            "sequences_per_s": rng.uniform(90, 110),
            "requests_per_s": 12.0,
            "completed": 30,
            "failed": 0,
            "latency_ms": {"mean": 10, "p50": 10, "p95": 12, "p99": 13},
            "errors": [],
        }
    return {
        "warmup_s": load["warmup_s"],
        "duration_s": load["duration_s"],
        "cut_short": False,
        "started_at": "2023-11-14T22:13:20+00:00",
        "gen": gen,
        "embed": emb,
    }


class FakeBackend(Backend):
    def __init__(
        self,
        fail_start=(),
        interrupt_at=None,
        die_during_load=(),
        no_gen_completed=False,
        fail_at=None,
    ):
        self.events: list[tuple] = []
        self.live: set[str] = set()
        self.fail_start = set(fail_start)
        self.interrupt_at = interrupt_at  # (condition, rep) whose load is Ctrl-C'd
        self.die_during_load = set(die_during_load)
        self.no_gen_completed = no_gen_completed
        self.fail_at = fail_at  # (condition, rep) whose load raises
        self.loads: list[dict] = []
        self.rng = random.Random(0)

    def strategy(self, name, gpus, options, run_dir):
        return FakeStrategy(self, name, gpus)

    def start_server(self, spec, env, log_path, ready_timeout_s):
        Path(log_path).write_text("# coserve launch\n")
        if spec.role in self.fail_start:
            raise RuntimeError(
                f"{spec.role} server (builtin) exited before /health answered; last lines: bad flag"
            )
        self.events.append(("start", spec.role))
        return FakeServer(self, spec)

    def telemetry(self, devices, interval_s, out_path):
        return FakeSampler(devices, out_path)

    def guard_trace(self, embed_url, interval_s, out_path):
        self.events.append(("guard_trace", embed_url, interval_s, out_path.name))
        return FakeGuardTrace()

    def gpu_state(self):
        return {
            "gpus": [{"index": 0, "uuid": "GPU-fake", "memory_mib": 143771, "mig_devices": []}],
            "note": None,
        }

    def run_load(self, load, out_path, on_progress, dead=None):
        cond_dir = Path(out_path).parent
        here = (cond_dir.parent.name, int(cond_dir.name.split("-")[1]))
        self.events.append(("load", here))
        self.loads.append(load)
        assert self.live >= {"strategy"} | {r for r in ("gen", "embed") if load[f"{r}_url"]}
        if here == self.interrupt_at:
            raise KeyboardInterrupt
        if here == self.fail_at:
            raise ConnectionError("gen endpoint unreachable")
        summary = fake_summary(load, self.rng)
        if self.no_gen_completed and summary["gen"]:
            summary["gen"].update(
                completed=0, failed=7, errors=[{"status": 500, "message": "boom", "count": 7}]
            )
        write_json(Path(out_path), summary)
        lines = [
            json.dumps(
                {
                    "endpoint": "gen",
                    "status": "ok",
                    "end_s": load["warmup_s"] + 0.1 * i,
                    "tpot_ms": self.rng.gauss(10, 1),
                    "ttft_ms": 40.0,
                }
            )
            for i in range(10)
        ]
        Path(str(out_path).replace(".json", ".records.jsonl")).write_text("\n".join(lines) + "\n")
        return summary


def runner(tmp_path, backend, text=SPEC, **kw) -> Runner:
    return Runner(loads_spec(text), tmp_path / "run", spec_text=text, backend=backend, **kw)


def test_reps_alternate_and_each_is_written_after_tear_down(tmp_path):
    b = FakeBackend()
    records = runner(tmp_path, b).run()
    assert [(r["condition"], r["rep"]) for r in records] == [
        ("gen-only", 1),
        ("embed-only", 1),
        ("timeslice", 1),
        ("mps", 1),
        ("gen-only", 2),
        ("embed-only", 2),
        ("timeslice", 2),
        ("mps", 2),
    ]
    assert all(r["status"] == "ok" for r in records)
    # one rep: strategy up, servers one after the other (gen first), load, tear-down in reverse
    i = b.events.index(("load", ("timeslice", 1)))
    assert b.events[i - 3 : i + 4] == [
        ("strategy up", "timeslice"),
        ("start", "gen"),
        ("start", "embed"),
        ("load", ("timeslice", 1)),
        ("stop", "embed"),
        ("stop", "gen"),
        ("strategy down", "timeslice"),
    ]
    assert not b.live
    rd = RunDir(tmp_path / "run")
    rec = rd.rep_record("mps", 2)
    assert (
        rec["status"] == "ok"
        and rec["strategy"] == "mps"
        and rec["bench"]["gen"]["completed"] == 20
    )
    # telemetry: the sampler's summary, and the mean over the ticks inside the window (t0+1..t0+3)
    assert rec["telemetry"]["all"]["sm_active"]["mean"] == 0.815
    assert rec["telemetry"]["window"]["sm_active"]["mean"] == pytest.approx(0.82)
    assert rec["telemetry"]["at_start"] == {
        "power_limit_w": 700.0,
        "power_w": 120.0,
        "devices": {"0": {"power_limit_w": 700.0, "power_w": 120.0}},
    }
    assert set(rec["phases_s"]) >= {"strategy", "start_gen", "start_embed", "load", "teardown"}
    rep_dir = rd.rep_dir("mps", 2)
    assert (rep_dir / "bench.records.jsonl.gz").exists() and not (
        rep_dir / "bench.records.jsonl"
    ).exists()
    assert not list(rd.path.rglob("*.tmp"))
    fp = read_json(rd.fingerprint_file)
    assert fp["spec"]["hash"] == loads_spec(SPEC).digest() and fp["git"]["commit"]
    assert (rd.path / "spec.toml").read_text() == SPEC
    # each load ran with the spec's settings and only the condition's endpoints
    assert b.loads[0]["gen_url"] and b.loads[0]["embed_url"] is None
    assert b.loads[0]["warmup_s"] == 1 and b.loads[0]["gen_concurrency"] == 512


def test_resume_skips_finished_reps_and_retries_failed_ones(tmp_path):
    b = FakeBackend(fail_start={"embed"})
    records = runner(tmp_path, b).run()
    failed = [(r["condition"], r["rep"]) for r in records if r["status"] == "failed"]
    assert failed == [
        ("embed-only", 1),
        ("timeslice", 1),
        ("mps", 1),
        ("embed-only", 2),
        ("timeslice", 2),
        ("mps", 2),
    ]
    rec = RunDir(tmp_path / "run").rep_record("timeslice", 1)
    assert "embed server (builtin) exited before /health" in rec["error"]
    assert (RunDir(tmp_path / "run").rep_dir("timeslice", 1) / "error.txt").exists()
    assert not b.live  # the gen server that did come up was stopped, and the strategy
    with pytest.raises(RunRefused, match="add --resume"):
        runner(tmp_path, FakeBackend()).run()
    b2 = FakeBackend()
    again = runner(tmp_path, b2, resume=True).run()
    assert [(r["condition"], r["rep"]) for r in again] == failed
    assert all(r["status"] == "ok" for r in again)
    assert ("load", ("gen-only", 1)) not in b2.events
    assert runner(tmp_path, FakeBackend(), resume=True).run() == []  # nothing left


def test_interrupt_keeps_finished_reps_and_tears_down(tmp_path):
    b = FakeBackend(interrupt_at=("timeslice", 1))
    r = runner(tmp_path, b)
    with pytest.raises(KeyboardInterrupt):
        r.run()
    rd = RunDir(tmp_path / "run")
    assert rd.rep_record("gen-only", 1)["status"] == "ok"
    assert rd.rep_record("embed-only", 1)["status"] == "ok"
    assert rd.rep_record("timeslice", 1) is None  # the interrupted rep is not finished
    assert not b.live and b.events[-3:] == [
        ("stop", "embed"),
        ("stop", "gen"),
        ("strategy down", "timeslice"),
    ]
    b2 = FakeBackend()
    rest = runner(tmp_path, b2, resume=True).run()
    assert [(x["condition"], x["rep"]) for x in rest][0] == ("timeslice", 1)
    assert len(rest) == 6


def test_a_server_dying_during_the_load_fails_the_rep(tmp_path):
    b = FakeBackend(die_during_load={"gen"})
    records = runner(tmp_path, b, only=["gen-only"]).run()
    assert [r["status"] for r in records] == ["failed", "failed"]
    assert "gen server died" in records[0]["error"] and not b.live


def test_a_load_that_raises_is_timed_too(tmp_path):
    # phases_s had no "load" when the load raised (a server killed under it, on a busy CPU)
    b = FakeBackend(fail_at=("gen-only", 1))
    records = runner(tmp_path, b, only=["gen-only"]).run()
    assert records[0]["status"] == "failed" and "unreachable" in records[0]["error"]
    assert records[0]["phases_s"]["load"] >= 0 and records[1]["phases_s"]["load"] >= 0


def test_nothing_completed_is_a_failure(tmp_path):
    records = runner(tmp_path, FakeBackend(no_gen_completed=True), only=["gen-only"]).run()
    assert records[0]["status"] == "failed"
    assert "no gen request completed" in records[0]["error"] and "500 boom" in records[0]["error"]


def test_subset_of_conditions(tmp_path):
    b = FakeBackend()
    records = runner(tmp_path, b, only=["mps", "gen-only"]).run()
    assert [(x["condition"], x["rep"]) for x in records] == [
        ("gen-only", 1),
        ("mps", 1),
        ("gen-only", 2),
        ("mps", 2),
    ]
    with pytest.raises(RunRefused, match="not in the spec"):
        runner(tmp_path, b, only=["nope"])


def test_resume_with_a_changed_spec_is_refused(tmp_path):
    runner(tmp_path, FakeBackend(), only=["gen-only"]).run()
    changed = SPEC.replace("duration_s = 2", "duration_s = 3")
    with pytest.raises(RunRefused, match="the spec differs"):
        runner(tmp_path, FakeBackend(), text=changed, resume=True).run()


GROWN = (
    SPEC
    + '[[conditions]]\nname = "mps-capped"\nstrategy = "mps"\n'
    + ("options = { active_thread_percentage = { embed = 50 } }\n")
)


def test_resume_with_conditions_added_runs_them_beside_the_finished_reps(tmp_path):
    # adding a condition to a spec forced a new folder, whose report lacked the baseline
    first = runner(tmp_path, FakeBackend(), only=["gen-only", "timeslice"]).run()
    rd = RunDir(tmp_path / "run")
    before = read_json(rd.fingerprint_file)["spec"]["hash"]
    r = runner(tmp_path, FakeBackend(), text=GROWN, resume=True)
    records = r.run()
    assert [(x["condition"], x["rep"]) for x in records] == [
        ("embed-only", 1),
        ("mps", 1),
        ("mps-capped", 1),
        ("embed-only", 2),
        ("mps", 2),
        ("mps-capped", 2),
    ]  # the four finished reps kept, not run again
    assert len(first) == 4 and all(
        rd.rep_record(c, n) for c in ("gen-only", "timeslice") for n in (1, 2)
    )
    assert r.warnings[0] == "the spec grown by mps-capped (the finished reps' conditions unchanged)"
    # the folder now holds the grown spec, and says what it grew from
    assert rd.spec_file.read_text() == GROWN
    assert [c["name"] for c in read_json(rd.spec_json)["conditions"]][-1] == "mps-capped"
    fp = read_json(rd.fingerprint_file)["spec"]
    assert fp["hash"] == loads_spec(GROWN).digest() and fp["before"]["hash"] == before
    runner(tmp_path, FakeBackend(), text=GROWN, resume=True).run()  # and resumes under it


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (
            lambda t: t.replace('[[conditions]]\nname = "mps"\nstrategy = "mps"\n', ""),
            "conditions[mps]: removed",
        ),
        (
            lambda t: t.replace(
                'strategy = "mps"\n', 'strategy = "mps"\nbaseline = "gen-only"\n', 1
            ),
            "conditions[mps].baseline",
        ),
        (lambda t: t.replace("repetitions = 2", "repetitions = 3"), "repetitions: 2 -> 3"),
    ],
    ids=["removed", "changed", "reps"],
)
def test_resume_with_a_condition_removed_or_changed_is_refused(tmp_path, change, says):
    runner(tmp_path, FakeBackend(), only=["gen-only"]).run()
    with pytest.raises(RunRefused, match="the spec differs") as e:
        runner(tmp_path, FakeBackend(), text=change(GROWN), resume=True).run()
    assert says in str(e.value)


def test_added_conditions_of_two_specs():
    from coserve.experiment.fingerprint import added_conditions

    sweep = '[sweep]\nrole = "embed"\nrate = [5, 10]\nconditions = ["timeslice"]\n'
    a = loads_spec(SPEC + sweep).to_dict()
    grow = loads_spec(GROWN + sweep.replace('["timeslice"]', '["timeslice", "mps"]'))
    assert added_conditions(a, grow.to_dict()) == ["mps-capped", "mps's sweep"]
    text = SPEC.replace('name = "fake"', 'name = "fake"\ndescription = "new words"')
    assert added_conditions(a, loads_spec(text + sweep).to_dict()) == []
    assert added_conditions(a, loads_spec(SPEC + sweep.replace("10]", "20]")).to_dict()) is None
    assert added_conditions(a, loads_spec(SPEC).to_dict()) is None  # the sweep dropped


def test_resume_on_another_gpu_is_refused(tmp_path):
    runner(tmp_path, FakeBackend(), only=["gen-only"]).run()
    rd = RunDir(tmp_path / "run")
    fp = read_json(rd.fingerprint_file)
    fp["gpus"] = [{"index": 0, "name": "NVIDIA H200", "uuid": "GPU-1", "memory_mib": 143771}]
    fp["gpus_used"] = [{"index": 0, "name": "NVIDIA H200", "memory_mib": 143771}]
    fp["driver"] = "570.1"
    write_json(rd.fingerprint_file, fp)
    with pytest.raises(
        RunRefused, match="the GPU differs: the run folder was measured on 1x NVIDIA H200"
    ):
        runner(tmp_path, FakeBackend(), resume=True).run()


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        ("garbage{", "cannot read"),
        ("[1, 2]", r"cannot read .* \(not a JSON object \(holds a list\)\)"),
        ("{}", "is damaged"),
        ('{"spec": 3}', "is damaged"),
    ],
)
def test_resume_with_a_damaged_fingerprint_is_refused_by_name(tmp_path, damage, says):
    runner(tmp_path, FakeBackend(), only=["gen-only"]).run()
    fp = RunDir(tmp_path / "run").fingerprint_file
    fp.write_text(damage)
    with pytest.raises(RunRefused, match=says) as e:
        runner(tmp_path, FakeBackend(), resume=True).run()
    assert str(fp) in str(e.value)
    with pytest.raises(RunRefused):  # without --resume: refused as well, not a traceback
        runner(tmp_path, FakeBackend()).run()


def test_a_folder_that_is_not_a_run_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "precious.txt").write_text("x")
    with pytest.raises(RunRefused, match="not a coserve run folder"):
        runner(tmp_path, FakeBackend()).run()
