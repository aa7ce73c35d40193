/* Shared by the router implementations; not part of the public API.
 *
 * Every method follows the same pipeline:
 *   1. scores: router logits [T,E] and probabilities on the tape
 *      (router_logits; THOR has none);
 *   2. selection: candidate slots (token, expert) in plain arrays, sorted by
 *      token, with a gate tensor over the candidates (on the tape) and a
 *      priority per candidate for the capacity policy;
 *   3. router_finish: capacity dropping (if configured), the CSR output, the
 *      kept gates (gathered from the candidates' gates), statistics;
 *   4. auxiliary losses (router_switch_loss, router_z_loss, entropy), weighted
 *      by their coefficients and summed into out->aux_loss. */
#ifndef CMOE_ROUTERS_ROUTER_INTERNAL_H
#define CMOE_ROUTERS_ROUTER_INTERNAL_H

#include "routers/router.h"

/* Candidate slots, token-major (token ascending). */
typedef struct router_candidates {
    int count;
    int32_t *token;   /* [count] */
    int32_t *expert;  /* [count] */
    float *priority;  /* [count]: kept first under ROUTER_DROP_PROBABILITY (e.g. the probability) */
    ag_tensor *gates; /* [count] on the tape; NULL = every gate is 1 (no gradient) */
    /* The mean expert load the capacity limit scales: capacity =
     * ceil(load / E * capacity_factor). k T for token choice with k experts
     * per token; the candidate count for a variable k (top-p); 0: no limit
     * (expert choice, whose capacity factor sets the tokens per expert). */
    double capacity_load;
} router_candidates;

/* logits [T,E] = x W^T (+ b), plus in training the configured noise
 * (config.noise: noise_std N(0,1), or N(0,1) softplus(x W_noise^T)), the
 * draws keyed by seed, step, layer and the global token index. */
ag_tensor *router_logits(ag_ctx *ctx, const router *r, ag_tensor *x, const router_call *call);

/* Applies the capacity limit (config.capacity_factor > 0 and
 * candidates->capacity_load > 0) and fills out's CSR arrays, gates and
 * statistics (not entropy; stats.k = k). */
cm_status router_finish(ag_ctx *ctx, const router *r, int n_tokens, int k,
                        const router_candidates *candidates, router_output *out);

/* Switch/GShard load balancing: coef * E * sum_i f_i P_i over the tokens
 * of `scope`, from `counts` = the router's choices per expert on this
 * call's tokens BEFORE any capacity dropping (stats.routed_per_expert, as
 * Switch, GShard and Megatron count them). f has no gradient; P_i = mean of
 * probs[:, i] over the scope's tokens.
 *   ROUTER_AUX_GLOBAL: f_i = (counts summed over call->group) / (k T_global),
 *     P over the global batch; this rank returns its tokens' share of the
 *     sum, so the ranks' losses add up to one process's.
 *   ROUTER_AUX_LOCAL: f_i = counts_i / (k T_local), P over this call's
 *     tokens; returns that loss times T_local / T_global, so the ranks'
 *     losses add up to the token-weighted mean of their local losses.
 * k = 0 (top-p's variable k): f is divided by all the scope's assignments
 * instead of k T. Returns [1], or NULL when coef == 0 or nothing was
 * assigned (an MPI failure sets ctx). */
ag_tensor *router_switch_loss(ag_ctx *ctx, ag_tensor *probs, const int32_t *counts, int k,
                              float coef, router_aux_scope scope, const router_call *call);
/* ST-MoE z-loss: coef * mean over the global tokens of logsumexp(logits)^2
 * (this rank's share); NULL when coef == 0. */
ag_tensor *router_z_loss(ag_ctx *ctx, ag_tensor *logits, float coef, const router_call *call);
/* This call's tokens over the global batch's (1 for a single process). */
double router_token_share(const router_call *call, int tokens);
/* Mean entropy of the rows of probs [T,E] in nats (for statistics only). */
double router_mean_entropy(const ag_tensor *probs);
/* Sum of the non-NULL losses (NULL if all are NULL). */
ag_tensor *router_add_losses(ag_ctx *ctx, ag_tensor *a, ag_tensor *b);

/* Helpers shared by the methods (router_common.c). */

