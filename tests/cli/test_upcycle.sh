#!/usr/bin/env bash
# `cmoe upcycle` and `cmoe train --init` end to end: a tiny dense LM trained
# 20 steps on a synthetic text is upcycled to E8G4T4 (topK-then-softmax,
# virtual groups, output scaling); `cmoe eval` gives the upcycled model the
# dense model's test loss (1e-6 relative) and one without scaling another;
# `train --init` runs, stops and resumes with `--resume auto` to the losses of
# an uninterrupted run; on 2 ranks (expert parallel) it gives the 1-rank
# losses (1e-5 relative); every bad input is refused naming the problem (exit
# status 1; usage errors 2).
# usage: test_upcycle.sh PATH/TO/cmoe SOURCE_DIR
set -u
cmoe=$1
src=$2
work=$(mktemp -d /tmp/cmoe-upcycle-XXXXXX)
trap 'rm -rf "$work"' EXIT
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
export OPENBLAS_NUM_THREADS=1

synthetic_corpus "$work/corpus.txt"
head -c 8192 "$work/corpus.txt" > "$work/test.txt"
cat > "$work/dense.yaml" <<YAML
name: dense
model: {n_layers: 2, d_model: 32, n_heads: 2, d_ff: 64}
data: {path: $work/corpus.txt, valid_path: $work/test.txt, test_path: $work/test.txt, seq_len: 32, batch_size: 8}
optim: {lr: 3.0e-3, grad_clip: 1.0}
train: {steps: 20, log_every: 1, eval_every: 0, arena_mib: 64, threads: 1}
checkpoint: {every: 0, keep_last: 1}
YAML
cat > "$work/moe.yaml" <<YAML
base: dense.yaml
name: moe
moe: {enabled: true, num_experts: 8, expert_hidden: 16}
router: {type: topk, k: 4, gating: topk_softmax, aux_loss_coef: 0.01}
upcycle: {router: groups, scaling: output}
train: {steps: 12}
YAML

"$cmoe" train "$work/dense.yaml" --set train.out_dir="$work/dense" --quiet > "$work/out" 2>&1
check $? "train the dense model ($(tail -c 300 "$work/out"))"
dense=$work/dense/ckpt-00000020.h5

"$cmoe" upcycle "$dense" --recipe "$work/moe.yaml" -o "$work/up.h5" > "$work/up.out" 2>&1
check $? "upcycle ($(cat "$work/up.out"))"
grep -q "E8G4T4, router groups, scaling output (A = 4: fc1 x 1, fc2 x 4" "$work/up.out"
check $? "the plan is printed ($(cat "$work/up.out"))"
"$cmoe" inspect "$work/up.h5" > "$work/inspect.out" 2>&1
grep -q "step 0, seed 1234, optimizer step 0" "$work/inspect.out" &&
    grep -q "upcycled from $dense (step 20, seed 1234): E8G4T4" "$work/inspect.out" &&
    grep -q "blocks.1.moe.experts.w1  *\[8,16,32\]" "$work/inspect.out"
check $? "inspect: step 0, the origin, [N,H,D] experts ($(head -c 600 "$work/inspect.out"))"

# test loss (nats) of `cmoe eval RECIPE CKPT`
test_loss() { "$cmoe" eval "$1" --ckpt "$2" --split test | sed -n 's/.*loss \([0-9.]*\) nats.*/\1/p'; }
dense_loss=$(test_loss "$work/dense.yaml" "$dense")
up_loss=$(test_loss "$work/moe.yaml" "$work/up.h5")
awk -v a="$dense_loss" -v b="$up_loss" 'BEGIN { d = a - b; exit !(a > 0 && d * d <= 1e-12 * a * a) }'
check $? "the upcycled model has the dense test loss: $dense_loss vs $up_loss"
"$cmoe" upcycle "$dense" --recipe "$work/moe.yaml" -o "$work/noscale.h5" \
    --set upcycle.scaling=none > /dev/null 2>&1
noscale_loss=$(test_loss "$work/moe.yaml" "$work/noscale.h5")
awk -v a="$dense_loss" -v b="$noscale_loss" 'BEGIN { d = a - b; exit !(d * d > 1e-6) }'
check $? "without scaling the loss moves: $dense_loss vs $noscale_loss"

