/* The MoE layer's side of dynamic shadowing (parallel/shadow.h): which
 * positions of the dispatch order are exchanged and which are computed here
 * with copies of their experts' weights. */
#include <string.h>

#include "layers/moe_internal.h"
#include "parallel/comm.h"

/* The cost model's view of one layer: sizes per row and per expert. */
static shadow_problem layer_problem(const moe_layer *moe, int ranks) {
    const moe_config *c = &moe->config;
    const int matrices = c->activation == AG_ACT_SWIGLU ? 3 : 2;
    return shadow_problem_for(
        ranks, c->router.num_experts, c->d_model, c->hidden, matrices, c->shadow,
        c->shadow_float_cost > 0 ? c->shadow_float_cost : SHADOW_FLOPS_PER_FLOAT);
}

/* Splits the dispatch order: exchanged positions keep their order (their
 * experts' blocks stay contiguous per owner), shadowed ones follow theirs. */
static cm_status split_positions(ag_ctx *ctx, const int32_t *expert_offsets,
                                 const int32_t *sorted_token, int S, int E, const uint8_t *shadowed,
                                 moe_shadow_plan *plan) {
    int32_t *exchange_offsets = ag_alloc_ints(ctx, E + 1, "moe shadow");
    int32_t *shadow_offsets = ag_alloc_ints(ctx, plan->set.count + 1, "moe shadow");
    int32_t *exchange_token = ag_alloc_ints(ctx, S > 0 ? S : 1, "moe shadow");
    int32_t *shadow_token = ag_alloc_ints(ctx, S > 0 ? S : 1, "moe shadow");
    int32_t *merge = ag_alloc_ints(ctx, S > 0 ? S : 1, "moe shadow");
    if (!exchange_offsets || !shadow_offsets || !exchange_token || !shadow_token || !merge)
        return ag_ctx_status(ctx);
    int exchanged = 0;
    for (int e = 0; e < E; e++)
        if (!shadowed[e]) exchanged += expert_offsets[e + 1] - expert_offsets[e];
    int at_exchange = 0, at_shadow = 0, k = 0;
    exchange_offsets[0] = shadow_offsets[0] = 0;
    for (int e = 0; e < E; e++) {
        for (int i = expert_offsets[e]; i < expert_offsets[e + 1]; i++) {
            if (shadowed[e]) {
                merge[i] = exchanged + at_shadow;
                shadow_token[at_shadow++] = sorted_token[i];
            } else {
                merge[i] = at_exchange;
                exchange_token[at_exchange++] = sorted_token[i];
            }
        }
        exchange_offsets[e + 1] = at_exchange;
        if (shadowed[e]) shadow_offsets[++k] = at_shadow;
    }
    plan->exchange_offsets = exchange_offsets;
    plan->shadow_offsets = shadow_offsets;
    plan->exchange_token = exchange_token;
    plan->shadow_token = shadow_token;
    plan->merge = merge;
    plan->exchanged = at_exchange;
    plan->shadowed = at_shadow;
    return CM_OK;
}

/* The set of shadowed experts, ascending, and their counts zeroed in
 * all_counts [P][E] (the exchange then sends none of their rows). */
static cm_status make_set(ag_ctx *ctx, const moe_layer *moe, int ranks, const uint8_t *shadowed,
                          int count, int32_t *all_counts, shadow_set *set) {
    const int E = moe->config.router.num_experts;
    int32_t *experts = ag_alloc_ints(ctx, count > 0 ? count : 1, "moe shadow");
    if (!experts) return ag_ctx_status(ctx);
    for (int e = 0, k = 0; e < E; e++) {
        if (!shadowed[e]) continue;
        experts[k++] = e;
        for (int p = 0; p < ranks; p++) all_counts[(int64_t)p * E + e] = 0;
    }
    *set = (shadow_set){.count = count,
                        .experts = experts,
                        .per_rank = moe->local_experts,
                        .group = moe->config.ep_group,
                        .timing = moe->config.timing};
    return CM_OK;
}

