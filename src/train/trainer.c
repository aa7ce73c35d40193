#include "train/trainer.h"

#include <cblas.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "common/pool.h"
#include "data/text.h"
#include "layers/transformer.h"
#include "optim/optim.h"
#include "train/checkpoint.h"
#include "train/metrics.h"
#include "train/progress.h"
#include "train/recipe_moe.h"
#include "train/run_common.h"

#define LN2 0.69314718055994530942

enum { PATH_CAPACITY = 4096 };

/* Everything a run holds; released by run_free. */
typedef struct run {
    const cm_recipe *recipe;
    const cm_comm *comm; /* NULL: one process */
    int rank, ranks;     /* in the world */
    bool leader;         /* world rank 0: prints, logs, writes files */
    char *recipe_text;
    char run_dir[PATH_CAPACITY], checkpoint_dir[PATH_CAPACITY];
    ag_params params;
    lm_model model;
    ag_ctx ctx;
    bool ctx_ready;
    text_dataset train, valid, test;
    int32_t *inputs, *targets; /* [B*T] each */
    optim_config optim;
    optim_state optim_state;
    optim_lr_schedule schedule;
    /* MoE: routing statistics summed over the current log window. */
    int moe_layers, num_experts;
    int64_t *window_load; /* [moe_layers][E] tokens routed to each expert */
    int64_t window_tokens, window_slots[LM_MAX_LAYERS], window_dropped[LM_MAX_LAYERS];
    double window_entropy[LM_MAX_LAYERS];
    int window_k[LM_MAX_LAYERS];
    int window_reports;
    double window_aux;
} run;

/* The ranks sharing the global batch (0: this process alone). */
static MPI_Comm world(const run *r) {
    return r->comm ? r->comm->world : (MPI_Comm)0;
}

static void run_free(run *r) {
    free(r->window_load);
    free(r->recipe_text);
    free(r->inputs);
    free(r->targets);
    if (r->ctx_ready) ag_ctx_free(&r->ctx);
    ag_params_free(&r->params);
    text_dataset_close(&r->train);
    text_dataset_close(&r->valid);
    text_dataset_close(&r->test);
}

static lm_config model_config(const cm_recipe *recipe) {
    const cm_model_cfg *m = &recipe->model;
    return (lm_config){.vocab = m->vocab_size,
                       .d_model = m->d_model,
                       .n_layer = m->n_layers,
                       .n_head = m->n_heads,
                       .d_ff = m->d_ff,
                       .max_seq = recipe->data.seq_len,
                       .dropout = (float)m->dropout,
                       .init_std = (float)m->init_std,
                       .scale_residual_init = m->scale_residual_init,
                       .layernorm_eps = (float)m->layernorm_eps};
}

static lm_config full_model_config(const cm_recipe *recipe) {
    lm_config config = model_config(recipe);
    if (recipe->moe.enabled) {
        config.moe_every = recipe->moe.every;
        recipe_moe_config(recipe, &config.moe);
    }
    return config;
}

