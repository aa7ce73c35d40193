#include "train/cnn_trainer.h"

#include "common/pool.h"
#include "train/run_common.h"

#include <cblas.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "data/idx.h"
#include "layers/moe_conv.h"
#include "optim/optim.h"
#include "train/adversarial.h"
#include "train/checkpoint.h"
#include "train/metrics.h"
#include "train/progress.h"

enum { PATH_CAPACITY = 4096, MAX_ROUTER_PARAMS = 8 * MOE_CNN_MAX_ROUTERS * 8 };

/* Attack random streams: the `layer` word of the key tells them apart. */
enum { ATTACK_TRAIN = 0, ATTACK_ROUTER = 1, ATTACK_EVAL = 2 };

struct cnn_run {
    const cm_recipe *recipe;
    char *recipe_text;
    char run_dir[PATH_CAPACITY], checkpoint_dir[PATH_CAPACITY];
    ag_params params;
    moe_cnn_model model;
    adv_moe_cnn binding; /* the model as the attack and the losses call it */
    adv_model attacked;
    ag_ctx ctx;
    bool ctx_ready;
    idx_dataset train, test;
    bool train_open, test_open;
    float *images, *adv_images; /* [B,1,H,W] */
    int32_t *labels, *route_labels;
    int height, width;
    optim_config optim;
    optim_state theta_state, router_state;
    optim_lr_schedule schedule;
    ag_param *router_params[MAX_ROUTER_PARAMS];
    int n_router_params;
    bool *saved_frozen; /* [params.count] */
};

/* ---- model and data ---------------------------------------------------------------- */

/* "32,64,128" (checked by the recipe) into widths[], returns the count. */
static int parse_widths(const char *text, int widths[CNN_MAX_STAGES]) {
    int count = 0;
    for (const char *c = text; *c && count < CNN_MAX_STAGES;) {
        widths[count++] = (int)strtol(c, (char **)&c, 10);
        if (*c == ',') c++;
    }
    return count;
}

static moe_cnn_config model_config(const cm_recipe *recipe) {
    moe_cnn_config config = moe_cnn_default_config();
    cnn_config *body = &config.body;
    body->in_channels = 1;
    body->num_classes = IDX_NUM_CLASSES;
    body->stem_channels = recipe->model.cnn_stem;
    body->n_stages = parse_widths(recipe->model.cnn_widths, body->widths);
    for (int s = 0; s < body->n_stages; s++) body->blocks[s] = recipe->model.cnn_blocks;
    body->ratio = (float)recipe->model.cnn_ratio;
    config.num_experts = recipe->moe.enabled ? recipe->moe.num_experts : 1;
    config.routing = recipe->moe.cnn_routing == CM_CNN_ROUTING_PER_LAYER ? MOE_CNN_ROUTING_PER_LAYER
                                                                         : MOE_CNN_ROUTING_IMAGE;
    return config;
}

static cm_status open_split(idx_dataset *dataset, const char *images, const char *labels,
                            const char *what) {
    cm_status status = idx_dataset_open(dataset, images, labels);
    if (status != CM_OK) return cm_error_wrap(status, "%s", what);
    return CM_OK;
}

