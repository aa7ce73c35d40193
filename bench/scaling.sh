#!/usr/bin/env bash
# The scaling model of an expert-parallel step (docs/scaling.md): measures its
# inputs on this machine, checks it against cmoe bench at 2 and 4 ranks, and
# predicts lm-moe at 2-64 ranks with parallel.shadow_experts off and auto.
#
#   bash bench/scaling.sh [--runs N] [--steps N] [--skip K] [--check-ranks "2 4"]
#                         [--cores C] [--expert-rate twins|moe-bench]
#                         [--trained FILE] [--build DIR] [--out DIR | --from DIR]
#
# 1. Builds cmoe (Release) in build-bench/ unless --build DIR names a build;
#    makes data/kjv if missing.
# 2. Routing: `cmoe train bench/lm-moe.yaml` for --steps steps, logging every
#    expert's rows per layer and step (the same steps cmoe bench times), and
#    the dense parameter count from its metrics.jsonl.
# 3. N repeats (default 3), each in turn: bench_alltoall at 2, 3 and 4 ranks;
#    bench_moe_mpi at 2 and 4 ranks (how the experts' rate per rank falls
#    when 4 ranks share the 2 cores); `cmoe bench --threads 1` of lm-moe,
#    two at once so both cores are busy (the one-rank step), then the same
#    with experts of half the width (the experts' time in the step: twice
#    the difference); then lm-moe with cmoe bench at each --check-ranks R
#    (R ranks x 1 thread) with shadowing off, then auto. Each run is --steps
#    steps (default 12) of which the first --skip (default 2) are warm-up.
#    The model's experts' rate: twins (default), from the one-rank runs;
#    moe-bench: bench_moe_mpi's at 2 ranks (the experts alone).
# 4. scaling_model: the check (strong scaling: the recipe's batch over R
#    ranks, the collectives fitted at R ranks, compute shared by the C
#    cores, default 2) against the measured medians, then the predictions
#    (weak scaling, 2048 tokens per rank, a core per rank, the collectives
#    fitted at 2 ranks) for the measured routing and for --trained's
#    (default bench/routing-moe-top2.jsonl), experts max(8, P) and 4 per rank.
# Markdown on stdout, progress on stderr; every raw line and run output in
# OUT (default BUILD/scaling-results/DATE). --from DIR: no measurement, the
# model (step 4) on the results an earlier run left in DIR. Any failed run, or one without
# its result line, stops the script with a message and a non-zero status.
set -euo pipefail

usage() {
    sed -n '2,36p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-2}"
}

die() {
    echo "bench/scaling.sh: $*" >&2
    exit 1
}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

RUNS=3
STEPS=12
SKIP=2
CHECK_RANKS="2 4"
CORES=2
EXPERT_RATE=twins
TRAINED=bench/routing-moe-top2.jsonl
BUILD=""
OUT=""
FROM=""
PYTHON=/usr/bin/python3

while [ $# -gt 0 ]; do
    case "$1" in
    --runs) RUNS=${2:?--runs needs a value}; shift 2 ;;
    --steps) STEPS=${2:?--steps needs a value}; shift 2 ;;
    --skip) SKIP=${2:?--skip needs a value}; shift 2 ;;
    --check-ranks) CHECK_RANKS=${2:?--check-ranks needs a value}; shift 2 ;;
    --cores) CORES=${2:?--cores needs a value}; shift 2 ;;
    --expert-rate) EXPERT_RATE=${2:?--expert-rate needs a value}; shift 2 ;;
    --trained) TRAINED=${2:?--trained needs a value}; shift 2 ;;
    --build) BUILD=${2:?--build needs a value}; shift 2 ;;
    --out) OUT=${2:?--out needs a value}; shift 2 ;;
    --from) FROM=${2:?--from needs a value}; shift 2 ;;
    -h | --help) usage 0 ;;
    *) echo "bench/scaling.sh: unknown argument '$1'" >&2; usage 2 ;;
    esac
