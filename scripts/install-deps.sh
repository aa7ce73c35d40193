#!/usr/bin/env bash
# Installs the Debian packages cmoe needs (the list in shared/DESIGN.md, plus
# strace for a checkpoint-durability test, python3-yaml for the PyTorch loader,
# and clang with its runtime libraries for the fuzz targets: libFuzzer is in
# libclang-rt-dev, which clang only recommends).
# Idempotent: packages already present are not fetched again, and
# `apt-get update` runs only when something is missing. Needs root (or sudo).
set -euo pipefail

packages=(
    build-essential cmake pkg-config clang-format clang libclang-rt-dev
    libopenmpi-dev openmpi-bin
    libopenblas-dev
    libhdf5-openmpi-dev hdf5-tools
    libyaml-dev
    check
    zlib1g-dev
    bible-kjv bible-kjv-text
    dataset-fashion-mnist
    gnuplot-nox strace
    python3 python3-torch python3-h5py python3-numpy python3-yaml
)

missing=()
for pkg in "${packages[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    [ "$status" = "install ok installed" ] || missing+=("$pkg")
done

if [ ${#missing[@]} -eq 0 ]; then
    echo "install-deps: all ${#packages[@]} packages already installed"
    exit 0
fi

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "install-deps: run as root or install sudo" >&2; exit 1; }
    sudo_cmd=(sudo)
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" apt-get update -q
"${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
