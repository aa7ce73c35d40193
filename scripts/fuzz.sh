#!/usr/bin/env bash
# Builds the libFuzzer targets (fuzz/, clang with ASan + UBSan) and runs each
# for a short time under CTest; a crash, hang, leak or broken invariant fails.
# Usage: scripts/fuzz.sh [BUILD_DIR] [SECONDS_PER_TARGET]   (docs/fuzzing.md)
# Environment: JOBS for parallelism.
set -euo pipefail
cd "$(dirname "$0")/.."

build_dir=${1:-build-fuzz}
seconds=${2:-20}
jobs=${JOBS:-$(nproc)}

bash scripts/install-deps.sh
cmake -S . -B "$build_dir" -DCMAKE_C_COMPILER=clang -DCMOE_FUZZ=ON -DCMOE_BUILD_TESTS=OFF \
    -DCMOE_WERROR=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMOE_FUZZ_SECONDS="$seconds"
# Only the library and the fuzzers: the fuzz build leaves cmoe and bench out.
cmake --build "$build_dir" -j "$jobs" --target fuzzers
ctest --test-dir "$build_dir" --output-on-failure -j "$jobs" -L fuzz
