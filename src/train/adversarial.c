/* L-inf attacks (PGD, FGSM, TRADES / AdvMoE) and the TRADES loss; see
 * adversarial.h. */
#include "train/adversarial.h"

#include <assert.h>
#include <math.h>
#include <string.h>

#include "common/check.h"

const char *const adv_mode_names[] = {"standard", "pgd_at", "trades", "advmoe", NULL};
const char *const adv_router_objective_names[] = {"code", "paper", NULL};
static_assert(sizeof adv_mode_names / sizeof adv_mode_names[0] == ADV_MODE_COUNT + 1,
              "adv_mode_names out of sync with adv_mode");
static_assert(sizeof adv_router_objective_names / sizeof adv_router_objective_names[0] ==
                  ADV_ROUTER_OBJECTIVE_COUNT + 1,
              "adv_router_objective_names out of sync with adv_router_objective");

adv_attack_config adv_pgd_config(float epsilon, float step_size, int steps, cm_rng_key key) {
    return (adv_attack_config){.epsilon = epsilon,
                               .step_size = step_size,
                               .steps = steps,
                               .start = ADV_START_UNIFORM,
                               .objective = ADV_OBJECTIVE_CE,
                               .key = key};
}

adv_attack_config adv_fgsm_config(float epsilon) {
    return (adv_attack_config){.epsilon = epsilon,
                               .step_size = epsilon,
                               .steps = 1,
                               .start = ADV_START_NONE,
                               .objective = ADV_OBJECTIVE_CE};
}

adv_attack_config adv_trades_config(float epsilon, float step_size, int steps, float router_weight,
                                    cm_rng_key key) {
    return (adv_attack_config){.epsilon = epsilon,
                               .step_size = step_size,
                               .steps = steps,
                               .start = ADV_START_NORMAL,
                               .start_std = 0.001f,
                               .objective = ADV_OBJECTIVE_KL,
                               .router_weight = router_weight,
                               .key = key};
}

static cm_status check_config(const adv_model *model, const adv_attack_config *config,
                              const int32_t *labels) {
    if (!(config->epsilon >= 0.0f) || !(config->step_size >= 0.0f) || config->steps < 0 ||
        !(config->router_weight >= 0.0f) || !(config->start_std >= 0.0f))
        return CM_ERR(CM_ERR_INVALID,
                      "attack: epsilon (%g), step_size (%g), steps (%d), router_weight (%g) and "
                      "start_std (%g) must be >= 0",
                      (double)config->epsilon, (double)config->step_size, config->steps,
                      (double)config->router_weight, (double)config->start_std);
    if (config->objective == ADV_OBJECTIVE_CE && !labels)
        return CM_ERR(CM_ERR_INVALID, "attack: the cross-entropy objective needs labels");
    if (config->objective == ADV_OBJECTIVE_CE && config->router_weight > 0.0f &&
        model->num_experts < 1)
        return CM_ERR(CM_ERR_INVALID, "attack: a router CE term needs adv_model.num_experts");
    return CM_OK;
}

/* x_adv = x plus the configured random start. */
static void start_point(const adv_attack_config *config, const float *x, int64_t numel,
                        uint64_t first_index, float *x_adv) {
    if (config->start == ADV_START_NONE) {
        memcpy(x_adv, x, (size_t)numel * sizeof(float));
    } else if (config->start == ADV_START_UNIFORM) {
        cm_rng_fill_uniform(config->key, first_index, numel, -config->epsilon, config->epsilon,
                            x_adv);
        for (int64_t i = 0; i < numel; i++) x_adv[i] = fminf(fmaxf(x[i] + x_adv[i], 0.0f), 1.0f);
    } else {
        cm_rng_fill_normal(config->key, first_index, numel, 0.0f, config->start_std, x_adv);
        for (int64_t i = 0; i < numel; i++) x_adv[i] += x[i];
    }
}

/* log-softmax of the clean logits (classifier, then routers), no gradient. */
typedef struct clean_reference {
    ag_tensor *logp;
    int n_routers;
    ag_tensor *router_logp[ADV_MAX_ROUTERS];
} clean_reference;

