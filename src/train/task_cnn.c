/* The image classifier task (task_cnn.h has the whole contract). */
#include "train/task_cnn.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "data/idx.h"
#include "layers/moe_conv.h"
#include "train/adversarial.h"

enum { MAX_ROUTER_PARAMS = 8 * MOE_CNN_MAX_ROUTERS * 8 };

/* Attack random streams: the `layer` word of the key tells them apart. */
enum { ATTACK_TRAIN = 0, ATTACK_ROUTER = 1, ATTACK_EVAL = 2 };

typedef struct cnn_task {
    task_env env;
    shard_range rows; /* this rank's rows of every training micro-batch */
    float share;      /* (rows.end - rows.begin) / (data.batch_size x train.grad_accum) */
    int micro_first;  /* the loaded micro-batch's first row in the step's batch */
    moe_cnn_model model;
    adv_moe_cnn binding; /* the model as the attack and the losses call it */
    adv_model attacked;
    idx_dataset train, test;
    bool train_open, test_open;
    cm_split test_split;        /* what `test` holds */
    float *images, *adv_images; /* [B,1,H,W] */
    int32_t *labels, *route_labels;
    int height, width; /* of the batch buffers; 0 before the first data set */
    ag_param *router_params[MAX_ROUTER_PARAMS];
    int n_router_params;
    bool *saved_frozen; /* [params.count] */
    /* Batch-norm running statistics, averaged over the ranks after updates. */
    ag_param **running_stats;
    int n_running_stats;
    float *stats_scratch; /* [total numel of running_stats] */
    /* Routing of the log window: the images this rank's expert-phase
     * forward (window_attacked: on the attacked images) sent to each expert,
     * per router, at [r * E + e]; and the images counted. */
    int n_routers;
    bool window_attacked;
    int64_t *window_load; /* [n_routers * E] */
    int64_t window_images;
    bool window_collapsed[MOE_CNN_MAX_ROUTERS]; /* in the last window written */
    adv_eval_counts *eval_counts;               /* of the evaluation running */
} cnn_task;

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
    config.routing = recipe->moe.cnn_routing;
    return config;
}

static void cnn_destroy(void *state) {
    cnn_task *t = state;
    if (!t) return;
    free(t->images);
    free(t->adv_images);
    free(t->labels);
    free(t->route_labels);
    free(t->saved_frozen);
    free(t->running_stats);
    free(t->stats_scratch);
    free(t->window_load);
    free(t->eval_counts);
    if (t->train_open) idx_dataset_close(&t->train);
    if (t->test_open) idx_dataset_close(&t->test);
    free(t);
}

static cm_status cnn_create(const task_env *env, void **state) {
    cnn_task *t = calloc(1, sizeof *t);
    if (!t) return CM_ERR(CM_ERR_NOMEM, "out of memory");
    t->env = *env;
    t->rows = shard_rows(env->recipe->data.batch_size, env->rank, env->ranks);
    t->share = (float)(t->rows.end - t->rows.begin) /
               (float)(env->recipe->data.batch_size * env->recipe->train.grad_accum);
    moe_cnn_config config = model_config(env->recipe);
    cm_status status = moe_cnn_declare(&t->model, &config, env->params, NULL);
    if (status != CM_OK) {
        cnn_destroy(t);
        return cm_error_wrap(status, "model (model.cnn_*, moe.*)");
    }
    t->binding = (adv_moe_cnn){.model = &t->model};
    t->attacked = (adv_model){.forward = adv_moe_cnn_forward,
                              .model = &t->binding,
                              .params = env->params,
                              .num_experts = config.num_experts > 1 ? config.num_experts : 0};
    t->n_routers = moe_cnn_router_count(&t->model);
    t->window_attacked = env->recipe->adversarial.mode == ADV_MODE_PGD_AT;
    t->window_load = calloc((size_t)t->n_routers * (size_t)config.num_experts + 1, sizeof(int64_t));
    t->eval_counts = malloc(sizeof *t->eval_counts);
    if (!t->window_load || !t->eval_counts) {
        cnn_destroy(t);
        return CM_ERR(CM_ERR_NOMEM, "out of memory");
    }
    *state = t;
    return CM_OK;
}

/* The frozen batch-norm state (PREFIX.running_mean / running_var). */
static bool is_running_stat(const ag_param *param) {
    const char *dot = strrchr(param->name, '.');
    const char *leaf = dot ? dot + 1 : param->name;
    return param->frozen && (!strcmp(leaf, "running_mean") || !strcmp(leaf, "running_var"));
}

