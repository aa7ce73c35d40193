/* Building blocks shared by the routing methods (METHODS.md section 0):
 * router logits with optional noise, capacity dropping and the CSR output,
 * the Switch load-balancing loss, the z-loss and the entropy statistic. */
#include <math.h>
#include <string.h>

#include "common/check.h"
#include "routers/router_internal.h"

#include "parallel/comm.h"

/* ---- helpers -------------------------------------------------------------- */

/* Merges the sorted runs index[lo,mid) and index[mid,hi), left run first on
 * equal scores (this is what makes the sort stable). */
static void merge_desc(int32_t *index, int lo, int mid, int hi, const float *score, int64_t stride,
                       int32_t *scratch) {
    int a = lo, b = mid, out = lo;
    while (a < mid && b < hi) {
        /* Take from the right run only when strictly greater. */
        if (score[(int64_t)index[b] * stride] > score[(int64_t)index[a] * stride])
            scratch[out++] = index[b++];
        else
            scratch[out++] = index[a++];
    }
    while (a < mid) scratch[out++] = index[a++];
    while (b < hi) scratch[out++] = index[b++];
    memcpy(index + lo, scratch + lo, (size_t)(hi - lo) * sizeof *index);
}

void router_sort_desc(int32_t *index, int n, const float *score, int64_t stride, int32_t *scratch) {
    /* Bottom-up merge sort: O(n log n), no recursion, no allocation. */
    for (int width = 1; width < n; width *= 2)
        for (int lo = 0; lo < n - width; lo += 2 * width) {
            int mid = lo + width;
            int hi = mid + width < n ? mid + width : n;
            merge_desc(index, lo, mid, hi, score, stride, scratch);
        }
}

int router_ceil_count(double value) {
    double below = floor(value);
    if (value - below <= 1e-6 * fabs(value)) return (int)below;
    return (int)ceil(value);
}

/* ---- logits ----------------------------------------------------------------- */

/* x [T,D], weight [E,D], bias [E] -> logits [T,E], plus in training
 *   fixed:   noise_std n
 *   learned: n softplus(x W_noise^T)   (noise_weight [E,D]; Shazeer et al.)
 * with n [T,E] standard normal draws, constants of the step (no gradient).
 * Element (t, e) of n uses index (first_token + t) * E + e of the key
 * (seed, step, layer, CM_RNG_NOISE), so it is the same draw on any number
 * of ranks. */
ag_tensor *router_logits(ag_ctx *ctx, const router *r, ag_tensor *x, const router_call *call) {
    CM_ASSERT(r->weight, "router_logits: router of method %s has no weight", r->method->name);
    const router_config *config = &r->config;
    ag_tensor *logits =
        ag_linear(ctx, x, ag_param_tensor(r->weight), r->bias ? ag_param_tensor(r->bias) : NULL);
    bool fixed = config->noise == ROUTER_NOISE_FIXED && config->noise_std != 0.0f;
    bool learned = config->noise == ROUTER_NOISE_LEARNED;
    if (!logits || !call->training || !(fixed || learned)) return logits;
    CM_ASSERT(!learned || r->noise_weight, "router_logits: learned noise without noise_weight");
    ag_tensor *noise = ag_empty(ctx, "router_noise", logits->ndim, logits->shape);
    if (!noise) return NULL;
    cm_rng_key key = {call->seed, call->step, (uint32_t)r->layer, CM_RNG_NOISE};
    cm_rng_fill_normal(key, call->first_token * (uint64_t)config->num_experts, noise->numel, 0.0f,
                       fixed ? config->noise_std : 1.0f, noise->data);
    if (learned) {
        ag_tensor *std =
            ag_softplus(ctx, ag_linear(ctx, x, ag_param_tensor(r->noise_weight), NULL));
        noise = ag_mul(ctx, std, noise);
    }
    return ag_add(ctx, logits, noise);
}

/* ---- capacity and the CSR output ----------------------------------------------- */

/* Marks the candidates an over-full expert cannot take (drop[i] = 1) and
 * returns how many were dropped; -1 when the arena is full. */
static int64_t apply_capacity(ag_ctx *ctx, const router *r, int capacity,
                              const router_candidates *candidates, const int32_t *per_expert,
                              unsigned char *drop) {
    int experts = r->config.num_experts, count = candidates->count;
    bool over = false;
    for (int e = 0; e < experts; e++) over = over || per_expert[e] > capacity;
    if (!over) return 0;
    /* Bucket the candidates by expert; a bucket lists them in candidate
     * (= token) order, which is the POSITION policy's order and the tie
     * order of the PROBABILITY policy. */
    int32_t *bucket_start = ag_alloc_ints(ctx, experts + 1, "router_capacity");
    int32_t *bucket = ag_alloc_ints(ctx, count, "router_capacity");
    int32_t *fill = ag_alloc_ints(ctx, experts, "router_capacity");
    int32_t *scratch = ag_alloc_ints(ctx, count, "router_capacity");
    if (!bucket_start || !bucket || !fill || !scratch) return -1;
    bucket_start[0] = 0;
    for (int e = 0; e < experts; e++) bucket_start[e + 1] = bucket_start[e] + per_expert[e];
    memcpy(fill, bucket_start, (size_t)experts * sizeof *fill);
    for (int i = 0; i < count; i++) bucket[fill[candidates->expert[i]]++] = i;
    int64_t dropped = 0;
    for (int e = 0; e < experts; e++) {
        if (per_expert[e] <= capacity) continue;
        int32_t *members = bucket + bucket_start[e];
        if (r->config.drop_policy == ROUTER_DROP_PROBABILITY)
            router_sort_desc(members, per_expert[e], candidates->priority, 1, scratch);
        for (int j = capacity; j < per_expert[e]; j++) drop[members[j]] = 1;
        dropped += per_expert[e] - capacity;
    }
    return dropped;
}

