/* Merged experts: the group table of an MoE layer (layers/moe.h, METHODS.md
 * 10.8). */
#include <math.h>
#include <string.h>

#include "layers/moe.h"

cm_status moe_read_groups(const float *table, int experts, int32_t *group_of, bool *identity) {
    *identity = true;
    for (int e = 0; e < experts; e++) {
        const float value = table[e];
        if (!(value >= 0.0f && value < (float)experts) || value != floorf(value))
            return CM_ERR(CM_ERR_FORMAT, "entry %d is %g, not an expert index in [0, %d)", e,
                          (double)value, experts);
        group_of[e] = (int32_t)value;
    }
    for (int e = 0; e < experts; e++) {
        const int32_t group = group_of[e];
        if (group > e || group_of[group] != group)
            return CM_ERR(CM_ERR_FORMAT,
                          "entry %d is %d, which is not the lowest-index expert of a group (its "
                          "own entry is %d)",
                          e, group, group_of[group]);
        if (group != e) *identity = false;
    }
    return CM_OK;
}

/* The merged slots: token t's slots [offsets[t], offsets[t+1]) hold its
 * groups in the order of their first selection; target[s] is where the
 * router's slot s went. Returns the merged slot count. */
static int merge_slots(const router_output *routed, const int32_t *group_of, int32_t *offsets,
                       int32_t *expert, int32_t *target, int32_t *tokens_per_expert) {
    int count = 0;
    offsets[0] = 0;
    for (int t = 0; t < routed->n_tokens; t++) {
        const int first = count;
        for (int s = routed->offsets[t]; s < routed->offsets[t + 1]; s++) {
            const int32_t group = group_of[routed->expert[s]];
            int j = first;
            while (j < count && expert[j] != group) j++;
            if (j == count) {
                expert[count++] = group;
                tokens_per_expert[group]++;
            }
            target[s] = j;
        }
        offsets[t + 1] = count;
    }
    return count;
}

cm_status moe_apply_groups(ag_ctx *ctx, const moe_layer *moe, router_output *routed) {
    if (!moe->group_of || ag_failed(ctx)) return ag_ctx_status(ctx);
    const int E = moe->config.router.num_experts, T = routed->n_tokens, S = routed->n_slots;
    int32_t *group_of = ag_alloc_ints(ctx, E, "moe groups");
    if (!group_of) return ag_ctx_status(ctx);
    bool identity;
    cm_status status = moe_read_groups(moe->group_of->tensor.data, E, group_of, &identity);
    if (status != CM_OK) return cm_error_wrap(status, "the group table %s", moe->group_of->name);
    if (identity) return CM_OK;
    int32_t *offsets = ag_alloc_ints(ctx, (int64_t)T + 1, "moe groups");
    int32_t *expert = ag_alloc_ints(ctx, S > 0 ? S : 1, "moe groups");
    int32_t *target = ag_alloc_ints(ctx, S > 0 ? S : 1, "moe groups");
    int32_t *tokens_per_expert = ag_alloc_ints(ctx, E, "moe groups");
    if (!offsets || !expert || !target || !tokens_per_expert) return ag_ctx_status(ctx);
    memset(tokens_per_expert, 0, (size_t)E * sizeof *tokens_per_expert);
    const int merged = merge_slots(routed, group_of, offsets, expert, target, tokens_per_expert);
    if (merged < S) { /* gates of one token's same-group slots add up */
        ag_tensor *column = ag_reshape(ctx, routed->gates, 2, (int[]){S, 1});
        ag_tensor *summed = ag_scatter_add_rows(ctx, column, target, merged);
        routed->gates = ag_reshape(ctx, summed, 1, (int[]){merged});
        if (!routed->gates) return ag_ctx_status(ctx);
    }
    routed->n_slots = merged;
    routed->offsets = offsets;
    routed->expert = expert;
    routed->stats.slots = merged;
    routed->stats.tokens_per_expert = tokens_per_expert;
    return ag_ctx_status(ctx);
}
