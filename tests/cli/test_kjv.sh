#!/usr/bin/env bash
# The real data path: data/prepare_kjv.sh builds the KJV corpus from the
# Debian packages (into a temporary directory, checksums verified), and a
# small MoE LM trains on it with `cmoe train` until its validation bits per
# byte fall, then `cmoe eval --sweep-k` runs on the checkpoint.
# usage: test_kjv.sh PATH/TO/cmoe SOURCE_DIR
set -u
cmoe=$1
src=$2
work=$(mktemp -d /tmp/cmoe-kjv-XXXXXX)
trap 'rm -rf "$work"' EXIT
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

bash "$src/data/prepare_kjv.sh" "$work/kjv" > "$work/prepare.out" 2>&1
check $? "prepare_kjv.sh ($(tail -c 300 "$work/prepare.out"))"
for split in train valid test; do
    [ -s "$work/kjv/$split.txt" ]
    check $? "$split.txt written"
done
grep -q "In the beginning God created the heaven and the earth" "$work/kjv/train.txt"
check $? "train.txt starts with Genesis"

"$cmoe" train "$src/recipes/lm/moe-top2.yaml" \
    --set data.path="$work/kjv/train.txt" --set data.valid_path="$work/kjv/valid.txt" \
    --set data.test_path="$work/kjv/valid.txt" \
    --set model.n_layers=1 --set model.d_model=64 --set model.n_heads=2 --set model.d_ff=256 \
    --set moe.num_experts=4 --set data.seq_len=64 --set data.batch_size=8 \
    --set train.steps=60 --set schedule.warmup_steps=5 --set train.eval_every=30 \
    --set train.eval_batches=4 --set train.log_every=10 --set train.arena_mib=64 \
    --set train.out_dir="$work/run" > "$work/train.out" 2>&1
check $? "train on KJV ($(tail -c 400 "$work/train.out"))"
first=$(grep -o 'validation bpc [0-9.]*' "$work/train.out" | head -n 1 | awk '{print $3}')
last=$(grep -o 'validation bpc [0-9.]*' "$work/train.out" | tail -n 1 | awk '{print $3}')
awk -v a="$first" -v b="$last" 'BEGIN { exit !(a != "" && b + 0 < a + 0 && b + 0 < 5.0) }'
check $? "validation bpc falls ($first -> $last)"

"$cmoe" eval "$src/recipes/lm/moe-top2.yaml" --ckpt "$work/run/ckpt-00000060.h5" \
    --set data.path="$work/kjv/train.txt" --set data.valid_path="$work/kjv/valid.txt" \
    --set data.test_path="$work/kjv/valid.txt" \
    --set model.n_layers=1 --set model.d_model=64 --set model.n_heads=2 --set model.d_ff=256 \
    --set moe.num_experts=4 --set data.seq_len=64 --set data.batch_size=8 \
    --set train.arena_mib=64 --max-batches 3 --sweep-k --out "$work/sweeps/new" \
    > "$work/sweep.out" 2>&1
check $? "eval --sweep-k --out NEW_DIR ($(tail -c 300 "$work/sweep.out"))"
[ "$(grep -c -E '^[0-9]+	[0-9.]+$' "$work/sweep.out")" -eq 3 ]
check $? "sweep has k = 1, 2, 4"
[ -s "$work/sweeps/new/k-sweep.png" ] && [ -s "$work/run/moe-load.png" ]
check $? "k-sweep.png (in the new --out directory) and moe-load.png written"

echo "$passes passed, $failures failed"
[ $failures -eq 0 ]
