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
    const cm_comm *comm; /* NULL: one process */
    int rank, ranks;     /* in the world */
    bool leader;         /* world rank 0: prints, writes files */
    shard_range rows;    /* this rank's rows of every training batch */
    float share;         /* (rows.end - rows.begin) / data.batch_size */
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
    /* Batch-norm running statistics, averaged over the ranks after updates. */
    ag_param **running_stats;
    int n_running_stats;
    float *stats_scratch; /* [total numel of running_stats] */
};

/* The ranks sharing the global batch (0: this process alone). */
static MPI_Comm world(const cnn_run *r) {
    return r->comm ? r->comm->world : (MPI_Comm)0;
}

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

static cm_status open_split(idx_dataset *dataset, const char *images, const char *labels,
                            const char *what) {
    cm_status status = idx_dataset_open(dataset, images, labels);
    if (status != CM_OK) return cm_error_wrap(status, "%s", what);
    return CM_OK;
}

/* The frozen batch-norm state (PREFIX.running_mean / running_var). */
static bool is_running_stat(const ag_param *param) {
    const char *dot = strrchr(param->name, '.');
    const char *leaf = dot ? dot + 1 : param->name;
    return param->frozen && (!strcmp(leaf, "running_mean") || !strcmp(leaf, "running_var"));
}

static cm_status collect_running_stats(cnn_run *r) {
    r->running_stats = calloc((size_t)r->params.count + 1, sizeof *r->running_stats);
    if (!r->running_stats) return CM_ERR(CM_ERR_NOMEM, "out of memory");
    int64_t total = 0;
    for (int i = 0; i < r->params.count; i++) {
        ag_param *param = r->params.items[i];
        if (!is_running_stat(param)) continue;
        r->running_stats[r->n_running_stats++] = param;
        total += param->tensor.numel;
    }
    r->stats_scratch = malloc((size_t)(total + 1) * sizeof(float));
    if (!r->stats_scratch) return CM_ERR(CM_ERR_NOMEM, "out of memory");
    return CM_OK;
}

