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
        ("--concurrency", "8,99999999999999999999"),  # '...% of the KV cache' of 20 digits
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


# an embedding model as gen planned a KV cache of 0 B/token and advised raising
# gpu_memory_utilization (no fraction could help); a generative one as embed was planned as is
@pytest.mark.parametrize(
    "args, said",
    [
        (["--gen", "all-minilm-l6-v2"], "--gen 'all-minilm-l6-v2' is an embedding model, not a"),
        (["--embed", "tiny-moe"], "--embed 'tiny-moe' is a generative model, not an embedding"),
        (["--gen", "BERT_DIR"], "is an encoder: it has no KV cache, it can only embed"),
    ],
)
def test_a_model_of_the_other_kind_is_refused(args, said, tmp_path, capsys):
    import json

    from coserve.engine.presets import hf_config

    (tmp_path / "config.json").write_text(json.dumps(hf_config("all-minilm-l6-v2")))
    args = [str(tmp_path) if a == "BERT_DIR" else a for a in args]
    assert main(["plan", "--gpu", "h200", *args]) == 2
    assert said in " ".join(capsys.readouterr().out.split())
