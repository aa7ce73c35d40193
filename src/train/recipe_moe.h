/* From a recipe's moe and router sections to the configs of the MoE layer
 * (layers/moe.h) and its router (routers/router.h).
 *
 * The recipe already holds the router's and the layer's enum values
 * (router_kind, ag_activation, ...); these functions copy fields and derive
 * the defaults that depend on other keys.
 *
 * Every function expects a recipe that recipe_load accepted (so the
 * cross-key checks hold: k <= num_experts, d_ff divisible by num_experts with
 * split_dense, ...); the router and layer re-validate their configs anyway.
 *
 * What the trainer reads straight from the recipe, with no helper:
 *   router.eval_k     -> router_call.k_override when evaluating (0: no
 *                        override, the router uses router.k).
 * Owns: nothing. */
#ifndef CMOE_TRAIN_RECIPE_MOE_H
#define CMOE_TRAIN_RECIPE_MOE_H

#include <stdbool.h>

#include "layers/moe.h"
#include "routers/router.h"
#include "train/recipe.h"

/* True when block `layer` (0-based) has an MoE layer instead of the dense
 * MLP: moe.enabled and layer % moe.every == 0 (block 0 always, when enabled). */
bool recipe_layer_is_moe(const cm_recipe *recipe, int layer);

/* Hidden width of each expert: moe.expert_hidden when > 0, else
 * model.d_ff / moe.num_experts with moe.split_dense, else model.d_ff. */
int recipe_expert_hidden(const cm_recipe *recipe);

/* Every router_config field from the router section and moe.num_experts.
 * k_schedule: mode from router.k_schedule, k_min, k_max (0 -> num_experts),
 * total_steps = router.k_span_steps, or train.steps when that is 0;
 * consistency_alpha = router.thor_alpha. The coefficients are converted to
 * float. */
void recipe_router_config(const cm_recipe *recipe, router_config *out);

/* moe_config for an MoE block: d_model, recipe_expert_hidden, the activation,
 * init_std = model.init_std for the experts' first matrix, and for the
 * second (a residual projection, like mlp.fc2) init_std / sqrt(2 n_layers)
 * with model.scale_residual_init, as the dense blocks do; router from
 * recipe_router_config; recompute_experts from train.recompute. */
void recipe_moe_config(const cm_recipe *recipe, moe_config *out);

#endif