static cm_status collect_running_stats(cnn_task *t) {
    const ag_params *params = t->env.params;
    t->running_stats = calloc((size_t)params->count + 1, sizeof *t->running_stats);
    if (!t->running_stats) return CM_ERR(CM_ERR_NOMEM, "out of memory");
    int64_t total = 0;
    for (int i = 0; i < params->count; i++) {
        ag_param *param = params->items[i];
        if (!is_running_stat(param)) continue;
        t->running_stats[t->n_running_stats++] = param;
        total += param->tensor.numel;
    }
    t->stats_scratch = malloc((size_t)(total + 1) * sizeof(float));
    if (!t->stats_scratch) return CM_ERR(CM_ERR_NOMEM, "out of memory");
    return CM_OK;
}

/* Batch buffers for height x width images (the first data set opened
 * decides; every later one must match). */
static cm_status ensure_buffers(cnn_task *t, const idx_dataset *dataset) {
    if (t->height > 0) {
        if (dataset->height != t->height || dataset->width != t->width)
            return CM_ERR(CM_ERR_FORMAT, "%s holds %dx%d images, the training data %dx%d",
                          dataset->images_path, dataset->height, dataset->width, t->height,
                          t->width);
        return CM_OK;
    }
    size_t batch = (size_t)t->env.recipe->data.batch_size;
    size_t pixels = (size_t)dataset->height * (size_t)dataset->width;
    t->height = dataset->height;
    t->width = dataset->width;
    t->images = malloc(batch * pixels * sizeof(float));
    t->adv_images = malloc(batch * pixels * sizeof(float));
    t->labels = malloc(batch * sizeof(int32_t));
    t->route_labels = malloc(batch * sizeof(int32_t));
    if (!t->images || !t->adv_images || !t->labels || !t->route_labels)
        return CM_ERR(CM_ERR_NOMEM, "cannot allocate batch buffers");
    return CM_OK;
}

static cm_status open_idx(idx_dataset *dataset, const char *images, const char *labels,
                          const char *what) {
    cm_status status = idx_dataset_open(dataset, images, labels);
    if (status != CM_OK) return cm_error_wrap(status, "%s", what);
    return CM_OK;
}

/* The evaluation split (test, or train for cmoe eval --split train). */
static cm_status open_test(cnn_task *t, cm_split split) {
    if (split == CM_SPLIT_VALID)
        return CM_ERR(CM_ERR_INVALID, "idx data has no validation split; use --split test");
    if (t->test_open && t->test_split == split) return CM_OK;
    if (t->test_open) idx_dataset_close(&t->test);
    t->test_open = false;
    const cm_data_cfg *d = &t->env.recipe->data;
    CM_TRY(split == CM_SPLIT_TRAIN
               ? open_idx(&t->test, d->path, d->labels_path, "data.path / data.labels_path")
               : open_idx(&t->test, d->test_path, d->test_labels_path,
                          "data.test_path / data.test_labels_path"));
    t->test_open = true;
    t->test_split = split;
    return ensure_buffers(t, &t->test);
}

static cm_status cnn_open(void *state, bool with_train) {
    cnn_task *t = state;
    ag_params *params = t->env.params;
    t->n_router_params = moe_cnn_router_params(&t->model, t->router_params, MAX_ROUTER_PARAMS);
    if (t->n_router_params > MAX_ROUTER_PARAMS)
        return CM_ERR(CM_ERR_INVALID,
                      "the model has %d router parameters, more than the %d the trainer handles",
                      t->n_router_params, MAX_ROUTER_PARAMS);
    t->saved_frozen = calloc((size_t)params->count + 1, sizeof *t->saved_frozen);
    if (!t->saved_frozen) return CM_ERR(CM_ERR_NOMEM, "out of memory");
    CM_TRY(collect_running_stats(t));
    if (!with_train) return CM_OK;
    const cm_data_cfg *d = &t->env.recipe->data;
    CM_TRY(open_idx(&t->train, d->path, d->labels_path, "data.path / data.labels_path"));
    t->train_open = true;
    CM_TRY(ensure_buffers(t, &t->train));
    return open_test(t, CM_SPLIT_TEST);
}

int task_cnn_router_params(void *state, ag_param **out, int capacity) {
    cnn_task *t = state;
    for (int i = 0; i < t->n_router_params && i < capacity; i++) out[i] = t->router_params[i];
    return t->n_router_params;
}

moe_cnn_flops_report task_cnn_flops(void *state) {
    cnn_task *t = state;
    return moe_cnn_flops(&t->model.config, t->height, t->width);
}

int64_t task_cnn_flops_per_image(void *state) {
    return task_cnn_flops(state).total;
}

