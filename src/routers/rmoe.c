/* RMoE: the layerwise recurrent router (Qiu et al. 2024; METHODS.md 9.2).
 *
 * Per token, at MoE layer l, with u the layer's input (the post-attention
 * LayerNorm output the experts see):
 *   x' = W1_l u                        PREFIX.proj_weight [H_r,D], no bias
 *   h_l = GRU(x', h_{l-1})             router_gru.* shared by every MoE layer,
 *                                      PyTorch's GRUCell (ag_gru_cell);
 *                                      h_0 = 0 at the first MoE layer
 *   logits = W2_l h_l                  PREFIX.weight [E,H_r], no bias
 * then top-k on those logits exactly as the learned top-k router (either
 * router.gating; the release renormalises, topk_softmax), with its Switch
 * loss, z-loss and fixed logit noise. h_l replaces the state in
 * router_call.depth for the next MoE layer. With router.rnn_state carry
 * (the release) the state keeps its gradient, so every later layer's gates
 * reach the earlier layers' W1 and the GRU through the recurrence;
 * detach passes the values only, zero passes zero (recurrence off).
 *
 * Initialisation: every weight and bias, the GRU's included, normal(0,
 * router.init_std) (the release applies Megatron's init_method to every GRU
 * parameter). The GRU is declared by the first RMoE router and found by
 * name by the others, so there is one copy whatever the number of layers. */
#include <stdio.h>
#include <string.h>

#include "common/check.h"
#include "routers/router_internal.h"

cm_status router_rmoe_validate(const router_config *config) {
    if (config->rnn_hidden < 1)
        return CM_ERR(CM_ERR_INVALID, "router.rnn_hidden = %d must be >= 1 (rmoe)",
                      config->rnn_hidden);
    if (config->rnn_state < 0 || config->rnn_state >= ROUTER_RNN_STATE_COUNT)
        return CM_ERR(CM_ERR_INVALID, "router.rnn_state %d is not a state mode",
                      (int)config->rnn_state);
    if (config->bias)
        return CM_ERR(CM_ERR_INVALID,
                      "router.bias: rmoe's projections have no bias (set router.bias: false)");
    if (config->noise == ROUTER_NOISE_LEARNED)
        return CM_ERR(CM_ERR_INVALID, "router.noise = learned is not available with rmoe");
    return CM_OK;
}

/* The shared GRU parameter NAME [rows(,cols)]: declared by the first router
 * that asks, found by later ones (which must agree on the shape). */
static cm_status shared_param(ag_params *params, const char *name, int ndim, const int *shape,
                              float init_std, ag_param **out) {
    ag_param *found = ag_params_find(params, name);
    if (!found)
        return ag_params_declare(params, name, AG_GROUP_DENSE, ndim, shape,
                                 (ag_init){AG_INIT_NORMAL, 0.0f, init_std}, out);
    bool same = found->tensor.ndim == ndim && found->group == AG_GROUP_DENSE;
    for (int i = 0; same && i < ndim; i++) same = found->tensor.shape[i] == shape[i];
    if (!same) return CM_ERR(CM_ERR_INVALID, "%s is already declared with another shape", name);
    *out = found;
    return CM_OK;
}

cm_status router_rmoe_declare(router *r, int d_model, ag_params *params, const char *prefix) {
    const int hidden = r->config.rnn_hidden, experts = r->config.num_experts;
    const float std = r->config.init_std;
    const ag_init normal = {AG_INIT_NORMAL, 0.0f, std};
    char full[AG_PARAM_NAME_MAX];
    snprintf(full, sizeof full, "%s.proj_weight", prefix);
    CM_TRY(ag_params_declare(params, full, AG_GROUP_DENSE, 2, (int[]){hidden, d_model}, normal,
                             &r->proj_weight));
    snprintf(full, sizeof full, "%s.weight", prefix);
    CM_TRY(ag_params_declare(params, full, AG_GROUP_DENSE, 2, (int[]){experts, hidden}, normal,
                             &r->weight));
    const int matrix[2] = {3 * hidden, hidden};
    CM_TRY(shared_param(params, "router_gru.weight_ih", 2, matrix, std, &r->gru_weight_ih));
    CM_TRY(shared_param(params, "router_gru.weight_hh", 2, matrix, std, &r->gru_weight_hh));
    CM_TRY(shared_param(params, "router_gru.bias_ih", 1, matrix, std, &r->gru_bias_ih));
    return shared_param(params, "router_gru.bias_hh", 1, matrix, std, &r->gru_bias_hh);
}

/* h_{l-1} [T,H_r] as router.rnn_state says: the carried state, its values
 * without gradient, or zero (also before the first MoE layer). */
static ag_tensor *previous_state(ag_ctx *ctx, const router *r, const router_call *call,
                                 int tokens) {
    const int shape[2] = {tokens, r->config.rnn_hidden};
    ag_tensor *h = call->depth ? call->depth->h : NULL;
    if (!h || r->config.rnn_state == ROUTER_RNN_ZERO) return ag_zeros(ctx, "rmoe_state", 2, shape);
    CM_ASSERT(h->ndim == 2 && h->shape[0] == tokens && h->shape[1] == shape[1],
              "rmoe: the carried state has %d rows and %d columns, the layer needs [%d,%d]",
              h->shape[0], h->ndim > 1 ? h->shape[1] : 1, tokens, shape[1]);
    if (r->config.rnn_state == ROUTER_RNN_CARRY) return h;
    ag_tensor *values = ag_empty(ctx, "rmoe_state", 2, shape);
    if (values) memcpy(values->data, h->data, (size_t)h->numel * sizeof(float));
    return values;
}

cm_status router_rmoe_route(ag_ctx *ctx, const router *r, ag_tensor *x, const router_call *call,
                            router_output *out) {
    const router_config *config = &r->config;
    ag_tensor *input = ag_linear(ctx, x, ag_param_tensor(r->proj_weight), NULL); /* [T,H_r] */
    ag_tensor *h = previous_state(ctx, r, call, (int)ag_rows(x));
    ag_tensor *gi =
        ag_linear(ctx, input, ag_param_tensor(r->gru_weight_ih), ag_param_tensor(r->gru_bias_ih));
    ag_tensor *gh =
        ag_linear(ctx, h, ag_param_tensor(r->gru_weight_hh), ag_param_tensor(r->gru_bias_hh));
    ag_tensor *state = ag_gru_cell(ctx, gi, gh, h);
    if (!state) return ag_ctx_status(ctx);
    if (call->depth) call->depth->h = state;
    const router_topk_args args = {config->gating, config->aux_loss_coef, config->z_loss_coef, NULL,
                                   NULL};
    /* router_logits reads PREFIX.weight [E,H_r] on the state. */
    return router_topk_select(ctx, r, state, call, &args, out);
}
