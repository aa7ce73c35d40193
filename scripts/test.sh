#!/usr/bin/env bash
# Installs the dependencies, builds cmoe with warnings as errors, and runs the
# whole test suite under CTest. Usage: scripts/test.sh [BUILD_DIR]
# Environment: CMOE_SANITIZE=ON for an ASan+UBSan build; JOBS for parallelism.
set -euo pipefail
cd "$(dirname "$0")/.."

build_dir=${1:-build}
jobs=${JOBS:-$(nproc)}
sanitize=${CMOE_SANITIZE:-OFF}

bash scripts/install-deps.sh
cmake -S . -B "$build_dir" -DCMOE_WERROR=ON -DCMOE_SANITIZE="$sanitize" \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo
cmake --build "$build_dir" -j "$jobs"
# Tests that start MPI ranks claim that many processors, so ctest never runs
# more processes than cores at once.
ctest --test-dir "$build_dir" --output-on-failure -j "$jobs"