static void cnn_describe(void *state, cm_progress *progress) {
    cnn_task *t = state;
    const cm_recipe *recipe = t->env.recipe;
    moe_cnn_flops_report flops = moe_cnn_flops(&t->model.config, t->height, t->width);
    progress_print(progress,
                   "[cmoe] resnet widths %s x %d blocks, ratio %g, %s, mode %s, batch %d, %lld "
                   "steps, data %s",
                   recipe->model.cnn_widths, recipe->model.cnn_blocks, recipe->model.cnn_ratio,
                   recipe->moe.enabled ? "MoE" : "dense", adv_mode_names[recipe->adversarial.mode],
                   recipe->data.batch_size, (long long)recipe->train.steps, recipe->data.path);
    progress_print(progress, "inference: %.2f M multiply-adds per image (routers %.3f M)",
                   (double)flops.total / 1e6, (double)flops.router / 1e6);
    const int ranks = t->env.ranks, batch = recipe->data.batch_size;
    if (ranks > 1)
        progress_print(progress,
                       "%d ranks, data parallel: %d or %d images each per batch of %d (model "
                       "replicated, per-rank batch-norm statistics)",
                       ranks, batch / ranks, (batch + ranks - 1) / ranks, batch);
}

static void cnn_model_fields(void *state, metrics_record *record) {
    cnn_task *t = state;
    moe_cnn_flops_report flops = moe_cnn_flops(&t->model.config, t->height, t->width);
    metrics_add_integer(record, "flops", flops.total);
    metrics_add_integer(record, "backbone_flops", flops.backbone);
    metrics_add_integer(record, "router_flops", flops.router);
    metrics_add_integer(record, "experts", t->model.config.num_experts);
}

static int64_t cnn_items_per_step(void *state) {
    const cm_recipe *recipe = ((cnn_task *)state)->env.recipe;
    return (int64_t)recipe->data.batch_size * recipe->train.grad_accum;
}

/* 6 x inference multiply-adds per image x images: the attacks of the
 * adversarial modes are not counted. */
static double cnn_model_flops(void *state) {
    cnn_task *t = state;
    return 6.0 * (double)task_cnn_flops_per_image(t) * (double)cnn_items_per_step(t);
}

static int cnn_phases(void *state) {
    return ((cnn_task *)state)->env.recipe->adversarial.mode == ADV_MODE_ADVMOE ? 2 : 1;
}

/* Micro-batch m of a step: rows [m B, (m + 1) B) of the step's batch of
 * grad_accum x B images (this rank's share of them). */
static cm_status cnn_load(void *state, int64_t step, int micro) {
    cnn_task *t = state;
    const cm_recipe *recipe = t->env.recipe;
    const int B = recipe->data.batch_size, first = micro * B;
    idx_augment augment = {recipe->data.augment_crop, recipe->data.augment_flip};
    t->micro_first = first;
    shard_range rows = {first + t->rows.begin, first + t->rows.end};
    return idx_dataset_batch(&t->train, (uint64_t)recipe->train.seed, (uint64_t)step,
                             B * recipe->train.grad_accum, rows, &augment, t->images, t->labels);
}

/* ---- which parameters a phase updates ------------------------------------------------- */

static bool is_router_param(const cnn_task *t, const ag_param *param) {
    for (int i = 0; i < t->n_router_params; i++)
        if (t->router_params[i] == param) return true;
    return false;
}

/* Freezes the routers (update_routers false: expert phases) or everything
 * else (update_routers true: router phases); restore_frozen undoes it. */
static void freeze_for(cnn_task *t, bool update_routers) {
    ag_params *params = t->env.params;
    for (int i = 0; i < params->count; i++) {
        ag_param *param = params->items[i];
        t->saved_frozen[i] = param->frozen;
        if (is_router_param(t, param) != update_routers) ag_param_set_frozen(param, true);
    }
}

static void restore_frozen(cnn_task *t) {
    ag_params *params = t->env.params;
    for (int i = 0; i < params->count; i++)
        ag_param_set_frozen(params->items[i], t->saved_frozen[i]);
}

/* ---- losses ------------------------------------------------------------------------- */

static ag_tensor *batch_tensor(cnn_task *t, float *data, int rows) {
    int shape[4] = {rows, 1, t->height, t->width};
    ag_tensor *x = ag_empty(t->env.ctx, "cnn_batch", 4, shape);
    if (x) memcpy(x->data, data, (size_t)x->numel * sizeof(float));
    return x;
}

static int local_rows(const cnn_task *t) {
    return t->rows.end - t->rows.begin;
}

/* Global index of this rank's first pixel in the training batch: random
 * attack starts do not depend on the rank count. */
static uint64_t first_pixel(const cnn_task *t) {
    return (uint64_t)(t->micro_first + t->rows.begin) * (uint64_t)(t->height * t->width);
}

