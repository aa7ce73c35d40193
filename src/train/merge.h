/* MC-SMoE's merge step (METHODS.md 10.2-10.8): a trained MoE language model
 * into one whose experts are merged into fewer groups per layer, with the
 * router left as it is.
 *
 *   calibrate  N random windows of data.seq_len bytes of the training split
 *              (text_dataset_batch keyed by the merge seed, step 0), the
 *              model in evaluation mode at router.k: per MoE layer the count
 *              of every selected expert (all k choices, before any capacity
 *              drop: T_cal k in all) and the Gram matrix of the router
 *              logits' columns (merge_plan.c);
 *   plan       frequencies f = count / sum; similarity (cos + 1) / 2 of the
 *              logit columns (eps 1e-7 on each norm); the global allocation
 *              of group counts (10.4); per layer the G most-used experts are
 *              dominant and every other expert joins the dominant one it is
 *              most similar to (10.5, the global version). grouping random:
 *              the same counts, dominants and memberships drawn at random;
 *   align      (align on) in every merged layer, experts 1..N-1 permuted to
 *              expert 0 by weight matching (10.6; merge_experts.c);
 *   merge      each group's weights (w1, b1, w2, b2, and w3, b3 with swiglu)
 *              = sum f_e W_e / (sum f_e + 1e-7) (10.7; weights uniform: the
 *              plain mean); mode prune: the dominant expert's weights; a
 *              group of one is left as it is;
 *   write      the group's lowest-index expert holds the result, the other
 *              members' slots a copy of it (unused: the model sends them no
 *              token); blocks.L.moe.group_of maps every expert to the lowest
 *              index of its group (layers/moe.h) and the recipe gets
 *              moe.merged: true. An ordinary checkpoint at step 0 with fresh
 *              optimizer state, /merged_from naming the source and the
 *              settings.
 * Shapes: N experts, H hidden units per expert, D = d_model; tensors in the
 * global layout w1 [N,H,D], b1 [N,H], w2 [N,D,H], b2 [N,D].
 * Owns: nothing beyond a call, but a merge_result's arrays (merge_result_free). */
#ifndef CMOE_TRAIN_MERGE_H
#define CMOE_TRAIN_MERGE_H

#include <stdbool.h>
#include <stdint.h>

#include "common/rng.h"
#include "common/status.h"
#include "layers/transformer.h"

struct cm_recipe;

typedef enum merge_grouping {
    MERGE_GROUPING_MSMOE = 0, /* dominant experts by frequency, the others by similarity */
    MERGE_GROUPING_RANDOM,    /* the same group counts, random dominants and members */
    MERGE_GROUPING_COUNT
} merge_grouping;

typedef enum merge_weighting {
    MERGE_WEIGHTS_FREQUENCY = 0, /* sum f_e W_e / (sum f_e + 1e-7) */
    MERGE_WEIGHTS_UNIFORM,       /* the plain mean of the group */
    MERGE_WEIGHTS_COUNT
} merge_weighting;

typedef enum merge_mode {
    MERGE_MODE_MERGE = 0, /* average each group */
    MERGE_MODE_PRUNE,     /* keep each group's dominant expert */
    MERGE_MODE_COUNT
} merge_mode;

/* The spellings of --grouping, --weights, --mode, in enum order. */
extern const char *const merge_grouping_names[MERGE_GROUPING_COUNT + 1];
extern const char *const merge_weighting_names[MERGE_WEIGHTS_COUNT + 1];
extern const char *const merge_mode_names[MERGE_MODE_COUNT + 1];

typedef struct merge_options {
    int groups;        /* G_avg, in [1, N] */
    int calib_windows; /* calibration windows (the release: 256) */
    uint64_t seed;     /* the windows and random groups */
    merge_grouping grouping;
    bool align;
    merge_weighting weights;
    merge_mode mode;
    /* Which blocks to merge: merge_layer[block] for every MoE block; false
     * everywhere (the zero struct): every MoE layer. */
    bool merge_layer[LM_MAX_LAYERS];
    bool quiet; /* no progress line */
} merge_options;

/* ---- the plan (merge_plan.c): pure functions ----------------------------------------- */

/* freq[e] = counts[e] / sum (0 everywhere when nothing was counted). */
void merge_frequencies(const int64_t *counts, int n, double *freq);

/* gram [n,n] += logits^T logits for logits [tokens,n] (double sums). */
void merge_gram_add(double *gram, const float *logits, int64_t tokens, int n);

