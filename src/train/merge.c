/* cmoe merge on checkpoints: the checks, the calibration pass, and the
 * merged checkpoint (train/merge.h). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "data/text.h"
#include "train/checkpoint.h"
#include "train/merge.h"
#include "train/recipe.h"
#include "train/recipe_moe.h"
#include "train/run.h"

void merge_result_free(merge_result *result) {
    free(result->counts);
    free(result->freq);
    free(result->dominant);
    free(result->group_of);
    memset(result, 0, sizeof *result);
}

/* ---- checks ------------------------------------------------------------------------ */

static cm_status check_model(const cm_recipe *recipe, const char *source) {
    if (recipe->model.arch != CM_ARCH_TRANSFORMER_LM)
        return CM_ERR(CM_ERR_INVALID,
                      "%s is not a language model (model.arch is not transformer_lm); cmoe merge "
                      "merges transformer_lm experts",
                      source);
    if (!recipe->moe.enabled)
        return CM_ERR(CM_ERR_INVALID,
                      "%s is a dense model (moe.enabled false): there are no experts to merge",
                      source);
    if (recipe->moe.merged)
        return CM_ERR(CM_ERR_INVALID,
                      "%s is already merged (moe.merged true); merge the checkpoint it was made "
                      "from",
                      source);
    return CM_OK;
}

static cm_status check_options(const cm_recipe *recipe, const merge_options *options) {
    const int N = recipe->moe.num_experts;
    if (options->groups < 1 || options->groups > N)
        return CM_ERR(CM_ERR_INVALID,
                      "--groups %d is not in [1, %d]: the model has %d experts per MoE layer",
                      options->groups, N, N);
    if (options->calib_windows < 1)
        return CM_ERR(CM_ERR_INVALID, "--calib-windows %d must be >= 1", options->calib_windows);
    for (int l = 0; l < LM_MAX_LAYERS; l++)
        if (options->merge_layer[l] &&
            (l >= recipe->model.n_layers || !recipe_layer_is_moe(recipe, l)))
            return CM_ERR(CM_ERR_INVALID,
                          "--layers names block %d, which is not an MoE layer (MoE blocks: every "
                          "%d-th of %d)",
                          l, recipe->moe.every, recipe->model.n_layers);
    return CM_OK;
}

/* ---- calibration ----------------------------------------------------------------- */

typedef struct calibration {
    const lm_model *model;
    const cm_recipe *recipe;
    const merge_options *options;
    text_dataset data;
    ag_ctx ctx;
    int32_t *inputs, *targets; /* [batch_size, seq_len] */
    double *gram;              /* [layers, N, N] */
    bool terminal;             /* stderr is one: the progress line is redrawn */
} calibration;

/* Adds one forward's routing to the counts and Gram matrices. */
static cm_status add_report(const lm_moe_report *report, int64_t tokens, merge_result *r,
                            double *gram) {
    const int N = r->experts;
    if (r->layers == 0) {
        r->layers = report->n_layers;
        for (int i = 0; i < report->n_layers; i++) r->block[i] = report->layer[i];
    }
    for (int i = 0; i < r->layers; i++) {
        if (!report->logits[i])
            return CM_ERR(CM_ERR_INVALID,
                          "the router of block %d gives no logits to compare experts by (cmoe "
                          "merge needs a top-k router: topk, smoe_dropout, bias_balance, rmoe)",
                          r->block[i]);
        for (int e = 0; e < N; e++) r->counts[i * N + e] += report->stats[i].routed_per_expert[e];
        merge_gram_add(gram + (size_t)i * N * N, report->logits[i], tokens, N);
    }
    r->tokens += tokens;
    return CM_OK;
}

