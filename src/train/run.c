#include "train/run.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "common/clock.h"
#include "common/fs.h"
#include "common/pool.h"
#include "optim/optim.h"
#include "train/checkpoint.h"
#include "train/progress.h"

enum { PATH_CAPACITY = 4096, RUN_MAX_PHASES = 4 };

struct run_session {
    const cm_recipe *recipe;
    const task_vtable *task;
    void *state; /* the task's */
    task_env env;
    ag_params params;
    ag_ctx ctx;
    bool ctx_ready;
    int phases, micro_batches;
    int64_t n_slices;       /* expert slices (ag_param.slices) over all parameters */
    int64_t *slice_scratch; /* [n_slices] for the usage all-reduce */
    optim_config optim;
    optim_state optim_states[RUN_MAX_PHASES]; /* one per phase */
    optim_lr_schedule schedule;
    dispatch_timing timing;
    run_clock clock;
};

/* ---- the pieces of a run -------------------------------------------------------- */

static optim_config recipe_optimizer(const cm_recipe *recipe) {
    const cm_optim_cfg *o = &recipe->optim;
    return (optim_config){
        .kind = o->type,
        .adamw = {o->beta1, o->beta2, o->eps, o->weight_decay},
        .sgd = {o->momentum, o->weight_decay, o->nesterov},
        .skip_unused_slices = o->skip_unused_experts,
    };
}

/* optim.lr and schedule.*; the schedule spans train.steps. */
static optim_lr_schedule recipe_lr_schedule(const cm_recipe *recipe) {
    const cm_schedule_cfg *s = &recipe->schedule;
    return (optim_lr_schedule){.kind = s->type,
                               .lr = recipe->optim.lr,
                               .min_lr = s->min_lr,
                               .warmup_steps = s->warmup_steps,
                               .total_steps = recipe->train.steps,
                               .step_size = s->step_size,
                               .gamma = s->gamma};
}

static cm_status session_build(run_session *s, const cm_recipe *recipe, const cm_comm *comm,
                               bool with_train) {
    const int ranks = comm ? comm->world_size : 1;
    s->recipe = recipe;
    s->task = task_for(recipe->model.arch);
    ag_params_init(&s->params);
    if (recipe->data.batch_size < ranks)
        return CM_ERR(CM_ERR_INVALID,
                      "data.batch_size = %d is smaller than the %d ranks of the job",
                      recipe->data.batch_size, ranks);
    CM_TRY(ag_ctx_init(&s->ctx, (size_t)recipe->train.arena_mib << 20));
    s->ctx_ready = true;
    s->env = (task_env){.recipe = recipe,
                        .comm = comm,
                        .rank = comm ? comm->world_rank : 0,
                        .ranks = ranks,
                        .world = comm ? comm->world : (MPI_Comm)0,
                        .params = &s->params,
                        .ctx = &s->ctx,
                        .timing = &s->timing};
    CM_TRY(s->task->create(&s->env, &s->state));
    CM_TRY(ag_params_finalize(&s->params, (uint64_t)recipe->train.seed));
    optim_apply_decay_policy(&s->params, recipe->optim.decay_norms, recipe->optim.decay_biases,
                             recipe->optim.decay_embeddings);
    if (recipe->train.threads > 0) cm_pool_set_threads(recipe->train.threads);
    CM_TRY(s->task->open(s->state, with_train));
    s->phases = s->task->phases ? s->task->phases(s->state) : 1;
    if (s->phases < 1 || s->phases > RUN_MAX_PHASES)
        return CM_ERR(CM_ERR_INTERNAL, "task %s has %d phases per step", s->task->name, s->phases);
    s->micro_batches = recipe->train.grad_accum;
    s->optim = recipe_optimizer(recipe);
    s->schedule = recipe_lr_schedule(recipe);
    for (int i = 0; i < s->params.count; i++) s->n_slices += s->params.items[i]->slices;
    s->slice_scratch = calloc((size_t)s->n_slices + 1, sizeof(int64_t));
    if (!s->slice_scratch) return CM_ERR(CM_ERR_NOMEM, "out of memory");
    return CM_OK;
}

