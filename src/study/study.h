/* Studies: a paper's ablation as one file (studies/NAME.yaml), run as many
 * ordinary training runs (arms x seeds), summarised over seeds with 95%
 * confidence intervals, and each of the paper's claims tested with a verdict.
 *
 * A study file is a YAML mapping (docs/studies.md has the reference):
 *   name, paper, summary       text
 *   arms:        [{name, recipe, set: [KEY=VALUE...], from: ARM, upcycle: bool,
 *                    merge: {groups, grouping, align, weights, mode,
 *                            calib_windows, seed}, evaluate_only: bool}]
 *                  from: the arm starts at step 0 from the final checkpoint
 *                  of an earlier arm's run with the same seed (cmoe train
 *                  --init); with upcycle: true that checkpoint is first
 *                  upcycled with this arm's recipe (train/upcycle.h); with
 *                  merge: its experts are first merged (train/merge.h, with
 *                  the source arm's recipe) and the arm's recipe gets
 *                  moe.merged=true; evaluate_only: true trains nothing, the
 *                  starting point is evaluated as it is (needs from)
 *   presets:     {smoke|small|full: {seeds, set: [...], arm_set: {ARM: [...]},
 *                  note}}  arm_set: overrides for one arm, after the arm's own
 *   evaluations: [{name, key, values: [...], split, arms: [...]}]
 *                  after training, the final model is evaluated once per
 *                  value with `--set KEY=VALUE` (e.g. router.k = 1, 2, 4, 8);
 *                  metric sources NAME=VALUE
 *   metrics:     [SOURCE.FIELD or SOURCE.FIELD[i]]  the figures tabulated
 *                  (SOURCE: test, valid, train, model = the run's last line
 *                  of that kind in metrics.jsonl; or an evaluation NAME=VALUE)
 *   curve:       {kind, field}   the learning curve plotted per arm
 *   sweeps:      [{evaluation, field}]   metric against value, per arm
 *   layers:      SOURCE.FIELD    an array metric plotted per layer
 *   claims:      [{id, claim, paper_figure, analysis, tests: [...]}]; a test is
 *                  {left: ARM:METRIC, less|greater: ARM:METRIC or a number,
 *                   margin: M}, or a claim has
 *                  monotone: {arm, metrics: [...], direction: decreasing|increasing}
 *
 * Owns: nothing; a study is a plain value (fixed arrays). */
#ifndef CMOE_STUDY_STUDY_H
#define CMOE_STUDY_STUDY_H

#include <stdbool.h>

#include "common/status.h"

struct merge_options;

enum {
    STUDY_NAME_CAP = 64,
    STUDY_TEXT_CAP = 1024,
    STUDY_SET_CAP = 160,
    STUDY_PATH_CAP = 2048,
    STUDY_MAX_ARMS = 12,
    STUDY_MAX_SETS = 24,
    STUDY_MAX_EVALS = 6,
    STUDY_MAX_VALUES = 12,
    STUDY_MAX_PRESETS = 4,
    STUDY_MAX_METRICS = 40,
    STUDY_MAX_CLAIMS = 12,
    STUDY_MAX_TESTS = 8,
    STUDY_MAX_SWEEPS = 4,
    STUDY_MAX_SEEDS = 16,
    /* preset + arm + the preset's arm_set, and moe.merged=true for a merge arm */
    STUDY_MAX_OVERRIDES = 3 * STUDY_MAX_SETS + 1,
};

typedef struct study_sets {
    char items[STUDY_MAX_SETS][STUDY_SET_CAP]; /* "section.key=value" */
    int count;
} study_sets;

/* An arm's merge: the options of cmoe merge (train/merge.h), the enums as
 * ints (merge_grouping, merge_weighting, merge_mode). */
typedef struct study_merge {
    int groups, calib_windows, seed;
    int grouping, weights, mode;
    bool align;
} study_merge;

typedef struct study_arm {
    char name[STUDY_NAME_CAP];
    char recipe[STUDY_PATH_CAP]; /* resolved against the study file's directory's parent */
    study_sets set;
    int from;     /* -1, or the (earlier) arm whose final checkpoint this one starts from */
    bool upcycle; /* with from: upcycle that checkpoint with this arm's recipe first */
    bool merge;   /* with from: merge that checkpoint's experts first (cmoe merge) */
    study_merge merge_settings; /* of the merge */
    bool evaluate_only;         /* with from: no training, the starting point is evaluated */
} study_arm;

