#!/usr/bin/env bash
# `cmoe route`: tiny MoE LMs (top-p, whose experts per byte vary, and expert
# choice, whose routing depends on the batch) trained on KJV route a text of
# 40 windows + 1 byte; the final test evaluation of the same training ran on
# that text, and its "layer_expert_tokens" (every expert's kept pairs per
# layer, from the eval loop's own counts) must equal what routing.tsv lists
# for the same bytes. Also: experts.tsv agrees with routing.tsv, the same
# command gives the same file, routing.png is a PNG; a tiny MoE-CNN's class
# table agrees with its evaluation's images per expert; bad input is a clear
# error (exit 2 usage, 1 a checkpoint or input that cannot be routed).
# usage: test_route.sh PATH/TO/cmoe SOURCE_DIR
set -u
cmoe=$1
src=$2
work=$(mktemp -d /tmp/cmoe-route-XXXXXX)
trap 'rm -rf "$work"' EXIT
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
export OPENBLAS_NUM_THREADS=1 CMOE_THREADS=1
python=/usr/bin/python3

bash "$src/data/prepare_kjv.sh" "$work/kjv" > "$work/prepare.out" 2>&1
check $? "prepare_kjv.sh ($(tail -c 300 "$work/prepare.out"))"
# 40 windows of 64 bytes and the one byte the last window's target needs
head -c $((40 * 64 + 1)) "$work/kjv/test.txt" > "$work/text.txt"

# train_lm NAME RECIPE [ARGS...]: 40 steps of a tiny MoE LM whose final test
# evaluation runs over text.txt (all of it)
train_lm() {
    local name=$1 recipe=$2
    shift 2
    "$cmoe" train "$src/recipes/lm/$recipe.yaml" "$@" \
        --set data.path="$work/kjv/train.txt" --set data.valid_path="$work/kjv/valid.txt" \
        --set data.test_path="$work/text.txt" \
        --set model.n_layers=2 --set model.d_model=64 --set model.n_heads=2 --set model.d_ff=128 \
        --set moe.num_experts=4 --set data.seq_len=64 --set data.batch_size=6 \
        --set train.steps=40 --set schedule.warmup_steps=5 --set train.eval_every=0 \
        --set train.log_every=20 --set train.arena_mib=64 --quiet \
        --set train.out_dir="$work/$name" > "$work/$name.out" 2>&1
    check $? "train a tiny $recipe model ($(tail -c 400 "$work/$name.out"))"
}

# agree NAME: routing.tsv's (layer, expert) pairs over the 40 windows equal
# the final test line's layer_expert_tokens, layer-major
agree() {
    "$python" - "$work/$1/metrics.jsonl" "$work/$1/route/routing.tsv" 4 $((40 * 64)) <<'EOF'
import collections, json, sys
metrics, tsv, experts, bytes_evaluated = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
test = [json.loads(l) for l in open(metrics) if '"kind": "test"' in l][-1]
counts = collections.Counter()
layers = []
with open(tsv) as f:
    assert f.readline().split("\t") == ["pos", "byte", "char", "layer", "rank", "expert", "gate\n"]
    for line in f:
        pos, byte, char, layer, rank, expert, gate = line.rstrip("\n").split("\t")
        if int(pos) < bytes_evaluated:
            counts[int(layer), int(expert)] += 1
        if int(layer) not in layers:
            layers.append(int(layer))
ours = [counts[l, e] for l in layers for e in range(experts)]
if ours != test["layer_expert_tokens"] or test["tokens"] != bytes_evaluated:
    sys.exit(f"routing.tsv {ours} vs eval {test['layer_expert_tokens']} ({test['tokens']} tokens)")
print(test["mean_k"])
EOF
}

train_lm topp top-p --set router.top_p=0.6
"$cmoe" route "$work/topp/ckpt-00000040.h5" --text "$work/text.txt" > "$work/route.out" 2>&1
check $? "route the top-p model ($(tail -c 400 "$work/route.out"))"
for f in routing.tsv experts.tsv routing.png; do
    [ -s "$work/topp/route/$f" ]
    check $? "the default --out is the checkpoint's directory/route: $f"
