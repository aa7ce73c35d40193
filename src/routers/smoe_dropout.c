/* SMoE-Dropout (METHODS.md 1.2): a frozen random top-k router (its weights
 * keep their init; the registry row says frozen_weights), always
 * topK-then-softmax, k from config.k_schedule in training (k_scheduled) and
 * config.k at evaluation, no auxiliary loss (a frozen router has nothing to
 * balance). The selection is topk.c's. */
#include "routers/router_internal.h"

cm_status router_smoe_dropout_validate(const router_config *config) {
    const router_k_schedule *s = &config->k_schedule;
    if (s->k_min < 1 || s->k_max > config->num_experts || s->k_min > s->k_max)
        return CM_ERR(CM_ERR_INVALID,
                      "router k schedule [%d, %d] must satisfy 1 <= k_min <= k_max <= "
                      "moe.num_experts = %d",
                      s->k_min, s->k_max, config->num_experts);
    return router_k_schedule_check(s);
}

cm_status router_smoe_dropout_route(ag_ctx *ctx, const router *r, ag_tensor *x,
                                    const router_call *call, router_output *out) {
    /* The recipe's gating and loss coefficients do not apply. */
    const router_topk_args args = {ROUTER_TOPK_THEN_SOFTMAX, 0.0f, 0.0f, NULL, NULL};
    return router_topk_select(ctx, r, x, call, &args, out);
}