static adv_attack_config train_attack(const cnn_task *t, int64_t step, uint32_t stream) {
    const cm_adversarial_cfg *a = &t->env.recipe->adversarial;
    cm_rng_key key = {(uint64_t)t->env.recipe->train.seed, (uint64_t)step, stream, CM_RNG_ATTACK};
    if (a->mode == ADV_MODE_PGD_AT)
        return adv_pgd_config((float)a->eps, (float)a->step_size, a->steps, key);
    /* TRADES and AdvMoE: the routers' KL joins the attack of an MoE model. */
    return adv_trades_config((float)a->eps, (float)a->step_size, a->steps,
                             t->attacked.num_experts > 0 ? 1.0f : 0.0f, key);
}

static cm_status forward(cnn_task *t, ag_tensor *x, adv_model_output *out) {
    return adv_moe_cnn_forward(t->env.ctx, &t->binding, x, true, out);
}

/* Adds the experts the routers chose in *out (this rank's rows) to the log
 * window. */
static void record_routes(cnn_task *t, const adv_model_output *out) {
    const int rows = local_rows(t), E = t->model.config.num_experts;
    for (int r = 0; r < out->n_routers; r++)
        for (int n = 0; n < rows; n++) t->window_load[r * E + out->experts[r][n]]++;
    t->window_images += rows;
}

/* loss * this rank's and micro-batch's share of the step's batch (one rank,
 * one micro-batch: unchanged). */
static ag_tensor *rank_share(cnn_task *t, ag_tensor *loss) {
    const bool whole = t->env.ranks == 1 && t->env.recipe->train.grad_accum == 1;
    return whole ? loss : ag_scale(t->env.ctx, loss, t->share);
}

/* The loss of standard, pgd_at and trades (and advmoe's expert phase) on the
 * loaded batch; the attack runs first, with the current frozen flags. */
static cm_status theta_loss(cnn_task *t, int64_t step, ag_tensor **loss) {
    const cm_recipe *recipe = t->env.recipe;
    const int rows = local_rows(t);
    ag_ctx *ctx = t->env.ctx;
    ag_tensor *x = batch_tensor(t, t->images, rows);
    CM_TRY(ag_ctx_status(ctx));
    adv_mode mode = recipe->adversarial.mode;
    if (mode == ADV_MODE_STANDARD) {
        adv_model_output out;
        CM_TRY(forward(t, x, &out));
        record_routes(t, &out);
        *loss = rank_share(t, ag_cross_entropy(ctx, out.logits, t->labels, -1));
        return ag_ctx_status(ctx);
    }
    adv_attack_config attack = train_attack(t, step, ATTACK_TRAIN);
    CM_TRY(adv_attack(ctx, &t->attacked, &attack, x, t->labels, first_pixel(t), t->adv_images));
    ag_tensor *x_adv = batch_tensor(t, t->adv_images, rows);
    CM_TRY(ag_ctx_status(ctx));
    adv_model_output adv;
    if (mode == ADV_MODE_PGD_AT) {
        CM_TRY(forward(t, x_adv, &adv)); /* the one forward: on the attacked images */
        record_routes(t, &adv);
        *loss = rank_share(t, ag_cross_entropy(ctx, adv.logits, t->labels, -1));
        return ag_ctx_status(ctx);
    }
    adv_model_output clean;
    CM_TRY(forward(t, x, &clean));
    record_routes(t, &clean);
    CM_TRY(forward(t, x_adv, &adv));
    *loss = rank_share(t, adv_trades_loss(ctx, clean.logits, adv.logits, t->labels, 1.0f,
                                          (float)recipe->adversarial.beta));
    return ag_ctx_status(ctx);
}

/* The router loss of advmoe on the loaded batch, theta frozen. */
static cm_status phi_loss(cnn_task *t, int64_t step, ag_tensor **loss) {
    const cm_adversarial_cfg *a = &t->env.recipe->adversarial;
    const int rows = local_rows(t), E = t->attacked.num_experts;
    ag_ctx *ctx = t->env.ctx;
    ag_tensor *x = batch_tensor(t, t->images, rows);
    CM_TRY(ag_ctx_status(ctx));
    adv_attack_config attack = train_attack(t, step, ATTACK_ROUTER);
    CM_TRY(adv_attack(ctx, &t->attacked, &attack, x, t->labels, first_pixel(t), t->adv_images));
    ag_tensor *x_adv = batch_tensor(t, t->adv_images, rows);
    CM_TRY(ag_ctx_status(ctx));
    adv_model_output clean, adv;
    CM_TRY(forward(t, x, &clean));
    CM_TRY(forward(t, x_adv, &adv));
    if (a->router_objective == ADV_ROUTER_PAPER) {
        *loss = rank_share(
            t, adv_trades_loss(ctx, clean.logits, adv.logits, t->labels, 1.0f, (float)a->beta));
        return ag_ctx_status(ctx);
    }
    for (int i = 0; i < rows; i++) t->route_labels[i] = t->labels[i] % E;
    ag_tensor *total = NULL;
    for (int k = 0; k < clean.n_routers; k++) {
        ag_tensor *term = adv_trades_loss(ctx, clean.router_logits[k], adv.router_logits[k],
                                          t->route_labels, (float)a->router_weight, (float)a->beta);
        total = total ? ag_add(ctx, total, term) : term;
    }
    if (!total) return CM_ERR(CM_ERR_INTERNAL, "advmoe router step on a model without routers");
    *loss = rank_share(t, total);
    return ag_ctx_status(ctx);
}