/* Model, parameters, arena and batch buffers (no data, no optimizer). */
static cm_status build_model(run *r) {
    const cm_recipe *recipe = r->recipe;
    lm_config config = full_model_config(recipe);
    if (r->comm && recipe->moe.enabled) {
        CM_TRY(comm_check_experts(r->comm, recipe->moe.num_experts));
        config.moe.ep_group = r->comm->ep;
        config.moe.ep_rank = r->comm->ep_rank;
        config.moe.ep_size = r->comm->ep_size;
    }
    if (recipe->data.batch_size < r->ranks)
        return CM_ERR(CM_ERR_INVALID,
                      "data.batch_size = %d is smaller than the %d ranks of the job",
                      recipe->data.batch_size, r->ranks);
    CM_TRY(lm_declare(&r->model, &config, &r->params));
    for (int l = 0; l < config.n_layer; l++) r->moe_layers += r->model.blocks[l].is_moe;
    r->num_experts = recipe->moe.enabled ? recipe->moe.num_experts : 0;
    if (r->moe_layers > 0) {
        r->window_load = calloc((size_t)r->moe_layers * (size_t)r->num_experts, sizeof(int64_t));
        if (!r->window_load) return CM_ERR(CM_ERR_NOMEM, "out of memory");
    }
    CM_TRY(ag_params_finalize(&r->params, (uint64_t)recipe->train.seed));
    optim_apply_decay_policy(&r->params, recipe->optim.decay_norms, recipe->optim.decay_biases,
                             recipe->optim.decay_embeddings);
    CM_TRY(ag_ctx_init(&r->ctx, (size_t)recipe->train.arena_mib << 20));
    r->ctx_ready = true;
    size_t tokens = (size_t)recipe->data.batch_size * (size_t)recipe->data.seq_len;
    r->inputs = malloc(tokens * sizeof *r->inputs);
    r->targets = malloc(tokens * sizeof *r->targets);
    if (!r->inputs || !r->targets) return CM_ERR(CM_ERR_NOMEM, "cannot allocate batch buffers");
    if (recipe->train.threads > 0) cm_pool_set_threads(recipe->train.threads);
    return CM_OK;
}

static cm_status open_split(const char *path, const char *what, text_dataset *dataset) {
    if (path[0] == '\0') return CM_ERR(CM_ERR_INVALID, "data.%s is empty", what);
    cm_status status = text_dataset_open(dataset, path);
    if (status != CM_OK) return cm_error_wrap(status, "data.%s", what);
    return CM_OK;
}

/* Mean cross-entropy (nats) over a split, in no-grad mode; routers use
 * k_override when > 0 (THOR draws its inference experts from the run seed). */
static cm_status evaluate(run *r, const text_dataset *dataset, int64_t max_batches, int k_override,
                          double *mean_loss, int64_t *tokens_out) {
    const cm_recipe *recipe = r->recipe;
    const int B = recipe->data.batch_size, T = recipe->data.seq_len;
    text_eval_iter iter;
    CM_TRY(text_eval_begin(&iter, dataset, B, T, r->rank, r->ranks, max_batches));
    bool previous = ag_set_grad_enabled(&r->ctx, false);
    double sums[2] = {0.0, 0.0}; /* loss x tokens, tokens */
    cm_status status = CM_OK;
    for (;;) {
        int64_t batch_first = iter.next_window;
        int rows = 0, windows = text_eval_next(&iter, r->inputs, r->targets, &rows);
        if (windows == 0) break;
        /* A rank with no rows of a short last batch still runs the MoE
         * layers' exchanges with the others. */
        if (rows == 0 && r->moe_layers == 0) continue;
        ag_ctx_reset(&r->ctx);
        lm_forward_args args = {
            .ids = r->inputs,
            .batch = rows,
            .seq_len = T,
            .seed = (uint64_t)recipe->train.seed,
            .first_row = (uint64_t)(batch_first + shard_rows(windows, r->rank, r->ranks).begin),
            .k_override = k_override,
            .group = world(r),
            .global_tokens = (int64_t)windows * T};
        ag_tensor *logits = lm_forward(&r->ctx, &r->model, &args);
        if (rows > 0) {
            ag_tensor *loss = lm_loss(&r->ctx, logits, r->targets);
            if ((status = ag_ctx_status(&r->ctx)) != CM_OK) break;
            sums[0] += (double)loss->data[0] * rows * T;
            sums[1] += (double)rows * T;
        }
        if ((status = ag_ctx_status(&r->ctx)) != CM_OK) break;
    }
    ag_set_grad_enabled(&r->ctx, previous);
    ag_ctx_reset(&r->ctx);
    CM_TRY(status);
    CM_TRY(comm_sum_doubles(world(r), sums, 2));
    if (sums[1] == 0) return CM_ERR(CM_ERR_INVALID, "%s: too short to evaluate", dataset->path);
    *mean_loss = sums[0] / sums[1];
    if (tokens_out) *tokens_out = (int64_t)sums[1];
    return CM_OK;
}

