#include "routers/router.h"

#include <assert.h>
#include <stdio.h>

#include "routers/router_internal.h"

#define NAME_COUNT(names) (sizeof names / sizeof names[0] - 1)

const char *const router_kind_names[] = {"topk",  "smoe_dropout",  "thor",
                                         "top_p", "expert_choice", NULL};
const char *const router_gating_names[] = {"softmax_topk", "topk_softmax", NULL};
const char *const router_drop_policy_names[] = {"probability", "position", NULL};
const char *const router_thor_level_names[] = {"per_token", "per_sequence", NULL};
static_assert(NAME_COUNT(router_kind_names) == ROUTER_KIND_COUNT, "router_kind_names");
static_assert(NAME_COUNT(router_gating_names) == ROUTER_GATING_COUNT, "router_gating_names");
static_assert(NAME_COUNT(router_drop_policy_names) == ROUTER_DROP_POLICY_COUNT,
              "router_drop_policy_names");
static_assert(NAME_COUNT(router_thor_level_names) == ROUTER_THOR_LEVEL_COUNT,
              "router_thor_level_names");

const char *router_kind_name(router_kind kind) {
    return kind >= 0 && kind < ROUTER_KIND_COUNT ? router_kind_names[kind] : "?";
}

cm_status router_declare(router *r, const router_config *config, int layer, int d_model,
                         ag_params *params, const char *prefix) {
    const router_config *c = config;
    const char *name = router_kind_name(c->kind);
    if (c->num_experts < 1)
        return CM_ERR(CM_ERR_INVALID, "moe.num_experts = %d must be >= 1", c->num_experts);
    bool uses_k = c->kind == ROUTER_TOPK || c->kind == ROUTER_SMOE_DROPOUT;
    if (uses_k && (c->k < 1 || c->k > c->num_experts))
        return CM_ERR(CM_ERR_INVALID, "router.k = %d must be in [1, moe.num_experts = %d] (%s)",
                      c->k, c->num_experts, name);
    if (c->kind == ROUTER_SMOE_DROPOUT) {
        const router_k_schedule *s = &c->k_schedule;
        if (s->k_min < 1 || s->k_max > c->num_experts || s->k_min > s->k_max)
            return CM_ERR(CM_ERR_INVALID,
                          "router k schedule [%d, %d] must satisfy 1 <= k_min <= k_max <= "
                          "moe.num_experts = %d",
                          s->k_min, s->k_max, c->num_experts);
        CM_TRY(router_k_schedule_check(s));
    }
    if (c->kind == ROUTER_TOP_P && !(c->top_p > 0.0f && c->top_p <= 1.0f))
        return CM_ERR(CM_ERR_INVALID, "router.top_p = %g must be in (0, 1]", (double)c->top_p);
    if (c->kind == ROUTER_EXPERT_CHOICE && !(c->capacity_factor > 0.0f))
        return CM_ERR(CM_ERR_INVALID, "expert choice needs router.capacity_factor > 0");
    if (c->capacity_factor < 0.0f)
        return CM_ERR(CM_ERR_INVALID, "router.capacity_factor = %g must be >= 0",
                      (double)c->capacity_factor);
    *r = (router){.config = *c, .layer = layer};
    if (c->kind == ROUTER_THOR) return CM_OK; /* no router network */

    char full[AG_PARAM_NAME_MAX];
    snprintf(full, sizeof full, "%s.weight", prefix);
    CM_TRY(ag_params_declare(params, full, AG_GROUP_DENSE, 2, (int[]){c->num_experts, d_model},
                             (ag_init){AG_INIT_NORMAL, 0.0f, c->init_std}, &r->weight));
    if (c->bias) {
        snprintf(full, sizeof full, "%s.bias", prefix);
        CM_TRY(ag_params_declare(params, full, AG_GROUP_DENSE, 1, (int[]){c->num_experts},
                                 (ag_init){AG_INIT_ZERO, 0.0f, 0.0f}, &r->bias));
    }
    if (c->kind == ROUTER_SMOE_DROPOUT) {
        /* SMoE-Dropout's router is random and never trained. */
        ag_param_set_frozen(r->weight, true);
        if (r->bias) ag_param_set_frozen(r->bias, true);
    }
    return CM_OK;
}

int router_effective_k(const router *r, const router_call *call) {
    if (call->k_override > 0) return call->k_override;
    if (r->config.kind == ROUTER_SMOE_DROPOUT && call->training)
        return router_k_at(&r->config.k_schedule, (int64_t)call->step);
    return r->config.k;
}

cm_status router_route(ag_ctx *ctx, const router *r, ag_tensor *x, const router_call *call,
                       router_output *out) {
    if (ag_failed(ctx)) return ag_ctx_status(ctx);
    if (call->k_override > r->config.num_experts)
        return CM_ERR(CM_ERR_INVALID, "router.k = %d exceeds moe.num_experts = %d",
                      call->k_override, r->config.num_experts);
    switch (r->config.kind) {
    case ROUTER_TOPK:
    case ROUTER_SMOE_DROPOUT:
        return router_route_topk(ctx, r, x, call, out);
    case ROUTER_THOR:
        return router_route_thor(ctx, r, x, call, out);
    case ROUTER_TOP_P:
        return router_route_top_p(ctx, r, x, call, out);
    case ROUTER_EXPERT_CHOICE:
        return router_route_expert_choice(ctx, r, x, call, out);
    case ROUTER_KIND_COUNT:
        break;
    }
    return CM_ERR(CM_ERR_INTERNAL, "unknown router kind %d", (int)r->config.kind);
}