/* Model, parameters, arena, optimizer; no data. */
static cm_status build(cnn_run *r, const cm_recipe *recipe) {
    r->recipe = recipe;
    ag_params_init(&r->params);
    size_t length = recipe_format(recipe, NULL, 0);
    r->recipe_text = malloc(length + 1);
    if (!r->recipe_text) return CM_ERR(CM_ERR_NOMEM, "out of memory");
    recipe_format(recipe, r->recipe_text, length + 1);
    CM_TRY(recipe_run_dir(recipe, r->run_dir, sizeof r->run_dir));
    CM_TRY(recipe_checkpoint_dir(recipe, r->checkpoint_dir, sizeof r->checkpoint_dir));
    moe_cnn_config config = model_config(recipe);
    cm_status status = moe_cnn_declare(&r->model, &config, &r->params, NULL);
    if (status != CM_OK) return cm_error_wrap(status, "model (model.cnn_*, moe.*)");
    CM_TRY(ag_params_finalize(&r->params, (uint64_t)recipe->train.seed));
    optim_apply_decay_policy(&r->params, recipe->optim.decay_norms, recipe->optim.decay_biases,
                             recipe->optim.decay_embeddings);
    r->n_router_params = moe_cnn_router_params(&r->model, r->router_params, MAX_ROUTER_PARAMS);
    if (r->n_router_params > MAX_ROUTER_PARAMS)
        return CM_ERR(CM_ERR_INVALID,
                      "the model has %d router parameters, more than the %d the "
                      "trainer handles",
                      r->n_router_params, MAX_ROUTER_PARAMS);
    r->saved_frozen = calloc((size_t)r->params.count, sizeof *r->saved_frozen);
    if (!r->saved_frozen) return CM_ERR(CM_ERR_NOMEM, "out of memory");
    r->binding = (adv_moe_cnn){.model = &r->model};
    r->attacked = (adv_model){.forward = adv_moe_cnn_forward,
                              .model = &r->binding,
                              .params = &r->params,
                              .num_experts = config.num_experts > 1 ? config.num_experts : 0};
    CM_TRY(ag_ctx_init(&r->ctx, (size_t)recipe->train.arena_mib << 20));
    r->ctx_ready = true;
    if (recipe->train.threads > 0) cm_pool_set_threads(recipe->train.threads);
    r->optim = run_optimizer(recipe);
    r->schedule = run_lr_schedule(recipe);
    return CM_OK;
}

static cm_status alloc_batch(cnn_run *r, int height, int width) {
    size_t batch = (size_t)r->recipe->data.batch_size;
    r->height = height;
    r->width = width;
    r->images = malloc(batch * (size_t)(height * width) * sizeof(float));
    r->adv_images = malloc(batch * (size_t)(height * width) * sizeof(float));
    r->labels = malloc(batch * sizeof(int32_t));
    r->route_labels = malloc(batch * sizeof(int32_t));
    if (!r->images || !r->adv_images || !r->labels || !r->route_labels)
        return CM_ERR(CM_ERR_NOMEM, "cannot allocate batch buffers");
    return CM_OK;
}

static void run_free(cnn_run *r) {
    free(r->recipe_text);
    free(r->images);
    free(r->adv_images);
    free(r->labels);
    free(r->route_labels);
    free(r->saved_frozen);
    if (r->ctx_ready) ag_ctx_free(&r->ctx);
    ag_params_free(&r->params);
    if (r->train_open) idx_dataset_close(&r->train);
    if (r->test_open) idx_dataset_close(&r->test);
}

/* ---- which parameters a step updates -------------------------------------------------- */

static bool is_router_param(const cnn_run *r, const ag_param *param) {
    for (int i = 0; i < r->n_router_params; i++)
        if (r->router_params[i] == param) return true;
    return false;
}

/* Freezes the routers (update_routers false: theta steps) or everything else
 * (update_routers true: phi steps); restore_frozen undoes it. */
static void freeze_for(cnn_run *r, bool update_routers) {
    for (int i = 0; i < r->params.count; i++) {
        ag_param *param = r->params.items[i];
        r->saved_frozen[i] = param->frozen;
        if (is_router_param(r, param) != update_routers) ag_param_set_frozen(param, true);
    }
}

static void restore_frozen(cnn_run *r) {
    for (int i = 0; i < r->params.count; i++)
        ag_param_set_frozen(r->params.items[i], r->saved_frozen[i]);
}

/* ---- steps ------------------------------------------------------------------------- */

static ag_tensor *batch_tensor(cnn_run *r, float *data, int rows) {
    int shape[4] = {rows, 1, r->height, r->width};
    ag_tensor *x = ag_empty(&r->ctx, "cnn_batch", 4, shape);
    if (x) memcpy(x->data, data, (size_t)x->numel * sizeof(float));
    return x;
}

