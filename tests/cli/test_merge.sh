#!/usr/bin/env bash
# `cmoe merge` end to end (MC-SMoE, METHODS.md 10): a tiny top-2 MoE LM (8
# experts per layer) trained 20 steps is merged to 4 groups on average; the
# summary, `cmoe inspect` (/merged_from, the frozen group tables) and
# `cmoe eval` work, --groups 8 gives the source's test loss exactly and 4
# another; `cmoe train --init` trains the merged model, stops and resumes
# with --resume auto to the losses of an uninterrupted run; under mpirun
# with 2 expert-parallel ranks it gives the 1-process losses (1e-5
# relative); the ablation options run; every bad input is refused naming
# the problem (exit status 1; usage errors 2).
# usage: test_merge.sh PATH/TO/cmoe SOURCE_DIR
set -u
cmoe=$1
work=$(mktemp -d /tmp/cmoe-merge-XXXXXX)
trap 'rm -rf "$work"' EXIT
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
export OPENBLAS_NUM_THREADS=1

synthetic_corpus "$work/corpus.txt"
head -c 8192 "$work/corpus.txt" > "$work/test.txt"
cat > "$work/moe.yaml" <<YAML
name: moe
model: {n_layers: 2, d_model: 32, n_heads: 2, d_ff: 64}
moe: {enabled: true, num_experts: 8, expert_hidden: 16}
router: {type: topk, k: 2, gating: topk_softmax, aux_loss_coef: 0.01}
data: {path: $work/corpus.txt, valid_path: $work/test.txt, test_path: $work/test.txt, seq_len: 32, batch_size: 8}
optim: {lr: 3.0e-3, grad_clip: 1.0}
train: {steps: 20, log_every: 1, eval_every: 0, arena_mib: 64, threads: 1}
checkpoint: {every: 0, keep_last: 2}
YAML

"$cmoe" train "$work/moe.yaml" --set train.out_dir="$work/moe" --quiet > "$work/out" 2>&1
check $? "train the MoE model ($(tail -c 300 "$work/out"))"
source_ckpt=$work/moe/ckpt-00000020.h5

"$cmoe" merge "$source_ckpt" -o "$work/m.h5" --groups 4 --calib-windows 64 > "$work/merge.out" 2>&1
check $? "merge ($(cat "$work/merge.out"))"
grep -q "merged $source_ckpt -> $work/m.h5: 2 MoE layers, [0-9]* groups of 16 experts (--groups 4 on average), 2048 calibration tokens (4096 selections, k 2)" "$work/merge.out" &&
    grep -q "^block 1: [0-9] groups of 8 experts" "$work/merge.out" &&
    grep -q "^  group 0: 0" "$work/merge.out" && grep -q "calibration: 64/64 windows" "$work/merge.out"
check $? "the summary and progress are printed ($(head -c 800 "$work/merge.out"))"
"$cmoe" inspect "$work/m.h5" > "$work/inspect.out" 2>&1
grep -q "step 0, seed 1234, optimizer step 0" "$work/inspect.out" &&
    grep -q "merged from $source_ckpt (step 20, seed 1234): MC-SMoE merge: groups 4" "$work/inspect.out" &&
    grep -q "blocks.1.moe.group_of  *\[8\]  *8  frozen" "$work/inspect.out" &&
    grep -q "merged: true" "$work/inspect.out"
check $? "inspect: step 0, the origin, the group tables ($(head -c 600 "$work/inspect.out"))"

test_loss() { "$cmoe" eval --ckpt "$1" --split test | sed -n 's/.*loss \([0-9.]*\) nats.*/\1/p'; }
source_loss=$(test_loss "$source_ckpt")
merged_loss=$(test_loss "$work/m.h5")
"$cmoe" merge "$source_ckpt" -o "$work/all.h5" --groups 8 --quiet > /dev/null 2>&1
all_loss=$(test_loss "$work/all.h5")
[ -n "$source_loss" ] && [ "$all_loss" = "$source_loss" ]
check $? "--groups 8 keeps the test loss: $source_loss vs $all_loss"
awk -v a="$source_loss" -v b="$merged_loss" 'BEGIN { exit !(b > 0 && a != b) }'
check $? "merging 8 -> 4 changes it: $source_loss vs $merged_loss"

for options in "--grouping random --align off --weights uniform" "--mode prune" "--layers 1"; do
    # shellcheck disable=SC2086
    "$cmoe" merge "$source_ckpt" -o "$work/arm.h5" --groups 4 --quiet $options > "$work/arm.out" 2>&1 &&
        [ -n "$(test_loss "$work/arm.h5")" ]
    check $? "merge $options runs and evaluates ($(tail -c 300 "$work/arm.out"))"