/* Stable sort of index[0..n) by score[index[i] * stride], descending: equal
 * scores keep their input order, so when `index` starts ascending a tie goes
 * to the lower token or expert index. scratch: n ints. */
void router_sort_desc(int32_t *index, int n, const float *score, int64_t stride, int32_t *scratch);
/* ceil(value) for a count such as T k / E * capacity_factor, where the factor
 * went through float (1.1f is 1.10000002): an excess of less than 1e-6
 * relative over an integer is rounding, not a reason to add one slot. */
int router_ceil_count(double value);

/* Token-choice top-k (topk.c), shared by the learned top-k router,
 * SMoE-Dropout, null experts and bias balancing: k = router_effective_k
 * among the router's E logits and, with null_logits [T,m], m null experts
 * (columns E..E+m of the scores; a chosen null is no slot), gates by
 * `gating` over the chosen true experts (softmax_topk: their probabilities
 * over all E + m; topk_softmax: a softmax over their logits, i.e. those
 * probabilities renormalised to sum to 1), Switch loss with aux_coef (null
 * experts' counts replaced by their mean, METHODS.md 6.1) and z-loss with
 * z_coef (0: none) over all E + m logits. selection_bias [E] (NULL: none) is
 * added to the probabilities for the choice alone (METHODS.md 12.2): ties
 * of the biased scores go to the larger logit, then the lower index, so an
 * all-zero bias chooses exactly as no bias; the Switch loss then counts the
 * unbiased choice. */
typedef struct router_topk_args {
    router_gating gating;
    float aux_coef, z_coef;
    ag_tensor *null_logits;      /* [T,m] or NULL */
    const float *selection_bias; /* [E] or NULL */
} router_topk_args;
cm_status router_topk_select(ag_ctx *ctx, const router *r, ag_tensor *x, const router_call *call,
                             const router_topk_args *args, router_output *out);

/* router_switch_loss with counts over probs' C columns of which columns
 * [pooled_from, C) (null experts) are replaced by their mean after the
 * scope's sum: f and P cover all C, the loss is coef C sum_i f_i P_i. */
ag_tensor *router_switch_loss_pooled(ag_ctx *ctx, ag_tensor *probs, const int32_t *counts, int k,
                                     float coef, router_aux_scope scope, const router_call *call,
                                     int pooled_from);

/* The methods, one file each; registry.c gives each its row. */
cm_status router_topk_route(ag_ctx *ctx, const router *r, ag_tensor *x, const router_call *call,
                            router_output *out);
cm_status router_smoe_dropout_validate(const router_config *config);
cm_status router_smoe_dropout_route(ag_ctx *ctx, const router *r, ag_tensor *x,
                                    const router_call *call, router_output *out);
cm_status router_thor_route(ag_ctx *ctx, const router *r, ag_tensor *x, const router_call *call,
                            router_output *out);
cm_status router_top_p_validate(const router_config *config);
cm_status router_top_p_route(ag_ctx *ctx, const router *r, ag_tensor *x, const router_call *call,
                             router_output *out);
cm_status router_expert_choice_validate(const router_config *config);
cm_status router_expert_choice_route(ag_ctx *ctx, const router *r, ag_tensor *x,
                                     const router_call *call, router_output *out);
cm_status router_null_experts_validate(const router_config *config);
cm_status router_null_experts_declare(router *r, int d_model, ag_params *params,
                                      const char *prefix);
cm_status router_null_experts_route(ag_ctx *ctx, const router *r, ag_tensor *x,
                                    const router_call *call, router_output *out);
cm_status router_bias_balance_validate(const router_config *config);
cm_status router_bias_balance_declare(router *r, int d_model, ag_params *params,
                                      const char *prefix);
void router_bias_balance_update(const router *r, const int64_t *load);
cm_status router_rmoe_validate(const router_config *config);
cm_status router_rmoe_declare(router *r, int d_model, ag_params *params, const char *prefix);
cm_status router_rmoe_route(ag_ctx *ctx, const router *r, ag_tensor *x, const router_call *call,
                            router_output *out);
cm_status router_bias_balance_route(ag_ctx *ctx, const router *r, ag_tensor *x,
                                    const router_call *call, router_output *out);

#endif
