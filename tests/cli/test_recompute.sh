#!/usr/bin/env bash
# train.recompute end to end (recipes/lm/moe-top2.yaml shrunk with --set):
#  - experts and all train to the results of none, bit for bit: every
#    metrics line (losses, bpc, grad_norm, aux loss, routing; the throughput
#    removed) and every parameter of the final checkpoint (so every gradient
#    of every step agreed), for gelu, gelu with expert dropout and swiglu
#    with expert dropout (residual dropout 0.1 throughout), in one process
#    with two threads and on 2 ranks with expert parallelism; and all on the
#    dense model (every half of every block checkpointed), 1 and 2 ranks;
#  - experts needs a smaller step arena than none, all a smaller one still
#    (the high-water mark the run prints);
#  - the key is not model-defining: a run stopped at step 5 with none and
#    resumed with experts continues as the uninterrupted run, bit for bit;
#  - experts without MoE layers is refused.
# usage: test_recompute.sh PATH/TO/cmoe SOURCE_DIR
set -u
cmoe=$1
src=$2
python=/usr/bin/python3
work=$(mktemp -d /tmp/cmoe-recompute-XXXXXX)
trap 'rm -rf "$work"' EXIT
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
export OPENBLAS_NUM_THREADS=1

synthetic_corpus "$work/corpus.txt"
head -c 8193 "$work/corpus.txt" > "$work/test.txt"
# experts of 96 hidden units (not d_ff / 8), so h is the layer's largest tensor
tiny=(--set data.path="$work/corpus.txt" --set data.valid_path="$work/test.txt"
    --set data.test_path="$work/test.txt" --set model.n_layers=2 --set model.d_model=32
    --set model.n_heads=2 --set model.d_ff=64 --set model.dropout=0.1 --set moe.split_dense=false
    --set moe.expert_hidden=96 --set data.seq_len=32 --set data.batch_size=8
    --set train.steps=10 --set train.log_every=1 --set train.eval_every=5
    --set train.eval_batches=2 --set schedule.warmup_steps=2 --set optim.lr=3e-3
    --set router.init_std=0.3 --set train.arena_mib=64 --set checkpoint.every=0
    --set checkpoint.keep_last=0)

# logged DIR: every metrics line, the throughput (tok_s) removed
logged() { sed 's/, "tok_s": [-0-9.e+]*//' "$1/metrics.jsonl"; }
# params DIR: "name sha256" of every parameter of the final checkpoint
params() {
    "$python" - "$1/ckpt-00000010.h5" <<'PY'
import hashlib, sys
import h5py
with h5py.File(sys.argv[1], "r") as f:
    for name in sorted(f["params"]):
        print(name, hashlib.sha256(f["params"][name][()].tobytes()).hexdigest())
PY
}
# arena OUT: the step arena's high-water mark (MiB) the run printed
arena() { sed -n 's/.*step arena: \([0-9.]*\) MiB used.*/\1/p' "$1" | head -n 1; }
recipe=moe-top2
train() { # train NAME RANKS ARGS...: a run of $recipe in $work/NAME
    local name=$1 ranks=$2
    shift 2
    if [ "$ranks" = 1 ]; then
        "$cmoe" train "$src/recipes/lm/$recipe.yaml" "${tiny[@]}" --set train.threads=2 \
            --set train.out_dir="$work/$name" "$@" > "$work/$name.out" 2>&1
    else
        mpi "$ranks" train "$src/recipes/lm/$recipe.yaml" "${tiny[@]}" --set train.threads=1 \
            --set train.out_dir="$work/$name" "$@" > "$work/$name.out" 2>&1
    fi
}
# same_as_none NAME RANKS MODE: the MODE run logged and ended as the none run
same_as_none() {
    local none=$work/$1-$2-none other=$work/$1-$2-$3
    [ "$(grep -c '"kind": "train"' "$none/metrics.jsonl")" = 10 ] &&
        grep -q '"kind": "test"' "$none/metrics.jsonl"
    check $? "$1, $2 ranks: 10 train lines and a test line"
    cmp -s <(logged "$none") <(logged "$other")
    check $? "$1, $2 ranks: recompute $3 logs what none logs, bit for bit: $(diff <(logged "$none") <(logged "$other") | head -n 4)"
    [ "$(params "$none")" = "$(params "$other")" ] && [ -n "$(params "$none")" ]
    check $? "$1, $2 ranks: recompute $3 ends with the parameters of none, every bit"
}

