#!/usr/bin/env bash
# End-to-end checks of the cmoe command: help texts, usage errors and exit
# codes, recipe errors with file:line:col, SIGINT saving a checkpoint (exit
# 130) and --resume auto finishing the run, eval / inspect / plot on the
# result, and clear errors for truncated or missing checkpoints.
# usage: test_cli.sh PATH/TO/cmoe SOURCE_DIR
set -u
cmoe=$1
src=$2
work=$(mktemp -d /tmp/cmoe-cli-XXXXXX)
trap 'rm -rf "$work"' EXIT

# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
expect_status() { # expect_status NAME WANT COMMAND...
    local name=$1 want=$2
    shift 2
    "$@" > "$work/out" 2> "$work/err"
    local got=$?
    [ "$got" -eq "$want" ]
    check $? "$name (exit $got, want $want; stderr: $(head -c 300 "$work/err"))"
}
expect_text() { # expect_text NAME FILE TEXT
    grep -qF -- "$3" "$2"
    check $? "$1 ('$3' not in $(head -c 400 "$2"))"
}

# ---- help and usage ------------------------------------------------------
expect_status "help" 0 "$cmoe" --help
expect_text "help lists train" "$work/out" "train RECIPE"
for command in train eval inspect plot; do
    expect_status "$command --help" 0 "$cmoe" "$command" --help
    expect_text "$command --help usage" "$work/out" "usage: cmoe $command"
done
expect_status "no command" 2 "$cmoe"
expect_status "unknown command" 2 "$cmoe" frobnicate
expect_text "unknown command message" "$work/err" "unknown command 'frobnicate'"
expect_status "train without recipe" 2 "$cmoe" train
expect_status "eval without ckpt" 2 "$cmoe" eval "$src/recipes/lm/dense.yaml"

# ---- recipe errors -----------------------------------------------------------
printf 'name: bad\noptim:\n  lrr: 0.1\n' > "$work/bad.yaml"
expect_status "unknown key" 1 "$cmoe" train "$work/bad.yaml"
expect_text "unknown key location" "$work/err" "$work/bad.yaml:3:3:"
expect_text "unknown key suggestion" "$work/err" "did you mean 'lr'"
expect_status "missing recipe" 1 "$cmoe" train "$work/none.yaml"
expect_text "missing recipe message" "$work/err" "none.yaml"
expect_status "bad --set" 1 "$cmoe" train "$src/recipes/lm/dense.yaml" --set optim.lr=-1
expect_text "bad --set message" "$work/err" "--set optim.lr=-1"

# ---- a tiny run: SIGINT, resume, eval, inspect, plot ---------------------------
awk 'BEGIN { srand(7); split("and the lord said unto moses behold of", words, " ");
            for (i = 0; i < 60000; i++)
                printf "%s%s", words[int(rand() * 8) + 1], (i % 9 == 8 ? ".\n" : " ") }' \
    > "$work/corpus.txt"
cat > "$work/tiny.yaml" <<YAML
name: tiny
model: {n_layers: 1, d_model: 32, n_heads: 2, d_ff: 64}
data: {path: $work/corpus.txt, valid_path: $work/corpus.txt, test_path: $work/corpus.txt, seq_len: 32, batch_size: 8}
optim: {lr: 3.0e-3}
train: {steps: 100000, log_every: 50, eval_every: 0, arena_mib: 64, out_dir: $work/run, threads: 1}
checkpoint: {every: 0, keep_last: 2}
YAML
"$cmoe" train "$work/tiny.yaml" > "$work/train.out" 2>&1 &
pid=$!
for _ in $(seq 1 100); do
    grep -q "step " "$work/train.out" 2> /dev/null && break
    sleep 0.1
done
# A second run into the same run directory is refused while the first runs.
expect_status "a second run into a run directory in use fails" 1 "$cmoe" train "$work/tiny.yaml" --quiet \
    --stop-at 2
expect_text "the refusal names the holder" "$work/err" "is in use by another run (pid $pid on"
sleep 1
kill -INT $pid
wait $pid
status=$?
[ $status -eq 130 ]
check $? "SIGINT exits with 130 (got $status: $(tail -c 300 "$work/train.out"))"
expect_text "SIGINT saves a checkpoint" "$work/train.out" "saved $work/run/ckpt-"
ckpt=$(ls "$work"/run/ckpt-*.h5 2> /dev/null | tail -n 1)
[ -n "$ckpt" ]
check $? "checkpoint file exists"
stopped_at=$(basename "$ckpt" .h5 | sed 's/ckpt-0*//')

