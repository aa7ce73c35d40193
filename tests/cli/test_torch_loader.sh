#!/usr/bin/env bash
# python/cmoe_torch.py against `cmoe eval`: a tiny model of each router
# (recipes/lm/*.yaml shrunk with --set) trains for a few steps on a synthetic
# text, then `cmoe eval --split test` and the PyTorch loader score the same
# file; their losses must agree to 1e-5 relative. A copy of one checkpoint
# with a single weight perturbed must then disagree (the check can fail), as
# must THOR with another seed and bias balancing without its selection
# biases (they decide the routing, so the loader must apply them), and RMoE
# with its recurrence turned off (the state carried across layers counts).
# usage: test_torch_loader.sh PATH/TO/cmoe SOURCE_DIR
set -u
cmoe=$1
src=$2
python=/usr/bin/python3
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
if ! $python -c "import torch, h5py, numpy, yaml" 2> /dev/null; then
    echo "SKIP: $python lacks torch, h5py, numpy or yaml"
    exit 0
fi
work=$(mktemp -d /tmp/cmoe-torch-XXXXXX)
trap 'rm -rf "$work"' EXIT

# A synthetic text: words from a small vocabulary with a bigram bias, so a
# few steps learn something and routers see distinct tokens. The test split
# is 4001 bytes: 125 windows of 32 + 1 and a 1-byte tail that is dropped.
$python - "$work" << 'EOF'
import random, sys
words = ("the of and to in is was he she it that for on with as his her they at by this had "
         "not are but from or have an be which one you were all we there can when your").split()
def text(seed, size):
    r, out, prev = random.Random(seed), [], 0
    while sum(len(w) + 1 for w in out) < size:
        prev = (prev + r.choice((1, 1, 2, 3, r.randrange(len(words))))) % len(words)
        out.append(words[prev] + (".\n" if r.random() < 0.08 else ""))
    return " ".join(out)[:size]
open(sys.argv[1] + "/train.txt", "w").write(text(1, 40000))
open(sys.argv[1] + "/test.txt", "w").write(text(2, 4001))
EOF
check $? "synthetic text written"

# router.init_std 0.3 (not 0.02) makes the routers decisive after 40 steps:
# top-p at 0.7 then takes 1 to 4 experts per token (mean about 2), and
# Switch with capacity factor 1 drops about a fifth of its slots.
tiny=(--set data.path="$work/train.txt" --set data.valid_path="$work/test.txt"
    --set data.test_path="$work/test.txt" --set model.n_layers=2 --set model.d_model=32
    --set model.n_heads=2 --set model.d_ff=64 --set data.seq_len=32 --set data.batch_size=8
    --set moe.num_experts=4 --set router.init_std=0.3 --set train.arena_mib=64)

# name recipe extra --set overrides... (smoe-dropout's k_max 8 > 4 experts;
# THOR's recipe accumulates 8 micro-batches of 2, here one batch of 8)
cases=(
    "dense dense"
    "moe-top2 moe-top2"
    "top-p top-p --set router.top_p=0.7"
    "smoe-dropout smoe-dropout --set router.k_max=4"
    "switch switch --set moe.every=1"
    "switch-capacity switch --set moe.every=1 --set router.capacity_factor=1.0"
    "expert-choice expert-choice"
    "swiglu moe-top2 --set moe.activation=swiglu --set router.gating=softmax_topk"
    "thor thor --set train.grad_accum=1 --set data.batch_size=8"
    "thor-token thor --set train.grad_accum=1 --set data.batch_size=8 --set router.thor_level=per_token"
    "null-experts null-experts --set router.bias=true"
    "null-experts-raw null-experts --set router.gating=softmax_topk"
    "bias-balance bias-balance --set router.bias_update_rate=0.01"
    "bias-balance-raw bias-balance --set router.bias_update_rate=0.01 --set router.gating=softmax_topk"
    "rmoe rmoe --set router.rnn_hidden=8"
    "rmoe-every2 rmoe --set model.n_layers=3 --set moe.every=2 --set router.rnn_hidden=6 --set router.gating=softmax_topk"
)
names=()
ckpts=()
for entry in "${cases[@]}"; do
    read -r -a words <<< "$entry"
    name=${words[0]}
    recipe="$src/recipes/lm/${words[1]}.yaml"
    extra=("${words[@]:2}")
    "$cmoe" train "$recipe" "${tiny[@]}" "${extra[@]}" --set train.steps=40 \
        --set schedule.warmup_steps=2 --set optim.lr=3e-3 --set train.eval_every=0 \
        --set train.log_every=20 --set checkpoint.every=40 --set train.out_dir="$work/$name" \
        > "$work/$name.train" 2>&1
    check $? "$name: train ($(tail -c 300 "$work/$name.train"))"
    "$cmoe" eval "$recipe" --ckpt "$work/$name/ckpt-00000040.h5" --split test "${tiny[@]}" \
        "${extra[@]}" > "$work/$name.eval" 2>&1
    check $? "$name: cmoe eval ($(tail -c 300 "$work/$name.eval"))"
    grep -q "over 4000 bytes" "$work/$name.eval"
    check $? "$name: cmoe eval scores 4000 bytes"
    names+=("$name")
    ckpts+=("$work/$name/ckpt-00000040.h5")
done

