#!/usr/bin/env bash
# The image path end to end: data/prepare_fmnist.sh links Fashion-MNIST into a
# temporary directory (checksums verified), `cmoe train` runs
# recipes/cnn/dense-standard.yaml for a few steps on it, the final test line of
# metrics.jsonl carries sa and ra, `cmoe eval` reloads the checkpoint and
# reports the same SA, and an AdvMoE recipe takes one step and reports the
# router robustness, expert RA and router-only RA, its routing (a moe_cnn
# line, images per expert in the test line) and plots it (moe-cnn-load.png).
# usage: test_cnn.sh PATH/TO/cmoe SOURCE_DIR
set -u
cmoe=$1
src=$2
work=$(mktemp -d /tmp/cmoe-cnn-XXXXXX)
trap 'rm -rf "$work"' EXIT
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

bash "$src/data/prepare_fmnist.sh" "$work/fmnist" > "$work/prepare.out" 2>&1
check $? "prepare_fmnist.sh ($(tail -c 300 "$work/prepare.out"))"

data=(--set data.path="$work/fmnist/train-images-idx3-ubyte.gz"
      --set data.labels_path="$work/fmnist/train-labels-idx1-ubyte.gz"
      --set data.test_path="$work/fmnist/t10k-images-idx3-ubyte.gz"
      --set data.test_labels_path="$work/fmnist/t10k-labels-idx1-ubyte.gz"
      --set data.batch_size=64 --set train.eval_batches=2 --set adversarial.eval_steps=2
      --set train.arena_mib=256)

"$cmoe" train "$src/recipes/cnn/dense-standard.yaml" "${data[@]}" --set train.steps=30 --set schedule.type=constant \
    --set train.log_every=4 --set train.out_dir="$work/run" > "$work/train.out" 2>&1
check $? "train dense-standard ($(tail -c 400 "$work/train.out"))"
test_line=$(grep '"kind": "test"' "$work/run/metrics.jsonl" | tail -n 1)
echo "$test_line" | grep -q '"step": 30, "sa": [0-9.]*, "ra": [0-9.]*, "images": 128'
check $? "metrics.jsonl test line with sa and ra ($test_line)"
sa=$(echo "$test_line" | sed 's/.*"sa": \([0-9.]*\).*/\1/')
awk -v s="$sa" 'BEGIN { exit !(s > 0.2) }' # chance is 0.1
check $? "SA above chance after 30 steps ($sa)"
grep -q '"kind": "model", "step": 0,.* "flops": [1-9]' "$work/run/metrics.jsonl"
check $? "model line with flops"

"$cmoe" eval "$src/recipes/cnn/dense-standard.yaml" "${data[@]}" \
    --ckpt "$work/run/ckpt-00000030.h5" --max-batches 2 > "$work/eval.out" 2>&1
check $? "eval ($(tail -c 300 "$work/eval.out"))"
printf -v expected 'SA %.4f' "$sa"
grep -q "test split: $expected, RA [0-9.]* (PGD-2" "$work/eval.out"
check $? "eval reproduces the run's SA ($expected; $(cat "$work/eval.out"))"

"$cmoe" train "$src/recipes/cnn/advmoe.yaml" "${data[@]}" --set train.steps=1 \
    --set train.arena_mib=512 --set train.out_dir="$work/advmoe" > "$work/advmoe.out" 2>&1
check $? "train advmoe one step ($(tail -c 400 "$work/advmoe.out"))"
grep '"kind": "test", "step": 1, "sa"' "$work/advmoe/metrics.jsonl" |
    grep -q '"router_robustness": [0-9.]*, "expert_ra": [0-9.]*, "router_only_ra": [0-9.]*, "router_robustness_per_router": \[[0-9.]*\], "ra_worst": [0-9.]*}'
check $? "advmoe test line with the robustness measures ($(tail -n 1 "$work/advmoe/metrics.jsonl"))"
grep -q "test SA [0-9.]*, RA [0-9.]* (PGD-2, eps 0.1, step 0.0125) over 128 images; router robustness [0-9.]*, expert RA [0-9.]*, router-only RA [0-9.]*, worst-case RA [0-9.]*" "$work/advmoe.out"
check $? "advmoe prints them"
grep -q '"kind": "moe_cnn", "step": 1, "router": 0, "phase": 0, "attacked": 0, "images": 64, .*"images_per_expert": \[[0-9]*, [0-9]*\]}' "$work/advmoe/metrics.jsonl" &&
    grep '"kind": "test"' "$work/advmoe/metrics.jsonl" | grep -q '"images_per_expert_clean": \[[0-9]*, [0-9]*\], "images_per_expert_ra": \[[0-9]*, [0-9]*\]'
check $? "advmoe routing counts in metrics.jsonl ($(grep -v '"kind": "train"' "$work/advmoe/metrics.jsonl"))"
[ -s "$work/advmoe/moe-cnn-load.png" ] && [ -s "$work/advmoe/curves.png" ]
check $? "advmoe plots moe-cnn-load.png and curves.png ($(ls "$work/advmoe"))"

"$cmoe" train "$src/recipes/cnn/dense-standard.yaml" --set adversarial.eps=2 > "$work/bad.out" 2>&1
[ $? -eq 1 ] && grep -q "adversarial.eps = 2 is out of range (0, 1]" "$work/bad.out"
check $? "eps out of range is refused ($(cat "$work/bad.out"))"

echo "$passes passed, $failures failed"
[ $failures -eq 0 ]