cm_status run_session_open(const cm_recipe *recipe, const cm_comm *comm, bool with_train,
                           run_session **out) {
    *out = NULL;
    run_session *s = calloc(1, sizeof *s);
    if (!s) return CM_ERR(CM_ERR_NOMEM, "out of memory");
    cm_status status = session_build(s, recipe, comm, with_train);
    if (status != CM_OK) {
        run_session_close(s);
        return status;
    }
    *out = s;
    return CM_OK;
}

void run_session_close(run_session *s) {
    if (!s) return;
    if (s->state) s->task->destroy(s->state);
    if (s->ctx_ready) ag_ctx_free(&s->ctx);
    ag_params_free(&s->params);
    free(s->slice_scratch);
    free(s);
}

ag_params *run_session_params(run_session *s) {
    return &s->params;
}
const task_vtable *run_session_task(run_session *s) {
    return s->task;
}
void *run_session_task_state(run_session *s) {
    return s->state;
}
dispatch_timing *run_session_timing(run_session *s) {
    return &s->timing;
}

const run_clock *run_session_clock(const run_session *s) {
    return &s->clock;
}

/* Adds the seconds since *since to *total and restarts *since. */
static void clock_lap(double *total, double *since) {
    double now = cm_now();
    *total += now - *since;
    *since = now;
}

/* ---- one phase of a step ----------------------------------------------------------- */

/* Expert-group gradient norms live on different ranks: sum them over the
 * EP group (the dense part is already the same everywhere after its
 * all-reduce, and DP replicas of an expert hold the same gradient). */
static cm_status sum_expert_norms(double group_sq[AG_NUM_GROUPS], void *user) {
    const cm_comm *comm = user;
    return comm_sum_doubles(comm->ep, &group_sq[AG_GROUP_EXPERT], 1);
}

/* Sums the gradients of this phase over the ranks that share them. */
static cm_status reduce_gradients(run_session *s) {
    if (s->env.ranks == 1) return CM_OK;
    ag_param_buffer *dense = &s->params.buffers[AG_GROUP_DENSE];
    ag_param_buffer *expert = &s->params.buffers[AG_GROUP_EXPERT];
    CM_TRY(comm_sum_floats(s->env.comm->world, dense->grad, (int64_t)dense->numel));
    return comm_sum_floats(s->env.comm->dp, expert->grad, (int64_t)expert->numel);
}

/* The global values of one micro-batch's loss (summed over the ranks) into
 * *sums: loss, the second pass's loss, aux, objective; a non-finite
 * objective stops the run. */
static cm_status add_global_values(run_session *s, int64_t step, const task_loss *loss,
                                   double sums[4]) {
    double values[4] = {loss->loss->data[0], loss->loss2 ? loss->loss2->data[0] : 0.0,
                        loss->aux ? loss->aux->data[0] : 0.0, loss->objective->data[0]};
    CM_TRY(comm_sum_doubles(s->env.world, values, 4));
    if (!isfinite(values[3]))
        return CM_ERR(CM_ERR_NUMERIC, "the loss is %g at step %lld; lower optim.lr%s", values[3],
                      (long long)step + 1,
                      s->recipe->optim.grad_clip > 0 ? "" : " or set optim.grad_clip");
    for (int i = 0; i < 4; i++) sums[i] += values[i];
    return CM_OK;
}

/* An expert slice is used when any data-parallel replica used it (their
 * gradients are summed), so every replica takes the same decision. */
