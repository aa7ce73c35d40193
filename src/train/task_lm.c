/* The byte-level transformer LM as a task of the run loop (train/task.h):
 * the model of layers/transformer.h, text batches of data/text.h, the mean
 * cross-entropy as the loss (plus the routers' losses, and, for a router
 * whose registry row asks for several passes per step, those passes' losses
 * and their consistency term), bits per byte in evaluation, and the routing
 * statistics of the log window as "moe" lines (one per MoE layer).
 *
 * Evaluation: periodic on the validation split (train.eval_batches
 * batches), final on the whole test split; routers use router.eval_k when
 * set. A batch's rows are split over the ranks (data/shard.h); every rank
 * runs the MoE exchanges of every batch, even one with no rows.
 *
 * Routers updated once per optimizer step (bias balancing): the kept tokens
 * per expert of every training pass of the step are summed (step_load) and
 * handed to router_update_expert_biases after the update (phase_end). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "data/text.h"
#include "layers/transformer.h"
#include "train/recipe_moe.h"
#include "train/routing_mi.h"
#include "train/task.h"

#define LN2 0.69314718055994530942

typedef struct lm_task {
    task_env env;
    lm_model model;
    text_dataset train, valid, test;
    int32_t *inputs, *targets; /* [B*T] each */
    shard_range rows;          /* this rank's rows of every training micro-batch */
    int micro_batches;         /* train.grad_accum */
    /* Router registry row: forward passes per step and their consistency weight. */
    int passes;
    float consistency;
    /* Routing statistics summed over the current log window. */
    int moe_layers, num_experts;
    int64_t *window_load; /* [moe_layers][E] tokens routed to each expert */
    int64_t window_tokens, window_slots[LM_MAX_LAYERS], window_dropped[LM_MAX_LAYERS];
    double window_entropy[LM_MAX_LAYERS];
    int window_k[LM_MAX_LAYERS];
    int window_reports;
    bool window_summed; /* the window's statistics are the global batch's already */
    /* Per-step router updates: [moe_layers][E] kept tokens per expert of the
     * step's training passes; NULL when no router needs them. */
    int64_t *step_load;
    const router *routers[LM_MAX_LAYERS];
    int64_t *eval_load; /* [moe_layers][E], an evaluation's kept tokens per expert */
    /* [moe_layers-1][E][E]: an evaluation's top-1 pairs of consecutive MoE
     * layers (routing_mi.h); NULL with fewer than two MoE layers. */
    int64_t *eval_top1_pairs;
} lm_task;

static lm_config model_config(const task_env *env) {
    const cm_recipe *recipe = env->recipe;
    const cm_model_cfg *m = &recipe->model;
    lm_config config = {.vocab = m->vocab_size,
                        .d_model = m->d_model,
                        .n_layer = m->n_layers,
                        .n_head = m->n_heads,
                        .d_ff = m->d_ff,
                        .max_seq = recipe->data.seq_len,
                        .dropout = (float)m->dropout,
                        .init_std = (float)m->init_std,
                        .scale_residual_init = m->scale_residual_init,
                        .layernorm_eps = (float)m->layernorm_eps,
                        .checkpoint_blocks = recipe->train.recompute == CM_RECOMPUTE_ALL};
    if (recipe->moe.enabled) {
        config.moe_every = recipe->moe.every;
        recipe_moe_config(recipe, &config.moe);
        config.moe.timing = env->timing;
        if (env->comm) {
            config.moe.ep_group = env->comm->ep;
            config.moe.ep_rank = env->comm->ep_rank;
            config.moe.ep_size = env->comm->ep_size;
            config.moe.shadow = recipe->parallel.shadow_experts;
            config.moe.shadow_float_cost = recipe->parallel.shadow_float_cost;
        }
    }
    return config;
}

/* Entries of eval_top1_pairs. */
static size_t top1_pair_count(const lm_task *t) {
    return (size_t)(t->moe_layers - 1) * (size_t)t->num_experts * (size_t)t->num_experts;
}

