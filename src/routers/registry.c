/* The routing methods, one row each (see router_method in router.h); each
 * method's validate and route functions live in its own file. */
#include <assert.h>
#include <stddef.h>

#include "common/check.h"
#include "routers/router_internal.h"

const char *const router_kind_names[] = {"topk",         "smoe_dropout",  "thor",
                                         "top_p",        "expert_choice", "null_experts",
                                         "bias_balance", "rmoe",          NULL};
static_assert(sizeof router_kind_names / sizeof router_kind_names[0] == ROUTER_KIND_COUNT + 1,
              "router_kind_names out of sync with router_kind");

static const router_method methods[ROUTER_KIND_COUNT] = {
    /* learned top-k: softmax-then-topK or topK-then-softmax, noise, Switch
     * and z-losses (topk.c) */
    [ROUTER_TOPK] = {.kind = ROUTER_TOPK,
                     .name = "topk",
                     .uses_k = true,
                     .passes_per_step = 1,
                     .has_weights = true,
                     .route = router_topk_route},
    /* SMoE-Dropout: a frozen random top-k router, k on a schedule
     * (smoe_dropout.c) */
    [ROUTER_SMOE_DROPOUT] = {.kind = ROUTER_SMOE_DROPOUT,
                             .name = "smoe_dropout",
                             .uses_k = true,
                             .k_scheduled = true,
                             .passes_per_step = 1,
                             .has_weights = true,
                             .frozen_weights = true,
                             .validate = router_smoe_dropout_validate,
                             .route = router_smoe_dropout_route},
    /* THOR: random experts, no weights, two passes tied by a consistency
     * loss (thor.c) */
    [ROUTER_THOR] = {.kind = ROUTER_THOR,
                     .name = "thor",
                     .passes_per_step = 2,
                     .pass_consistency = true,
                     .route = router_thor_route},
    /* dynamic top-p with entropy and load-balancing losses (top_p.c) */
    [ROUTER_TOP_P] = {.kind = ROUTER_TOP_P,
                      .name = "top_p",
                      .passes_per_step = 1,
                      .has_weights = true,
                      .validate = router_top_p_validate,
                      .route = router_top_p_route},
    /* expert choice: each expert takes its top-c tokens (expert_choice.c) */
    [ROUTER_EXPERT_CHOICE] = {.kind = ROUTER_EXPERT_CHOICE,
                              .name = "expert_choice",
                              .passes_per_step = 1,
                              .has_weights = true,
                              .validate = router_expert_choice_validate,
                              .route = router_expert_choice_route},
    /* AdaMoE: top-k among E true and m null experts; nulls output zero and
     * never become slots (null_experts.c) */
    [ROUTER_NULL_EXPERTS] = {.kind = ROUTER_NULL_EXPERTS,
                             .name = "null_experts",
                             .uses_k = true,
                             .passes_per_step = 1,
                             .has_weights = true,
                             .null_experts = true,
                             .validate = router_null_experts_validate,
                             .declare = router_null_experts_declare,
                             .route = router_null_experts_route},
    /* auxiliary-loss-free balancing: top-k chosen with a per-expert bias
     * updated once per optimizer step (bias_balance.c) */
    [ROUTER_BIAS_BALANCE] = {.kind = ROUTER_BIAS_BALANCE,
                             .name = "bias_balance",
                             .uses_k = true,
                             .passes_per_step = 1,
                             .has_weights = true,
                             .validate = router_bias_balance_validate,
                             .declare = router_bias_balance_declare,
                             .update = router_bias_balance_update,
                             .route = router_bias_balance_route},
    /* RMoE: a GRU shared by the MoE layers carries a per-token state along
     * the depth; top-k on logits read from it (rmoe.c) */
    [ROUTER_RMOE] = {.kind = ROUTER_RMOE,
                     .name = "rmoe",
                     .uses_k = true,
                     .passes_per_step = 1,
                     .validate = router_rmoe_validate,
                     .declare = router_rmoe_declare,
                     .route = router_rmoe_route},
};

const router_method *router_method_of(router_kind kind) {
    return kind >= 0 && kind < ROUTER_KIND_COUNT ? &methods[kind] : NULL;
}

const char *router_kind_name(router_kind kind) {
    return kind >= 0 && kind < ROUTER_KIND_COUNT ? router_kind_names[kind] : "?";
}

static const router_method *method_of_config(const router_config *config) {
    const router_method *method = router_method_of(config->kind);
    CM_ASSERT(method, "router kind %d is not in the registry", (int)config->kind);
    return method;
}

int router_passes_per_step(const router_config *config) {
    return method_of_config(config)->passes_per_step;
}

float router_pass_consistency(const router_config *config) {
    return method_of_config(config)->pass_consistency ? config->consistency_alpha : 0.0f;
}

bool router_uses_k(const router_config *config) {
    return method_of_config(config)->uses_k;
}

int router_choices(const router_config *config) {
    return config->num_experts +
           (method_of_config(config)->null_experts ? config->null_experts : 0);
}

bool router_updates_per_step(const router_config *config) {
    return method_of_config(config)->update != NULL;
}
