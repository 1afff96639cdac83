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
            ["gen", "--slo-guard-stat", "p99"],
            "--slo-guard-stat is for serve embed and serve colocated; serve gen would ignore it",
        ),
        (
            ["colocated", "--embed-model", "tiny-embed", "--gen-tpot-slo-pct", "5"],
            "--gen-tpot-slo-ms/--gen-tpot-slo-pct need --slo-guard-gen-url",
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


@pytest.mark.parametrize(
    "argv",
    [
        ["gen", "--port", "70000"],  # was bound as port 70000 % 65536 = 4464
        ["gen", "--port", "-1"],  # was 'cannot listen ... Servname not supported', exit 1
        ["colocated", "--embed-model", "tiny-embed", "--embed-port", "65536"],
        ["colocated", "--embed-model", "tiny-embed", "--embed-port", "-1"],
    ],
)
def test_a_port_outside_0_to_65535_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", argv[0], "--model", "tiny-dense", *argv[1:]])
    assert e.value.code == 2
    assert "port: must be a TCP port in [0, 65535]" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["tpu", "cuda:x", "cuda:", "CPU", "cuda:0 "])
def test_a_device_that_is_not_one_of_the_engines_is_a_usage_error(value, capsys):
    """It was taken for a CUDA device: 'tpu' got 'this machine has no CUDA GPU'."""
    with pytest.raises(SystemExit) as e:
        main(["serve", "gen", "--model", "tiny-dense", "--random-weights", "--device", value])
    assert e.value.code == 2
    assert "--device: expected auto, cpu, cuda or cuda:N" in capsys.readouterr().err