static void lm_destroy(void *state) {
    lm_task *t = state;
    if (!t) return;
    free(t->window_load);
    free(t->step_load);
    free(t->eval_load);
    free(t->eval_top1_pairs);
    free(t->inputs);
    free(t->targets);
    text_dataset_close(&t->train);
    text_dataset_close(&t->valid);
    text_dataset_close(&t->test);
    free(t);
}

static cm_status lm_create_into(lm_task *t) {
    const cm_recipe *recipe = t->env.recipe;
    lm_config config = model_config(&t->env);
    if (t->env.comm && recipe->moe.enabled)
        CM_TRY(comm_check_experts(t->env.comm, recipe->moe.num_experts));
    CM_TRY(lm_declare(&t->model, &config, t->env.params));
    for (int l = 0; l < config.n_layer; l++) t->moe_layers += t->model.blocks[l].is_moe;
    t->num_experts = recipe->moe.enabled ? recipe->moe.num_experts : 0;
    t->passes = 1;
    if (t->moe_layers > 0) {
        t->passes = router_passes_per_step(&config.moe.router);
        t->consistency = router_pass_consistency(&config.moe.router);
        if (t->passes < 1 || t->passes > 2)
            return CM_ERR(CM_ERR_INVALID,
                          "router %s asks for %d forward passes per step; the LM "
                          "task runs 1 or 2",
                          router_kind_name(config.moe.router.kind), t->passes);
        const size_t loads = (size_t)t->moe_layers * (size_t)t->num_experts;
        t->window_load = calloc(loads, sizeof(int64_t));
        t->eval_load = calloc(loads, sizeof(int64_t));
        if (router_updates_per_step(&config.moe.router))
            t->step_load = calloc(loads, sizeof(int64_t));
        if (t->moe_layers > 1) t->eval_top1_pairs = calloc(top1_pair_count(t), sizeof(int64_t));
        if (!t->window_load || !t->eval_load || (t->moe_layers > 1 && !t->eval_top1_pairs) ||
            (router_updates_per_step(&config.moe.router) && !t->step_load))
            return CM_ERR(CM_ERR_NOMEM, "out of memory");
        for (int l = 0, i = 0; l < config.n_layer; l++)
            if (t->model.blocks[l].is_moe) t->routers[i++] = &t->model.blocks[l].moe.router;
    }
    size_t tokens = (size_t)recipe->data.batch_size * (size_t)recipe->data.seq_len;
    t->inputs = malloc(tokens * sizeof *t->inputs);
    t->targets = malloc(tokens * sizeof *t->targets);
    if (!t->inputs || !t->targets) return CM_ERR(CM_ERR_NOMEM, "cannot allocate batch buffers");
    t->rows = shard_rows(recipe->data.batch_size, t->env.rank, t->env.ranks);
    t->micro_batches = recipe->train.grad_accum;
    return CM_OK;
}

static cm_status lm_create(const task_env *env, void **state) {
    lm_task *t = calloc(1, sizeof *t);
    if (!t) return CM_ERR(CM_ERR_NOMEM, "out of memory");
    t->env = *env;
    cm_status status = lm_create_into(t);
    if (status != CM_OK) {
        lm_destroy(t);
        return status;
    }
    *state = t;
    return CM_OK;
}

static cm_status open_split(const char *path, const char *what, text_dataset *dataset) {
    if (dataset->bytes) return CM_OK; /* already open */
    if (path[0] == '\0') return CM_ERR(CM_ERR_INVALID, "data.%s is empty", what);
    cm_status status = text_dataset_open(dataset, path);
    if (status != CM_OK) return cm_error_wrap(status, "data.%s", what);
    return CM_OK;
}

static cm_status lm_open(void *state, bool with_train) {
    lm_task *t = state;
    const cm_data_cfg *data = &t->env.recipe->data;
    if (with_train) {
        CM_TRY(open_split(data->path, "path", &t->train));
        if (t->env.recipe->train.eval_every > 0)
            CM_TRY(open_split(data->valid_path, "valid_path", &t->valid));
        CM_TRY(open_split(data->test_path, "test_path", &t->test));
    }
    return CM_OK;
}