static adv_attack_config train_attack(const cnn_run *r, int64_t step, uint32_t stream) {
    const cm_adversarial_cfg *a = &r->recipe->adversarial;
    ag_rng_key key = {(uint64_t)r->recipe->train.seed, (uint64_t)step, stream, AG_RNG_ATTACK};
    if (a->mode == CM_ADV_PGD_AT)
        return adv_pgd_config((float)a->eps, (float)a->step_size, a->steps, key);
    /* TRADES and AdvMoE: the routers' KL joins the attack of an MoE model. */
    return adv_trades_config((float)a->eps, (float)a->step_size, a->steps,
                             r->attacked.num_experts > 0 ? 1.0f : 0.0f, key);
}

static cm_status forward(cnn_run *r, ag_tensor *x, bool training, adv_model_output *out) {
    return adv_moe_cnn_forward(&r->ctx, &r->binding, x, training, out);
}

/* Loads the step's batch into r->images / r->labels. */
static cm_status load_batch(cnn_run *r, int64_t step) {
    const cm_recipe *recipe = r->recipe;
    const int B = recipe->data.batch_size;
    idx_augment augment = {recipe->data.augment_crop, recipe->data.augment_flip};
    return idx_dataset_batch(&r->train, (uint64_t)recipe->train.seed, (uint64_t)step, B,
                             (text_row_range){0, B}, &augment, r->images, r->labels);
}

static cm_status finish_step(cnn_run *r, int64_t step, ag_tensor *loss, optim_state *state,
                             double *loss_out) {
    CM_TRY(ag_ctx_status(&r->ctx));
    *loss_out = loss->data[0];
    if (!isfinite(*loss_out))
        return CM_ERR(CM_ERR_NUMERIC, "the loss is %g at step %lld; lower optim.lr", *loss_out,
                      (long long)step + 1);
    CM_TRY(ag_backward(&r->ctx, loss));
    if (r->recipe->optim.grad_clip > 0)
        CM_TRY(optim_clip_grad_norm(&r->params, r->recipe->optim.grad_clip, NULL));
    optim_step(&r->params, &r->optim, optim_lr_at(&r->schedule, step), state);
    return CM_OK;
}

/* The loss of standard, pgd_at and trades (and advmoe's expert step) on the
 * loaded batch; the attack runs first, with the current frozen flags. */
static cm_status theta_loss(cnn_run *r, int64_t step, ag_tensor **loss) {
    const cm_recipe *recipe = r->recipe;
    const int B = recipe->data.batch_size;
    ag_ctx *ctx = &r->ctx;
    ag_tensor *x = batch_tensor(r, r->images, B);
    CM_TRY(ag_ctx_status(ctx));
    cm_adv_mode mode = recipe->adversarial.mode;
    if (mode == CM_ADV_STANDARD) {
        adv_model_output out;
        CM_TRY(forward(r, x, true, &out));
        *loss = ag_cross_entropy(ctx, out.logits, r->labels, -1);
        return ag_ctx_status(ctx);
    }
    adv_attack_config attack = train_attack(r, step, ATTACK_TRAIN);
    CM_TRY(adv_attack(ctx, &r->attacked, &attack, x, r->labels, 0, r->adv_images));
    ag_tensor *x_adv = batch_tensor(r, r->adv_images, B);
    CM_TRY(ag_ctx_status(ctx));
    adv_model_output adv;
    if (mode == CM_ADV_PGD_AT) {
        CM_TRY(forward(r, x_adv, true, &adv));
        *loss = ag_cross_entropy(ctx, adv.logits, r->labels, -1);
        return ag_ctx_status(ctx);
    }
    adv_model_output clean;
    CM_TRY(forward(r, x, true, &clean));
    CM_TRY(forward(r, x_adv, true, &adv));
    *loss = adv_trades_loss(ctx, clean.logits, adv.logits, r->labels, 1.0f,
                            (float)recipe->adversarial.beta);
    return ag_ctx_status(ctx);
}