done
mean_k=$(agree topp)
check $? "top-p: routing.tsv agrees with the evaluation's expert counts ($mean_k)"
"$python" -c "import sys; k = float(sys.argv[1]); sys.exit(not (1.0 < k < 4.0 and k != 2.0))" \
    "$mean_k"
check $? "top-p routes a varying number of experts (mean $mean_k), so the count is not trivial"
# every byte of the text, the partial last window's too, in every layer
[ "$(awk -F'\t' 'NR > 1 && $5 == 0' "$work/topp/route/routing.tsv" | wc -l)" -eq $((2 * 2561)) ]
check $? "one top-1 row per byte and layer (2 x 2561)"
# experts.tsv's pairs are routing.tsv's rows, per layer and expert
"$python" - "$work/topp/route" <<'EOF'
import collections, re, sys
d = sys.argv[1]
rows = collections.Counter()
top = collections.Counter()
for line in list(open(d + "/routing.tsv"))[1:]:
    pos, byte, char, layer, rank, expert, gate = line.rstrip("\n").split("\t")
    rows[layer, expert] += 1
    top[layer, expert, char] += 1
for line in list(open(d + "/experts.tsv"))[1:]:
    layer, expert, pairs, share, top_bytes = line.rstrip("\n").split("\t")
    assert rows[layer, expert] == int(pairs), (layer, expert, pairs)
    if int(pairs) == 0:
        continue
    first = re.match(r'"((?:\\.|[^"\\])*)":(\d+)', top_bytes)  # "e":123
    char, count = first.group(1).replace('\\"', '"'), first.group(2)
    best = max(c for (l, e, ch), c in top.items() if (l, e) == (layer, expert))
    assert int(count) == best == top[layer, expert, char], (layer, expert, first, best)
EOF
check $? "experts.tsv: pairs and the most frequent byte agree with routing.tsv"
head -c 8 "$work/topp/route/routing.png" | od -An -c | grep -q 'P   N   G'
check $? "routing.png is a PNG"
"$cmoe" route "$work/topp/ckpt-00000040.h5" --text "$work/text.txt" --out "$work/again" \
    > "$work/again.out" 2>&1
cmp -s "$work/topp/route/routing.tsv" "$work/again/routing.tsv"
check $? "routing the same text again gives the same routing.tsv"
"$cmoe" route "$work/topp/ckpt-00000040.h5" --prompt "In the beginning" --out "$work/prompt" \
    --show 10 > "$work/prompt.out" 2>&1
check $? "route a --prompt shorter than a window ($(tail -c 300 "$work/prompt.out"))"
[ "$(awk -F'\t' 'NR > 1 && $5 == 0' "$work/prompt/routing.tsv" | wc -l)" -eq 32 ]
check $? "the prompt's 16 bytes in 2 layers"

train_lm choice expert-choice
"$cmoe" route "$work/choice/ckpt-00000040.h5" --text "$work/text.txt" > "$work/choice.out" 2>&1
check $? "route the expert-choice model ($(tail -c 400 "$work/choice.out"))"
agree choice > /dev/null
check $? "expert choice: routing.tsv agrees with the evaluation"
# (Its totals are balanced by construction, so this shows little more than
# that it routes; top-p and THOR above and below are the real comparisons.)

train_lm thor thor --set train.grad_accum=1
"$cmoe" route "$work/thor/ckpt-00000040.h5" --text "$work/text.txt" > "$work/thor.out" 2>&1
check $? "route the THOR model ($(tail -c 400 "$work/thor.out"))"
agree thor > /dev/null
check $? "THOR: routing.tsv agrees with the evaluation (the same inference draws)"

