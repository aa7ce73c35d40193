#include "layers/moe_internal.h"

#include "common/pool.h"
#include "parallel/comm.h"
#include "parallel/dispatch.h"

#include <stdio.h>
#include <string.h>

/* PREFIX.group_of [E]: frozen, the identity until a checkpoint says otherwise. */
static cm_status declare_group_table(moe_layer *moe, ag_params *params, const char *prefix) {
    char name[AG_PARAM_NAME_MAX];
    snprintf(name, sizeof name, "%s.group_of", prefix);
    CM_TRY(ag_params_declare(params, name, AG_GROUP_DENSE, 1,
                             (int[]){moe->config.router.num_experts},
                             (ag_init){AG_INIT_INDEX, 0.0f, 0.0f}, &moe->group_of));
    ag_param_set_frozen(moe->group_of, true);
    return CM_OK;
}

cm_status moe_declare(moe_layer *moe, const moe_config *config, int layer, ag_params *params,
                      const char *prefix) {
    const moe_config *c = config;
    if (c->hidden < 1 || c->d_model < 1)
        return CM_ERR(CM_ERR_INVALID, "MoE layer %d: expert hidden size %d must be >= 1", layer,
                      c->hidden);
    if (c->activation < 0 || c->activation >= AG_ACT_COUNT)
        return CM_ERR(CM_ERR_INVALID, "MoE layer %d: unknown activation %d", layer,
                      (int)c->activation);
    if (!(c->expert_dropout >= 0.0f && c->expert_dropout < 1.0f))
        return CM_ERR(CM_ERR_INVALID, "MoE layer %d: moe.expert_dropout = %g not in [0, 1)", layer,
                      (double)c->expert_dropout);
    *moe = (moe_layer){.config = *c, .layer = layer};
    const int E = c->router.num_experts, D = c->d_model, H = c->hidden;
    const int ranks = c->ep_size > 1 ? c->ep_size : 1;
    if (E % ranks != 0)
        return CM_ERR(CM_ERR_INVALID,
                      "moe.num_experts = %d cannot be split evenly over %d expert-parallel ranks",
                      E, ranks);
    moe->local_experts = E / ranks;
    moe->first_expert = (c->ep_size > 1 ? c->ep_rank : 0) * moe->local_experts;
    const int L = moe->local_experts;
    char name[AG_PARAM_NAME_MAX];
    snprintf(name, sizeof name, "%s.router", prefix);
    CM_TRY(router_declare(&moe->router, &c->router, layer, D, params, name));
    const ag_init zero = {AG_INIT_ZERO, 0.0f, 0.0f};
    const struct {
        const char *suffix;
        ag_param **out;
        int ndim;
        int shape[3];
        ag_init init;
    } tensors[] = {
        {"w1", &moe->w1, 3, {L, H, D}, {AG_INIT_NORMAL, 0.0f, c->init_std}},
        {"b1", &moe->b1, 2, {L, H, 0}, zero},
        {"w2", &moe->w2, 3, {L, D, H}, {AG_INIT_NORMAL, 0.0f, c->out_std}},
        {"b2", &moe->b2, 2, {L, D, 0}, zero},
        /* swiglu's up projection, after the others so their layout is the
         * same for every activation */
        {"w3", &moe->w3, 3, {L, H, D}, {AG_INIT_NORMAL, 0.0f, c->init_std}},
        {"b3", &moe->b3, 2, {L, H, 0}, zero},
    };
    const size_t count =
        sizeof tensors / sizeof tensors[0] - (c->activation == AG_ACT_SWIGLU ? 0 : 2);
    for (size_t i = 0; i < count; i++) {
        snprintf(name, sizeof name, "%s.experts.%s", prefix, tensors[i].suffix);
        CM_TRY(ag_params_declare(params, name, AG_GROUP_EXPERT, tensors[i].ndim, tensors[i].shape,
                                 tensors[i].init, tensors[i].out));
        /* Draw each expert's initial values at its global position. */
        ag_tensor *t = &(*tensors[i].out)->tensor;
        (*tensors[i].out)->init_index_offset =
            (uint64_t)moe->first_expert * (uint64_t)(t->numel / L);
    }
    return c->merged ? declare_group_table(moe, params, prefix) : CM_OK;
}