cm_status cnn_run_expert_step(cnn_run *r, int64_t step, double *loss_out) {
    CM_TRY(load_batch(r, step));
    ag_ctx_reset(&r->ctx);
    ag_params_zero_grad(&r->params);
    bool split = r->recipe->adversarial.mode == CM_ADV_ADVMOE;
    if (split) freeze_for(r, false);
    ag_tensor *loss = NULL;
    cm_status status = theta_loss(r, step, &loss);
    if (status == CM_OK) status = finish_step(r, step, loss, &r->theta_state, loss_out);
    if (split) restore_frozen(r);
    return status;
}

/* The router loss of advmoe on the loaded batch, theta frozen. */
static cm_status phi_loss(cnn_run *r, int64_t step, ag_tensor **loss) {
    const cm_recipe *recipe = r->recipe;
    const cm_adversarial_cfg *a = &recipe->adversarial;
    const int B = recipe->data.batch_size, E = r->attacked.num_experts;
    ag_ctx *ctx = &r->ctx;
    ag_tensor *x = batch_tensor(r, r->images, B);
    CM_TRY(ag_ctx_status(ctx));
    adv_attack_config attack = train_attack(r, step, ATTACK_ROUTER);
    CM_TRY(adv_attack(ctx, &r->attacked, &attack, x, r->labels, 0, r->adv_images));
    ag_tensor *x_adv = batch_tensor(r, r->adv_images, B);
    CM_TRY(ag_ctx_status(ctx));
    adv_model_output clean, adv;
    CM_TRY(forward(r, x, true, &clean));
    CM_TRY(forward(r, x_adv, true, &adv));
    if (a->router_objective == CM_ADV_ROUTER_PAPER) {
        *loss = adv_trades_loss(ctx, clean.logits, adv.logits, r->labels, 1.0f, (float)a->beta);
        return ag_ctx_status(ctx);
    }
    for (int i = 0; i < B; i++) r->route_labels[i] = r->labels[i] % E;
    ag_tensor *total = NULL;
    for (int k = 0; k < clean.n_routers; k++) {
        ag_tensor *term = adv_trades_loss(ctx, clean.router_logits[k], adv.router_logits[k],
                                          r->route_labels, (float)a->router_weight, (float)a->beta);
        total = total ? ag_add(ctx, total, term) : term;
    }
    if (!total) return CM_ERR(CM_ERR_INTERNAL, "advmoe router step on a model without routers");
    *loss = total;
    return ag_ctx_status(ctx);
}

cm_status cnn_run_router_step(cnn_run *r, int64_t step, double *loss_out) {
    if (r->recipe->adversarial.mode != CM_ADV_ADVMOE)
        return CM_ERR(CM_ERR_INVALID, "a router step needs adversarial.mode advmoe");
    CM_TRY(load_batch(r, step));
    ag_ctx_reset(&r->ctx);
    ag_params_zero_grad(&r->params);
    freeze_for(r, true);
    ag_tensor *loss = NULL;
    cm_status status = phi_loss(r, step, &loss);
    if (status == CM_OK) status = finish_step(r, step, loss, &r->router_state, loss_out);
    restore_frozen(r);
    return status;
}

cm_status cnn_run_step(cnn_run *r, int64_t step, double *loss) {
    CM_TRY(cnn_run_expert_step(r, step, loss));
    if (r->recipe->adversarial.mode != CM_ADV_ADVMOE) return CM_OK;
    double router_loss;
    return cnn_run_router_step(r, step, &router_loss);
}

/* ---- evaluation --------------------------------------------------------------------- */

/* Correct top-1 predictions of logits [rows,V]. */
static int64_t count_correct(const ag_tensor *logits, const int32_t *labels, int rows) {
    const int V = logits->shape[1];
    int64_t correct = 0;
    for (int i = 0; i < rows; i++) {
        const float *row = logits->data + (size_t)i * (size_t)V;
        int best = 0;
        for (int v = 1; v < V; v++)
            if (row[v] > row[best]) best = v;
        correct += best == labels[i];
    }
    return correct;
}