# Negative check: a copy of the top-2 checkpoint with one weight of the
# output head changed by 0.5 must give a loss beyond the tolerance.
cp "$work/moe-top2/ckpt-00000040.h5" "$work/perturbed.h5"
$python -c "
import h5py, sys
with h5py.File(sys.argv[1], 'r+') as f:
    f['params/head.weight'][32, 0] += 0.5  # the logit of ' ', a frequent byte
" "$work/perturbed.h5"
check $? "perturb a weight with h5py"
# and a copy of the THOR checkpoint whose stored recipe has another
# train.seed: its random experts are drawn differently from cmoe's.
cp "$work/thor/ckpt-00000040.h5" "$work/thor-reseeded.h5"
$python -c "
import h5py, re, sys
with h5py.File(sys.argv[1], 'r+') as f:
    recipe = f.attrs['recipe']
    recipe = recipe.decode() if isinstance(recipe, bytes) else recipe
    f.attrs['recipe'] = re.sub(r'seed: (\\d+)', lambda m: 'seed: %d' % (int(m.group(1)) + 1), recipe)
" "$work/thor-reseeded.h5"
check $? "change the THOR recipe's seed with h5py"
# and a copy of the bias-balance checkpoint without its selection biases.
cp "$work/bias-balance/ckpt-00000040.h5" "$work/bias-zeroed.h5"
$python -c "
import h5py, sys
with h5py.File(sys.argv[1], 'r+') as f:
    names = [n for n in f['params'] if n.endswith('expert_bias')]
    assert names and any(abs(f['params'][n][()]).max() > 0 for n in names)
    for n in names:
        f['params'][n][...] = 0
" "$work/bias-zeroed.h5"
check $? "zero the selection biases with h5py"

# and a copy of the RMoE checkpoint whose stored recipe turns the recurrence
# off (the same parameters, every layer starting from a zero state).
cp "$work/rmoe/ckpt-00000040.h5" "$work/rmoe-off.h5"
$python -c "
import h5py, sys
with h5py.File(sys.argv[1], 'r+') as f:
    recipe = f.attrs['recipe']
    recipe = recipe.decode() if isinstance(recipe, bytes) else recipe
    assert 'rnn_state: carry' in recipe
    f.attrs['recipe'] = recipe.replace('rnn_state: carry', 'rnn_state: zero')
" "$work/rmoe-off.h5"
check $? "turn the RMoE recipe's recurrence off with h5py"

# One Python process for every checkpoint (importing torch takes seconds).
$python "$src/python/cmoe_torch.py" "${ckpts[@]}" "$work/perturbed.h5" "$work/thor-reseeded.h5" \
    "$work/bias-zeroed.h5" "$work/rmoe-off.h5" --text "$work/test.txt" > "$work/torch.out" 2>&1
check $? "cmoe_torch.py ($(tail -c 300 "$work/torch.out"))"
[ "$(grep -c "over 4000 bytes" "$work/torch.out")" -eq $((${#ckpts[@]} + 4)) ]
check $? "cmoe_torch.py scores 4000 bytes of every checkpoint"

# compare NAME CMOE_LOSS TORCH_LOSS agree|differ
compare() {
    awk -v n="$1" -v c="$2" -v t="$3" -v want="$4" 'BEGIN {
        r = c > t ? (c - t) / c : (t - c) / c
        printf "%-16s cmoe %s  torch %s  relative %.2e\n", n, c, t, r
        if (c == "" || t == "") exit 1
        exit !(want == "agree" ? r <= 1e-5 : r > 1e-5) }'
}
torch_loss() {
    grep -F "$1: loss" "$work/torch.out" | grep -o 'loss [0-9.]* nats/byte' | awk '{print $2}'
}
for i in "${!names[@]}"; do
    name=${names[$i]}
    c=$(grep -o 'loss [0-9.]* nats/byte' "$work/$name.eval" | awk '{print $2}')
    t=$(torch_loss "${ckpts[$i]}")
    compare "$name" "$c" "$t" agree
    check $? "$name: losses agree to 1e-5 relative (cmoe $c, torch $t)"
done
c=$(grep -o 'loss [0-9.]* nats/byte' "$work/moe-top2.eval" | awk '{print $2}')
t=$(torch_loss "$work/perturbed.h5")
compare "perturbed" "$c" "$t" differ
check $? "a perturbed weight is noticed (cmoe $c, torch $t)"
c=$(grep -o 'loss [0-9.]* nats/byte' "$work/thor.eval" | awk '{print $2}')
t=$(torch_loss "$work/thor-reseeded.h5")
compare "thor-reseeded" "$c" "$t" differ
check $? "THOR experts drawn with another seed are noticed (cmoe $c, torch $t)"
c=$(grep -o 'loss [0-9.]* nats/byte' "$work/bias-balance.eval" | awk '{print $2}')
t=$(torch_loss "$work/bias-zeroed.h5")
compare "bias-zeroed" "$c" "$t" differ
check $? "selection biases left out are noticed (cmoe $c, torch $t)"
c=$(grep -o 'loss [0-9.]* nats/byte' "$work/rmoe.eval" | awk '{print $2}')
t=$(torch_loss "$work/rmoe-off.h5")
compare "rmoe-off" "$c" "$t" differ
check $? "RMoE's state carried across layers is noticed (cmoe $c, torch $t off)"

echo "$passes passed, $failures failed"
[ $failures -eq 0 ]