/* Who sends how many rows to whom, for one layer call. With a single rank
 * every array describes the identity and no row moves. */
typedef struct exchange_plan {
    int ranks;
    int32_t *send_rows, *recv_rows; /* [ranks] */
    int32_t *local_offsets;         /* [local_experts+1] over the received rows */
    int32_t *to_expert_major;       /* [R]: received row for expert-major position i */
    int32_t *from_expert_major;     /* [R]: its inverse */
    int received;
} exchange_plan;

/* all_counts [P][E]: the rows every rank sends to every expert, when the
 * shadow plan gathered them already (then no MPI_Alltoall); else NULL. */
static cm_status plan_exchange(ag_ctx *ctx, const moe_layer *moe, const int32_t *expert_offsets,
                               const int32_t *all_counts, exchange_plan *plan) {
    const moe_config *c = &moe->config;
    const int ranks = c->ep_size > 1 ? c->ep_size : 1, L = moe->local_experts;
    const int E = c->router.num_experts;
    plan->ranks = ranks;
    int32_t *send_counts = ag_alloc_ints(ctx, E, "moe exchange");
    int32_t *recv_counts = ag_alloc_ints(ctx, E, "moe exchange"); /* [source][local expert] */
    plan->send_rows = ag_alloc_ints(ctx, ranks, "moe exchange");
    plan->recv_rows = ag_alloc_ints(ctx, ranks, "moe exchange");
    plan->local_offsets = ag_alloc_ints(ctx, L + 1, "moe exchange");
    if (!send_counts || !recv_counts || !plan->send_rows || !plan->recv_rows ||
        !plan->local_offsets)
        return ag_ctx_status(ctx);
    for (int e = 0; e < E; e++) send_counts[e] = expert_offsets[e + 1] - expert_offsets[e];
    if (all_counts)
        for (int p = 0; p < ranks; p++)
            for (int j = 0; j < L; j++)
                recv_counts[p * L + j] = all_counts[(int64_t)p * E + moe->first_expert + j];
    else
        CM_TRY(dispatch_exchange_counts(c->ep_group, send_counts, recv_counts, L, c->timing));
    plan->received = 0;
    for (int p = 0; p < ranks; p++) {
        plan->send_rows[p] = expert_offsets[(p + 1) * L] - expert_offsets[p * L];
        plan->recv_rows[p] = 0;
        for (int j = 0; j < L; j++) plan->recv_rows[p] += recv_counts[p * L + j];
        plan->received += plan->recv_rows[p];
    }
    /* Received rows come grouped by source, then local expert; the experts
     * want them grouped by local expert, then source. */
    int R = plan->received;
    plan->to_expert_major = ag_alloc_ints(ctx, R > 0 ? R : 1, "moe exchange");
    plan->from_expert_major = ag_alloc_ints(ctx, R > 0 ? R : 1, "moe exchange");
    int32_t *block_start = ag_alloc_ints(ctx, ranks * L, "moe exchange");
    if (!plan->to_expert_major || !plan->from_expert_major || !block_start)
        return ag_ctx_status(ctx);
    for (int i = 0, at = 0; i < ranks * L; i++) {
        block_start[i] = at;
        at += recv_counts[i];
    }
    int position = 0;
    for (int j = 0; j < L; j++) {
        plan->local_offsets[j] = position;
        for (int p = 0; p < ranks; p++)
            for (int row = 0; row < recv_counts[p * L + j]; row++, position++) {
                int received_row = block_start[p * L + j] + row;
                plan->to_expert_major[position] = received_row;
                plan->from_expert_major[received_row] = position;
            }
    }
    plan->local_offsets[L] = position;
    return CM_OK;
}

/* xs [S,D] in dispatch order -> [R,D] for this rank's experts, expert-major. */
static ag_tensor *to_experts(ag_ctx *ctx, const moe_layer *moe, ag_tensor *xs,
                             const exchange_plan *plan) {
    /* One rank: the rows are already here, expert-major (no copy to keep) */
    if (plan->ranks == 1) return xs;
    ag_tensor *received = ag_all_to_all(ctx, xs, plan->send_rows, plan->recv_rows,
                                        moe->config.ep_group, moe->config.timing);
    return ag_gather_rows(ctx, received, plan->to_expert_major, plan->received);
}