static cm_status clean_forward(ag_ctx *ctx, const adv_model *model, const adv_attack_config *config,
                               ag_tensor *x, clean_reference *ref) {
    bool previous = ag_set_grad_enabled(ctx, false);
    adv_model_output out = {0};
    cm_status status = model->forward(ctx, model->model, x, config->bn_training, &out);
    if (status == CM_OK) {
        ref->logp = ag_log_softmax(ctx, out.logits);
        ref->n_routers = config->router_weight > 0.0f ? out.n_routers : 0;
        for (int r = 0; r < ref->n_routers; r++)
            ref->router_logp[r] = ag_log_softmax(ctx, out.router_logits[r]);
        status = ag_ctx_status(ctx);
    }
    ag_set_grad_enabled(ctx, previous);
    return status;
}

/* The attack objective of adversarial.h on one forward's output -> [1]. */
static ag_tensor *objective(ag_ctx *ctx, const adv_model *model, const adv_attack_config *config,
                            const adv_model_output *out, const clean_reference *ref,
                            const int32_t *labels) {
    const int batch = out->logits ? out->logits->shape[0] : 0;
    if (config->objective == ADV_OBJECTIVE_KL) {
        ag_tensor *loss = ag_kl_div(ctx, ref->logp, ag_log_softmax(ctx, out->logits));
        for (int r = 0; r < ref->n_routers && r < out->n_routers; r++) {
            ag_tensor *term =
                ag_kl_div(ctx, ref->router_logp[r], ag_log_softmax(ctx, out->router_logits[r]));
            loss = ag_add(ctx, loss, ag_scale(ctx, term, config->router_weight));
        }
        return loss;
    }
    ag_tensor *loss = ag_cross_entropy(ctx, out->logits, labels, -1);
    if (config->router_weight > 0.0f && out->n_routers > 0) {
        int32_t *route_labels = ag_alloc_ints(ctx, batch, "attack");
        if (!route_labels) return NULL;
        for (int n = 0; n < batch; n++) route_labels[n] = labels[n] % model->num_experts;
        for (int r = 0; r < out->n_routers; r++) {
            ag_tensor *term = ag_cross_entropy(ctx, out->router_logits[r], route_labels, -1);
            loss = ag_add(ctx, loss, ag_scale(ctx, term, config->router_weight));
        }
    }
    return loss;
}

/* x_adv <- clip01(clip_[x-eps, x+eps](x_adv + alpha sign(grad))); grad NULL = 0. */
static void ascend(const adv_attack_config *config, const float *x, const float *grad,
                   int64_t numel, float *x_adv) {
    const float eps = config->epsilon, alpha = config->step_size;
    for (int64_t i = 0; i < numel; i++) {
        float g = grad ? grad[i] : 0.0f;
        float sign = g > 0.0f ? 1.0f : g < 0.0f ? -1.0f : 0.0f;
        float v = x_adv[i] + alpha * sign;
        v = fminf(fmaxf(v, x[i] - eps), x[i] + eps);
        x_adv[i] = fminf(fmaxf(v, 0.0f), 1.0f);
    }
}

