#!/usr/bin/env bash
# cmoe against its PyTorch anchor (shared/BENCH.md), side by side in one run.
#
#   bash bench/run.sh [--runs N] [--steps N] [--skip K] [--threads T]
#                     [--models "lm-dense lm-moe cnn-moe cnn-advmoe"] [--ranks 2]
#                     [--shadow "off auto"] [--build DIR] [--out DIR]
#
# 1. Builds cmoe (Release) in build-bench/, unless --build DIR names an
#    existing build to use as it is; makes the data sets that are missing
#    (data/prepare_kjv.sh, data/prepare_fmnist.sh).
# 2. Measures the raw sgemm peak (1024^3, T threads) with sgemm_peak, before
#    and after the models; the mean of the two medians is the peak.
# 3. Per model, N runs of A = `cmoe bench bench/MODEL.yaml` and B =
#    `torch_ref.py MODEL` (OMP_WAIT_POLICY=PASSIVE: the tuned PyTorch figure
#    BENCH.md compares against) in turn, A B A B, so the machine's noise hits
#    both alike; each run is --steps steps of which the first --skip are
#    warm-up (defaults 22 and 2).
# 4. --ranks R: lm-moe as R ranks x 1 thread (mpirun) against 1 rank x T
#    threads, A B A B, with the all-to-all share of the step. --shadow
#    MODES: the R-rank run once per parallel.shadow_experts mode, in turn
#    within each repeat (A1 A2 B A1 A2 B), one table row per mode;
#    --models "" --ranks R measures only this. A second table breaks each
#    side's step into its parts (cmoe bench's medians): forward + backward
#    outside the exchange, the all-to-all, the wait for the slowest rank,
#    the gradient sums, the update, and the allocations by source.
# Prints a markdown table (per-run medians: median and min-max over the runs)
# on stdout, progress on stderr, and keeps every raw RESULT / SGEMM line in
# OUT/results-DATE.txt (default OUT: the build dir's bench-results/) with
# each run's full output next to it. Any failed run, or one without a RESULT
# line, stops the script with a message and a non-zero status.
set -euo pipefail

usage() {
    sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-2}"
}

die() {
    echo "bench/run.sh: $*" >&2
    exit 1
}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

RUNS=3
STEPS=22
SKIP=2
THREADS=2
MODELS="lm-dense lm-moe cnn-moe cnn-advmoe"
RANKS=0
SHADOW=""
BUILD=""
OUT=""
PYTHON=/usr/bin/python3 # Debian's python3-torch lives there, not in the PATH's python3

while [ $# -gt 0 ]; do
    case "$1" in
    --runs) RUNS=${2:?--runs needs a value}; shift 2 ;;
    --steps) STEPS=${2:?--steps needs a value}; shift 2 ;;
    --skip) SKIP=${2:?--skip needs a value}; shift 2 ;;
    --threads) THREADS=${2:?--threads needs a value}; shift 2 ;;
    --models) MODELS=${2?--models needs a value}; shift 2 ;;
    --ranks) RANKS=${2:?--ranks needs a value}; shift 2 ;;
    --shadow) SHADOW=${2:?--shadow needs a value}; shift 2 ;;
    --build) BUILD=${2:?--build needs a value}; shift 2 ;;
    --out) OUT=${2:?--out needs a value}; shift 2 ;;
    -h | --help) usage 0 ;;
    *) echo "bench/run.sh: unknown argument '$1'" >&2; usage 2 ;;
    esac
done

for value in "$RUNS" "$STEPS" "$THREADS"; do
    [[ "$value" =~ ^[1-9][0-9]*$ ]] || die "--runs, --steps and --threads take positive integers"
done
[[ "$SKIP" =~ ^[0-9]+$ ]] && [ "$SKIP" -lt "$STEPS" ] || die "--skip must be in [0, --steps)"
[[ "$RANKS" =~ ^[0-9]+$ ]] && [ "$RANKS" -ne 1 ] || die "--ranks takes 0 (none) or at least 2"
for model in $MODELS; do
    [ -f "bench/$model.yaml" ] || die "no recipe bench/$model.yaml for model '$model'"