/* y [R,D] expert-major -> [S,D] back on the tokens' ranks, in dispatch order. */
static ag_tensor *from_experts(ag_ctx *ctx, const moe_layer *moe, ag_tensor *y,
                               const exchange_plan *plan) {
    if (plan->ranks == 1) return y;
    y = ag_gather_rows(ctx, y, plan->from_expert_major, plan->received);
    return ag_all_to_all(ctx, y, plan->recv_rows, plan->send_rows, moe->config.ep_group,
                         moe->config.timing);
}

/* The experts here that receive rows take part in this step's update
 * (ag_param.slice_used; an expert with no row gets no gradient). */
static void mark_used_experts(const moe_layer *moe, const exchange_plan *plan) {
    for (int j = 0; j < moe->local_experts; j++) {
        if (plan->local_offsets[j + 1] == plan->local_offsets[j]) continue;
        ag_param_mark_slice(moe->w1, j);
        ag_param_mark_slice(moe->b1, j);
        ag_param_mark_slice(moe->w2, j);
        ag_param_mark_slice(moe->b2, j);
        ag_param_mark_slice(moe->w3, j); /* SwiGLU's up projection; NULL otherwise */
        ag_param_mark_slice(moe->b3, j);
    }
}

/* The global token index of each of the R rows of this rank's experts,
 * expert-major: sorted_token [S] in dispatch order, made global with
 * first_token, sent with the rows to their experts' ranks. */
static uint64_t *expert_row_tokens(ag_ctx *ctx, const moe_layer *moe, const router_call *call,
                                   const int32_t *sorted_token, int S, const exchange_plan *plan) {
    const int R = plan->received;
    uint64_t *mine = ag_alloc(ctx, (size_t)(R > 0 ? R : 1) * sizeof(uint64_t), "moe dropout");
    uint64_t *sent = ag_alloc(ctx, (size_t)(S > 0 ? S : 1) * sizeof(uint64_t), "moe dropout");
    uint64_t *received = ag_alloc(ctx, (size_t)(R > 0 ? R : 1) * sizeof(uint64_t), "moe dropout");
    if (!mine || !sent || !received) return NULL;
    for (int s = 0; s < S; s++) sent[s] = call->first_token + (uint64_t)sorted_token[s];
    if (plan->ranks == 1) {
        memcpy(mine, sent, (size_t)S * sizeof(uint64_t));
        return mine;
    }
    cm_status status = dispatch_exchange_ids(moe->config.ep_group, sent, plan->send_rows, received,
                                             plan->recv_rows, moe->config.timing);
    if (status != CM_OK) {
        ctx->status = status;
        return NULL;
    }
    for (int i = 0; i < R; i++) mine[i] = received[plan->to_expert_major[i]];
    return mine;
}

typedef struct dropout_job {
    cm_rng_key key;
    const uint64_t *row_token; /* [R] */
    const int32_t *row_expert; /* [R] global expert */
    int hidden, experts;
    float p;
    int64_t first_row; /* of keep's first row, among the R */
    uint8_t *keep;     /* [rows,H] */
} dropout_job;

/* keep for rows [begin, end) of the job: unit u of row r uses the draw at
 * index (token E + expert) H + u. */
static void dropout_rows(void *context, int64_t begin, int64_t end) {
    const dropout_job *j = context;
    enum { CHUNK = 64 };
    float uniform[CHUNK];
    for (int64_t r = begin; r < end; r++) {
        const int64_t row = j->first_row + r;
        uint64_t base = (j->row_token[row] * (uint64_t)j->experts + (uint64_t)j->row_expert[row]) *
                        (uint64_t)j->hidden;
        uint8_t *keep = j->keep + r * j->hidden;
        for (int u = 0; u < j->hidden; u += CHUNK) {
            int n = j->hidden - u < CHUNK ? j->hidden - u : CHUNK;
            cm_rng_fill_uniform(j->key, base + (uint64_t)u, n, 0.0f, 1.0f, uniform);
            for (int i = 0; i < n; i++) keep[u + i] = uniform[i] >= j->p;
        }
    }
}

