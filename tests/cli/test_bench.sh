#!/usr/bin/env bash
# `cmoe bench` and the PyTorch anchor of bench/ (shared/BENCH.md), briefly:
#   - cmoe bench on each reference recipe prints the RESULT line last, with
#     positive throughput and the model FLOPs of BENCH.md's formula (lm-dense
#     91.8, lm-moe 143.5 GFLOP per step), and zero heap allocations in the
#     timed steps (counted in a normal build; -1, not counted, under ASan);
#   - bench/torch_ref.py counts the same model FLOPs per step for every model
#     (the CNN's from hooks on its own layers, so it is the same network as
#     cmoe's, one expert group per MoE conv);
#   - the parts of the step (forward, backward, update) are there and fit
#     in the step;
#   - under mpirun -np 2 the RESULT line has the all-to-all time and the
#     ranks, and the summed RSS, and no allocation in a step comes from
#     cmoe's own code (Open MPI's are counted apart);
#   - usage errors: --skip >= --steps, an unknown option, a missing recipe;
#   - bench/run.sh on this build, one run of two steps of lm-dense and
#     cnn-moe, prints the table with both sides and the ratio.
# usage: test_bench.sh PATH/TO/cmoe SOURCE_DIR
set -u
cmoe=$1
src=$2
build=$(cd "$(dirname "$cmoe")" && pwd)
work=$(mktemp -d /tmp/cmoe-bench-XXXXXX)
trap 'rm -rf "$work"' EXIT
python=/usr/bin/python3

# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
# json KEY FILE: the number KEY of the RESULT line that ends FILE
json() {
    tail -n 1 "$2" | grep -o "\"$1\": [-0-9.e+]*" | head -n 1 | sed 's/.*: //'
}

cd "$src" || exit 1
bash data/prepare_kjv.sh > "$work/prepare.out" 2>&1
check $? "prepare_kjv.sh ($(tail -c 300 "$work/prepare.out"))"
bash data/prepare_fmnist.sh > "$work/prepare.out" 2>&1
check $? "prepare_fmnist.sh ($(tail -c 300 "$work/prepare.out"))"

sanitized=false
for model in lm-dense lm-moe cnn-moe; do
    "$cmoe" bench "bench/$model.yaml" --steps 3 --skip 1 --threads 2 > "$work/$model.out" 2> "$work/$model.err"
    check $? "cmoe bench $model ($(tail -c 300 "$work/$model.err"))"
    tail -n 1 "$work/$model.out" | grep -q "^RESULT {\"model\": \"$model\", \"tok_s_median\": "
    check $? "$model: RESULT line last ($(tail -n 1 "$work/$model.out"))"
    rate=$(json tok_s_median "$work/$model.out")
    awk -v r="${rate:-0}" 'BEGIN { exit !(r > 0) }'
    check $? "$model: positive throughput ($rate)"
    allocations=$(json allocs_per_step_max "$work/$model.out")
    grep -q "not counted in a sanitizer build" "$work/$model.out" && sanitized=true
    if $sanitized; then
        [ "$allocations" = "-1" ]
        check $? "$model: allocations not counted under ASan ($allocations)"
    else
        [ "$allocations" = "0" ]
        check $? "$model: no heap allocation in a timed step ($allocations)"
    fi
    # the parts of the step: forward and backward are most of it, and
    # together no more than it (medians of 2 steps, so 10% of slack)
    step=$(json step_ms_median "$work/$model.out")
    forward=$(json forward_ms_median "$work/$model.out")
    backward=$(json backward_ms_median "$work/$model.out")
    update=$(json update_ms_median "$work/$model.out")
    awk -v s="${step:-0}" -v f="${forward:-0}" -v b="${backward:-0}" -v u="${update:--1}" \
        'BEGIN { exit !(f > 0 && b > 0 && u >= 0 && f + b > 0.5 * s && f + b + u < 1.1 * s) }'
    check $? "$model: forward $forward + backward $backward + update $update ms within the step's $step"
    grep -q "parts of the step, median ms" "$work/$model.out"
    check $? "$model: the parts of the step printed"
    "$python" bench/torch_ref.py "$model" --steps 2 --skip 1 --threads 2 > "$work/$model.torch" 2> "$work/$model.torch.err"
    check $? "torch_ref.py $model ($(tail -c 300 "$work/$model.torch.err"))"
    ours=$(json model_gflop_per_step "$work/$model.out")
    theirs=$(json model_gflop_per_step "$work/$model.torch")
    [ -n "$ours" ] && [ -n "$theirs" ] && awk -v a="$ours" -v b="$theirs" 'BEGIN { exit !(a - b < 0.001 && b - a < 0.001) }'
    check $? "$model: the same model GFLOP per step in cmoe ($ours) and torch_ref ($theirs)"
done
awk -v g="$(json model_gflop_per_step "$work/lm-dense.out")" 'BEGIN { exit !(g > 91.75 && g < 91.85) }'
check $? "lm-dense: BENCH.md's 91.8 GFLOP per step ($(json model_gflop_per_step "$work/lm-dense.out"))"
awk -v g="$(json model_gflop_per_step "$work/lm-moe.out")" 'BEGIN { exit !(g > 143.45 && g < 143.55) }'
check $? "lm-moe: BENCH.md's 143.5 GFLOP per step ($(json model_gflop_per_step "$work/lm-moe.out"))"

