"""A disjoint split of one GPU's SMs between embed and gen, each a CUDA green context with one
stream, for `coserve serve colocated --embed-sms M --gen-sms N`.

torch's `GreenContext.create(num_sms)` takes a count only, so two of them may share SMs. This
module splits the device ONCE through the CUDA driver API (the cuda-bindings package,
`cuda.bindings.driver`, imported only here and only when asked): `cuDevSmResourceSplitByCount`
with a minimum of one SM cuts the device's SMs into the driver's smallest groups (on compute
capability 9.0, 8 SMs that share a GPC: a 132-SM H200 gave 15 groups, 120 SMs, with
driver 580.159.04 on 2026-11-30);
embed takes the first ceil(M / 8) groups and gen the next ceil(N / 8), so neither can reach
the other's SMs. Counts round UP to whole groups, as torch's `GreenContext.create` rounds
them (`--embed-sms 36` is 40 SMs on Hopper); the driver's remainder goes to neither. Each set
of groups becomes one descriptor (`cuDevResourceGenerateDesc`), one green context
(`cuGreenCtxCreate`) and one non-blocking stream (`cuGreenCtxStreamCreate`: gen's at the
context's highest priority, embed's at its lowest), which torch uses as an
`ExternalStream`. The log line gives the counts obtained.

Lifetime: `SmPartition` holds the green contexts and streams; `close()` destroys them
(`cuStreamDestroy`, `cuGreenCtxDestroy`), to be called once no more work is issued on them
(after both step loops end). Destroying a green context detaches its streams.

CUDA graphs: a kernel node of a graph runs in the context it was captured in, whatever stream
the graph is launched on, so decode graphs captured in the primary context would use every
SM. Gen's graphs must therefore be captured on gen's green-context stream: colocated.py makes
the partition before it loads any model and builds gen with gen's stream current, and
`ModelRunner.capture_graphs` captures on the current stream when that is not the default one.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("coserve.server")


def bindings_problem() -> str | None:
    """Why the driver bindings cannot be imported here, or None."""
    try:
        import cuda.bindings.driver  # noqa: F401
    except ImportError as e:
        return (
            "--gen-sms needs the cuda-bindings package (the CUDA driver API from Python: "
            f"`pip install cuda-bindings`); import cuda.bindings.driver failed: {e}"
        )
    return None


def problem(embed_sms: int | None, device: str) -> str | None:
    """Why `--gen-sms` cannot be given with this `--embed-sms` (None: not given) on `device`
    (cpu, cuda, cuda:N), or None. Needs no GPU: the counts are checked against the device
    where the split is made."""
    if embed_sms is None:
        return (
            "--gen-sms needs --embed-sms: gen's SMs are a set disjoint from embed's green "
            "context of --embed-sms SMs"
        )
    if not device.startswith("cuda"):
        return f"--gen-sms: SM partitions are a CUDA feature; the device is {device}"
    return bindings_problem()


@dataclass(frozen=True)
class SplitPlan:
    """Whole driver groups of `group_sms` SMs each: embed's come first, gen's next."""

    group_sms: int
    embed_groups: int
    gen_groups: int

    @property
    def embed_sms(self) -> int:
        return self.embed_groups * self.group_sms

    @property
    def gen_sms(self) -> int:
        return self.gen_groups * self.group_sms


def plan(groups: int, group_sms: int, embed_sms: int, gen_sms: int | None) -> SplitPlan:
    """How many of the device's `groups` groups of `group_sms` SMs embed and gen get for the
    requested counts (each rounded up to whole groups; gen_sms None: every group embed does
    not take). Raises ValueError naming the flag whose count does not fit."""
    if embed_sms < 1 or (gen_sms is not None and gen_sms < 1):
        raise ValueError("--embed-sms and --gen-sms must be at least 1")
    partitionable = groups * group_sms
    embed = math.ceil(embed_sms / group_sms)
    if embed >= groups:
        raise ValueError(
            f"--embed-sms: {embed_sms} SMs round up to {embed * group_sms} (whole groups of "
            f"{group_sms}) and leave gen none of this GPU's {partitionable} partitionable SMs "
            f"({groups} groups of {group_sms})"
        )
    gen = groups - embed if gen_sms is None else math.ceil(gen_sms / group_sms)
    if embed + gen > groups:
        raise ValueError(
            f"--gen-sms: {gen_sms} SMs ({gen * group_sms} in whole groups of {group_sms}) beside "
            f"--embed-sms {embed_sms} ({embed * group_sms}) need {(embed + gen) * group_sms} SMs; "
            f"this GPU splits into {partitionable} ({groups} groups of {group_sms}), so "
            f"--gen-sms can be at most {(groups - embed) * group_sms} here"
        )
    return SplitPlan(group_sms, embed, gen)


@dataclass
class SmPartition:
    """Two disjoint green contexts of one device and a torch stream on each. `embed_sms` and
    `gen_sms` are the counts obtained (whole driver groups), `total_sms` the device's. The
    driver handles stay here until `close()`; a stream is usable only until then."""

    gen: Any  # torch.cuda.ExternalStream
    embed: Any
    gen_sms: int
    embed_sms: int
    total_sms: int
    _contexts: list = field(default_factory=list, repr=False)
    _streams: list = field(default_factory=list, repr=False)

    def stream(self, role: str) -> Any:
        return {"gen": self.gen, "embed": self.embed}[role]

    def close(self) -> None:
        """Wait for both streams, then destroy them and their green contexts. Idempotent; a
        driver error here is logged (the process is stopping), not raised."""
        from cuda.bindings import driver

        for s in self._streams:
            _log_failure("cuStreamSynchronize", driver.cuStreamSynchronize(s))
            _log_failure("cuStreamDestroy", driver.cuStreamDestroy(s))
        for c in self._contexts:
            _log_failure("cuGreenCtxDestroy", driver.cuGreenCtxDestroy(c))
        self._streams.clear()
        self._contexts.clear()


def _log_failure(call: str, result: tuple) -> None:
    if result[0].value:
        log.warning("colocated: %s: %s", call, result[0].name)


def _call(call: str, *args):
    """driver.`call`(*args) -> its outputs (one value, a tuple, or None). Raises RuntimeError
    naming the call and the driver's error."""
    from cuda.bindings import driver

    err, *out = getattr(driver, call)(*args)
    if err != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"{call}: {getattr(err, 'name', err)}")
    if not out:
        return None
    return out[0] if len(out) == 1 else tuple(out)


