#!/usr/bin/env bash
# Nsight Compute's full set on the two MoE expert GEMMs at one decode shape, in one call of a
# lent GPU machine: why GEMM1 streams its weights at ~70 % of read bandwidth (docs/kernels.md,
# 2026-12-01) while the same kernel at T=64 reaches ~83 %.
#
#   bash benchmarks/ncu_moe.sh [TOKENS] [TP]      defaults 512 and 1
#
# benchmarks/moe_once.py launches fused_moe 4 times eagerly; ncu skips the first call's two
# `_moe_gemm_kernel` launches (Triton's compile and first use) and profiles the second call's
# GEMM1 and GEMM2 (`--set full`, source lines imported), with `--clock-control none` so that
# the card's clocks stay as they are. Written under $OUT: moe_gemm-T<TOKENS>-tp<TP>.ncu-rep
# (open in Nsight Compute), its details page as text, its raw CSV. Printed last: per launch
# the duration, DRAM throughput, achieved occupancy, registers, shared memory and the warp
# stall reasons ncu ranks first. Nothing here changes clocks, power limits, compute mode or MIG.
set -u
tokens=${1:-512}
tp=${2:-1}
out=${OUT:-/tmp/coserve-ncu-moe}
mkdir -p "$out"
name="$out/moe_gemm-T$tokens-tp$tp"
export PYTHONUNBUFFERED=1

nvidia-smi -L 2>&1
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), started $(date -u +%FT%TZ)"
timeout -k 30 "${NCU_S:-420}" ncu --kernel-name regex:_moe_gemm_kernel --launch-skip 2 \
    --launch-count 2 --set full --import-source yes --clock-control none -f -o "$name" \
    python3 benchmarks/moe_once.py --tokens "$tokens" --tp "$tp" --calls 4 >"$name.log" 2>&1
echo "ncu exit $?, $(date -u +%T)"
ncu --import "$name.ncu-rep" --page details >"$name-details.txt" 2>&1
ncu --import "$name.ncu-rep" --page raw --csv >"$name-raw.csv" 2>&1
grep -E "==ERROR==|==WARNING==" "$name.log" | head -n 5
grep -E "^  _moe_gemm_kernel|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|\
Registers Per Thread|Dynamic Shared Memory Per Block|Block Limit|Warp Cycles Per Issued|\
Stall|stall" "$name-details.txt" | head -n 60
