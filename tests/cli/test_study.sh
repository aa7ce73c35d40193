#!/usr/bin/env bash
# cmoe study end to end: a smoke study on synthetic text (2 seeds, a few
# steps) and its report checked against a hand computation from the runs'
# own metrics; a study killed (SIGKILL) mid-run resumes without redoing the
# finished runs; bad study files fail before any run with file:line:col (bad
# merge: and evaluate_only arms too); every studies/*.yaml passes --dry-run
# under every preset; the real path (studies of studies/ on the KJV corpus:
# gating, upcycling, merge with a merge arm stopped after its merge and run
# again) and a study under mpirun.
# usage: test_study.sh PATH/TO/cmoe SOURCE_DIR
set -u
cmoe=$1
src=$2
work=$(mktemp -d /tmp/cmoe-study-XXXXXX)
trap 'kill -9 $(jobs -p) 2>/dev/null; rm -rf "$work"' EXIT
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

python3 - "$work/text.txt" <<'EOF'
import random, sys
random.seed(7)
words = "in the beginning god created the heaven and the earth and darkness was".split()
open(sys.argv[1], "w").write(" ".join(random.choice(words) for _ in range(30000)))
EOF

# The study: dense against a 4-expert top-2 MoE, a k sweep, two claims.
# STEPS_TOP2 lets the kill test make the second run long enough to catch.
write_study() {
    cat > "$work/$1.yaml" <<EOF
name: $1
paper: "A made-up paper"
summary: "Dense against a 4-expert top-2 MoE."
arms:
  - name: dense
    recipe: $src/recipes/lm/dense.yaml
  - name: top2
    recipe: $src/recipes/lm/moe-top2.yaml
    set: [moe.num_experts=4, train.steps=$2, checkpoint.every=$3]
presets:
  smoke:
    seeds: 2
    set: [data.path=$work/text.txt, data.valid_path=$work/text.txt, data.test_path=$work/text.txt,
          model.n_layers=1, model.d_model=32, model.n_heads=2, model.d_ff=128, data.seq_len=32,
          data.batch_size=4, train.steps=8, train.eval_every=4, train.eval_batches=2,
          train.log_every=4, schedule.warmup_steps=1, train.arena_mib=64, checkpoint.every=4]
evaluations:
  - name: k
    key: router.k
    values: [1, 2, 4]
    arms: [top2]
metrics: [test.bpc, valid.bpc, k=1.bpc, k=2.bpc, k=4.bpc, test.mean_k]
curve: {kind: valid, field: bpc}
sweeps: [{evaluation: k, field: bpc}]
claims:
  - id: moe-better
    claim: "The MoE beats the dense model"
    paper_figure: "-0.1 bpc"
    tests: [{left: "top2:test.bpc", less: "dense:test.bpc"}]
    analysis: "checked: nothing, a made-up study"
  - id: slim
    claim: "bpc falls with k"
    paper_figure: "Fig. 1"
    monotone: {arm: top2, metrics: [k=1.bpc, k=2.bpc, k=4.bpc], direction: decreasing}
EOF
}

# ---- a smoke study and its report -------------------------------------------------
write_study mini 8 4
(cd "$work" && "$cmoe" study mini.yaml --preset smoke --out runs --report report --quiet) \
    > "$work/study.out" 2>&1
check $? "cmoe study runs ($(tail -c 400 "$work/study.out"))"
for arm in dense top2; do
    for seed in 1 2; do
        grep -q "^status	done" "$work/runs/$arm/seed-$seed/study-run.txt"
        check $? "$arm seed $seed done"
    done
done
[ -s "$work/report/mini.md" ] && [ -s "$work/report/mini.claims.tsv" ] &&
    [ -s "$work/report/README.md" ]
check $? "report, claims table and index written"
[ -s "$work/report/mini/curves.png" ] && [ -s "$work/report/mini/sweep-k.png" ]
check $? "learning-curve and k-sweep plots written"
grep -q "train.seed=2" "$work/runs/dense/seed-2/study-run.txt"
check $? "seed 2 runs with train.seed=2"

