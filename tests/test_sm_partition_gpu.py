"""sm_partition on a GPU: the two green contexts' streams compute, and (the real check) a kernel
on each reports SM ids (PTX `%smid`) only from its own partition: the two sets are disjoint and
no larger than the counts obtained, while the same kernel on a primary-context stream reaches
more SMs than either. A CUDA graph captured on gen's stream keeps to gen's SMs when replayed.
GPU only; needs cuda-bindings and Triton."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

pytest.importorskip("cuda.bindings.driver", reason="needs cuda-bindings")
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from coserve.server import sm_partition  # noqa: E402

EMBED_SMS, GEN_SMS = 16, 64
SPIN_NS = 50_000  # each program holds its SM this long, so the programs spread over every SM


@triton.jit
def _sm_ids(out_ptr, spin_ns):
    start = tl.inline_asm_elementwise(
        "mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1
    )
    now = start
    while now - start < spin_ns:
        now = tl.inline_asm_elementwise(
            "mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1
        )
    sm = tl.inline_asm_elementwise(
        "mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=False, pack=1
    )
    tl.store(out_ptr + tl.program_id(0), sm)


def _programs() -> int:
    return 8 * torch.cuda.get_device_properties(0).multi_processor_count


def sms_used(stream) -> set[int]:
    """The SM ids the programs of one launch on `stream` ran on."""
    out = torch.full((_programs(),), -1, dtype=torch.int32, device="cuda")
    with torch.cuda.stream(stream):
        _sm_ids[(out.numel(),)](out, SPIN_NS, num_warps=4)
    stream.synchronize()
    ids = out.cpu().tolist()
    assert -1 not in ids, "a program did not run"
    return set(ids)


@pytest.fixture(scope="module")
def part():
    p = sm_partition.split("cuda", EMBED_SMS, GEN_SMS)
    yield p
    p.close()


def test_counts_obtained(part):
    assert part.embed_sms >= EMBED_SMS and part.gen_sms >= GEN_SMS
    assert part.embed_sms + part.gen_sms <= part.total_sms
    assert part.total_sms == torch.cuda.get_device_properties(0).multi_processor_count


def test_both_streams_compute(part):
    a = torch.randn(512, 512, device="cuda")
    b = torch.randn(512, 512, device="cuda")
    want = (a @ b).cpu()
    torch.cuda.synchronize()
    for stream in (part.gen, part.embed):
        with torch.cuda.stream(stream):
            got = a @ b
        stream.synchronize()
        torch.testing.assert_close(got.cpu(), want)


def test_each_stream_keeps_to_its_own_sms(part):
    everywhere = sms_used(torch.cuda.Stream())
    gen, embed = sms_used(part.gen), sms_used(part.embed)
    assert not gen & embed, f"shared SMs {sorted(gen & embed)}"
    assert len(gen) <= part.gen_sms and len(embed) <= part.embed_sms
    # spread over their partitions (so disjointness says something), and the reading is real:
    # the primary context reaches past either partition
    assert len(gen) > part.gen_sms // 2 and len(embed) > part.embed_sms // 2
    assert len(everywhere) > part.gen_sms


def test_a_graph_captured_on_gen_stream_keeps_to_gen_sms(part):
    gen_sms = sms_used(part.gen)  # also compiles the kernel outside the capture
    out = torch.full((_programs(),), -1, dtype=torch.int32, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=part.gen):
        _sm_ids[(out.numel(),)](out, SPIN_NS, num_warps=4)
    with torch.cuda.stream(part.gen):
        graph.replay()
    part.gen.synchronize()
    replayed = set(out.cpu().tolist())
    assert -1 not in replayed
    assert len(replayed) <= part.gen_sms
    assert not replayed & sms_used(part.embed)
    assert len(replayed & gen_sms) > part.gen_sms // 2


def test_counts_that_do_not_fit_name_the_flag():
    total = torch.cuda.get_device_properties(0).multi_processor_count
    with pytest.raises(ValueError, match="^--gen-sms: "):
        sm_partition.split("cuda", EMBED_SMS, total)
    with pytest.raises(ValueError, match="^--embed-sms: "):
        sm_partition.split("cuda", total, None)


def test_close_is_idempotent():
    p = sm_partition.split("cuda", EMBED_SMS, None)
    assert p.gen_sms + p.embed_sms <= p.total_sms
    p.close()
    p.close()