# ---- the image classifier -----------------------------------------------------
bash "$src/data/prepare_fmnist.sh" "$work/fmnist" > "$work/prepare.out" 2>&1
check $? "prepare_fmnist.sh ($(tail -c 300 "$work/prepare.out"))"
"$cmoe" train "$src/recipes/cnn/moe-at.yaml" \
    --set data.path="$work/fmnist/train-images-idx3-ubyte.gz" \
    --set data.labels_path="$work/fmnist/train-labels-idx1-ubyte.gz" \
    --set data.test_path="$work/fmnist/t10k-images-idx3-ubyte.gz" \
    --set data.test_labels_path="$work/fmnist/t10k-labels-idx1-ubyte.gz" \
    --set data.batch_size=32 --set train.eval_batches=3 --set adversarial.eval_steps=0 \
    --set adversarial.mode=standard --set train.steps=4 --set train.arena_mib=256 --quiet \
    --set train.out_dir="$work/cnn" > "$work/cnn.out" 2>&1
check $? "train a tiny MoE-CNN ($(tail -c 400 "$work/cnn.out"))"
cnn_ckpt=$(ls "$work"/cnn/ckpt-*.h5 | tail -1)
"$cmoe" route "$cnn_ckpt" --max-batches 3 --out "$work/cnn-route" > "$work/cnn-route.out" 2>&1
check $? "route the MoE-CNN ($(tail -c 400 "$work/cnn-route.out"))"
"$python" - "$work/cnn/metrics.jsonl" "$work/cnn-route/class-routes.tsv" <<'EOF'
import json, sys
test = [json.loads(l) for l in open(sys.argv[1]) if '"kind": "test"' in l][-1]
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[2])][1:]
totals = [int(r[-1]) for r in rows]
assert all(sum(int(v) for v in r[2:-1]) == int(r[-1]) for r in rows)
assert totals == test["images_per_expert_clean"], (totals, test["images_per_expert_clean"])
assert sum(totals) == test["images"] * (len(totals) // len(set(r[1] for r in rows)))
EOF
check $? "class-routes.tsv's images per expert equal the evaluation's"

# ---- bad input ------------------------------------------------------------------
# expect STATUS PATTERN ARGS...: cmoe route ARGS exits with STATUS, saying PATTERN
expect() {
    local status=$1 pattern=$2
    shift 2
    "$cmoe" route "$@" > "$work/bad.out" 2>&1
    local got=$?
    [ $got -eq "$status" ] && grep -q -- "$pattern" "$work/bad.out"
    check $? "route $* -> $status, '$pattern' (got $got: $(tail -c 300 "$work/bad.out"))"
}
ckpt=$work/topp/ckpt-00000040.h5
expect 2 "missing CKPT"
expect 2 "not both" "$ckpt" --text "$work/text.txt" --prompt x
expect 2 "--prompt is empty" "$ckpt" --prompt ""
expect 2 "--show takes" "$ckpt" --prompt x --show 0
expect 2 "--top takes" "$ckpt" --prompt x --top 300
expect 2 "needs a value" "$ckpt" --text
expect 1 "needs --text FILE or --prompt" "$ckpt"
: > "$work/empty.txt"
expect 1 "is empty" "$ckpt" --text "$work/empty.txt"
expect 1 "cannot open --text" "$ckpt" --text "$work/missing.txt"
expect 1 "image classifier" "$cnn_ckpt" --prompt x
expect 1 "$work/missing.h5" "$work/missing.h5" --prompt x
"$cmoe" train "$src/recipes/lm/dense.yaml" --set data.path="$work/kjv/train.txt" \
    --set data.valid_path="$work/kjv/valid.txt" --set data.test_path="$work/text.txt" \
    --set model.n_layers=1 --set model.d_model=32 --set model.n_heads=2 --set model.d_ff=64 \
    --set data.seq_len=32 --set data.batch_size=2 --set train.steps=2 --set train.eval_every=0 \
    --set schedule.warmup_steps=1 \
    --quiet --set train.out_dir="$work/dense" > "$work/dense.out" 2>&1
check $? "train a tiny dense model ($(tail -c 300 "$work/dense.out"))"
expect 1 "dense" "$work/dense/ckpt-00000002.h5" --prompt x
"$cmoe" route --help | grep -q "routing.tsv"
check $? "--help describes the files"

echo "test_route: $passes passed, $failures failed"
[ "$failures" -eq 0 ]
