/* Cross-key checks: rules that no single key's range can express (d_model
 * divisible by n_heads, router.k at most moe.num_experts, ...). They run once,
 * on the resolved recipe, after every file and override. Each failing rule
 * names every key that takes part in it; recipe.c reports the error at
 * whichever of those was set last, since that is the edit that broke the
 * recipe. The moe and router rules apply only with moe.enabled: a dense
 * recipe ignores those sections (docs/recipes.md). The LM's moe and router
 * rules do not apply to model.arch resnet, which reads only moe.enabled,
 * moe.num_experts and moe.cnn_routing. */
#include "train/recipe_internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "common/check.h"

/* Records the keys ("section.key", NULL-terminated list) in `involved` and
 * returns false, the value recipe_check_consistency returns on failure. */
static bool involve(int involved[RECIPE_MAX_INVOLVED], ...) {
    va_list args;
    va_start(args, involved);
    int count = 0;
    for (const char *path = va_arg(args, const char *); path; path = va_arg(args, const char *)) {
        CM_ASSERT(count < RECIPE_MAX_INVOLVED, "too many keys in one cross-key check");
        const char *dot = strchr(path, '.');
        char section[32];
        snprintf(section, sizeof section, "%.*s", (int)(dot - path), path);
        involved[count] = recipe_find_key(section, dot + 1);
        CM_ASSERT(involved[count] >= 0, "cross-key check names the unknown key %s", path);
        count++;
    }
    va_end(args);
    return false;
}

static bool check_base(const cm_recipe *recipe, int involved[RECIPE_MAX_INVOLVED], char *why,
                       size_t why_capacity) {
    const cm_model_cfg *model = &recipe->model;
    if (model->d_model % model->n_heads != 0) {
        snprintf(why, why_capacity, "model.d_model = %d is not divisible by model.n_heads = %d",
                 model->d_model, model->n_heads);
        return involve(involved, "model.d_model", "model.n_heads", NULL);
    }
    if (recipe->data.format == CM_DATA_TEXT && model->vocab_size < 256) {
        snprintf(why, why_capacity,
                 "model.vocab_size = %d is too small for data.format text (bytes need 256)",
                 model->vocab_size);
        return involve(involved, "model.vocab_size", "data.format", NULL);
    }
    if (recipe->schedule.type == OPTIM_LR_COSINE && recipe->schedule.min_lr > recipe->optim.lr) {
        snprintf(why, why_capacity, "schedule.min_lr = %g is above optim.lr = %g",
                 recipe->schedule.min_lr, recipe->optim.lr);
        return involve(involved, "schedule.min_lr", "optim.lr", "schedule.type", NULL);
    }
    if (recipe->schedule.warmup_steps > recipe->train.steps) {
        snprintf(why, why_capacity, "schedule.warmup_steps = %lld exceeds train.steps = %lld",
                 (long long)recipe->schedule.warmup_steps, (long long)recipe->train.steps);
        return involve(involved, "schedule.warmup_steps", "train.steps", NULL);
    }
    if (recipe->optim.nesterov &&
        (recipe->optim.type != OPTIM_SGD || recipe->optim.momentum <= 0)) {
        snprintf(why, why_capacity, "optim.nesterov needs optim.type sgd and optim.momentum > 0");
        return involve(involved, "optim.nesterov", "optim.momentum", "optim.type", NULL);
    }
    return true;
}

/* Null experts: k and eval_k count the null experts too; no logit noise. */
static bool check_null_experts(const cm_recipe *recipe, int involved[RECIPE_MAX_INVOLVED],
                               char *why, size_t why_capacity) {
    const cm_router_cfg *rc = &recipe->router;
    const int experts = recipe->moe.num_experts, choices = experts + rc->null_experts;
    if (rc->k > choices || rc->eval_k > choices) {
        const bool eval = rc->k <= choices;
        snprintf(why, why_capacity,
                 "router.%s = %d exceeds moe.num_experts + router.null_experts = %d (router.type "
                 "null_experts)",
                 eval ? "eval_k" : "k", eval ? rc->eval_k : rc->k, choices);
        return involve(involved, eval ? "router.eval_k" : "router.k", "moe.num_experts",
                       "router.null_experts", "router.type", "moe.enabled", NULL);
    }
    if (rc->noise != ROUTER_NOISE_NONE) {
        snprintf(why, why_capacity, "router.type null_experts routes without logit noise");
        return involve(involved, "router.noise", "router.type", "moe.enabled", NULL);
    }
    return true;
}