/* Windows [first, first + rows) of the calibration set, forwarded. */
static cm_status calibrate_batch(calibration *c, int first, int rows, merge_result *r) {
    const cm_recipe *recipe = c->recipe;
    const int T = recipe->data.seq_len;
    CM_TRY(text_dataset_batch(&c->data, c->options->seed, 0, c->options->calib_windows, T,
                              (shard_range){first, first + rows}, c->inputs, c->targets));
    lm_moe_report report;
    lm_forward_args args = {.ids = c->inputs,
                            .batch = rows,
                            .seq_len = T,
                            .seed = (uint64_t)recipe->train.seed,
                            .first_row = (uint64_t)first,
                            .report = &report};
    bool previous = ag_set_grad_enabled(&c->ctx, false);
    cm_status status = lm_forward(&c->ctx, c->model, &args) ? CM_OK : ag_ctx_status(&c->ctx);
    if (status == CM_OK) status = add_report(&report, (int64_t)rows * T, r, c->gram);
    ag_set_grad_enabled(&c->ctx, previous);
    ag_ctx_reset(&c->ctx);
    return status;
}

static cm_status calibrate_all(calibration *c, merge_result *r) {
    const int windows = c->options->calib_windows, batch = c->recipe->data.batch_size;
    for (int first = 0; first < windows; first += batch) {
        const int rows = windows - first < batch ? windows - first : batch;
        CM_TRY(calibrate_batch(c, first, rows, r));
        const bool last = first + rows == windows;
        if (!c->options->quiet && (last || c->terminal))
            fprintf(stderr, "\r[cmoe] calibration: %d/%d windows of %d bytes%s", first + rows,
                    windows, c->recipe->data.seq_len, last ? "\n" : "");
    }
    return CM_OK;
}

/* Counts and Gram matrices [layers, N, N] of the calibration windows. */
static cm_status calibrate(const lm_model *model, const cm_recipe *recipe,
                           const merge_options *options, merge_result *r, double *gram) {
    const size_t batch = (size_t)recipe->data.batch_size * recipe->data.seq_len;
    calibration c = {.model = model,
                     .recipe = recipe,
                     .options = options,
                     .gram = gram,
                     .terminal = isatty(fileno(stderr))};
    cm_status status = text_dataset_open(&c.data, recipe->data.path);
    if (status != CM_OK) return cm_error_wrap(status, "the training split (data.path)");
    c.inputs = malloc(sizeof(int32_t) * batch);
    c.targets = malloc(sizeof(int32_t) * batch);
    status = c.inputs && c.targets ? ag_ctx_init(&c.ctx, (size_t)recipe->train.arena_mib << 20)
                                   : CM_ERR(CM_ERR_NOMEM, "out of memory");
    if (status == CM_OK) {
        status = calibrate_all(&c, r);
        ag_ctx_free(&c.ctx);
    }
    free(c.inputs);
    free(c.targets);
    text_dataset_close(&c.data);
    return status;
}

/* ---- the plan ---------------------------------------------------------------------- */

static cm_status result_alloc(merge_result *r, const cm_recipe *recipe) {
    int layers = 0;
    for (int l = 0; l < recipe->model.n_layers; l++) layers += recipe_layer_is_moe(recipe, l);
    const size_t count = (size_t)layers * recipe->moe.num_experts;
    *r = (merge_result){.experts = recipe->moe.num_experts, .k = recipe->router.k};
    r->counts = calloc(count, sizeof *r->counts);
    r->freq = calloc(count, sizeof *r->freq);
    r->dominant = calloc(count, sizeof *r->dominant);
    r->group_of = calloc(count, sizeof *r->group_of);
    if (r->counts && r->freq && r->dominant && r->group_of) return CM_OK;
    merge_result_free(r);
    return CM_ERR(CM_ERR_NOMEM, "out of memory");
}

