#include "train/recipe_moe.h"

#include <math.h>

#include "common/check.h"

/* The recipe enums are spelled like the router's and the layer's; the
 * switches below map them by name, so a reordering on either side cannot
 * silently change a method. */

static router_kind router_kind_of(cm_router_type type) {
    switch (type) {
    case CM_ROUTER_TOPK:
        return ROUTER_TOPK;
    case CM_ROUTER_SMOE_DROPOUT:
        return ROUTER_SMOE_DROPOUT;
    case CM_ROUTER_THOR:
        return ROUTER_THOR;
    case CM_ROUTER_TOP_P:
        return ROUTER_TOP_P;
    case CM_ROUTER_EXPERT_CHOICE:
        return ROUTER_EXPERT_CHOICE;
    case CM_ROUTER_TYPE_COUNT:
        break;
    }
    CM_ASSERT(false, "router.type holds %d, not a router type", (int)type);
}

static router_gating gating_of(cm_router_gating gating) {
    switch (gating) {
    case CM_GATING_SOFTMAX_TOPK:
        return ROUTER_SOFTMAX_THEN_TOPK;
    case CM_GATING_TOPK_SOFTMAX:
        return ROUTER_TOPK_THEN_SOFTMAX;
    case CM_GATING_COUNT:
        break;
    }
    CM_ASSERT(false, "router.gating holds %d, not a gating", (int)gating);
}

static router_drop_policy drop_policy_of(cm_drop_policy policy) {
    switch (policy) {
    case CM_DROP_PROBABILITY:
        return ROUTER_DROP_PROBABILITY;
    case CM_DROP_POSITION:
        return ROUTER_DROP_POSITION;
    case CM_DROP_POLICY_COUNT:
        break;
    }
    CM_ASSERT(false, "router.drop_policy holds %d, not a drop policy", (int)policy);
}

static router_k_mode k_mode_of(cm_k_schedule schedule) {
    switch (schedule) {
    case CM_K_CONSTANT:
        return ROUTER_K_CONSTANT;
    case CM_K_LINEAR_INCREASE:
        return ROUTER_K_LINEAR_INCREASE;
    case CM_K_COSINE_INCREASE:
        return ROUTER_K_COSINE_INCREASE;
    case CM_K_EXP_INCREASE:
        return ROUTER_K_EXP_INCREASE;
    case CM_K_MULTI_STEP_INCREASE:
        return ROUTER_K_MULTI_STEP_INCREASE;
    case CM_K_SCHEDULE_COUNT:
        break;
    }
    CM_ASSERT(false, "router.k_schedule holds %d, not a k schedule", (int)schedule);
}

static router_thor_level thor_level_of(cm_thor_level level) {
    switch (level) {
    case CM_THOR_PER_TOKEN:
        return ROUTER_THOR_PER_TOKEN;
    case CM_THOR_PER_SEQUENCE:
        return ROUTER_THOR_PER_SEQUENCE;
    case CM_THOR_LEVEL_COUNT:
        break;
    }
    CM_ASSERT(false, "router.thor_level holds %d, not a THOR level", (int)level);
}

static moe_activation activation_of(cm_moe_activation activation) {
    switch (activation) {
    case CM_MOE_GELU:
        return MOE_GELU;
    case CM_MOE_RELU:
        return MOE_RELU;
    case CM_MOE_SILU:
        return MOE_SILU;
    case CM_MOE_ACTIVATION_COUNT:
        break;
    }
    CM_ASSERT(false, "moe.activation holds %d, not an activation", (int)activation);
}

bool recipe_layer_is_moe(const cm_recipe *recipe, int layer) {
    return recipe->moe.enabled && layer % recipe->moe.every == 0;
}

int recipe_expert_hidden(const cm_recipe *recipe) {
    const cm_moe_cfg *moe = &recipe->moe;
    if (moe->expert_hidden > 0) return moe->expert_hidden;
    return moe->split_dense ? recipe->model.d_ff / moe->num_experts : recipe->model.d_ff;
}

void recipe_router_config(const cm_recipe *recipe, router_config *out) {
    const cm_router_cfg *r = &recipe->router;
    const int experts = recipe->moe.num_experts;
    *out = (router_config){
        .kind = router_kind_of(r->type),
        .num_experts = experts,
        .k = r->k,
        .gating = gating_of(r->gating),
        .bias = r->bias,
        .init_std = (float)r->init_std,
        .noisy = r->noisy,
        .noise_std = (float)r->noise_std,
        .aux_loss_coef = (float)r->aux_loss_coef,
        .z_loss_coef = (float)r->z_loss_coef,
        .top_p = (float)r->top_p,
        .entropy_coef = (float)r->entropy_coef,
        .capacity_factor = (float)r->capacity_factor,
        .drop_policy = drop_policy_of(r->drop_policy),
        .k_schedule = {.mode = k_mode_of(r->k_schedule),
                       .k_min = r->k_min,
                       .k_max = r->k_max > 0 ? r->k_max : experts,
                       .total_steps = r->k_span_steps > 0 ? r->k_span_steps : recipe->train.steps},
        .thor_level = thor_level_of(r->thor_level),
    };
}

void recipe_moe_config(const cm_recipe *recipe, moe_config *out) {
    const cm_model_cfg *model = &recipe->model;
    float init_std = (float)model->init_std;
    *out = (moe_config){
        .d_model = model->d_model,
        .hidden = recipe_expert_hidden(recipe),
        .activation = activation_of(recipe->moe.activation),
        .init_std = init_std,
        .out_std =
            model->scale_residual_init ? init_std / sqrtf(2.0f * (float)model->n_layers) : init_std,
    };
    recipe_router_config(recipe, &out->router);
}
