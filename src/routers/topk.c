/* Token-choice top-k routing: the learned router (softmax-then-topK or
 * topK-then-softmax, optional noise, Switch and z-losses; METHODS.md
 * 0.1-0.3). The selection, router_topk_select, also serves SMoE-Dropout
 * (smoe_dropout.c). */
#include <stdbool.h>
#include <string.h>

#include "common/check.h"
#include "routers/router_internal.h"

/* The k largest entries of row[0..E) into chosen[0..k), in ascending expert
 * order. A later entry displaces an earlier one only when strictly larger,
 * so ties go to the lower expert index. Selecting on logits is selecting on
 * probabilities (softmax is monotone). */
static void select_topk(const float *row, int experts, int k, int32_t *chosen) {
    int n = 0; /* chosen[0..n) sorted by value descending */
    for (int e = 0; e < experts; e++) {
        float value = row[e];
        if (n == k && !(value > row[chosen[k - 1]])) continue;
        int pos = n < k ? n++ : k - 1; /* when full, the last entry is evicted */
        while (pos > 0 && value > row[chosen[pos - 1]]) {
            chosen[pos] = chosen[pos - 1];
            pos--;
        }
        chosen[pos] = e;
    }
    for (int i = 1; i < k; i++) { /* k is small: insertion sort by expert index */
        int32_t e = chosen[i];
        int j = i;
        for (; j > 0 && chosen[j - 1] > e; j--) chosen[j] = chosen[j - 1];
        chosen[j] = e;
    }
}

cm_status router_topk_select(ag_ctx *ctx, const router *r, ag_tensor *x, const router_call *call,
                             router_gating gating, float aux_coef, float z_coef,
                             router_output *out) {
    const router_config *config = &r->config;
    int experts = config->num_experts, k = router_effective_k(r, call);
    CM_ASSERT(k >= 1 && k <= experts, "router_topk_select: k = %d with %d experts", k, experts);

    ag_tensor *logits = router_logits(ctx, r, x, call); /* [T,E] */
    if (!logits) return ag_ctx_status(ctx);
    int tokens = (int)ag_rows(logits);

    /* The full softmax feeds the statistics; it goes on the tape only when a
     * gradient flows through it (softmax-then-topK gates, Switch loss). */
    bool probs_on_tape = gating == ROUTER_SOFTMAX_THEN_TOPK || aux_coef != 0.0f;
    bool grad_was_enabled = ag_set_grad_enabled(ctx, ctx->grad_enabled && probs_on_tape);
    ag_tensor *probs = ag_softmax(ctx, logits); /* [T,E] */
    ag_set_grad_enabled(ctx, grad_was_enabled);

    int count = tokens * k;
    int32_t *token = ag_alloc_ints(ctx, count, "router_topk");
    int32_t *expert = ag_alloc_ints(ctx, count, "router_topk");
    int32_t *flat = ag_alloc_ints(ctx, count, "router_topk");          /* t E + e into [T,E] */
    int32_t *segments = ag_alloc_ints(ctx, tokens + 1, "router_topk"); /* token t: [t k, t k + k) */
    float *priority = ag_alloc_floats(ctx, count, "router_topk");
    if (!probs || !token || !expert || !flat || !segments || !priority) return ag_ctx_status(ctx);
    for (int t = 0; t < tokens; t++) {
        int32_t *chosen = expert + (int64_t)t * k;
        select_topk(logits->data + (int64_t)t * experts, experts, k, chosen);
        for (int j = 0; j < k; j++) {
            token[t * k + j] = t;
            flat[t * k + j] = t * experts + chosen[j];
        }
        segments[t] = t * k;
    }
    segments[tokens] = count;

    ag_tensor *gates; /* [T k] */
    if (gating == ROUTER_SOFTMAX_THEN_TOPK)
        gates = ag_gather_elements(ctx, probs, flat, count);
    else
        gates =
            ag_segment_softmax(ctx, ag_gather_elements(ctx, logits, flat, count), segments, tokens);
    if (!gates) return ag_ctx_status(ctx);
    /* An over-full expert keeps its highest gates (Megatron's "probs" policy). */
    memcpy(priority, gates->data, (size_t)count * sizeof *priority);

    router_candidates candidates = {.count = count,
                                    .token = token,
                                    .expert = expert,
                                    .priority = priority,
                                    .gates = gates,
                                    .capacity_load = (double)k * tokens};
    CM_TRY(router_finish(ctx, r, tokens, k, &candidates, out));
    /* f counts the router's choices before dropping (Switch, GShard,
     * Megatron): counting after would hide exactly the overload that drops. */
    ag_tensor *aux = router_switch_loss(ctx, probs, out->stats.routed_per_expert, k, aux_coef,
                                        config->aux_loss_scope, call);
    out->aux_loss = router_add_losses(ctx, aux, router_z_loss(ctx, logits, z_coef, call));
    out->stats.entropy = router_mean_entropy(probs);
    out->stats.k = k;
    return ag_ctx_status(ctx);
}

cm_status router_topk_route(ag_ctx *ctx, const router *r, ag_tensor *x, const router_call *call,
                            router_output *out) {
    const router_config *config = &r->config;
    return router_topk_select(ctx, r, x, call, config->gating, config->aux_loss_coef,
                              config->z_loss_coef, out);
}
