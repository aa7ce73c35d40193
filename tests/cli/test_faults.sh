#!/usr/bin/env bash
# The error paths on a full disk and a read-only directory, through faultfs
# (tests/faultfs.c, LD_PRELOAD; CTest passes its path in CMOE_FAULTFS): a
# checkpoint save that runs out of space ends the run with exit status 1 and
# a message naming the file and the error (it used to segfault at exit after
# the message), removes its temporary file and keeps the earlier checkpoints,
# from which --resume auto finishes the run with the losses of an
# uninterrupted one (no work lost beyond the last checkpoint); metrics.jsonl
# running out of space stops the run with its name; a read-only run
# directory is refused before any step.
# usage: test_faults.sh PATH/TO/cmoe SOURCE_DIR
set -u
cmoe=$1
src=$2
work=$(mktemp -d /tmp/cmoe-faults-XXXXXX)
trap 'rm -rf "$work"' EXIT
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
export OPENBLAS_NUM_THREADS=1 CMOE_THREADS=1
faultfs=${CMOE_FAULTFS:-$(dirname "$cmoe")/libcmoe_faultfs.so}
[ -f "$faultfs" ]
check $? "the faultfs library is built ($faultfs)"
# The sanitizer build's runtime must come first among the libraries; the
# shim in front of it is fine.
export ASAN_OPTIONS="${ASAN_OPTIONS:-}:verify_asan_link_order=0"

bash "$src/data/prepare_kjv.sh" "$work/kjv" > "$work/prepare.out" 2>&1
check $? "prepare_kjv.sh ($(tail -c 300 "$work/prepare.out"))"
head -c 4097 "$work/kjv/test.txt" > "$work/test.txt"
cat > "$work/tiny.yaml" <<YAML
name: tiny
model: {n_layers: 1, d_model: 32, n_heads: 2, d_ff: 64}
data: {path: $work/kjv/train.txt, valid_path: $work/kjv/valid.txt, test_path: $work/test.txt,
       seq_len: 32, batch_size: 4}
schedule: {warmup_steps: 1}
train: {steps: 6, log_every: 1, eval_every: 0, arena_mib: 64}
checkpoint: {every: 3}
YAML

# faulty ENV... -- ARGS: cmoe train ARGS with faultfs and the ENV settings
faulty() {
    local settings=()
    while [ "$1" != -- ]; do
        settings+=("$1")
        shift
    done
    shift
    env LD_PRELOAD="$faultfs" "${settings[@]}" "$cmoe" train "$work/tiny.yaml" --quiet "$@" \
        > "$work/out" 2> "$work/err"
}

"$cmoe" train "$work/tiny.yaml" --quiet --set train.out_dir="$work/whole" > /dev/null 2>&1
check $? "the uninterrupted run"
size=$(stat -c %s "$work/whole/ckpt-00000003.h5")

# ---- a full disk during a checkpoint -------------------------------------------
for budget in 0 1000 $((size - 1)); do
    faulty FAULTFS_FULL="ckpt-:$budget" -- --set train.out_dir="$work/full$budget"
    status=$?
    [ $status -eq 1 ]
    check $? "first checkpoint, $budget bytes free: exit 1, not a crash (got $status)"
    grep -q "ckpt-00000003.h5.tmp: cannot write the checkpoint ($budget of [0-9]* bytes): No space left on device" "$work/err"
    check $? "the message names the file, the bytes and the error ($(head -c 300 "$work/err"))"
    [ -z "$(ls "$work/full$budget" | grep ckpt-)" ]
    check $? "no checkpoint file is left, not even the temporary ($(ls "$work/full$budget"))"
done

# room for the first checkpoint, not the second
faulty FAULTFS_FULL="ckpt-:$((size + size / 2))" -- --set train.out_dir="$work/second"
status=$?
[ $status -eq 1 ] && grep -q "ckpt-00000006.h5.tmp: cannot write the checkpoint" "$work/err"
check $? "the second checkpoint fails cleanly (exit $status: $(head -c 300 "$work/err"))"
[ "$(ls "$work/second" | grep ckpt-)" = ckpt-00000003.h5 ]
check $? "the first checkpoint stays, alone ($(ls "$work/second"))"
"$cmoe" train "$work/tiny.yaml" --quiet --set train.out_dir="$work/second" --resume auto \
    > "$work/resume.out" 2>&1