/* The dropout draws of R rows whose global token and expert are row_token
 * [R] and row_expert [R] (moe.h), in the arena: kept while backward may draw
 * them again (train.recompute). */
static dropout_job *dropout_draws(ag_ctx *ctx, const moe_layer *moe, const router_call *call,
                                  const uint64_t *row_token, const int32_t *row_expert) {
    const moe_config *c = &moe->config;
    dropout_job *job = ag_alloc(ctx, sizeof *job, "moe dropout");
    if (!job || !row_token || !row_expert) return NULL;
    /* THOR's second pass draws its own masks */
    uint32_t stream = ((uint32_t)call->pass << 24) + (uint32_t)moe->layer;
    *job = (dropout_job){.key = {call->seed, call->step, stream, CM_RNG_EXPERT_DROPOUT},
                         .row_token = row_token,
                         .row_expert = row_expert,
                         .hidden = c->hidden,
                         .experts = c->router.num_experts,
                         .p = c->expert_dropout};
    return job;
}

/* The draws of this call's exchanged rows, those of the experts here. */
static dropout_job *expert_dropout_draws(ag_ctx *ctx, const moe_layer *moe, const router_call *call,
                                         const int32_t *sorted_token, int S,
                                         const exchange_plan *plan) {
    const int R = plan->received;
    uint64_t *row_token = expert_row_tokens(ctx, moe, call, sorted_token, S, plan);
    int32_t *row_expert = ag_alloc_ints(ctx, R > 0 ? R : 1, "moe dropout");
    if (!row_token || !row_expert) return NULL;
    for (int j = 0; j < moe->local_experts; j++)
        for (int r = plan->local_offsets[j]; r < plan->local_offsets[j + 1]; r++)
            row_expert[r] = moe->first_expert + j;
    return dropout_draws(ctx, moe, call, row_token, row_expert);
}

/* The draws of the shadowed experts' rows, computed here. */
static dropout_job *shadow_dropout_draws(ag_ctx *ctx, const moe_layer *moe, const router_call *call,
                                         const moe_shadow_plan *shadow) {
    const int R = shadow->shadowed;
    uint64_t *row_token = ag_alloc(ctx, (size_t)(R > 0 ? R : 1) * sizeof(uint64_t), "moe dropout");
    int32_t *row_expert = ag_alloc_ints(ctx, R > 0 ? R : 1, "moe dropout");
    if (!row_token || !row_expert) return NULL;
    moe_shadow_rows(shadow, call->first_token, row_token, row_expert);
    return dropout_draws(ctx, moe, call, row_token, row_expert);
}

/* ag_mask_fn over a dropout_draws job: rows [first_row, first_row + rows)
 * of the mask, the same bits every time. */
static void dropout_fill(const void *context, int64_t first_row, int rows, uint8_t *keep) {
    dropout_job job = *(const dropout_job *)context;
    job.first_row = first_row;
    job.keep = keep;
    cm_pool_for(rows, 1 + 4096 / job.hidden, dropout_rows, &job);
}

/* y [R,D] = the experts' FFN of rows [R,D] (expert-major by offsets, through
 * `weights`); draws: the rows' dropout draws in training, else NULL. The
 * activation (and dropout) is fused into the second product, so a is never
 * kept; h (and up, and the mask) are, unless recompute_experts: then only
 * the rows are, and backward makes the rest again, the mask from its draws
 * (moe.h). */