/* Only called with moe.enabled, so moe.enabled takes part in every rule: a
 * recipe that turns MoE on last is blamed for the contradiction it exposes. */
/* SMoE-Dropout's k schedule: k_min <= k_max <= num_experts (k_max 0: all). */
static bool check_k_schedule(const cm_recipe *recipe, const router_method *method,
                             int involved[RECIPE_MAX_INVOLVED], char *why, size_t why_capacity) {
    const cm_router_cfg *rc = &recipe->router;
    const int experts = recipe->moe.num_experts;
    if (rc->k_max > experts) {
        snprintf(why, why_capacity,
                 "router.k_max = %d exceeds moe.num_experts = %d (router.type %s)", rc->k_max,
                 experts, method->name);
        return involve(involved, "router.k_max", "moe.num_experts", "router.type", "moe.enabled",
                       NULL);
    }
    int k_max = rc->k_max > 0 ? rc->k_max : experts;
    if (rc->k_min > k_max) {
        if (rc->k_max > 0)
            snprintf(why, why_capacity,
                     "router.k_min = %d is above router.k_max = %d (router.type %s)", rc->k_min,
                     rc->k_max, method->name);
        else
            snprintf(why, why_capacity,
                     "router.k_min = %d is above router.k_max (0: moe.num_experts = %d; "
                     "router.type %s)",
                     rc->k_min, experts, method->name);
        return involve(involved, "router.k_min", "router.k_max", "moe.num_experts", "router.type",
                       "moe.enabled", NULL);
    }
    return true;
}

static bool check_moe(const cm_recipe *recipe, int involved[RECIPE_MAX_INVOLVED], char *why,
                      size_t why_capacity) {
    const cm_moe_cfg *moe = &recipe->moe;
    const cm_router_cfg *rc = &recipe->router;
    const int experts = moe->num_experts, d_ff = recipe->model.d_ff;
    if (moe->split_dense && d_ff % experts != 0) {
        snprintf(why, why_capacity,
                 "moe.split_dense needs model.d_ff = %d to be divisible by moe.num_experts = %d",
                 d_ff, experts);
        return involve(involved, "moe.split_dense", "model.d_ff", "moe.num_experts", "moe.enabled",
                       NULL);
    }
    if (moe->split_dense && moe->expert_hidden != 0 && moe->expert_hidden != d_ff / experts) {
        snprintf(why, why_capacity,
                 "moe.expert_hidden = %d contradicts moe.split_dense (model.d_ff / "
                 "moe.num_experts = %d); set expert_hidden to 0 or split_dense to false",
                 moe->expert_hidden, d_ff / experts);
        return involve(involved, "moe.expert_hidden", "moe.split_dense", "model.d_ff",
                       "moe.num_experts", "moe.enabled", NULL);
    }
    if (moe->merged && recipe->model.arch != CM_ARCH_TRANSFORMER_LM) {
        snprintf(why, why_capacity, "moe.merged (group tables) is for model.arch transformer_lm");
        return involve(involved, "moe.merged", "model.arch", "moe.enabled", NULL);
    }
    /* The method's registry row says which router keys it reads. */
    const router_method *method = router_method_of(rc->type);
    CM_ASSERT(method, "router.type holds %d, not a router kind", (int)rc->type);
    if (method->null_experts) return check_null_experts(recipe, involved, why, why_capacity);
    if (method->uses_k && rc->k > experts) {
        snprintf(why, why_capacity, "router.k = %d exceeds moe.num_experts = %d (router.type %s)",
                 rc->k, experts, method->name);
        return involve(involved, "router.k", "moe.num_experts", "router.type", "moe.enabled", NULL);
    }
    if (rc->eval_k > experts) {
        snprintf(why, why_capacity, "router.eval_k = %d exceeds moe.num_experts = %d", rc->eval_k,
                 experts);
        return involve(involved, "router.eval_k", "moe.num_experts", "moe.enabled", NULL);
    }
    if (method->k_scheduled && !check_k_schedule(recipe, method, involved, why, why_capacity))
        return false;
    if (rc->type == ROUTER_RMOE && (rc->bias || rc->noise == ROUTER_NOISE_LEARNED)) {
        snprintf(why, why_capacity,
                 "router.type rmoe has no router bias and no learned noise (its projections are "
                 "bias-free, METHODS.md 9.2): set router.bias: false and router.noise: none or "
                 "fixed");
        return involve(involved, rc->bias ? "router.bias" : "router.noise", "router.type",
                       "moe.enabled", NULL);
    }
    if (rc->noise == ROUTER_NOISE_LEARNED && (!method->has_weights || method->frozen_weights)) {
        snprintf(why, why_capacity,
                 "router.noise learned needs a trained router network (router.type %s has none)",
                 method->name);
        return involve(involved, "router.noise", "router.type", "moe.enabled", NULL);
    }
    if (rc->type == ROUTER_EXPERT_CHOICE && rc->capacity_factor <= 0) {
        snprintf(why, why_capacity,
                 "router.type expert_choice needs router.capacity_factor > 0 (each expert "
                 "takes T * capacity_factor / num_experts tokens; 2 is the usual value)");
        return involve(involved, "router.capacity_factor", "router.type", "moe.enabled", NULL);
    }
    return true;
}