# The hand computation: mean, sd and the 95% CI (t = 12.706 at 1 degree of
# freedom) of each arm's test bpc over the two seeds, from the runs' own
# metrics.jsonl, must be what the report prints; the verdict of the claim
# "top2 < dense" follows from the CI of the paired differences.
test_bpc() { grep '"kind": "test"' "$work/runs/$1/seed-$2/metrics.jsonl" | tail -n 1 |
    sed 's/.*"bpc": \([0-9.]*\).*/\1/'; }
d1=$(test_bpc dense 1) d2=$(test_bpc dense 2) m1=$(test_bpc top2 1) m2=$(test_bpc top2 2)
expected=$(awk -v a="$d1" -v b="$d2" 'BEGIN { m = (a + b) / 2; s = sqrt(((a - m)^2 + (b - m)^2));
    printf "%.4f ± %.4f", m, s }')
grep -q -- "$expected" "$work/report/mini.md"
check $? "report has dense test bpc mean ± sd = $expected (from $d1, $d2)"
verdict=$(awk -v a="$m1" -v b="$m2" -v c="$d1" -v d="$d2" 'BEGIN {
    x = a - c; y = b - d; m = (x + y) / 2; s = sqrt((x - m)^2 + (y - m)^2); h = 12.706 * s / sqrt(2);
    if (m + h < 0) print "reproduced"; else if (m - h >= 0) print "contradicted";
    else print "inconclusive" }')
grep -P "^mini\tmoe-better\t" "$work/report/mini.claims.tsv" | grep -q -w "$verdict"
check $? "claim verdict is the hand-computed '$verdict' ($(grep moe-better "$work/report/mini.claims.tsv"))"
grep -q -- "- \*\*moe-better\*\*: checked: nothing, a made-up study" "$work/report/mini.md"
check $? "the claim's analysis is in the report"
grep -q '"kind": "k=4".*"mean_k": 4.0000' "$work/runs/top2/seed-1/study-evals.jsonl"
check $? "the k = 4 evaluation routes 4 experts per token"

# A second invocation finds everything done and runs nothing.
before=$(md5sum "$work/runs/top2/seed-1/metrics.jsonl")
(cd "$work" && "$cmoe" study mini.yaml --preset smoke --out runs --report report --quiet) \
    > "$work/again.out" 2>&1
check $? "second invocation succeeds"
grep -q "4/4 runs done (4 were done before)" "$work/again.out" &&
    [ "$before" = "$(md5sum "$work/runs/top2/seed-1/metrics.jsonl")" ]
check $? "finished runs are skipped ($(tail -n 2 "$work/again.out"))"

# --report-only writes the report again from the runs, quoting the command
# that runs the study (without --report-only).
(cd "$work" && "$cmoe" study mini.yaml --report-only --out runs --report report2 --preset smoke) \
    > "$work/report-only.out" 2>&1
check $? "--report-only succeeds"
grep -qx 'cmoe study mini.yaml --out runs --report report2 --preset smoke' "$work/report2/mini.md" &&
    cmp -s <(grep -v '^cmoe study' "$work/report/mini.md") <(grep -v '^cmoe study' "$work/report2/mini.md")
check $? "--report-only gives the same report, quoting the running command"

# ---- killed mid-run ------------------------------------------------------------------
write_study kill 3000 20
(cd "$work" && exec "$cmoe" study kill.yaml --preset smoke --out kill-runs --report kill-report) \
    > "$work/kill.out" 2>&1 &
study_pid=$!
caught=1
for _ in $(seq 1 600); do
    if grep -q "^status	done" "$work/kill-runs/dense/seed-1/study-run.txt" 2>/dev/null &&
        ls "$work"/kill-runs/top2/seed-1/ckpt-*.h5 > /dev/null 2>&1; then
        kill -9 $study_pid
        caught=0
        break
    fi
    sleep 0.1
done
wait $study_pid 2>/dev/null
check $caught "killed the study while the second run trained"
grep -q "^status	started" "$work/kill-runs/top2/seed-1/study-run.txt"
check $? "the killed run is marked started"
before=$(md5sum "$work/kill-runs/dense/seed-1/metrics.jsonl")
(cd "$work" && "$cmoe" study kill.yaml --preset smoke --out kill-runs --report kill-report \
    --seeds 1) > "$work/resume.out" 2>&1
