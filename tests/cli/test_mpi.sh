#!/usr/bin/env bash
# Expert parallelism end to end with mpirun: a 2-rank MoE run stopped halfway
# and resumed on 1 and on 4 ranks continues with the losses of an
# uninterrupted 2-rank run (1e-5 relative); one rank's error ends the job
# within seconds naming the rank and the reason; bad parallel settings fail
# before training; the README's SMoE-Dropout command works under mpirun.
# usage: test_mpi.sh PATH/TO/cmoe SOURCE_DIR
set -u
cmoe=$1
src=$2
work=$(mktemp -d /tmp/cmoe-mpi-XXXXXX)
trap 'rm -rf "$work"' EXIT
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
export OPENBLAS_NUM_THREADS=1

synthetic_corpus "$work/corpus.txt"
cat > "$work/tiny.yaml" <<YAML
name: tiny
model: {n_layers: 2, d_model: 32, n_heads: 2, d_ff: 64, dropout: 0.1}
moe: {enabled: true, num_experts: 4, split_dense: true}
router: {type: topk, k: 2, aux_loss_coef: 0.01, z_loss_coef: 0.001}
data: {path: $work/corpus.txt, valid_path: $work/corpus.txt, test_path: $work/corpus.txt, seq_len: 32, batch_size: 8}
optim: {lr: 3.0e-3, grad_clip: 1.0}
train: {steps: 16, log_every: 1, eval_every: 0, arena_mib: 64, threads: 1}
checkpoint: {every: 0, keep_last: 0}
YAML

# loss_last of steps FROM..16 of a run, one per line
losses() { grep '"kind": "train"' "$1/metrics.jsonl" |
    sed 's/.*"step": \([0-9]*\),.*"loss_last": \([-0-9.e]*\),.*/\1 \2/' | awk -v from="$2" '$1 >= from'; }
same_losses() { # same_losses A B: relative difference at most 1e-5 on every line
    paste "$1" "$2" | awk '{ d = $2 - $4; if (d < 0) d = -d; r = $4 < 0 ? -$4 : $4;
                             if ($1 != $3 || d > 1e-5 * r) bad++ } END { exit (NR == 0 || bad) }'
}

mpi 2 train "$work/tiny.yaml" --set train.out_dir="$work/straight" --quiet > "$work/out" 2>&1
check $? "2-rank run ($(tail -c 300 "$work/out"))"
losses "$work/straight" 9 > "$work/straight.txt"

mpi 2 train "$work/tiny.yaml" --set train.out_dir="$work/half" --stop-at 8 --quiet > "$work/out" 2>&1
[ $? -eq 130 ]
check $? "2-rank run stops at step 8 with status 130 ($(tail -c 300 "$work/out"))"
[ -s "$work/half/ckpt-00000008.h5" ]
check $? "checkpoint at step 8"
for ranks in 1 4; do
    cp -r "$work/half" "$work/resume$ranks"
    mpi "$ranks" train "$work/tiny.yaml" --set train.out_dir="$work/resume$ranks" --resume auto \
        --quiet > "$work/out" 2>&1
    check $? "resume on $ranks ranks ($(tail -c 300 "$work/out"))"
    losses "$work/resume$ranks" 9 > "$work/resume$ranks.txt"
    same_losses "$work/resume$ranks.txt" "$work/straight.txt"
    check $? "resumed on $ranks ranks = uninterrupted 2 ranks: $(paste "$work/resume$ranks.txt" "$work/straight.txt" | tail -n 2 | tr '\n' ' ')"
done

# Shadowing hot experts (parallel.shadow_experts) changes where their rows
# are computed, not the result: a 2-rank run with shadowing forced, stopped
# halfway and resumed (still forced) on 2 and on 4 ranks, continues with the
# losses of the uninterrupted 2-rank run without shadowing. (On this config
# force shadows 0.8 experts per layer call on average at 2 ranks and 0.9 at
# 4, as `cmoe bench` reports; tests/mpi/test_moe_mpi.c checks that it
# shadows.)
shadow=(--set parallel.shadow_experts=force)
mpi 2 train "$work/tiny.yaml" "${shadow[@]}" --set train.out_dir="$work/shalf" --stop-at 8 --quiet \
    > "$work/out" 2>&1
[ $? -eq 130 ]
check $? "2-rank run with shadowing stops at step 8 ($(tail -c 300 "$work/out"))"
for ranks in 2 4; do
    cp -r "$work/shalf" "$work/sresume$ranks"
    mpi "$ranks" train "$work/tiny.yaml" "${shadow[@]}" --set train.out_dir="$work/sresume$ranks" \
        --resume auto --quiet > "$work/out" 2>&1
    check $? "resume with shadowing on $ranks ranks ($(tail -c 300 "$work/out"))"
    losses "$work/sresume$ranks" 9 > "$work/sresume$ranks.txt"
    same_losses "$work/sresume$ranks.txt" "$work/straight.txt"
    check $? "shadowed, resumed on $ranks ranks = unshadowed 2 ranks: $(paste "$work/sresume$ranks.txt" "$work/straight.txt" | tail -n 2 | tr '\n' ' ')"
