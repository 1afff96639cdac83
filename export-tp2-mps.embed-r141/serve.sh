#!/usr/bin/env bash
# coserve export: condition 'tp2-mps.embed-r141' of spec 'seed-tp2-equal-work' (strategy tp, sharing mps); run with: bash serve.sh
# tp2-mps with embed rate 141 req/s
# note: gen serves random weights (--random-weights), as the condition was measured; preset 'qwen3-30b-a3b' ships no weights, so the built-in server has none to load (drop random_weights in the spec and export with --engine vllm to serve its checkpoint Qwen/Qwen3-30B-A3B-FP8)
# note: embed serves random weights (--random-weights), as the condition was measured; preset 'qwen3-embedding-8b' ships no weights, so the built-in server has none to load (drop random_weights in the spec and export with --engine vllm to serve its checkpoint Qwen/Qwen3-Embedding-8B)
# HOST: the address every server binds. 127.0.0.1 (the default) serves this machine only;
# HOST=0.0.0.0 bash serve.sh exposes the servers on every interface, to anyone who can reach
# the machine (they have no authentication: put them behind a firewall or a proxy first).
# The script itself reaches them on 127.0.0.1, which either value answers.
HOST=${HOST:-127.0.0.1}

set -euo pipefail

# wait_ready URL NAME SECONDS: until URL/health answers 200, or fail after SECONDS.
wait_ready() {
  local deadline=$((SECONDS + $3))
  local probe='import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)'
  until python3 -c "$probe" "$1/health" 2>/dev/null; do
    if ((SECONDS > deadline)); then echo "$2 did not answer $1/health within $3 s" >&2; exit 1; fi
    sleep 2
  done
}

pids=()
cleanup() {
  trap - EXIT
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait || true
  echo quit | nvidia-cuda-mps-control || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The MPS control daemon for the servers' GPUs; cleanup stops it.
export CUDA_MPS_PIPE_DIRECTORY=/tmp/coserve-mps/pipe CUDA_MPS_LOG_DIRECTORY=/tmp/coserve-mps/log
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES=0,1 nvidia-cuda-mps-control -d


# gen: builtin engine on http://127.0.0.1:8000
env CUDA_VISIBLE_DEVICES=0,1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
  python3 -P -m coserve serve gen --model qwen3-30b-a3b --host "$HOST" --port 8000 --random-weights --device cuda --gpu-memory-utilization 0.5 --max-model-len 4096 --max-num-seqs 512 --tensor-parallel-size 2 &
pids+=($!)
wait_ready http://127.0.0.1:8000 gen 900

# embed: builtin engine on http://127.0.0.1:8001
env CUDA_VISIBLE_DEVICES=0,1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
  python3 -P -m coserve serve embed --model qwen3-embedding-8b --host "$HOST" --port 8001 --random-weights --device cuda --gpu-memory-utilization 0.3 --max-model-len 512 --max-num-seqs 512 --tensor-parallel-size 2 &
pids+=($!)
wait_ready http://127.0.0.1:8001 embed 900

echo "ready: gen http://127.0.0.1:8000, embed http://127.0.0.1:8001"
# Serve until one server exits (or the script is interrupted); cleanup stops the rest.
wait -n "${pids[@]}"