done
[ -x "$PYTHON" ] || die "$PYTHON not found (the PyTorch anchor needs Debian's python3-torch)"

progress() { echo "[bench] $*" >&2; }

# ---- build and data ---------------------------------------------------------------

if [ -z "$BUILD" ]; then
    BUILD="$ROOT/build-bench"
    progress "building cmoe (Release) in $BUILD"
    cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release >"$ROOT/build-bench.log" 2>&1 ||
        die "cmake configure failed; see $ROOT/build-bench.log"
    cmake --build "$BUILD" -j2 --target cmoe sgemm_peak >>"$ROOT/build-bench.log" 2>&1 ||
        die "build failed; see $ROOT/build-bench.log"
    mv "$ROOT/build-bench.log" "$BUILD/build.log"
fi
BUILD=$(cd "$BUILD" 2>/dev/null && pwd) || die "no build directory '$BUILD'"
CMOE="$BUILD/cmoe"
SGEMM="$BUILD/sgemm_peak"
[ -x "$CMOE" ] || die "$CMOE not found (build it, or drop --build to let this script build)"
[ -x "$SGEMM" ] || die "$SGEMM not found (bench/sgemm_peak.c is built with cmoe)"

need_kjv=false
need_fmnist=false
for model in $MODELS; do
    case "$model" in lm-*) need_kjv=true ;; cnn-*) need_fmnist=true ;; esac
done
[ "$RANKS" -gt 0 ] && need_kjv=true
if $need_kjv && [ ! -f data/kjv/train.txt ]; then
    progress "preparing data/kjv"
    bash data/prepare_kjv.sh >&2 || die "data/prepare_kjv.sh failed"
fi
if $need_fmnist && [ ! -f data/fmnist/train-images-idx3-ubyte.gz ]; then
    progress "preparing data/fmnist"
    bash data/prepare_fmnist.sh >&2 || die "data/prepare_fmnist.sh failed"
fi