static cm_status evaluate(cnn_run *r, const idx_dataset *dataset, int64_t max_batches, double *sa,
                          double *ra, int64_t *images_out) {
    const cm_recipe *recipe = r->recipe;
    const cm_adversarial_cfg *a = &recipe->adversarial;
    const int B = recipe->data.batch_size;
    idx_eval_iter iter;
    CM_TRY(idx_eval_begin(&iter, dataset, B, 0, 1, max_batches));
    int64_t clean_correct = 0, robust_correct = 0, images = 0;
    ag_rng_key key = {(uint64_t)recipe->train.seed, 0, ATTACK_EVAL, AG_RNG_ATTACK};
    adv_attack_config attack =
        adv_pgd_config((float)a->eps, (float)a->eval_step_size, a->eval_steps, key);
    cm_status status = CM_OK;
    for (;;) {
        int rows = 0;
        if (idx_eval_next(&iter, r->images, r->labels, &rows) == 0) break;
        ag_ctx_reset(&r->ctx);
        ag_tensor *x = batch_tensor(r, r->images, rows);
        adv_model_output out;
        bool previous = ag_set_grad_enabled(&r->ctx, false);
        status = x ? forward(r, x, false, &out) : ag_ctx_status(&r->ctx);
        ag_set_grad_enabled(&r->ctx, previous);
        if (status != CM_OK) break;
        clean_correct += count_correct(out.logits, r->labels, rows);
        images += rows;
        if (a->eval_steps == 0) continue;
        uint64_t first = (uint64_t)iter.batch_first * (uint64_t)(r->height * r->width);
        if ((status = adv_attack(&r->ctx, &r->attacked, &attack, x, r->labels, first,
                                 r->adv_images)) != CM_OK)
            break;
        ag_tensor *x_adv = batch_tensor(r, r->adv_images, rows);
        previous = ag_set_grad_enabled(&r->ctx, false);
        status = x_adv ? forward(r, x_adv, false, &out) : ag_ctx_status(&r->ctx);
        ag_set_grad_enabled(&r->ctx, previous);
        if (status != CM_OK) break;
        robust_correct += count_correct(out.logits, r->labels, rows);
    }
    ag_ctx_reset(&r->ctx);
    CM_TRY(status);
    if (images == 0)
        return CM_ERR(CM_ERR_INVALID, "%s: no images to evaluate", dataset->images_path);
    *sa = (double)clean_correct / (double)images;
    *ra = a->eval_steps > 0 ? (double)robust_correct / (double)images : NAN;
    *images_out = images;
    return CM_OK;
}

/* ---- the run -------------------------------------------------------------------------- */

cm_status cnn_run_open(const cm_recipe *recipe, cnn_run **out) {
    *out = NULL;
    cnn_run *r = calloc(1, sizeof *r);
    if (!r) return CM_ERR(CM_ERR_NOMEM, "out of memory");
    cm_status status = build(r, recipe);
    if (status == CM_OK) {
        status = open_split(&r->train, recipe->data.path, recipe->data.labels_path,
                            "data.path / data.labels_path");
        r->train_open = status == CM_OK;
    }
    if (status == CM_OK) status = alloc_batch(r, r->train.height, r->train.width);
    if (status != CM_OK) {
        run_free(r);
        free(r);
        return status;
    }
    *out = r;
    return CM_OK;
}

void cnn_run_close(cnn_run *r) {
    if (!r) return;
    run_free(r);
    free(r);
}

ag_params *cnn_run_params(cnn_run *r) {
    return &r->params;
}

int64_t cnn_run_flops_per_image(const cnn_run *r) {
    return moe_cnn_flops(&r->model.config, r->height, r->width).total;
}

int cnn_run_router_params(cnn_run *r, ag_param **out, int capacity) {
    for (int i = 0; i < r->n_router_params && i < capacity; i++) out[i] = r->router_params[i];
    return r->n_router_params;
}