# Two ranks: the all-to-all of lm-moe (a smaller model: the fields, not the speed).
mpi 2 bench bench/lm-moe.yaml --steps 3 --skip 1 --threads 1 --set model.n_layers=2 \
    --set data.batch_size=4 > "$work/mpi.out" 2> "$work/mpi.err"
check $? "cmoe bench under mpirun -np 2 ($(tail -c 300 "$work/mpi.err"))"
tail -n 1 "$work/mpi.out" | grep -q '"ranks": 2, "threads": 1, .*"peak_rss_mib_sum": [0-9.]*, "alltoall_ms_median": [0-9.]*, "imbalance_wait_ms_median": [0-9.]*, "shadowed_per_call": [0-9.]*, "compute_ms_median": [0-9.]*}$'
check $? "2-rank RESULT line with the all-to-all ($(tail -n 1 "$work/mpi.out"))"
grep -q "all-to-all .* ms median per step" "$work/mpi.out"
check $? "2-rank all-to-all share printed"
# BENCH.md: no allocation of cmoe's own in a step at 2 ranks; Open MPI's
# are counted apart (the three sources add up to the total in each step, so
# the largest of each is at most the total's largest).
if ! $sanitized; then
    own=$(json allocs_own_per_step_max "$work/mpi.out")
    from_mpi=$(json allocs_mpi_per_step_max "$work/mpi.out")
    total=$(json allocs_per_step_max "$work/mpi.out")
    [ "$own" = "0" ] && [ -n "$from_mpi" ] && awk -v m="$from_mpi" -v t="${total:--1}" 'BEGIN { exit !(m <= t) }'
    check $? "2 ranks: no allocation from cmoe's code in a step (own $own, Open MPI $from_mpi, in all $total)"
fi

# parallel.shadow_float_cost reaches the MoE layers' decision: with moving a
# float nearly free (1 flop) auto shadows hot experts, at 1,000,000 flops
# none (the weights cost more to move than the rows they would keep home).
for cost in 1 1000000; do
    mpi 2 bench bench/lm-moe.yaml --steps 3 --skip 1 --threads 1 --set model.n_layers=2 \
        --set data.batch_size=4 --set parallel.shadow_experts=auto \
        --set parallel.shadow_float_cost=$cost > "$work/cost$cost.out" 2> "$work/cost$cost.err"
    check $? "cmoe bench, shadow_float_cost $cost ($(tail -c 300 "$work/cost$cost.err"))"
done
awk -v cheap="$(json shadowed_per_call "$work/cost1.out")" \
    -v dear="$(json shadowed_per_call "$work/cost1000000.out")" \
    'BEGIN { exit !(cheap > 0 && dear == 0) }'
check $? "auto shadows at 1 flop per float, not at 1,000,000 ($(json shadowed_per_call "$work/cost1.out"), $(json shadowed_per_call "$work/cost1000000.out"))"

# Usage errors.
"$cmoe" bench bench/lm-dense.yaml --steps 3 --skip 3 > "$work/bad.out" 2>&1
[ $? -eq 2 ] && grep -q "skip" "$work/bad.out"
check $? "--skip >= --steps is a usage error ($(head -c 300 "$work/bad.out"))"
"$cmoe" bench bench/lm-dense.yaml --frobnicate > "$work/bad.out" 2>&1
[ $? -eq 2 ] && grep -q "frobnicate" "$work/bad.out"
check $? "unknown option ($(head -c 300 "$work/bad.out"))"
"$cmoe" bench "$work/missing.yaml" > "$work/bad.out" 2>&1
[ $? -eq 1 ] && grep -q "missing.yaml" "$work/bad.out"
check $? "missing recipe ($(head -c 300 "$work/bad.out"))"
"$python" bench/torch_ref.py lm-dense --steps 2 --skip 2 > "$work/bad.out" 2>&1
[ $? -eq 2 ] && grep -q "skip" "$work/bad.out"
check $? "torch_ref.py --skip >= --steps ($(tail -c 300 "$work/bad.out"))"

# The side-by-side script on this build.
bash bench/run.sh --build "$build" --out "$work/run" --runs 1 --steps 2 --skip 1 \
    --models "lm-dense cnn-moe" > "$work/table.md" 2> "$work/run.err"
check $? "bench/run.sh ($(tail -c 400 "$work/run.err"))"
grep -q "^sgemm peak 1024³, 2 threads: [0-9.]* GFLOP/s" "$work/table.md"
check $? "run.sh measures the sgemm peak ($(head -n 1 "$work/table.md"))"
for model in lm-dense cnn-moe; do
    grep -q "^| $model.* | [0-9.]*× | " "$work/table.md"
    check $? "run.sh row of $model with the ratio ($(cat "$work/table.md"))"
done
bash bench/run.sh --models nonsense > "$work/bad.out" 2>&1
[ $? -eq 1 ] && grep -q "no recipe bench/nonsense.yaml" "$work/bad.out"
check $? "run.sh: unknown model ($(head -c 300 "$work/bad.out"))"

echo "test_bench: $passes passed, $failures failed"
[ "$failures" -eq 0 ]
