/* Dynamic top-p routing ("Harder Tasks Need More Experts", METHODS.md 3.1-3.2).
 *
 * Per token: p = softmax(logits); experts sorted by p descending (ties: lower
 * index first); keep experts while the cumulative mass is <= top_p, plus the
 * first one that exceeds it, i.e. the smallest prefix whose mass exceeds
 * top_p (at least 1 expert, at most E). Gates are the raw probabilities, not
 * renormalised.
 *
 * Losses: aux_loss_coef * E sum_i f_i P_i with P_i the mean probability and
 * f_i = (assignments to i) / (all assignments), both counted before any
 * capacity dropping (as top-k counts them). METHODS.md leaves
 * open whether f is normalised by the assignments or by T; normalising by the
 * assignments keeps sum_i f_i = 1, so uniform routing costs exactly the
 * coefficient whatever the mean k (as with top-k's k T), and the loss does not
 * reward a router for activating fewer experts (that is the entropy loss's
 * job). Plus entropy_coef * mean_t H(p_t), the "dynamic" loss that sharpens
 * p so fewer experts pass the threshold. */
#include <string.h>

#include "routers/router_internal.h"

cm_status router_top_p_validate(const router_config *config) {
    if (!(config->top_p > 0.0f && config->top_p <= 1.0f))
        return CM_ERR(CM_ERR_INVALID, "router.top_p = %g must be in (0, 1]", (double)config->top_p);
    return CM_OK;
}

cm_status router_top_p_route(ag_ctx *ctx, const router *r, ag_tensor *x, const router_call *call,
                             router_output *out) {
    const router_config *config = &r->config;
    int experts = config->num_experts;
    double threshold = config->top_p;
    ag_tensor *logits = router_logits(ctx, r, x, call); /* [T,E] */
    ag_tensor *probs = ag_softmax(ctx, logits);         /* [T,E] */
    if (!probs) return ag_ctx_status(ctx);
    int tokens = (int)ag_rows(probs);

    /* At most E candidates per token; the arrays are sized for that. */
    int64_t capacity = (int64_t)tokens * experts;
    int32_t *token = ag_alloc_ints(ctx, capacity, "router_top_p");
    int32_t *expert = ag_alloc_ints(ctx, capacity, "router_top_p");
    int32_t *flat = ag_alloc_ints(ctx, capacity, "router_top_p");
    float *priority = ag_alloc_floats(ctx, capacity, "router_top_p");
    int32_t *order = ag_alloc_ints(ctx, experts, "router_top_p");
    int32_t *scratch = ag_alloc_ints(ctx, experts, "router_top_p");
    if (!token || !expert || !flat || !priority || !order || !scratch) return ag_ctx_status(ctx);

    int count = 0;
    for (int t = 0; t < tokens; t++) {
        const float *row = probs->data + (int64_t)t * experts;
        for (int e = 0; e < experts; e++) order[e] = e;
        router_sort_desc(order, experts, row, 1, scratch);
        int keep = 0;
        double mass = 0.0;
        while (keep < experts) {
            mass += row[order[keep++]];
            if (mass > threshold) break;
        }
        /* Candidates of a token in ascending expert order, as every method. */
        for (int i = 1; i < keep; i++) {
            int32_t e = order[i];
            int j = i;
            for (; j > 0 && order[j - 1] > e; j--) order[j] = order[j - 1];
            order[j] = e;
        }
        for (int i = 0; i < keep; i++) {
            token[count] = t;
            expert[count] = order[i];
            flat[count] = t * experts + order[i];
            priority[count] = row[order[i]];
            count++;
        }
    }

    ag_tensor *gates = ag_gather_elements(ctx, probs, flat, count); /* [S] raw probabilities */
    if (!gates) return ag_ctx_status(ctx);
    /* No fixed k: the capacity scales the mean load, all candidate
     * assignments / E, as T k / E does for top-k. */
    router_candidates candidates = {.count = count,
                                    .token = token,
                                    .expert = expert,
                                    .priority = priority,
                                    .gates = gates,
                                    .capacity_load = (double)count};
    CM_TRY(router_finish(ctx, r, tokens, 0, &candidates, out));

    /* router_switch_loss normalises f by all the assignments, as documented
     * above, counted before any capacity dropping. */
    ag_tensor *balance = router_switch_loss(ctx, probs, out->stats.routed_per_expert, 0,
                                            config->aux_loss_coef, config->aux_loss_scope, call);
    float entropy_coef = (float)(config->entropy_coef * router_token_share(call, tokens));
    ag_tensor *dynamic =
        entropy_coef != 0.0f ? ag_scale(ctx, ag_entropy(ctx, probs), entropy_coef) : NULL;
    out->aux_loss = router_add_losses(ctx, balance, dynamic);
    out->stats.entropy = router_mean_entropy(probs);
    out->stats.k = 0; /* variable; the mean is slots / tokens */
    return ag_ctx_status(ctx);
}