variants=("gelu" "gelu-dropout" "swiglu-dropout")
variant_args() {
    case "$1" in
    gelu) echo "--set moe.activation=gelu" ;;
    gelu-dropout) echo "--set moe.activation=gelu --set moe.expert_dropout=0.2" ;;
    swiglu-dropout) echo "--set moe.activation=swiglu --set moe.expert_dropout=0.2" ;;
    esac
}
for variant in "${variants[@]}"; do
    read -r -a extra <<< "$(variant_args "$variant")"
    for ranks in 1 2; do
        for mode in none experts all; do
            train "$variant-$ranks-$mode" "$ranks" "${extra[@]}" --set train.recompute=$mode
            check $? "$variant, $ranks ranks, recompute $mode ($(tail -c 300 "$work/$variant-$ranks-$mode.out"))"
        done
        same_as_none "$variant" "$ranks" experts
        same_as_none "$variant" "$ranks" all
    done
    none=$(arena "$work/$variant-1-none.out")
    experts=$(arena "$work/$variant-1-experts.out")
    all=$(arena "$work/$variant-1-all.out")
    awk -v none="$none" -v experts="$experts" -v all="$all" \
        'BEGIN { exit !(all > 0 && all < experts && experts < none) }'
    check $? "$variant: step arena none > experts > all: $none, $experts, $all MiB"
done
# (the swiglu runs differ from the gelu ones, and dropout changes the losses:
# the variants test different paths)
! cmp -s <(logged "$work/gelu-1-none") <(logged "$work/gelu-dropout-1-none")
check $? "expert dropout changes what is logged"

# Stopped with none, resumed with experts: the uninterrupted none run.
read -r -a extra <<< "$(variant_args swiglu-dropout)"
train half 1 "${extra[@]}" --set train.recompute=none --stop-at 5
[ $? -eq 130 ] && [ -s "$work/half/ckpt-00000005.h5" ]
check $? "stop at step 5 with a checkpoint ($(tail -c 300 "$work/half.out"))"
train half 1 "${extra[@]}" --set train.recompute=experts --resume auto
check $? "resume with recompute experts ($(tail -c 300 "$work/half.out"))"
tail_from6() { logged "$1" | grep -v '"kind": "model"' | awk '/"step": [6-9],|"step": 10,/'; }
[ -n "$(tail_from6 "$work/half")" ] &&
    cmp -s <(tail_from6 "$work/half") <(tail_from6 "$work/swiglu-dropout-1-none")
check $? "resumed with experts = uninterrupted none from step 6, bit for bit: $(diff <(tail_from6 "$work/half") <(tail_from6 "$work/swiglu-dropout-1-none") | head -n 4)"
[ "$(params "$work/half")" = "$(params "$work/swiglu-dropout-1-none")" ]
check $? "resumed with experts ends with the parameters of none, every bit"

# all on the dense model: both halves of every block are checkpointed
recipe=dense
for ranks in 1 2; do
    for mode in none all; do
        train "dense-$ranks-$mode" "$ranks" --set train.recompute=$mode
        check $? "dense, $ranks ranks, recompute $mode ($(tail -c 300 "$work/dense-$ranks-$mode.out"))"
    done
    same_as_none dense "$ranks" all
done
awk -v none="$(arena "$work/dense-1-none.out")" -v all="$(arena "$work/dense-1-all.out")" \
    'BEGIN { exit !(all > 0 && all < none) }'
check $? "dense: a smaller step arena with recompute all: $(arena "$work/dense-1-all.out") MiB, none $(arena "$work/dense-1-none.out") MiB"
train dense-experts 1 --set train.recompute=experts
status=$?
[ $status -ne 0 ] && grep -q "train.recompute experts needs moe.enabled: true" "$work/dense-experts.out"
check $? "train.recompute experts without MoE layers is refused: $(tail -c 300 "$work/dense-experts.out")"

echo "$passes passed, $failures failed"
[ $failures -eq 0 ]