cm_status moe_plan_shadow(ag_ctx *ctx, const moe_layer *moe, const int32_t *expert_offsets,
                          const int32_t *sorted_token, int S, moe_shadow_plan *plan) {
    const moe_config *c = &moe->config;
    const int ranks = c->ep_size > 1 ? c->ep_size : 1, E = c->router.num_experts;
    *plan = (moe_shadow_plan){
        .exchange_offsets = expert_offsets, .exchange_token = sorted_token, .exchanged = S};
    if (c->shadow == SHADOW_OFF || ranks == 1) return CM_OK;
    int32_t *mine = ag_alloc_ints(ctx, E, "moe shadow");
    int32_t *all_counts = ag_alloc_ints(ctx, (int64_t)ranks * E, "moe shadow");
    int64_t *rank_cost = ag_alloc(ctx, (size_t)ranks * sizeof(int64_t), "moe shadow");
    uint8_t *shadowed = ag_alloc(ctx, (size_t)E, "moe shadow");
    if (!mine || !all_counts || !rank_cost || !shadowed) return ag_ctx_status(ctx);
    for (int e = 0; e < E; e++) mine[e] = expert_offsets[e + 1] - expert_offsets[e];
    CM_TRY(shadow_gather_counts(c->ep_group, mine, all_counts, E, c->timing));
    plan->all_counts = all_counts;
    const shadow_problem problem = layer_problem(moe, ranks);
    const int count = shadow_decide(&problem, all_counts, rank_cost, shadowed);
    if (c->timing) c->timing->shadow_decisions++, c->timing->shadowed_experts += count;
    if (count == 0) return CM_OK;
    CM_TRY(make_set(ctx, moe, ranks, shadowed, count, all_counts, &plan->set));
    return split_positions(ctx, expert_offsets, sorted_token, S, E, shadowed, plan);
}

void moe_mark_shadowed(const moe_layer *moe, const moe_shadow_plan *plan) {
    for (int k = 0; k < plan->set.count; k++) {
        const int j = plan->set.experts[k] - moe->first_expert;
        if (j < 0 || j >= moe->local_experts) continue; /* another rank's */
        ag_param *params[] = {moe->w1, moe->b1, moe->w2, moe->b2, moe->w3, moe->b3};
        for (size_t i = 0; i < sizeof params / sizeof params[0]; i++)
            ag_param_mark_slice(params[i], j); /* NULL (no swiglu): nothing */
    }
}

void moe_shadow_weights(ag_ctx *ctx, const moe_layer *moe, const moe_shadow_plan *plan,
                        moe_expert_weights *weights) {
    ag_param *params[] = {moe->w1, moe->b1, moe->w2, moe->b2, moe->w3, moe->b3};
    ag_tensor **views[] = {&weights->w1, &weights->b1, &weights->w2,
                           &weights->b2, &weights->w3, &weights->b3};
    const int n = moe->w3 ? 6 : 4, count = plan->set.count;
    ag_tensor *tensors[6];
    for (int i = 0; i < n; i++) tensors[i] = ag_param_tensor(params[i]);
    *weights = (moe_expert_weights){0};
    ag_tensor *packed = ag_shadow_pack(ctx, tensors, n, &plan->set);
    int64_t offset = 0;
    for (int i = 0; i < n && packed; i++) {
        int shape[AG_MAX_DIMS] = {count};
        for (int d = 1; d < tensors[i]->ndim; d++) shape[d] = tensors[i]->shape[d];
        *views[i] = ag_shadow_view(ctx, packed, offset, tensors[i]->ndim, shape);
        offset += count * (tensors[i]->numel / tensors[i]->shape[0]);
    }
}

void moe_shadow_rows(const moe_shadow_plan *plan, uint64_t first_token, uint64_t *row_token,
                     int32_t *row_expert) {
    for (int k = 0; k < plan->set.count; k++)
        for (int r = plan->shadow_offsets[k]; r < plan->shadow_offsets[k + 1]; r++) {
            row_token[r] = first_token + (uint64_t)plan->shadow_token[r];
            row_expert[r] = plan->set.experts[k];
        }
}
