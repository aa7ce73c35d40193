#!/usr/bin/env bash
# train.recompute on lm-moe: none, experts and all, side by side in one run.
#
#   bash bench/recompute.sh [--runs N] [--steps N] [--skip K] [--threads T]
#                           [--torch] [--build DIR]
#
# N runs of A = `cmoe bench bench/lm-moe.yaml --set train.recompute=none`,
# B = the same with experts and C = with all, in turn, A B C A B C (with
# --torch, D = the PyTorch anchor, bench/torch_ref.py lm-moe with
# OMP_WAIT_POLICY=PASSIVE, after each triple). Prints a markdown table: per setting the median (min-max) over the
# runs of each run's median tokens/s, median step time and peak RSS
# (getrusage), the CPU seconds (user + system, /usr/bin/time) of the whole
# run, and the ratios experts / none and all / none taken per run (so the noise of the
# shared machine hits both alike; CPU time is the steadier measure when other
# jobs take the cores: a descheduled thread costs wall time, not CPU time).
# The raw RESULT lines go to stderr.
# --build DIR: an existing build (default build-bench/, built when missing).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
RUNS=3 STEPS=22 SKIP=2 THREADS=2 TORCH=false BUILD="$ROOT/build-bench"
PYTHON=/usr/bin/python3
while [ $# -gt 0 ]; do
    case "$1" in
    --runs) RUNS=${2:?}; shift 2 ;;
    --steps) STEPS=${2:?}; shift 2 ;;
    --skip) SKIP=${2:?}; shift 2 ;;
    --threads) THREADS=${2:?}; shift 2 ;;
    --torch) TORCH=true; shift ;;
    --build) BUILD=${2:?}; shift 2 ;;
    *) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
    esac
done
if [ ! -x "$BUILD/cmoe" ]; then
    cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release >/dev/null
    cmake --build "$BUILD" -j2 --target cmoe >/dev/null
fi
[ -f data/kjv/train.txt ] || bash data/prepare_kjv.sh >&2

results=$(mktemp /tmp/cmoe-recompute-bench-XXXXXX)
cpu=$(mktemp /tmp/cmoe-recompute-cpu-XXXXXX)
trap 'rm -f "$results" "$cpu"' EXIT
measure() { # TAG COMMAND...: appends "TAG CPU-SECONDS RESULT-JSON" of the command's last line
    local tag=$1
    shift
    local last
    last=$(/usr/bin/time -o "$cpu" -f "%U %S" "$@" 2>/dev/null | tail -n 1)
    [[ "$last" == RESULT* ]] || { echo "bench/recompute.sh: $tag printed no RESULT" >&2; exit 1; }
    echo "$tag $(awk '{ print $1 + $2 }' "$cpu") ${last#RESULT }" | tee -a "$results" >&2
}
for run in $(seq 1 "$RUNS"); do
    for mode in none experts all; do
        measure "$mode" "$BUILD/cmoe" bench bench/lm-moe.yaml --steps "$STEPS" --skip "$SKIP" \
            --threads "$THREADS" --set train.recompute=$mode
    done
    if $TORCH; then
        measure torch env OMP_WAIT_POLICY=PASSIVE "$PYTHON" bench/torch_ref.py lm-moe \
            --steps "$STEPS" --skip "$SKIP" --threads "$THREADS"
    fi
done

"$PYTHON" - "$results" <<'PY'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    tag, cpu, payload = line.split(" ", 2)
    runs.setdefault(tag, []).append(dict(json.loads(payload), cpu_s=float(cpu)))
def cell(values, fmt):
    return "%s (%s-%s)" % (fmt % statistics.median(values), fmt % min(values), fmt % max(values))
print("| setting | tok/s | step ms | CPU s per run | peak RSS MiB |")
print("| --- | --- | --- | --- | --- |")
for tag, rows in runs.items():
    print("| %s | %s | %s | %s | %s |" % (tag, cell([r["tok_s_median"] for r in rows], "%.0f"),
          cell([r["step_ms_median"] for r in rows], "%.0f"),
          cell([r["cpu_s"] for r in rows], "%.1f"),
          cell([r["peak_rss_mib"] for r in rows], "%.0f")))
print()
for tag in ("experts", "all"):
    pairs = list(zip(runs["none"], runs[tag]))
    print("%s / none, per run (median, min-max): step time %s, CPU time %s, peak RSS %s" % (tag,
          cell([b["step_ms_median"] / a["step_ms_median"] for a, b in pairs], "%.3f"),
          cell([b["cpu_s"] / a["cpu_s"] for a, b in pairs], "%.3f"),
          cell([b["peak_rss_mib"] / a["peak_rss_mib"] for a, b in pairs], "%.3f")))
for tag in ("none", "experts", "all"):
    if "torch" not in runs:
        break
    pairs = list(zip(runs[tag], runs["torch"]))
    print("%s / PyTorch (tuned), per run: tok/s %s, peak RSS %s" % (tag,
          cell([a["tok_s_median"] / t["tok_s_median"] for a, t in pairs], "%.2f"),
          cell([a["peak_rss_mib"] / t["peak_rss_mib"] for a, t in pairs], "%.2f")))
PY