/* train.recompute: what this build can make again in backward. */
static bool check_recompute(const cm_recipe *recipe, int involved[RECIPE_MAX_INVOLVED], char *why,
                            size_t why_capacity) {
    /* (model.arch resnet ignores it, like the LM's other keys; all needs no
     * MoE layer: it checkpoints the dense blocks too) */
    if (recipe->train.recompute == CM_RECOMPUTE_EXPERTS &&
        recipe->model.arch == CM_ARCH_TRANSFORMER_LM && !recipe->moe.enabled) {
        snprintf(why, why_capacity,
                 "train.recompute experts needs moe.enabled: true (a dense model has no expert "
                 "layer to recompute)");
        return involve(involved, "train.recompute", "moe.enabled", NULL);
    }
    return true;
}

/* The image classifier: its data format, and what adversarial.mode needs. */
static bool check_resnet(const cm_recipe *recipe, int involved[RECIPE_MAX_INVOLVED], char *why,
                         size_t why_capacity) {
    if (recipe->data.format != CM_DATA_IDX) {
        snprintf(why, why_capacity, "model.arch resnet needs data.format idx (images)");
        return involve(involved, "data.format", "model.arch", NULL);
    }
    if (recipe->moe.enabled && recipe->moe.num_experts > 64) {
        snprintf(why, why_capacity, "moe.num_experts = %d is above 64, the MoE-CNN's limit",
                 recipe->moe.num_experts);
        return involve(involved, "moe.num_experts", "moe.enabled", "model.arch", NULL);
    }
    if (recipe->adversarial.mode == ADV_MODE_ADVMOE &&
        (!recipe->moe.enabled || recipe->moe.num_experts < 2)) {
        snprintf(why, why_capacity,
                 "adversarial.mode advmoe needs moe.enabled: true and moe.num_experts >= 2 "
                 "(it alternates expert and router steps)");
        return involve(involved, "adversarial.mode", "moe.enabled", "moe.num_experts", NULL);
    }
    return true;
}

bool recipe_check_consistency(const cm_recipe *recipe, int involved[RECIPE_MAX_INVOLVED], char *why,
                              size_t why_capacity) {
    for (int i = 0; i < RECIPE_MAX_INVOLVED; i++) involved[i] = -1;
    if (!check_base(recipe, involved, why, why_capacity)) return false;
    if (!check_recompute(recipe, involved, why, why_capacity)) return false;
    if (recipe->model.arch == CM_ARCH_RESNET)
        return check_resnet(recipe, involved, why, why_capacity);
    if (recipe->data.format != CM_DATA_TEXT) {
        snprintf(why, why_capacity, "model.arch transformer_lm needs data.format text");
        return involve(involved, "data.format", "model.arch", NULL);
    }
    if (recipe->moe.enabled && !check_moe(recipe, involved, why, why_capacity)) return false;
    return true;
}