/* A constant [n] of ones: the gates of a method without router weights. */
static ag_tensor *constant_ones(ag_ctx *ctx, int n) {
    ag_tensor *ones = ag_empty(ctx, "router_gates", 1, &n);
    if (ones)
        for (int i = 0; i < n; i++) ones->data[i] = 1.0f;
    return ones;
}

cm_status router_finish(ag_ctx *ctx, const router *r, int n_tokens, int k,
                        const router_candidates *candidates, router_output *out) {
    if (ag_failed(ctx)) return ag_ctx_status(ctx);
    const router_config *config = &r->config;
    int experts = config->num_experts, count = candidates->count;
    int32_t *per_expert = ag_alloc_ints(ctx, experts, "router_finish");
    unsigned char *drop = ag_alloc(ctx, (size_t)(count ? count : 1), "router_finish");
    if (!per_expert || !drop) return ag_ctx_status(ctx);
    memset(per_expert, 0, (size_t)experts * sizeof *per_expert);
    memset(drop, 0, (size_t)count);
    for (int i = 0; i < count; i++) {
        int e = candidates->expert[i], t = candidates->token[i];
        CM_ASSERT(e >= 0 && e < experts, "router_finish: candidate %d has expert %d of %d", i, e,
                  experts);
        CM_ASSERT(t >= 0 && t < n_tokens && (i == 0 || t >= candidates->token[i - 1]),
                  "router_finish: candidate %d has token %d (of %d) out of token order", i, t,
                  n_tokens);
        per_expert[e]++;
    }

    /* A method without a capacity load sets its own capacity (expert choice:
     * each expert takes c tokens). */
    int64_t dropped = 0;
    if (config->capacity_factor > 0.0f && candidates->capacity_load > 0.0 && count > 0) {
        int capacity = router_ceil_count(candidates->capacity_load / experts *
                                         (double)config->capacity_factor);
        dropped = apply_capacity(ctx, r, capacity, candidates, per_expert, drop);
        if (dropped < 0) return ag_ctx_status(ctx);
    }

    int slots = count - (int)dropped;
    int32_t *offsets = ag_alloc_ints(ctx, (int64_t)n_tokens + 1, "router_finish");
    int32_t *expert = ag_alloc_ints(ctx, slots ? slots : 1, "router_finish");
    int32_t *kept = dropped ? ag_alloc_ints(ctx, slots ? slots : 1, "router_finish") : NULL;
    int32_t *tokens_per_expert = ag_alloc_ints(ctx, experts, "router_finish");
    if (!offsets || !expert || (dropped && !kept) || !tokens_per_expert) return ag_ctx_status(ctx);
    /* per_expert now becomes stats.routed_per_expert: the choices before the drop. */
    memset(offsets, 0, ((size_t)n_tokens + 1) * sizeof *offsets);
    memset(tokens_per_expert, 0, (size_t)experts * sizeof *tokens_per_expert);
    int s = 0;
    for (int i = 0; i < count; i++) {
        if (drop[i]) continue;
        offsets[candidates->token[i] + 1]++;
        tokens_per_expert[candidates->expert[i]]++;
        expert[s] = candidates->expert[i];
        if (kept) kept[s] = i;
        s++;
    }
    for (int t = 0; t < n_tokens; t++) offsets[t + 1] += offsets[t];

    ag_tensor *gates;
    if (!candidates->gates)
        gates = constant_ones(ctx, slots);
    else if (!dropped)
        gates = candidates->gates;
    else /* The kept gates keep their values: no renormalisation after dropping. */
        gates = ag_gather_elements(ctx, candidates->gates, kept, slots);
    if (!gates) return ag_ctx_status(ctx);

    *out = (router_output){
        .n_tokens = n_tokens,
        .n_slots = slots,
        .offsets = offsets,
        .expert = expert,
        .gates = gates,
        .aux_loss = NULL,
        .stats = {.tokens = n_tokens,
                  .slots = slots,
                  .dropped = dropped,
                  .tokens_per_expert = tokens_per_expert,
                  .routed_per_expert = per_expert,
                  .entropy = NAN,
                  .k = k},
    };
    return ag_ctx_status(ctx);
}

