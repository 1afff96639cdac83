"""FP8 block quantisation as the Qwen3-*-FP8 checkpoints store it.

A weight W [N, K] is cut into blocks of 128 x 128 (the last row/column blocks may be
smaller). Each block b keeps float8_e4m3fn values q and one float32 `weight_scale_inv`
s_b so that W ~= q * s_b. Quantising picks s_b = max|W_b| / 448 (448 = largest e4m3
value). Expert weights carry a leading expert dimension: W [E, N, K], s [E, ceil(N/bn),
ceil(K/bk)].

`fp8_block_linear` is the plain-torch reference of the block-scaled GEMM: dequantise, then
matmul in the activation dtype. A Triton/CUTLASS twin with the same signature replaces it on
Hopper."""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0


@dataclass(frozen=True)
class Fp8Activation:
    """Activations x [M, K] quantised per token and group of 128 channels, as the FP8 GEMMs
    take them: `values` float8_e4m3fn [M, K] and `scales` float32 [M, K/128] (any strides),
    x[m, k] ~= values[m, k] * scales[m, k // 128]. A kernel that already writes x (a norm:
    `rms_norm_quant`) hands this to the GEMM after it, which then skips its own quantisation
    launch."""

    values: torch.Tensor
    scales: torch.Tensor

    def check_stands_for(self, rows: int, cols: int) -> None:
        """Raises ValueError unless `values` is [rows, cols], the shape of the x it replaces."""
        if self.values.shape != (rows, cols):
            raise ValueError(
                f"x_fp8 holds {tuple(self.values.shape)} values for x of {(rows, cols)}"
            )


def _expand_scales(scale: torch.Tensor, shape: torch.Size, block: tuple[int, int]) -> torch.Tensor:
    """Repeat each block scale over its block and crop to the weight's shape."""
    bn, bk = block
    n, k = shape[-2], shape[-1]
    s = scale.repeat_interleave(bn, dim=-2).repeat_interleave(bk, dim=-1)
    return s[..., :n, :k]


def block_dequant(
    q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """W = q * s (per block), returned in `dtype`. Works on [N, K] and [E, N, K]."""
    w = q.to(torch.float32) * _expand_scales(scale.to(torch.float32), q.shape, block)
    return w.to(dtype)


def block_quant(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """W -> (q float8_e4m3fn, weight_scale_inv float32) with one scale per block."""
    bn, bk = block
    *lead, n, k = w.shape
    nb, kb = -(-n // bn), -(-k // bk)
    padded = torch.zeros(*lead, nb * bn, kb * bk, dtype=torch.float32, device=w.device)
    padded[..., :n, :k] = w.to(torch.float32)
    blocks = padded.view(*lead, nb, bn, kb, bk)
    amax = blocks.abs().amax(dim=(-3, -1))  # [..., nb, kb]
    scale = (amax / FP8_MAX).clamp(min=1e-12)
    q = (blocks / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.view(*lead, nb * bn, kb * bk)[..., :n, :k].to(FP8_DTYPE)
    return q.contiguous(), scale


def fp8_block_linear(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    block: tuple[int, int],
    bias: torch.Tensor | None = None,
    x_fp8: Fp8Activation | None = None,
) -> torch.Tensor:
    """y = x @ dequant(q, scale)^T (+ bias), computed in x's dtype (reference). `x_fp8`, x
    already quantised, is for the twin; the reference computes from x and ignores it."""
    w = block_dequant(q, scale, block, x.dtype)
    return torch.nn.functional.linear(x, w, bias)