static cm_status cnn_phase_loss(void *state, int phase, int64_t step, int micro, task_loss *out) {
    (void)micro; /* loaded by cnn_load; attack starts are keyed by the global image */
    cnn_task *t = state;
    if (cnn_phases(t) > 1 && micro == 0) freeze_for(t, phase == CNN_PHASE_ROUTERS);
    ag_tensor *loss = NULL;
    CM_TRY(phase == CNN_PHASE_ROUTERS ? phi_loss(t, step, &loss) : theta_loss(t, step, &loss));
    *out = (task_loss){.objective = loss, .loss = loss};
    return CM_OK;
}

/* Averages the batch-norm running statistics over the ranks, so that every
 * rank keeps the same model (each rank updated them from its own rows). */
static cm_status average_running_stats(cnn_task *t) {
    if (t->env.ranks == 1) return CM_OK;
    int64_t at = 0;
    for (int i = 0; i < t->n_running_stats; i++) {
        const ag_tensor *x = &t->running_stats[i]->tensor;
        memcpy(t->stats_scratch + at, x->data, (size_t)x->numel * sizeof(float));
        at += x->numel;
    }
    CM_TRY(comm_sum_floats(t->env.world, t->stats_scratch, at));
    const float scale = 1.0f / (float)t->env.ranks;
    at = 0;
    for (int i = 0; i < t->n_running_stats; i++) {
        ag_tensor *x = &t->running_stats[i]->tensor;
        for (int64_t k = 0; k < x->numel; k++) x->data[k] = t->stats_scratch[at + k] * scale;
        at += x->numel;
    }
    return CM_OK;
}

static cm_status cnn_phase_end(void *state, int phase, bool completed) {
    (void)phase;
    cnn_task *t = state;
    cm_status status = completed ? average_running_stats(t) : CM_OK;
    if (cnn_phases(t) > 1) restore_frozen(t);
    return status;
}

/* ---- routing diagnostics ------------------------------------------------------------- */

/* The expert a router sends the most images to (*expert) and its share of
 * `images`; load is the router's row of counts [E]. */
static double top_share(const int64_t *load, int E, int64_t images, int *expert) {
    int best = 0;
    for (int e = 1; e < E; e++)
        if (load[e] > load[best]) best = e;
    *expert = best;
    return images > 0 ? (double)load[best] / (double)images : 0.0;
}

static bool is_collapsed(double share) {
    return share > TASK_CNN_COLLAPSED_SHARE;
}

/* The log window's routing, summed over the ranks (the global batch): one
 * "moe_cnn" line per router, and a warning for each router that collapses
 * (collapsed in this window, not in the one before: while it stays
 * collapsed, only its lines say so). */
static cm_status cnn_write_window(void *state, cm_metrics *metrics, cm_progress *progress,
                                  int64_t step) {
    cnn_task *t = state;
    const int R = t->n_routers, E = t->model.config.num_experts;
    if (R == 0) return CM_OK;
    int64_t images = t->window_images;
    CM_TRY(comm_sum_int64(t->env.world, t->window_load, R * E));
    CM_TRY(comm_sum_int64(t->env.world, &images, 1));
    for (int r = 0; r < R && images > 0; r++) {
        const int64_t *load = t->window_load + (size_t)r * (size_t)E;
        int expert;
        const double share = top_share(load, E, images, &expert);
        metrics_record line = metrics_record_start("moe_cnn", step);
        metrics_add_integer(&line, "router", r);
        metrics_add_integer(&line, "phase", CNN_PHASE_EXPERTS);
        metrics_add_integer(&line, "attacked", t->window_attacked);
        metrics_add_integer(&line, "images", images);
        metrics_add_number(&line, "max_share", share, "%.4f");
        metrics_add_integer(&line, "collapsed", is_collapsed(share));
        metrics_add_integers(&line, "images_per_expert", load, E);
        CM_TRY(metrics_write_record(metrics, &line));
        if (is_collapsed(share) && !t->window_collapsed[r] && progress)
            progress_print(progress,
                           "WARNING step %lld: router %d sent %.1f%% of the window's %lld "
                           "training images to expert %d: a collapsed router (more than %.0f%%; "
                           "\"collapsed\" in its moe_cnn lines while it lasts)",
                           (long long)step, r, 100.0 * share, (long long)images, expert,
                           100.0 * TASK_CNN_COLLAPSED_SHARE);
        t->window_collapsed[r] = is_collapsed(share);
    }
    memset(t->window_load, 0, (size_t)R * (size_t)E * sizeof *t->window_load);
    t->window_images = 0;
    return CM_OK;
}

