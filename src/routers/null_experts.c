/* AdaMoE's null experts (Zeng et al. 2024, METHODS.md 6.1).
 *
 * The router scores E true experts (PREFIX.weight [E,D]) and m null experts
 * (PREFIX.null_weight [m,D], + PREFIX.null_bias [m] with router.bias: the
 * release's second linear layer, concatenated to the gate); each token takes
 * the top-k of the E + m logits (k larger than a plain top-k's, so a token
 * can use from 0 to k true experts). A null expert outputs zero and costs
 * nothing: a chosen null is no slot at all, so it is never dispatched,
 * exchanged between ranks or computed, and stats.slots / stats.tokens is the
 * true experts per token. Gates (router.gating): topk_softmax, AdaMoE's,
 * renormalises the chosen true experts' probabilities to sum to 1 (a
 * softmax over their logits); softmax_topk keeps their probabilities over
 * all E + m.
 *
 * Load balancing (router.aux_loss_coef): the Switch loss over all E + m
 * experts, with the null experts' counts replaced by their mean (the
 * intended form of the release, exp_1; the LLaMA-Factory copy indexes the
 * wrong axis and balances every null separately): the nulls, as a group,
 * get the average load as their target without being balanced among
 * themselves. The z-loss covers all E + m logits. No logit noise (the
 * release has none). With m = 0 this is top-k exactly. */
#include <stdio.h>

#include "routers/router_internal.h"

cm_status router_null_experts_validate(const router_config *config) {
    if (config->noise != ROUTER_NOISE_NONE)
        return CM_ERR(CM_ERR_INVALID,
                      "router.noise = %s: null_experts routes without logit noise (set "
                      "router.noise: none)",
                      router_noise_names[config->noise]);
    return CM_OK;
}

cm_status router_null_experts_declare(router *r, int d_model, ag_params *params,
                                      const char *prefix) {
    const int m = r->config.null_experts;
    if (m == 0) return CM_OK;
    char full[AG_PARAM_NAME_MAX];
    snprintf(full, sizeof full, "%s.null_weight", prefix);
    CM_TRY(ag_params_declare(params, full, AG_GROUP_DENSE, 2, (int[]){m, d_model},
                             (ag_init){AG_INIT_NORMAL, 0.0f, r->config.init_std}, &r->null_weight));
    if (!r->config.bias) return CM_OK;
    snprintf(full, sizeof full, "%s.null_bias", prefix);
    return ag_params_declare(params, full, AG_GROUP_DENSE, 1, (int[]){m},
                             (ag_init){AG_INIT_ZERO, 0.0f, 0.0f}, &r->null_bias);
}

cm_status router_null_experts_route(ag_ctx *ctx, const router *r, ag_tensor *x,
                                    const router_call *call, router_output *out) {
    const router_config *config = &r->config;
    router_topk_args args = {config->gating, config->aux_loss_coef, config->z_loss_coef, NULL,
                             NULL};
    if (r->null_weight) {
        args.null_logits = ag_linear(ctx, x, ag_param_tensor(r->null_weight),
                                     r->null_bias ? ag_param_tensor(r->null_bias) : NULL);
        if (!args.null_logits) return ag_ctx_status(ctx);
    }
    return router_topk_select(ctx, r, x, call, &args, out);
}