/* ---- auxiliary losses --------------------------------------------------------- */

/* probs [T,E] -> [1]: coef E sum_i f_i P_i, written as sum_i w_i colsum_i with
 * the constant w_i = coef E f_i / T, so the gradient reaches probs only. */
double router_token_share(const router_call *call, int tokens) {
    return call->global_tokens > 0 ? (double)tokens / (double)call->global_tokens : 1.0;
}

ag_tensor *router_switch_loss(ag_ctx *ctx, ag_tensor *probs, const int32_t *counts, int k,
                              float coef, router_aux_scope scope, const router_call *call) {
    return router_switch_loss_pooled(ctx, probs, counts, k, coef, scope, call,
                                     probs ? ag_last_dim(probs) : 0);
}

/* The mean of counts[from, n) (0 when the range is empty). */
static double pooled_mean(const int32_t *counts, int from, int n) {
    double total = 0.0;
    for (int e = from; e < n; e++) total += counts[e];
    return from < n ? total / (n - from) : 0.0;
}

ag_tensor *router_switch_loss_pooled(ag_ctx *ctx, ag_tensor *probs, const int32_t *counts, int k,
                                     float coef, router_aux_scope scope, const router_call *call,
                                     int pooled_from) {
    if (coef == 0.0f || !probs || ag_failed(ctx)) return NULL;
    int tokens = (int)ag_rows(probs), experts = ag_last_dim(probs);
    ag_tensor *column_sums = ag_sum_rows(ctx, probs); /* [E] = T P over this rank's tokens */
    ag_tensor *weights = ag_empty(ctx, "switch_loss", 1, &experts);
    int32_t *scope_counts = ag_alloc_ints(ctx, experts, "switch_loss");
    if (!column_sums || !weights || !scope_counts) return NULL;
    memcpy(scope_counts, counts, (size_t)experts * sizeof(int32_t));
    /* scope_tokens: the T the statistics cover; the loss of the scope is
     * then scaled by its share of the global batch (1 for global). */
    double scope_tokens = call->global_tokens > 0 ? (double)call->global_tokens : tokens;
    double share = 1.0;
    if (scope == ROUTER_AUX_GLOBAL) {
        cm_status status = comm_sum_int32(call->group, scope_counts, experts);
        if (status != CM_OK) {
            ctx->status = status;
            return NULL;
        }
    } else {
        scope_tokens = tokens;
        share = router_token_share(call, tokens);
    }
    double slots = (double)k * scope_tokens;
    if (k == 0)
        for (int e = 0; e < experts; e++) slots += scope_counts[e];
    if (slots == 0.0) return NULL; /* no assignment at all: nothing to balance */
    /* AdaMoE: the null experts share one target as a group, not each its own. */
    const double null_mean = pooled_mean(scope_counts, pooled_from, experts);
    for (int e = 0; e < experts; e++) {
        double count = e < pooled_from ? (double)scope_counts[e] : null_mean;
        double fraction = count / slots;
        weights->data[e] = (float)((double)coef * experts * fraction / scope_tokens * share);
    }
    return ag_sum(ctx, ag_mul(ctx, column_sums, weights));
}

/* logits [T,E] -> [1]: coef mean_t lse_t^2. logsumexp has no op of its own:
 * lse = z_0 - log_softmax(z)_0 for any column (here 0), and its gradient
 * through both terms is softmax(z), as it should be. NULL (no term) for
 * T = 0: a rank without rows of a short batch adds nothing to the global mean. */
ag_tensor *router_z_loss(ag_ctx *ctx, ag_tensor *logits, float coef, const router_call *call) {
    if (coef == 0.0f || !logits || ag_rows(logits) == 0) return NULL;
    coef = (float)(coef * router_token_share(call, (int)ag_rows(logits)));
    ag_tensor *first_logit = ag_slice(ctx, logits, 1, 0, 1);
    ag_tensor *first_log_prob = ag_slice(ctx, ag_log_softmax(ctx, logits), 1, 0, 1);
    ag_tensor *lse = ag_sub(ctx, first_logit, first_log_prob); /* [T,1] */
    return ag_scale(ctx, ag_mean(ctx, ag_mul(ctx, lse, lse)), coef);
}

double router_mean_entropy(const ag_tensor *probs) {
    if (!probs || !probs->data) return NAN;
    int64_t tokens = ag_rows(probs);
    int experts = ag_last_dim(probs);
    if (tokens == 0) return NAN;
    double total = 0.0;
    for (int64_t t = 0; t < tokens; t++) {
        const float *row = probs->data + t * experts;
        for (int e = 0; e < experts; e++)
            if (row[e] > 0.0f) total -= (double)row[e] * log((double)row[e]);
    }
    return total / (double)tokens;
}

ag_tensor *router_add_losses(ag_ctx *ctx, ag_tensor *a, ag_tensor *b) {
    if (!a) return b;
    if (!b) return a;
    return ag_add(ctx, a, b);
}