/* ---- evaluation --------------------------------------------------------------------- */

/* One evaluation; NAN for what was not measured. */
typedef struct cnn_eval_result {
    int64_t images;
    double sa, ra;            /* ra: NAN when adversarial.eval_steps is 0 */
    double ra_worst;          /* worst-case RA (adversarial.h); = ra for a dense model */
    int n_routers;            /* 0: a dense model (the rest is NAN) */
    double router_robustness; /* mean over the routers */
    double router_robustness_per_router[MOE_CNN_MAX_ROUTERS];
    double expert_ra;      /* routes frozen to the clean ones */
    double router_only_ra; /* NAN also for per-layer routing */
    /* Images per expert, per router ([r * num_experts + e], summed over the
     * ranks): on the clean images, and on the RA attack's (NULL without it). */
    int num_experts;
    const int64_t *clean_per_expert, *attacked_per_expert;
    double max_share_clean, max_share_ra; /* the largest over the routers; ra: NAN */
    int collapsed_routers;                /* routers with a share above TASK_CNN_COLLAPSED_SHARE */
    bool stopped;                         /* request->stop ended it: nothing else is set */
} cnn_eval_result;

/* counts summed over the ranks -> *eval. */
static cm_status finish_eval(cnn_task *t, adv_eval_counts *counts, bool robust,
                             cnn_eval_result *eval) {
    const int R = counts->n_routers;
    int64_t packed[6 + ADV_MAX_ROUTERS] = {
        counts->images,         counts->clean_correct,       counts->robust_correct,
        counts->expert_correct, counts->router_only_correct, counts->worst_correct};
    memcpy(packed + 6, counts->routes_kept, (size_t)R * sizeof(int64_t));
    CM_TRY(comm_sum_int64(t->env.world, packed, 6 + R));
    const int E = t->model.config.num_experts;
    CM_TRY(comm_sum_int64(t->env.world, counts->clean_per_expert, R * E));
    CM_TRY(comm_sum_int64(t->env.world, counts->clean_per_expert_class, R * E * ADV_EVAL_CLASSES));
    if (robust) CM_TRY(comm_sum_int64(t->env.world, counts->attacked_per_expert, R * E));
    const int64_t images = packed[0];
    if (images == 0)
        return CM_ERR(CM_ERR_INVALID, "%s: no images to evaluate", t->test.images_path);
    const double n = (double)images;
    *eval = (cnn_eval_result){.images = images,
                              .sa = (double)packed[1] / n,
                              .ra = NAN,
                              .ra_worst = NAN,
                              .n_routers = R,
                              .router_robustness = NAN,
                              .expert_ra = NAN,
                              .router_only_ra = NAN,
                              .num_experts = E,
                              .clean_per_expert = counts->clean_per_expert,
                              .attacked_per_expert = robust ? counts->attacked_per_expert : NULL,
                              .max_share_clean = NAN,
                              .max_share_ra = NAN};
    for (int r = 0; r < R; r++) {
        int expert;
        double clean = top_share(counts->clean_per_expert + (size_t)r * E, E, images, &expert);
        double attacked =
            robust ? top_share(counts->attacked_per_expert + (size_t)r * E, E, images, &expert)
                   : 0.0;
        eval->max_share_clean = r == 0 ? clean : fmax(eval->max_share_clean, clean);
        if (robust) eval->max_share_ra = r == 0 ? attacked : fmax(eval->max_share_ra, attacked);
        eval->collapsed_routers += is_collapsed(clean) || is_collapsed(attacked);
    }
    if (!robust) return CM_OK;
    eval->ra = (double)packed[2] / n;
    eval->ra_worst = (double)packed[5] / n;
    if (R == 0) return CM_OK;
    eval->expert_ra = (double)packed[3] / n;
    if (t->model.config.routing == MOE_CNN_ROUTING_IMAGE)
        eval->router_only_ra = (double)packed[4] / n;
    double sum = 0.0;
    for (int k = 0; k < R; k++) {
        eval->router_robustness_per_router[k] = (double)packed[6 + k] / n;
        sum += eval->router_robustness_per_router[k];
    }
    eval->router_robustness = sum / R;
    return CM_OK;
}