cm_status adv_attack(ag_ctx *ctx, const adv_model *model, const adv_attack_config *config,
                     const ag_tensor *x, const int32_t *labels, uint64_t first_index,
                     float *x_adv) {
    if (ag_failed(ctx)) return ag_ctx_status(ctx);
    CM_TRY(check_config(model, config, labels));
    const int64_t numel = x->numel;
    start_point(config, x->data, numel, first_index, x_adv);
    if (config->steps == 0) return CM_OK;

    const ag_mark base = ag_ctx_mark(ctx);
    const bool grad_mode = ag_set_grad_enabled(ctx, true);
    /* Input gradients only: parameters stop requiring a gradient meanwhile. */
    ag_params *params = model->params;
    const int n_params = params ? params->count : 0;
    bool *requires_grad =
        n_params ? ag_alloc(ctx, (size_t)n_params * sizeof(bool), "attack") : NULL;
    if (n_params && !requires_grad) {
        ag_set_grad_enabled(ctx, grad_mode);
        return ag_ctx_status(ctx);
    }
    for (int i = 0; i < n_params; i++) {
        requires_grad[i] = params->items[i]->tensor.requires_grad;
        params->items[i]->tensor.requires_grad = false;
    }

    cm_status status = CM_OK;
    clean_reference ref = {0};
    /* The model reads x but never writes it. */
    ag_tensor *clean = ag_alias(ctx, "attack_x", (float *)x->data, x->ndim, x->shape);
    if (!clean) status = ag_ctx_status(ctx);
    if (status == CM_OK && config->objective == ADV_OBJECTIVE_KL)
        status = clean_forward(ctx, model, config, clean, &ref);
    for (int step = 0; step < config->steps && status == CM_OK; step++) {
        const ag_mark iteration = ag_ctx_mark(ctx);
        ag_tensor *input = ag_alias(ctx, "x_adv", x_adv, x->ndim, x->shape);
        if (!input) {
            status = ag_ctx_status(ctx);
            break;
        }
        input->requires_grad = true;
        adv_model_output out = {0};
        status = model->forward(ctx, model->model, input, config->bn_training, &out);
        if (status == CM_OK) {
            ag_tensor *loss = objective(ctx, model, config, &out, &ref, labels);
            status = loss ? ag_backward(ctx, loss) : ag_ctx_status(ctx);
            if (status == CM_OK && !loss) status = CM_ERR(CM_ERR_INTERNAL, "attack: no loss");
        }
        if (status == CM_OK) ascend(config, x->data, input->grad, numel, x_adv);
        ag_ctx_release(ctx, iteration);
    }

    for (int i = 0; i < n_params; i++) params->items[i]->tensor.requires_grad = requires_grad[i];
    ag_ctx_release(ctx, base);
    ag_set_grad_enabled(ctx, grad_mode);
    return status;
}

ag_tensor *adv_trades_loss(ag_ctx *ctx, ag_tensor *logits_clean, ag_tensor *logits_adv,
                           const int32_t *targets, float ce_weight, float beta) {
    ag_tensor *natural = ag_cross_entropy(ctx, logits_clean, targets, -1);
    ag_tensor *robust =
        ag_kl_div(ctx, ag_log_softmax(ctx, logits_clean), ag_log_softmax(ctx, logits_adv));
    return ag_add(ctx, ag_scale(ctx, natural, ce_weight), ag_scale(ctx, robust, beta));
}

/* ---- adapters -------------------------------------------------------------- */

cm_status adv_cnn_forward(ag_ctx *ctx, void *model, ag_tensor *x, bool bn_training,
                          adv_model_output *out) {
    *out = (adv_model_output){0};
    cnn_forward_args args = {.training = bn_training};
    out->logits = cnn_forward(ctx, model, x, &args);
    if (!out->logits && !ag_failed(ctx))
        return CM_ERR(CM_ERR_INTERNAL, "adv_cnn_forward: no logits");
    return ag_ctx_status(ctx);
}

cm_status adv_moe_cnn_forward(ag_ctx *ctx, void *model, ag_tensor *x, bool bn_training,
                              adv_model_output *out) {
    const adv_moe_cnn *binding = model;
    *out = (adv_model_output){0};
    moe_cnn_forward_args args = binding->args;
    args.training = bn_training;
    ag_tensor *image = x;
    if (binding->expert_input) {
        image = binding->expert_input;
        args.router_input = x;
    }
    moe_cnn_output result;
    CM_TRY(moe_cnn_forward(ctx, binding->model, image, &args, &result));
    out->logits = result.logits;
    out->n_routers = result.n_routers;
    for (int r = 0; r < result.n_routers; r++) {
        out->router_logits[r] = result.router_logits[r];
        out->experts[r] = result.experts[r];
    }
    return CM_OK;
}

/* ---- robust evaluation -------------------------------------------------------- */

/* Correct top-1 predictions of logits [rows,V]; with `flags`, flags[i] is
 * cleared for every wrong row (and the count is of the rows still set). */
static int64_t count_correct(const ag_tensor *logits, const int32_t *labels, uint8_t *flags) {
    const int rows = logits->shape[0], V = logits->shape[1];
    int64_t correct = 0;
    for (int i = 0; i < rows; i++) {
        const float *row = logits->data + (size_t)i * (size_t)V;
        int best = 0;
        for (int v = 1; v < V; v++)
            if (row[v] > row[best]) best = v;
        if (flags) {
            flags[i] = flags[i] && best == labels[i];
            correct += flags[i];
        } else {
            correct += best == labels[i];
        }
    }
    return correct;
}