static void lm_describe(void *state, cm_progress *progress) {
    lm_task *t = state;
    const cm_recipe *recipe = t->env.recipe;
    const cm_model_cfg *m = &recipe->model;
    progress_print(progress,
                   "[cmoe] %d layers, d_model %d, %d heads, d_ff %d, seq_len %d, batch %d, %lld "
                   "steps, data %s",
                   m->n_layers, m->d_model, m->n_heads, m->d_ff, recipe->data.seq_len,
                   recipe->data.batch_size, (long long)recipe->train.steps, recipe->data.path);
    if (t->moe_layers > 0)
        progress_print(progress, "[cmoe] %d MoE layers of %d experts, router %s", t->moe_layers,
                       t->num_experts, router_kind_name(t->model.config.moe.router.kind));
    if (t->env.comm && t->env.ranks > 1)
        progress_print(progress, "[cmoe] %d ranks: %d expert-parallel x %d data-parallel",
                       t->env.ranks, t->env.comm->ep_size, t->env.comm->dp_size);
}

static void lm_model_fields(void *state, metrics_record *record) {
    lm_task *t = state;
    metrics_add_integer(record, "moe_layers", t->moe_layers);
    metrics_add_integer(record, "experts", t->num_experts);
}

static int64_t lm_items_per_step(void *state) {
    const lm_task *t = state;
    return (int64_t)t->env.recipe->data.batch_size * t->env.recipe->data.seq_len * t->micro_batches;
}

/* Model FLOPs of one step (BENCH.md's formula): tokens x (6 N_active +
 * 12 n_layer seq_len d_model), N_active = n_layer (4 d^2 + FFN) + d vocab,
 * FFN = 2 d d_ff (dense) or k m d h + d E (MoE), m = the expert's matrices:
 * 2, or 3 with swiglu (W1, W3 and W2). */
static double lm_model_flops(void *state) {
    const cm_recipe *recipe = ((lm_task *)state)->env.recipe;
    const cm_model_cfg *m = &recipe->model;
    const double d = m->d_model, tokens = (double)recipe->data.batch_size * recipe->data.seq_len *
                                          recipe->train.grad_accum;
    double active = d * m->vocab_size;
    for (int l = 0; l < m->n_layers; l++) {
        double ffn = 2.0 * d * m->d_ff;
        if (recipe_layer_is_moe(recipe, l))
            ffn = recipe->router.k * (recipe->moe.activation == AG_ACT_SWIGLU ? 3.0 : 2.0) * d *
                      recipe_expert_hidden(recipe) +
                  d * recipe->moe.num_experts;
        active += 4.0 * d * d + ffn;
    }
    return tokens * (6.0 * active + 12.0 * m->n_layers * (double)recipe->data.seq_len * d);
}

/* Micro-batch m of a step is rows [m B, (m + 1) B) of the step's batch of
 * grad_accum x B windows: the same windows, masks and noise as one batch of
 * that size (every draw is keyed by the global row). */
static shard_range micro_rows(const lm_task *t, int micro) {
    const int first = micro * t->env.recipe->data.batch_size;
    return (shard_range){first + t->rows.begin, first + t->rows.end};
}

static cm_status lm_load(void *state, int64_t step, int micro) {
    lm_task *t = state;
    const cm_recipe *recipe = t->env.recipe;
    return text_dataset_batch(&t->train, (uint64_t)recipe->train.seed, (uint64_t)step,
                              recipe->data.batch_size * t->micro_batches, recipe->data.seq_len,
                              micro_rows(t, micro), t->inputs, t->targets);
}

/* Adds the kept tokens per expert of each MoE layer of a pass to
 * loads [moe_layers][E]. */
static void add_loads(const lm_task *t, const lm_moe_report *report, int64_t *loads) {
    for (int i = 0; i < report->n_layers; i++) {
        int64_t *load = loads + (size_t)i * (size_t)t->num_experts;
        for (int e = 0; e < t->num_experts; e++) load[e] += report->stats[i].tokens_per_expert[e];
    }
}

