#!/usr/bin/env bash
# `cmoe sample`: a tiny MoE LM trained 60 steps on KJV (data/prepare_kjv.sh
# into a temporary directory) generates bytes; the same seed gives the same
# bytes, another seed others; a prompt longer than data.seq_len slides the
# window; every bad input is a clear error with its exit status (2 usage,
# 1 a checkpoint or model that cannot be sampled).
# usage: test_sample.sh PATH/TO/cmoe SOURCE_DIR
set -u
cmoe=$1
src=$2
work=$(mktemp -d /tmp/cmoe-sample-XXXXXX)
trap 'rm -rf "$work"' EXIT
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

bash "$src/data/prepare_kjv.sh" "$work/kjv" > "$work/prepare.out" 2>&1
check $? "prepare_kjv.sh ($(tail -c 300 "$work/prepare.out"))"

"$cmoe" train "$src/recipes/lm/moe-top2.yaml" \
    --set data.path="$work/kjv/train.txt" --set data.valid_path="$work/kjv/valid.txt" \
    --set data.test_path="$work/kjv/valid.txt" \
    --set model.n_layers=2 --set model.d_model=64 --set model.n_heads=2 --set model.d_ff=256 \
    --set moe.num_experts=4 --set data.seq_len=64 --set data.batch_size=8 \
    --set train.steps=60 --set schedule.warmup_steps=5 --set train.eval_every=0 \
    --set train.log_every=20 --set train.arena_mib=64 --set train.threads=1 --quiet \
    --set train.out_dir="$work/run" > "$work/train.out" 2>&1
check $? "train a tiny MoE on KJV ($(tail -c 400 "$work/train.out"))"
ckpt=$work/run/ckpt-00000060.h5

# sample NAME ARGS...: stdout to $work/NAME.out, stderr to $work/NAME.err
sample() {
    local name=$1
    shift
    "$cmoe" sample "$@" > "$work/$name.out" 2> "$work/$name.err"
}