done

for value in "$RUNS" "$STEPS" "$CORES"; do
    [[ "$value" =~ ^[1-9][0-9]*$ ]] || die "--runs, --steps and --cores take positive integers"
done
[[ "$SKIP" =~ ^[0-9]+$ ]] && [ "$SKIP" -lt "$STEPS" ] || die "--skip must be in [0, --steps)"
for ranks in $CHECK_RANKS; do
    [[ "$ranks" =~ ^[1-9][0-9]*$ ]] && [ "$ranks" -ge 2 ] && [ $((8 % ranks)) -eq 0 ] ||
        die "--check-ranks takes rank counts that divide lm-moe's 8 experts (2, 4, 8)"
done
[ "$EXPERT_RATE" = twins ] || [ "$EXPERT_RATE" = moe-bench ] ||
    die "--expert-rate takes twins or moe-bench"
[ -f "$TRAINED" ] || die "no routing file '$TRAINED' (--trained)"
command -v mpirun >/dev/null || die "mpirun not found"
[ -x "$PYTHON" ] || die "$PYTHON not found"

progress() { echo "[scaling] $*" >&2; }

# ---- build and data ---------------------------------------------------------------------

if [ -z "$BUILD" ]; then
    BUILD="$ROOT/build-bench"
    progress "building cmoe (Release) in $BUILD"
    cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release >"$ROOT/build-bench.log" 2>&1 ||
        die "cmake configure failed; see $ROOT/build-bench.log"
    cmake --build "$BUILD" -j2 --target cmoe bench_alltoall bench_moe_mpi scaling_model \
        >>"$ROOT/build-bench.log" 2>&1 || die "build failed; see $ROOT/build-bench.log"
    mv "$ROOT/build-bench.log" "$BUILD/build.log"
fi
BUILD=$(cd "$BUILD" 2>/dev/null && pwd) || die "no build directory '$BUILD'"
for program in cmoe bench_alltoall bench_moe_mpi scaling_model; do
    [ -x "$BUILD/$program" ] || die "$BUILD/$program not found (build it, or drop --build)"
done
if [ ! -f data/kjv/train.txt ]; then
    progress "preparing data/kjv"
    bash data/prepare_kjv.sh >&2 || die "data/prepare_kjv.sh failed"
fi

if [ -n "$FROM" ]; then
    [ -z "$OUT" ] || die "--from and --out: one or the other"
    OUT=$(cd "$FROM" 2>/dev/null && pwd) || die "no directory '$FROM'"
    [ -s "$OUT/results.txt" ] && [ -s "$OUT/conditions.txt" ] ||
        die "$OUT has no results.txt and conditions.txt of an earlier run"
    progress "the model on the results in $OUT"
else
    OUT=${OUT:-$BUILD/scaling-results/$(date +%Y%m%d-%H%M%S)}
    mkdir -p "$OUT/logs"
    OUT=$(cd "$OUT" && pwd)
    : >"$OUT/results.txt"
    progress "raw results in $OUT"
fi

MPI=(mpirun --allow-run-as-root --oversubscribe -x OPENBLAS_NUM_THREADS=1)

# run_one TAG PREFIXES COMMAND...: runs COMMAND with its output in
# logs/TAG.*; every stdout line starting with one of PREFIXES (an extended
# regex: "A|B") and a space is appended to results.txt as "TAG LINE", and
# there must be at least one.
run_one() {
    local tag=$1 prefix=$2
    shift 2
    local stdout="$OUT/logs/$tag.out" stderr="$OUT/logs/$tag.err" status=0
    echo "$*" >"$OUT/logs/$tag.cmd"
    "$@" >"$stdout" 2>"$stderr" || status=$?
    if [ "$status" -ne 0 ]; then
        echo "bench/scaling.sh: '$tag' failed with status $status: $*" >&2
        tail -n 5 "$stderr" | tr '\r' '\n' | tail -n 5 >&2
        exit 1
    fi
    grep -E "^($prefix) " "$stdout" | sed "s/^/$tag /" >>"$OUT/results.txt" ||
        die "'$tag' printed no $prefix line: $* (its output: $stdout)"
}

