"""`coserve run --apply-mig` means what `apply_mig = true` in a mig condition's options means
(issue 21: the flag was advertised but missing); the spec, and so its hash, is unchanged."""

from __future__ import annotations

from test_experiment_runner import FakeBackend

from coserve.cli import build_parser
from coserve.experiment.runner import Runner
from coserve.spec import loads_spec

SPEC = """
name = "m"
repetitions = 1
[servers.gen]
model = "tiny-dense"
[servers.embed]
model = "tiny-embed"
[load]
warmup_s = 1
duration_s = 2
[telemetry]
enabled = false
[[conditions]]
name = "gen-only"
servers = ["gen"]
[[conditions]]
name = "mig"
strategy = "mig"
"""


class Recording(FakeBackend):
    def __init__(self):
        super().__init__()
        self.options = {}

    def strategy(self, name, gpus, options, run_dir):
        self.options[name] = options
        return super().strategy(name, gpus, options, run_dir)


def test_the_flag_is_parsed():
    args = build_parser().parse_args(["run", "x.toml", "--out", "d", "--apply-mig"])
    assert args.apply_mig is True
    assert build_parser().parse_args(["run", "x.toml", "--out", "d"]).apply_mig is False


def test_the_flag_sets_apply_mig_for_mig_conditions_only(tmp_path):
    spec = loads_spec(SPEC)
    for flag in (True, False):
        backend = Recording()
        Runner(spec, tmp_path / f"run-{flag}", backend=backend, apply_mig=flag).run()
        assert backend.options["mig"].get("apply_mig", False) is flag
        assert "apply_mig" not in backend.options["timeslice"]
    assert "apply_mig" not in str(spec.to_dict())