/* Continues from `resume`; the optimizer step counts come back with it. */
static cm_status resume_from(cnn_run *r, const char *resume, int64_t *start_step) {
    ckpt_meta meta;
    bool found;
    *start_step = 0;
    CM_TRY(run_resume(r->recipe, r->checkpoint_dir, resume, &r->params, NULL, &meta, &found));
    if (!found) return CM_OK;
    r->theta_state.step = meta.optimizer_step;
    /* advmoe takes one router step per theta step. */
    r->router_state.step = r->recipe->adversarial.mode == CM_ADV_ADVMOE ? meta.optimizer_step : 0;
    *start_step = meta.step;
    return CM_OK;
}

static cm_status test_eval(cnn_run *r, cm_metrics *metrics, cm_progress *progress, int64_t step,
                           cnn_trainer_result *result) {
    double sa, ra;
    int64_t images;
    CM_TRY(evaluate(r, &r->test, r->recipe->train.eval_batches, &sa, &ra, &images));
    result->sa = sa;
    result->ra = ra;
    result->eval_images = images;
    metrics_write(metrics,
                  "{\"kind\": \"test\", \"step\": %lld, \"sa\": %.6f, \"ra\": %.6f, \"images\": "
                  "%lld, \"eval_steps\": %d, \"eps\": %.6g}",
                  (long long)step, sa, isnan(ra) ? -1.0 : ra, (long long)images,
                  r->recipe->adversarial.eval_steps, r->recipe->adversarial.eps);
    progress_print(progress, "step %lld  test SA %.4f  RA %.4f (PGD-%d, eps %g) over %lld images",
                   (long long)step, sa, ra, r->recipe->adversarial.eval_steps,
                   r->recipe->adversarial.eps, (long long)images);
    return CM_OK;
}

static cm_status train_loop(cnn_run *r, const trainer_options *options,
                            cnn_trainer_result *result) {
    const cm_recipe *recipe = r->recipe;
    const cm_train_cfg *train = &recipe->train;
    CM_TRY(open_split(&r->test, recipe->data.test_path, recipe->data.test_labels_path,
                      "data.test_path / data.test_labels_path"));
    r->test_open = true;
    CM_TRY(run_make_dirs(r->run_dir));
    CM_TRY(run_make_dirs(r->checkpoint_dir));
    int64_t start = 0;
    if (options->resume) CM_TRY(resume_from(r, options->resume, &start));
    cm_metrics metrics = {0};
    CM_TRY(metrics_open(&metrics, r->run_dir, start > 0 ? start : -1));
    moe_cnn_flops_report flops = moe_cnn_flops(&r->model.config, r->height, r->width);
    result->flops = flops.total;
    metrics_write(&metrics,
                  "{\"kind\": \"model\", \"step\": %lld, \"flops\": %lld, \"backbone_flops\": "
                  "%lld, \"router_flops\": %lld, \"parameters\": %lld, \"experts\": %d}",
                  (long long)start, (long long)flops.total, (long long)flops.backbone,
                  (long long)flops.router, (long long)ag_params_count(&r->params, AG_GROUP_DENSE),
                  r->model.config.num_experts);
    cm_progress progress;
    progress_init(&progress, stdout, start, train->steps, !options->quiet);
    progress_print(&progress, "inference: %.2f M multiply-adds per image (routers %.3f M)",
                   (double)flops.total / 1e6, (double)flops.router / 1e6);
    if (start > 0) progress_print(&progress, "resumed from step %lld", (long long)start);
    cm_status status = CM_OK;
    const double B = recipe->data.batch_size;
    double window_start = cm_now(), run_start = window_start, window_loss = 0.0;
    int64_t window_steps = 0, step = start;
    while (step < train->steps) {
        double loss = 0.0;
        if ((status = cnn_run_step(r, step, &loss)) != CM_OK) break;
        step++;
        if (step == start + 1)
            progress_print(&progress, "step arena: %.1f MiB used of %d MiB",
                           (double)r->ctx.arena.high_water / (1 << 20), train->arena_mib);
        window_loss += loss;
        window_steps++;
        result->last_train_loss = loss;
        double elapsed = cm_now() - window_start;
        double rate = B * (double)window_steps / (elapsed > 0 ? elapsed : 1e-9);
        bool log_now = step % train->log_every == 0 || step == train->steps;
        char text[64];
        snprintf(text, sizeof text, "loss %.4f", loss);
        progress_update(&progress, step, text, rate, "img/s", log_now);
        if (log_now) {
            metrics_write(&metrics,
                          "{\"kind\": \"train\", \"step\": %lld, \"loss\": %.6f, \"loss_last\": "
                          "%.9g, \"lr\": %.6g, \"img_s\": %.1f}",
                          (long long)step, window_loss / (double)window_steps, loss,
                          optim_lr_at(&r->schedule, step - 1), rate);
            result->images_per_second = rate;
            window_loss = 0.0;
            window_steps = 0;
            window_start = cm_now();
        }
        bool stop = (options->stop_requested && *options->stop_requested) ||
                    (options->stop_at_step > 0 && step >= options->stop_at_step);
        if (train->eval_every > 0 && step % train->eval_every == 0 && step != train->steps &&
            !stop) {
            if ((status = test_eval(r, &metrics, &progress, step, result)) != CM_OK) break;
        }
        bool periodic = recipe->checkpoint.every > 0 && step % recipe->checkpoint.every == 0;
        if (periodic || stop || step == train->steps) {
            status = run_save_checkpoint(r->recipe, r->checkpoint_dir, r->recipe_text, &r->params,
                                         step, r->theta_state.step, NULL, result->last_checkpoint,
                                         sizeof result->last_checkpoint);
            if (status != CM_OK) break;
            progress_print(&progress, "saved %s", result->last_checkpoint);
        }
        if (stop) {
            result->interrupted = true;
            progress_print(&progress, "stopped at step %lld; resume with --resume auto",
                           (long long)step);
            break;
        }
    }
    progress_finish(&progress);
    result->steps_done = step;
    if (step > start) {
        double seconds = cm_now() - run_start;
        result->step_seconds = seconds / (double)(step - start);
        result->images_per_second = B * (double)(step - start) / seconds;
    }
    if (status == CM_OK && !result->interrupted && step > start) {
        status = test_eval(r, &metrics, &progress, step, result);
        progress_print(&progress, "%.3f s per step, %.0f img/s", result->step_seconds,
                       result->images_per_second);
    }
    metrics_close(&metrics);
    return status;
}