OUT=${OUT:-$BUILD/bench-results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
STAMP=$(date +%Y%m%d-%H%M%S)
RESULTS="$OUT/results-$STAMP.txt"
LOGS="$OUT/logs-$STAMP"
mkdir -p "$LOGS"
: >"$RESULTS"
progress "raw results: $RESULTS (run outputs in $LOGS)"

# ---- running one measurement ---------------------------------------------------------

# run_one TAG PREFIX COMMAND...: runs COMMAND with its output in $LOGS/TAG.*;
# its last stdout line must start with PREFIX ("RESULT" or "SGEMM"), and is
# appended to $RESULTS as "TAG LINE".
run_one() {
    local tag=$1 prefix=$2
    shift 2
    local stdout="$LOGS/$tag.out" stderr="$LOGS/$tag.err" status=0
    echo "$*" >"$LOGS/$tag.cmd"
    "$@" >"$stdout" 2>"$stderr" || status=$?
    if [ "$status" -ne 0 ]; then
        echo "bench/run.sh: '$tag' failed with status $status: $*" >&2
        tail -n 5 "$stderr" | tr '\r' '\n' | tail -n 5 >&2
        exit 1
    fi
    local last
    last=$(grep -v '^[[:space:]]*$' "$stdout" | tail -n 1 || true)
    if [[ "$last" != "$prefix "* ]]; then
        echo "bench/run.sh: '$tag' printed no $prefix line last: $*" >&2
        echo "  (its output: $stdout, $stderr)" >&2
        exit 1
    fi
    echo "$tag $last" >>"$RESULTS"
}

sgemm() {
    progress "sgemm peak, $THREADS threads ($1)"
    run_one "sgemm-$1" SGEMM "$SGEMM" --threads "$THREADS" --reps 15
}

cmoe_bench() { # model run
    progress "run $2/$RUNS  $1  cmoe"
    run_one "cmoe:$1:$2" RESULT "$CMOE" bench "bench/$1.yaml" --steps "$STEPS" --skip "$SKIP" \
        --threads "$THREADS"
}

torch_bench() { # model run
    progress "run $2/$RUNS  $1  torch"
    run_one "torch:$1:$2" RESULT env OMP_WAIT_POLICY=PASSIVE "$PYTHON" bench/torch_ref.py "$1" \
        --steps "$STEPS" --skip "$SKIP" --threads "$THREADS"
}

# ---- the measurements -----------------------------------------------------------------

sgemm before
for model in $MODELS; do
    for run in $(seq 1 "$RUNS"); do
        cmoe_bench "$model" "$run"
        torch_bench "$model" "$run"
    done
done
if [ "$RANKS" -gt 0 ]; then
    command -v mpirun >/dev/null || die "--ranks needs mpirun"
    for run in $(seq 1 "$RUNS"); do
        for mode in ${SHADOW:-default}; do
            side=mpi
            shadow_set=()
            if [ "$mode" != default ]; then
                side="mpi-$mode"
                shadow_set=(--set "parallel.shadow_experts=$mode")
            fi
            progress "run $run/$RUNS  lm-moe  cmoe $RANKS ranks x 1 thread ($side)"
            run_one "$side:lm-moe:$run" RESULT mpirun --allow-run-as-root --oversubscribe \
                -np "$RANKS" -x OPENBLAS_NUM_THREADS=1 "$CMOE" bench bench/lm-moe.yaml \
                --steps "$STEPS" --skip "$SKIP" --threads 1 "${shadow_set[@]}"
        done
        progress "run $run/$RUNS  lm-moe  cmoe 1 rank x $THREADS threads"
        run_one "single:lm-moe:$run" RESULT "$CMOE" bench bench/lm-moe.yaml --steps "$STEPS" \
            --skip "$SKIP" --threads "$THREADS"
    done
fi
sgemm after

# ---- the table ---------------------------------------------------------------------------

"$PYTHON" - "$RESULTS" "$RANKS" "$THREADS" "$MODELS" <<'PY'
import json
import os
import statistics
import sys

path, ranks, threads, models = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split()
results = {}  # (side, model) -> [RESULT dict per run]
sgemm = {}
with open(path) as f:
    for line in f:
        tag, kind, payload = line.split(" ", 2)
        data = json.loads(payload)
        if kind == "SGEMM":
            sgemm[tag] = data
        else:
            side, model, _ = tag.split(":")
            results.setdefault((side, model), []).append(data)

peaks = [sgemm[t]["gflops_median"] for t in ("sgemm-before", "sgemm-after")]
peak = statistics.median(peaks)


def spread(runs, key, fmt="{:,.0f}"):
    """median (min-max) over the runs of a per-run figure"""
    values = [r[key] for r in runs]
    text = fmt.format(statistics.median(values))
    if len(values) > 1:
        text += " (" + fmt.format(min(values)) + "–" + fmt.format(max(values)) + ")"
    return text


def median(runs, key):
    return statistics.median(r[key] for r in runs)


def allocations(runs, key="allocs_per_step_max"):
    """the most heap allocations of any timed step in any run (-1: not counted)"""
    counts = [r.get(key, -1) for r in runs]
    return "not counted" if min(counts) < 0 else f"{max(counts):.0f}"


n_runs = len(next(iter(results.values()))) if results else 0
print(f"sgemm peak 1024³, {threads} threads: {peak:.1f} GFLOP/s "
      f"(median before {peaks[0]:.1f}, after {peaks[1]:.1f})")
print(f"{n_runs} run(s) per side, A B A B; figures are per-run medians over the timed steps, "
      "shown as median (min–max) over the runs; torch with OMP_WAIT_POLICY=PASSIVE.")
mca = sorted(f"{k}={v}" for k, v in os.environ.items() if k.startswith("OMPI_MCA_"))
if ranks > 0:
    print("Open MPI settings from the environment: " + (", ".join(mca) if mca else "none"))
print()
if models:
    print("| model | cmoe tok/s | torch tok/s | cmoe / torch | cmoe GFLOP/s (share of sgemm peak) "
          "| torch GFLOP/s (share) | peak RSS MiB cmoe / torch (ratio) | cmoe allocations / step |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for model in models:
        cmoe, torch = results[("cmoe", model)], results[("torch", model)]
        ratio = median(cmoe, "tok_s_median") / median(torch, "tok_s_median")
        cmoe_gf, torch_gf = median(cmoe, "achieved_gflops"), median(torch, "achieved_gflops")
        cmoe_rss, torch_rss = median(cmoe, "peak_rss_mib"), median(torch, "peak_rss_mib")
        unit = "" if model.startswith("lm-") else " (img/s)"
        print(f"| {model}{unit} | {spread(cmoe, 'tok_s_median')} | {spread(torch, 'tok_s_median')} "
              f"| {ratio:.2f}× | {cmoe_gf:.1f} ({100 * cmoe_gf / peak:.0f}%) "
              f"| {torch_gf:.1f} ({100 * torch_gf / peak:.0f}%) "
              f"| {cmoe_rss:,.0f} / {torch_rss:,.0f} ({cmoe_rss / torch_rss:.2f}×) "
              f"| {allocations(cmoe)} |")

if ranks > 0:
    single = results[("single", "lm-moe")]
    print()
    print(f"| lm-moe | {ranks} ranks × 1 thread tok/s | 1 rank × {threads} threads tok/s "
          "| ratio | all-to-all per step | wait for the slowest rank per step "
          "| shadowed experts per layer call "
          "| peak RSS MiB, all ranks / 1 rank | allocations / step |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for side in sorted(s for s, m in results if m == "lm-moe" and s.startswith("mpi")):
        mpi = results[(side, "lm-moe")]
        ratio = median(mpi, "tok_s_median") / median(single, "tok_s_median")
        shares = [r["alltoall_ms_median"] / r["step_ms_median"] for r in mpi
                  if "alltoall_ms_median" in r]
        alltoall = (f"{median(mpi, 'alltoall_ms_median'):.1f} ms, "
                    f"{100 * statistics.median(shares):.1f}% of the step") if shares else "n/a"
        waits = [r["imbalance_wait_ms_median"] / r["step_ms_median"] for r in mpi
                 if "imbalance_wait_ms_median" in r]
        wait = (f"{median(mpi, 'imbalance_wait_ms_median'):.0f} ms, "
                f"{100 * statistics.median(waits):.1f}% of the step") if waits else "n/a"
        shadowed = spread(mpi, "shadowed_per_call", "{:.2f}") if all(
            "shadowed_per_call" in r for r in mpi) else "n/a"
        label = "cmoe" if side == "mpi" else f"cmoe, shadow_experts {side[4:]}"
        print(f"| {label} | {spread(mpi, 'tok_s_median')} | {spread(single, 'tok_s_median')} "
              f"| {ratio:.2f}× | {alltoall} | {wait} | {shadowed} "
              f"| {median(mpi, 'peak_rss_mib_sum'):,.0f} / {median(single, 'peak_rss_mib'):,.0f} "
              f"| {allocations(mpi)} / {allocations(single)} |")

    # Where the step goes (cmoe bench's parts, the slowest rank's medians).
    print()
    print("| lm-moe, median ms per step | step | forward + backward, less the all-to-all "
          "and the wait | all-to-all | wait | gradient sums over the ranks | update "
          "| allocations / step: Open MPI, cmoe's code, elsewhere |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = [(f"1 rank × {threads} threads", single)]
    rows += [(f"{ranks} ranks, shadow_experts {side[4:]}" if side != "mpi" else f"{ranks} ranks",
              results[(side, "lm-moe")])
             for side in sorted(s for s, m in results if m == "lm-moe" and s.startswith("mpi"))]
    for label, runs in rows:
        if not all("forward_ms_median" in r for r in runs):
            continue
        compute = [r.get("compute_ms_median", r["forward_ms_median"] + r["backward_ms_median"])
                   for r in runs]
        sources = ", ".join(allocations(runs, f"allocs_{k}_per_step_max")
                            for k in ("mpi", "own", "elsewhere"))
        print(f"| {label} | {median(runs, 'step_ms_median'):,.0f} "
              f"| {statistics.median(compute):,.0f} "
              f"| {statistics.median(r.get('alltoall_ms_median', 0) for r in runs):.0f} "
              f"| {statistics.median(r.get('imbalance_wait_ms_median', 0) for r in runs):.0f} "
              f"| {median(runs, 'reduce_ms_median'):.1f} | {median(runs, 'update_ms_median'):.1f} "
              f"| {sources} |")
PY