bench_lm_moe() { # tag ranks mode
    run_one "$1" RESULT "${MPI[@]}" -np "$2" "$BUILD/cmoe" bench bench/lm-moe.yaml \
        --steps "$STEPS" --skip "$SKIP" --threads 1 --set "parallel.shadow_experts=$3"
}

# The one-rank x one-thread step of lm-moe (width full) or of lm-moe with
# experts of half the hidden width (half), two identical runs at once so
# that both cores are busy, as in the 2-rank runs, and the pair ends
# together. The experts' time of a step is twice the difference between the
# two widths (their products, GELU and hidden rows scale with the width, the
# rest of the step does not).
one_rank_pair() { # run full|half
    local pids=() pid status=0 width=()
    [ "$2" = half ] && width=(--set moe.expert_hidden=$((EXPERT_HIDDEN / 2)))
    for twin in a b; do
        run_one "one-$2-$1$twin" RESULT env OPENBLAS_NUM_THREADS=1 "$BUILD/cmoe" bench \
            bench/lm-moe.yaml --steps "$STEPS" --skip "$SKIP" --threads 1 "${width[@]}" &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
    [ "$status" -eq 0 ] || die "a one-rank run failed (see $OUT/logs)"
}

EXPERT_HIDDEN=$(sed -n 's/^  expert_hidden: *\([0-9]*\).*/\1/p' bench/lm-moe.yaml)
[[ "$EXPERT_HIDDEN" =~ ^[0-9]+$ ]] && [ "$EXPERT_HIDDEN" -ge 2 ] ||
    die "no moe.expert_hidden in bench/lm-moe.yaml"

if [ -z "$FROM" ]; then
    progress "routing: cmoe train bench/lm-moe.yaml, $STEPS steps, every expert's rows per step"
    "$BUILD/cmoe" train bench/lm-moe.yaml --quiet --set train.steps="$STEPS" \
        --set train.log_every=1 --set train.eval_every=0 --set checkpoint.every=0 \
        --set train.threads=2 --set train.out_dir="$OUT/routing" >"$OUT/logs/routing.out" 2>&1 ||
        die "the routing run failed; see $OUT/logs/routing.out"
    rm -f "$OUT"/routing/ckpt-*.h5 # its final checkpoint (200 MB): only the metrics are used