/* Loads the checkpoint named by `resume` ("auto": the newest in the
 * checkpoint directory) and returns the step it reached. */

/* Adds one forward pass's routing statistics to the log window. */
static void record_routing(run *r, const lm_moe_report *report) {
    for (int i = 0; i < report->n_layers; i++) {
        const router_stats *stats = &report->stats[i];
        int64_t *load = r->window_load + (size_t)i * (size_t)r->num_experts;
        for (int e = 0; e < r->num_experts; e++) load[e] += stats->tokens_per_expert[e];
        r->window_slots[i] += stats->slots;
        r->window_dropped[i] += stats->dropped;
        r->window_entropy[i] += isnan(stats->entropy) ? 0.0 : stats->entropy;
        r->window_k[i] = stats->k;
    }
    if (report->n_layers > 0) {
        r->window_tokens += report->stats[0].tokens;
        r->window_reports++;
    }
}

/* One "kind": "moe" line per MoE layer, then the window starts again. */
static cm_status log_routing(run *r, cm_metrics *metrics, int64_t step) {
    if (r->moe_layers == 0 || r->window_reports == 0) return CM_OK;
    if (r->ranks > 1) { /* the statistics of the global batch */
        MPI_Comm group = world(r);
        CM_TRY(comm_sum_int64(group, r->window_load, r->moe_layers * r->num_experts));
        CM_TRY(comm_sum_int64(group, r->window_slots, r->moe_layers));
        CM_TRY(comm_sum_int64(group, r->window_dropped, r->moe_layers));
        CM_TRY(comm_sum_int64(group, &r->window_tokens, 1));
        CM_TRY(comm_sum_doubles(group, r->window_entropy, r->moe_layers));
        for (int i = 0; i < r->moe_layers; i++) r->window_entropy[i] /= r->ranks;
    }
    for (int i = 0; i < r->moe_layers; i++) {
        const int64_t *load = r->window_load + (size_t)i * (size_t)r->num_experts;
        int64_t max_load = 0;
        char loads[1024];
        size_t used = 0;
        for (int e = 0; e < r->num_experts && used < sizeof loads; e++) {
            max_load = load[e] > max_load ? load[e] : max_load;
            used += (size_t)snprintf(loads + used, sizeof loads - used, "%s%lld", e ? ", " : "",
                                     (long long)load[e]);
        }
        double mean_load = (double)r->window_slots[i] / r->num_experts;
        double candidates = (double)(r->window_slots[i] + r->window_dropped[i]);
        int layer = 0;
        for (int l = 0, seen = 0; l < r->model.config.n_layer; l++)
            if (r->model.blocks[l].is_moe && seen++ == i) layer = l;
        metrics_write(metrics,
                      "{\"kind\": \"moe\", \"step\": %lld, \"layer\": %d, \"mean_k\": %.4f, "
                      "\"k\": %d, \"entropy\": %.4f, \"dropped_fraction\": %.4f, "
                      "\"load_max_over_mean\": %.4f, \"tokens_per_expert\": [%s]}",
                      (long long)step, layer, (double)r->window_slots[i] / (double)r->window_tokens,
                      r->window_k[i], r->window_entropy[i] / r->window_reports,
                      candidates > 0 ? (double)r->window_dropped[i] / candidates : 0.0,
                      mean_load > 0 ? (double)max_load / mean_load : 0.0, loads);
    }
    memset(r->window_load, 0, (size_t)r->moe_layers * (size_t)r->num_experts * sizeof(int64_t));
    memset(r->window_slots, 0, sizeof r->window_slots);
    memset(r->window_dropped, 0, sizeof r->window_dropped);
    memset(r->window_entropy, 0, sizeof r->window_entropy);
    r->window_tokens = 0;
    r->window_reports = 0;
    return CM_OK;
}