done

# Untouched experts are skipped by the optimizer; with expert replicas on
# both ranks (expert_parallel 1: data parallel) an expert counts as used when
# either rank routed a token to it, so the replicas stay equal (checked
# before every checkpoint) and the run equals one process. 16 experts, k 1
# and 8 tokens per rank leave experts that only one rank uses.
sparse=(--set moe.num_experts=16 --set router.k=1 --set data.batch_size=2 --set data.seq_len=8
        --set train.steps=6 --set parallel.expert_parallel=1)
"$cmoe" train "$work/tiny.yaml" "${sparse[@]}" --set train.out_dir="$work/sparse1" --quiet \
    > "$work/out" 2>&1
check $? "sparse top-1, one process ($(tail -c 300 "$work/out"))"
mpi 2 train "$work/tiny.yaml" "${sparse[@]}" --set train.out_dir="$work/sparse2" --quiet \
    > "$work/out" 2>&1
check $? "sparse top-1, 2 data-parallel ranks ($(tail -c 300 "$work/out"))"
losses "$work/sparse1" 1 > "$work/sparse1.txt"
losses "$work/sparse2" 1 > "$work/sparse2.txt"
same_losses "$work/sparse2.txt" "$work/sparse1.txt"
check $? "2 data-parallel ranks skip the same experts as one process: $(paste "$work/sparse2.txt" "$work/sparse1.txt" | tail -n 2 | tr '\n' ' ')"

start=$(date +%s)
mpi 2 train "$work/tiny.yaml" --set train.out_dir="$work/fail" --quiet --inject-failure 1:3 \
    > "$work/fail.out" 2>&1
status=$?
elapsed=$(($(date +%s) - start))
[ $status -ne 0 ] && [ $elapsed -lt 30 ]
check $? "a failing rank ends the job (status $status after ${elapsed}s)"
grep -q "\[rank 1\] error: cmoe train: failure injected" "$work/fail.out"
check $? "the message names the rank and the reason ($(head -c 300 "$work/fail.out"))"

mpi 2 train "$work/tiny.yaml" --set parallel.expert_parallel=3 --set train.out_dir="$work/bad" \
    > "$work/bad.out" 2>&1
[ $? -ne 0 ] && grep -q "parallel.expert_parallel = 3 does not divide the 2 ranks" "$work/bad.out"
check $? "EP not dividing the world is refused ($(head -c 300 "$work/bad.out"))"
mpi 3 train "$work/tiny.yaml" --set train.out_dir="$work/bad3" > "$work/bad3.out" 2>&1
[ $? -ne 0 ] && grep -q "moe.num_experts = 4 cannot be split evenly over 3" "$work/bad3.out"
check $? "experts not dividing EP is refused ($(head -c 300 "$work/bad3.out"))"

# The README's command, shortened: SMoE-Dropout under mpirun on 2 ranks.
mpi 2 train "$src/recipes/lm/smoe-dropout.yaml" --set data.path="$work/corpus.txt" \
    --set data.valid_path="$work/corpus.txt" --set data.test_path="$work/corpus.txt" \
    --set model.n_layers=1 --set model.d_model=32 --set model.n_heads=2 --set model.d_ff=64 \
    --set data.seq_len=32 --set data.batch_size=8 --set train.steps=6 \
    --set schedule.warmup_steps=1 --set train.eval_every=3 --set train.eval_batches=2 \
    --set train.arena_mib=64 --set train.out_dir="$work/smoe" > "$work/smoe.out" 2>&1
check $? "smoe-dropout recipe under mpirun -np 2 ($(tail -c 300 "$work/smoe.out"))"
grep -q "2 ranks: 2 expert-parallel x 1 data-parallel" "$work/smoe.out"
check $? "2 ranks reported"

# Stopping a multi-rank run: SIGUSR1 to mpirun, which forwards it to every
# rank (it answers SIGINT by killing the job): the ranks save and exit 130,
# and so does mpirun; --resume auto continues.
mpirun --allow-run-as-root --oversubscribe -np 2 -x OPENBLAS_NUM_THREADS=1 "$cmoe" train \
    "$work/tiny.yaml" --set train.steps=1000000 --set train.out_dir="$work/usr1" \
    > "$work/usr1.out" 2>&1 &
pid=$!
for _ in $(seq 1 200); do
    grep -q "step " "$work/usr1.out" 2> /dev/null && break
    sleep 0.1
done
sleep 1
kill -USR1 $pid
( sleep 60 && kill -KILL $pid 2> /dev/null ) &
watchdog=$!
wait $pid
status=$?
kill $watchdog 2> /dev/null
[ $status -eq 130 ] && grep -q "stopped at step" "$work/usr1.out"
check $? "SIGUSR1 to mpirun stops every rank: exit 130 (got $status: $(tail -c 300 "$work/usr1.out"))"
usr1_ckpt=$(ls "$work"/usr1/ckpt-*.h5 2> /dev/null | tail -n 1)
[ -n "$usr1_ckpt" ]
check $? "the stop saved a checkpoint"

echo "$passes passed, $failures failed"
[ $failures -eq 0 ]