fi
ROUTING="$OUT/routing/metrics.jsonl"
grep -q '"kind": "moe"' "$ROUTING" 2>/dev/null || die "the routing run wrote no moe lines in $ROUTING"
DENSE_PARAMS=$("$PYTHON" -c '
import json, sys
for line in open(sys.argv[1]):
    record = json.loads(line)
    if record.get("kind") == "model":
        print(record["parameters"] - record["expert_parameters"])
        break
' "$ROUTING")
[[ "$DENSE_PARAMS" =~ ^[0-9]+$ ]] || die "no model line with the parameter counts in $ROUTING"

# ---- the measurements ------------------------------------------------------------------------

if [ -z "$FROM" ]; then
    echo "start $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg)" >"$OUT/conditions.txt"
    for run in $(seq 1 "$RUNS"); do
        for ranks in 2 3 4; do
            progress "run $run/$RUNS  bench_alltoall, $ranks ranks"
            run_one "comm-$ranks-$run" "ALLTOALLV|ALLREDUCE" "${MPI[@]}" -np "$ranks" \
                "$BUILD/bench_alltoall"
        done
        for ranks in 2 4; do
            progress "run $run/$RUNS  bench_moe_mpi, $ranks ranks"
            run_one "moe-$ranks-$run" MOE "${MPI[@]}" -np "$ranks" "$BUILD/bench_moe_mpi" --reps 5
        done
        for width in full half; do
            progress "run $run/$RUNS  lm-moe, 1 rank x 1 thread, experts of $width width, two at once"
            one_rank_pair "$run" "$width"
        done
        for ranks in $CHECK_RANKS; do
            for mode in off auto; do
                progress "run $run/$RUNS  lm-moe, $ranks ranks x 1 thread, shadowing $mode"
                bench_lm_moe "mpi-$ranks-$mode-$run" "$ranks" "$mode"
            done
        done
    done
    echo "end   $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/conditions.txt"
fi

# ---- the model: the check, then the predictions ------------------------------------------------

grep -E '^comm-' "$OUT/results.txt" | cut -d' ' -f2- >"$OUT/comm.txt"
# The experts' rate: from the twins, rows x 6 n D H FLOPs over twice the
# difference of their median steps, run by run, then the median; or
# bench_moe_mpi's at 2 ranks.
read -r EXPERT_GFLOPS ONE_RANK_MS < <("$PYTHON" - "$OUT/results.txt" "$EXPERT_HIDDEN" \
    "$EXPERT_RATE" <<'PY'
import json, statistics, sys
full, half, moe = {}, {}, []
for line in open(sys.argv[1]):
    tag, kind, payload = line.split(" ", 2)
    record = json.loads(payload)
    for name, into in (("one-full-", full), ("one-half-", half)):
        if tag.startswith(name):  # one-full-3a: run 3, twin a
            into.setdefault(tag[len(name):-1], []).append(record["step_ms_median"])
    if tag.startswith("moe-2-"):
        moe.append(record["expert_gflops"])
# lm-moe: 4 MoE layers, 4096 tokens x top-2, D 256, GELU (2 matrices)
flops = 4 * 4096 * 2 * 6 * 2 * 256 * int(sys.argv[2])
experts_ms = statistics.median(
    2 * (statistics.median(full[run]) - statistics.median(half[run])) for run in full)
if sys.argv[3] == "moe-bench":
    gflops = statistics.median(moe)
elif experts_ms > 0:
    gflops = flops / experts_ms / 1e6
else:
    sys.exit("the half-width twin was not faster, so the experts' time is lost in the noise "
             "(a loaded machine?); run again, or take --expert-rate moe-bench")
print(gflops, statistics.median(step for run in full.values() for step in run))
PY
) || die "no experts' rate"
model() { # the scaling model on the measured inputs, then the arguments
    "$BUILD/scaling_model" bench/lm-moe.yaml --expert-gflops "$EXPERT_GFLOPS" \
        --one-rank-ms "$ONE_RANK_MS" --dense-params "$DENSE_PARAMS" --comm "$OUT/comm.txt" "$@"
}
# The check: the benchmarked steps' routing, the recipe's batch over R ranks,
# the collectives fitted at R ranks, the ranks on the --cores cores; with
# more ranks than cores both ends of what a waiting rank does (yield, spin).
: >"$OUT/check.txt"
for ranks in $CHECK_RANKS; do
    check=(--routing "$ROUTING" --routing-steps "$((SKIP + 1)):$STEPS" --scaling strong
        --ranks "$ranks" --cores "$CORES" --comm-ranks "$ranks")
    waiting=(yield)
    [ "$ranks" -gt "$CORES" ] && waiting=(yield spin)
    for how in "${waiting[@]}"; do
        model "${check[@]}" --waiting "$how" --json | sed "s/^PREDICT /PREDICT $how /" \
            >>"$OUT/check.txt" || die "scaling_model failed (the check at $ranks ranks)"
    done
    model "${check[@]}" >"$OUT/check-inputs-$ranks.md" ||
        die "scaling_model failed (the check at $ranks ranks)"
done

echo "# Scaling model: measured inputs and the check ($(date -u +%F), $(tr '\n' ' ' <"$OUT/conditions.txt"))"
echo
"$PYTHON" - "$OUT/results.txt" "$OUT/check.txt" "$CORES" "$EXPERT_GFLOPS" "$EXPERT_RATE" <<'PY'
import json, statistics, sys

results, predicted = {}, {}
for line in open(sys.argv[1]):
    tag, kind, payload = line.split(" ", 2)
    results.setdefault(tag.rsplit("-", 1)[0], []).append(json.loads(payload))
for line in open(sys.argv[2]):  # PREDICT yield|spin {...}
    _, waiting, payload = line.split(" ", 2)
    record = json.loads(payload)
    predicted[(record["ranks"], record["shadow"], waiting)] = record


def spread(values, fmt):
    text = fmt.format(statistics.median(values))
    return text + (f" ({fmt.format(min(values))}–{fmt.format(max(values))})" if len(values) > 1 else "")


gflops = {r: [x["expert_gflops"] for x in results[f"moe-{r}"]] for r in (2, 4)}
full = [x["step_ms_median"] for x in results["one-full"]]
half = [x["step_ms_median"] for x in results["one-half"]]
print(f"- one-rank step, 1 thread, two at once: {spread(full, '{:,.0f}')} ms; with experts of "
      f"half the width: {spread(half, '{:,.0f}')} ms")
print(f"- the model's experts' rate ({sys.argv[5]}): {float(sys.argv[4]):.1f} GFLOP/s per rank")
print(f"- bench_moe_mpi's experts, per rank, 1 thread: {spread(gflops[2], '{:.1f}')} GFLOP/s "
      f"with 2 ranks on the 2 cores, {spread(gflops[4], '{:.1f}')} with 4 (ratio "
      f"{statistics.median(gflops[4]) / statistics.median(gflops[2]):.2f}; the model takes "
      f"cores / ranks = {int(sys.argv[3]) / 4:.2f})")
print()
print("| ranks | shadow | step ms measured | predicted | all-to-all ms (share) measured | predicted "
      "| wait ms (share) measured | predicted | shadowed / call measured | predicted |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for (ranks, mode, waiting), p in sorted(predicted.items()):
    runs = results.get(f"mpi-{ranks}-{mode}", [])
    if not runs:
        continue
    step = [r["step_ms_median"] for r in runs]
    a2a = [r["alltoall_ms_median"] for r in runs]
    wait = [r["imbalance_wait_ms_median"] for r in runs]
    shadowed = [r["shadowed_per_call"] for r in runs]
    s = statistics.median(step)
    label = f"{ranks}, {waiting}" if ranks > int(sys.argv[3]) else f"{ranks}"
    print(f"| {label} | {mode} | {spread(step, '{:,.0f}')} | {p['step_ms']:,.0f} "
          f"({100 * (p['step_ms'] / s - 1):+.0f}%) "
          f"| {spread(a2a, '{:.0f}')} ({100 * statistics.median(a2a) / s:.1f}%) "
          f"| {p['alltoall_ms']:.0f} ({100 * p['alltoall_ms'] / p['step_ms']:.1f}%) "
          f"| {spread(wait, '{:.0f}')} ({100 * statistics.median(wait) / s:.1f}%) "
          f"| {p['wait_ms']:.0f} ({100 * p['wait_ms'] / p['step_ms']:.1f}%) "
          f"| {statistics.median(shadowed):.2f} | {p['shadowed_per_call']:.2f} |")
PY
for ranks in $CHECK_RANKS; do
    echo
    echo "Inputs of the check at $ranks ranks:"
    echo
    sed -n '1,/^$/p' "$OUT/check-inputs-$ranks.md"
done

for routing in measured trained; do
    for experts in max per-rank; do
        echo
        echo "## Predicted: $routing routing, experts $experts"
        echo
        if [ "$routing" = measured ]; then
            files=(--routing "$ROUTING" --routing-steps "$((SKIP + 1)):$STEPS")
        else
            files=(--routing "$TRAINED")
        fi
        model "${files[@]}" --experts "$experts" --comm-ranks 2 ||
            die "scaling_model failed (the predictions)"
    done
done