typedef struct study_preset {
    char name[STUDY_NAME_CAP];
    int seeds; /* runs per arm: seeds 1..seeds (train.seed) */
    study_sets set;
    study_sets arm_sets;             /* overrides for one arm each (arm_set) */
    int arm_set_arm[STUDY_MAX_SETS]; /* the arm of arm_sets.items[i] */
    char note[STUDY_TEXT_CAP];
} study_preset;

typedef struct study_evaluation {
    char name[STUDY_NAME_CAP];
    char key[STUDY_NAME_CAP]; /* a recipe key, "section.key" */
    char values[STUDY_MAX_VALUES][STUDY_NAME_CAP];
    int n_values;
    char split[8];             /* "test" (default), "valid" or "train" */
    bool arms[STUDY_MAX_ARMS]; /* which arms get it */
} study_evaluation;

/* A metric: "SOURCE.FIELD" or "SOURCE.FIELD[i]". */
typedef struct study_metric {
    char text[STUDY_NAME_CAP * 2];
    char source[STUDY_NAME_CAP * 2]; /* "test", ..., or "EVAL=VALUE" */
    char field[STUDY_NAME_CAP];
    int index; /* -1: a scalar field */
} study_metric;

typedef enum study_direction { STUDY_LESS = 0, STUDY_GREATER } study_direction;

/* left - right compared with the margin: LESS claims left < right + margin,
 * GREATER claims left > right - margin. right_arm < 0: right is the number
 * right_value. */
typedef struct study_test {
    int left_arm, left_metric;
    int right_arm, right_metric;
    double right_value;
    study_direction direction;
    double margin;
} study_test;

typedef struct study_claim {
    char id[STUDY_NAME_CAP];
    char text[STUDY_TEXT_CAP];         /* the claim in words */
    char paper_figure[STUDY_TEXT_CAP]; /* what the paper reports */
    char analysis[STUDY_TEXT_CAP * 2]; /* what was checked about our result ("": nothing yet) */
    study_test tests[STUDY_MAX_TESTS]; /* all must hold */
    int n_tests;
} study_claim;

typedef struct study_sweep {
    int evaluation;
    char field[STUDY_NAME_CAP];
} study_sweep;

typedef struct study {
    char path[STUDY_PATH_CAP]; /* the file it was read from */
    char name[STUDY_NAME_CAP];
    char paper[STUDY_TEXT_CAP];
    char summary[STUDY_TEXT_CAP * 2];
    study_arm arms[STUDY_MAX_ARMS];
    int n_arms;
    study_preset presets[STUDY_MAX_PRESETS];
    int n_presets;
    study_evaluation evaluations[STUDY_MAX_EVALS];
    int n_evaluations;
    study_metric metrics[STUDY_MAX_METRICS];
    int n_metrics;
    char curve_kind[STUDY_NAME_CAP], curve_field[STUDY_NAME_CAP]; /* "" : no curve plot */
    study_sweep sweeps[STUDY_MAX_SWEEPS];
    int n_sweeps;
    int layers_metric; /* -1: no per-layer plot */
    study_claim claims[STUDY_MAX_CLAIMS];
    int n_claims;
} study;

/* Reads and checks a study file. Errors (CM_ERR_IO, CM_ERR_FORMAT,
 * CM_ERR_INVALID) start with "path:line:col: ": an unknown key, a missing
 * required key, zero seeds, an arm, metric or evaluation a claim names that
 * the file does not declare, a recipe that does not load with the arm's and
 * every preset's overrides. */
cm_status study_load(const char *path, study *out);

/* A whole string that is a finite number (an evaluation value, a margin). */
bool study_parse_number(const char *text, double *value);

/* The overrides of arm `arm` under preset `preset`, in order: the preset's
 * set, the arm's set, the preset's arm_set for this arm, and moe.merged=true
 * for an arm that merges (its model has the group tables). Fills sets[0..n)
 * (at most STUDY_MAX_OVERRIDES pointers into *s) and returns n. */
int study_arm_overrides(const study *s, int arm, int preset, const char **sets);

/* The merge_options of arm `arm`'s merge (quiet: the study prints its own lines). */
void study_merge_options(const study *s, int arm, struct merge_options *out);

int study_find_arm(const study *s, const char *name);        /* -1: none */
int study_find_preset(const study *s, const char *name);     /* -1: none */
int study_find_metric(const study *s, const char *text);     /* -1: none */
int study_find_evaluation(const study *s, const char *name); /* -1: none */

#endif
