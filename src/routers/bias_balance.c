/* Auxiliary-loss-free load balancing (Wang et al. 2024; DeepSeek-V3;
 * Megatron-Core's expert bias; METHODS.md 12).
 *
 * Top-k routing whose choice is made on the probabilities plus a
 * per-expert bias b (PREFIX.expert_bias [E], zero at init): the chosen set
 * is the top-k of p + b, while the gates come from the unbiased scores as
 * router.gating says (topk_softmax: p_i / sum over the chosen p_j, the
 * renormalised form of METHODS.md 12.2; softmax_topk: p_i). The bias never
 * enters a gate, so it gets no gradient; it is a frozen parameter of the
 * dense group (no optimizer state, no weight decay, no clipping), saved in
 * checkpoints by name and identical on every rank.
 *
 * Once per optimizer step (after every micro-batch's backward) the trainer
 * calls router_update_expert_biases with each expert's kept tokens of the
 * step's training passes summed over the ranks and micro-batches:
 *   b_i += u sign(mean_j c_j - c_i)     (u = router.bias_update_rate)
 * with sign(0) = 0. Evaluation passes count nothing.
 *
 * Scores: the softmax probabilities, the only score function cmoe's top-k
 * has (DeepSeek-V3's gate allows softmax with the bias; Megatron allows it
 * with sigmoid scores only, which cmoe does not implement: see
 * docs/model.md). A Switch loss (router.aux_loss_coef > 0) and the z-loss
 * can be combined; the Switch loss counts the unbiased top-k, as Megatron's
 * aux losses do. */
#include <stdio.h>

#include "routers/router_internal.h"

cm_status router_bias_balance_validate(const router_config *config) {
    if (!(config->bias_update_rate >= 0.0f && config->bias_update_rate <= 1.0f))
        return CM_ERR(CM_ERR_INVALID, "router.bias_update_rate = %g must be in [0, 1]",
                      (double)config->bias_update_rate);
    return CM_OK;
}

cm_status router_bias_balance_declare(router *r, int d_model, ag_params *params,
                                      const char *prefix) {
    (void)d_model;
    char full[AG_PARAM_NAME_MAX];
    snprintf(full, sizeof full, "%s.expert_bias", prefix);
    CM_TRY(ag_params_declare(params, full, AG_GROUP_DENSE, 1, (int[]){r->config.num_experts},
                             (ag_init){AG_INIT_ZERO, 0.0f, 0.0f}, &r->expert_bias));
    ag_param_set_frozen(r->expert_bias, true);
    return CM_OK;
}

void router_bias_balance_update(const router *r, const int64_t *load) {
    const int experts = r->config.num_experts;
    const float rate = r->config.bias_update_rate;
    int64_t total = 0;
    for (int e = 0; e < experts; e++) total += load[e];
    float *bias = ag_param_tensor(r->expert_bias)->data;
    /* sign(mean - c_i) = sign(total - E c_i), in integers: exact */
    for (int e = 0; e < experts; e++) {
        const int64_t gap = total - (int64_t)experts * load[e];
        if (gap > 0)
            bias[e] += rate;
        else if (gap < 0)
            bias[e] -= rate;
    }
}

cm_status router_bias_balance_route(ag_ctx *ctx, const router *r, ag_tensor *x,
                                    const router_call *call, router_output *out) {
    const router_config *config = &r->config;
    const router_topk_args args = {config->gating, config->aux_loss_coef, config->z_loss_coef, NULL,
                                   ag_param_tensor(r->expert_bias)->data};
    return router_topk_select(ctx, r, x, call, &args, out);
}