/* Adds one forward pass's routing statistics to the log window (and to the
 * step's loads when a router updates per step). */
static void record_routing(lm_task *t, const lm_moe_report *report) {
    add_loads(t, report, t->window_load);
    if (t->step_load) add_loads(t, report, t->step_load);
    for (int i = 0; i < report->n_layers; i++) {
        const router_stats *stats = &report->stats[i];
        t->window_slots[i] += stats->slots;
        t->window_dropped[i] += stats->dropped;
        t->window_entropy[i] += isnan(stats->entropy) ? 0.0 : stats->entropy;
        t->window_k[i] = stats->k;
    }
    if (report->n_layers > 0) {
        t->window_tokens += report->stats[0].tokens;
        t->window_reports++;
    }
}

/* The loss of a micro-batch: each pass's mean cross-entropy times this
 * rank's share of the step's batch; with several passes (the router's
 * registry row), their sum plus the weighted consistency between the two
 * (THOR, METHODS.md 2.2); plus the routers' losses, computed on the
 * micro-batch (as Megatron does) and divided by the number of micro-batches. */
static cm_status lm_phase_loss(void *state, int phase, int64_t step, int micro, task_loss *out) {
    (void)phase;
    lm_task *t = state;
    const cm_recipe *recipe = t->env.recipe;
    const int B = recipe->data.batch_size, T = recipe->data.seq_len;
    const int local_rows = t->rows.end - t->rows.begin;
    const float share = (float)local_rows / (float)(B * t->micro_batches);
    ag_ctx *ctx = t->env.ctx;
    lm_moe_report reports[2];
    ag_tensor *logits[2] = {NULL, NULL}, *losses[2] = {NULL, NULL};
    for (int pass = 0; pass < t->passes; pass++) {
        lm_forward_args args = {.ids = t->inputs,
                                .batch = local_rows,
                                .seq_len = T,
                                .training = true,
                                .seed = (uint64_t)recipe->train.seed,
                                .step = (uint64_t)step,
                                .first_row = (uint64_t)micro_rows(t, micro).begin,
                                .pass = pass,
                                .micro = micro,
                                .report = &reports[pass],
                                .group = t->env.world,
                                .global_tokens = (int64_t)B * T};
        logits[pass] = lm_forward(ctx, &t->model, &args);
        losses[pass] = ag_scale(ctx, lm_loss(ctx, logits[pass], t->targets), share);
    }
    ag_tensor *total = losses[0];
    if (t->passes > 1) {
        ag_tensor *consistency = lm_thor_consistency(ctx, logits[0], logits[1]);
        total = ag_add(ctx, ag_add(ctx, losses[0], losses[1]),
                       ag_scale(ctx, consistency, t->consistency * share));
        CM_TRY(ag_ctx_status(ctx));
        record_routing(t, &reports[1]);
    }
    ag_tensor *aux = reports[0].aux_loss;
    if (aux && t->micro_batches > 1) aux = ag_scale(ctx, aux, 1.0f / (float)t->micro_batches);
    if (aux) total = ag_add(ctx, total, aux);
    CM_TRY(ag_ctx_status(ctx));
    record_routing(t, &reports[0]);
    *out = (task_loss){.objective = total,
                       .loss = losses[0],
                       .loss2 = t->passes > 1 ? losses[1] : NULL,
                       .aux = aux};
    return CM_OK;
}

/* After a phase's update: the routers' once-per-step update from the step's
 * global loads (collective); the loads start again either way. */
static cm_status lm_phase_end(void *state, int phase, bool completed) {
    (void)phase;
    lm_task *t = state;
    if (!t->step_load) return CM_OK;
    cm_status status = CM_OK;
    if (completed)
        status = router_update_expert_biases(t->routers, t->moe_layers, t->step_load, t->env.world);
    memset(t->step_load, 0, (size_t)t->moe_layers * (size_t)t->num_experts * sizeof(int64_t));
    return status;
}