# The PyTorch reference (tests/parity/upcycle_parity.py) rebuilds each upcycled
# checkpoint from the dense one and must match every tensor exactly; it
# scores both models in float64: the same loss for the function-preserving
# cases, another for balanced GELU scaling.
python=/usr/bin/python3
if $python -c "import torch, h5py, numpy, yaml" 2> /dev/null; then
    cases=(
        "equal --set router.gating=topk_softmax --set upcycle.scaling=output"
        "equal --set router.gating=softmax_topk --set upcycle.router=zero --set upcycle.scaling=output"
        "equal --set moe.expert_hidden=0 --set moe.num_experts=4 --set router.k=2"
        "differs --set router.gating=softmax_topk --set upcycle.scaling=balanced --set moe.every=2"
    )
    for i in "${!cases[@]}"; do
        read -r -a words <<< "${cases[$i]}"
        sets=("${words[@]:1}")
        "$cmoe" upcycle "$dense" --recipe "$work/moe.yaml" -o "$work/p$i.h5" "${sets[@]}"             > /dev/null 2>&1 &&
            "$cmoe" upcycle "$dense" --recipe "$work/moe.yaml" -o "$work/fresh$i.h5" "${sets[@]}"                 --set upcycle.router=fresh > /dev/null 2>&1
        check $? "upcycle case $i"
        $python "$src/tests/parity/upcycle_parity.py" "$dense" "$work/fresh$i.h5" "$work/p$i.h5"             --text "$work/test.txt" --loss "${words[0]}" > "$work/parity$i.out" 2>&1
        check $? "PyTorch reference, case $i (${cases[$i]}): $(tail -n 2 "$work/parity$i.out" | tr '\n' ' ')"
    done
else
    echo "SKIP: the PyTorch reference ($python lacks torch, h5py, numpy or yaml)"
fi

# loss_last of steps FROM.. of a run, one per line
losses() { grep '"kind": "train"' "$1/metrics.jsonl" |
    sed 's/.*"step": \([0-9]*\),.*"loss_last": \([-0-9.e]*\),.*/\1 \2/' | awk -v from="$2" '$1 >= from'; }
same_losses() { # same_losses A B: relative difference at most 1e-5 on every line
    paste "$1" "$2" | awk '{ d = $2 - $4; if (d < 0) d = -d; r = $4 < 0 ? -$4 : $4;
                             if ($1 != $3 || d > 1e-5 * r) bad++ } END { exit (NR == 0 || bad) }'
}

"$cmoe" train "$work/moe.yaml" --init "$work/up.h5" --set train.out_dir="$work/straight" \
    > "$work/straight.out" 2>&1
check $? "train --init ($(tail -c 300 "$work/straight.out"))"
grep -q "initialised from $work/up.h5 (step 0, fresh optimizer state)" "$work/straight.out"
check $? "the run says where it started"
first=$(losses "$work/straight" 1 | head -n 1 | cut -d' ' -f2)
awk -v a="$first" -v b="$(losses "$work/dense" 1 | tail -n 1 | cut -d' ' -f2)" \
    'BEGIN { exit !(a > 0 && a < b + 0.5) }'
check $? "the first MoE loss $first starts near the trained dense model's"

"$cmoe" train "$work/moe.yaml" --init "$work/up.h5" --set train.out_dir="$work/half" \
    --stop-at 6 --quiet > "$work/out" 2>&1
[ $? -eq 130 ]
check $? "train --init --stop-at 6 stops with 130 ($(tail -c 300 "$work/out"))"
"$cmoe" train "$work/moe.yaml" --init "$work/up.h5" --resume auto \
    --set train.out_dir="$work/half" > "$work/resume.out" 2>&1
check $? "--init --resume auto continues ($(tail -c 300 "$work/resume.out"))"
grep -q "resumed from step 6" "$work/resume.out" && ! grep -q "initialised from" "$work/resume.out"
check $? "the run resumed from its own checkpoint, not from --init"
losses "$work/straight" 7 > "$work/straight.txt"
losses "$work/half" 7 > "$work/half.txt"
same_losses "$work/half.txt" "$work/straight.txt"
check $? "resumed = uninterrupted: $(paste "$work/half.txt" "$work/straight.txt" | tail -n 1)"