final=$((stopped_at + 20))
: > "$work/run/ckpt-00000007.h5.tmp" # a save a kill cut short
expect_status "resume auto" 0 "$cmoe" train "$work/tiny.yaml" --resume auto --set train.steps=$final
expect_text "resume message" "$work/out" "resumed from step $stopped_at"
expect_text "resume reaches the end" "$work/out" "test bpc"
[ ! -e "$work/run/ckpt-00000007.h5.tmp" ]
check $? "a stale checkpoint temporary is removed"
[ -f "$work/run/curves.png" ]
check $? "curves.png written"

last=$(printf '%s/run/ckpt-%08d.h5' "$work" $final)
expect_status "inspect" 0 "$cmoe" inspect "$last"
expect_text "inspect step" "$work/out" "step $final"
expect_text "inspect lists a parameter" "$work/out" "blocks.0.attn.qkv.weight"
expect_text "inspect shows the recipe" "$work/out" "name: \"tiny\""
expect_status "eval" 0 "$cmoe" eval "$work/tiny.yaml" --ckpt "$last" --split test --max-batches 3
expect_text "eval prints bpc" "$work/out" "test split: loss"
mv "$work/out" "$work/eval-with-recipe.out"
# Without RECIPE, eval builds the checkpoint's own model: the same figures.
expect_status "eval with the checkpoint's recipe" 0 "$cmoe" eval --ckpt "$last" --split test \
    --max-batches 3
cmp -s "$work/out" "$work/eval-with-recipe.out"
check $? "eval without RECIPE gives the same line ($(cat "$work/out"))"
# A key that changes the model but no shape (2 heads -> 1) is refused, by
# eval and by sample, with the keys listed; a routing knob is not a model key.
expect_status "eval with another head count" 1 "$cmoe" eval --ckpt "$last" --set model.n_heads=1
expect_text "the differing key is named" "$work/err" "model.n_heads 1 (not 2)"
expect_status "eval RECIPE with another head count" 1 "$cmoe" eval "$work/tiny.yaml" \
    --ckpt "$last" --set model.n_heads=1 --set model.layernorm_eps=0.001
expect_text "every differing key is named" "$work/err" \
    "model.n_heads 1 (not 2), model.layernorm_eps 0.001 (not 1e-05)"
expect_status "sample with another head count" 1 "$cmoe" sample "$last" --set model.n_heads=1
expect_text "sample names the key" "$work/err" "model.n_heads 1 (not 2)"
expect_status "eval with another eval_k is fine" 0 "$cmoe" eval --ckpt "$last" \
    --set router.eval_k=1 --max-batches 1
expect_status "plot" 0 "$cmoe" plot "$work/run"
expect_status "resume past train.steps" 1 "$cmoe" train "$work/tiny.yaml" --resume "$last" \
    --set train.steps=$((final - 1))
expect_text "resume past train.steps message" "$work/err" "past train.steps = $((final - 1))"
expect_status "a directory as the data path" 1 "$cmoe" train "$work/tiny.yaml" \
    --set data.path="$work" --set train.out_dir="$work/dirdata"
expect_text "directory message" "$work/err" "is not a regular file"

# SIGINT during the final evaluation (a test split of 24 MB that takes
# seconds) stops it: exit 130, the last step's checkpoint saved, no test line.
for _ in 1 2 3 4 5 6 7 8; do cat "$work/corpus.txt"; done > "$work/big.txt"
for _ in 1 2 3 4 5 6; do cat "$work/big.txt"; done > "$work/huge.txt"
"$cmoe" train "$work/tiny.yaml" --set train.steps=3 --set data.test_path="$work/huge.txt" \
    --set train.out_dir="$work/final" > "$work/final.out" 2>&1 &
pid=$!
for _ in $(seq 1 300); do
    [ -e "$work/final/ckpt-00000003.h5" ] && break
    sleep 0.05
done
kill -INT $pid
wait $pid
status=$?
[ $status -eq 130 ] && grep -q "the final evaluation was stopped" "$work/final.out"
check $? "SIGINT during the final evaluation stops it with 130 (got $status: $(tail -c 300 "$work/final.out"))"
! grep -q '"kind": "test"' "$work/final/metrics.jsonl" && [ -e "$work/final/ckpt-00000003.h5" ]
check $? "no test line is written; the last step's checkpoint stays"

# A checkpoint's data reach the disk before its name does: fsync of the
# temporary, rename, fsync of the directory (strace is in install-deps.sh).
# LeakSanitizer cannot run under ptrace: leaks are checked by the other tests.
ASAN_OPTIONS="${ASAN_OPTIONS:-}:detect_leaks=0" strace -f -e trace=fsync,rename,renameat,renameat2 -o "$work/trace" "$cmoe" train \
    "$work/tiny.yaml" --set train.steps=2 --set train.out_dir="$work/sync" --quiet > /dev/null 2>&1
