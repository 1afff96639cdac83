"""Stacked expert weights of a MoE layer, plain or FP8 block-quantised, whole or a
tensor-parallel window (weight_windows.py)."""

from __future__ import annotations

import torch
from torch import nn

from coserve.engine.config import QuantConfig
from coserve.engine.kernels import expert_layout
from coserve.engine.kernels.fp8 import FP8_DTYPE, block_dequant, block_quant
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


class FusedMoEWeights(nn.Module):
    """Stacked expert weights: w13 [E, 2I, H] (gate rows, then up rows), w2 [E, H, I].
    Tensor parallel: each rank holds the `inter_shard` window of every expert's intermediate
    dimension (rows of gate and up, columns of down), or (expert parallel) the whole experts
    of `expert_shard` (E of them from the first); the caller all-reduces the output. Once
    loaded, `tile_()` may store FP8 weights tile by tile for the Triton MoE
    (kernels/expert_layout.py); nothing loads into them after that."""

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
        self.ckpt_quant = quant if fusable([self.full_inter] * 2, quant) else None
        self.quant = self.ckpt_quant
        if self.quant is not None:
            bn, bk = self.quant.block
            if not (
                fusable([inter, inter], self.quant)
                and on_edges(self.inter_shard, self.full_inter, bn)
                and on_edges(self.inter_shard, self.full_inter, bk)
            ):
                self.quant = None
        self.dtype = dtype
        wdtype = FP8_DTYPE if self.quant is not None else dtype
        self.w13 = param(torch.empty(num_experts, 2 * inter, hidden, dtype=wdtype, device=device))
        self.w2 = param(torch.empty(num_experts, hidden, inter, dtype=wdtype, device=device))
        self.w13_scale = self.w2_scale = None
        if self.quant is not None:
            bn, bk = self.quant.block
            self.w13_scale = param(
                torch.empty(
                    num_experts,
                    cdiv(2 * inter, bn),
                    cdiv(hidden, bk),
                    dtype=torch.float32,
                    device=device,
                )
            )
            self.w2_scale = param(
                torch.empty(
                    num_experts,
                    cdiv(hidden, bn),
                    cdiv(inter, bk),
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
        expert another rank holds is skipped). Raises RuntimeError once the weights are tiled."""
        if expert_layout.is_tiled(self.w13) or expert_layout.is_tiled(self.w2):
            raise RuntimeError("expert weights are stored tiled: load them before tile_()")
        self._loaded.add((expert, part))
        expert -= self.expert_shard[0]
        if not 0 <= expert < self.expert_shard[1]:
            return
        if part == "down":
            tensor, scale = window(tensor, None, self.inter_shard, scale, block, self.dtype)
            w, s, rows = self.w2, self.w2_scale, slice(0, self.hidden)
        else:
            tensor, scale = window(tensor, self.inter_shard, None, scale, block, self.dtype)
            off = 0 if part == "gate" else self.inter
            w, s, rows = self.w13, self.w13_scale, slice(off, off + self.inter)
        if self.quant is not None and tensor.dtype != FP8_DTYPE:
            self.dequantize_()
            w, s = (self.w2, None) if part == "down" else (self.w13, None)
        load_weight(
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
                w = random_rows(r, c, std, gen, self.w13.device, self.dtype)
                if not first <= e < first + held:
                    self._loaded.add((e, part))
                elif self.ckpt_quant is not None:
                    q, s = block_quant(w, self.ckpt_quant.block)
                    self.load_expert(e, part, q, s, self.ckpt_quant.block)
                else:
                    self.load_expert(e, part, w)

    def tile_(self) -> None:
        """Store FP8 weights tile by tile where expert_layout says so and their shape divides
        into its tiles (a TP window of 128-multiples does); 16-bit weights stay row-major."""
        if self.quant is None or tuple(self.quant.block) != expert_layout.TILE:
            return
        if expert_layout.TILED_W13 and expert_layout.tiles_fit(self.w13, split_n=self.inter):
            self.w13 = param(expert_layout.tile_experts(self.w13.data))
        if expert_layout.TILED_W2 and expert_layout.tiles_fit(self.w2):
            self.w2 = param(expert_layout.tile_experts(self.w2.data))

    def dequantize_(self) -> None:
        if self.quant is not None:
            b = self.quant.block
            w13, w2 = (expert_layout.untile_experts(w.data) for w in (self.w13, self.w2))
            self.w13 = param(block_dequant(w13, self.w13_scale.data, b, self.dtype))
            self.w2 = param(block_dequant(w2, self.w2_scale.data, b, self.dtype))
            self.w13_scale = self.w2_scale = self.quant = None

    def missing(self) -> list[str]:
        return [
            f"experts.{e}.{p}"
            for e in range(self.num_experts)
            for p in ("gate", "up", "down")
            if (e, p) not in self._loaded
        ]