/* Every rank takes its rows of each batch and the counts are summed. */
static cm_status evaluate_counts(cnn_task *t, const task_eval_request *request,
                                 cnn_eval_result *eval) {
    const int64_t max_batches = request->max_batches;
    const cm_recipe *recipe = t->env.recipe;
    const cm_adversarial_cfg *a = &recipe->adversarial;
    ag_ctx *ctx = t->env.ctx;
    idx_eval_iter iter;
    CM_TRY(idx_eval_begin(&iter, &t->test, recipe->data.batch_size, t->env.rank, t->env.ranks,
                          max_batches));
    cm_rng_key key = {(uint64_t)recipe->train.seed, 0, ATTACK_EVAL, CM_RNG_ATTACK};
    adv_attack_config attack =
        adv_pgd_config((float)a->eps, (float)a->eval_step_size, a->eval_steps, key);
    if (t->attacked.num_experts > 0) attack.router_weight = (float)a->eval_router_weight;
    const bool robust = a->eval_steps > 0;
    adv_eval_counts *counts = t->eval_counts;
    memset(counts, 0, sizeof *counts);
    counts->n_routers = t->n_routers;
    counts->num_experts = t->model.config.num_experts;
    const uint64_t pixels = (uint64_t)(t->height * t->width);
    cm_status status = CM_OK;
    for (;;) {
        if ((status = task_eval_stopped(request, t->env.world, &eval->stopped)) != CM_OK ||
            eval->stopped)
            break;
        int rows = 0;
        int batch = idx_eval_next(&iter, t->images, t->labels, &rows);
        if (batch == 0) break;
        if (rows == 0) continue; /* a short last batch may leave a rank nothing */
        uint64_t first = (uint64_t)iter.batch_first +
                         (uint64_t)shard_rows(batch, t->env.rank, t->env.ranks).begin;
        ag_ctx_reset(ctx);
        ag_tensor *x = batch_tensor(t, t->images, rows);
        status = x ? adv_moe_cnn_evaluate(ctx, &t->attacked, robust ? &attack : NULL, x, t->labels,
                                          first * pixels, t->adv_images, counts)
                   : ag_ctx_status(ctx);
        if (status != CM_OK) break;
    }
    ag_ctx_reset(ctx);
    /* A rank's failure ends the whole job (cmoe train aborts), so the others
     * do not wait here for it. */
    CM_TRY(status);
    if (eval->stopped) return CM_OK;
    return finish_eval(t, counts, robust, eval);
}

/* "SA 0.8123, RA 0.5012 (PGD-20, eps 0.1, step 0.0125) over 1024 images" and,
 * for an MoE model, "; router robustness 0.91 (per router ...), expert RA
 * ..., router-only RA ..., worst-case RA ...". */
static void describe_eval(const cm_recipe *recipe, const cnn_eval_result *eval, char *buf,
                          size_t size) {
    const cm_adversarial_cfg *a = &recipe->adversarial;
    size_t used = 0;
#define APPEND(...)                                                                                \
    do {                                                                                           \
        if (used < size) used += (size_t)snprintf(buf + used, size - used, __VA_ARGS__);           \
    } while (0)
    APPEND("SA %.4f, RA %.4f (PGD-%d, eps %g, step %g", eval->sa, eval->ra, a->eval_steps, a->eps,
           a->eval_step_size);
    if (eval->n_routers > 0 && a->eval_router_weight > 0)
        APPEND(", router CE weight %g", a->eval_router_weight);
    APPEND(") over %lld images", (long long)eval->images);
    if (eval->n_routers > 0 && !isnan(eval->router_robustness)) {
        APPEND("; router robustness %.4f", eval->router_robustness);
        if (eval->n_routers > 1) {
            APPEND(" (per router");
            for (int k = 0; k < eval->n_routers; k++)
                APPEND(" %.3f", eval->router_robustness_per_router[k]);
            APPEND(")");
        }
        APPEND(", expert RA %.4f, router-only RA ", eval->expert_ra);
        if (isnan(eval->router_only_ra))
            APPEND("n/a (per-layer routers)");
        else
            APPEND("%.4f", eval->router_only_ra);
        APPEND(", worst-case RA %.4f", eval->ra_worst);
    }
    for (int r = 0; r < eval->n_routers && eval->collapsed_routers > 0; r++) {
        const int E = eval->num_experts;
        int clean_expert, attacked_expert = 0;
        const double clean =
            top_share(eval->clean_per_expert + (size_t)r * E, E, eval->images, &clean_expert);
        const double attacked = eval->attacked_per_expert
                                    ? top_share(eval->attacked_per_expert + (size_t)r * E, E,
                                                eval->images, &attacked_expert)
                                    : 0.0;
        if (!is_collapsed(clean) && !is_collapsed(attacked)) continue;
        APPEND("; WARNING: router %d sends %.1f%% of the clean images to expert %d", r,
               100.0 * clean, clean_expert);
        if (eval->attacked_per_expert)
            APPEND(" and %.1f%% of the attacked ones to expert %d", 100.0 * attacked,
                   attacked_expert);
        APPEND(" (a collapsed router: more than %.0f%%; its router robustness says nothing)",
               100.0 * TASK_CNN_COLLAPSED_SHARE);
    }
#undef APPEND
}