/* Layer i's groups, once r->groups[i] is known; similarity: scratch [N,N]. */
static cm_status group_layer(merge_result *r, int i, const double *gram,
                             const merge_options *options, double *similarity) {
    const int N = r->experts;
    int32_t *dominant = r->dominant + (size_t)i * N, *group_of = r->group_of + (size_t)i * N;
    if (!r->merged[i] || r->groups[i] == N) {
        for (int e = 0; e < N; e++) dominant[e] = group_of[e] = e;
        return CM_OK;
    }
    if (options->grouping == MERGE_GROUPING_RANDOM) {
        const cm_rng_key key = {options->seed, 0, (uint32_t)r->block[i], CM_RNG_MERGE};
        return merge_group_random(key, N, r->groups[i], dominant, group_of);
    }
    merge_similarity(gram + (size_t)i * N * N, N, similarity);
    return merge_group_msmoe(r->freq + (size_t)i * N, similarity, N, r->groups[i], dominant,
                             group_of);
}

static cm_status plan_groups(merge_result *r, const double *gram, const merge_options *options) {
    const int N = r->experts;
    bool any = false;
    for (int i = 0; i < r->layers; i++) any = any || options->merge_layer[r->block[i]];
    for (int i = 0; i < r->layers; i++) {
        merge_frequencies(r->counts + (size_t)i * N, N, r->freq + (size_t)i * N);
        r->merged[i] = !any || options->merge_layer[r->block[i]];
    }
    CM_TRY(merge_allocate(r->freq, r->merged, r->layers, N, options->groups, r->groups));
    double *similarity = malloc(sizeof(double) * (size_t)N * N);
    if (!similarity) return CM_ERR(CM_ERR_NOMEM, "out of memory");
    cm_status status = CM_OK;
    for (int i = 0; i < r->layers && status == CM_OK; i++)
        status = group_layer(r, i, gram, options, similarity);
    free(similarity);
    return status;
}

/* ---- the merged model ---------------------------------------------------------------- */

static ag_param *find_param(const ag_params *params, int block, const char *suffix) {
    char name[AG_PARAM_NAME_MAX];
    snprintf(name, sizeof name, "blocks.%d.moe.%s", block, suffix);
    return ag_params_find(params, name);
}

static float *param_data(const ag_params *params, int block, const char *suffix) {
    ag_param *param = find_param(params, block, suffix);
    return param ? param->tensor.data : NULL;
}

/* Aligns and merges layer i of the merged model's registry and writes its
 * group table. */
static cm_status merge_block(ag_params *params, const cm_recipe *recipe,
                             const merge_options *options, const merge_result *r, int i) {
    const int N = r->experts, block = r->block[i];
    const size_t at = (size_t)i * N;
    const merge_experts x = {.n = N,
                             .hidden = recipe_expert_hidden(recipe),
                             .d_model = recipe->model.d_model,
                             .w1 = param_data(params, block, "experts.w1"),
                             .b1 = param_data(params, block, "experts.b1"),
                             .w2 = param_data(params, block, "experts.w2"),
                             .b2 = param_data(params, block, "experts.b2"),
                             .w3 = param_data(params, block, "experts.w3"),
                             .b3 = param_data(params, block, "experts.b3")};
    ag_param *table = find_param(params, block, "group_of");
    if (!x.w1 || !x.b1 || !x.w2 || !x.b2 || !table)
        return CM_ERR(CM_ERR_INTERNAL, "block %d of the merged model has no experts or table",
                      block);
    if (r->groups[i] < N) { /* else nothing moves, bit for bit */
        if (options->align) CM_TRY(merge_align_layer(&x));
        CM_TRY(merge_layer_weights(&x, r->group_of + at, r->dominant + at, r->freq + at,
                                   options->mode, options->weights));
    }
    for (int e = 0; e < N; e++) table->tensor.data[e] = (float)r->group_of[at + e];
    return CM_OK;
}

/* Every parameter of `from` into the registry `to` (the same model plus the
 * group tables). */
static cm_status copy_params(const ag_params *from, ag_params *to) {
    for (int i = 0; i < from->count; i++) {
        const ag_param *source = from->items[i];
        ag_param *target = ag_params_find(to, source->name);
        if (!target || target->tensor.numel != source->tensor.numel)
            return CM_ERR(CM_ERR_INTERNAL, "the merged model has no parameter %s of its size",
                          source->name);
        memcpy(target->tensor.data, source->tensor.data,
               sizeof(float) * (size_t)source->tensor.numel);
    }
    return CM_OK;
}

