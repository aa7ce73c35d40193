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

/* The same choice on biased scores: the k largest score[e] + bias[e],
 * ties going to the larger logit, then the lower index; chosen ascending.
 * With bias all zero this chooses exactly what select_topk on the logits
 * does, softmax being monotone (equal probabilities of unequal logits are
 * told apart by the logits). */
static bool beats(const float *score, const float *bias, const float *logit, int a, int b) {
    float biased_a = score[a] + bias[a], biased_b = score[b] + bias[b];
    return biased_a > biased_b || (biased_a == biased_b && logit[a] > logit[b]);
}

static void select_topk_biased(const float *score, const float *bias, const float *logit,
                               int experts, int k, int32_t *chosen) {
    int n = 0;
    for (int e = 0; e < experts; e++) {
        if (n == k && !beats(score, bias, logit, e, chosen[k - 1])) continue;
        int pos = n < k ? n++ : k - 1;
        while (pos > 0 && beats(score, bias, logit, e, chosen[pos - 1])) {
            chosen[pos] = chosen[pos - 1];
            pos--;
        }
        chosen[pos] = e;
    }
    for (int i = 1; i < k; i++) {
        int32_t e = chosen[i];
        int j = i;
        for (; j > 0 && chosen[j - 1] > e; j--) chosen[j] = chosen[j - 1];
        chosen[j] = e;
    }
}

/* The candidates of a call: at most k per token, the true experts among
 * each token's k chosen of `choices` (null experts, e >= experts, are
 * counted in null_counts[e - experts] instead). */
typedef struct topk_selection {
    int count;                      /* candidates kept */
    int32_t *token, *expert, *flat; /* [T k]; flat = t choices + e into [T,choices] */
    int32_t *segments;              /* [T+1]: token t's candidates */
    int32_t *chosen;                /* [k] scratch */
    int32_t *counts;                /* [choices]: choices per column, nulls included */
    float *priority;                /* [T k] */
} topk_selection;

static cm_status select_all(ag_ctx *ctx, const router *r, ag_tensor *logits, ag_tensor *probs,
                            int k, const float *bias, topk_selection *sel) {
    const int tokens = (int)ag_rows(logits), choices = ag_last_dim(logits);
    const int experts = r->config.num_experts, count = tokens * k;
    sel->token = ag_alloc_ints(ctx, count, "router_topk");
    sel->expert = ag_alloc_ints(ctx, count, "router_topk");
    sel->flat = ag_alloc_ints(ctx, count, "router_topk");
    sel->segments = ag_alloc_ints(ctx, tokens + 1, "router_topk");
    sel->chosen = ag_alloc_ints(ctx, k, "router_topk");
    sel->counts = ag_alloc_ints(ctx, choices, "router_topk");
    sel->priority = ag_alloc_floats(ctx, count, "router_topk");
    if (!probs || !sel->token || !sel->expert || !sel->flat || !sel->segments || !sel->chosen ||
        !sel->counts || !sel->priority)
        return ag_ctx_status(ctx);
    memset(sel->counts, 0, (size_t)choices * sizeof(int32_t));
    int n = 0;
    for (int t = 0; t < tokens; t++) {
        const float *row = logits->data + (int64_t)t * choices;
        sel->segments[t] = n;
        if (bias)
            select_topk_biased(probs->data + (int64_t)t * choices, bias, row, choices, k,
                               sel->chosen);
        else
            select_topk(row, choices, k, sel->chosen);
        for (int j = 0; j < k; j++) {
            const int e = sel->chosen[j];
            sel->counts[e]++;
            if (e >= experts) continue; /* a null expert: no slot */
            sel->token[n] = t;
            sel->expert[n] = e;
            sel->flat[n++] = t * choices + e;
        }
    }
    sel->segments[tokens] = sel->count = n;
    return CM_OK;
}

/* Per column, how many tokens the plain top-k of the logits chooses it
 * (the balance loss of a biased choice counts the unbiased one). */
static int32_t *unbiased_counts(ag_ctx *ctx, ag_tensor *logits, int k) {
    const int tokens = (int)ag_rows(logits), choices = ag_last_dim(logits);
    int32_t *counts = ag_alloc_ints(ctx, choices, "router_topk");
    int32_t *chosen = ag_alloc_ints(ctx, k, "router_topk");
    if (!counts || !chosen) return NULL;
    memset(counts, 0, (size_t)choices * sizeof(int32_t));
    for (int t = 0; t < tokens; t++) {
        select_topk(logits->data + (int64_t)t * choices, choices, k, chosen);
        for (int j = 0; j < k; j++) counts[chosen[j]]++;
    }
    return counts;
}