static task_eval_plan cnn_eval_plan(void *state) {
    const cm_recipe *recipe = ((cnn_task *)state)->env.recipe;
    task_eval_request test = {CM_SPLIT_TEST, recipe->train.eval_batches, 0, NULL};
    return (task_eval_plan){.periodic = test, .final = test, .final_differs = false};
}

static cm_status cnn_evaluate(void *state, const task_eval_request *request, int64_t step,
                              task_eval *out) {
    cnn_task *t = state;
    if (request->k_override > 0)
        return CM_ERR(CM_ERR_INVALID, "the image classifier's routers take no k");
    CM_TRY(open_test(t, request->split));
    cnn_eval_result eval = {0};
    CM_TRY(evaluate_counts(t, request, &eval));
    if (eval.stopped) {
        *out = (task_eval){.stopped = true};
        return CM_OK;
    }
    const cm_adversarial_cfg *a = &t->env.recipe->adversarial;
    *out = (task_eval){.headline = eval.sa, .items = eval.images};
    /* kind "test" for the training images too: the figures are the same kind */
    metrics_record *line = &out->record;
    *line = metrics_record_start("test", step);
    metrics_add_number(line, "sa", eval.sa, "%.6f");
    metrics_add_number(line, "ra", eval.ra, "%.6f");
    metrics_add_integer(line, "images", eval.images);
    metrics_add_integer(line, "eval_steps", a->eval_steps);
    metrics_add_number(line, "eps", a->eps, "%.6g");
    metrics_add_number(line, "eval_router_weight", a->eval_router_weight, "%.6g");
    const int per_router_counts = eval.n_routers * eval.num_experts;
    if (eval.n_routers > 0 && 2 * per_router_counts <= TASK_EVAL_COUNTS_MAX) {
        int64_t *clean = out->counts, *attacked = out->counts + per_router_counts;
        memcpy(clean, eval.clean_per_expert, (size_t)per_router_counts * sizeof *clean);
        metrics_add_integers(line, "images_per_expert_clean", clean, per_router_counts);
        if (eval.attacked_per_expert) {
            memcpy(attacked, eval.attacked_per_expert, (size_t)per_router_counts * sizeof *clean);
            metrics_add_integers(line, "images_per_expert_ra", attacked, per_router_counts);
        }
    }
    if (eval.n_routers > 0) {
        metrics_add_number(line, "max_expert_share_clean", eval.max_share_clean, "%.6f");
        metrics_add_number(line, "max_expert_share_ra", eval.max_share_ra, "%.6f");
        metrics_add_integer(line, "collapsed_routers", eval.collapsed_routers);
    }
    if (eval.n_routers > 0) {
        metrics_add_number(line, "router_robustness", eval.router_robustness, "%.6f");
        metrics_add_number(line, "expert_ra", eval.expert_ra, "%.6f");
        metrics_add_number(line, "router_only_ra", eval.router_only_ra, "%.6f");
        for (int k = 0; k < eval.n_routers; k++)
            out->per_router[k] = eval.router_robustness_per_router[k];
        metrics_add_numbers(line, "router_robustness_per_router", out->per_router, eval.n_routers,
                            "%.6f");
    }
    metrics_add_number(line, "ra_worst", eval.ra_worst, "%.6f");
    describe_eval(t->env.recipe, &eval, out->text, sizeof out->text);
    snprintf(out->summary, sizeof out->summary, "%s %.2000s",
             request->split == CM_SPLIT_TRAIN ? "train" : "test", out->text);
    return CM_OK;
}

_Static_assert((int)IDX_NUM_CLASSES == (int)ADV_EVAL_CLASSES,
               "the per-class routing counts' classes");

const int64_t *task_cnn_class_routes(void *state, int *routers, int *experts) {
    const cnn_task *t = state;
    *routers = t->eval_counts->n_routers;
    *experts = t->eval_counts->num_experts;
    return t->eval_counts->clean_per_expert_class;
}

const task_vtable task_cnn = {
    .name = "resnet",
    .item_name = "img",
    .create = cnn_create,
    .open = cnn_open,
    .destroy = cnn_destroy,
    .describe = cnn_describe,
    .model_fields = cnn_model_fields,
    .items_per_step = cnn_items_per_step,
    .model_flops_per_step = cnn_model_flops,
    .phases = cnn_phases,
    .load = cnn_load,
    .phase_loss = cnn_phase_loss,
    .phase_end = cnn_phase_end,
    .write_window = cnn_write_window,
    .eval_plan = cnn_eval_plan,
    .evaluate = cnn_evaluate,
};