static void describe_merge(const merge_options *o, const merge_result *r, char *out, size_t size) {
    int used = snprintf(out, size,
                        "MC-SMoE merge: groups %d (average), %d calibration windows (seed %llu), "
                        "grouping %s, align %s, weights %s, mode %s; groups per MoE block:",
                        o->groups, o->calib_windows, (unsigned long long)o->seed,
                        merge_grouping_names[o->grouping], o->align ? "on" : "off",
                        merge_weighting_names[o->weights], merge_mode_names[o->mode]);
    for (int i = 0; i < r->layers && used > 0 && (size_t)used < size; i++)
        used += snprintf(out + used, size - (size_t)used, " %d:%d%s", r->block[i], r->groups[i],
                         r->merged[i] ? "" : " (kept)");
}

/* Builds the merged model from the source's parameters and saves it. */
static cm_status write_merged(const ag_params *source_params, const char *source,
                              const ckpt_meta *source_meta, const cm_recipe *recipe,
                              const merge_options *options, const merge_result *r,
                              const char *out_path) {
    cm_recipe merged = *recipe;
    merged.moe.merged = true;
    run_session *session;
    CM_TRY(run_session_open(&merged, NULL, false, &session));
    ag_params *params = run_session_params(session);
    cm_status status = copy_params(source_params, params);
    for (int i = 0; i < r->layers && status == CM_OK; i++)
        status = merge_block(params, recipe, options, r, i);
    char *merged_text = recipe_format_text(&merged), *source_text = recipe_format_text(recipe);
    char method[1024];
    describe_merge(options, r, method, sizeof method);
    if (status == CM_OK && (!merged_text || !source_text))
        status = CM_ERR(CM_ERR_NOMEM, "out of memory");
    if (status == CM_OK) {
        const ckpt_meta meta = {0, (uint64_t)recipe->train.seed, 0};
        const ckpt_origin origin = {source, source_meta->step, source_meta->seed, source_text,
                                    method, "merged_from"};
        status = ckpt_save_with_origin(out_path, params, &meta, merged_text, &origin);
    }
    free(merged_text);
    free(source_text);
    run_session_close(session);
    return status;
}

/* Loads the source, calibrates, plans and writes; r is allocated. */
static cm_status merge_loaded(const char *source, const cm_recipe *recipe,
                              const merge_options *options, const char *out_path, merge_result *r) {
    run_session *session;
    CM_TRY(run_session_open(recipe, NULL, false, &session));
    ckpt_meta meta = {0};
    const int N = r->experts;
    double *gram = calloc((size_t)LM_MAX_LAYERS * N * N, sizeof *gram);
    cm_status status = gram ? ckpt_load(source, run_session_params(session), &meta, false)
                            : CM_ERR(CM_ERR_NOMEM, "out of memory");
    if (status == CM_OK)
        status =
            calibrate(task_lm_model(run_session_task_state(session)), recipe, options, r, gram);
    if (status == CM_OK) status = plan_groups(r, gram, options);
    if (status == CM_OK)
        status =
            write_merged(run_session_params(session), source, &meta, recipe, options, r, out_path);
    free(gram);
    run_session_close(session);
    return status;
}

cm_status merge_check(const cm_recipe *recipe, const merge_options *options, const char *source) {
    CM_TRY(check_model(recipe, source));
    return check_options(recipe, options);
}

cm_status merge_checkpoint(const char *source, const cm_recipe *recipe,
                           const merge_options *options, const char *out_path,
                           merge_result *result) {
    CM_TRY(merge_check(recipe, options, source));
    merge_result r;
    CM_TRY(result_alloc(&r, recipe));
    cm_status status = merge_loaded(source, recipe, options, out_path, &r);
    if (status == CM_OK && result)
        *result = r;
    else
        merge_result_free(&r);
    return status;
}