/* Mean activated experts per token over the MoE layers of the window. */
static double window_mean_k(const run *r) {
    if (r->moe_layers == 0 || r->window_tokens == 0) return 0.0;
    double total = 0.0;
    for (int i = 0; i < r->moe_layers; i++) total += (double)r->window_slots[i];
    return total / ((double)r->window_tokens * r->moe_layers);
}

/* One optimizer step at 0-based index `step`; returns the language-model loss
 * (nats; THOR: the mean of its two passes' cross-entropies). */
/* Expert-group gradient norms live on different ranks: sum them over the
 * EP group (the dense part is already the same everywhere after its
 * all-reduce, and DP replicas of an expert hold the same gradient). */
static cm_status sum_expert_norms(double group_sq[AG_NUM_GROUPS], void *user) {
    const cm_comm *comm = user;
    return comm_sum_doubles(comm->ep, &group_sq[AG_GROUP_EXPERT], 1);
}

/* Sums the gradients of this step over the ranks that share them. */
static cm_status reduce_gradients(run *r) {
    if (!r->comm || r->ranks == 1) return CM_OK;
    ag_param_buffer *dense = &r->params.buffers[AG_GROUP_DENSE];
    ag_param_buffer *expert = &r->params.buffers[AG_GROUP_EXPERT];
    CM_TRY(comm_sum_floats(r->comm->world, dense->grad, (int64_t)dense->numel));
    return comm_sum_floats(r->comm->dp, expert->grad, (int64_t)expert->numel);
}

/* One optimizer step at 0-based index `step`; returns the language-model loss
 * of the global batch (nats; THOR: the mean of its two passes'). Each rank
 * takes its rows of the global batch and scales its per-token means by its
 * share of the tokens, so the gradients summed over the ranks are those of
 * the whole batch. */
static cm_status train_step(run *r, int64_t step, double *loss_out, double *grad_norm) {
    const cm_recipe *recipe = r->recipe;
    const int B = recipe->data.batch_size, T = recipe->data.seq_len;
    const uint64_t seed = (uint64_t)recipe->train.seed;
    shard_range rows = shard_rows(B, r->rank, r->ranks);
    const int local_rows = rows.end - rows.begin;
    const float share = (float)local_rows / (float)B;
    CM_TRY(text_dataset_batch(&r->train, seed, (uint64_t)step, B, T, rows, r->inputs, r->targets));
    ag_ctx_reset(&r->ctx);
    ag_params_zero_grad(&r->params);
    ag_ctx *ctx = &r->ctx;
    lm_moe_report report;
    lm_forward_args args = {.ids = r->inputs,
                            .batch = local_rows,
                            .seq_len = T,
                            .training = true,
                            .seed = seed,
                            .step = (uint64_t)step,
                            .first_row = (uint64_t)rows.begin,
                            .report = &report,
                            .group = world(r),
                            .global_tokens = (int64_t)B * T};
    ag_tensor *logits = lm_forward(ctx, &r->model, &args);
    ag_tensor *lm = ag_scale(ctx, lm_loss(ctx, logits, r->targets), share);
    ag_tensor *total = lm, *lm2 = NULL;
    ag_tensor *aux = report.aux_loss;
    router_config routing; /* the method's passes per step and their consistency weight */
    recipe_router_config(recipe, &routing);
    if (recipe->moe.enabled && router_passes_per_step(&routing) == 2) {
        /* THOR: a second pass with its own expert draws and dropout masks;
         * loss = CE1 + CE2 + alpha * consistency (METHODS.md 2.2). */
        lm_moe_report second_report;
        lm_forward_args second = args;
        second.pass = 1;
        second.report = &second_report;
        ag_tensor *logits2 = lm_forward(ctx, &r->model, &second);
        lm2 = ag_scale(ctx, lm_loss(ctx, logits2, r->targets), share);
        ag_tensor *consistency = lm_thor_consistency(ctx, logits, logits2);
        total = ag_add(ctx, ag_add(ctx, lm, lm2),
                       ag_scale(ctx, consistency, router_pass_consistency(&routing) * share));
        CM_TRY(ag_ctx_status(ctx));
        record_routing(r, &second_report);
    }
    if (aux) total = ag_add(ctx, total, aux);
    CM_TRY(ag_ctx_status(ctx));
    record_routing(r, &report);
    /* The global batch's values: lm, the second pass's lm, aux, total. */
    double values[4] = {lm->data[0], lm2 ? lm2->data[0] : 0.0, aux ? aux->data[0] : 0.0,
                        total->data[0]};
    CM_TRY(comm_sum_doubles(world(r), values, 4));
    *loss_out = lm2 ? 0.5 * (values[0] + values[1]) : values[0];
    r->window_aux += values[2];
    if (!isfinite(values[3]))
        return CM_ERR(CM_ERR_NUMERIC,
                      "the loss is %g at step %lld; lower optim.lr or set optim.grad_clip",
                      values[3], (long long)step + 1);
    CM_TRY(ag_backward(ctx, total));
    CM_TRY(reduce_gradients(r));
    *grad_norm = NAN;
    if (recipe->optim.grad_clip > 0) {
        optim_norm_reducer reducer = {r->comm && r->ranks > 1 ? sum_expert_norms : NULL,
                                      (void *)r->comm};
        CM_TRY(
            optim_clip_grad_norm_reduced(&r->params, recipe->optim.grad_clip, &reducer, grad_norm));
    }
    optim_step(&r->params, &r->optim, optim_lr_at(&r->schedule, step), &r->optim_state);
    return CM_OK;
}