static cm_status reduce_slice_usage(run_session *s) {
    if (!s->env.comm || s->env.comm->dp_size == 1 || s->n_slices == 0) return CM_OK;
    int64_t at = 0;
    for (int i = 0; i < s->params.count; i++) {
        const ag_param *param = s->params.items[i];
        for (int j = 0; j < param->slices; j++) s->slice_scratch[at++] = param->slice_used[j];
    }
    CM_TRY(comm_sum_int64(s->env.comm->dp, s->slice_scratch, (int)at));
    at = 0;
    for (int i = 0; i < s->params.count; i++) {
        ag_param *param = s->params.items[i];
        for (int j = 0; j < param->slices; j++) param->slice_used[j] = s->slice_scratch[at++] > 0;
    }
    return CM_OK;
}

/* The update of a phase whose gradients are accumulated. */
static cm_status update(run_session *s, int phase, int64_t step, run_step_result *out) {
    const cm_recipe *recipe = s->recipe;
    double since = cm_now();
    CM_TRY(reduce_gradients(s));
    CM_TRY(reduce_slice_usage(s));
    clock_lap(&s->clock.reduce, &since);
    out->grad_norm = NAN;
    if (recipe->optim.grad_clip > 0) {
        optim_norm_reducer reducer = {s->env.ranks > 1 ? sum_expert_norms : NULL,
                                      (void *)s->env.comm};
        CM_TRY(optim_clip_grad_norm_reduced(&s->params, recipe->optim.grad_clip, &reducer,
                                            &out->grad_norm));
    }
    optim_step(&s->params, &s->optim, optim_lr_at(&s->schedule, step), &s->optim_states[phase]);
    clock_lap(&s->clock.update, &since);
    return CM_OK;
}

/* One micro-batch of a phase: load, loss, global values, backward. */
static cm_status run_micro(run_session *s, int phase, int64_t step, int micro, double sums[4],
                           bool *two_passes) {
    double since = cm_now();
    CM_TRY(s->task->load(s->state, step, micro));
    clock_lap(&s->clock.load, &since);
    ag_ctx_reset(&s->ctx);
    task_loss loss = {0};
    CM_TRY(s->task->phase_loss(s->state, phase, step, micro, &loss));
    clock_lap(&s->clock.forward, &since);
    CM_TRY(add_global_values(s, step, &loss, sums));
    clock_lap(&s->clock.values, &since);
    *two_passes = loss.loss2 != NULL;
    cm_status status = ag_backward(&s->ctx, loss.objective);
    clock_lap(&s->clock.backward, &since);
    return status;
}

static cm_status run_phase(run_session *s, int phase, int64_t step, run_step_result *out) {
    ag_params_zero_grad(&s->params);
    double sums[4] = {0.0, 0.0, 0.0, 0.0};
    bool two_passes = false;
    cm_status status = CM_OK;
    for (int micro = 0; micro < s->micro_batches && status == CM_OK; micro++)
        status = run_micro(s, phase, step, micro, sums, &two_passes);
    if (status == CM_OK) {
        out->loss = two_passes ? 0.5 * (sums[0] + sums[1]) : sums[0];
        out->aux = sums[2];
        status = update(s, phase, step, out);
    }
    if (s->task->phase_end) {
        cm_status ended = s->task->phase_end(s->state, phase, status == CM_OK);
        if (status == CM_OK) status = ended;
    }
    return status;
}

cm_status run_session_step(run_session *s, int64_t step, run_step_result *out) {
    *out = (run_step_result){0};
    for (int phase = 0; phase < s->phases; phase++) {
        run_step_result phase_result = {0};
        CM_TRY(run_phase(s, phase, step, &phase_result));
        if (phase == 0) *out = phase_result;
    }
    return CM_OK;
}

cm_status run_session_phase(run_session *s, int64_t step, int phase, run_step_result *out) {
    if (phase < 0 || phase >= s->phases)
        return CM_ERR(CM_ERR_INVALID, "phase %d of a task with %d phases per step", phase,
                      s->phases);
    return run_phase(s, phase, step, out);
}

cm_status run_session_evaluate(run_session *s, const task_eval_request *request, int64_t step,
                               task_eval *out) {
    return s->task->evaluate(s->state, request, step, out);
}