done
grep -q "^block 0: 8 groups of 8 experts (not merged)" "$work/arm.out"
check $? "--layers 1 leaves block 0 whole ($(head -c 400 "$work/arm.out"))"

# train the merged model: straight, and stopped at 4 then resumed
merged=(--set moe.merged=true --set train.steps=8 --init "$work/m.h5" --quiet)
"$cmoe" train "$work/moe.yaml" "${merged[@]}" --set train.out_dir="$work/straight" > "$work/t.out" 2>&1
check $? "train --init the merged model ($(tail -c 300 "$work/t.out"))"
"$cmoe" train "$work/moe.yaml" "${merged[@]}" --set train.out_dir="$work/half" --stop-at 4 > "$work/r.out" 2>&1
check $(($? != 130)) "--stop-at 4 stops with 130 ($(tail -c 300 "$work/r.out"))"
"$cmoe" train "$work/moe.yaml" "${merged[@]}" --set train.out_dir="$work/half" --resume auto > "$work/r.out" 2>&1
check $? "--resume auto continues ($(tail -c 300 "$work/r.out"))"
losses() { grep '"kind": "train"' "$1/metrics.jsonl" |
    sed 's/.*"step": \([0-9]*\),.*"loss_last": \([-0-9.e]*\),.*/\1 \2/' | awk -v from="$2" '$1 >= from'; }
losses "$work/straight" 5 > "$work/straight.txt"
losses "$work/half" 5 > "$work/half.txt"
[ -s "$work/straight.txt" ] && cmp -s "$work/straight.txt" "$work/half.txt"
check $? "the resumed run has the losses of the straight one ($(paste "$work/straight.txt" "$work/half.txt" | head -3))"
mpi 2 train "$work/moe.yaml" "${merged[@]}" --set train.out_dir="$work/mpi" > "$work/mpi.out" 2>&1
check $? "train --init on 2 expert-parallel ranks ($(tail -c 300 "$work/mpi.out"))"
losses "$work/straight" 1 > "$work/one.txt"
losses "$work/mpi" 1 > "$work/two.txt"
paste "$work/one.txt" "$work/two.txt" | awk '{ d = $2 - $4; if (d < 0) d = -d; r = $2 < 0 ? -$2 : $2;
    if ($1 != $3 || d > 1e-5 * r) bad++ } END { exit (NR != 8 || bad) }'
check $? "2 ranks give the 1-process losses ($(paste "$work/one.txt" "$work/two.txt" | head -3))"

# refusals
refused() { # refused STATUS PATTERN ARGS...: cmoe ARGS exits STATUS naming PATTERN
    local status=$1 pattern=$2
    shift 2
    "$cmoe" "$@" > "$work/bad.out" 2>&1
    local got=$?
    [ "$got" -eq "$status" ] && grep -q -- "$pattern" "$work/bad.out"
    check $? "cmoe $* exits $status with '$pattern' (got $got: $(head -c 300 "$work/bad.out"))"
}
"$cmoe" train "$work/moe.yaml" --set moe.enabled=false --set train.steps=2 \
    --set train.out_dir="$work/dense" --quiet > /dev/null 2>&1
refused 1 "dense model" merge "$work/dense/ckpt-00000002.h5" -o "$work/x.h5"
refused 1 "already merged" merge "$work/m.h5" -o "$work/x.h5"
refused 1 "--groups 9 is not in \[1, 8\]" merge "$source_ckpt" -o "$work/x.h5" --groups 9
refused 1 "block 5, which is not an MoE layer" merge "$source_ckpt" -o "$work/x.h5" --layers 5
refused 1 "$work/none.h5" merge "$work/none.h5" -o "$work/x.h5"
refused 2 "unexpected argument '--bogus'" merge "$source_ckpt" -o "$work/x.h5" --bogus
refused 2 "needs CKPT and -o OUT.h5" merge "$source_ckpt"
refused 2 "unknown value for its option: 'kmeans'" merge "$source_ckpt" -o "$work/x.h5" --grouping kmeans
refused 2 "--groups takes a count" merge "$source_ckpt" -o "$work/x.h5" --groups 0
refused 2 "--layers takes all or block indices" merge "$source_ckpt" -o "$work/x.h5" --layers 0,x
refused 2 "would overwrite" merge "$source_ckpt" -o "$source_ckpt"
refused 1 "is a merged model.*--set moe.merged=true" train "$work/moe.yaml" --init "$work/m.h5" --set train.out_dir="$work/nomerge" --quiet
"$cmoe" merge --help | grep -q "usage: cmoe merge CKPT -o OUT.h5"
check $? "--help"

echo "test_merge.sh: $passes passed, $failures failed"
[ "$failures" -eq 0 ]