/* Mean over the MoE layers of max_e load[e] / mean_e load[e] (1: perfect
 * balance, E: one expert takes everything; MaxVio + 1 of Wang et al.) from
 * loads [moe_layers][E]; 0 without tokens. */
static double mean_max_over_mean(const lm_task *t, const int64_t *loads) {
    double total = 0.0;
    for (int i = 0; i < t->moe_layers; i++) {
        const int64_t *load = loads + (size_t)i * (size_t)t->num_experts;
        int64_t max_load = 0, sum = 0;
        for (int e = 0; e < t->num_experts; e++) {
            max_load = load[e] > max_load ? load[e] : max_load;
            sum += load[e];
        }
        if (sum > 0) total += (double)max_load * t->num_experts / (double)sum;
    }
    return t->moe_layers > 0 ? total / t->moe_layers : 0.0;
}

/* Mean activated experts per token over the MoE layers of the window. */
static double window_mean_k(const lm_task *t) {
    if (t->moe_layers == 0 || t->window_tokens == 0) return 0.0;
    double total = 0.0;
    for (int i = 0; i < t->moe_layers; i++) total += (double)t->window_slots[i];
    return total / ((double)t->window_tokens * t->moe_layers);
}

static void lm_progress_text(void *state, double loss, char *buffer, size_t size) {
    lm_task *t = state;
    int written = snprintf(buffer, size, "  bpc %.3f", loss / LN2);
    if (t->moe_layers > 0 && written > 0 && (size_t)written < size)
        snprintf(buffer + written, size - (size_t)written, "  k %.2f", window_mean_k(t));
}

/* The routing statistics of the global batch: summed over the ranks (once
 * per window). */
static cm_status sum_window(lm_task *t) {
    if (t->window_summed) return CM_OK;
    t->window_summed = true;
    if (t->env.ranks == 1) return CM_OK;
    MPI_Comm group = t->env.world;
    CM_TRY(comm_sum_int64(group, t->window_load, t->moe_layers * t->num_experts));
    CM_TRY(comm_sum_int64(group, t->window_slots, t->moe_layers));
    CM_TRY(comm_sum_int64(group, t->window_dropped, t->moe_layers));
    CM_TRY(comm_sum_int64(group, &t->window_tokens, 1));
    CM_TRY(comm_sum_doubles(group, t->window_entropy, t->moe_layers));
    for (int i = 0; i < t->moe_layers; i++) t->window_entropy[i] /= t->env.ranks;
    return CM_OK;
}

/* bits per byte of the window's mean loss, the window's mean k (this
 * rank's tokens; the "moe" lines have the global batch's) and its expert
 * loads' max over mean, averaged over the MoE layers (global batch).
 * Collective: sums the window over the ranks. */
static cm_status lm_window_fields(void *state, double mean_loss, metrics_record *line) {
    lm_task *t = state;
    metrics_add_number(line, "bpc", mean_loss / LN2, "%.6f");
    metrics_add_number(line, "mean_k", window_mean_k(t), "%.4f");
    if (t->moe_layers == 0 || t->window_reports == 0) return CM_OK;
    CM_TRY(sum_window(t));
    metrics_add_number(line, "load_max_over_mean", mean_max_over_mean(t, t->window_load), "%.4f");
    return CM_OK;
}

/* The block of the i-th MoE layer. */
static int moe_block_index(const lm_task *t, int i) {
    for (int l = 0, seen = 0; l < t->model.config.n_layer; l++)
        if (t->model.blocks[l].is_moe && seen++ == i) return l;
    return 0;
}

