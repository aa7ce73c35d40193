#!/usr/bin/env bash
# Null experts, auxiliary-loss-free balancing and RMoE end to end with
# mpirun (recipes/lm/null-experts.yaml, bias-balance.yaml and rmoe.yaml
# shrunk with --set):
#  - 2 ranks with expert parallelism give the losses of one process (1e-5
#    relative), and the same selection biases;
#  - a 2-rank run stopped at step 8 and resumed on 2 ranks continues bit for
#    bit (every loss_last as printed, every parameter of the final
#    checkpoint, the biases included); resumed on 1 rank, within 1e-5;
#  - bias balancing: the biases moved (multiples of u, at most one u per
#    optimizer step), and 2 micro-batches of 4 (train.grad_accum) end with
#    the biases of one batch of 8 (the loads of a step are summed before
#    its single update);
#  - null experts: the evaluation lines count true experts per token
#    (0 < mean_k < k);
#  - rmoe: the loss falls, the checkpoint holds one shared GRU
#    (router_gru.*) and each layer's proj_weight and weight with their
#    shapes, and the state carried across layers matters (rnn_state zero
#    trains to other losses).
# usage: test_mpi_routers.sh PATH/TO/cmoe SOURCE_DIR
set -u
cmoe=$1
src=$2
python=/usr/bin/python3
work=$(mktemp -d /tmp/cmoe-mpi-routers-XXXXXX)
trap 'rm -rf "$work"' EXIT
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
export OPENBLAS_NUM_THREADS=1

synthetic_corpus "$work/corpus.txt"
head -c 8193 "$work/corpus.txt" > "$work/test.txt"
tiny=(--set data.path="$work/corpus.txt" --set data.valid_path="$work/test.txt"
    --set data.test_path="$work/test.txt" --set model.n_layers=2 --set model.d_model=32
    --set model.n_heads=2 --set model.d_ff=64 --set data.seq_len=32 --set data.batch_size=8
    --set train.steps=16 --set train.log_every=1 --set train.eval_every=8
    --set train.eval_batches=2 --set schedule.warmup_steps=2 --set optim.lr=3e-3
    --set router.init_std=0.3 --set train.arena_mib=64 --set train.threads=1
    --set checkpoint.every=0 --set checkpoint.keep_last=0 --quiet)

# (parallel.expert_parallel 0: every rank holds a share of the experts)

# loss_last of steps FROM..16 of a run, one per line, as printed
losses() { grep '"kind": "train"' "$1/metrics.jsonl" |
    sed 's/.*"step": \([0-9]*\),.*"loss_last": \([-0-9.e]*\),.*/\1 \2/' | awk -v from="$2" '$1 >= from'; }
same_losses() { # same_losses A B: relative difference at most 1e-5 on every line
    paste "$1" "$2" | awk '{ d = $2 - $4; if (d < 0) d = -d; r = $4 < 0 ? -$4 : $4;
                             if ($1 != $3 || d > 1e-5 * r) bad++ } END { exit (NR == 0 || bad) }'
}
# params DIR: "name sha256" of every parameter of the run's step-16 checkpoint
params() {
    "$python" - "$1/ckpt-00000016.h5" <<'PY'
import hashlib, sys
import h5py
with h5py.File(sys.argv[1], "r") as f:
    for name in sorted(f["params"]):
        print(name, hashlib.sha256(f["params"][name][()].tobytes()).hexdigest())
PY
}
# biases DIR: the expert_bias datasets of the step-16 checkpoint, one value a line
biases() {
    "$python" - "$1/ckpt-00000016.h5" <<'PY'
import sys
import h5py
with h5py.File(sys.argv[1], "r") as f:
    for name in sorted(f["params"]):
        if name.endswith("expert_bias"):
            print("\n".join("%.9g" % v for v in f["params"][name][()]))
PY
}
train() { # train NAME RANKS RECIPE ARGS...: a run in $work/NAME
    local name=$1 ranks=$2 recipe=$3
    shift 3
    if [ "$ranks" = 1 ]; then
        "$cmoe" train "$src/recipes/lm/$recipe.yaml" "${tiny[@]}" --set train.out_dir="$work/$name" \
            "$@" > "$work/$name.out" 2>&1
    else
        mpi "$ranks" train "$src/recipes/lm/$recipe.yaml" "${tiny[@]}" \
            --set train.out_dir="$work/$name" "$@" > "$work/$name.out" 2>&1
    fi
}