prompt="In the beginning"
sample a "$ckpt" --prompt "$prompt" --bytes 200 --seed 7
check $? "sample 200 bytes ($(cat "$work/a.err"))"
[ "$(wc -c < "$work/a.out")" -eq $((${#prompt} + 200)) ]
check $? "stdout is the prompt and 200 bytes ($(wc -c < "$work/a.out"))"
[ "$(head -c ${#prompt} "$work/a.out")" = "$prompt" ]
check $? "stdout starts with the prompt"
grep -q -E '^\[cmoe\] sampled 200 bytes in [0-9.]+ s: [0-9.]+ bytes/s' "$work/a.err"
check $? "bytes/s on stderr ($(cat "$work/a.err"))"

sample b "$ckpt" --prompt "$prompt" --bytes 200 --seed 7
check $? "sample again"
cmp -s "$work/a.out" "$work/b.out"
check $? "the same seed gives the same bytes"
sample c "$ckpt" --prompt "$prompt" --bytes 200 --seed 8
check $? "sample with another seed"
! cmp -s "$work/a.out" "$work/c.out"
check $? "another seed gives other bytes"

# top-k 1 is greedy: the seed no longer matters
sample g1 "$ckpt" --prompt "$prompt" --bytes 50 --top-k 1 --seed 1
sample g2 "$ckpt" --prompt "$prompt" --bytes 50 --top-k 1 --seed 2
cmp -s "$work/g1.out" "$work/g2.out"
check $? "--top-k 1 is greedy (seed-independent)"
sample t "$ckpt" --prompt "$prompt" --bytes 50 --temperature 0.5 --top-k 10 --set router.k=1
check $? "temperature, top-k and --set router.k=1 ($(cat "$work/t.err"))"

# default prompt: one newline
sample d "$ckpt" --bytes 20
check $? "default prompt ($(cat "$work/d.err"))"
[ "$(head -c 1 "$work/d.out" | od -An -c | tr -d ' ')" = '\n' ] && [ "$(wc -c < "$work/d.out")" -eq 21 ]
check $? "the default prompt is a newline"

# a prompt longer than seq_len (64): the window slides, as documented
head -c 300 "$work/kjv/valid.txt" > "$work/long.txt"
sample long "$ckpt" --prompt-file "$work/long.txt" --bytes 100 --seed 3
check $? "a 300-byte prompt with seq_len 64 ($(cat "$work/long.err"))"
[ "$(wc -c < "$work/long.out")" -eq 400 ] && cmp -s -n 300 "$work/long.out" "$work/long.txt"
check $? "the long prompt is echoed and 100 bytes follow"
grep -q -E 'context 64, window slid [1-9][0-9]* times' "$work/long.err"
check $? "the window slid ($(cat "$work/long.err"))"

# expect STATUS TEXT NAME ARGS...: sample fails with STATUS and TEXT on stderr
expect() {
    local status=$1 text=$2 name=$3
    shift 3
    sample "$name" "$@"
    local got=$?
    [ "$got" -eq "$status" ] && grep -q -- "$text" "$work/$name.err"
    check $? "$name: status $got, stderr: $(cat "$work/$name.err")"
}
: > "$work/empty.txt"
expect 2 "--bytes takes a count >= 1" bytes0 "$ckpt" --bytes 0
expect 2 "--bytes takes a count >= 1" bytes_negative "$ckpt" --bytes -5
expect 2 "--temperature takes a number > 0" temperature0 "$ckpt" --temperature 0
expect 2 "--temperature takes a number > 0" temperature_negative "$ckpt" --temperature -1
expect 2 "--top-k takes a count in 0..256" topk_negative "$ckpt" --top-k -1
expect 2 "--top-k takes a count in 0..256" topk_large "$ckpt" --top-k 257
expect 2 "--prompt is empty" empty_prompt "$ckpt" --prompt ""
expect 1 "is empty" empty_prompt_file "$ckpt" --prompt-file "$work/empty.txt"
expect 2 "missing CKPT" no_ckpt
expect 1 "cannot open checkpoint" missing_ckpt "$work/nothere.h5"
# another model than the checkpoint's is refused, naming the keys
expect 1 "router.type expert_choice (not topk)" other_router "$ckpt" \
    --set router.type=expert_choice --set router.capacity_factor=2
expect 1 "model.arch resnet (not transformer_lm)" cnn_recipe "$ckpt" \
    --recipe "$src/recipes/cnn/dense-standard.yaml"
# a real expert-choice checkpoint (10 steps)
"$cmoe" train "$src/recipes/lm/expert-choice.yaml" \
    --set data.path="$work/kjv/train.txt" --set data.valid_path="$work/kjv/valid.txt" \
    --set data.test_path="$work/long.txt" \
    --set model.n_layers=1 --set model.d_model=32 --set model.n_heads=2 --set model.d_ff=64 \
    --set moe.num_experts=4 --set data.seq_len=32 --set data.batch_size=4 \
    --set train.steps=10 --set schedule.warmup_steps=2 --set train.eval_every=0 \
    --set train.arena_mib=64 --set train.threads=1 --quiet \
    --set train.out_dir="$work/choice" > "$work/choice.out" 2>&1
check $? "train a tiny expert-choice model ($(tail -c 400 "$work/choice.out"))"
expect 1 "not causal" expert_choice "$work/choice/ckpt-00000010.h5"

# a real CNN checkpoint (one step of the dense ResNet on Fashion-MNIST)
bash "$src/data/prepare_fmnist.sh" "$work/fmnist" > "$work/fmnist.out" 2>&1
check $? "prepare_fmnist.sh ($(tail -c 300 "$work/fmnist.out"))"
f=$work/fmnist
"$cmoe" train "$src/recipes/cnn/dense-standard.yaml" --set data.path="$f/train-images-idx3-ubyte.gz" \
    --set data.labels_path="$f/train-labels-idx1-ubyte.gz" \
    --set data.test_path="$f/t10k-images-idx3-ubyte.gz" \
    --set data.test_labels_path="$f/t10k-labels-idx1-ubyte.gz" --set data.batch_size=8 \
    --set train.steps=1 --set train.eval_every=0 --set train.arena_mib=64 \
    --set train.out_dir="$work/cnn" --quiet > "$work/cnn.out" 2>&1
check $? "train a CNN one step ($(tail -c 300 "$work/cnn.out"))"
expect 1 "image classifier" cnn_ckpt "$work/cnn/ckpt-00000001.h5"

"$cmoe" sample --help | grep -q "sliding"
check $? "--help documents the sliding window"

echo "$passes passed, $failures failed"
[ $failures -eq 0 ]