static cm_status prepare(run *r, const cm_recipe *recipe, const cm_comm *comm) {
    r->recipe = recipe;
    r->comm = comm;
    r->rank = comm ? comm->world_rank : 0;
    r->ranks = comm ? comm->world_size : 1;
    r->leader = r->rank == 0;
    size_t length = recipe_format(recipe, NULL, 0);
    r->recipe_text = malloc(length + 1);
    if (!r->recipe_text) return CM_ERR(CM_ERR_NOMEM, "out of memory");
    recipe_format(recipe, r->recipe_text, length + 1);
    CM_TRY(recipe_run_dir(recipe, r->run_dir, sizeof r->run_dir));
    CM_TRY(recipe_checkpoint_dir(recipe, r->checkpoint_dir, sizeof r->checkpoint_dir));
    return build_model(r);
}

static cm_status train_loop(run *r, const trainer_options *options, trainer_result *result) {
    const cm_recipe *recipe = r->recipe;
    const cm_train_cfg *train = &recipe->train;
    CM_TRY(open_split(recipe->data.path, "path", &r->train));
    if (train->eval_every > 0) CM_TRY(open_split(recipe->data.valid_path, "valid_path", &r->valid));
    CM_TRY(open_split(recipe->data.test_path, "test_path", &r->test));
    CM_TRY(run_make_dirs(r->run_dir));
    CM_TRY(run_make_dirs(r->checkpoint_dir));
    r->optim = run_optimizer(recipe);
    r->schedule = run_lr_schedule(recipe);

    int64_t start = 0;
    if (options->resume) {
        ckpt_meta meta;
        bool found;
        CM_TRY(run_resume(recipe, r->checkpoint_dir, options->resume, &r->params, r->comm, &meta,
                          &found));
        if (found) start = meta.step, r->optim_state.step = meta.optimizer_step;
    }
    cm_metrics metrics = {0};
    if (r->leader) CM_TRY(metrics_open(&metrics, r->run_dir, start > 0 ? start : -1));

    cm_progress progress;
    progress_init(&progress, stdout, start, train->steps, !options->quiet && r->leader);
    const double tokens_per_step = (double)recipe->data.batch_size * recipe->data.seq_len;
    if (start > 0) progress_print(&progress, "resumed from step %lld", (long long)start);
    cm_status status = CM_OK;
    double window_start = cm_now(), run_start = window_start, window_loss = 0.0;
    int64_t window_steps = 0, step = start;
    /* Test hook: CMOE_FAIL_AT="RANK:STEP" makes that rank fail at that step,
     * to check that one rank's error ends the whole job (tests/cli). */
    const char *fail_at = getenv("CMOE_FAIL_AT");
    int fail_rank = -1;
    long long fail_step = -1;
    if (fail_at && sscanf(fail_at, "%d:%lld", &fail_rank, &fail_step) != 2) fail_rank = -1;
    while (step < train->steps) {
        double loss = 0.0, grad_norm = 0.0;
        if (fail_rank == r->rank && step + 1 == fail_step) {
            status =
                CM_ERR(CM_ERR_INTERNAL, "failure injected by CMOE_FAIL_AT at step %lld", fail_step);
            break;
        }
        if ((status = train_step(r, step, &loss, &grad_norm)) != CM_OK) break;
        step++;
        if (step == start + 1 && !options->quiet && start == 0)
            progress_print(&progress, "step arena: %.1f MiB used of %d MiB",
                           (double)r->ctx.arena.high_water / (1 << 20), train->arena_mib);
        window_loss += loss;
        window_steps++;
        result->last_train_loss = loss;
        double elapsed = cm_now() - window_start;
        double rate = tokens_per_step * (double)window_steps / (elapsed > 0 ? elapsed : 1e-9);
        bool log_now = step % train->log_every == 0 || step == train->steps;
        char text[128];
        int written = snprintf(text, sizeof text, "loss %.4f  bpc %.3f", loss, loss / LN2);
        if (r->moe_layers > 0 && written > 0)
            snprintf(text + written, sizeof text - (size_t)written, "  k %.2f", window_mean_k(r));
        progress_update(&progress, step, text, rate, "tok/s", log_now);
        if (log_now) {
            double mean = window_loss / (double)window_steps;
            metrics_write(
                &metrics,
                "{\"kind\": \"train\", \"step\": %lld, \"loss\": %.6f, \"bpc\": %.6f, "
                "\"loss_last\": %.9g, \"aux_loss\": %.6g, \"mean_k\": %.4f, \"lr\": %.6g, "
                "\"grad_norm\": %.6g, \"tok_s\": %.1f}",
                (long long)step, mean, mean / LN2, loss, r->window_aux / (double)window_steps,
                window_mean_k(r), optim_lr_at(&r->schedule, step - 1),
                isnan(grad_norm) ? -1.0 : grad_norm, rate);
            result->mean_k = window_mean_k(r);
            if ((status = log_routing(r, &metrics, step)) != CM_OK) break;
            r->window_aux = 0.0;
            window_loss = 0.0;
            window_steps = 0;
            window_start = cm_now();
            result->tokens_per_second = rate;
        }
        if (train->eval_every > 0 && (step % train->eval_every == 0 || step == train->steps)) {
            double valid_loss;
            if ((status = evaluate(r, &r->valid, train->eval_batches, recipe->router.eval_k,
                                   &valid_loss, NULL)) != CM_OK)
                break;
            result->last_valid_bpc = valid_loss / LN2;
            metrics_write(&metrics,
                          "{\"kind\": \"valid\", \"step\": %lld, \"loss\": %.6f, \"bpc\": %.6f}",
                          (long long)step, valid_loss, valid_loss / LN2);
            progress_print(&progress, "step %lld  validation bpc %.4f", (long long)step,
                           valid_loss / LN2);
        }
        bool stop = (options->stop_requested && *options->stop_requested) ||
                    (options->stop_at_step > 0 && step >= options->stop_at_step);
        if (r->ranks > 1) { /* a signal may reach only some ranks: stop together */
            int64_t any = stop;
            if ((status = comm_sum_int64(world(r), &any, 1)) != CM_OK) break;
            stop = any > 0;
        }
        bool periodic = recipe->checkpoint.every > 0 && step % recipe->checkpoint.every == 0;
        if (periodic || stop || step == train->steps) {
            status = run_save_checkpoint(recipe, r->checkpoint_dir, r->recipe_text, &r->params,
                                         step, r->optim_state.step, r->comm,
                                         result->last_checkpoint, sizeof result->last_checkpoint);
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
    if (status == CM_OK && !result->interrupted && step > start) {
        double seconds = cm_now() - run_start;
        result->tokens_per_second = tokens_per_step * (double)(step - start) / seconds;
        double test_loss;
        int64_t tokens;
        status = evaluate(r, &r->test, 0, recipe->router.eval_k, &test_loss, &tokens);
        if (status == CM_OK) {
            result->test_bpc = test_loss / LN2;
            metrics_write(&metrics,
                          "{\"kind\": \"test\", \"step\": %lld, \"loss\": %.6f, \"bpc\": %.6f, "
                          "\"tokens\": %lld}",
                          (long long)step, test_loss, test_loss / LN2, (long long)tokens);
            progress_print(&progress, "test bpc %.4f over %lld bytes; %.0f tok/s overall",
                           result->test_bpc, (long long)tokens, result->tokens_per_second);
        }
    }
    metrics_close(&metrics);
    if (status == CM_OK && r->leader && metrics_plot(r->run_dir) == CM_OK)
        progress_print(&progress, "curves: %s/curves.png", r->run_dir);
    return status;
}

cm_status trainer_run(const cm_recipe *recipe, const trainer_options *options,
                      trainer_result *result) {
    *result = (trainer_result){.last_valid_bpc = NAN, .test_bpc = NAN};
    run r = {0};
    cm_status status = prepare(&r, recipe, options->comm);
    if (status == CM_OK) status = train_loop(&r, options, result);
    run_free(&r);
    return status;
}

cm_status trainer_bench(const cm_recipe *recipe, const cm_comm *comm, int64_t steps,
                        trainer_step_hook hook, void *user) {
    run r = {0};
    cm_status status = prepare(&r, recipe, comm);
    if (status == CM_OK) status = open_split(recipe->data.path, "path", &r.train);
    if (status == CM_OK) {
        r.optim = run_optimizer(recipe);
        r.schedule = run_lr_schedule(recipe);
        hook(user, 0);
    }
    for (int64_t step = 0; status == CM_OK && step < steps; step++) {
        double loss, grad_norm;
        status = train_step(&r, step, &loss, &grad_norm);
        if (status == CM_OK) hook(user, step + 1);
    }
    run_free(&r);
    return status;
}

cm_status trainer_evaluate(const cm_recipe *recipe, const char *checkpoint, cm_split split,
                           int64_t max_batches, int k_override, double *mean_loss, int64_t *tokens,
                           const cm_comm *comm) {
    run r = {0};
    cm_status status = prepare(&r, recipe, comm);
    const char *paths[CM_SPLIT_COUNT] = {recipe->data.valid_path, recipe->data.test_path,
                                         recipe->data.path};
    const char *names[CM_SPLIT_COUNT] = {"valid_path", "test_path", "path"};
    if (status == CM_OK) status = ckpt_load_sharded(checkpoint, &r.params, NULL, false, comm);
    if (status == CM_OK) status = open_split(paths[split], names[split], &r.test);
    if (k_override <= 0) k_override = recipe->router.eval_k;
    if (status == CM_OK && k_override > 0 && !recipe->moe.enabled)
        status = CM_ERR(CM_ERR_INVALID, "a k for the routers was given, but the model has no MoE");
    if (status == CM_OK && k_override > recipe->moe.num_experts)
        status = CM_ERR(CM_ERR_INVALID, "k = %d exceeds moe.num_experts = %d", k_override,
                        recipe->moe.num_experts);
    if (status == CM_OK) status = evaluate(&r, &r.test, max_batches, k_override, mean_loss, tokens);
    run_free(&r);
    return status;
}