/* One "moe" line per MoE layer, then the window starts again. */
static cm_status lm_write_window(void *state, cm_metrics *metrics, cm_progress *progress,
                                 int64_t step) {
    (void)progress;
    lm_task *t = state;
    if (t->moe_layers == 0 || t->window_reports == 0) return CM_OK;
    CM_TRY(sum_window(t));
    for (int i = 0; i < t->moe_layers; i++) {
        const int64_t *load = t->window_load + (size_t)i * (size_t)t->num_experts;
        int64_t max_load = 0;
        for (int e = 0; e < t->num_experts; e++) max_load = load[e] > max_load ? load[e] : max_load;
        double mean_load = (double)t->window_slots[i] / t->num_experts;
        double candidates = (double)(t->window_slots[i] + t->window_dropped[i]);
        metrics_record line = metrics_record_start("moe", step);
        metrics_add_integer(&line, "layer", moe_block_index(t, i));
        metrics_add_number(&line, "mean_k", (double)t->window_slots[i] / (double)t->window_tokens,
                           "%.4f");
        metrics_add_integer(&line, "k", t->window_k[i]);
        metrics_add_number(&line, "entropy", t->window_entropy[i] / t->window_reports, "%.4f");
        metrics_add_number(&line, "dropped_fraction",
                           candidates > 0 ? (double)t->window_dropped[i] / candidates : 0.0,
                           "%.4f");
        metrics_add_number(&line, "load_max_over_mean",
                           mean_load > 0 ? (double)max_load / mean_load : 0.0, "%.4f");
        metrics_add_integers(&line, "tokens_per_expert", load, t->num_experts);
        CM_TRY(metrics_write_record(metrics, &line));
    }
    memset(t->window_load, 0, (size_t)t->moe_layers * (size_t)t->num_experts * sizeof(int64_t));
    memset(t->window_slots, 0, sizeof t->window_slots);
    memset(t->window_dropped, 0, sizeof t->window_dropped);
    memset(t->window_entropy, 0, sizeof t->window_entropy);
    t->window_tokens = 0;
    t->window_reports = 0;
    t->window_summed = false;
    return CM_OK;
}

static task_eval_plan lm_eval_plan(void *state) {
    const cm_recipe *recipe = ((lm_task *)state)->env.recipe;
    return (task_eval_plan){
        .periodic = {.split = CM_SPLIT_VALID,
                     .max_batches = recipe->train.eval_batches,
                     .k_override = recipe->router.eval_k},
        .final = {.split = CM_SPLIT_TEST, .max_batches = 0, .k_override = recipe->router.eval_k},
        .final_differs = true};
}

static bool lm_takes_k(void *state) {
    const lm_task *t = state;
    return t->moe_layers > 0 && router_uses_k(&t->model.config.moe.router);
}

static cm_status check_request(lm_task *t, const task_eval_request *request) {
    const int k = request->k_override;
    if (k > 0 && t->moe_layers == 0)
        return CM_ERR(CM_ERR_INVALID, "a k for the routers was given, but the model has no MoE");
    const int choices = t->moe_layers > 0 ? router_choices(&t->model.config.moe.router) : 0;
    if (k > choices && t->moe_layers > 0)
        return CM_ERR(CM_ERR_INVALID, "k = %d exceeds the %d experts the routers choose among", k,
                      choices);
    return CM_OK;
}

static text_dataset *split_dataset(lm_task *t, cm_split split) {
    static const char *const keys[CM_SPLIT_COUNT] = {"valid_path", "test_path", "path"};
    const cm_data_cfg *data = &t->env.recipe->data;
    const char *paths[CM_SPLIT_COUNT] = {data->valid_path, data->test_path, data->path};
    text_dataset *datasets[CM_SPLIT_COUNT] = {&t->valid, &t->test, &t->train};
    cm_status status = open_split(paths[split], keys[split], datasets[split]);
    return status == CM_OK ? datasets[split] : NULL;
}

/* An evaluation's experts per token: "mean_k" over the MoE layers and
 * "layer_mean_k" per MoE layer, from the kept (token, expert) pairs of every
 * rank (routed[moe_layers]: the tokens); and "layer_expert_tokens", the
 * kept pairs of each expert, layer-major (t->eval_load); and with two MoE
 * layers or more "layer_top1_mi" (routing_mi.h). */