cm_status run_evaluate(const cm_recipe *recipe, const char *checkpoint,
                       const task_eval_request *request, volatile sig_atomic_t *stop,
                       const cm_comm *comm, task_eval *out) {
    run_session *s;
    CM_TRY(run_session_open(recipe, comm, false, &s));
    ckpt_meta meta = {0};
    cm_status status = ckpt_load_sharded(checkpoint, &s->params, &meta, false, comm);
    task_eval_plan plan = s->task->eval_plan(s->state);
    task_eval_request stoppable = request              ? *request
                                  : plan.final_differs ? plan.final
                                                       : plan.periodic;
    if (stop) stoppable.stop = stop;
    if (status == CM_OK) status = run_session_evaluate(s, &stoppable, meta.step, out);
    run_session_close(s);
    return status;
}

/* ---- the loop ------------------------------------------------------------------------ */

/* What run_train keeps besides the session. */
typedef struct run_state {
    run_session *session;
    const run_options *options;
    run_result *result;
    bool leader; /* world rank 0: prints, logs, writes files */
    int lock_fd; /* rank 0's lock on the run directory for the run's life; -1: none */
    char *recipe_text;
    char run_dir[PATH_CAPACITY], checkpoint_dir[PATH_CAPACITY];
    cm_metrics metrics;
    cm_progress progress;
    int64_t start;    /* the step the run starts from (resumed: the checkpoint's) */
    double run_start; /* clock */
    /* the log window */
    double window_start, window_loss, window_aux;
    int64_t window_steps;
    bool final_done;  /* the periodic evaluation at the last step was the final one */
    bool initialised; /* the parameters came from options->init */
} run_state;

/* Whether `recipe` lacks the group tables of the merged model in `path`
 * (cmoe merge): the likely reason its parameters do not fit. */
static bool misses_merged(const cm_recipe *recipe, const char *path) {
    char *text = NULL;
    cm_recipe stored;
    bool merged = !recipe->moe.merged && ckpt_read_recipe(path, &text) == CM_OK &&
                  recipe_load_text(text, path, NULL, 0, &stored) == CM_OK && stored.moe.merged;
    free(text);
    return merged;
}

/* A run that starts at step 0: the parameters of options->init, if set
 * (its moments, step and seed are not read: the optimizer starts fresh). */
static cm_status start_from_init(run_state *r) {
    const char *init = r->options->init;
    if (!init) return CM_OK;
    ckpt_meta meta;
    cm_status status =
        ckpt_load_sharded(init, &r->session->params, &meta, false, r->session->env.comm);
    if (status != CM_OK && misses_merged(r->session->recipe, init))
        return cm_error_wrap(status,
                             "--init %s is a merged model (cmoe merge: moe.merged true, group "
                             "tables blocks.L.moe.group_of); set moe.merged: true in the recipe "
                             "(--set moe.merged=true)",
                             init);
    if (status != CM_OK) return cm_error_wrap(status, "--init %s", init);
    r->initialised = true;
    return CM_OK;
}

/* Loads the checkpoint named by options->resume ("auto": the newest in the
 * checkpoint directory; none: a fresh run, from options->init if set) and
 * sets the start step. A checkpoint of another train.seed is refused (the
 * data order would change). */
static cm_status resume(run_state *r) {
    run_session *s = r->session;
    const char *resume = r->options->resume;
    r->start = 0;
    if (!resume) return start_from_init(r);
    char path[PATH_CAPACITY];
    if (strcmp(resume, "auto") == 0) {
        if (ckpt_find_latest(r->checkpoint_dir, path, sizeof path) != CM_OK)
            return start_from_init(r);
    } else {
        snprintf(path, sizeof path, "%s", resume);
    }
    ckpt_meta meta;
    CM_TRY(ckpt_load_sharded(path, &s->params, &meta, true, s->env.comm));
    if (meta.seed != (uint64_t)s->recipe->train.seed)
        return CM_ERR(CM_ERR_INVALID,
                      "%s was trained with train.seed %llu but the recipe says %lld; resuming "
                      "with another seed would change the data order (use --set train.seed=%llu)",
                      path, (unsigned long long)meta.seed, (long long)s->recipe->train.seed,
                      (unsigned long long)meta.seed);
    if (meta.step > s->recipe->train.steps)
        return CM_ERR(CM_ERR_INVALID,
                      "%s is at step %lld, past train.steps = %lld: nothing to train (raise "
                      "train.steps to continue it)",
                      path, (long long)meta.step, (long long)s->recipe->train.steps);
    /* Every phase takes one update per step: they share the step count. */
    for (int phase = 0; phase < s->phases; phase++)
        s->optim_states[phase].step = meta.optimizer_step;
    r->start = meta.step;
    return CM_OK;
}

