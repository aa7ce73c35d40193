/* Upcycling: a trained dense language model into a Mixture-of-Experts model
 * that computes (nearly) the same function at step 0 (METHODS.md 5, 11, 13).
 *
 * The MoE recipe says what to build (moe.num_experts N, moe.expert_hidden or
 * split_dense -> the expert width H, router.k, router.gating, moe.every), and
 * its `upcycle` section how:
 *   experts   G = dense d_ff / H shards of the dense MLP (fc1 rows, fc1 bias
 *             entries, fc2 columns), the list [shard 0 .. shard G-1] repeated
 *             R = N / G times: expert e is shard e mod G ("E{N}G{G}T{k}");
 *             fc2's bias is copied into every expert;
 *   router    upcycle.router: groups (METHODS 5.3: the fresh router's first
 *             R rows, each repeated G times, so the G shards of one copy get
 *             equal logits and top-k with k a multiple of G takes whole
 *             copies), fresh (the MoE recipe's own random init, untouched)
 *             or zero (every probability 1/N; METHODS 5.7's exact test);
 *   scaling   A = G (topk_softmax) or N G / k (softmax_topk) undoes the
 *             damping of the gates (METHODS 5.4). upcycle.scaling: balanced
 *             multiplies fc1 (weight and bias) and fc2's weight each by
 *             A^(1/p), p the activation's degree (2 for gelu/relu/silu, 3 for
 *             swiglu): He et al.'s rule, exact for a homogeneous activation
 *             (ReLU) and approximate for GELU; output multiplies fc2's weight
 *             alone by A, exact for any activation; none leaves the weights.
 *             With scaling, fc2's bias is divided by the gate sum of a
 *             uniform router (k / N for softmax_topk, 1 for topk_softmax), so
 *             the biases add up to the dense one too;
 *   drop      Drop-Upcycling (METHODS 11): in each expert, floor(r H) hidden
 *             units (upcycle.drop_ratio r) are drawn without replacement and
 *             their fc1 rows, fc1 bias entries and fc2 columns replaced by
 *             draws from N(mu, sigma^2), mu and sigma (n - 1) those of the
 *             entries replaced (per matrix: fc1 weight, fc1 bias, fc2
 *             weight). upcycle.drop_scope: expert (one set per expert, shared
 *             by its matrices: the paper), matrix (fc1 and fc2 each their own
 *             set, the fc1 bias fc1's: the released code) or layer (one set
 *             per layer, shared by all its experts). The released code's
 *             random permutation of the hidden units first is left out: it
 *             only relabels units (the set is uniform anyway), and without it
 *             r = 0 is plain upcycling bit for bit. Draws are keyed by
 *             train.seed, the layer, the expert and the matrix.
 * Everything else (embeddings, attention, layer norms, the MLPs of the
 * blocks that stay dense, the head) is copied bit for bit. The order is:
 * shard, drop, scale.
 *
 * The result is an ordinary MoE checkpoint at step 0 with zero optimizer
 * moments, in the global layout (every expert, [N, ...]), that `cmoe train
 * MOE.yaml --init OUT.h5` starts from; its /upcycled_from group records the
 * dense checkpoint's path, step, seed and recipe, and the plan
 * (docs/checkpoint.md).
 * Owns: nothing beyond a call. */
#ifndef CMOE_TRAIN_UPCYCLE_H
#define CMOE_TRAIN_UPCYCLE_H

#include <stdint.h>

#include "autograd/ops.h"
#include "autograd/params.h"
#include "common/status.h"

struct cm_recipe;

typedef enum upcycle_router {
    UPCYCLE_ROUTER_GROUPS = 0, /* virtual groups (METHODS 5.3) */
    UPCYCLE_ROUTER_FRESH,      /* the recipe's random init */
    UPCYCLE_ROUTER_ZERO,       /* all zero: uniform probabilities */
    UPCYCLE_ROUTER_COUNT
} upcycle_router;

typedef enum upcycle_scaling {
    UPCYCLE_SCALING_BALANCED = 0, /* fc1 and fc2 each by A^(1/p) (He et al.) */
    UPCYCLE_SCALING_OUTPUT,       /* fc2 by A: exact for any activation */
    UPCYCLE_SCALING_NONE,
    UPCYCLE_SCALING_COUNT
} upcycle_scaling;

typedef enum upcycle_drop_scope {
    UPCYCLE_DROP_EXPERT = 0, /* one index set per expert (the paper) */
    UPCYCLE_DROP_MATRIX,     /* one per matrix (the released code) */
    UPCYCLE_DROP_LAYER,      /* one per layer, shared by its experts */
    UPCYCLE_DROP_SCOPE_COUNT
} upcycle_drop_scope;

/* The spellings of upcycle.router, upcycle.scaling, upcycle.drop_scope. */
extern const char *const upcycle_router_names[UPCYCLE_ROUTER_COUNT + 1];
extern const char *const upcycle_scaling_names[UPCYCLE_SCALING_COUNT + 1];
extern const char *const upcycle_drop_scope_names[UPCYCLE_DROP_SCOPE_COUNT + 1];

/* What upcycle_plan_make derives from the two recipes. */
typedef struct upcycle_plan {
    int experts, granularity, copies, k; /* N, G, R = N / G, k */
    int dense_hidden, expert_hidden;     /* d_ff, H = d_ff / G */
    int degree;                          /* p: 2, or 3 for swiglu */
    double activation_scale;             /* A */
    float fc1_scale, fc2_scale;          /* fc1 weight and bias; fc2 weight */
    float fc2_bias_scale;                /* 1 / uniform gate sum, or 1 */
    int drop_units;                      /* floor(r H) per expert and matrix */
    char label[48];                      /* "E16G4T4" */
} upcycle_plan;

/* The degree of homogeneity upcycling assumes for an activation: 3 for
 * swiglu, 2 for the others. */
int upcycle_activation_degree(ag_activation activation);

/* Checks that `moe` can be upcycled from a checkpoint trained with `dense`
 * and fills *plan. CM_ERR_INVALID, naming the keys, when: either is not a
 * transformer_lm; dense has moe.enabled; moe has not; the model sizes
 * (vocab_size, n_layers, d_model, n_heads, d_ff, layernorm_eps) or
 * data.seq_len differ; moe.activation is not gelu (the dense MLP's);
 * router.type is not topk; the expert width does not divide d_ff;
 * num_experts is not a multiple of G; with upcycle.router groups or zero,
 * router.k is not a multiple of G. */
cm_status upcycle_plan_make(const struct cm_recipe *dense, const struct cm_recipe *moe,
                            upcycle_plan *plan);

/* Fills the finalized, single-process registry `moe` (the MoE recipe's
 * model, freshly initialised from its train.seed) from the dense model's
 * finalized registry as the plan and moe_recipe->upcycle say. The moments
 * are left as they are. */
cm_status upcycle_params(const ag_params *dense, ag_params *moe, const struct cm_recipe *moe_recipe,
                         const upcycle_plan *plan);

/* The whole conversion: reads the dense checkpoint and the recipe stored in
 * it, builds the MoE model of `moe_recipe`, upcycles and writes `out_path`
 * (atomically). *plan (may be NULL) gets the plan. */
cm_status upcycle_checkpoint(const char *dense_path, const struct cm_recipe *moe_recipe,
                             const char *out_path, upcycle_plan *plan);

#endif