def split(device: str, embed_sms: int, gen_sms: int | None) -> SmPartition:
    """Split `device` (cuda or cuda:N) into embed's `embed_sms` and gen's `gen_sms` SMs (None:
    the rest), disjoint, each rounded up to whole driver groups. Raises ValueError (naming
    the flag) when the counts do not fit this device, RuntimeError with the driver's error
    name when the driver refuses a step."""
    import torch
    from cuda.bindings import driver

    dev = torch.device(device)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    torch.cuda.set_device(index)
    torch.zeros(1, device=torch.device("cuda", index))  # the primary context, before green ones
    _call("cuInit", 0)
    cu_dev = _call("cuDeviceGet", index)
    whole = _call(
        "cuDeviceGetDevResource", cu_dev, driver.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM
    )
    total = whole.sm.smCount
    groups, made, _ = _call("cuDevSmResourceSplitByCount", total, whole, 0, 1)
    groups = list(groups)[:made]
    if not groups:
        raise RuntimeError("cuDevSmResourceSplitByCount: no groups")
    p = plan(len(groups), groups[0].sm.smCount, embed_sms, gen_sms)
    sets = {
        "embed": groups[: p.embed_groups],
        "gen": groups[p.embed_groups : p.embed_groups + p.gen_groups],
    }
    least, greatest = _call("cuCtxGetStreamPriorityRange")
    contexts: list = []
    streams: list = []
    out: dict[str, Any] = {}
    try:
        for role, priority in (("embed", least), ("gen", greatest)):
            desc = _call("cuDevResourceGenerateDesc", sets[role], len(sets[role]))
            ctx = _call(
                "cuGreenCtxCreate",
                desc,
                cu_dev,
                driver.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM,
            )
            contexts.append(ctx)
            raw = _call(
                "cuGreenCtxStreamCreate",
                ctx,
                driver.CUstream_flags.CU_STREAM_NON_BLOCKING,
                priority,
            )
            streams.append(raw)
            out[role] = torch.cuda.ExternalStream(int(raw), device=torch.device("cuda", index))
    except BaseException:
        SmPartition(None, None, 0, 0, total, contexts, streams).close()
        raise
    got = {role: sum(r.sm.smCount for r in sets[role]) for role in sets}
    part = SmPartition(out["gen"], out["embed"], got["gen"], got["embed"], total, contexts, streams)
    log.info(
        "SM split of cuda:%d (%d SMs, driver groups of %d): embed %d SMs (asked %d, stream "
        "priority %d), gen %d SMs (asked %s, stream priority %d), disjoint; %d in neither",
        index,
        total,
        p.group_sms,
        part.embed_sms,
        embed_sms,
        least,
        part.gen_sms,
        "the rest" if gen_sms is None else gen_sms,
        greatest,
        total - part.embed_sms - part.gen_sms,
    )
    return part