# expert parallelism: 1 and 2 ranks from the same upcycled checkpoint
for ranks in 1 2; do
    mpi "$ranks" train "$work/moe.yaml" --init "$work/up.h5" --set train.out_dir="$work/np$ranks" \
        --quiet > "$work/out" 2>&1
    check $? "train --init under mpirun -np $ranks ($(tail -c 300 "$work/out"))"
    losses "$work/np$ranks" 1 > "$work/np$ranks.txt"
done
same_losses "$work/np2.txt" "$work/np1.txt"
check $? "2 ranks = 1 rank: $(paste "$work/np2.txt" "$work/np1.txt" | tail -n 2 | tr '\n' ' ')"
[ "$(wc -l < "$work/np2.txt")" -eq 12 ]
check $? "12 steps logged on 2 ranks"

# expect STATUS TEXT ARGS...: cmoe ARGS fails with STATUS and TEXT on stderr
expect() {
    local status=$1 text=$2
    shift 2
    "$cmoe" "$@" > "$work/err.out" 2>&1
    local got=$?
    [ $got -eq "$status" ] && grep -q -F -- "$text" "$work/err.out"
    check $? "$* -> status $status and '$text' (got $got: $(head -c 300 "$work/err.out"))"
}
up=(upcycle "$dense" --recipe "$work/moe.yaml" -o "$work/x.h5")
expect 2 "needs DENSE.h5, --recipe MOE.yaml and -o OUT.h5" upcycle "$dense" --recipe "$work/moe.yaml"
expect 2 "unexpected argument '--bogus'" "${up[@]}" --bogus
expect 2 "would overwrite the dense checkpoint" upcycle "$dense" --recipe "$work/moe.yaml" -o "$dense"
expect 1 "the checkpoint is not dense" upcycle "$work/up.h5" --recipe "$work/moe.yaml" -o "$work/x.h5"
expect 1 "model.d_model is 32 in the dense checkpoint's recipe but 64" "${up[@]}" --set model.d_model=64
expect 1 "model.n_layers is 2 in the dense checkpoint's recipe but 3" "${up[@]}" --set model.n_layers=3
expect 1 "model.vocab_size is 256" "${up[@]}" --set model.vocab_size=512
expect 1 "data.seq_len is 32 in the dense checkpoint's recipe but 64" "${up[@]}" --set data.seq_len=64
expect 1 "the expert width 24 (moe.expert_hidden or split_dense) does not divide model.d_ff = 64" \
    "${up[@]}" --set moe.expert_hidden=24
expect 1 "moe.num_experts = 6 is not a multiple of the granularity G = 4" \
    "${up[@]}" --set moe.num_experts=6
expect 1 "router.k = 2 is not a multiple of the granularity G = 4" "${up[@]}" --set router.k=2
expect 1 "moe.activation is relu" "${up[@]}" --set moe.activation=relu
expect 1 "not a readable HDF5 file" upcycle "$work/corpus.txt" --recipe "$work/moe.yaml" -o "$work/x.h5"
[ ! -e "$work/x.h5" ]
check $? "no output file after the errors"
# a checkpoint of an image classifier: the dense checkpoint with its stored
# recipe's model.arch and data.format turned into resnet's
if /usr/bin/python3 -c "import h5py" 2> /dev/null; then
    cp "$dense" "$work/cnn.h5"
    /usr/bin/python3 - "$work/cnn.h5" << 'EOF'
import sys, h5py, numpy
with h5py.File(sys.argv[1], "r+") as f:
    text = f.attrs["recipe"].decode().replace("arch: transformer_lm", "arch: resnet")
    text = text.replace("format: text", "format: idx")
    del f.attrs["recipe"]
    f.attrs.create("recipe", numpy.bytes_(text.encode()))
EOF
    expect 1 "the dense checkpoint is not a language model" upcycle "$work/cnn.h5" \
        --recipe "$work/moe.yaml" -o "$work/x.h5"
fi
expect 1 "--init $work/up.h5" train "$work/dense.yaml" --init "$work/up.h5" \
    --set train.out_dir="$work/wrong"
expect 2 "--init with --resume" train "$work/moe.yaml" --init "$work/up.h5" --resume "$dense"

echo "$passes passed, $failures failed"
[ $failures -eq 0 ]