/* Fails unless every rank holds the same dense parameters (a replica that
 * drifted would make rank 0's checkpoint another model than the others train). */
static cm_status check_replicas(run_session *s, int64_t step) {
    if (s->env.ranks == 1) return CM_OK;
    const ag_param_buffer *dense = &s->params.buffers[AG_GROUP_DENSE];
    const unsigned char *bytes = (const unsigned char *)dense->data;
    uint32_t hash = 2166136261u; /* FNV-1a */
    for (size_t i = 0; i < dense->numel * sizeof(float); i++) hash = (hash ^ bytes[i]) * 16777619u;
    int64_t sums[2] = {(int64_t)hash, 0};
    CM_TRY(comm_sum_int64(s->env.world, sums, 1));
    sums[1] = sums[0] != (int64_t)hash * s->env.ranks;
    CM_TRY(comm_sum_int64(s->env.world, sums + 1, 1));
    if (sums[1] != 0)
        return CM_ERR(CM_ERR_INTERNAL, "the ranks hold different parameters at step %lld",
                      (long long)step);
    return CM_OK;
}

/* checkpoint.dir/ckpt-STEP.h5 (collective; rank 0 writes) after checking the
 * replicas; rank 0 then keeps the newest checkpoint.keep_last. */
static cm_status save(run_state *r, int64_t step) {
    run_session *s = r->session;
    CM_TRY(check_replicas(s, step));
    char *path = r->result->last_checkpoint;
    const size_t size = sizeof r->result->last_checkpoint;
    ckpt_path_for_step(r->checkpoint_dir, step, path, size);
    ckpt_meta meta = {step, (uint64_t)s->recipe->train.seed, s->optim_states[0].step};
    CM_TRY(ckpt_save_sharded(path, &s->params, &meta, r->recipe_text, s->env.comm));
    if (r->leader && s->recipe->checkpoint.keep_last > 0)
        CM_TRY(ckpt_prune(r->checkpoint_dir, s->recipe->checkpoint.keep_last));
    progress_print(&r->progress, "saved %s", path);
    return CM_OK;
}

/* The "model" line: parameter counts (experts counted over the EP group),
 * the rank count and the task's own figures. */
static cm_status write_model_line(run_state *r) {
    run_session *s = r->session;
    const int ep = s->env.comm ? s->env.comm->ep_size : 1;
    int64_t dense = ag_params_count(&s->params, AG_GROUP_DENSE);
    int64_t expert = ag_params_count(&s->params, AG_GROUP_EXPERT) * ep;
    metrics_record line = metrics_record_start("model", r->start);
    metrics_add_integer(&line, "parameters", dense + expert);
    metrics_add_integer(&line, "expert_parameters", expert);
    metrics_add_integer(&line, "ranks", s->env.ranks);
    if (s->task->model_fields) s->task->model_fields(s->state, &line);
    return metrics_write_record(&r->metrics, &line);
}

/* Rank 0 locks the run directory (two runs would overwrite each other's
 * checkpoints and metrics); every rank learns whether it could. */
