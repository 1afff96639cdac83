"""`coserve plan` with numbers no plan can take: a usage error naming the flag (exit 2), not a
ZeroDivisionError traceback, a plan of negative tokens, or a 0 read as "not given"."""

from __future__ import annotations

import pytest

from coserve.cli import main


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--block-size", "0"),  # ZeroDivisionError traceback, exit 1
        ("--gpu-memory-gib", "0"),  # 0 read as not given: planned for an H200
        ("--gpu-memory-gib", "-1"),
        ("--gpu-memory-gib", "nan"),  # 'cannot convert float NaN to integer'
        ("--gen-util", "0"),
        ("--gen-util", "1.5"),
        ("--embed-util", "-0.1"),
        ("--input-len", "0"),  # read as not given: 30
        ("--output-len", "-1"),  # planned requests of 31 tokens
        ("--input-len", "1" + "0" * 20),  # planned at a gpu_memory_utilization of 6.5e13
        ("--output-len", "131073"),  # above MAX_LEN, which bench and the spec refuse
        ("--max-num-seqs", "0"),  # read as not given: 256
        ("--reserve-gib", "-1"),
        ("--reserve-gib", "inf"),
        ("--concurrency", ","),  # ignored: C=512
        ("--concurrency", "0,-1"),  # 'C=-1 needs -544 tokens'
        ("--concurrency", "abc"),  # "invalid literal for int() with base 10: 'abc'"
    ],
)
def test_a_number_no_plan_can_take_is_a_usage_error(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", "--gen", "tiny-dense", "--embed", "none", f"{flag}={value}"])
    assert e.value.code == 2
    assert f"argument {flag}: " in capsys.readouterr().err


def test_concurrencies_are_read_in_order(capsys):
    import json

    argv = ["plan", "--gen", "tiny-dense", "--embed", "none", "--gpu", "h200", "--json"]
    assert main([*argv, "--concurrency", " 8, 64 ,"]) == 0
    assert list(json.loads(capsys.readouterr().out)["concurrency"]) == ["8", "64"]


def test_block_size_with_fleet_is_refused(tmp_path, capsys):
    """It was ignored (its default hid whether it was given), as --concurrency is refused."""
    argv = ["plan", "--fleet", str(tmp_path), "--gen-tok-s", "1", "--embed-seq-s", "1"]
    assert main([*argv, "--block-size", "32"]) == 2
    said = capsys.readouterr()
    assert "--block-size does not go with --fleet" in said.out + said.err
