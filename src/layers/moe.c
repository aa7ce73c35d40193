#include "layers/moe.h"

#include <stdio.h>
#include <string.h>

static const char *const activation_names[MOE_ACTIVATION_COUNT] = {"gelu", "relu", "silu"};

const char *moe_activation_name(moe_activation activation) {
    return activation >= 0 && activation < MOE_ACTIVATION_COUNT ? activation_names[activation]
                                                                : "?";
}

cm_status moe_declare(moe_layer *moe, const moe_config *config, int layer, ag_params *params,
                      const char *prefix) {
    const moe_config *c = config;
    if (c->hidden < 1 || c->d_model < 1)
        return CM_ERR(CM_ERR_INVALID, "MoE layer %d: expert hidden size %d must be >= 1", layer,
                      c->hidden);
    *moe = (moe_layer){.config = *c, .layer = layer};
    const int E = c->router.num_experts, D = c->d_model, H = c->hidden;
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
        {"w1", &moe->w1, 3, {E, H, D}, {AG_INIT_NORMAL, 0.0f, c->init_std}},
        {"b1", &moe->b1, 2, {E, H, 0}, zero},
        {"w2", &moe->w2, 3, {E, D, H}, {AG_INIT_NORMAL, 0.0f, c->out_std}},
        {"b2", &moe->b2, 2, {E, D, 0}, zero},
    };
    for (size_t i = 0; i < sizeof tensors / sizeof tensors[0]; i++) {
        snprintf(name, sizeof name, "%s.experts.%s", prefix, tensors[i].suffix);
        CM_TRY(ag_params_declare(params, name, AG_GROUP_EXPERT, tensors[i].ndim, tensors[i].shape,
                                 tensors[i].init, tensors[i].out));
    }
    return CM_OK;
}

static ag_tensor *activate(ag_ctx *ctx, moe_activation activation, ag_tensor *h) {
    switch (activation) {
    case MOE_RELU:
        return ag_relu(ctx, h);
    case MOE_SILU:
        return ag_silu(ctx, h);
    default:
        return ag_gelu(ctx, h);
    }
}

cm_status moe_forward(ag_ctx *ctx, const moe_layer *moe, ag_tensor *x, const router_call *call,
                      moe_result *result) {
    memset(result, 0, sizeof *result);
    if (ag_failed(ctx) || !x) return ag_failed(ctx) ? ag_ctx_status(ctx) : CM_ERR_INTERNAL;
    const int T = x->shape[0], E = moe->config.router.num_experts;
    router_output routed;
    CM_TRY(router_route(ctx, &moe->router, x, call, &routed));
    const int S = routed.n_slots;

    /* Dispatch: stable counting sort of the slots by expert. sorted_slot[j]
     * is the slot at position j; expert e owns positions
     * [expert_offsets[e], expert_offsets[e+1]). */
    int32_t *expert_offsets = ag_alloc_ints(ctx, E + 1, "moe dispatch");
    int32_t *sorted_slot = ag_alloc_ints(ctx, S > 0 ? S : 1, "moe dispatch");
    int32_t *sorted_token = ag_alloc_ints(ctx, S > 0 ? S : 1, "moe dispatch");
    if (!expert_offsets || !sorted_slot || !sorted_token) return ag_ctx_status(ctx);
    memset(expert_offsets, 0, (size_t)(E + 1) * sizeof(int32_t));
    for (int s = 0; s < S; s++) expert_offsets[routed.expert[s] + 1]++;
    for (int e = 0; e < E; e++) expert_offsets[e + 1] += expert_offsets[e];
    int32_t *next = ag_alloc_ints(ctx, E, "moe dispatch");
    if (!next) return ag_ctx_status(ctx);
    memcpy(next, expert_offsets, (size_t)E * sizeof(int32_t));
    for (int t = 0; t < T; t++)
        for (int s = routed.offsets[t]; s < routed.offsets[t + 1]; s++) {
            int position = next[routed.expert[s]]++;
            sorted_slot[position] = s;
            sorted_token[position] = t;
        }

    const moe_config *c = &moe->config;
    ag_tensor *xs = ag_gather_rows(ctx, x, sorted_token, S);
    ag_tensor *h = ag_grouped_linear(ctx, xs, ag_param_tensor(moe->w1), ag_param_tensor(moe->b1),
                                     expert_offsets);
    h = activate(ctx, c->activation, h);
    ag_tensor *y = ag_grouped_linear(ctx, h, ag_param_tensor(moe->w2), ag_param_tensor(moe->b2),
                                     expert_offsets);
    ag_tensor *gates = ag_gather_elements(ctx, routed.gates, sorted_slot, S);
    ag_tensor *weighted = ag_mul(ctx, y, ag_reshape(ctx, gates, 2, (int[]){S, 1}));
    result->out = ag_scatter_add_rows(ctx, weighted, sorted_token, T);
    result->aux_loss = routed.aux_loss;
    result->stats = routed.stats;
    result->n_slots = S;
    return ag_ctx_status(ctx);
}
