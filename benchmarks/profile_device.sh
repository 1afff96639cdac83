#!/usr/bin/env bash
# `coserve profile` on a lent H200 in one 10-minute call: gen alone, time-sliced and MPS (CUDA
# graphs), short windows, each server's first STEPS engine steps after the warm-up captured.
#
#   bash benchmarks/profile_device.sh [CONDITIONS] [STEPS]
#       CONDITIONS  default gen-only,timeslice,mps (the eager ones: gen-only-eager,...)
#       STEPS       default 20
#
# The run folder is .runs/profile-h200 (carry `.runs` into a later call and untar
# $OUT/profile-h200.tgz back into the repo: the conditions not yet profiled are added with
# --resume). `coserve profile` gets SIGINT after BUDGET_S seconds (default 540): the rep in
# flight is dropped, finished reps kept, servers and the MPS daemon stopped. Nothing here
# changes clocks, power limits, compute mode or MIG. SPEC and RUN override the spec and the
# folder (a CPU check: SPEC=experiments/demo.toml with its conditions). Written under $OUT: the
# tarred run (traces included), report.md, each rep's profile summary.json, the log. The
# profile table is printed last.
set -u
conditions=${1:-gen-only,timeslice,mps}
steps=${2:-20}
budget=${BUDGET_S:-540}
out=${OUT:-/tmp/coserve-profile}
spec=${SPEC:-experiments/profile-single-gpu.toml}
run=${RUN:-.runs/profile-h200}
mkdir -p .runs "$out"
resume=()
[ -f "$run/fingerprint.json" ] && resume=(--resume)

nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm,compute_mode \
    --format=csv,noheader 2>&1
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), started $(date -u +%FT%TZ)"
PYTHONUNBUFFERED=1 timeout -s INT -k 60 "$budget" \
    python3 -m coserve profile "$spec" --condition "$conditions" --steps "$steps" \
    --out "$run" "${resume[@]}" 2>&1 | tee "$out/profile-h200.log" | grep -v '^\s*$' | tail -n 40
rc=${PIPESTATUS[0]}
echo "coserve profile exit $rc, finished $(date -u +%FT%TZ)"

python3 -m coserve report "$run" >/dev/null 2>&1 || echo "report: not rendered"
# MPS pipe directories hold sockets, which tar refuses; nothing in them is a result.
tar czf "$out/profile-h200.tgz" --exclude='*/strategy/mps/pipe' "$run"
cp "$run/report.md" "$out/" 2>/dev/null
for f in "$run"/reps/*/rep-*/profile/summary.json; do
    [ -f "$f" ] && cp "$f" "$out/$(basename "$(dirname "$(dirname "$(dirname "$f")")")").summary.json"
done
python3 - "$run" <<'PY'
import sys
from pathlib import Path

from coserve.profile.command import print_table

run = Path(sys.argv[1])
order = ["gen-only", "timeslice", "mps", "gen-only-eager", "timeslice-eager", "mps-eager"]
if not print_table(run, order):
    print(f"no profiled rep in {run}")
PY
exit "$rc"