static ag_tensor *expert_products(ag_ctx *ctx, const moe_config *c, ag_tensor *rows,
                                  const moe_expert_weights *weights, const int32_t *offsets,
                                  const dropout_job *draws) {
    const float keep_scale = 1.0f / (1.0f - c->expert_dropout);
    if (c->recompute_experts) {
        ag_expert_ffn ffn = {weights->w1,
                             weights->b1,
                             weights->w3,
                             weights->b3,
                             weights->w2,
                             weights->b2,
                             .activation = c->activation};
        if (draws) {
            ffn.keep_context = draws;
            ffn.keep_fn = dropout_fill;
            ffn.keep_scale = keep_scale;
        }
        return ag_grouped_ffn(ctx, rows, &ffn, offsets);
    }
    ag_tensor *h = ag_grouped_linear(ctx, rows, weights->w1, weights->b1, offsets);
    if (c->activation != AG_ACT_SWIGLU && !draws)
        return ag_grouped_linear_act(ctx, h, c->activation, weights->w2, weights->b2, offsets);
    ag_hidden_layer hidden = {.activation = c->activation};
    if (c->activation == AG_ACT_SWIGLU)
        hidden.up = ag_grouped_linear(ctx, rows, weights->w3, weights->b3, offsets);
    if (draws && rows) { /* the mask [R,H], kept for backward */
        const int R = (int)ag_rows(rows);
        uint8_t *keep = ag_alloc(ctx, (size_t)(R > 0 ? R : 1) * (size_t)c->hidden, "moe dropout");
        if (!keep) return NULL;
        dropout_fill(draws, 0, R, keep);
        hidden.keep = keep;
        hidden.keep_scale = keep_scale;
    }
    return ag_grouped_linear_hidden(ctx, h, &hidden, weights->w2, weights->b2, offsets);
}

static moe_expert_weights own_weights(const moe_layer *moe) {
    moe_expert_weights weights = {.w1 = ag_param_tensor(moe->w1),
                                  .b1 = ag_param_tensor(moe->b1),
                                  .w2 = ag_param_tensor(moe->w2),
                                  .b2 = ag_param_tensor(moe->b2)};
    if (moe->w3) /* swiglu's up projection */
        weights.w3 = ag_param_tensor(moe->w3), weights.b3 = ag_param_tensor(moe->b3);
    return weights;
}

/* y_exchanged [exchanged,D] -> y [S,D] in dispatch order, with the shadowed
 * experts' rows computed here from x [T,D] and copies of their weights. */
static ag_tensor *add_shadow_rows(ag_ctx *ctx, const moe_layer *moe, const router_call *call,
                                  ag_tensor *x, ag_tensor *y_exchanged,
                                  const moe_shadow_plan *shadow, int S) {
    const moe_config *c = &moe->config;
    moe_expert_weights weights;
    moe_shadow_weights(ctx, moe, shadow, &weights);
    const dropout_job *draws = NULL;
    if (call->training && c->expert_dropout > 0.0f) {
        draws = shadow_dropout_draws(ctx, moe, call, shadow);
        if (!draws) return NULL;
    }
    ag_tensor *xs = ag_gather_rows(ctx, x, shadow->shadow_token, shadow->shadowed);
    ag_tensor *y_shadow = expert_products(ctx, c, xs, &weights, shadow->shadow_offsets, draws);
    ag_tensor *both = ag_concat(ctx, (ag_tensor *[]){y_exchanged, y_shadow}, 2, 0);
    return ag_gather_rows(ctx, both, shadow->merge, S);
}

/* Dispatch: stable counting sort of the slots by expert. sorted_slot[j]
 * is the slot at position j; expert e owns positions
 * [expert_offsets[e], expert_offsets[e+1]). */
static cm_status sort_slots(ag_ctx *ctx, const router_output *routed, int T, int E,
                            int32_t **expert_offsets_out, int32_t **sorted_slot_out,
                            int32_t **sorted_token_out) {
    const int S = routed->n_slots;
    int32_t *expert_offsets = ag_alloc_ints(ctx, E + 1, "moe dispatch");
    int32_t *sorted_slot = ag_alloc_ints(ctx, S > 0 ? S : 1, "moe dispatch");
    int32_t *sorted_token = ag_alloc_ints(ctx, S > 0 ? S : 1, "moe dispatch");
    int32_t *next = ag_alloc_ints(ctx, E, "moe dispatch");
    if (!expert_offsets || !sorted_slot || !sorted_token || !next) return ag_ctx_status(ctx);
    memset(expert_offsets, 0, (size_t)(E + 1) * sizeof(int32_t));
    for (int s = 0; s < S; s++) expert_offsets[routed->expert[s] + 1]++;
    for (int e = 0; e < E; e++) expert_offsets[e + 1] += expert_offsets[e];
    memcpy(next, expert_offsets, (size_t)E * sizeof(int32_t));
    for (int t = 0; t < T; t++)
        for (int s = routed->offsets[t]; s < routed->offsets[t + 1]; s++) {
            int position = next[routed->expert[s]]++;
            sorted_slot[position] = s;
            sorted_token[position] = t;
        }
    *expert_offsets_out = expert_offsets;
    *sorted_slot_out = sorted_slot;
    *sorted_token_out = sorted_token;
    return CM_OK;
}