/* No-grad eval-mode forward of `images` (x's shape) -> *out. */
static cm_status eval_forward(ag_ctx *ctx, const adv_model *model, const ag_tensor *x,
                              float *images, adv_model_output *out) {
    ag_tensor *input = ag_alias(ctx, "eval_x", images, x->ndim, x->shape);
    if (!input) return ag_ctx_status(ctx);
    bool previous = ag_set_grad_enabled(ctx, false);
    cm_status status = model->forward(ctx, model->model, input, false, out);
    ag_set_grad_enabled(ctx, previous);
    return status;
}

/* E of the MoE-CNN behind an adv_moe_cnn binding. */
static int binding_experts(const adv_model *model) {
    return ((const adv_moe_cnn *)model->model)->model->config.num_experts;
}

/* Adds the experts each router chose for the `rows` images of *out to
 * per_expert[r * num_experts + e]. */
static void count_routes(const adv_model_output *out, int rows, int num_experts,
                         int64_t *per_expert) {
    for (int r = 0; r < out->n_routers; r++)
        for (int n = 0; n < rows; n++) per_expert[r * num_experts + out->experts[r][n]]++;
}

/* The same per true class: per_class[(r * num_experts + e) * classes + y]. */
static void count_class_routes(const adv_model_output *out, int rows, int num_experts,
                               const int32_t *labels, int64_t *per_class) {
    for (int r = 0; r < out->n_routers; r++)
        for (int n = 0; n < rows; n++)
            if (labels[n] >= 0 && labels[n] < ADV_EVAL_CLASSES)
                per_class[(r * num_experts + out->experts[r][n]) * ADV_EVAL_CLASSES + labels[n]]++;
}

/* Attacks x under the binding's current settings and counts the correct
 * predictions on x_adv (same settings) and, given the clean routes, the
 * images each router sends to the same expert; with `per_expert`, the images
 * each router sends to each expert (count_routes); with `flags`, clears those
 * of the images predicted wrong. Frees its arena use. */
static cm_status attacked_counts(ag_ctx *ctx, const adv_model *model,
                                 const adv_attack_config *attack, const ag_tensor *x,
                                 const int32_t *labels, uint64_t first_index, float *x_adv,
                                 const int32_t *const *clean_routes, int64_t *correct,
                                 int64_t *routes_kept, int64_t *per_expert, uint8_t *flags) {
    const ag_mark mark = ag_ctx_mark(ctx);
    adv_model_output out;
    cm_status status = adv_attack(ctx, model, attack, x, labels, first_index, x_adv);
    if (status == CM_OK) status = eval_forward(ctx, model, x, x_adv, &out);
    if (status == CM_OK) {
        *correct += count_correct(out.logits, labels, flags);
        for (int r = 0; clean_routes && r < out.n_routers; r++)
            for (int n = 0; n < x->shape[0]; n++)
                routes_kept[r] += out.experts[r][n] == clean_routes[r][n];
        if (per_expert) count_routes(&out, x->shape[0], binding_experts(model), per_expert);
    }
    ag_ctx_release(ctx, mark);
    return status;
}

