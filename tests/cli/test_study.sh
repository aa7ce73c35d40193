#!/usr/bin/env bash
# cmoe study end to end: a smoke study on synthetic text (2 seeds, a few
# steps) and its report checked against a hand computation from the runs'
# own metrics; a study killed (SIGKILL) mid-run resumes without redoing the
# finished runs; bad study files fail before any run with file:line:col; every
# studies/*.yaml passes --dry-run under every preset; the real path (a study
# of studies/ on the KJV corpus) and the same study under mpirun.
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
