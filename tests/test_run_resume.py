"""`--resume` on a run folder whose files were damaged: refused naming the file and field,
or repaired where the damage can be undone exactly, never a traceback."""

from __future__ import annotations

import json

import pytest
from test_experiment_runner import GROWN, SPEC, FakeBackend, runner

from coserve.experiment.rundir import RunDir, read_json, write_json
from coserve.experiment.runner import RunRefused
from coserve.spec import loads_spec


@pytest.mark.parametrize("mib", ["abc", float("inf"), None, True])
def test_a_fingerprint_gpu_memory_that_is_no_number_is_refused_naming_it(tmp_path, mib):
    runner(tmp_path, FakeBackend(), only=["gen-only"]).run()
    rd = RunDir(tmp_path / "run")
    fp = read_json(rd.fingerprint_file)
    fp["gpus"] = [{"index": 0, "name": "NVIDIA H200", "uuid": "GPU-1", "memory_mib": mib}]
    fp["gpus_used"] = []
    rd.fingerprint_file.write_text(json.dumps(fp))  # inf as JSON's Infinity, as Python writes it
    with pytest.raises(RunRefused, match=r"is damaged \(gpus\[0\]\.memory_mib is ") as e:
        runner(tmp_path, FakeBackend(), resume=True).run()
    assert str(rd.fingerprint_file) in str(e.value)


BAD_SPEC_JSON = ["garbage\n", '{"conditions": ["a"]}', "[1]"]


@pytest.mark.parametrize("damage", BAD_SPEC_JSON, ids=["garbage", "shape", "list"])
@pytest.mark.parametrize(
    "text", [SPEC.replace("duration_s = 2", "duration_s = 3"), GROWN], ids=["changed", "grown"]
)
def test_a_changed_spec_over_a_damaged_spec_json_is_refused_naming_it(tmp_path, damage, text):
    runner(tmp_path, FakeBackend(), only=["gen-only"]).run()
    rd = RunDir(tmp_path / "run")
    rd.spec_json.write_text(damage)
    with pytest.raises(RunRefused, match="cannot be read") as e:
        runner(tmp_path, FakeBackend(), text=text, resume=True).run()
    assert str(rd.spec_json) in str(e.value) and "the spec differs" not in str(e.value)
    assert rd.spec_json.read_text() == damage  # nothing was changed


@pytest.mark.parametrize(
    "damage", [*BAD_SPEC_JSON, None], ids=["garbage", "shape", "list", "missing"]
)
def test_a_damaged_spec_json_under_the_same_spec_is_written_again(tmp_path, damage):
    runner(tmp_path, FakeBackend(), only=["gen-only"]).run()
    rd = RunDir(tmp_path / "run")
    first = read_json(rd.spec_json)
    if damage is None:
        rd.spec_json.unlink()
    else:
        rd.spec_json.write_text(damage)
    r = runner(tmp_path, FakeBackend(), resume=True, only=["gen-only"])
    assert r.run() == []  # every rep finished earlier
    assert read_json(rd.spec_json) == first
    assert "written again from the spec given" in r.notes[0]
    kept = rd.path / "spec.json.damaged-1"
    assert (kept.read_text() == damage) if damage else not kept.exists()
    from coserve.report.aggregate import aggregate

    assert aggregate(rd.path).spec.digest() == loads_spec(SPEC).digest()


def test_a_spec_json_under_a_grown_spec_still_grows(tmp_path):
    runner(tmp_path, FakeBackend(), only=["gen-only"]).run()
    rd = RunDir(tmp_path / "run")
    write_json(rd.spec_json, read_json(rd.spec_json))  # readable: the grown spec is taken
    r = runner(tmp_path, FakeBackend(), text=GROWN, resume=True, only=["mps-capped"])
    assert len(r.run()) == 2 and r.notes == []


def test_a_rep_with_a_damaged_rep_json_runs_again_and_its_folder_is_kept(tmp_path):
    runner(tmp_path, FakeBackend(), only=["gen-only"]).run()
    rd = RunDir(tmp_path / "run")
    rep = rd.rep_dir("gen-only", 1)
    bench = (rep / "bench.json").read_text()
    (rep / "rep.json").write_text('{"cond')
    notes = []

    class Progress:
        def __getattr__(self, name):
            return lambda *a, **k: None

        def message(self, text):
            notes.append(text)

    again = runner(tmp_path, FakeBackend(), resume=True, only=["gen-only"], progress=Progress())
    assert [(r["condition"], r["rep"]) for r in again.run()] == [("gen-only", 1)]
    kept = rep.with_name("rep-1.damaged-1")
    assert (kept / "bench.json").read_text() == bench and (
        kept / "rep.json"
    ).read_text() == '{"cond'
    assert rd.rep_record("gen-only", 1)["status"] == "ok"
    assert f"{rep / 'rep.json'}: not valid JSON" in notes[0] and str(kept) in notes[0]
    # the report reads the rep run again, not the one set aside (no unreadable rep.json)
    from coserve.report.aggregate import aggregate

    assert aggregate(rd.path).unreadable == []
    (rep / "rep.json").write_text("[]")  # damaged again: the next number
    runner(tmp_path, FakeBackend(), resume=True, only=["gen-only"]).run()
    assert rep.with_name("rep-1.damaged-2").is_dir() and rd.rep_record("gen-only", 1)


def test_a_rep_folder_copied_to_another_place_runs_again_there(tmp_path):
    # resume counted a copied rep-1 as rep-2 finished; the report (which refuses it) then
    # showed rep 2 missing for good
    import shutil

    runner(tmp_path, FakeBackend(), only=["gen-only"]).run()
    rd = RunDir(tmp_path / "run")
    shutil.rmtree(rd.rep_dir("gen-only", 2))
    shutil.copytree(rd.rep_dir("gen-only", 1), rd.rep_dir("gen-only", 2))
    assert rd.rep_record("gen-only", 2) is None
    assert "but lies in the folder of condition 'gen-only' rep 2" in str(
        rd.damaged_rep("gen-only", 2)
    )
    again = runner(tmp_path, FakeBackend(), resume=True, only=["gen-only"]).run()
    assert [(r["condition"], r["rep"]) for r in again] == [("gen-only", 2)]
    assert rd.rep_dir("gen-only", 2).with_name("rep-2.damaged-1").is_dir()
    assert rd.rep_record("gen-only", 2)["rep"] == 2