/* Model, parameters, arena, optimizer; no data. comm NULL: one process. */
static cm_status build(cnn_run *r, const cm_recipe *recipe, const cm_comm *comm) {
    r->recipe = recipe;
    r->comm = comm;
    r->rank = comm ? comm->world_rank : 0;
    r->ranks = comm ? comm->world_size : 1;
    r->leader = r->rank == 0;
    ag_params_init(&r->params);
    if (recipe->data.batch_size < r->ranks)
        return CM_ERR(CM_ERR_INVALID,
                      "data.batch_size = %d is smaller than the %d ranks of the job",
                      recipe->data.batch_size, r->ranks);
    r->rows = shard_rows(recipe->data.batch_size, r->rank, r->ranks);
    r->share = (float)(r->rows.end - r->rows.begin) / (float)recipe->data.batch_size;
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
    CM_TRY(collect_running_stats(r));
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
    free(r->running_stats);
    free(r->stats_scratch);
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

static int local_rows(const cnn_run *r) {
    return r->rows.end - r->rows.begin;
}

/* Global index of this rank's first pixel in the training batch: random
 * attack starts do not depend on the rank count. */
static uint64_t first_pixel(const cnn_run *r) {
    return (uint64_t)r->rows.begin * (uint64_t)(r->height * r->width);
}

static adv_attack_config train_attack(const cnn_run *r, int64_t step, uint32_t stream) {
    const cm_adversarial_cfg *a = &r->recipe->adversarial;
    cm_rng_key key = {(uint64_t)r->recipe->train.seed, (uint64_t)step, stream, CM_RNG_ATTACK};
    if (a->mode == ADV_MODE_PGD_AT)
        return adv_pgd_config((float)a->eps, (float)a->step_size, a->steps, key);
    /* TRADES and AdvMoE: the routers' KL joins the attack of an MoE model. */
    return adv_trades_config((float)a->eps, (float)a->step_size, a->steps,
                             r->attacked.num_experts > 0 ? 1.0f : 0.0f, key);
}

static cm_status forward(cnn_run *r, ag_tensor *x, bool training, adv_model_output *out) {
    return adv_moe_cnn_forward(&r->ctx, &r->binding, x, training, out);
}

/* Loads this rank's rows of the step's batch into r->images / r->labels. */
static cm_status load_batch(cnn_run *r, int64_t step) {
    const cm_recipe *recipe = r->recipe;
    idx_augment augment = {recipe->data.augment_crop, recipe->data.augment_flip};
    return idx_dataset_batch(&r->train, (uint64_t)recipe->train.seed, (uint64_t)step,
                             recipe->data.batch_size, r->rows, &augment, r->images, r->labels);
}

/* Averages the batch-norm running statistics over the ranks, so that every
 * rank keeps the same model (each rank updated them from its own rows). */
static cm_status average_running_stats(cnn_run *r) {
    if (r->ranks == 1) return CM_OK;
    int64_t at = 0;
    for (int i = 0; i < r->n_running_stats; i++) {
        const ag_tensor *t = &r->running_stats[i]->tensor;
        memcpy(r->stats_scratch + at, t->data, (size_t)t->numel * sizeof(float));
        at += t->numel;
    }
    CM_TRY(comm_sum_floats(world(r), r->stats_scratch, at));
    const float scale = 1.0f / (float)r->ranks;
    at = 0;
    for (int i = 0; i < r->n_running_stats; i++) {
        ag_tensor *t = &r->running_stats[i]->tensor;
        for (int64_t k = 0; k < t->numel; k++) t->data[k] = r->stats_scratch[at + k] * scale;
        at += t->numel;
    }
    return CM_OK;
}

/* The local loss is this rank's share of the global batch's loss: the sum
 * over the ranks is the global loss (and its gradient the global one). */
static cm_status finish_step(cnn_run *r, int64_t step, ag_tensor *loss, optim_state *state,
                             double *loss_out) {
    CM_TRY(ag_ctx_status(&r->ctx));
    double global = loss->data[0];
    CM_TRY(comm_sum_doubles(world(r), &global, 1));
    *loss_out = global;
    if (!isfinite(global))
        return CM_ERR(CM_ERR_NUMERIC, "the loss is %g at step %lld; lower optim.lr", global,
                      (long long)step + 1);
    CM_TRY(ag_backward(&r->ctx, loss));
    if (r->ranks > 1) {
        /* The CNN's parameters are all dense (its experts are channel slices). */
        ag_param_buffer *dense = &r->params.buffers[AG_GROUP_DENSE];
        CM_TRY(comm_sum_floats(world(r), dense->grad, (int64_t)dense->numel));
    }
    if (r->recipe->optim.grad_clip > 0)
        CM_TRY(optim_clip_grad_norm(&r->params, r->recipe->optim.grad_clip, NULL));
    optim_step(&r->params, &r->optim, optim_lr_at(&r->schedule, step), state);
    return average_running_stats(r);
}

/* loss * share on several ranks (one rank: unchanged). */
static ag_tensor *rank_share(cnn_run *r, ag_tensor *loss) {
    return r->ranks > 1 ? ag_scale(&r->ctx, loss, r->share) : loss;
}

/* The loss of standard, pgd_at and trades (and advmoe's expert step) on the
 * loaded batch; the attack runs first, with the current frozen flags. */
static cm_status theta_loss(cnn_run *r, int64_t step, ag_tensor **loss) {
    const cm_recipe *recipe = r->recipe;
    const int rows = local_rows(r);
    ag_ctx *ctx = &r->ctx;
    ag_tensor *x = batch_tensor(r, r->images, rows);
    CM_TRY(ag_ctx_status(ctx));
    adv_mode mode = recipe->adversarial.mode;
    if (mode == ADV_MODE_STANDARD) {
        adv_model_output out;
        CM_TRY(forward(r, x, true, &out));
        *loss = rank_share(r, ag_cross_entropy(ctx, out.logits, r->labels, -1));
        return ag_ctx_status(ctx);
    }
    adv_attack_config attack = train_attack(r, step, ATTACK_TRAIN);
    CM_TRY(adv_attack(ctx, &r->attacked, &attack, x, r->labels, first_pixel(r), r->adv_images));
    ag_tensor *x_adv = batch_tensor(r, r->adv_images, rows);
    CM_TRY(ag_ctx_status(ctx));
    adv_model_output adv;
    if (mode == ADV_MODE_PGD_AT) {
        CM_TRY(forward(r, x_adv, true, &adv));
        *loss = rank_share(r, ag_cross_entropy(ctx, adv.logits, r->labels, -1));
        return ag_ctx_status(ctx);
    }
    adv_model_output clean;
    CM_TRY(forward(r, x, true, &clean));
    CM_TRY(forward(r, x_adv, true, &adv));
    *loss = rank_share(r, adv_trades_loss(ctx, clean.logits, adv.logits, r->labels, 1.0f,
                                          (float)recipe->adversarial.beta));
    return ag_ctx_status(ctx);
}

cm_status cnn_run_expert_step(cnn_run *r, int64_t step, double *loss_out) {
    CM_TRY(load_batch(r, step));
    ag_ctx_reset(&r->ctx);
    ag_params_zero_grad(&r->params);
    bool split = r->recipe->adversarial.mode == ADV_MODE_ADVMOE;
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
    const int rows = local_rows(r), E = r->attacked.num_experts;
    ag_ctx *ctx = &r->ctx;
    ag_tensor *x = batch_tensor(r, r->images, rows);
    CM_TRY(ag_ctx_status(ctx));
    adv_attack_config attack = train_attack(r, step, ATTACK_ROUTER);
    CM_TRY(adv_attack(ctx, &r->attacked, &attack, x, r->labels, first_pixel(r), r->adv_images));
    ag_tensor *x_adv = batch_tensor(r, r->adv_images, rows);
    CM_TRY(ag_ctx_status(ctx));
    adv_model_output clean, adv;
    CM_TRY(forward(r, x, true, &clean));
    CM_TRY(forward(r, x_adv, true, &adv));
    if (a->router_objective == ADV_ROUTER_PAPER) {
        *loss = rank_share(
            r, adv_trades_loss(ctx, clean.logits, adv.logits, r->labels, 1.0f, (float)a->beta));
        return ag_ctx_status(ctx);
    }
    for (int i = 0; i < rows; i++) r->route_labels[i] = r->labels[i] % E;
    ag_tensor *total = NULL;
    for (int k = 0; k < clean.n_routers; k++) {
        ag_tensor *term = adv_trades_loss(ctx, clean.router_logits[k], adv.router_logits[k],
                                          r->route_labels, (float)a->router_weight, (float)a->beta);
        total = total ? ag_add(ctx, total, term) : term;
    }
    if (!total) return CM_ERR(CM_ERR_INTERNAL, "advmoe router step on a model without routers");
    *loss = rank_share(r, total);
    return ag_ctx_status(ctx);
}

cm_status cnn_run_router_step(cnn_run *r, int64_t step, double *loss_out) {
    if (r->recipe->adversarial.mode != ADV_MODE_ADVMOE)
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
    if (r->recipe->adversarial.mode != ADV_MODE_ADVMOE) return CM_OK;
    double router_loss;
    return cnn_run_router_step(r, step, &router_loss);
}

/* ---- evaluation --------------------------------------------------------------------- */

/* Nothing measured yet: NAN everywhere, no images. */
static void clear_eval(cnn_eval_result *eval) {
    *eval = (cnn_eval_result){.sa = NAN,
                              .ra = NAN,
                              .ra_worst = NAN,
                              .router_robustness = NAN,
                              .expert_ra = NAN,
                              .router_only_ra = NAN};
}

/* counts summed over the ranks -> *eval. */
static cm_status finish_eval(cnn_run *r, adv_eval_counts *counts, bool robust,
                             cnn_eval_result *eval) {
    const int R = counts->n_routers;
    int64_t packed[6 + ADV_MAX_ROUTERS] = {
        counts->images,         counts->clean_correct,       counts->robust_correct,
        counts->expert_correct, counts->router_only_correct, counts->worst_correct};
    memcpy(packed + 6, counts->routes_kept, (size_t)R * sizeof(int64_t));
    CM_TRY(comm_sum_int64(world(r), packed, 6 + R));
    const int64_t images = packed[0];
    if (images == 0)
        return CM_ERR(CM_ERR_INVALID, "%s: no images to evaluate", r->test.images_path);
    const double n = (double)images;
    clear_eval(eval);
    eval->images = images;
    eval->n_routers = R;
    eval->sa = (double)packed[1] / n;
    if (!robust) return CM_OK;
    eval->ra = (double)packed[2] / n;
    eval->ra_worst = (double)packed[5] / n;
    if (R == 0) return CM_OK;
    eval->expert_ra = (double)packed[3] / n;
    if (r->model.config.routing == MOE_CNN_ROUTING_IMAGE)
        eval->router_only_ra = (double)packed[4] / n;
    double sum = 0.0;
    for (int k = 0; k < R; k++) {
        eval->router_robustness_per_router[k] = (double)packed[6 + k] / n;
        sum += eval->router_robustness_per_router[k];
    }
    eval->router_robustness = sum / R;
    return CM_OK;
}

/* The evaluation of cnn_trainer.h on `dataset`; every rank takes its rows of
 * each batch and the counts are summed. */
static cm_status evaluate(cnn_run *r, const idx_dataset *dataset, int64_t max_batches,
                          cnn_eval_result *eval) {
    const cm_recipe *recipe = r->recipe;
    const cm_adversarial_cfg *a = &recipe->adversarial;
    idx_eval_iter iter;
    CM_TRY(idx_eval_begin(&iter, dataset, recipe->data.batch_size, r->rank, r->ranks, max_batches));
    cm_rng_key key = {(uint64_t)recipe->train.seed, 0, ATTACK_EVAL, CM_RNG_ATTACK};
    adv_attack_config attack =
        adv_pgd_config((float)a->eps, (float)a->eval_step_size, a->eval_steps, key);
    if (r->attacked.num_experts > 0) attack.router_weight = (float)a->eval_router_weight;
    const bool robust = a->eval_steps > 0;
    adv_eval_counts counts = {.n_routers = moe_cnn_router_count(&r->model)};
    const uint64_t pixels = (uint64_t)(r->height * r->width);
    cm_status status = CM_OK;
    for (;;) {
        int rows = 0;
        int batch = idx_eval_next(&iter, r->images, r->labels, &rows);
        if (batch == 0) break;
        if (rows == 0) continue; /* a short last batch may leave a rank nothing */
        uint64_t first =
            (uint64_t)iter.batch_first + (uint64_t)shard_rows(batch, r->rank, r->ranks).begin;
        ag_ctx_reset(&r->ctx);
        ag_tensor *x = batch_tensor(r, r->images, rows);
        status = x ? adv_moe_cnn_evaluate(&r->ctx, &r->attacked, robust ? &attack : NULL, x,
                                          r->labels, first * pixels, r->adv_images, &counts)
                   : ag_ctx_status(&r->ctx);
        if (status != CM_OK) break;
    }
    ag_ctx_reset(&r->ctx);
    /* A rank's failure ends the whole job (cmoe train aborts), so the others
     * do not wait here for it. */
    CM_TRY(status);
    return finish_eval(r, &counts, robust, eval);
}

/* -1 for NAN (JSON has no NaN). */
static double json_number(double value) {
    return isnan(value) ? -1.0 : value;
}

void cnn_eval_describe(const cm_recipe *recipe, const cnn_eval_result *eval, char *buf,
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
#undef APPEND
}

/* ---- the run -------------------------------------------------------------------------- */

static cm_status open_test(cnn_run *r, cm_split split) {
    if (r->test_open) return CM_OK;
    const cm_data_cfg *d = &r->recipe->data;
    cm_status status =
        split == CM_SPLIT_TRAIN
            ? open_split(&r->test, d->path, d->labels_path, "data.path / data.labels_path")
            : open_split(&r->test, d->test_path, d->test_labels_path,
                         "data.test_path / data.test_labels_path");
    r->test_open = status == CM_OK;
    /* The batch buffers are sized by the training images. */
    if (status == CM_OK && r->height > 0 &&
        (r->test.height != r->height || r->test.width != r->width))
        return CM_ERR(CM_ERR_FORMAT, "%s holds %dx%d images, the training data %dx%d",
                      r->test.images_path, r->test.height, r->test.width, r->height, r->width);
    return status;
}

static cm_status run_open(const cm_recipe *recipe, const cm_comm *comm, cnn_run **out) {
    *out = NULL;
    cnn_run *r = calloc(1, sizeof *r);
    if (!r) return CM_ERR(CM_ERR_NOMEM, "out of memory");
    cm_status status = build(r, recipe, comm);
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

cm_status cnn_run_open(const cm_recipe *recipe, cnn_run **out) {
    return run_open(recipe, NULL, out);
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

cm_status cnn_run_evaluate(cnn_run *r, int64_t max_batches, cnn_eval_result *eval) {
    CM_TRY(open_test(r, CM_SPLIT_TEST));
    return evaluate(r, &r->test, max_batches, eval);
}

/* Fails unless every rank holds the same parameters (a replica that drifted
 * would make rank 0's checkpoint another model than the others train). */
static cm_status check_replicas(cnn_run *r, int64_t step) {
    if (r->ranks == 1) return CM_OK;
    const ag_param_buffer *dense = &r->params.buffers[AG_GROUP_DENSE];
    const unsigned char *bytes = (const unsigned char *)dense->data;
    uint32_t hash = 2166136261u; /* FNV-1a */
    for (size_t i = 0; i < dense->numel * sizeof(float); i++) hash = (hash ^ bytes[i]) * 16777619u;
    int64_t sums[2] = {(int64_t)hash, 0};
    CM_TRY(comm_sum_int64(world(r), sums, 1));
    sums[1] = sums[0] != (int64_t)hash * r->ranks;
    CM_TRY(comm_sum_int64(world(r), sums + 1, 1));
    if (sums[1] != 0)
        return CM_ERR(CM_ERR_INTERNAL, "the ranks hold different parameters at step %lld",
                      (long long)step);
    return CM_OK;
}

/* Continues from `resume`; the optimizer step counts come back with it. */
static cm_status resume_from(cnn_run *r, const char *resume, int64_t *start_step) {
    ckpt_meta meta;
    bool found;
    *start_step = 0;
    CM_TRY(run_resume(r->recipe, r->checkpoint_dir, resume, &r->params, r->comm, &meta, &found));
    if (!found) return CM_OK;
    r->theta_state.step = meta.optimizer_step;
    /* advmoe takes one router step per theta step. */
    r->router_state.step = r->recipe->adversarial.mode == ADV_MODE_ADVMOE ? meta.optimizer_step : 0;
    *start_step = meta.step;
    return CM_OK;
}

static cm_status test_eval(cnn_run *r, cm_metrics *metrics, cm_progress *progress, int64_t step,
                           cnn_trainer_result *result) {
    const cm_adversarial_cfg *a = &r->recipe->adversarial;
    cnn_eval_result eval;
    CM_TRY(evaluate(r, &r->test, r->recipe->train.eval_batches, &eval));
    result->eval = eval;
    char routers[2048] = "";
    if (eval.n_routers > 0) {
        size_t used = (size_t)snprintf(
            routers, sizeof routers,
            ", \"router_robustness\": %.6f, \"expert_ra\": %.6f, \"router_only_ra\": %.6f, "
            "\"router_robustness_per_router\": [",
            json_number(eval.router_robustness), json_number(eval.expert_ra),
            json_number(eval.router_only_ra));
        for (int k = 0; k < eval.n_routers && used < sizeof routers; k++)
            used += (size_t)snprintf(routers + used, sizeof routers - used, "%s%.6f", k ? ", " : "",
                                     json_number(eval.router_robustness_per_router[k]));
        if (used < sizeof routers)
            snprintf(routers + used, sizeof routers - used, "], \"ra_worst\": %.6f",
                     json_number(eval.ra_worst));
    }
    metrics_write(metrics,
                  "{\"kind\": \"test\", \"step\": %lld, \"sa\": %.6f, \"ra\": %.6f, \"images\": "
                  "%lld, \"eval_steps\": %d, \"eps\": %.6g, \"eval_router_weight\": %.6g%s}",
                  (long long)step, eval.sa, json_number(eval.ra), (long long)eval.images,
                  a->eval_steps, a->eps, a->eval_router_weight, routers);
    char text[2048];
    cnn_eval_describe(r->recipe, &eval, text, sizeof text);
    progress_print(progress, "step %lld  test %s", (long long)step, text);
    return CM_OK;
}

/* Saves a checkpoint (collective: rank 0 writes) after checking the replicas. */
static cm_status save(cnn_run *r, int64_t step, cm_progress *progress, cnn_trainer_result *result) {
    CM_TRY(check_replicas(r, step));
    CM_TRY(run_save_checkpoint(r->recipe, r->checkpoint_dir, r->recipe_text, &r->params, step,
                               r->theta_state.step, r->comm, result->last_checkpoint,
                               sizeof result->last_checkpoint));
    progress_print(progress, "saved %s", result->last_checkpoint);
    return CM_OK;
}

static cm_status train_loop(cnn_run *r, const trainer_options *options,
                            cnn_trainer_result *result) {
    const cm_recipe *recipe = r->recipe;
    const cm_train_cfg *train = &recipe->train;
    CM_TRY(open_test(r, CM_SPLIT_TEST));
    CM_TRY(run_make_dirs(r->run_dir));
    CM_TRY(run_make_dirs(r->checkpoint_dir));
    int64_t start = 0;
    if (options->resume) CM_TRY(resume_from(r, options->resume, &start));
    cm_metrics metrics = {0};
    if (r->leader) CM_TRY(metrics_open(&metrics, r->run_dir, start > 0 ? start : -1));
    moe_cnn_flops_report flops = moe_cnn_flops(&r->model.config, r->height, r->width);
    result->flops = flops.total;
    metrics_write(&metrics,
                  "{\"kind\": \"model\", \"step\": %lld, \"flops\": %lld, \"backbone_flops\": "
                  "%lld, \"router_flops\": %lld, \"parameters\": %lld, \"experts\": %d, "
                  "\"ranks\": %d}",
                  (long long)start, (long long)flops.total, (long long)flops.backbone,
                  (long long)flops.router, (long long)ag_params_count(&r->params, AG_GROUP_DENSE),
                  r->model.config.num_experts, r->ranks);
    cm_progress progress;
    progress_init(&progress, stdout, start, train->steps, !options->quiet && r->leader);
    progress_print(&progress, "inference: %.2f M multiply-adds per image (routers %.3f M)",
                   (double)flops.total / 1e6, (double)flops.router / 1e6);
    if (r->ranks > 1)
        progress_print(&progress,
                       "%d ranks, data parallel: %d or %d images each per batch of %d (model "
                       "replicated, per-rank batch-norm statistics)",
                       r->ranks, recipe->data.batch_size / r->ranks,
                       (recipe->data.batch_size + r->ranks - 1) / r->ranks,
                       recipe->data.batch_size);
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
        if (r->ranks > 1) { /* a signal may reach only some ranks: stop together */
            int64_t any = stop;
            if ((status = comm_sum_int64(world(r), &any, 1)) != CM_OK) break;
            stop = any > 0;
        }
        if (train->eval_every > 0 && step % train->eval_every == 0 && step != train->steps &&
            !stop) {
            if ((status = test_eval(r, &metrics, &progress, step, result)) != CM_OK) break;
        }
        bool periodic = recipe->checkpoint.every > 0 && step % recipe->checkpoint.every == 0;
        if (periodic || stop || step == train->steps) {
            if ((status = save(r, step, &progress, result)) != CM_OK) break;
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
    *result = (cnn_trainer_result){0};
    clear_eval(&result->eval);
    cnn_run *r = NULL;
    CM_TRY(run_open(recipe, options->comm, &r));
    cm_status status = train_loop(r, options, result);
    cnn_run_close(r);
    return status;
}

cm_status cnn_trainer_evaluate(const cm_recipe *recipe, const char *checkpoint, cm_split split,
                               int64_t max_batches, cnn_eval_result *eval) {
    clear_eval(eval);
    cnn_run *r = calloc(1, sizeof *r);
    if (!r) return CM_ERR(CM_ERR_NOMEM, "out of memory");
    cm_status status = build(r, recipe, NULL);
    if (status == CM_OK) status = ckpt_load_sharded(checkpoint, &r->params, NULL, false, NULL);
    if (status == CM_OK) status = open_test(r, split);
    if (status == CM_OK) status = alloc_batch(r, r->test.height, r->test.width);
    if (status == CM_OK) status = evaluate(r, &r->test, max_batches, eval);
    run_free(r);
    free(r);
    return status;
}
