#!/usr/bin/env bash
# Trains every LM recipe (dense and the MoE routers) for the same step budget
# and prints one table: final validation (train.eval_batches batches) and
# test (the whole test split) bits per byte, training throughput and mean
# activated experts per token; then the k-sweeps of SMoE-Dropout and the
# learned top-2 router on the whole test split (the "self-slimmable" curve). Results go to OUT (default
# runs/compare): one run directory per recipe, table.md, and k-sweep.*.
#
# usage: scripts/compare-lm.sh [--steps N] [--out DIR] [--build DIR] [--recipes "a b"]
#                              [-- extra --set overrides for every run]
# example (about an hour on 2 cores):
#   scripts/compare-lm.sh --steps 600 -- --set data.seq_len=128
set -euo pipefail
cd "$(dirname "$0")/.."

steps=600
out=runs/compare
build=build
recipes="dense moe-top2 switch smoe-dropout thor top-p expert-choice"
while [ $# -gt 0 ]; do
    case $1 in
    --steps) steps=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --build) build=$2; shift 2 ;;
    --recipes) recipes=$2; shift 2 ;;
    --) shift; break ;;
    -h | --help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "compare-lm.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
extra=("$@")
cmoe=$build/cmoe
[ -x "$cmoe" ] || { echo "compare-lm.sh: $cmoe not built (see README)" >&2; exit 1; }
[ -s data/kjv/train.txt ] || bash data/prepare_kjv.sh
mkdir -p "$out"

for recipe in $recipes; do
    echo "== $recipe: $steps steps"
    "$cmoe" train "recipes/lm/$recipe.yaml" --set train.steps="$steps" \
        --set train.out_dir="$out/$recipe" --set checkpoint.every=0 --set checkpoint.keep_last=1 \
        --set train.eval_every=$((steps / 4)) "${extra[@]}" | tail -n 4
done

# One row per run, from its metrics.jsonl.
table=$out/table.md
{
    echo "| recipe | valid bpc | test bpc | tok/s (median) | mean experts/token |"
    echo "| --- | --- | --- | --- | --- |"
    for recipe in $recipes; do
        awk -v name="$recipe" '
            function num(key,   m) {
                if (match($0, "\"" key "\": [-0-9.e+]+")) {
                    m = substr($0, RSTART, RLENGTH); sub(/.*: /, "", m); return m + 0
                }
                return ""
            }
            /"kind": "train"/ { rates[++n] = num("tok_s"); k = num("mean_k") }
            /"kind": "valid"/ { valid = num("bpc") }
            /"kind": "test"/ { test = num("bpc") }
            END {
                for (i = 2; i <= n; i++)            # insertion sort (mawk has no asort)
                    for (j = i; j > 1 && rates[j - 1] > rates[j]; j--) {
                        t = rates[j]; rates[j] = rates[j - 1]; rates[j - 1] = t
                    }
                median = n ? (n % 2 ? rates[(n + 1) / 2] : (rates[n / 2] + rates[n / 2 + 1]) / 2) : 0
                printf "| %s | %.3f | %.3f | %.0f | %s |\n", name, valid, test, median,
                       (k > 0 ? sprintf("%.2f", k) : "dense")
            }' "$out/$recipe/metrics.jsonl"
    done
} > "$table"
cat "$table"

# The k sweeps on the split of the table's final column (the whole test
# split), so every number compared is over the same bytes.
for recipe in smoe-dropout moe-top2; do
    [[ " $recipes " == *" $recipe "* ]] || continue
    ckpt=$(ls "$out/$recipe"/ckpt-*.h5 | tail -n 1)
    echo "== $recipe k-sweep on the test split ($ckpt)"
    mkdir -p "$out/sweep-$recipe"
    "$cmoe" eval "recipes/lm/$recipe.yaml" --ckpt "$ckpt" --split test --sweep-k \
        --out "$out/sweep-$recipe" "${extra[@]}"
done
