#!/usr/bin/env bash
# One short fuzzing run, as CTest's fuzz_* tests do it:
#   fuzz/run.sh FUZZER FUZZ_DIR TARGET SECONDS ARTIFACT_DIR [LIBFUZZER_ARGS...]
# fuzzes a copy of FUZZ_DIR/corpus/TARGET (the committed corpus is never
# written) with its dictionary (FUZZ_DIR/TARGET.dict, hdf5.dict for the
# checkpoint readers), for SECONDS seconds,
# 10 s per input at most, 2 GB of memory. Exits non-zero when libFuzzer
# reports a crash, timeout, leak or out-of-memory; the input that caused it
# is kept in ARTIFACT_DIR (see docs/fuzzing.md to add it to the corpus).
set -uo pipefail
fuzzer=$1 fuzz_dir=$2 target=$3 seconds=$4 artifacts=$5
shift 5

corpus=$(mktemp -d "${TMPDIR:-/tmp}/cmoe-fuzz-corpus-XXXXXX")
trap 'rm -rf "$corpus"' EXIT
cp "$fuzz_dir/corpus/$target/"* "$corpus/"
mkdir -p "$artifacts"

case $target in
    checkpoint | inspect) dict=(-dict="$fuzz_dir/hdf5.dict") ;;
    *) dict=(-dict="$fuzz_dir/$target.dict") ;;
esac

# HDF5 1.10 keeps a few internal buffers when it fails on a damaged file
# (.ci/lsan.supp); leaks of cmoe's own allocations are still reported.
export LSAN_OPTIONS=suppressions=$fuzz_dir/lsan.supp:print_suppressions=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0

# stdin from /dev/null: a recipe's `base: /dev/stdin` reads nothing.
"$fuzzer" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -artifact_prefix="$artifacts/" -print_final_stats=1 "${dict[@]}" "$@" "$corpus" </dev/null
status=$?
if [ $status -ne 0 ]; then
    echo "fuzz_$target: libFuzzer exited with $status; the input is in $artifacts:" >&2
    ls -l "$artifacts" >&2
fi
exit $status
