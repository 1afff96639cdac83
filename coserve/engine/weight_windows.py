"""The window of a full checkpoint tensor that one tensor-parallel rank holds, and how it
is loaded.

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

from coserve.engine.config import QuantConfig
from coserve.engine.kernels.fp8 import FP8_DTYPE, block_dequant


def param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def fusable(out_sizes: Sequence[int], quant: QuantConfig | None) -> bool:
    """FP8 parts can share one weight only if every part but the last starts a scale block."""
    return quant is None or all(o % quant.block[0] == 0 for o in out_sizes[:-1])


Window = tuple[int, int]  # (start, size) along one dimension of a full tensor


def on_edges(w: Window, full: int, block: int) -> bool:
    start, size = w
    return (
        start % block == 0 and start + size <= full and (size % block == 0 or start + size == full)
    )


def window(
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
        if on_edges(rows, full_r, bn) and on_edges(cols, full_c, bk):
            (r0, rn), (c0, cn) = rows, cols
            q = tensor[..., r0 : r0 + rn, c0 : c0 + cn]
            s = scale[..., r0 // bn : cdiv(r0 + rn, bn), c0 // bk : cdiv(c0 + cn, bk)]
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


def random_rows(rows: int, cols: int, std: float, gen: torch.Generator, device, dtype):
    w = torch.empty(rows, cols, device=device, dtype=torch.float32)
    w.normal_(0.0, std, generator=gen)
    return w.to(dtype)


def load_weight(
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