check $? "--resume auto after the failure ($(tail -c 300 "$work/resume.out"))"
test_line() { grep '"kind": "test"' "$1/metrics.jsonl" | tail -1 | sed 's/"seconds": [0-9.e+-]*//'; }
[ -n "$(test_line "$work/whole")" ] && [ "$(test_line "$work/whole")" = "$(test_line "$work/second")" ]
check $? "the resumed run ends with the uninterrupted run's test line ($(test_line "$work/second"))"
losses() { grep '"kind": "train"' "$1/metrics.jsonl" | grep -o '"step": [0-9]*, "loss": [0-9.]*' | sort -u; }
[ "$(losses "$work/whole" | wc -l)" -eq 6 ] && [ "$(losses "$work/whole")" = "$(losses "$work/second")" ]
check $? "every step's training loss equals the uninterrupted run's"

# ---- a full disk for the metrics ------------------------------------------------
metrics_size=$(stat -c %s "$work/whole/metrics.jsonl")
faulty FAULTFS_FULL="metrics.jsonl:$((metrics_size / 2))" -- --set train.out_dir="$work/metrics"
status=$?
[ $status -eq 1 ]
check $? "metrics.jsonl out of space mid-run: exit 1 (got $status)"
grep -q "metrics.jsonl: .*No space left on device" "$work/err"
check $? "the message names metrics.jsonl and the error ($(head -c 300 "$work/err"))"
# The disk fills during the last line (the test line, after the last
# checkpoint): resuming must not append to the cut line (two records joined
# on one line was the result before): every line is whole JSON again and the
# test line is the uninterrupted run's.
faulty FAULTFS_FULL="metrics.jsonl:$((metrics_size - 10))" -- --set train.out_dir="$work/metrics-end"
status=$?
[ $status -eq 1 ] && [ -n "$(tail -c 1 "$work/metrics-end/metrics.jsonl")" ]
check $? "the disk fills in the last metrics line: exit 1, the line is cut (got $status)"
"$cmoe" train "$work/tiny.yaml" --quiet --set train.out_dir="$work/metrics-end" --resume auto \
    > "$work/resume-end.out" 2>&1
check $? "--resume auto after the cut line ($(tail -c 300 "$work/resume-end.out"))"
/usr/bin/python3 -c 'import json, sys
for line in open(sys.argv[1]): json.loads(line)' "$work/metrics-end/metrics.jsonl"
check $? "every line of metrics.jsonl is whole JSON after the resume"
[ "$(test_line "$work/whole")" = "$(test_line "$work/metrics-end")" ]
check $? "the resumed run's test line is the uninterrupted run's"
# Resumed once more, the finished run says so and evaluates nothing again.
"$cmoe" train "$work/tiny.yaml" --set train.out_dir="$work/metrics-end" --resume auto \
    > "$work/resume-done.out" 2>&1
check $? "--resume auto on a finished run"
grep -q "step 6: the run is finished (raise train.steps to continue it)" "$work/resume-done.out" &&
    [ "$(grep -c '"kind": "test"' "$work/metrics-end/metrics.jsonl")" -eq 1 ]
check $? "a finished run is not evaluated again ($(tail -c 300 "$work/resume-done.out"))"

# ---- a read-only directory ------------------------------------------------------
mkdir -p "$work/ro"
faulty FAULTFS_READONLY="$work/ro" -- --set train.out_dir="$work/ro/run"
status=$?
[ $status -eq 1 ] && grep -q "Read-only file system" "$work/err"
check $? "a run directory on a read-only file system is refused (exit $status: $(head -c 300 "$work/err"))"
[ ! -e "$work/ro/run" ]
check $? "nothing was created there"
# an existing run directory turned read-only: the resume is refused, the
# checkpoints stay as they were
cp -r "$work/whole" "$work/ro/done"
before=$(md5sum "$work"/ro/done/ckpt-*.h5)
faulty FAULTFS_READONLY="$work/ro" -- --set train.out_dir="$work/ro/done" --resume auto \
    --set train.steps=9
status=$?
[ $status -eq 1 ] && grep -q "Read-only file system" "$work/err"
check $? "resuming in a read-only run directory is refused (exit $status: $(head -c 300 "$work/err"))"
[ "$before" = "$(md5sum "$work"/ro/done/ckpt-*.h5)" ]
check $? "its checkpoints are untouched"

echo "test_faults: $passes passed, $failures failed"
[ "$failures" -eq 0 ]
