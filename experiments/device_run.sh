#!/usr/bin/env bash
# One call of a study run on a lent GPU machine, resumable across calls and machines.
#
#   bash experiments/device_run.sh SPEC NAME CONDITIONS WARMUP_S DURATION_S
#
# The run folder is .runs/NAME (carry `.runs` into the call; untar $OUT/NAME.tgz back into
# the repo after it, then call again: the missing reps are added with --resume). The spec is
# run as given except for its load windows, which are replaced by WARMUP_S and DURATION_S so
# that several reps fit one 10-minute call; the copy the run folder keeps (spec.toml) says so.
# `coserve run` gets SIGINT after BUDGET_S seconds (default 540): the rep in flight is
# dropped, finished reps are kept, servers and the MPS daemon are stopped. Last, it checks that
# no server or MPS daemon of this call is left and prints the run's table (plots: `coserve
# report` here).
set -u
if [ $# -ne 5 ]; then
    echo "usage: bash experiments/device_run.sh SPEC NAME CONDITIONS WARMUP_S DURATION_S" >&2
    exit 2
fi
spec=$1 name=$2 conditions=$3 warmup=$4 duration=$5
budget=${BUDGET_S:-540}
out=${OUT:-/tmp/coserve-device-run}
run=.runs/$name
short=.runs/$name.toml
mkdir -p .runs "$out"

sed -e "s/^warmup_s = .*/warmup_s = $warmup/" -e "s/^duration_s = .*/duration_s = $duration/" \
    "$spec" > "$short"
resume=()
[ -f "$run/fingerprint.json" ] && resume=(--resume)

tag="$$-$(date +%s%N)"
export COSERVE_DEVICE_RUN=$tag
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_mode --format=csv,noheader 2>&1
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), started $(date -u +%FT%TZ)"
PYTHONUNBUFFERED=1 timeout -s INT -k 60 "$budget" \
    python3 -m coserve run "$short" --out "$run" --conditions "$conditions" --no-report "${resume[@]}" \
    2>&1 | tee "$out/$name.log" | grep -v '^\s*$' | tail -n 60
rc=${PIPESTATUS[0]}
echo "coserve run exit $rc, finished $(date -u +%FT%TZ)"

# MPS pipe directories hold sockets, which tar refuses; nothing in them is a result.
tar czf "$out/$name.tgz" --exclude='*/strategy/mps/pipe' "$run" "$short"
# Only this call's processes: each carries the tag in its environment (inherited from here),
# so a server another run left on the machine is not counted, and none of ours is missed.
echo "left behind (should be empty):"
left=""
for pid in $(pgrep -f 'coserve serve|nvidia-cuda-mps'); do
    if tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep -qx "COSERVE_DEVICE_RUN=$tag"; then
        left="$left  $(ps -o pid=,args= -p "$pid")"$'\n'
    fi
done
printf '%s' "${left:-  nothing}"; echo
python3 -m coserve report "$run" --no-plots 2>&1 | tail -n 24
exit "$rc"