static void add_routing_fields(lm_task *t, const int64_t *routed, task_eval *out) {
    const int64_t tokens = routed[t->moe_layers];
    if (t->moe_layers == 0 || tokens == 0) return;
    const int loads = t->moe_layers * t->num_experts;
    if (loads <= TASK_EVAL_COUNTS_MAX) {
        memcpy(out->counts, t->eval_load, (size_t)loads * sizeof(int64_t));
        metrics_add_integers(&out->record, "layer_expert_tokens", out->counts, loads);
    }
    double total = 0.0;
    for (int i = 0; i < t->moe_layers; i++) {
        out->per_router[i] = (double)routed[i] / (double)tokens;
        total += out->per_router[i];
    }
    metrics_add_number(&out->record, "mean_k", total / t->moe_layers, "%.4f");
    metrics_add_numbers(&out->record, "layer_mean_k", out->per_router, t->moe_layers, "%.4f");
    metrics_add_number(&out->record, "load_max_over_mean", mean_max_over_mean(t, t->eval_load),
                       "%.4f");
    if (t->eval_top1_pairs)
        metrics_add_number(
            &out->record, "layer_top1_mi",
            routing_top1_mutual_information(t->eval_top1_pairs, t->moe_layers - 1, t->num_experts),
            "%.4f");
}

/* What an evaluation adds up over its batches, on this rank. */
typedef struct eval_sums {
    double loss_tokens[2];             /* loss x tokens, tokens */
    int64_t routed[LM_MAX_LAYERS + 1]; /* kept (token, expert) pairs per MoE layer; tokens */
    bool stopped;                      /* request->stop ended it */
} eval_sums;

/* One batch of the evaluation: the forward, its loss and routing counts
 * added to *sums. *done when the split has no batch left. */
static cm_status eval_batch(lm_task *t, const task_eval_request *request, text_eval_iter *iter,
                            eval_sums *sums, bool *done) {
    const int T = t->env.recipe->data.seq_len;
    ag_ctx *ctx = t->env.ctx;
    int64_t batch_first = iter->next_window;
    int rows = 0, windows = text_eval_next(iter, t->inputs, t->targets, &rows);
    *done = windows == 0;
    /* A rank with no rows of a short last batch still runs the MoE layers'
     * exchanges with the others. */
    if (*done || (rows == 0 && t->moe_layers == 0)) return CM_OK;
    ag_ctx_reset(ctx);
    lm_moe_report report;
    lm_forward_args args = {
        .ids = t->inputs,
        .batch = rows,
        .seq_len = T,
        .seed = (uint64_t)t->env.recipe->train.seed,
        .first_row = (uint64_t)(batch_first + shard_rows(windows, t->env.rank, t->env.ranks).begin),
        .k_override = request->k_override,
        .report = &report,
        .group = t->env.world,
        .global_tokens = (int64_t)windows * T};
    ag_tensor *logits = lm_forward(ctx, &t->model, &args);
    CM_TRY(ag_ctx_status(ctx));
    add_loads(t, &report, t->eval_load);
    if (t->eval_top1_pairs) routing_count_top1_pairs(&report, t->num_experts, t->eval_top1_pairs);
    for (int i = 0; i < report.n_layers; i++) sums->routed[i] += report.stats[i].slots;
    if (report.n_layers > 0) sums->routed[t->moe_layers] += report.stats[0].tokens;
    if (rows == 0) return CM_OK;
    ag_tensor *loss = lm_loss(ctx, logits, t->targets);
    CM_TRY(ag_ctx_status(ctx));
    sums->loss_tokens[0] += (double)loss->data[0] * rows * T;
    sums->loss_tokens[1] += (double)rows * T;
    return CM_OK;
}

