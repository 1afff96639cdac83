"""Each setting has one home; the layers that repeat it are checked against that home here."""

from __future__ import annotations

import argparse
import dataclasses

from coserve.engine.types import EngineArgs
from coserve.launch_command import ServerSpec
from coserve.roles import ROLES
from coserve.server import command
from coserve.spec import ServerConfig

ENGINE = {f.name: f.default for f in dataclasses.fields(EngineArgs)}
# `coserve serve` flag (argparse dest) -> the EngineArgs field it fills.
SERVE_TO_ENGINE = {
    "random_weights": "random_weights",
    "dtype": "dtype",
    "gpu_memory_utilization": "gpu_memory_utilization",
    "kv_cache_bytes": "cpu_kv_cache_bytes",
    "max_model_len": "max_model_len",
    "max_num_seqs": "max_num_seqs",
    "max_num_batched_tokens": "max_num_batched_tokens",
    "enforce_eager": "enforce_eager",
    "seed": "seed",
    "tensor_parallel_size": "tensor_parallel_size",
}


def _serve_defaults(kind: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return parser.parse_args([kind, "--model", "tiny-dense"])


def test_serve_flags_default_to_the_engine_args():
    args = _serve_defaults("gen")
    assert {flag: getattr(args, flag) for flag in SERVE_TO_ENGINE} == {
        flag: ENGINE[field] for flag, field in SERVE_TO_ENGINE.items()
    }


def test_serve_kinds_are_the_roles():
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    (kind,) = [a for a in parser._actions if a.dest == "kind"]
    assert tuple(kind.choices) == (*ROLES, "colocated")  # colocated: both roles in one process


def test_spec_server_defaults_are_the_engine_args():
    defaults = ServerConfig()
    for name in ("gpu_memory_utilization", "max_num_seqs", "enforce_eager", "tensor_parallel_size"):
        assert getattr(defaults, name) == ENGINE[name], name


def test_every_spec_server_field_reaches_the_launch():
    """A [servers.*] field is either handed to ServerSpec under its own name or used by the run
    (slo_guard: the run hands the embed server gen's URL as slo_guard_gen_url)."""
    spec_fields = {f.name for f in dataclasses.fields(ServerConfig)}
    launch_fields = {f.name for f in dataclasses.fields(ServerSpec)}
    assert spec_fields - launch_fields == {"ready_timeout_s", "slo_guard"}