cm_status cnn_trainer_run(const cm_recipe *recipe, const trainer_options *options,
                          cnn_trainer_result *result) {
    *result = (cnn_trainer_result){.sa = NAN, .ra = NAN};
    if (options->comm && options->comm->world_size > 1)
        return CM_ERR(CM_ERR_INVALID, "model.arch resnet trains in one process (no mpirun yet)");
    cnn_run *r = NULL;
    CM_TRY(cnn_run_open(recipe, &r));
    cm_status status = train_loop(r, options, result);
    cnn_run_close(r);
    return status;
}

cm_status cnn_trainer_evaluate(const cm_recipe *recipe, const char *checkpoint, cm_split split,
                               int64_t max_batches, double *sa, double *ra, int64_t *images) {
    cnn_run *r = calloc(1, sizeof *r);
    if (!r) return CM_ERR(CM_ERR_NOMEM, "out of memory");
    cm_status status = build(r, recipe);
    if (status == CM_OK) status = ckpt_load_sharded(checkpoint, &r->params, NULL, false, NULL);
    if (status == CM_OK) {
        if (split == CM_SPLIT_TRAIN)
            status = open_split(&r->test, recipe->data.path, recipe->data.labels_path,
                                "data.path / data.labels_path");
        else
            status = open_split(&r->test, recipe->data.test_path, recipe->data.test_labels_path,
                                "data.test_path / data.test_labels_path");
        r->test_open = status == CM_OK;
    }
    if (status == CM_OK) status = alloc_batch(r, r->test.height, r->test.width);
    if (status == CM_OK) status = evaluate(r, &r->test, max_batches, sa, ra, images);
    run_free(r);
    free(r);
    return status;
}