@pytest.mark.parametrize(
    "value", ["cuda:01", "cuda:128", "cuda:256", "cuda:99999999999999999999", "cuda:\u0661"]
)
def test_a_cuda_index_torch_would_misread_is_a_usage_error(value, capsys):
    """They matched cuda:N, and torch then refused them with a traceback ('cuda:01', a
    non-ASCII digit, an index past 2**31) or took them for another device: it keeps the
    index in 8 bits, so cuda:256 served on cuda:0 and cuda:128 on cuda:-128."""
    with pytest.raises(SystemExit) as e:
        main(["serve", "embed", "--model", "tiny-embed", "--random-weights", "--device", value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--device: expected auto, cpu, cuda or cuda:N" in err
    assert repr(value) in err


def test_colocated_refuses_one_port_for_both_endpoints(capsys):
    """Both sockets bound (SO_REUSEADDR) and the second listen failed: a traceback, exit 1."""
    argv = ["serve", "colocated", "--model", "tiny-dense", "--embed-model", "tiny-embed"]
    argv += ["--random-weights", "--device", "cpu", "--port", "18777", "--embed-port", "18777"]
    assert main(argv) == 2
    assert "--embed-port: 18777 is --port too" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--gpu-memory-utilization", "2"], "must be in (0, 1], got 2"),
        (
            ["--slo-guard-gen-url", "http://127.0.0.1:9", "--gen-tpot-slo-pct", "2000"],
            "must be a percentage in (0, 1000], got 2000",
        ),
        (
            ["--slo-guard-gen-url", "http://127.0.0.1:9", "--gen-tpot-slo-pct", "0"],
            "argument --gen-tpot-slo-pct: must be a percentage in (0, 1000], got 0",
        ),
        (
            ["--slo-guard-gen-url", "http://127.0.0.1:9", "--gen-tpot-slo-ms", "-1"],
            "argument --gen-tpot-slo-ms: must be a positive number, got -1",
        ),
    ],
)
def test_an_out_of_range_number_is_refused_with_its_own_range(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "embed", "--model", "tiny-embed", "--port", "0", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("budget", ["5e6", "1e-9"])
def test_a_guard_budget_past_its_bounds_names_the_flag(budget, capsys):
    # it named GuardConfig's field, gen_tpot_slo_ms; 1e-9 ms is below any gen step's time
    argv = ["--slo-guard-gen-url", "http://127.0.0.1:9", "--gen-tpot-slo-ms", budget]
    assert main(["serve", "embed", "--model", "tiny-embed", "--port", "0", *argv]) == 2
    err = capsys.readouterr().err
    assert f"--gen-tpot-slo-ms: must be in [0.1, 3.6e+06] ms, got {float(budget):g}" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tensor-parallel-size", "abc"], "--tensor-parallel-size: must be a positive integer"),
        (["--port", "x"], "--port: must be a TCP port in [0, 65535], got x"),
        (["--max-num-seqs", "1.5"], "--max-num-seqs: must be a positive integer, got 1.5"),
    ],
)
def test_a_flag_that_is_no_number_says_what_it_must_be(argv, message, capsys):
    # argparse named the type function: "invalid positive_int value: 'abc'"
    with pytest.raises(SystemExit) as e:
        main(["serve", "gen", "--model", "tiny-dense", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "invalid" not in err, err


def test_a_request_body_limit_of_zero_is_refused(capsys):
    """aiohttp reads client_max_size 0 as no limit: `--max-request-bytes 0` started a server
    that took bodies of any size."""
    with pytest.raises(SystemExit) as e:
        main(["serve", "embed", "--max-request-bytes", "0"])
    assert e.value.code == 2
    assert "--max-request-bytes: must be at least 1 byte, got '0'" in capsys.readouterr().err


@pytest.mark.parametrize("flag", [["--api-key", ""], ["--served-model-name", " "]])
def test_an_empty_key_or_model_name_is_refused(flag, capsys):
    """`--api-key ''` started a server no client could authenticate to."""
    with pytest.raises(SystemExit) as e:
        main(["serve", "embed", "--model", "tiny-embed", "--port", "0", *flag])
    assert e.value.code == 2
    assert f"argument {flag[0]}: must not be empty" in capsys.readouterr().err


# a key with a byte that is not UTF-8 made every request a 500 (UnicodeEncodeError in the
# key check, a traceback in the log); bench's sent a newline into aiohttp, a traceback
@pytest.mark.parametrize("command", [["serve", "embed", "--model", "tiny-embed"], ["bench"]])
@pytest.mark.parametrize("key", ["k\udcff", "a\nb", "k ", "é"])
def test_an_api_key_no_header_carries_is_refused(command, key, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command, "--api-key", key])
    assert e.value.code == 2
    assert "argument --api-key: must be printable ASCII" in capsys.readouterr().err


def test_an_api_key_variable_no_header_carries_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("COSERVE_API_KEY", "k\x01")
    with pytest.raises(SystemExit) as e:
        main(["serve", "embed", "--model", "tiny-embed"])
    assert e.value.code == 2
    assert "argument --api-key: must be printable ASCII" in capsys.readouterr().err


def test_an_empty_api_key_variable_reads_as_unset(monkeypatch):
    import argparse

    from coserve.server.command import add_arguments

    monkeypatch.setenv("COSERVE_API_KEY", "")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["embed", "--model", "tiny-embed"]).api_key is None


def test_colocated_help_says_which_flags_both_engines_take():
    """`serve colocated --random-weights` gave the embed model random weights too, while the
    help called every flag above the colocated group gen's (a new user's pass, 2026-12-01)."""
    import argparse

    from coserve.cli import build_parser
    from coserve.server.colocated import engine_args

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve = sub.choices["serve"]
    group = next(g for g in serve._action_groups if g.title.startswith("colocated"))
    title = group.description or group.title
    args = serve.parse_args(
        ["colocated", "--model", "tiny-moe", "--embed-model", "all-minilm-l6-v2"]
        + ["--random-weights", "--device", "cpu", "--seed", "7", "--dtype", "float32"]
    )
    embed = vars(engine_args(args)["embed"])
    shared = title.split("the rest,")[1]
    for flag in ("--random-weights", "--device", "--dtype", "--seed"):
        assert embed[flag[2:].replace("-", "_")] == vars(args)[flag[2:].replace("-", "_")]
        assert flag in shared, title