/* similarity [n,n] = (cos + 1) / 2 of the logit columns from their Gram
 * matrix: cos = g_ij / (max(|i|, 1e-7) max(|j|, 1e-7)), clamped to [-1, 1];
 * the diagonal is 1. */
void merge_similarity(const double *gram, int n, double *similarity);

/* The global allocation (METHODS.md 10.4): groups[l] for each of `layers`
 * layers of n experts, freq [layers,n], merged[l] whether layer l is merged.
 * Unmerged layers keep n. G_avg = n keeps every layer whole (the release's
 * G_tot - 1 would merge the least-used expert of the model; METHODS 10.12
 * asks for no merging). CM_ERR_INVALID when g_avg is not in [1, n] or the
 * threshold is 1.0 (too few experts to merge anything). */
cm_status merge_allocate(const double *freq, const bool *merged, int layers, int n, int g_avg,
                         int *groups);

/* One layer's groups (METHODS.md 10.5, the global version): experts sorted
 * by frequency (descending, ties to the lower index); the first `groups` are
 * dominant; each other expert, in that order, joins the dominant one of
 * highest similarity (ties to the more used). dominant[e] = the dominant
 * expert of e's group; group_of[e] = the lowest index in e's group. */
cm_status merge_group_msmoe(const double *freq, const double *similarity, int n, int groups,
                            int32_t *dominant, int32_t *group_of);

/* The same counts at random: `groups` dominants drawn without replacement,
 * every other expert joins one drawn uniformly (key's draws). */
cm_status merge_group_random(cm_rng_key key, int n, int groups, int32_t *dominant,
                             int32_t *group_of);

/* ---- the experts (merge_experts.c) ------------------------------------------------------ */

/* One layer's experts in the global layout; w3 and b3 NULL without swiglu. */
typedef struct merge_experts {
    int n, hidden, d_model; /* N, H, D */
    float *w1, *b1, *w2, *b2, *w3, *b3;
} merge_experts;

/* Permutes expert e's hidden units: unit u takes the old unit perm[u]
 * (rows of w1, w3; entries of b1, b3; columns of w2). The function of the
 * expert is unchanged. */
cm_status merge_permute_units(const merge_experts *x, int expert, const int32_t *perm);

/* Weight matching (METHODS.md 10.6): perm [H] maximising
 * sum_a <w1_r[a], w1_t[perm a]> + <w2_r[:,a], w2_t[:,perm a]> (+ w3 rows):
 * merge_permute_units(x, target, perm) then aligns target to reference. */
cm_status merge_match_units(const merge_experts *x, int reference, int target, int32_t *perm);

/* Aligns experts 1..N-1 to expert 0. */
cm_status merge_align_layer(const merge_experts *x);

/* Writes each group's result (mode/weights, see above) into every member's
 * slot; groups of one are left as they are. freq [N]. */
cm_status merge_layer_weights(const merge_experts *x, const int32_t *group_of,
                              const int32_t *dominant, const double *freq, merge_mode mode,
                              merge_weighting weights);

/* ---- the checkpoint (merge.c) ----------------------------------------------------------- */

/* What a merge did, per MoE layer (arrays [layers * experts]). */
typedef struct merge_result {
    int layers, experts, k;
    int64_t tokens; /* calibration tokens */
    int block[LM_MAX_LAYERS];
    bool merged[LM_MAX_LAYERS];
    int groups[LM_MAX_LAYERS];
    int64_t *counts;
    double *freq;
    int32_t *dominant, *group_of;
} merge_result;

void merge_result_free(merge_result *result);

/* Whether merge_checkpoint can merge a checkpoint of `recipe`'s model (a
 * transformer_lm MoE, not already merged) with `options` (groups in [1, N],
 * calibration windows >= 1, MoE blocks in merge_layer); `source` names the
 * checkpoint in the message. The study runner checks a study's merges with
 * it before any run. */
cm_status merge_check(const struct cm_recipe *recipe, const merge_options *options,
                      const char *source);

/* The whole merge: reads `source` (a transformer_lm MoE checkpoint, not
 * already merged) into the model of `recipe`, calibrates, plans, aligns,
 * merges and writes `out_path` atomically; *result (may be NULL) gets the
 * plan. One process. */
cm_status merge_checkpoint(const char *source, const struct cm_recipe *recipe,
                           const merge_options *options, const char *out_path,
                           merge_result *result);

#endif
