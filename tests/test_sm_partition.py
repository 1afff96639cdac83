"""sm_partition without a GPU: how requested SM counts map onto the driver's groups, the
refusals that name the flag, and the refusal where the driver bindings are missing."""

from __future__ import annotations

import sys

import pytest

from coserve.server import sm_partition
from coserve.server.sm_partition import SplitPlan, plan

# A device of 16 driver groups of 8 SMs (an H200 with driver 580.159.04 gave 15: the plan's
# arithmetic is the same).
GROUPS_16 = (16, 8)


def test_counts_round_up_to_whole_groups():
    p = plan(*GROUPS_16, embed_sms=36, gen_sms=88)
    assert p == SplitPlan(group_sms=8, embed_groups=5, gen_groups=11)
    assert (p.embed_sms, p.gen_sms) == (40, 88)
    assert plan(*GROUPS_16, embed_sms=16, gen_sms=64) == SplitPlan(8, 2, 8)
    assert plan(*GROUPS_16, embed_sms=1, gen_sms=1) == SplitPlan(8, 1, 1)


def test_gen_without_a_count_takes_every_group_embed_does_not():
    assert plan(*GROUPS_16, embed_sms=36, gen_sms=None) == SplitPlan(8, 5, 11)


def test_gen_sms_that_do_not_fit_beside_embed_name_the_flag_and_the_most_that_fits():
    with pytest.raises(ValueError) as e:
        plan(*GROUPS_16, embed_sms=36, gen_sms=96)
    msg = str(e.value)
    assert msg.startswith("--gen-sms: 96 SMs")
    assert "--embed-sms 36 (40)" in msg
    assert "--gen-sms can be at most 88 here" in msg


def test_embed_sms_that_leave_gen_nothing_name_the_flag():
    with pytest.raises(ValueError, match=r"^--embed-sms: 121 SMs round up to 128"):
        plan(*GROUPS_16, embed_sms=121, gen_sms=None)
    with pytest.raises(ValueError, match=r"^--embed-sms: 128 SMs"):
        plan(*GROUPS_16, embed_sms=128, gen_sms=8)


def test_counts_below_one_are_refused():
    with pytest.raises(ValueError, match="at least 1"):
        plan(*GROUPS_16, embed_sms=0, gen_sms=8)
    with pytest.raises(ValueError, match="at least 1"):
        plan(*GROUPS_16, embed_sms=8, gen_sms=0)


def test_problem_names_what_is_missing(monkeypatch):
    assert sm_partition.problem(None, "cuda").startswith("--gen-sms needs --embed-sms")
    assert sm_partition.problem(32, "cpu") == (
        "--gen-sms: SM partitions are a CUDA feature; the device is cpu"
    )
    # a None entry in sys.modules makes the import fail, as a missing package does
    monkeypatch.setitem(sys.modules, "cuda.bindings.driver", None)
    why = sm_partition.problem(32, "cuda:0")
    assert why.startswith("--gen-sms needs the cuda-bindings package")
    assert "import cuda.bindings.driver failed" in why
