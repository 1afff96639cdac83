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
# folder (a CPU check: SPEC=experiments/demo.toml with its conditions); WARMUP_S and DURATION_S
# the spec's load windows (a profile needs steady steps, not a long window). On two H200s:
#   SPEC=experiments/seed-tp2.toml RUN=.runs/profile-tp2 WARMUP_S=15 DURATION_S=10 \
#       bash benchmarks/profile_device.sh tp2-gen-alone,tp2-timeslice,tp2-mps 20
# Written under $OUT, named after the run folder (NAME: profile-h200 by default): NAME.tgz, the
# tarred run without its traces, NAME-traces.tgz, the traces, NAME.log, report.md, each rep's profile summary.json. The
# profile table is printed last.
set -u
conditions=${1:-gen-only,timeslice,mps}
steps=${2:-20}
budget=${BUDGET_S:-540}
out=${OUT:-/tmp/coserve-profile}
spec=${SPEC:-experiments/profile-single-gpu.toml}
run=${RUN:-.runs/profile-h200}
name=$(basename "$run")
mkdir -p .runs "$out"
resume=()
[ -f "$run/fingerprint.json" ] && resume=(--resume)
windows=()
[ -n "${WARMUP_S:-}" ] && windows+=(--warmup-s "$WARMUP_S")
[ -n "${DURATION_S:-}" ] && windows+=(--duration-s "$DURATION_S")

nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm,compute_mode \
    --format=csv,noheader 2>&1
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), started $(date -u +%FT%TZ)"
PYTHONUNBUFFERED=1 timeout -s INT -k 60 "$budget" \
    python3 -m coserve profile "$spec" --condition "$conditions" --steps "$steps" \
    --out "$run" "${windows[@]}" "${resume[@]}" 2>&1 | tee "$out/$name.log" | grep -v '^\s*$' \
    | tail -n 40
rc=${PIPESTATUS[0]}
echo "coserve profile exit $rc, finished $(date -u +%FT%TZ)"

python3 -m coserve report "$run" >/dev/null 2>&1 || echo "report: not rendered"
# MPS pipe directories hold sockets, which tar refuses; nothing in them is a result. The
# Chrome traces go in a tarball of their own: a few conditions' traces outgrow the 16 MiB a
# returned file may have, and the run folder must come back to be resumed.
tar czf "$out/$name.tgz" --exclude='*/strategy/mps/pipe' --exclude='trace.json.gz' "$run"
find "$run" -name trace.json.gz -print0 | tar czf "$out/$name-traces.tgz" --null -T -
cp "$run/report.md" "$out/" 2>/dev/null
for f in "$run"/reps/*/rep-*/profile/summary.json; do
    [ -f "$f" ] && cp "$f" "$out/$(basename "$(dirname "$(dirname "$(dirname "$f")")")").summary.json"
done
python3 - "$run" "$conditions" <<'PY'
import sys
from pathlib import Path

from coserve.profile.command import print_table

run = Path(sys.argv[1])
if not print_table(run, sys.argv[2].split(",")):
    print(f"no profiled rep in {run}")
PY
exit "$rc"