check $? "train under strace"
awk '/fsync\(/ { if (renamed) after = 1; else before = 1 }
     /rename.*ckpt-00000002\.h5\.tmp/ { renamed = 1 }
     END { exit !(before && renamed && after) }' "$work/trace"
check $? "fsync before and after the checkpoint rename ($(grep -E 'fsync|rename' "$work/trace" | head -c 300))"

# ---- broken checkpoints ----------------------------------------------------------
head -c 3000 "$last" > "$work/cut.h5"
expect_status "truncated checkpoint" 1 "$cmoe" eval "$work/tiny.yaml" --ckpt "$work/cut.h5"
expect_text "truncated message" "$work/err" "cut.h5"
expect_status "missing checkpoint" 1 "$cmoe" inspect "$work/nothing.h5"
expect_text "missing message" "$work/err" "No such file"
expect_status "other model shape" 1 "$cmoe" eval "$work/tiny.yaml" --ckpt "$last" --set model.d_ff=128
expect_text "shape message" "$work/err" "model.d_ff 128 (not 64)"

# A dataset of rank 9 (HDF5 allows 32; a cmoe tensor has at most 4) in the
# parameters group: inspect lists it instead of overflowing its shape buffer.
cp "$last" "$work/rank9.h5"
/usr/bin/python3 -c 'import h5py, sys; h5py.File(sys.argv[1], "a")["params"].create_dataset("deep", shape=(1,) * 9, dtype="f4")' \
    "$work/rank9.h5"
check $? "h5py adds a rank-9 dataset"
expect_status "inspect a checkpoint with a rank-9 dataset" 0 "$cmoe" inspect "$work/rank9.h5"
expect_text "inspect shows the rank-9 shape" "$work/out" "[1,1,1,1,1,1,1,1,1]"

# A parameter rewritten with another dtype (int32) is refused, not cast;
# one rewritten with another rank names its real shape.
rewrite() { # rewrite FILE PYTHON-EXPRESSION-OF-d (the float32 values)
    /usr/bin/python3 -c 'import h5py, sys, numpy as np
f = h5py.File(sys.argv[1], "a")
name = "params/blocks.0.mlp.fc1.weight"
d = f[name][...]
del f[name]
f[name] = eval(sys.argv[2])' "$1" "$2"
}
cp "$last" "$work/int32.h5"
rewrite "$work/int32.h5" 'np.round(d * 1000).astype(np.int32)'
check $? "h5py rewrites fc1 as int32"
expect_status "int32 weights" 1 "$cmoe" eval --ckpt "$work/int32.h5" --max-batches 1
expect_text "int32 message" "$work/err" "blocks.0.mlp.fc1.weight holds int32 values; a cmoe checkpoint stores float32"
cp "$last" "$work/rank3.h5"
rewrite "$work/rank3.h5" 'd.reshape(d.shape[0], 2, -1)'
check $? "h5py rewrites fc1 with rank 3"
expect_status "a parameter of another rank" 1 "$cmoe" eval --ckpt "$work/rank3.h5" --max-batches 1
expect_text "its real shape is named" "$work/err" "has shape [64,2,16] in the checkpoint but [64,32]"

# One bit flipped in the link B-tree of /params (a damaged checkpoint that
# fuzz_inspect found): HDF5 1.10.8's sorted listing of a group with dense
# link storage frees uninitialised pointers when a link fails to decode, and
# inspect segfaulted whenever that memory was not zero (MALLOC_PERTURB_
# makes it so every time). inspect now lists in native order and sorts itself.
MALLOC_PERTURB_=165 expect_status "inspect a checkpoint with a damaged link" 1 \
    "$cmoe" inspect "$src/fuzz/corpus/inspect/regression-link-table.h5"
expect_text "damaged link message" "$work/err" "cannot list /params (corrupted checkpoint?)"

# A chunked 2^40 x 2^40 dataset with nothing written (a valid HDF5 file): its
# element count does not fit 64 bits, and inspect says so instead of
# overflowing a signed product (undefined behaviour; found by fuzz_inspect).
cp "$last" "$work/huge.h5"
/usr/bin/python3 -c 'import h5py, sys; h5py.File(sys.argv[1], "a")["params"].create_dataset("huge", shape=(2**40, 2**40), chunks=(1, 1), dtype="f4")' \
    "$work/huge.h5"
check $? "h5py adds a 2^40 x 2^40 dataset"
expect_status "inspect a checkpoint with a 2^40 x 2^40 dataset" 0 "$cmoe" inspect "$work/huge.h5"
expect_text "inspect shows the huge shape" "$work/out" "[1099511627776,1099511627776]     >=2^64"
expect_text "inspect saturates the total" "$work/out" ">=2^64 parameters (>=2^64 trainable)"

echo "$passes passed, $failures failed"
[ $failures -eq 0 ]
