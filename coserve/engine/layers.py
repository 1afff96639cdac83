"""Building blocks shared by the models: linear layers that hold either plain or FP8
block-quantised weights (several HF projections may be fused into one, e.g. q|k|v), norms,
the vocab-parallel embedding (stacked expert weights: moe_weights.py). Each module knows how
to take its HF tensors (`load_shard`), how to fill itself with random weights
(`init_random`), and what it still misses (`missing`). Under tensor parallelism a module
holds a window of each full HF tensor (weight_windows.py)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from coserve.engine import parallel
from coserve.engine.config import QuantConfig
from coserve.engine.kernels import ops
from coserve.engine.kernels.fp8 import FP8_DTYPE, Fp8Activation, block_dequant, block_quant
from coserve.engine.moe_weights import FusedMoEWeights
from coserve.engine.weight_windows import (
    Window,
    cdiv,
    fusable,
    load_weight,
    on_edges,
    param,
    random_rows,
    window,
)


class Linear(nn.Module):
    """y = x W^T (+ b), W = [part_0; part_1; ...] with one HF projection per part.

    Tensor parallel: `out_shards` gives the rows of each full part this rank holds (column
    parallel); `in_shard` the input columns, and `reduce` sums the ranks' partial outputs
    before the bias is added (row parallel)."""

    def __init__(
        self,
        in_features: int,
        out_sizes: Sequence[int],
        *,
        bias: bool = False,
        quant: QuantConfig | None = None,
        dtype: torch.dtype,
        device,
        out_shards: Sequence[Window] | None = None,
        in_shard: Window | None = None,
        reduce: bool = False,
    ) -> None:
        super().__init__()
        self.full_out, self.full_in = list(out_sizes), in_features
        self.out_shards = list(out_shards) if out_shards else [(0, o) for o in out_sizes]
        self.in_shard = in_shard or (0, in_features)
        self.in_features = self.in_shard[1]
        self.out_sizes = [n for _, n in self.out_shards]
        self.reduce = reduce
        out = sum(self.out_sizes)
        # what one rank would hold, and so what random init draws
        self.ckpt_quant = quant if fusable(self.full_out, quant) else None
        self.quant = self.ckpt_quant
        if self.quant is not None:
            bn, bk = self.quant.block
            if not (
                fusable(self.out_sizes, self.quant)
                and all(
                    on_edges(w, f, bn) for w, f in zip(self.out_shards, self.full_out, strict=True)
                )
                and on_edges(self.in_shard, in_features, bk)
            ):
                self.quant = None
        self.dtype = dtype
        if self.quant is not None:
            bn, bk = self.quant.block
            self.weight = param(torch.empty(out, self.in_features, dtype=FP8_DTYPE, device=device))
            self.weight_scale_inv = param(
                torch.empty(
                    cdiv(out, bn), cdiv(self.in_features, bk), dtype=torch.float32, device=device
                )
            )
        else:
            self.weight = param(torch.empty(out, self.in_features, dtype=dtype, device=device))
            self.weight_scale_inv = None
        self.bias = param(torch.zeros(out, dtype=dtype, device=device)) if bias else None
        self._loaded: set[tuple[str, int]] = set()

    def forward(self, x: torch.Tensor, x_fp8: Fp8Activation | None = None) -> torch.Tensor:
        """`x_fp8`: x already quantised per 1x128 group (from `RMSNorm.prologue`), used by an
        FP8 layer's GEMM instead of quantising x again."""
        if self.reduce and parallel.state().size > 1:
            y = parallel.all_reduce(self._matmul(x, None, x_fp8))
            return y if self.bias is None else y + self.bias
        return self._matmul(x, self.bias, x_fp8)

    def _matmul(
        self, x: torch.Tensor, bias: torch.Tensor | None, x_fp8: Fp8Activation | None
    ) -> torch.Tensor:
        if self.quant is not None:
            return ops.fp8_block_linear(
                x, self.weight, self.weight_scale_inv, self.quant.block, bias, x_fp8
            )
        return nn.functional.linear(x, self.weight, bias)

    def _rows(self, shard: int) -> slice:
        start = sum(self.out_sizes[:shard])
        return slice(start, start + self.out_sizes[shard])

    def load_shard(
        self,
        shard: int,
        kind: str,
        tensor: torch.Tensor,
        scale: torch.Tensor | None = None,
        block: tuple[int, int] | None = None,
    ) -> None:
        """kind "weight" (with scale/block when the checkpoint tensor is FP8) or "bias"; the
        full HF tensor of part `shard`, of which this rank keeps its window."""
        rows = self._rows(shard)
        if kind == "bias":
            tensor, _ = window(tensor, self.out_shards[shard], None)
            self.bias.data[rows] = tensor.to(self.dtype)
        else:
            tensor, scale = window(
                tensor, self.out_shards[shard], self.in_shard, scale, block, self.dtype
            )
            if self.quant is not None and tensor.dtype != FP8_DTYPE:
                self.dequantize_()  # the checkpoint keeps this module unquantised after all
            load_weight(
                self.weight,
                self.weight_scale_inv,
                self.quant,
                rows,
                tensor,
                scale,
                block,
                self.dtype,
            )
        self._loaded.add((kind, shard))

    def init_random(self, gen: torch.Generator, std: float) -> None:
        for shard, full in enumerate(self.full_out):
            w = random_rows(full, self.full_in, std, gen, self.weight.device, self.dtype)
            if self.ckpt_quant is not None:
                q, s = block_quant(w, self.ckpt_quant.block)
                self.load_shard(shard, "weight", q, s, self.ckpt_quant.block)
            else:
                self.load_shard(shard, "weight", w)
            if self.bias is not None:
                self.load_shard(shard, "bias", torch.zeros(full))

    def dequantize_(self) -> None:
        """Replace FP8 weights by their dequantised values (CPU path; same numerics)."""
        if self.quant is not None:
            w = block_dequant(
                self.weight.data, self.weight_scale_inv.data, self.quant.block, self.dtype
            )
            self.weight = param(w)
            self.weight_scale_inv, self.quant = None, None

    def missing(self) -> list[str]:
        kinds = ["weight"] + (["bias"] if self.bias is not None else [])
        return [
            f"{k}[{s}]"
            for k in kinds
            for s in range(len(self.out_sizes))
            if (k, s) not in self._loaded
        ]


