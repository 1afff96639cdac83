#!/usr/bin/env bash
# The GPU test files and the kernel sweeps in one call of a lent GPU machine: what to run first
# after kernel or engine changes that no GPU has seen.
#
#   bash benchmarks/kernels_device.sh [TEST_FILES] [SWEEPS]
#       TEST_FILES  default: the engine's and the kernels' GPU tests (the 2-GPU ones skip
#                   themselves on one GPU; 217 s for most of them on two H200s, 2026-11-30)
#       SWEEPS      default attn,moe: benchmarks/kernels.py --only SWEEPS, once at TP=1 shapes
#                   and once at one TP=2 rank's
#
# PYTEST_K, if set, selects tests by pytest's -k expression ("moe or tma"): the file list
# splits on spaces, so an expression cannot travel inside TEST_FILES.
#
# Each part runs under its own time limit (TESTS_S, default 300; SWEEP_S, default 120 per
# sweep), so a hang in one still leaves the others' figures. Written under $OUT: pytest.log,
# kernels-tp1.log/.json, kernels-tp2.log/.json. Printed last: the pytest summary and each
# sweep's kernel lines. NVLink multicast stays off (NCCL_NVLS_ENABLE=0 and friends), as in
# every process coserve starts. Nothing here changes clocks, power limits, compute mode or MIG.
set -u
tests=${1:-tests/test_kernels_gpu.py tests/test_engine_gpu.py \
    tests/test_engine_tp_gpu.py tests/test_engine_tp_server_gpu.py}
sweeps=${2:-attn,moe}
out=${OUT:-/tmp/coserve-kernels}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1

nvidia-smi -L 2>&1
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), started $(date -u +%FT%TZ)"
select=()
if [ -n "${PYTEST_K:-}" ]; then select=(-k "$PYTEST_K"); fi
# shellcheck disable=SC2086  # the file list splits on purpose
timeout -k 30 "${TESTS_S:-300}" python3 -m pytest -q -rs $tests "${select[@]}" \
    >"$out/pytest.log" 2>&1
echo "pytest exit $?, $(date -u +%T)"
for tp in 1 2; do
    PYTHONPATH=. timeout -k 30 "${SWEEP_S:-120}" python3 benchmarks/kernels.py --only "$sweeps" \
        --tp "$tp" --json "$out/kernels-tp$tp.json" >"$out/kernels-tp$tp.log" 2>&1
    echo "kernels.py --tp $tp exit $?, $(date -u +%T)"
done
echo "== pytest"
grep -E "^(FAILED|ERROR)| (passed|failed|skipped|error)" "$out/pytest.log" | tail -n 15
for tp in 1 2; do
    echo "== kernels, TP=$tp shapes (its unindented rows; sweeps in the log)"
    grep -E "^[a-z_]" "$out/kernels-tp$tp.log" | tail -n 25
done
