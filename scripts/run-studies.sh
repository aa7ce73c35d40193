#!/usr/bin/env bash
# Runs the studies of studies/ one after another at a preset (default small),
# each writing its report into docs/studies/. Resumable: run it again after a
# stop and finished runs are skipped. Meant for the background:
#   nohup nice bash scripts/run-studies.sh > runs/studies.log 2>&1 &
# usage: scripts/run-studies.sh [--preset P] [--build DIR] [STUDY...] (default: all)
set -uo pipefail
cd "$(dirname "$0")/.."
preset=small
build=build
while [ $# -gt 0 ]; do
    case $1 in
    --preset) preset=$2; shift 2 ;;
    --build) build=$2; shift 2 ;;
    -h | --help) sed -n '2,6p' "$0"; exit 0 ;;
    -*) echo "run-studies.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) break ;;
    esac
done
studies=("$@")
if [ ${#studies[@]} -eq 0 ]; then # every study of studies/
    for file in studies/*.yaml; do studies+=("$(basename "$file" .yaml)"); done
fi
[ -x "$build/cmoe" ] || { echo "run-studies.sh: $build/cmoe not built (see README)" >&2; exit 1; }
[ -s data/kjv/train.txt ] || bash data/prepare_kjv.sh
[ -s data/fmnist/train-images-idx3-ubyte.gz ] || bash data/prepare_fmnist.sh
status=0
for study in "${studies[@]}"; do
    echo "=== $study ($preset) $(date)"
    "$build/cmoe" study "studies/$study.yaml" --preset "$preset" --quiet || {
        status=$?
        echo "=== $study stopped with status $status"
        [ $status -eq 130 ] && exit 130
    }
done
echo "=== done $(date)"
exit $status