class Tensors(nn.Module):
    """Plain parameters loaded one to one (norm weights, embeddings, biases), or a window of
    rows of one (a vocab-parallel embedding table)."""

    def __init__(self) -> None:
        super().__init__()
        self._loaded: set[str] = set()
        self._init: dict[str, str] = {}
        self._full: dict[str, tuple[int, ...]] = {}
        self._rows: dict[str, Window] = {}

    def add(
        self,
        name: str,
        shape: Sequence[int],
        init: str,
        *,
        dtype,
        device,
        rows: Window | None = None,
    ) -> None:
        """init: "ones", "zeros" or "normal"; `shape` in full, of which this rank keeps
        `rows` (all by default)."""
        local = (rows[1], *shape[1:]) if rows else tuple(shape)
        self.register_parameter(name, param(torch.empty(*local, dtype=dtype, device=device)))
        self._init[name] = init
        self._full[name] = tuple(shape)
        self._rows[name] = rows or (0, shape[0])

    def load(self, name: str, tensor: torch.Tensor) -> None:
        p = getattr(self, name)
        if tuple(tensor.shape) != self._full[name]:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} != {self._full[name]}")
        if tensor.dim() > 1:
            tensor, _ = window(tensor, self._rows[name], None)
        p.data.copy_(tensor.to(device=p.device, dtype=p.dtype))
        self._loaded.add(name)

    def init_random(self, gen: torch.Generator, std: float) -> None:
        for name, how in self._init.items():
            p = getattr(self, name)
            shape = self._full[name]
            if how == "normal":
                w = torch.empty(shape, dtype=torch.float32, device=p.device)
                self.load(name, w.normal_(0.0, std, generator=gen))
            else:
                fill = torch.ones if how == "ones" else torch.zeros
                self.load(name, fill(shape, dtype=p.dtype, device=p.device))

    def missing(self) -> list[str]:
        return [n for n in self._init if n not in self._loaded]


class RMSNorm(Tensors):
    def __init__(self, dim: int, eps: float, *, dtype, device) -> None:
        super().__init__()
        self.eps = eps
        self.add("weight", (dim,), "ones", dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """rms_norm(x); with a residual stream, (rms_norm(x + residual), x + residual)."""
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.fused_add_rms_norm(x, residual, self.weight, self.eps)

    def prologue(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        fp8: bool,
        column_major_scales: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, Fp8Activation | None]:
        """The norm before a layer: (y, r, y_fp8) with r = x + residual (x without one) and
        y = rms_norm(r). With `fp8` (an FP8 layer follows) y_fp8 is y quantised for it in the
        same launch on the GPU, its scales column-major (a `Linear`'s cuBLAS GEMM) or not
        (the MoE's); None from the references, whose FP8 layers compute in y's dtype, and
        without `fp8`."""
        if fp8:
            return ops.rms_norm_quant(x, residual, self.weight, self.eps, column_major_scales)
        if residual is None:
            return self(x), x, None
        return (*self(x, residual), None)


class LayerNorm(Tensors):
    def __init__(self, dim: int, eps: float, *, dtype, device) -> None:
        super().__init__()
        self.eps = eps
        self.add("weight", (dim,), "ones", dtype=dtype, device=device)
        self.add("bias", (dim,), "zeros", dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


def vocab_parallel_embedding(ids: torch.Tensor, rows: torch.Tensor, start: int) -> torch.Tensor:
    """Embedding lookup in this rank's rows [start, start + len(rows)) of the table, zeros
    for ids held elsewhere, summed over ranks (no host sync: CUDA-graph safe)."""
    if parallel.state().size == 1:
        return nn.functional.embedding(ids, rows)
    local = ids - start
    outside = (local < 0) | (local >= rows.shape[0])
    h = nn.functional.embedding(local.masked_fill(outside, 0), rows)
    return parallel.all_reduce(h.masked_fill(outside[:, None], 0))


def init_random(model: nn.Module, gen: torch.Generator, std: float = 0.02) -> None:
    """Fill every loadable module with random weights (normal(0, std); norms ones)."""
    for m in model.modules():
        if isinstance(m, Linear | FusedMoEWeights | Tensors):
            m.init_random(gen, std)


def dequantize_model_(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, Linear | FusedMoEWeights):
            m.dequantize_()


def tile_expert_weights_(model: nn.Module) -> None:
    """Expert weights tile by tile for the Triton MoE (FusedMoEWeights.tile_)."""
    for m in model.modules():
        if isinstance(m, FusedMoEWeights):
            m.tile_()


def missing_weights(model: nn.Module) -> list[str]:
    out = []
    for name, m in model.named_modules():
        if isinstance(m, Linear | FusedMoEWeights | Tensors):
            out += [f"{name}.{x}" for x in m.missing()]
    return out
