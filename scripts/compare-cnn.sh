#!/usr/bin/env bash
# Trains the five CNN recipes of recipes/cnn/ (dense-standard, dense-at,
# dense-half-at, moe-at, advmoe) for the same step budget on Fashion-MNIST and prints one
# table: test SA and RA (PGD of adversarial.eval_steps), the MoE robustness
# measures (router robustness, expert RA, router-only RA), inference
# multiply-adds per image, seconds per optimizer step and the wall time of the
# whole run. --table-only makes the table again from the runs already in OUT. Results go to OUT (default runs/compare-cnn): one run directory
# per recipe, NAME.out (the run's output) and table.md.
#
# usage: scripts/compare-cnn.sh [--steps N] [--eval-batches B] [--out DIR] [--build DIR]
#                               [--recipes "a b"] [--table-only]
#                               [-- extra --set overrides for every run]
# --steps defaults to each recipe's own train.steps (300 for all five);
# --eval-batches to train.eval_batches (8 batches of 128 = 1024 test images).
# example (about 12 minutes on 2 cores): scripts/compare-cnn.sh
set -euo pipefail
cd "$(dirname "$0")/.."

steps=""
eval_batches=""
out=runs/compare-cnn
build=build
recipes="dense-standard dense-at dense-half-at moe-at advmoe"
train=true
while [ $# -gt 0 ]; do
    case $1 in
    --steps) steps=${2:?--steps needs a value}; shift 2 ;;
    --eval-batches) eval_batches=${2:?--eval-batches needs a value}; shift 2 ;;
    --out) out=${2:?--out needs a value}; shift 2 ;;
    --build) build=${2:?--build needs a value}; shift 2 ;;
    --recipes) recipes=${2:?--recipes needs a value}; shift 2 ;;
    --table-only) train=false; shift ;;
    --) shift; break ;;
    -h | --help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "compare-cnn.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
extra=("$@")
[ -n "$steps" ] && extra+=(--set "train.steps=$steps")
[ -n "$eval_batches" ] && extra+=(--set "train.eval_batches=$eval_batches")
cmoe=$build/cmoe
[ -x "$cmoe" ] || { echo "compare-cnn.sh: $cmoe not built (see README)" >&2; exit 1; }
for recipe in $recipes; do
    [ -f "recipes/cnn/$recipe.yaml" ] || { echo "compare-cnn.sh: no recipes/cnn/$recipe.yaml" >&2; exit 2; }
done
[ -s data/fmnist/train-images-idx3-ubyte.gz ] || bash data/prepare_fmnist.sh
mkdir -p "$out"

for recipe in $recipes; do
    $train || break
    echo "== $recipe"
    start=$(date +%s)
    # A fresh run each time: an earlier run's checkpoints are not resumed.
    rm -rf "${out:?}/$recipe"
    status=0
    "$cmoe" train "recipes/cnn/$recipe.yaml" --set train.out_dir="$out/$recipe" \
        "${extra[@]}" > "$out/$recipe.out" 2>&1 || status=$?
    if [ "$status" -ne 0 ]; then
        echo "compare-cnn.sh: $recipe failed with status $status:" >&2
        tail -n 5 "$out/$recipe.out" >&2
        exit 1
    fi
    echo "$(( $(date +%s) - start ))" > "$out/$recipe.seconds"
    tail -n 2 "$out/$recipe.out"
done

# One row per run: the last test line and the model line of its metrics.jsonl,
# the seconds per step the run printed last, the wall time measured above.
table=$out/table.md
{
    echo "| recipe | SA | RA | worst-case RA | router robustness | expert RA | router-only RA | inference M multiply-adds / image | s / step | training time (s) |"
    echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    for recipe in $recipes; do
        if [ ! -s "$out/$recipe/metrics.jsonl" ]; then
            echo "| $recipe | no run in $out/$recipe |"
            continue
        fi
        per_step=$(grep -o '^[0-9.]* s per step' "$out/$recipe.out" 2> /dev/null | tail -n 1 |
            cut -d' ' -f1 || true)
        wall=$(cat "$out/$recipe.seconds" 2> /dev/null || echo "?")
        awk -v name="$recipe" -v per_step="${per_step:-?}" -v wall="$wall" '
            function num(key,   m) {
                if (match($0, "\"" key "\": [-0-9.e+]+")) {
                    m = substr($0, RSTART, RLENGTH); sub(/.*: /, "", m); return m + 0
                }
                return ""
            }
            function show(v) { return (v == "" || v < 0) ? "–" : sprintf("%.3f", v) }
            /"kind": "model"/ { flops = num("flops") }
            /"kind": "test"/ {
                sa = num("sa"); ra = num("ra"); rr = num("router_robustness")
                era = num("expert_ra"); rora = num("router_only_ra"); images = num("images")
                worst = num("ra_worst"); if (worst == "") worst = ra  # a dense model: RA
            }
            END {
                printf "| %s | %s | %s | %s | %s | %s | %s | %.2f | %s | %s |\n", name, show(sa),
                       show(ra), show(worst), show(rr), show(era), show(rora), flops / 1e6,
                       per_step, wall
            }' "$out/$recipe/metrics.jsonl"
    done
} > "$table"
cat "$table"