/* The slots' rows through their experts: [S,D] in dispatch order. The
 * exchanged ones travel to their experts' ranks and back; the shadowed ones
 * (parallel/shadow.h) stay here. */
static ag_tensor *run_experts(ag_ctx *ctx, const moe_layer *moe, const router_call *call,
                              ag_tensor *x, const int32_t *expert_offsets,
                              const int32_t *sorted_token, int S, int *shadowed_experts) {
    const moe_config *c = &moe->config;
    moe_shadow_plan shadow;
    exchange_plan plan = {0};
    cm_status status = moe_plan_shadow(ctx, moe, expert_offsets, sorted_token, S, &shadow);
    if (status == CM_OK)
        status = plan_exchange(ctx, moe, shadow.exchange_offsets, shadow.all_counts, &plan);
    if (status != CM_OK) {
        ctx->status = status;
        return NULL;
    }
    mark_used_experts(moe, &plan);
    moe_mark_shadowed(moe, &shadow);
    *shadowed_experts = shadow.set.count;
    const dropout_job *draws = NULL;
    if (call->training && c->expert_dropout > 0.0f) {
        draws =
            expert_dropout_draws(ctx, moe, call, shadow.exchange_token, shadow.exchanged, &plan);
        if (!draws) return NULL;
    }
    ag_tensor *xs = ag_gather_rows(ctx, x, shadow.exchange_token, shadow.exchanged);
    /* Rows for the experts here, expert-major: [R,D]. */
    ag_tensor *mine = to_experts(ctx, moe, xs, &plan);
    moe_expert_weights weights = own_weights(moe);
    ag_tensor *y = expert_products(ctx, c, mine, &weights, plan.local_offsets, draws);
    y = from_experts(ctx, moe, y, &plan); /* back home, in dispatch order */
    if (shadow.set.count == 0) return y;
    return add_shadow_rows(ctx, moe, call, x, y, &shadow, S);
}

cm_status moe_forward(ag_ctx *ctx, const moe_layer *moe, ag_tensor *x, const router_call *call,
                      moe_result *result) {
    memset(result, 0, sizeof *result);
    if (ag_failed(ctx) || !x) return ag_failed(ctx) ? ag_ctx_status(ctx) : CM_ERR_INTERNAL;
    const int T = x->shape[0], E = moe->config.router.num_experts;
    router_output routed;
    CM_TRY(router_route(ctx, &moe->router, x, call, &routed));
    CM_TRY(moe_apply_groups(ctx, moe, &routed));
    const int S = routed.n_slots;
    int32_t *expert_offsets = NULL, *sorted_slot = NULL, *sorted_token = NULL;
    CM_TRY(sort_slots(ctx, &routed, T, E, &expert_offsets, &sorted_slot, &sorted_token));
    ag_tensor *y =
        run_experts(ctx, moe, call, x, expert_offsets, sorted_token, S, &result->shadowed_experts);
    if (!y) return ag_failed(ctx) ? ag_ctx_status(ctx) : CM_ERR_INTERNAL;
    ag_tensor *gates = ag_gather_elements(ctx, routed.gates, sorted_slot, S);
    result->out = ag_scatter_add_rows_scaled(ctx, y, gates, sorted_token, T);
    result->aux_loss = routed.aux_loss;
    result->stats = routed.stats;
    result->n_slots = S;
    result->offsets = routed.offsets;
    result->expert = routed.expert;
    result->gates = routed.gates ? routed.gates->data : NULL;
    result->logits = routed.logits;
    return ag_ctx_status(ctx);
}