static cm_status lock_run_dir(run_state *r) {
    cm_status status = r->leader ? cm_lock_dir(r->run_dir, &r->lock_fd) : CM_OK;
    /* Holding the lock, rank 0 is the only writer of its checkpoints (when
     * they live in the run directory): a temporary there is stale. */
    if (status == CM_OK && r->leader && strcmp(r->checkpoint_dir, r->run_dir) == 0)
        status = ckpt_remove_temporaries(r->checkpoint_dir);
    if (r->session->env.ranks == 1) return status;
    int64_t failed = status != CM_OK;
    CM_TRY(comm_sum_int64(r->session->env.world, &failed, 1));
    if (failed && status == CM_OK)
        return CM_ERR(CM_ERR_INVALID, "%s is in use by another run (rank 0 reports the holder)",
                      r->run_dir);
    return status;
}

/* Directories, resume, metrics, the model's description. */
static cm_status begin(run_state *r) {
    run_session *s = r->session;
    const cm_recipe *recipe = s->recipe;
    size_t length = recipe_format(recipe, NULL, 0);
    r->recipe_text = malloc(length + 1);
    if (!r->recipe_text) return CM_ERR(CM_ERR_NOMEM, "out of memory");
    recipe_format(recipe, r->recipe_text, length + 1);
    CM_TRY(recipe_run_dir(recipe, r->run_dir, sizeof r->run_dir));
    CM_TRY(recipe_checkpoint_dir(recipe, r->checkpoint_dir, sizeof r->checkpoint_dir));
    CM_TRY(cm_make_dirs(r->run_dir));
    CM_TRY(cm_make_dirs(r->checkpoint_dir));
    CM_TRY(lock_run_dir(r));
    CM_TRY(resume(r));
    if (r->leader) CM_TRY(metrics_open(&r->metrics, r->run_dir, r->start > 0 ? r->start : -1));
    if (r->start == 0) CM_TRY(write_model_line(r)); /* a resumed run has it already */
    progress_init(&r->progress, stdout, r->start, recipe->train.steps,
                  !r->options->quiet && r->leader);
    s->task->describe(s->state, &r->progress);
    if (r->start > 0) progress_print(&r->progress, "resumed from step %lld", (long long)r->start);
    if (r->initialised)
        progress_print(&r->progress, "initialised from %s (step 0, fresh optimizer state)",
                       r->options->init);
    r->run_start = r->window_start = cm_now();
    return CM_OK;
}

/* After a step: progress, and at a log step the "train" line and the task's
 * window lines. */
static cm_status log_step(run_state *r, int64_t step, const run_step_result *done) {
    run_session *s = r->session;
    const cm_train_cfg *train = &s->recipe->train;
    r->window_loss += done->loss;
    r->window_aux += done->aux;
    r->window_steps++;
    r->result->last_train_loss = done->loss;
    double elapsed = cm_now() - r->window_start;
    double items = (double)s->task->items_per_step(s->state) * (double)r->window_steps;
    double rate = items / (elapsed > 0 ? elapsed : 1e-9);
    bool log_now = step % train->log_every == 0 || step == train->steps;
    char text[192], extra[128] = "";
    if (s->task->progress_text) s->task->progress_text(s->state, done->loss, extra, sizeof extra);
    snprintf(text, sizeof text, "loss %.4f%s", done->loss, extra);
    char unit[16];
    snprintf(unit, sizeof unit, "%s/s", s->task->item_name);
    progress_update(&r->progress, step, text, rate, unit, log_now);
    if (!log_now) return CM_OK;
    const double mean = r->window_loss / (double)r->window_steps;
    char rate_key[16];
    snprintf(rate_key, sizeof rate_key, "%s_s", s->task->item_name);
    metrics_record line = metrics_record_start("train", step);
    metrics_add_number(&line, "loss", mean, "%.6f");
    if (s->task->window_fields) CM_TRY(s->task->window_fields(s->state, mean, &line));
    metrics_add_number(&line, "loss_last", done->loss, "%.9g");
    metrics_add_number(&line, "aux_loss", r->window_aux / (double)r->window_steps, "%.6g");
    metrics_add_number(&line, "lr", optim_lr_at(&s->schedule, step - 1), "%.6g");
    metrics_add_number(&line, "grad_norm", done->grad_norm, "%.6g");
    metrics_add_number(&line, rate_key, rate, "%.1f");
    CM_TRY(metrics_write_record(&r->metrics, &line));
    r->result->last_train = metrics_record_scalars(&line);
    r->result->items_per_second = rate;
    if (s->task->write_window)
        CM_TRY(s->task->write_window(s->state, &r->metrics, &r->progress, step));
    r->window_loss = r->window_aux = 0.0;
    r->window_steps = 0;
    r->window_start = cm_now();
    return CM_OK;
}