/* The balance loss's counts: the kept choices before any dropping for the
 * true experts (stats.routed_per_expert), the null experts' choices after. */
static const int32_t *balance_counts(ag_ctx *ctx, const router_output *out,
                                     const topk_selection *sel, int experts, int choices) {
    if (choices == experts) return out->stats.routed_per_expert;
    int32_t *counts = ag_alloc_ints(ctx, choices, "router_topk");
    if (!counts) return NULL;
    memcpy(counts, out->stats.routed_per_expert, (size_t)experts * sizeof(int32_t));
    memcpy(counts + experts, sel->counts + experts, (size_t)(choices - experts) * sizeof(int32_t));
    return counts;
}

cm_status router_topk_select(ag_ctx *ctx, const router *r, ag_tensor *x, const router_call *call,
                             const router_topk_args *args, router_output *out) {
    const router_config *config = &r->config;
    int experts = config->num_experts, k = router_effective_k(r, call);
    ag_tensor *logits = router_logits(ctx, r, x, call); /* [T,E] */
    const float *expert_logits = logits && !args->null_logits ? logits->data : NULL;
    if (logits && args->null_logits) /* [T,E+m] */
        logits = ag_concat(ctx, (ag_tensor *[]){logits, args->null_logits}, 2, 1);
    if (!logits) return ag_ctx_status(ctx);
    int tokens = (int)ag_rows(logits), choices = ag_last_dim(logits);
    CM_ASSERT(k >= 1 && k <= choices, "router_topk_select: k = %d of %d", k, choices);

    /* The full softmax feeds the statistics; it goes on the tape only when a
     * gradient flows through it (softmax-then-topK gates, Switch loss). */
    bool probs_on_tape = args->gating == ROUTER_SOFTMAX_THEN_TOPK || args->aux_coef != 0.0f;
    bool grad_was_enabled = ag_set_grad_enabled(ctx, ctx->grad_enabled && probs_on_tape);
    ag_tensor *probs = ag_softmax(ctx, logits); /* [T,E+m] */
    ag_set_grad_enabled(ctx, grad_was_enabled);

    topk_selection sel = {0};
    CM_TRY(select_all(ctx, r, logits, probs, k, args->selection_bias, &sel));
    ag_tensor *gates; /* [count] */
    if (args->gating == ROUTER_SOFTMAX_THEN_TOPK)
        gates = ag_gather_elements(ctx, probs, sel.flat, sel.count);
    else
        gates = ag_segment_softmax(ctx, ag_gather_elements(ctx, logits, sel.flat, sel.count),
                                   sel.segments, tokens);
    if (!gates) return ag_ctx_status(ctx);
    /* An over-full expert keeps its highest gates (Megatron's "probs" policy). */
    memcpy(sel.priority, gates->data, (size_t)sel.count * sizeof *sel.priority);

    /* The mean load of an expert is k T / (E + m); router_finish divides by E. */
    router_candidates candidates = {.count = sel.count,
                                    .token = sel.token,
                                    .expert = sel.expert,
                                    .priority = sel.priority,
                                    .gates = gates,
                                    .capacity_load = (double)k * tokens * experts / choices};
    CM_TRY(router_finish(ctx, r, tokens, k, &candidates, out));
    /* f counts the router's choices before dropping (Switch, GShard,
     * Megatron): counting after would hide exactly the overload that drops. */
    const int32_t *counts = args->aux_coef == 0.0f ? NULL
                            : args->selection_bias != NULL
                                ? unbiased_counts(ctx, logits, k)
                                : balance_counts(ctx, out, &sel, experts, choices);
    ag_tensor *aux = counts ? router_switch_loss_pooled(ctx, probs, counts, k, args->aux_coef,
                                                        config->aux_loss_scope, call, experts)
                            : NULL;
    out->aux_loss = router_add_losses(ctx, aux, router_z_loss(ctx, logits, args->z_coef, call));
    out->stats.entropy = router_mean_entropy(probs);
    out->stats.k = k;
    out->logits = expert_logits;
    return ag_ctx_status(ctx);
}

cm_status router_topk_route(ag_ctx *ctx, const router *r, ag_tensor *x, const router_call *call,
                            router_output *out) {
    const router_config *config = &r->config;
    router_topk_args args = {config->gating, config->aux_loss_coef, config->z_loss_coef, NULL,
                             NULL};
    return router_topk_select(ctx, r, x, call, &args, out);
}