check $? "the killed study continues ($(tail -c 300 "$work/resume.out"))"
! grep -q "arm dense, seed 1" "$work/resume.out" &&
    [ "$before" = "$(md5sum "$work/kill-runs/dense/seed-1/metrics.jsonl")" ]
check $? "the finished run is not redone"
grep -q "resumed from step" "$work/resume.out"
check $? "the killed run resumes from its checkpoint"
grep -q "^status	done" "$work/kill-runs/top2/seed-1/study-run.txt"
check $? "the resumed run finishes"

# ---- Ctrl-C during the study's evaluations ---------------------------------------
# The k sweep of a finished training run, on a test split 8 times the size so
# each evaluation takes a while: SIGINT after the first sweep record stops the
# sweep (exit 130), the run stays unfinished, and the resumed study makes the
# whole sweep again (one record per value) without training again.
write_study evalstop 8 4
for _ in 1 2 3 4 5 6 7 8; do cat "$work/text.txt"; done > "$work/big.txt"
sed -i "s|data.test_path=$work/text.txt|data.test_path=$work/big.txt|" "$work/evalstop.yaml"
evals="$work/evalstop-runs/top2/seed-1/study-evals.jsonl"
(cd "$work" && exec "$cmoe" study evalstop.yaml --preset smoke --out evalstop-runs \
    --report evalstop-report --seeds 1 --only top2) > "$work/evalstop.out" 2>&1 &
study_pid=$!
caught=1
for _ in $(seq 1 1200); do
    if [ "$(cat "$evals" 2>/dev/null | wc -l)" -ge 1 ]; then
        kill -INT $study_pid
        caught=0
        break
    fi
    sleep 0.05
done
wait $study_pid
status=$?
check $caught "interrupted the study during its k sweep"
[ $status -eq 130 ] && [ "$(wc -l < "$evals")" -lt 3 ] &&
    grep -q "^status	started" "$work/evalstop-runs/top2/seed-1/study-run.txt"
check $? "the sweep stops: exit 130, the run not done ($status, $(wc -l < "$evals") records)"
(cd "$work" && "$cmoe" study evalstop.yaml --preset smoke --out evalstop-runs \
    --report evalstop-report --seeds 1 --only top2) > "$work/evalstop2.out" 2>&1
