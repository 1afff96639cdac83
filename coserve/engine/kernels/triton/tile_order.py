"""The order in which a GEMM's programs take their output tiles, shared by the Triton GEMMs."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program `pid`: programs walk GROUP_M M-blocks down one column of N
    tiles before the next column, so that programs running side by side share their B tiles
    (the expert's weights, for the MoE GEMMs) in L2 ("grouped ordering", Triton's matrix
    multiplication tutorial). The last group holds the M-blocks left over."""
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    gm = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % group) % gm, (pid % group) // gm