for recipe in null-experts bias-balance rmoe; do
    set_rate=()
    [ "$recipe" = bias-balance ] && set_rate=(--set router.bias_update_rate=0.01)
    train "$recipe-1" 1 "$recipe" "${set_rate[@]}"
    check $? "$recipe: one process ($(tail -c 300 "$work/$recipe-1.out"))"
    train "$recipe-2" 2 "$recipe" "${set_rate[@]}"
    check $? "$recipe: 2 ranks ($(tail -c 300 "$work/$recipe-2.out"))"
    losses "$work/$recipe-1" 1 > "$work/$recipe-1.txt"
    losses "$work/$recipe-2" 1 > "$work/$recipe-2.txt"
    same_losses "$work/$recipe-2.txt" "$work/$recipe-1.txt"
    check $? "$recipe: 2 ranks = one process: $(paste "$work/$recipe-2.txt" "$work/$recipe-1.txt" | tail -n 2 | tr '\n' ' ')"

    train "$recipe-half" 2 "$recipe" "${set_rate[@]}" --stop-at 8
    [ $? -eq 130 ] && [ -s "$work/$recipe-half/ckpt-00000008.h5" ]
    check $? "$recipe: 2 ranks stop at step 8 with a checkpoint ($(tail -c 300 "$work/$recipe-half.out"))"
    for ranks in 2 1; do
        cp -r "$work/$recipe-half" "$work/$recipe-resume$ranks"
        train "$recipe-resume$ranks" "$ranks" "$recipe" "${set_rate[@]}" --resume auto
        check $? "$recipe: resume on $ranks ranks ($(tail -c 300 "$work/$recipe-resume$ranks.out"))"
        losses "$work/$recipe-resume$ranks" 9 > "$work/$recipe-resume$ranks.txt"
    done
    losses "$work/$recipe-2" 9 > "$work/$recipe-2-tail.txt"
    cmp -s "$work/$recipe-resume2.txt" "$work/$recipe-2-tail.txt" && [ -s "$work/$recipe-2-tail.txt" ]
    check $? "$recipe: resumed on 2 ranks = uninterrupted, bit for bit: $(paste "$work/$recipe-resume2.txt" "$work/$recipe-2-tail.txt" | tail -n 2 | tr '\n' ' ')"
    [ "$(params "$work/$recipe-resume2")" = "$(params "$work/$recipe-2")" ]
    check $? "$recipe: resumed on 2 ranks ends with the same parameters, every bit"
    same_losses "$work/$recipe-resume1.txt" "$work/$recipe-2-tail.txt"
    check $? "$recipe: resumed on 1 rank = uninterrupted 2 ranks: $(paste "$work/$recipe-resume1.txt" "$work/$recipe-2-tail.txt" | tail -n 2 | tr '\n' ' ')"
done

# Bias balancing: the biases moved by whole steps of u = 0.01, at most one
# per optimizer step (16), the same with 1 process and 2 ranks.
biases "$work/bias-balance-1" > "$work/bias1.txt"
biases "$work/bias-balance-2" > "$work/bias2.txt"
awk '{ steps = $1 / 0.01; r = steps - int(steps + (steps < 0 ? -0.5 : 0.5));
       if (r > 1e-3 || r < -1e-3 || steps > 16.001 || steps < -16.001) bad++;
       if ($1 != 0) moved++ }
     END { exit (NR != 16 || bad || moved < 8) }' "$work/bias1.txt"
check $? "bias-balance: 16 biases, whole steps of u, at most 16, most moved: $(tr '\n' ' ' < "$work/bias1.txt")"
cmp -s "$work/bias1.txt" "$work/bias2.txt"
check $? "bias-balance: 2 ranks end with the biases of one process"
# train.grad_accum 2 x batch 4 is the same 8 windows per step as 1 x 8: the
# loads of both micro-batches make one update.
train bias-accum 1 bias-balance --set router.bias_update_rate=0.01 --set train.grad_accum=2 \
    --set data.batch_size=4
check $? "bias-balance: grad_accum 2 ($(tail -c 300 "$work/bias-accum.out"))"
biases "$work/bias-accum" > "$work/bias-accum.txt"
cmp -s "$work/bias-accum.txt" "$work/bias1.txt"
check $? "bias-balance: 2 micro-batches of 4 end with the biases of batches of 8: $(paste "$work/bias-accum.txt" "$work/bias1.txt" | head -n 4 | tr '\n' ' ')"

# Null experts: the evaluation lines count true experts per token.
grep '"kind": "test"' "$work/null-experts-2/metrics.jsonl" |
    sed 's/.*"mean_k": \([0-9.]*\),.*/\1/' | awk '{ exit !(NR == 1 && $1 > 0 && $1 < 3) }'
check $? "null-experts: test mean_k (true experts per token) in (0, 3): $(grep '"kind": "test"' "$work/null-experts-2/metrics.jsonl")"
grep -q '"load_max_over_mean"' "$work/null-experts-2/metrics.jsonl"
check $? "load_max_over_mean is logged"

# RMoE: it learns; the checkpoint's names and shapes; recurrence off (zero) differs.
awk 'NR == 1 { first = $2 } END { exit !(NR == 16 && $2 < first - 0.5) }' "$work/rmoe-1.txt"
check $? "rmoe: the loss falls by more than 0.5 nats over 16 steps: $(head -n 1 "$work/rmoe-1.txt" | tr '\n' ' ') -> $(tail -n 1 "$work/rmoe-1.txt")"
"$python" - "$work/rmoe-2/ckpt-00000016.h5" > "$work/rmoe-names.txt" <<'PY'
import sys
import h5py
with h5py.File(sys.argv[1], "r") as f:
    for name in sorted(f["params"]):
        if "router" in name:
            print(name, "x".join(str(n) for n in f["params"][name].shape))
PY
expected="blocks.0.moe.router.proj_weight 64x32
blocks.0.moe.router.weight 8x64
blocks.1.moe.router.proj_weight 64x32
blocks.1.moe.router.weight 8x64
router_gru.bias_hh 192
router_gru.bias_ih 192
router_gru.weight_hh 192x64
router_gru.weight_ih 192x64"
[ "$(cat "$work/rmoe-names.txt")" = "$expected" ]
check $? "rmoe: checkpoint router names and shapes: $(tr '\n' ',' < "$work/rmoe-names.txt")"
train rmoe-off 1 rmoe --set router.rnn_state=zero
check $? "rmoe: rnn_state zero ($(tail -c 300 "$work/rmoe-off.out"))"
losses "$work/rmoe-off" 1 > "$work/rmoe-off.txt"
! cmp -s "$work/rmoe-off.txt" "$work/rmoe-1.txt"
check $? "rmoe: recurrence off trains to other losses than carry"

echo "$passes passed, $failures failed"
[ $failures -eq 0 ]
