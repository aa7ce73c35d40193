#!/usr/bin/env bash
# Builds the byte-level KJV corpus from the Debian packages bible-kjv (the
# `bible` program) and bible-kjv-text (its compressed text, /usr/lib/bible.data).
#
# Output: data/kjv/{train,valid,test}.txt (or OUTDIR/... if given).
#   - every verse, Genesis 1:1 to Revelation 22:21, one verse per line, without
#     the "Ge1:1 " reference that `bible` prints in front of it (the model
#     should learn the text, not the verse numbering);
#   - a fixed contiguous split 90/5/5 by bytes: train ends at the first line
#     boundary at or after 90% of the bytes, valid at the first one at or
#     after 95%, test holds the rest.
# The sizes and sha256 sums below were recorded from bible-kjv(-text) 4.38 on
# the first run; a different package version that changes the text is caught.
# Idempotent: when all three files exist and verify, nothing is rebuilt.
#
# usage: data/prepare_kjv.sh [OUTDIR]
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out_dir=${1:-"$here/kjv"}
bible_data=/usr/lib/bible.data

splits=(train valid test)
declare -A expected_bytes=(
    [train]=3724089
    [valid]=206873
    [test]=206888
)
declare -A expected_sha256=(
    [train]=13f94d740efef4787bfde8f8d9179434b0487b88a12db2c6cfe798268718cadb
    [valid]=a23947b92f2cfe910dba1561c588fe55280c4703be421989f9cf06bf2a1d0881
    [test]=053322a1af6a6fcdd12357e87bfb513666b549eda72eb29e93b0f25bb91cf882
)

# Prints nothing and returns 0 when every split in $1 has its recorded size
# and checksum; otherwise prints what differs and returns 1.
verify() {
    local dir=$1 status=0 split path bytes sum
    for split in "${splits[@]}"; do
        path="$dir/$split.txt"
        if [ ! -f "$path" ]; then
            echo "  $path: missing"
            status=1
            continue
        fi
        bytes=$(wc -c <"$path")
        sum=$(sha256sum "$path" | cut -d' ' -f1)
        if [ "$bytes" != "${expected_bytes[$split]}" ] || [ "$sum" != "${expected_sha256[$split]}" ]; then
            echo "  $path: $bytes bytes, sha256 $sum"
            echo "  expected: ${expected_bytes[$split]} bytes, sha256 ${expected_sha256[$split]}"
            status=1
        fi
    done
    return $status
}

if verify "$out_dir" >/dev/null; then
    echo "prepare_kjv: $out_dir is up to date (train/valid/test verified)"
    exit 0
fi

if ! command -v bible >/dev/null || [ ! -r "$bible_data" ]; then
    echo "prepare_kjv: the Debian packages bible-kjv and bible-kjv-text are needed" >&2
    echo "  (missing: $(command -v bible >/dev/null || printf 'bible program '; [ -r "$bible_data" ] || printf '%s' "$bible_data"))" >&2
    echo "  install them with: scripts/install-deps.sh" >&2
    exit 1
fi

mkdir -p "$out_dir"
work=$(mktemp -d "$out_dir/.prepare.XXXXXX")
trap 'rm -rf "$work"' EXIT

# -f turns pretty-printing off: one "Ref text" line per verse. -p pins the data
# directory so a stray bible.data in the current directory is not picked up.
export LC_ALL=C
bible -f -p /usr/lib "Gen1:1-Rev22:21" </dev/null >"$work/raw.txt"
sed 's/^[^ ]* //' "$work/raw.txt" >"$work/all.txt"
verses=$(wc -l <"$work/all.txt")
if [ "$verses" -ne 31102 ]; then
    echo "prepare_kjv: expected 31102 verses from \`bible\`, got $verses" >&2
    exit 1
fi

# length($0) counts bytes under LC_ALL=C; +1 for the newline.
total=$(wc -c <"$work/all.txt")
awk -v total="$total" -v dir="$work" '
    BEGIN { cut_valid = int(total * 0.90); cut_test = int(total * 0.95); offset = 0 }
    {
        file = offset < cut_valid ? "train" : (offset < cut_test ? "valid" : "test")
        print > (dir "/" file ".txt")
        offset += length($0) + 1
    }' "$work/all.txt"

if ! report=$(verify "$work"); then
    echo "prepare_kjv: the generated corpus differs from the recorded one:" >&2
    echo "$report" >&2
    echo "  (a changed bible-kjv-text package? installed: $(dpkg-query -W -f='${Version}' bible-kjv-text 2>/dev/null || echo unknown))" >&2
    exit 1
fi
for split in "${splits[@]}"; do mv "$work/$split.txt" "$out_dir/$split.txt"; done
echo "prepare_kjv: wrote $out_dir: $verses verses, $total bytes" \
    "(train ${expected_bytes[train]}, valid ${expected_bytes[valid]}, test ${expected_bytes[test]})"
