/* Declaring and routing through the method's registry row; the name tables
 * of the router's configuration enums. */
#include "routers/router.h"

#include <assert.h>
#include <stdio.h>

#include "common/check.h"
#include "parallel/comm.h"
#include "routers/router_internal.h"

#define NAME_COUNT(names) (sizeof names / sizeof names[0] - 1)

const char *const router_gating_names[] = {"softmax_topk", "topk_softmax", NULL};
const char *const router_drop_policy_names[] = {"probability", "position", NULL};
const char *const router_noise_names[] = {"none", "fixed", "learned", NULL};
const char *const router_aux_scope_names[] = {"global", "local", NULL};
const char *const router_thor_level_names[] = {"per_token", "per_sequence", NULL};
const char *const router_rnn_state_names[] = {"carry", "detach", "zero", NULL};
static_assert(NAME_COUNT(router_gating_names) == ROUTER_GATING_COUNT, "router_gating_names");
static_assert(NAME_COUNT(router_drop_policy_names) == ROUTER_DROP_POLICY_COUNT,
              "router_drop_policy_names");
static_assert(NAME_COUNT(router_noise_names) == ROUTER_NOISE_COUNT, "router_noise_names");
static_assert(NAME_COUNT(router_aux_scope_names) == ROUTER_AUX_SCOPE_COUNT,
              "router_aux_scope_names");
static_assert(NAME_COUNT(router_thor_level_names) == ROUTER_THOR_LEVEL_COUNT,
              "router_thor_level_names");
static_assert(NAME_COUNT(router_rnn_state_names) == ROUTER_RNN_STATE_COUNT,
              "router_rnn_state_names");

/* PREFIX.weight [E,D] (+ bias, + learned noise weight), frozen when the
 * method says so. */
static cm_status declare_weights(router *r, int d_model, ag_params *params, const char *prefix) {
    const router_config *c = &r->config;

    char full[AG_PARAM_NAME_MAX];
    snprintf(full, sizeof full, "%s.weight", prefix);
    CM_TRY(ag_params_declare(params, full, AG_GROUP_DENSE, 2, (int[]){c->num_experts, d_model},
                             (ag_init){AG_INIT_NORMAL, 0.0f, c->init_std}, &r->weight));
    if (c->bias) {
        snprintf(full, sizeof full, "%s.bias", prefix);
        CM_TRY(ag_params_declare(params, full, AG_GROUP_DENSE, 1, (int[]){c->num_experts},
                                 (ag_init){AG_INIT_ZERO, 0.0f, 0.0f}, &r->bias));
    }
    if (c->noise == ROUTER_NOISE_LEARNED) {
        /* Shazeer et al. initialise W_noise to zero: noise std softplus(0) = ln 2. */
        snprintf(full, sizeof full, "%s.noise_weight", prefix);
        CM_TRY(ag_params_declare(params, full, AG_GROUP_DENSE, 2, (int[]){c->num_experts, d_model},
                                 (ag_init){AG_INIT_ZERO, 0.0f, 0.0f}, &r->noise_weight));
    }
    if (r->method->frozen_weights) {
        ag_param_set_frozen(r->weight, true);
        if (r->bias) ag_param_set_frozen(r->bias, true);
    }
    return CM_OK;
}

cm_status router_declare(router *r, const router_config *config, int layer, int d_model,
                         ag_params *params, const char *prefix) {
    const router_method *method = router_method_of(config->kind);
    if (!method) return CM_ERR(CM_ERR_INVALID, "unknown router kind %d", (int)config->kind);
    return router_declare_with(r, method, config, layer, d_model, params, prefix);
}

cm_status router_declare_with(router *r, const router_method *method, const router_config *config,
                              int layer, int d_model, ag_params *params, const char *prefix) {
    const router_config *c = config;
    if (c->num_experts < 1)
        return CM_ERR(CM_ERR_INVALID, "moe.num_experts = %d must be >= 1", c->num_experts);
    if (method->null_experts && c->null_experts < 0)
        return CM_ERR(CM_ERR_INVALID, "router.null_experts = %d must be >= 0", c->null_experts);
    const int choices = c->num_experts + (method->null_experts ? c->null_experts : 0);
    if (method->uses_k && (c->k < 1 || c->k > choices)) {
        if (choices > c->num_experts)
            return CM_ERR(CM_ERR_INVALID,
                          "router.k = %d must be in [1, moe.num_experts + router.null_experts = "
                          "%d] (%s)",
                          c->k, choices, method->name);
        return CM_ERR(CM_ERR_INVALID, "router.k = %d must be in [1, moe.num_experts = %d] (%s)",
                      c->k, c->num_experts, method->name);
    }
    if (method->validate) CM_TRY(method->validate(c));
    if (c->capacity_factor < 0.0f)
        return CM_ERR(CM_ERR_INVALID, "router.capacity_factor = %g must be >= 0",
                      (double)c->capacity_factor);
    if (c->noise == ROUTER_NOISE_LEARNED && (!method->has_weights || method->frozen_weights))
        return CM_ERR(CM_ERR_INVALID,
                      "router.noise = learned needs a trained router network (%s has none)",
                      method->name);
    *r = (router){.config = *c, .method = method, .layer = layer};
    if (method->has_weights) CM_TRY(declare_weights(r, d_model, params, prefix));
    return method->declare ? method->declare(r, d_model, params, prefix) : CM_OK;
}

int router_effective_k(const router *r, const router_call *call) {
    if (call->k_override > 0) return call->k_override;
    if (r->method->k_scheduled && call->training)
        return router_k_at(&r->config.k_schedule, (int64_t)call->step);
    return r->config.k;
}

cm_status router_route(ag_ctx *ctx, const router *r, ag_tensor *x, const router_call *call,
                       router_output *out) {
    CM_ASSERT(r->method, "router_route: the router of layer %d was never declared", r->layer);
    if (ag_failed(ctx)) return ag_ctx_status(ctx);
    if (call->k_override > router_choices(&r->config))
        return CM_ERR(CM_ERR_INVALID, "router.k = %d exceeds the %d experts to choose among",
                      call->k_override, router_choices(&r->config));
    return r->method->route(ctx, r, x, call, out);
}

cm_status router_update_expert_biases(const router *const *routers, int n, int64_t *loads,
                                      MPI_Comm group) {
    int total = 0;
    for (int i = 0; i < n; i++) total += routers[i]->config.num_experts;
    if (group != MPI_COMM_NULL && group != (MPI_Comm)0) CM_TRY(comm_sum_int64(group, loads, total));
    for (int i = 0, at = 0; i < n; at += routers[i]->config.num_experts, i++)
        if (routers[i]->method->update) routers[i]->method->update(routers[i], loads + at);
    return CM_OK;
}
