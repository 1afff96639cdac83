"""Building blocks shared by the models: linear layers that hold either plain or FP8
block-quantised weights (several HF projections may be fused into one, e.g. q|k|v),
stacked expert weights, norms. Each module knows how to take its HF tensors
(`load_shard`), how to fill itself with random weights (`init_random`), and what it still
misses (`missing`).

Under tensor parallelism a module holds a window of each full HF tensor: rows of each part
(column parallel), columns (row parallel, whose partial sums are all-reduced), or rows of an
embedding table. Loading cuts the window out of the full tensor; random init draws the full
tensor, exactly as one rank would, and cuts it, so every tensor-parallel size holds the same
weights. FP8 windows that start and end on scale-block edges stay FP8 with their scales;
others are dequantised exactly (each value times its own block's scale) and held plain."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from coserve.engine import parallel
from coserve.engine.config import QuantConfig
from coserve.engine.kernels import ops
from coserve.engine.kernels.fp8 import FP8_DTYPE, block_dequant, block_quant


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _fusable(out_sizes: Sequence[int], quant: QuantConfig | None) -> bool:
    """FP8 parts can share one weight only if every part but the last starts a scale block."""
    return quant is None or all(o % quant.block[0] == 0 for o in out_sizes[:-1])


Window = tuple[int, int]  # (start, size) along one dimension of a full tensor


def _on_edges(w: Window, full: int, block: int) -> bool:
    start, size = w
    return (
        start % block == 0 and start + size <= full and (size % block == 0 or start + size == full)
    )


def _window(
    tensor: torch.Tensor,
    rows: Window | None,
    cols: Window | None,
    scale: torch.Tensor | None = None,
    block: tuple[int, int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The rows x cols window (dims -2 and -1; a 1-d tensor has rows only) of a full
    checkpoint tensor, with its block scales when it is FP8 and the window lies on block
    edges, else dequantised. Rows past the tensor's end read as zeros."""
    full_r = tensor.shape[-2] if tensor.dim() > 1 else tensor.shape[-1]
    full_c = tensor.shape[-1] if tensor.dim() > 1 else None
    rows = rows or (0, full_r)
    if tensor.dim() > 1:
        cols = cols or (0, full_c)
        if rows == (0, full_r) and cols == (0, full_c):
            return tensor, scale
    elif rows == (0, full_r):
        return tensor, scale
    if scale is not None:
        bn, bk = block
        if _on_edges(rows, full_r, bn) and _on_edges(cols, full_c, bk):
            (r0, rn), (c0, cn) = rows, cols
            q = tensor[..., r0 : r0 + rn, c0 : c0 + cn]
            s = scale[..., r0 // bn : _cdiv(r0 + rn, bn), c0 // bk : _cdiv(c0 + cn, bk)]
            return q, s
        tensor = block_dequant(tensor, scale, block, dtype)
    r0, rn = rows
    have = max(0, min(rn, full_r - r0))
    if tensor.dim() == 1:
        out = tensor.new_zeros(rn)
        out[:have] = tensor[r0 : r0 + have]
        return out, None
    c0, cn = cols
    out = tensor.new_zeros(*tensor.shape[:-2], rn, cn)
    out[..., :have, :] = tensor[..., r0 : r0 + have, c0 : c0 + cn]
    return out, None


def _random_rows(rows: int, cols: int, std: float, gen: torch.Generator, device, dtype):
    w = torch.empty(rows, cols, device=device, dtype=torch.float32)
    w.normal_(0.0, std, generator=gen)
    return w.to(dtype)


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
        self.ckpt_quant = quant if _fusable(self.full_out, quant) else None
        self.quant = self.ckpt_quant
        if self.quant is not None:
            bn, bk = self.quant.block
            if not (
                _fusable(self.out_sizes, self.quant)
                and all(
                    _on_edges(w, f, bn) for w, f in zip(self.out_shards, self.full_out, strict=True)
                )
                and _on_edges(self.in_shard, in_features, bk)
            ):
                self.quant = None
        self.dtype = dtype
        if self.quant is not None:
            bn, bk = self.quant.block
            self.weight = _param(torch.empty(out, self.in_features, dtype=FP8_DTYPE, device=device))
            self.weight_scale_inv = _param(
                torch.empty(
                    _cdiv(out, bn), _cdiv(self.in_features, bk), dtype=torch.float32, device=device
                )
            )
        else:
            self.weight = _param(torch.empty(out, self.in_features, dtype=dtype, device=device))
            self.weight_scale_inv = None
        self.bias = _param(torch.zeros(out, dtype=dtype, device=device)) if bias else None
        self._loaded: set[tuple[str, int]] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reduce and parallel.state().size > 1:
            y = parallel.all_reduce(self._matmul(x, None))
            return y if self.bias is None else y + self.bias
        return self._matmul(x, self.bias)

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.quant is not None:
            return ops.fp8_block_linear(
                x, self.weight, self.weight_scale_inv, self.quant.block, bias
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
            tensor, _ = _window(tensor, self.out_shards[shard], None)
            self.bias.data[rows] = tensor.to(self.dtype)
        else:
            tensor, scale = _window(
                tensor, self.out_shards[shard], self.in_shard, scale, block, self.dtype
            )
            if self.quant is not None and tensor.dtype != FP8_DTYPE:
                self.dequantize_()  # the checkpoint keeps this module unquantised after all
            _load_weight(
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
            w = _random_rows(full, self.full_in, std, gen, self.weight.device, self.dtype)
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
            self.weight = _param(w)
            self.weight_scale_inv, self.quant = None, None

    def missing(self) -> list[str]:
        kinds = ["weight"] + (["bias"] if self.bias is not None else [])
        return [
            f"{k}[{s}]"
            for k in kinds
            for s in range(len(self.out_sizes))
            if (k, s) not in self._loaded
        ]


def _load_weight(
    weight: torch.Tensor,
    scale_param: torch.Tensor | None,
    quant: QuantConfig | None,
    rows: slice,
    tensor: torch.Tensor,
    scale: torch.Tensor | None,
    block: tuple[int, int] | None,
    dtype: torch.dtype,
) -> None:
    """Copy one checkpoint tensor into rows of `weight` (dim -2). FP8 tensors stay FP8 when
    the layer keeps FP8, else they are dequantised; plain tensors into an FP8 layer are an
    error (the checkpoint and the layer disagree on what is quantised)."""
    if tensor.shape[-2] != rows.stop - rows.start or tensor.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"shape {tuple(tensor.shape)} does not fit rows {rows} of {tuple(weight.shape)}"
        )
    is_fp8 = tensor.dtype == FP8_DTYPE
    if is_fp8 and scale is None:
        raise ValueError("FP8 weight without weight_scale_inv")
    if quant is not None:
        if not is_fp8:
            raise ValueError("checkpoint weight is not FP8 but the layer is FP8-quantised")
        if tuple(block) != tuple(quant.block):
            raise ValueError(f"checkpoint block {block} != layer block {quant.block}")
        bn = quant.block[0]
        weight.data[..., rows, :] = tensor.to(weight.device)
        scale_rows = slice(rows.start // bn, rows.start // bn + scale.shape[-2])
        scale_param.data[..., scale_rows, :] = scale.to(torch.float32).to(weight.device)
    elif is_fp8:
        weight.data[..., rows, :] = block_dequant(
            tensor.to(weight.device), scale.to(weight.device), block, dtype
        )
    else:
        weight.data[..., rows, :] = tensor.to(device=weight.device, dtype=dtype)


class FusedMoEWeights(nn.Module):
    """Stacked expert weights: w13 [E, 2I, H] (gate rows, then up rows), w2 [E, H, I].
    Tensor parallel: each rank holds the `inter_shard` window of every expert's intermediate
    dimension (rows of gate and up, columns of down), or (expert parallel) the whole experts
    of `expert_shard` (E of them from the first); the caller all-reduces the output."""

    def __init__(
        self,
        num_experts: int,
        hidden: int,
        inter: int,
        *,
        quant: QuantConfig | None,
        dtype: torch.dtype,
        device,
        inter_shard: Window | None = None,
        expert_shard: Window | None = None,
    ) -> None:
        super().__init__()
        self.inter_shard = inter_shard or (0, inter)
        self.expert_shard = expert_shard or (0, num_experts)
        self.num_experts, self.hidden, self.full_inter = num_experts, hidden, inter
        num_experts = self.expert_shard[1]
        self.inter = inter = self.inter_shard[1]
        self.ckpt_quant = quant if _fusable([self.full_inter] * 2, quant) else None
        self.quant = self.ckpt_quant
        if self.quant is not None:
            bn, bk = self.quant.block
            if not (
                _fusable([inter, inter], self.quant)
                and _on_edges(self.inter_shard, self.full_inter, bn)
                and _on_edges(self.inter_shard, self.full_inter, bk)
            ):
                self.quant = None
        self.dtype = dtype
        wdtype = FP8_DTYPE if self.quant is not None else dtype
        self.w13 = _param(torch.empty(num_experts, 2 * inter, hidden, dtype=wdtype, device=device))
        self.w2 = _param(torch.empty(num_experts, hidden, inter, dtype=wdtype, device=device))
        self.w13_scale = self.w2_scale = None
        if self.quant is not None:
            bn, bk = self.quant.block
            self.w13_scale = _param(
                torch.empty(
                    num_experts,
                    _cdiv(2 * inter, bn),
                    _cdiv(hidden, bk),
                    dtype=torch.float32,
                    device=device,
                )
            )
            self.w2_scale = _param(
                torch.empty(
                    num_experts,
                    _cdiv(hidden, bn),
                    _cdiv(inter, bk),
                    dtype=torch.float32,
                    device=device,
                )
            )
        self._loaded: set[tuple[int, str]] = set()

    def load_expert(
        self,
        expert: int,
        part: str,
        tensor: torch.Tensor,
        scale: torch.Tensor | None = None,
        block: tuple[int, int] | None = None,
    ) -> None:
        """part: "gate", "up" or "down" of one expert ([I, H], [I, H], [H, I]), in full (an
        expert another rank holds is skipped)."""
        self._loaded.add((expert, part))
        expert -= self.expert_shard[0]
        if not 0 <= expert < self.expert_shard[1]:
            return
        if part == "down":
            tensor, scale = _window(tensor, None, self.inter_shard, scale, block, self.dtype)
            w, s, rows = self.w2, self.w2_scale, slice(0, self.hidden)
        else:
            tensor, scale = _window(tensor, self.inter_shard, None, scale, block, self.dtype)
            off = 0 if part == "gate" else self.inter
            w, s, rows = self.w13, self.w13_scale, slice(off, off + self.inter)
        if self.quant is not None and tensor.dtype != FP8_DTYPE:
            self.dequantize_()
            w, s = (self.w2, None) if part == "down" else (self.w13, None)
        _load_weight(
            w[expert],
            None if s is None else s[expert],
            self.quant,
            rows,
            tensor,
            scale,
            block,
            self.dtype,
        )

    def init_random(self, gen: torch.Generator, std: float) -> None:
        full = self.full_inter
        shapes = {
            "gate": (full, self.hidden),
            "up": (full, self.hidden),
            "down": (self.hidden, full),
        }
        first, held = self.expert_shard
        for e in range(self.num_experts):
            for part, (r, c) in shapes.items():
                # drawn for every expert, so that each holds what one rank would
                w = _random_rows(r, c, std, gen, self.w13.device, self.dtype)
                if not first <= e < first + held:
                    self._loaded.add((e, part))
                elif self.ckpt_quant is not None:
                    q, s = block_quant(w, self.ckpt_quant.block)
                    self.load_expert(e, part, q, s, self.ckpt_quant.block)
                else:
                    self.load_expert(e, part, w)

    def dequantize_(self) -> None:
        if self.quant is not None:
            b = self.quant.block
            self.w13 = _param(block_dequant(self.w13.data, self.w13_scale.data, b, self.dtype))
            self.w2 = _param(block_dequant(self.w2.data, self.w2_scale.data, b, self.dtype))
            self.w13_scale = self.w2_scale = self.quant = None

    def missing(self) -> list[str]:
        return [
            f"experts.{e}.{p}"
            for e in range(self.num_experts)
            for p in ("gate", "up", "down")
            if (e, p) not in self._loaded
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
        self.register_parameter(name, _param(torch.empty(*local, dtype=dtype, device=device)))
        self._init[name] = init
        self._full[name] = tuple(shape)
        self._rows[name] = rows or (0, shape[0])

    def load(self, name: str, tensor: torch.Tensor) -> None:
        p = getattr(self, name)
        if tuple(tensor.shape) != self._full[name]:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} != {self._full[name]}")
        if tensor.dim() > 1:
            tensor, _ = _window(tensor, self._rows[name], None)
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


def missing_weights(model: nn.Module) -> list[str]:
    out = []
    for name, m in model.named_modules():
        if isinstance(m, Linear | FusedMoEWeights | Tensors):
            out += [f"{name}.{x}" for x in m.missing()]
    return out