check $? "the study continues after the stop ($(tail -c 300 "$work/evalstop2.out"))"
[ "$(grep -c '"kind": "k=' "$evals")" -eq 3 ] && grep -q "the run is finished" "$work/evalstop2.out" &&
    grep -q "^status	done" "$work/evalstop-runs/top2/seed-1/study-run.txt"
check $? "the resumed run makes the sweep once more, without training ($(grep -c '"kind"' "$evals") records)"

# A directory holding another configuration is refused.
(cd "$work" && "$cmoe" study mini.yaml --preset smoke --out kill-runs --quiet) \
    > "$work/other.out" 2>&1
[ $? -eq 1 ] && grep -q "holds a run of another configuration" "$work/other.out"
check $? "another configuration's run directory is refused"

# ---- bad study files ----------------------------------------------------------------
bad() { # NAME EXPECTED_LOCATION PATTERN: the edited study must fail at that line:col
    (cd "$work" && "$cmoe" study "$1.yaml" --preset smoke --out "bad-$1" --quiet) \
        > "$work/$1.out" 2>&1
    local status=$?
    [ $status -eq 1 ] && grep -q -- "$1.yaml:$2: .*$3" "$work/$1.out" && [ ! -e "$work/bad-$1" ]
    check $? "$1 fails at $2 before any run ($(head -c 300 "$work/$1.out"))"
}
sed 's/^    recipe: \(.*dense.yaml\)/    recipe: \1\n    steps: 5/' "$work/mini.yaml" > "$work/unknown-key.yaml"
bad unknown-key 7:5 "unknown key 'steps' in an arm"
sed 's/left: "top2:test.bpc"/left: "top2:test.loss"/' "$work/mini.yaml" > "$work/no-metric.yaml"
bad no-metric 29:20 "metric 'test.loss' is not in the study's metrics list"
sed 's/less: "dense:test.bpc"/less: "dense2:test.bpc"/' "$work/mini.yaml" > "$work/no-arm.yaml"
bad no-arm 29:43 "no arm named 'dense2'"
sed 's/seeds: 2/seeds: 0/' "$work/mini.yaml" > "$work/zero-seeds.yaml"
bad zero-seeds 12:12 "seeds must be an integer in \[1, 16\]"
sed 's/model.n_heads=2/model.n_heads=3/' "$work/mini.yaml" > "$work/bad-recipe.yaml"
bad bad-recipe 5:5 "model.n_heads"

# from: must name an earlier arm; an arm that upcycles another must be able to
sed 's/^    recipe: \(.*dense.yaml\)/    recipe: \1\n    from: top2/' "$work/mini.yaml" > "$work/from-later.yaml"
bad from-later 7:11 "from: 'top2' is not an arm before this one"
sed 's/^    set: \[moe.num_experts=4/    from: dense\n    upcycle: true\n    set: [moe.num_experts=4/' \
    "$work/mini.yaml" > "$work/bad-upcycle.yaml"
bad bad-upcycle 7:5 "arm 'top2' cannot upcycle arm 'dense' with preset 'smoke': .*router.k = 2 is not a multiple of the granularity G = 4"

# merge: needs from, its known keys and values, a source cmoe merge takes and the
# source's model (8 experts here against top2's 4); evaluate_only needs from,
# and an arm that trains nothing cannot be a source.
with_arms() { # NAME TEXT: mini.yaml with TEXT (arms) before presets:, as NAME.yaml
    TEXT="$2" awk '/^presets:/ { print ENVIRON["TEXT"] } { print }' "$work/mini.yaml" \
        > "$work/$1.yaml"
}
arm="  - name: merged
    recipe: $src/recipes/lm/moe-top2.yaml"
with_arms merge-no-from "$arm
    set: [moe.num_experts=4]
    merge: {groups: 2}"
bad merge-no-from 13:12 "merge: needs from: ARM"
with_arms merge-unknown-key "$arm
    set: [moe.num_experts=4]
    from: top2
    merge: {groups: 2, mix: 3}"
bad merge-unknown-key 14:24 "unknown key 'mix' in merge (known: groups, grouping, align, weights, mode, calib_windows, seed)"
with_arms merge-bad-value "$arm
    set: [moe.num_experts=4]
    from: top2
    merge: {groups: 2, grouping: kmeans}"
bad merge-bad-value 14:34 "merge grouping is msmoe or random, not 'kmeans'"
with_arms merge-groups "$arm
    set: [moe.num_experts=4]
    from: top2
    merge: {groups: 9}"
bad merge-groups 10:5 "arm 'merged' cannot merge arm 'top2' with preset 'smoke': --groups 9 is not in \[1, 4\]"
with_arms merge-dense "$arm
    from: dense
    merge: {groups: 2}"
bad merge-dense 10:5 "arm 'merged' cannot merge arm 'dense' with preset 'smoke': .*is a dense model"
with_arms merge-model "$arm
    from: top2
    merge: {groups: 2}"
bad merge-model 10:5 "cannot merge arm 'top2' with preset 'smoke': its model differs from the source's: moe.num_experts"
with_arms eval-no-from "$arm
    set: [moe.num_experts=4]
    evaluate_only: true"
bad eval-no-from 13:20 "evaluate_only: true needs from: ARM"
with_arms from-eval-only "$arm
    set: [moe.num_experts=4]
    from: top2
    merge: {groups: 2}
    evaluate_only: true
  - name: after
    recipe: $src/recipes/lm/moe-top2.yaml
    from: merged"
bad from-eval-only 18:11 "from: 'merged' trains nothing (evaluate_only): start from its source"

# ---- the studies of studies/ ---------------------------------------------------------
for file in "$src"/studies/*.yaml; do
    for preset in smoke small full; do
        "$cmoe" study "$file" --preset "$preset" --dry-run --out "$work/dry" > "$work/dry.out" 2>&1
        check $? "$(basename "$file") --preset $preset --dry-run ($(tail -c 300 "$work/dry.out"))"
    done
done

# The real path: KJV from the Debian packages, studies/gating.yaml at its smoke preset.
mkdir -p "$work/real/data"
bash "$src/data/prepare_kjv.sh" "$work/real/data/kjv" > "$work/prepare.out" 2>&1
check $? "prepare_kjv.sh ($(tail -c 300 "$work/prepare.out"))"
(cd "$work/real" && "$cmoe" study "$src/studies/gating.yaml" --preset smoke --out runs \
    --report report --quiet) > "$work/real.out" 2>&1
check $? "studies/gating.yaml --preset smoke on KJV ($(tail -c 400 "$work/real.out"))"
grep -q -E "^gating	softmax-first	.*	(reproduced|contradicted|inconclusive)	" \
    "$work/real/report/gating.claims.tsv"
check $? "the gating claim has a verdict"

# studies/upcycling.yaml: arms that start from the dense source's checkpoint,
# upcycled or not.
(cd "$work/real" && "$cmoe" study "$src/studies/upcycling.yaml" --preset smoke --out up-runs \
    --report report --quiet) > "$work/upcycling.out" 2>&1
check $? "studies/upcycling.yaml --preset smoke on KJV ($(tail -c 400 "$work/upcycling.out"))"
"$cmoe" inspect "$work/real/up-runs/no-groups/seed-2/upcycled.h5" > "$work/inspect.out" 2>&1
grep -q "upcycled from up-runs/dense-source/seed-2/ckpt-00000006.h5 (step 6, seed 2): E16G4T4.*router fresh" \
    "$work/inspect.out"
check $? "an arm upcycles its seed's dense source ($(head -c 400 "$work/inspect.out"))"
[ ! -e "$work/real/up-runs/dense/seed-1/upcycled.h5" ] &&
    grep -q "step 4, seed 1" <("$cmoe" inspect "$work/real/up-runs/dense/seed-1/ckpt-00000004.h5")
check $? "the dense continuation starts from the source as is and trains its own 4 steps"
grep -q -E "^upcycling	beats-dense	.*	(reproduced|contradicted|inconclusive)	" \
    "$work/real/report/upcycling.claims.tsv"
check $? "the upcycling claims have verdicts"

# studies/merge.yaml: arms that merge their seed's base (cmoe merge with the
# arm's settings), evaluated as they are (evaluate_only: the merged checkpoint
# and its evaluation, no training) or fine-tuned from it (train --init).
(cd "$work/real" && "$cmoe" study "$src/studies/merge.yaml" --preset smoke --out merge-runs \
    --report report --quiet) > "$work/merge.out" 2>&1
check $? "studies/merge.yaml --preset smoke on KJV ($(tail -c 400 "$work/merge.out"))"
runs=$work/real/merge-runs
settings() { "$cmoe" inspect "$runs/$1/seed-$2/merged.h5" 2>&1 | grep "merged from"; }
settings naive 2 | grep -q "merged from merge-runs/base/seed-2/ckpt-00000006.h5 (step 6, seed 2): MC-SMoE merge: groups 4 (average), 256 calibration windows (seed 2333), grouping random, align off, weights uniform, mode merge"
check $? "naive merges its seed's base with its settings ($(settings naive 2))"
settings msmoe-unaligned-ft 1 | grep -q "base/seed-1/.*grouping msmoe, align off, weights frequency, mode merge" &&
    settings prune 1 | grep -q "grouping msmoe, align on, weights frequency, mode prune"
check $? "the other arms merge with theirs ($(settings prune 1))"
last_bpc() { grep '"kind": "test"' "$1" | tail -n 1 | sed 's/.*"bpc": \([0-9.]*\).*/\1/'; }
ls "$runs"/msmoe/seed-1/ckpt-*.h5 > /dev/null 2>&1 || [ -e "$runs/msmoe/seed-1/metrics.jsonl" ]
[ $? -ne 0 ] && [ "$(grep -c '"kind": "test"' "$runs/msmoe/seed-1/study-evals.jsonl")" = 1 ]
check $? "an evaluate_only arm trains nothing and holds one test evaluation"
zero_shot=$(last_bpc "$runs/msmoe/seed-1/study-evals.jsonl")
by_hand=$(cd "$work/real" && "$cmoe" eval --ckpt merge-runs/msmoe/seed-1/merged.h5 --split test 2>&1 |
    sed -n 's/.*bpc \([0-9.]*\) over.*/\1/p')
[ -n "$zero_shot" ] && [ "$zero_shot" = "$by_hand" ]
check $? "its evaluation is the merged checkpoint's test bpc ($zero_shot, cmoe eval: $by_hand)"
"$cmoe" inspect "$runs/msmoe-ft/seed-1/ckpt-00000002.h5" 2>&1 | grep -q "^  blocks.1.moe.group_of "
check $? "the fine-tuned arm trains its 2 steps as a merged model (group tables)"
grep -q -E "^merge	msmoe-beats-naive	.*	(reproduced|contradicted|inconclusive)	" \
    "$work/real/report/merge.claims.tsv"
check $? "the merge claims have verdicts"

# A run stopped after its merge (status started, no checkpoint of its own;
# the evaluate_only arm: its evaluation not recorded done) runs again alone
# and does not merge again: the same merged.h5 (inode and time), the same result.
stamp() { stat -c '%i %y' "$runs/$1/seed-1/merged.h5"; }
ft_stamp=$(stamp msmoe-ft) zs_stamp=$(stamp msmoe) ft_bpc=$(last_bpc "$runs/msmoe-ft/seed-1/metrics.jsonl")
rm -f "$runs"/msmoe-ft/seed-1/ckpt-*.h5 "$runs/msmoe-ft/seed-1/metrics.jsonl"
sed -i 's/^status	done/status	started/' "$runs/msmoe-ft/seed-1/study-run.txt" \
    "$runs/msmoe/seed-1/study-run.txt"
(cd "$work/real" && "$cmoe" study "$src/studies/merge.yaml" --preset smoke --out merge-runs \
    --report merge-report --seeds 1 --quiet) > "$work/merge-resume.out" 2>&1
check $? "the stopped merge arms run again ($(tail -c 300 "$work/merge-resume.out"))"
grep "runs done" "$work/merge-resume.out" | tail -n 1 | grep -q "10/12 runs done (8 were done before)" &&
    grep -q "^status	done" "$runs/msmoe-ft/seed-1/study-run.txt" &&
    grep -q "^status	done" "$runs/msmoe/seed-1/study-run.txt"
check $? "only they ran, and they are done ($(tail -n 2 "$work/merge-resume.out"))"
[ "$ft_stamp" = "$(stamp msmoe-ft)" ] && [ "$zs_stamp" = "$(stamp msmoe)" ]
check $? "their merged checkpoints were not made again ($ft_stamp, $(stamp msmoe-ft))"
[ "$ft_bpc" = "$(last_bpc "$runs/msmoe-ft/seed-1/metrics.jsonl")" ] &&
    [ "$zero_shot" = "$(last_bpc "$runs/msmoe/seed-1/study-evals.jsonl")" ]
check $? "and give the same test bpc ($ft_bpc, $zero_shot)"

# Under mpirun: 2 ranks run every run together and get the 1-process numbers.
(cd "$work" && mpi 2 study mini.yaml --preset smoke --out mpi-runs --report mpi-report --quiet) \
    > "$work/mpi.out" 2>&1
check $? "cmoe study under mpirun -np 2 ($(tail -c 400 "$work/mpi.out"))"
one=$(test_bpc dense 1)
two=$(grep '"kind": "test"' "$work/mpi-runs/dense/seed-1/metrics.jsonl" | tail -n 1 |
    sed 's/.*"bpc": \([0-9.]*\).*/\1/')
awk -v a="$one" -v b="$two" 'BEGIN { d = a - b; exit !(b != "" && d < 1e-4 && d > -1e-4) }'
check $? "2 ranks give the 1-process test bpc ($one vs $two)"
[ -s "$work/mpi-report/mini.md" ]
check $? "rank 0 writes the report"

echo "$passes passed, $failures failed"
[ $failures -eq 0 ]
