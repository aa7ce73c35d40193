#include "train/recipe_moe.h"

#include <math.h>

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
        .kind = r->type,
        .num_experts = experts,
        .k = r->k,
        .gating = r->gating,
        .bias = r->bias,
        .init_std = (float)r->init_std,
        .noise = r->noise,
        .noise_std = (float)r->noise_std,
        .aux_loss_coef = (float)r->aux_loss_coef,
        .aux_loss_scope = r->aux_loss_scope,
        .z_loss_coef = (float)r->z_loss_coef,
        .top_p = (float)r->top_p,
        .entropy_coef = (float)r->entropy_coef,
        .capacity_factor = (float)r->capacity_factor,
        .drop_policy = r->drop_policy,
        .k_schedule = {.mode = r->k_schedule,
                       .k_min = r->k_min,
                       .k_max = r->k_max > 0 ? r->k_max : experts,
                       .total_steps = r->k_span_steps > 0 ? r->k_span_steps : recipe->train.steps},
        .thor_level = r->thor_level,
        .consistency_alpha = (float)r->thor_alpha,
        .null_experts = r->null_experts,
        .bias_update_rate = (float)r->bias_update_rate,
        .rnn_hidden = r->rnn_hidden,
        .rnn_state = r->rnn_state,
    };
}

void recipe_moe_config(const cm_recipe *recipe, moe_config *out) {
    const cm_model_cfg *model = &recipe->model;
    float init_std = (float)model->init_std;
    *out = (moe_config){
        .d_model = model->d_model,
        .hidden = recipe_expert_hidden(recipe),
        .activation = recipe->moe.activation,
        .expert_dropout = (float)recipe->moe.expert_dropout,
        .merged = recipe->moe.merged,
        .recompute_experts = recipe->train.recompute != CM_RECOMPUTE_NONE,
        .init_std = init_std,
        .out_std =
            model->scale_residual_init ? init_std / sqrtf(2.0f * (float)model->n_layers) : init_std,
    };
    recipe_router_config(recipe, &out->router);
}
