"""`coserve serve` refuses flags meant for another kind of server, and a per-forward token
budget below max_model_len (the embed engine takes a whole input per forward), exit 2."""

from __future__ import annotations

import pytest

from coserve.cli import main


@pytest.mark.parametrize(
    "argv, message",
    [
        (["gen", "--embed-sms", "4"], "--embed-sms is for serve colocated; serve gen would"),
        (["gen", "--embed-model", "tiny-embed"], "--embed-model is for serve colocated"),
        (
            ["embed", "--embed-max-num-batched-tokens", "10"],
            "--embed-max-num-batched-tokens is for serve colocated; serve embed would ignore it",
        ),
        (
            ["colocated", "--embed-model", "tiny-embed", "--slo-guard-stat", "p99"],
            "--slo-guard-stat is for serve embed; serve colocated would ignore it",
        ),
        (
            ["embed", "--max-num-batched-tokens", "10", "--max-model-len", "128"],
            "--max-num-batched-tokens: 10 is less than max_model_len (128)",
        ),
        (
            [
                "colocated",
                "--embed-model",
                "tiny-embed",
                "--embed-max-num-batched-tokens",
                "10",
                "--embed-max-model-len",
                "128",
            ],
            "--embed-max-num-batched-tokens: 10 is less than max_model_len (128)",
        ),
        (
            ["gen", "--tp-all-reduce", "symm-mem"],
            "--tp-all-reduce symm-mem: one rank has nothing to all-reduce",
        ),
        (
            [
                "gen",
                "--tp-all-reduce",
                "symm-mem",
                "--tensor-parallel-size",
                "2",
                "--device",
                "cpu",
            ],
            "--tp-all-reduce symm-mem: CPU ranks sum through the process group (gloo)",
        ),
    ],
)
def test_refused_before_loading(argv, message, capsys):
    assert main(["serve", argv[0], "--model", "tiny-embed", "--port", "0", *argv[1:]]) == 2
    assert message in capsys.readouterr().err


def test_a_token_budget_below_the_models_own_limit_is_refused(capsys):
    argv = ["serve", "embed", "--model", "tiny-embed", "--random-weights", "--device", "cpu"]
    assert main([*argv, "--port", "0", "--max-num-batched-tokens", "10"]) == 2
    err = capsys.readouterr().err
    assert "--max-num-batched-tokens: 10 is less than max_model_len" in err
    assert "whole input per forward" in err