/* Evaluates as `request` says, writes the line and prints the summary. */
static cm_status evaluate(run_state *r, const task_eval_request *request, int64_t step,
                          task_eval *out) {
    task_eval_request stoppable = *request;
    stoppable.stop = r->options->stop_requested;
    CM_TRY(run_session_evaluate(r->session, &stoppable, step, out));
    if (out->stopped) {
        progress_print(&r->progress, "step %lld  evaluation stopped by the signal",
                       (long long)step);
        return CM_OK;
    }
    CM_TRY(metrics_write_record(&r->metrics, &out->record));
    out->record = metrics_record_scalars(&out->record);
    progress_print(&r->progress, "step %lld  %s", (long long)step, out->summary);
    return CM_OK;
}

/* The periodic evaluation (every train.eval_every steps and at the last). */
static cm_status maybe_evaluate(run_state *r, int64_t step) {
    run_session *s = r->session;
    const cm_train_cfg *train = &s->recipe->train;
    bool signalled = r->options->stop_requested && *r->options->stop_requested;
    if (train->eval_every <= 0 || signalled) return CM_OK;
    if (step % train->eval_every != 0 && step != train->steps) return CM_OK;
    task_eval_plan plan = s->task->eval_plan(s->state);
    CM_TRY(evaluate(r, &plan.periodic, step, &r->result->periodic));
    if (r->result->periodic.stopped) return CM_OK; /* the stop follows (agree_on_stop) */
    r->result->has_periodic = true;
    if (step == train->steps && !plan.final_differs) {
        r->result->final = r->result->periodic;
        r->result->has_final = r->final_done = true;
    }
    return CM_OK;
}

/* A signal may reach only some ranks, and --stop-at all: stop together. */
static cm_status agree_on_stop(run_state *r, int64_t step, bool *stop) {
    const run_options *o = r->options;
    *stop = (o->stop_requested && *o->stop_requested) ||
            (o->stop_at_step > 0 && step >= o->stop_at_step);
    if (r->session->env.ranks == 1) return CM_OK;
    int64_t any = *stop;
    CM_TRY(comm_sum_int64(r->session->env.world, &any, 1));
    *stop = any > 0;
    return CM_OK;
}

/* Everything after one step: logs, evaluation, stop, checkpoint. */
static cm_status after_step(run_state *r, int64_t step, const run_step_result *done, bool *stop) {
    run_session *s = r->session;
    if (step == r->start + 1)
        progress_print(&r->progress, "step arena: %.1f MiB used of %d MiB",
                       (double)s->ctx.arena.high_water / (1 << 20), s->recipe->train.arena_mib);
    CM_TRY(log_step(r, step, done));
    CM_TRY(maybe_evaluate(r, step));
    CM_TRY(agree_on_stop(r, step, stop));
    const int64_t every = s->recipe->checkpoint.every;
    if ((every > 0 && step % every == 0) || *stop || step == s->recipe->train.steps)
        CM_TRY(save(r, step));
    if (*stop)
        progress_print(&r->progress, "stopped at step %lld; resume with --resume auto",
                       (long long)step);
    return CM_OK;
}

