#!/usr/bin/env bash
# Makes Fashion-MNIST available as data/fmnist/ from the Debian package
# dataset-fashion-mnist, which installs the four gzip-compressed IDX files in
# /usr/share/datasets/fashion-mnist/.
#
# Output: data/fmnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz (or
# OUTDIR/... if given), symbolic links to the package's files, so recipes can
# name data/fmnist/train-images-idx3-ubyte.gz and cmoe reads them directly
# (src/data/idx.c decompresses them with zlib; nothing is unpacked).
# The sizes and sha256 sums below were recorded from dataset-fashion-mnist
# 0.0~git20200523.55506a9-1 on the first run; different files are caught.
# Idempotent: when all four links exist, point at the package's files and
# those verify, nothing changes.
#
# usage: data/prepare_fmnist.sh [OUTDIR]
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out_dir=${1:-"$here/fmnist"}
package_dir=/usr/share/datasets/fashion-mnist

files=(
    train-images-idx3-ubyte.gz
    train-labels-idx1-ubyte.gz
    t10k-images-idx3-ubyte.gz
    t10k-labels-idx1-ubyte.gz
)
declare -A expected_bytes=(
    [train-images-idx3-ubyte.gz]=26421856
    [train-labels-idx1-ubyte.gz]=29491
    [t10k-images-idx3-ubyte.gz]=4422079
    [t10k-labels-idx1-ubyte.gz]=5125
)
declare -A expected_sha256=(
    [train-images-idx3-ubyte.gz]=b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7
    [train-labels-idx1-ubyte.gz]=0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056
    [t10k-images-idx3-ubyte.gz]=cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa
    [t10k-labels-idx1-ubyte.gz]=8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05
)

missing=()
for file in "${files[@]}"; do
    [ -r "$package_dir/$file" ] || missing+=("$package_dir/$file")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "prepare_fmnist: the Debian package dataset-fashion-mnist is needed" >&2
    echo "  (missing: ${missing[*]})" >&2
    echo "  install it with: scripts/install-deps.sh" >&2
    exit 1
fi

# Prints nothing and returns 0 when file $2 has the recorded size and checksum
# of $1; otherwise prints what differs and returns 1.
verify() {
    local name=$1 path=$2 bytes sum
    bytes=$(wc -c <"$path")
    sum=$(sha256sum "$path" | cut -d' ' -f1)
    if [ "$bytes" != "${expected_bytes[$name]}" ] || [ "$sum" != "${expected_sha256[$name]}" ]; then
        echo "  $path: $bytes bytes, sha256 $sum"
        echo "  expected: ${expected_bytes[$name]} bytes, sha256 ${expected_sha256[$name]}"
        return 1
    fi
}

# The package's files, checked on every run: hashing 31 MB takes well under
# a second, and a link to a changed file would otherwise go unnoticed.
report=""
for file in "${files[@]}"; do
    if ! difference=$(verify "$file" "$package_dir/$file"); then report+="$difference"$'\n'; fi
done
if [ -n "$report" ]; then
    echo "prepare_fmnist: the package's files differ from the recorded ones:" >&2
    printf '%s' "$report" >&2
    echo "  (a changed dataset-fashion-mnist package? installed:" \
        "$(dpkg-query -W -f='${Version}' dataset-fashion-mnist 2>/dev/null || echo unknown))" >&2
    exit 1
fi

mkdir -p "$out_dir"
changed=0
for file in "${files[@]}"; do
    link="$out_dir/$file"
    if [ -L "$link" ] && [ "$(readlink "$link")" = "$package_dir/$file" ]; then continue; fi
    # A copy instead of a link is fine as long as it is the same file.
    if [ -f "$link" ] && [ ! -L "$link" ]; then
        if ! report=$(verify "$file" "$link"); then
            echo "prepare_fmnist: $link is not a link and differs from the package's file:" >&2
            echo "$report" >&2
            echo "  remove it and run this script again" >&2
            exit 1
        fi
        continue
    fi
    # Made under another name and renamed: a reader (another test running at
    # the same time) never finds the link missing.
    ln -sfn "$package_dir/$file" "$link.tmp.$$"
    mv -Tf "$link.tmp.$$" "$link"
    changed=1
done
if [ $changed -eq 0 ]; then
    echo "prepare_fmnist: $out_dir is up to date (4 files verified)"
else
    echo "prepare_fmnist: linked $out_dir/ to $package_dir/" \
        "(train 60000 images, t10k 10000 images; sizes and sha256 verified)"
fi