/* Every batch of the split (no-grad), then the sums over the ranks. */
static cm_status eval_split(lm_task *t, const task_eval_request *request, text_dataset *dataset,
                            eval_sums *sums) {
    const cm_recipe *recipe = t->env.recipe;
    text_eval_iter iter;
    CM_TRY(text_eval_begin(&iter, dataset, recipe->data.batch_size, recipe->data.seq_len,
                           t->env.rank, t->env.ranks, request->max_batches));
    if (t->moe_layers > 0)
        memset(t->eval_load, 0, (size_t)t->moe_layers * (size_t)t->num_experts * sizeof(int64_t));
    if (t->eval_top1_pairs) memset(t->eval_top1_pairs, 0, top1_pair_count(t) * sizeof(int64_t));
    *sums = (eval_sums){0};
    bool previous = ag_set_grad_enabled(t->env.ctx, false), done = false;
    cm_status status = CM_OK;
    while (status == CM_OK && !done) {
        status = task_eval_stopped(request, t->env.world, &sums->stopped);
        if (status == CM_OK && !sums->stopped) status = eval_batch(t, request, &iter, sums, &done);
        done |= sums->stopped;
    }
    ag_set_grad_enabled(t->env.ctx, previous);
    ag_ctx_reset(t->env.ctx);
    CM_TRY(status);
    if (sums->stopped) return CM_OK;
    CM_TRY(comm_sum_doubles(t->env.world, sums->loss_tokens, 2));
    if (t->moe_layers == 0) return CM_OK;
    CM_TRY(comm_sum_int64(t->env.world, sums->routed, t->moe_layers + 1));
    if (t->eval_top1_pairs)
        CM_TRY(comm_sum_int64(t->env.world, t->eval_top1_pairs, (int)top1_pair_count(t)));
    return comm_sum_int64(t->env.world, t->eval_load, t->moe_layers * t->num_experts);
}

/* Mean cross-entropy (nats) over a split, in no-grad mode (THOR draws its
 * inference experts from the run seed). */
static cm_status lm_evaluate(void *state, const task_eval_request *request, int64_t step,
                             task_eval *out) {
    lm_task *t = state;
    CM_TRY(check_request(t, request));
    text_dataset *dataset = split_dataset(t, request->split);
    if (!dataset) return cm_error_wrap(CM_ERR_IO, "evaluation");
    eval_sums sums;
    CM_TRY(eval_split(t, request, dataset, &sums));
    if (sums.stopped) {
        *out = (task_eval){.stopped = true};
        return CM_OK;
    }
    if (sums.loss_tokens[1] == 0)
        return CM_ERR(CM_ERR_INVALID, "%s: too short to evaluate", dataset->path);
    static const char *const kinds[CM_SPLIT_COUNT] = {"valid", "test", "train"};
    const double loss = sums.loss_tokens[0] / sums.loss_tokens[1];
    *out = (task_eval){.headline = loss, .items = (int64_t)sums.loss_tokens[1]};
    out->record = metrics_record_start(kinds[request->split], step);
    metrics_add_number(&out->record, "loss", loss, "%.6f");
    metrics_add_number(&out->record, "bpc", loss / LN2, "%.6f");
    if (request->split != CM_SPLIT_VALID) metrics_add_integer(&out->record, "tokens", out->items);
    add_routing_fields(t, sums.routed, out);
    snprintf(out->text, sizeof out->text, "loss %.6f nats/byte, bpc %.6f over %lld bytes", loss,
             loss / LN2, (long long)out->items);
    if (request->split == CM_SPLIT_VALID)
        snprintf(out->summary, sizeof out->summary, "validation bpc %.4f", loss / LN2);
    else
        snprintf(out->summary, sizeof out->summary, "%s bpc %.4f over %lld bytes",
                 kinds[request->split], loss / LN2, (long long)out->items);
    return CM_OK;
}

const task_vtable task_lm = {
    .name = "transformer_lm",
    .item_name = "tok",
    .create = lm_create,
    .open = lm_open,
    .destroy = lm_destroy,
    .describe = lm_describe,
    .model_fields = lm_model_fields,
    .items_per_step = lm_items_per_step,
    .model_flops_per_step = lm_model_flops,
    .load = lm_load,
    .phase_loss = lm_phase_loss,
    .phase_end = lm_phase_end,
    .progress_text = lm_progress_text,
    .window_fields = lm_window_fields,
    .write_window = lm_write_window,
    .eval_plan = lm_eval_plan,
    .evaluate = lm_evaluate,
    .takes_k = lm_takes_k,
};

const lm_model *task_lm_model(void *state) {
    return &((lm_task *)state)->model;
}
