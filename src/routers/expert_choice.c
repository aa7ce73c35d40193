/* Expert-choice routing (Zhou et al. 2022; METHODS.md 0.5): p = softmax over
 * the experts per token, then each expert takes the c tokens with the highest
 * p[:, e] (ties: lower token index), c = ceil(T capacity_factor / E) capped
 * at T, with T this call's tokens (a rank's share under data parallelism:
 * each rank chooses among its own tokens). A token may get 0 experts or
 * several; the gates are the chosen probabilities. Balanced by
 * construction: no auxiliary loss, nothing dropped.
 * Not causal: an expert's choice depends on every token of the batch. */
#include <string.h>

#include "routers/router_internal.h"

cm_status router_expert_choice_validate(const router_config *config) {
    if (!(config->capacity_factor > 0.0f))
        return CM_ERR(CM_ERR_INVALID, "expert choice needs router.capacity_factor > 0");
    return CM_OK;
}

cm_status router_expert_choice_route(ag_ctx *ctx, const router *r, ag_tensor *x,
                                     const router_call *call, router_output *out) {
    const router_config *config = &r->config;
    int experts = config->num_experts;
    ag_tensor *logits = router_logits(ctx, r, x, call); /* [T,E] */
    ag_tensor *probs = ag_softmax(ctx, logits);         /* [T,E] */
    if (!probs) return ag_ctx_status(ctx);
    int tokens = (int)ag_rows(probs);
    int per_expert = router_ceil_count((double)tokens * config->capacity_factor / experts);
    if (per_expert > tokens) per_expert = tokens;

    int64_t pairs = (int64_t)tokens * experts;
    unsigned char *chosen = ag_alloc(ctx, (size_t)(pairs ? pairs : 1), "router_expert_choice");
    int32_t *order = ag_alloc_ints(ctx, tokens ? tokens : 1, "router_expert_choice");
    int32_t *scratch = ag_alloc_ints(ctx, tokens ? tokens : 1, "router_expert_choice");
    int64_t count = (int64_t)per_expert * experts;
    int32_t *token = ag_alloc_ints(ctx, count ? count : 1, "router_expert_choice");
    int32_t *expert = ag_alloc_ints(ctx, count ? count : 1, "router_expert_choice");
    int32_t *flat = ag_alloc_ints(ctx, count ? count : 1, "router_expert_choice");
    float *priority = ag_alloc_floats(ctx, count ? count : 1, "router_expert_choice");
    if (!chosen || !order || !scratch || !token || !expert || !flat || !priority)
        return ag_ctx_status(ctx);
    memset(chosen, 0, (size_t)pairs);

    /* Column e of probs, read with stride E; the stable sort keeps the lower
     * token first among equal probabilities. */
    for (int e = 0; e < experts; e++) {
        for (int t = 0; t < tokens; t++) order[t] = t;
        router_sort_desc(order, tokens, probs->data + e, experts, scratch);
        for (int i = 0; i < per_expert; i++) chosen[(int64_t)order[i] * experts + e] = 1;
    }
    /* Token-major CSR: pairs sorted by token, then expert. */
    int s = 0;
    for (int t = 0; t < tokens; t++)
        for (int e = 0; e < experts; e++) {
            int64_t pair = (int64_t)t * experts + e;
            if (!chosen[pair]) continue;
            token[s] = t;
            expert[s] = e;
            flat[s] = (int32_t)pair;
            priority[s] = probs->data[pair];
            s++;
        }

    ag_tensor *gates = ag_gather_elements(ctx, probs, flat, s);
    if (!gates) return ag_ctx_status(ctx);
    /* No capacity_load: c is the capacity, nothing is dropped. */
    router_candidates candidates = {
        .count = s, .token = token, .expert = expert, .priority = priority, .gates = gates};
    CM_TRY(router_finish(ctx, r, tokens, 0, &candidates, out));
    out->aux_loss = NULL;
    out->stats.entropy = router_mean_entropy(probs);
    out->stats.k = 0;
    return ag_ctx_status(ctx);
}