static cm_status loop(run_state *r, int64_t *step) {
    run_session *s = r->session;
    const run_options *o = r->options;
    for (*step = r->start; *step < s->recipe->train.steps;) {
        if (o->fail_step > 0 && o->fail_rank == s->env.rank && *step + 1 == o->fail_step)
            return CM_ERR(CM_ERR_INTERNAL, "failure injected at step %lld (--inject-failure)",
                          (long long)o->fail_step);
        run_step_result done = {0};
        CM_TRY(run_session_step(s, *step, &done));
        ++*step;
        bool stop = false;
        CM_TRY(after_step(r, *step, &done, &stop));
        if (stop) {
            r->result->interrupted = true;
            return CM_OK;
        }
    }
    return CM_OK;
}

/* A run resumed at its last step trains nothing; its final evaluation is run
 * when metrics.jsonl lacks it (it was stopped by a signal or a full disk),
 * else the run says it is done. Rank 0 reads the file and the ranks agree.
 * The line's kind is its split's name (the CNN calls an evaluation on the
 * training images "test" too: such a final evaluation is run again). */
static cm_status final_missing(run_state *r, int64_t step, bool *missing) {
    static const char *const kinds[CM_SPLIT_COUNT] = {"valid", "test", "train"};
    const task_eval_plan plan = r->session->task->eval_plan(r->session->state);
    const cm_split split = plan.final_differs ? plan.final.split : plan.periodic.split;
    int64_t found = r->leader && metrics_has_line(&r->metrics, kinds[split], step);
    if (r->session->env.ranks > 1) CM_TRY(comm_sum_int64(r->session->env.world, &found, 1));
    *missing = found == 0;
    progress_print(&r->progress,
                   *missing ? "step %lld: the final evaluation is missing; running it"
                            : "step %lld: the run is finished (raise train.steps to continue it)",
                   (long long)step);
    return CM_OK;
}

/* After the loop: throughput, the final evaluation, plots. */
static cm_status finish(run_state *r, int64_t step) {
    run_session *s = r->session;
    run_result *result = r->result;
    result->steps_done = step;
    if (step > r->start) {
        double seconds = cm_now() - r->run_start;
        result->step_seconds = seconds / (double)(step - r->start);
        result->items_per_second =
            (double)s->task->items_per_step(s->state) * (double)(step - r->start) / seconds;
    }
    if (result->interrupted) return CM_OK;
    bool resumed_at_end = step <= r->start;
    if (resumed_at_end) CM_TRY(final_missing(r, step, &resumed_at_end));
    if (step <= r->start && !resumed_at_end) return CM_OK;
    if (!r->final_done) {
        task_eval_plan plan = s->task->eval_plan(s->state);
        CM_TRY(evaluate(r, &plan.final, step, &result->final));
        if (result->final.stopped) { /* the last step's checkpoint is saved */
            result->interrupted = true;
            progress_print(&r->progress,
                           "the final evaluation was stopped; `cmoe eval --ckpt` on the last "
                           "checkpoint runs it");
            return CM_OK;
        }
        result->has_final = true;
    }
    if (step > r->start)
        progress_print(&r->progress, "%.3f s per step, %.0f %s/s overall", result->step_seconds,
                       result->items_per_second, s->task->item_name);
    return CM_OK;
}

cm_status run_train(const cm_recipe *recipe, const run_options *options, run_result *result) {
    *result = (run_result){0};
    run_state r = {.options = options,
                   .result = result,
                   .lock_fd = -1,
                   .leader = !options->comm || options->comm->world_rank == 0};
    cm_status status = run_session_open(recipe, options->comm, true, &r.session);
    if (status == CM_OK) status = begin(&r);
    int64_t step = r.start;
    if (status == CM_OK) status = loop(&r, &step);
    progress_finish(&r.progress);
    if (status == CM_OK)
        status = finish(&r, step);
    else
        result->steps_done = step;
    metrics_close(&r.metrics);
    if (status == CM_OK && r.leader && metrics_plot(r.run_dir) == CM_OK)
        progress_print(&r.progress, "curves: %s/curves.png", r.run_dir);
    free(r.recipe_text);
    cm_unlock_dir(r.lock_fd);
    run_session_close(r.session);
    return status;
}