/* The body of adv_moe_cnn_evaluate; the caller restores the binding and the arena. */
static cm_status evaluate_batch(ag_ctx *ctx, const adv_model *model, adv_moe_cnn *binding,
                                const adv_attack_config *attack, const ag_tensor *x,
                                const int32_t *labels, uint64_t first_index, float *x_adv,
                                adv_eval_counts *counts) {
    const int rows = x->shape[0], n_routers = moe_cnn_router_count(binding->model);
    /* The clean routes, kept past the forwards and attacks (which free what they use). */
    int32_t *clean_routes = ag_alloc_ints(ctx, (int64_t)n_routers * rows + 1, "evaluate");
    float *scratch = ag_alloc(ctx, (size_t)x->numel * sizeof(float), "evaluate");
    uint8_t *robust = ag_alloc(ctx, (size_t)rows, "evaluate"); /* correct under every attack */
    if (!clean_routes || !scratch || !robust) return ag_ctx_status(ctx);
    memset(robust, 1, (size_t)rows);
    const int32_t *routes[ADV_MAX_ROUTERS];
    const ag_mark mark = ag_ctx_mark(ctx);
    adv_model_output out;
    CM_TRY(eval_forward(ctx, model, x, x->data, &out));
    CM_ASSERT(out.n_routers == n_routers, "evaluate: %d routers, expected %d", out.n_routers,
              n_routers);
    counts->n_routers = n_routers;
    counts->num_experts = binding->model->config.num_experts;
    counts->images += rows;
    counts->clean_correct += count_correct(out.logits, labels, NULL);
    count_routes(&out, rows, counts->num_experts, counts->clean_per_expert);
    count_class_routes(&out, rows, counts->num_experts, labels, counts->clean_per_expert_class);
    for (int r = 0; r < n_routers; r++) {
        memcpy(clean_routes + (size_t)r * rows, out.experts[r], (size_t)rows * sizeof(int32_t));
        routes[r] = clean_routes + (size_t)r * rows;
    }
    ag_ctx_release(ctx, mark);
    if (!attack) return CM_OK;

    /* RA, and the routes it leaves unchanged. */
    int64_t robust_correct = 0;
    CM_TRY(attacked_counts(ctx, model, attack, x, labels, first_index, x_adv, routes,
                           &robust_correct, counts->routes_kept, counts->attacked_per_expert,
                           robust));
    counts->robust_correct += robust_correct;
    if (n_routers == 0) {
        counts->worst_correct += robust_correct;
        return CM_OK;
    }

    /* Expert RA: routes frozen to the clean ones, in the attack too. */
    adv_attack_config frozen = *attack;
    frozen.router_weight = 0.0f;
    binding->args.forced_experts = routes;
    binding->args.no_router_gradient = true;
    CM_TRY(attacked_counts(ctx, model, &frozen, x, labels, first_index, scratch, NULL,
                           &counts->expert_correct, NULL, NULL, NULL));
    binding->args.forced_experts = NULL;
    binding->args.no_router_gradient = false;

    /* Worst-case RA: the router-blind attack's images through the model as
     * it is (routes free), and only the images that survive both attacks. */
    const ag_mark blind = ag_ctx_mark(ctx);
    CM_TRY(eval_forward(ctx, model, x, scratch, &out));
    counts->worst_correct += count_correct(out.logits, labels, robust);
    ag_ctx_release(ctx, blind);

    /* Router-only RA: the router reads x_adv, the experts x. */
    if (binding->model->config.routing != MOE_CNN_ROUTING_IMAGE) return CM_OK;
    binding->expert_input = ag_alias(ctx, "eval_x", (float *)x->data, x->ndim, x->shape);
    if (!binding->expert_input) return ag_ctx_status(ctx);
    return attacked_counts(ctx, model, attack, x, labels, first_index, scratch, NULL,
                           &counts->router_only_correct, NULL, NULL, NULL);
}

cm_status adv_moe_cnn_evaluate(ag_ctx *ctx, const adv_model *model, const adv_attack_config *attack,
                               const ag_tensor *x, const int32_t *labels, uint64_t first_index,
                               float *x_adv, adv_eval_counts *counts) {
    CM_ASSERT(model->forward == adv_moe_cnn_forward,
              "adv_moe_cnn_evaluate: the model must be an adv_moe_cnn binding");
    if (ag_failed(ctx)) return ag_ctx_status(ctx);
    adv_moe_cnn *binding = model->model;
    const moe_cnn_forward_args saved_args = binding->args;
    ag_tensor *const saved_input = binding->expert_input;
    binding->args.forced_experts = NULL;
    binding->args.no_router_gradient = false;
    binding->expert_input = NULL;
    const ag_mark base = ag_ctx_mark(ctx);
    cm_status status =
        evaluate_batch(ctx, model, binding, attack, x, labels, first_index, x_adv, counts);
    binding->args = saved_args;
    binding->expert_input = saved_input;
    ag_ctx_release(ctx, base);
    return status;
}
