#!/usr/bin/env bash
# Overlapping the expert-parallel exchange with the experts (issue 16):
# bench_overlap (bench/bench_overlap.c) at each rank count and each
# single-copy mechanism of Open MPI's shared-memory BTL, in turn within
# every round (P2/cma P2/none P4/cma P4/none, then again), so the
# machine's noise hits all alike.
#
#   bash bench/overlap.sh [--ranks "2 4"] [--copy "cma none"] [--rounds N]
#                         [--reps R] [--build DIR] [--out DIR]
#
# Each run is
#   OPENBLAS_NUM_THREADS=1 mpirun --allow-run-as-root --oversubscribe -np P \
#       --mca btl_vader_single_copy_mechanism M DIR/bench_overlap --reps R
# with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset (the kernel a user's
# machine picks, shared/BENCH.md). Defaults: 3 rounds of 40 repetitions, the
# build in build-bench/ (as bench/run.sh; built there when missing).
# Every run's output is kept in OUT (default: a new /tmp/cmoe-overlap-XXXXXX); the script prints
# /proc/loadavg before and after, and two markdown tables of the per-run
# medians (median and min-max over the runs): the probe per rank and for the
# slowest rank, and the pipelined layer against the blocking one. A run that
# fails (its pipelined output differs from the blocking one) stops it.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RANKS="2 4" COPIES="cma none" ROUNDS=3 REPS=40 BUILD="$ROOT/build-bench" OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
    --ranks) RANKS=${2:?}; shift 2 ;;
    --copy) COPIES=${2:?}; shift 2 ;;
    --rounds) ROUNDS=${2:?}; shift 2 ;;
    --reps) REPS=${2:?}; shift 2 ;;
    --build) BUILD=${2:?}; shift 2 ;;
    --out) OUT=${2:?}; shift 2 ;;
    -h | --help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "overlap.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [ ! -x "$BUILD/bench_overlap" ]; then
    cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release >/dev/null
    cmake --build "$BUILD" -j2 --target bench_overlap >/dev/null
fi
[ -n "$OUT" ] || OUT=$(mktemp -d /tmp/cmoe-overlap-XXXXXX)
mkdir -p "$OUT"

echo "load before: $(cat /proc/loadavg)"
for round in $(seq 1 "$ROUNDS"); do
    for ranks in $RANKS; do
        for copy in $COPIES; do
            log="$OUT/p$ranks-$copy-$round.txt"
            echo "[overlap] round $round: $ranks ranks, single copy $copy -> $log" >&2
            env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OPENBLAS_NUM_THREADS=1 \
                mpirun --allow-run-as-root --oversubscribe -np "$ranks" \
                --mca btl_vader_single_copy_mechanism "$copy" \
                "$BUILD/bench_overlap" --reps "$REPS" >"$log" 2>&1 ||
                { echo "bench/overlap.sh: run failed, see $log" >&2; exit 1; }
        done
    done
done
echo "load after: $(cat /proc/loadavg)"
python3 "$ROOT/bench/overlap_summary.py" "$OUT"/p*.txt
