/* The run loop (train/run.h) end to end on the LM task, a tiny model and a
 * synthetic corpus: training lowers the loss; K steps straight equal K/2
 * steps, stop, resume, K/2 more, bit for bit (logged losses and final
 * parameters and moments), for the dense model and every router; bad data
 * paths fail with a clear message; an injected failure and a NaN loss stop
 * the run with their messages. */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "layers/transformer.h"
#include "train/checkpoint.h"
#include "train/metrics.h"
#include "train/recipe_moe.h"
#include "train/run.h"

static char dir[] = "/tmp/cmoe-trainer-XXXXXX";
static char train_path[256], valid_path[256];

/* A corpus with structure to learn: lines of a small grammar. */
static void write_corpus(void) {
    ck_assert_ptr_nonnull(mkdtemp(dir));
    snprintf(train_path, sizeof train_path, "%s/train.txt", dir);
    snprintf(valid_path, sizeof valid_path, "%s/valid.txt", dir);
    const char *words[] = {"and", "the", "lord", "said", "unto", "moses", "behold", "of"};
    const char *paths[2] = {train_path, valid_path};
    for (int f = 0; f < 2; f++) {
        FILE *file = fopen(paths[f], "w");
        ck_assert_ptr_nonnull(file);
        for (int i = 0; i < (f ? 400 : 4000); i++) {
            uint64_t pick =
                cm_rng_below((cm_rng_key){(uint64_t)f, 0, 0, CM_RNG_TEST}, (uint64_t)i, 8);
            fprintf(file, "%s%s", words[pick], i % 9 == 8 ? ".\n" : " ");
        }
        fclose(file);
    }
}

static void remove_corpus(void) {
    char command[300];
    snprintf(command, sizeof command, "rm -rf '%s'", dir);
    ck_assert_int_eq(system(command), 0);
    strcpy(dir, "/tmp/cmoe-trainer-XXXXXX");
}

/* A tiny LM recipe; `extra` (may be "") adds YAML sections such as moe/router. */
static cm_recipe tiny_recipe_with(const char *out_dir, int64_t steps, const char *extra) {
    char text[4096];
    snprintf(text, sizeof text,
             "name: tiny\n"
             "model: {n_layers: 2, d_model: 32, n_heads: 2, d_ff: 64, dropout: 0.1}\n"
             "data: {path: '%s', valid_path: '%s', test_path: '%s', seq_len: 16, "
             "batch_size: 4}\n"
             "optim: {lr: 3.0e-3, grad_clip: 1.0}\n"
             "schedule: {type: cosine, warmup_steps: 2, min_lr: 1.0e-4}\n"
             "train: {steps: %lld, log_every: 1, eval_every: 4, eval_batches: 2, arena_mib: 32,"
             " out_dir: '%s', threads: 1}\n"
             "checkpoint: {every: 0, keep_last: 0}\n%s",
             train_path, valid_path, valid_path, (long long)steps, out_dir, extra);
    cm_recipe recipe;
    ck_assert_msg(recipe_load_text(text, "tiny", NULL, 0, &recipe) == CM_OK, "%s",
                  cm_error_message());
    return recipe;
}

static cm_recipe tiny_recipe(const char *out_dir, int64_t steps) {
    return tiny_recipe_with(out_dir, steps, "");
}

/* The numeric fields of a run's metrics (timings excluded), one per line. */
static char *loss_lines(const char *run_dir) {
    char path[512], line[1024];
    snprintf(path, sizeof path, "%s/metrics.jsonl", run_dir);
    FILE *file = fopen(path, "r");
    ck_assert_ptr_nonnull(file);
    size_t capacity = 1 << 16, used = 0;
    char *out = calloc(1, capacity);
    while (fgets(line, sizeof line, file)) {
        const char *keys[] = {"\"step\"", "\"loss_last\"", "\"bpc\"", "\"grad_norm\""};
        for (size_t k = 0; k < sizeof keys / sizeof keys[0]; k++) {
            const char *at = strstr(line, keys[k]);
            if (!at) continue;
            size_t length = strcspn(at, ",}");
            ck_assert_uint_lt(used + length + 2, capacity);
            memcpy(out + used, at, length);
            used += length;
            out[used++] = ' ';
        }
        out[used++] = '\n';
    }
    fclose(file);
    return out;
}

/* Parameters, m and v of a checkpoint of the tiny (dense) model. */
static ag_params load_final(const cm_recipe *recipe, const char *checkpoint) {
    lm_config config = {.vocab = 256,
                        .d_model = 32,
                        .n_layer = 2,
                        .n_head = 2,
                        .d_ff = 64,
                        .max_seq = 16,
                        .dropout = 0.1f,
                        .init_std = 0.02f,
                        .scale_residual_init = true,
                        .layernorm_eps = 1e-5f};
    (void)recipe;
    ag_params params;
    ag_params_init(&params);
    lm_model model;
    ck_assert_int_eq(lm_declare(&model, &config, &params), CM_OK);
    ck_assert_int_eq(ag_params_finalize(&params, 99), CM_OK);
    ck_assert_msg(ckpt_load(checkpoint, &params, NULL, true) == CM_OK, "%s", cm_error_message());
    return params;
}

START_TEST(test_resume_is_bit_identical) {
    write_corpus();
    char straight_dir[300], resumed_dir[300];
    snprintf(straight_dir, sizeof straight_dir, "%s/straight", dir);
    snprintf(resumed_dir, sizeof resumed_dir, "%s/resumed", dir);
    const int64_t steps = 12;

    cm_recipe straight = tiny_recipe(straight_dir, steps);
    run_options options = {.quiet = true};
    run_result result;
    ck_assert_msg(run_train(&straight, &options, &result) == CM_OK, "%s", cm_error_message());
    ck_assert_int_eq(result.steps_done, steps);
    ck_assert(!result.interrupted);
    ck_assert(result.has_final && isfinite(result.final.headline));

    cm_recipe resumed = tiny_recipe(resumed_dir, steps);
    options.stop_at_step = steps / 2;
    ck_assert_msg(run_train(&resumed, &options, &result) == CM_OK, "%s", cm_error_message());
    ck_assert(result.interrupted);
    ck_assert_int_eq(result.steps_done, steps / 2);
    options.stop_at_step = 0;
    options.resume = "auto";
    ck_assert_msg(run_train(&resumed, &options, &result) == CM_OK, "%s", cm_error_message());
    ck_assert_int_eq(result.steps_done, steps);

    char *a = loss_lines(straight_dir), *b = loss_lines(resumed_dir);
    ck_assert_msg(strcmp(a, b) == 0, "straight:\n%s\nresumed:\n%s", a, b);
    ck_assert_ptr_nonnull(strstr(a, "\"step\": 12")); /* the whole run is there */
    free(a);
    free(b);

    char path_a[400], path_b[400];
    ckpt_path_for_step(straight_dir, steps, path_a, sizeof path_a);
    ckpt_path_for_step(resumed_dir, steps, path_b, sizeof path_b);
    ag_params final_a = load_final(&straight, path_a), final_b = load_final(&resumed, path_b);
    size_t bytes = final_a.buffers[AG_GROUP_DENSE].numel * sizeof(float);
    ck_assert_int_eq(memcmp(final_a.buffers[0].data, final_b.buffers[0].data, bytes), 0);
    ck_assert_int_eq(memcmp(final_a.buffers[0].m, final_b.buffers[0].m, bytes), 0);
    ck_assert_int_eq(memcmp(final_a.buffers[0].v, final_b.buffers[0].v, bytes), 0);
    ag_params_free(&final_a);
    ag_params_free(&final_b);
    remove_corpus();
}
END_TEST

START_TEST(test_training_lowers_the_loss) {
    write_corpus();
    char run_dir[300];
    snprintf(run_dir, sizeof run_dir, "%s/run", dir);
    cm_recipe recipe = tiny_recipe(run_dir, 60);
    recipe.train.eval_every = 30;
    run_options options = {.quiet = true};
    run_result result;
    ck_assert_msg(run_train(&recipe, &options, &result) == CM_OK, "%s", cm_error_message());
    /* Uniform over 256 bytes is 8 bits; the grammar has ~9 symbols in use. */
    ck_assert(result.has_periodic);
    double bpc = NAN;
    ck_assert(metrics_record_get(&result.periodic.record, "bpc", &bpc));
    ck_assert_msg(bpc < 4.0, "validation bpc %.3f after 60 steps", bpc);
    ck_assert_str_eq(result.periodic.record.kind, "valid");
    remove_corpus();
}
END_TEST

START_TEST(test_missing_data_is_a_clear_error) {
    write_corpus();
    char run_dir[300];
    snprintf(run_dir, sizeof run_dir, "%s/run", dir);
    cm_recipe recipe = tiny_recipe(run_dir, 4);
    snprintf(recipe.data.path, sizeof recipe.data.path, "%s/missing.txt", dir);
    run_options options = {.quiet = true};
    run_result result;
    ck_assert_int_eq(run_train(&recipe, &options, &result), CM_ERR_IO);
    ck_assert_msg(strstr(cm_error_message(), "missing.txt") != NULL, "%s", cm_error_message());
    remove_corpus();
}
END_TEST

/* Fault injection is an option of the run loop: the named rank fails when it
 * starts the named step, after the steps before it were taken. */
START_TEST(test_injected_failure_stops_the_run) {
    write_corpus();
    char run_dir[300];
    snprintf(run_dir, sizeof run_dir, "%s/run", dir);
    cm_recipe recipe = tiny_recipe(run_dir, 8);
    run_options options = {.quiet = true, .fail_rank = 0, .fail_step = 3};
    run_result result;
    ck_assert_int_eq(run_train(&recipe, &options, &result), CM_ERR_INTERNAL);
    ck_assert_msg(strstr(cm_error_message(), "failure injected at step 3") != NULL, "%s",
                  cm_error_message());
    ck_assert_int_eq(result.steps_done, 2);
    options.fail_rank = 1; /* not this process */
    ck_assert_int_eq(run_train(&recipe, &options, &result), CM_OK);
    ck_assert_int_eq(result.steps_done, 8);
    remove_corpus();
}
END_TEST

/* A learning rate that blows the loss up stops the run with CM_ERR_NUMERIC
 * and a hint, before the update of the non-finite step. */
START_TEST(test_non_finite_loss_stops_the_run) {
    write_corpus();
    char run_dir[300];
    snprintf(run_dir, sizeof run_dir, "%s/run", dir);
    cm_recipe recipe = tiny_recipe(run_dir, 40);
    recipe.optim.lr = 1e30;
    recipe.optim.grad_clip = 0;
    recipe.schedule.warmup_steps = 0;
    run_options options = {.quiet = true};
    run_result result;
    ck_assert_int_eq(run_train(&recipe, &options, &result), CM_ERR_NUMERIC);
    ck_assert_msg(strstr(cm_error_message(), "lower optim.lr or set optim.grad_clip") != NULL, "%s",
                  cm_error_message());
    ck_assert_int_lt(result.steps_done, 40);
    remove_corpus();
}
END_TEST

/* Gradient accumulation: 4 micro-batches of 2 sequences give the update of
 * one batch of 8 (the same windows and dropout masks, keyed by the global
 * row), to float rounding; 1 micro-batch of 2 does not. */
START_TEST(test_grad_accum_matches_one_batch) {
    write_corpus();
    char run_dir[300];
    snprintf(run_dir, sizeof run_dir, "%s/run", dir);
    cm_recipe whole = tiny_recipe(run_dir, 4), split = whole, small = whole;
    whole.data.batch_size = 8;
    split.data.batch_size = 2;
    split.train.grad_accum = 4;
    small.data.batch_size = 2;
    const cm_recipe *recipes[3] = {&whole, &split, &small};
    run_session *sessions[3];
    double losses[3][2];
    for (int r = 0; r < 3; r++) {
        ck_assert_msg(run_session_open(recipes[r], NULL, true, &sessions[r]) == CM_OK, "%s",
                      cm_error_message());
        for (int step = 0; step < 2; step++) {
            run_step_result done;
            ck_assert_int_eq(run_session_step(sessions[r], step, &done), CM_OK);
            losses[r][step] = done.loss;
        }
    }
    const ag_param_buffer *a = &run_session_params(sessions[0])->buffers[AG_GROUP_DENSE];
    const ag_param_buffer *b = &run_session_params(sessions[1])->buffers[AG_GROUP_DENSE];
    const ag_param_buffer *c = &run_session_params(sessions[2])->buffers[AG_GROUP_DENSE];
    double worst = 0.0, worst_small = 0.0, scale = 0.0;
    for (size_t i = 0; i < a->numel; i++) {
        worst = fmax(worst, fabs((double)a->data[i] - b->data[i]));
        worst_small = fmax(worst_small, fabs((double)a->data[i] - c->data[i]));
        scale = fmax(scale, fabs((double)a->data[i]));
    }
    ck_assert_msg(worst <= 1e-6 * scale, "accumulated update differs by %g (scale %g)", worst,
                  scale);
    ck_assert_msg(worst_small > 1e-4 * scale, "the check cannot tell batches apart (%g)",
                  worst_small);
    for (int step = 0; step < 2; step++)
        ck_assert_msg(fabs(losses[0][step] - losses[1][step]) <= 1e-6 * fabs(losses[0][step]),
                      "step %d loss %.9g vs %.9g", step, losses[0][step], losses[1][step]);
    for (int r = 0; r < 3; r++) run_session_close(sessions[r]);
    remove_corpus();
}
END_TEST

/* A run with gradient accumulation stopped and resumed continues bit for
 * bit (THOR: its expert draws are keyed by the micro-batch too). */
START_TEST(test_grad_accum_resume_is_bit_identical) {
    write_corpus();
    const char *thor = "moe: {enabled: true, num_experts: 4, every: 2}\n"
                       "router: {type: thor, thor_alpha: 1.0}\n";
    char straight_dir[300], resumed_dir[300];
    snprintf(straight_dir, sizeof straight_dir, "%s/straight", dir);
    snprintf(resumed_dir, sizeof resumed_dir, "%s/resumed", dir);
    cm_recipe straight = tiny_recipe_with(straight_dir, 8, thor);
    cm_recipe resumed = tiny_recipe_with(resumed_dir, 8, thor);
    straight.train.grad_accum = resumed.train.grad_accum = 3;
    run_options options = {.quiet = true};
    run_result result;
    ck_assert_msg(run_train(&straight, &options, &result) == CM_OK, "%s", cm_error_message());
    options.stop_at_step = 5;
    ck_assert_int_eq(run_train(&resumed, &options, &result), CM_OK);
    ck_assert(result.interrupted);
    options.stop_at_step = 0;
    options.resume = "auto";
    ck_assert_int_eq(run_train(&resumed, &options, &result), CM_OK);
    char *a = loss_lines(straight_dir), *b = loss_lines(resumed_dir);
    ck_assert_msg(strcmp(a, b) == 0, "straight:\n%s\nresumed:\n%s", a, b);
    ck_assert_ptr_nonnull(strstr(a, "\"step\": 8"));
    free(a);
    free(b);
    remove_corpus();
}
END_TEST

/* Copies of one expert slice of a parameter: values, both moments, steps. */
typedef struct slice_copy {
    float data[4096], m[4096], v[4096];
    int64_t steps;
} slice_copy;

static void copy_slice(run_session *session, const ag_param *param, int slice, slice_copy *out) {
    const ag_param_buffer *buffer = &run_session_params(session)->buffers[param->group];
    const int64_t n = param->tensor.numel / param->slices;
    ck_assert_int_le(n, 4096);
    size_t at = param->offset + (size_t)(slice * n);
    memcpy(out->data, buffer->data + at, (size_t)n * sizeof(float));
    memcpy(out->m, buffer->m + at, (size_t)n * sizeof(float));
    memcpy(out->v, buffer->v + at, (size_t)n * sizeof(float));
    out->steps = param->slice_steps[slice];
}

static bool same_slice(const slice_copy *a, const slice_copy *b, int64_t n) {
    size_t bytes = (size_t)n * sizeof(float);
    return !memcmp(a->data, b->data, bytes) && !memcmp(a->m, b->m, bytes) &&
           !memcmp(a->v, b->v, bytes) && a->steps == b->steps;
}

/* THOR sends a layer's tokens to 1 of 4 experts per pass, so most experts
 * get no token in a step: by default their values, moments and step count
 * stay bit for bit (the used ones change); with skip_unused_experts false
 * (Megatron's semantics) weight decay moves them anyway. */
START_TEST(test_untouched_experts_are_not_updated) {
    write_corpus();
    char run_dir[300];
    snprintf(run_dir, sizeof run_dir, "%s/run", dir);
    const char *thor = "moe: {enabled: true, num_experts: 4, every: 2}\n"
                       "router: {type: thor, thor_alpha: 1.0}\n";
    for (int legacy = 0; legacy < 2; legacy++) {
        cm_recipe recipe = tiny_recipe_with(run_dir, 4, thor);
        recipe.optim.skip_unused_experts = !legacy;
        run_session *session;
        ck_assert_int_eq(run_session_open(&recipe, NULL, true, &session), CM_OK);
        run_step_result done;
        ck_assert_int_eq(run_session_step(session, 0, &done), CM_OK);
        const char *names[4] = {"blocks.0.moe.experts.w1", "blocks.0.moe.experts.b1",
                                "blocks.0.moe.experts.w2", "blocks.0.moe.experts.b2"};
        static slice_copy before[4][4], after;
        for (int p = 0; p < 4; p++) {
            ag_param *param = ag_params_find(run_session_params(session), names[p]);
            ck_assert_ptr_nonnull(param);
            ck_assert_int_eq(param->slices, 4);
            for (int e = 0; e < 4; e++) copy_slice(session, param, e, &before[p][e]);
        }
        ck_assert_int_eq(run_session_step(session, 1, &done), CM_OK);
        int unused = 0, used = 0;
        for (int p = 0; p < 4; p++) {
            ag_param *param = ag_params_find(run_session_params(session), names[p]);
            const int64_t n = param->tensor.numel / param->slices;
            for (int e = 0; e < 4; e++) {
                copy_slice(session, param, e, &after);
                bool same = same_slice(&before[p][e], &after, n);
                if (!param->slice_used[e]) {
                    unused++;
                    /* legacy: decay and the step count move every slice */
                    ck_assert_msg(legacy ? !same : same, "%s expert %d (legacy %d)", names[p], e,
                                  legacy);
                } else {
                    used++;
                    ck_assert_msg(!same, "%s expert %d was used but not updated", names[p], e);
                    ck_assert_int_eq(after.steps, before[p][e].steps + 1);
                }
            }
        }
        ck_assert_int_gt(unused, 0); /* the case really has untouched experts */
        ck_assert_int_gt(used, 0);
        run_session_close(session);
    }
    remove_corpus();
}
END_TEST

static const char *const moe_sections[] = {
    "moe: {enabled: true, num_experts: 4, split_dense: true}\n"
    "router: {type: topk, k: 2, aux_loss_coef: 0.01, z_loss_coef: 0.001}\n",
    "moe: {enabled: true, num_experts: 4, split_dense: true}\n"
    "router: {type: topk, k: 1, gating: topk_softmax, capacity_factor: 1.0}\n",
    "moe: {enabled: true, num_experts: 4, split_dense: true}\n"
    "router: {type: smoe_dropout, k: 2, k_schedule: linear_increase, k_min: 1, k_max: 4}\n",
    "moe: {enabled: true, num_experts: 2, every: 2}\n"
    "router: {type: thor, thor_alpha: 1.0}\n",
    "moe: {enabled: true, num_experts: 4, split_dense: true}\n"
    "router: {type: top_p, top_p: 0.5, entropy_coef: 0.001}\n",
    "moe: {enabled: true, num_experts: 4, split_dense: true}\n"
    "router: {type: expert_choice, capacity_factor: 2.0}\n",
    /* SwiGLU experts with dropout inside them: its masks resume too */
    "moe: {enabled: true, num_experts: 4, split_dense: true, activation: swiglu, "
    "expert_dropout: 0.2}\n"
    "router: {type: topk, k: 2}\n",
};

/* Every router trains: the loss falls, stays finite, and the run writes
 * routing statistics; and each resumes bit for bit (THOR's random experts
 * and SMoE-Dropout's k schedule included). */
START_TEST(test_moe_routers_train_and_resume) {
    write_corpus();
    for (size_t i = 0; i < sizeof moe_sections / sizeof moe_sections[0]; i++) {
        char straight_dir[300], resumed_dir[300];
        snprintf(straight_dir, sizeof straight_dir, "%s/straight%zu", dir, i);
        snprintf(resumed_dir, sizeof resumed_dir, "%s/resumed%zu", dir, i);
        cm_recipe recipe = tiny_recipe_with(straight_dir, 30, moe_sections[i]);
        recipe.train.eval_every = 15;
        run_options options = {.quiet = true};
        run_result result;
        ck_assert_msg(run_train(&recipe, &options, &result) == CM_OK, "case %zu: %s", i,
                      cm_error_message());
        double bpc = NAN, mean_k = NAN;
        ck_assert(metrics_record_get(&result.periodic.record, "bpc", &bpc));
        ck_assert_msg(bpc < 5.0, "case %zu: validation bpc %.3f", i, bpc);
        ck_assert(metrics_record_get(&result.last_train, "mean_k", &mean_k));
        ck_assert_double_gt(mean_k, 0.0);
        char *straight = loss_lines(straight_dir);
        ck_assert_msg(strstr(straight, "\"step\": 30") != NULL, "case %zu", i);

        cm_recipe resumed = tiny_recipe_with(resumed_dir, 30, moe_sections[i]);
        resumed.train.eval_every = 15;
        options.stop_at_step = 13;
        ck_assert_int_eq(run_train(&resumed, &options, &result), CM_OK);
        options.stop_at_step = 0;
        options.resume = "auto";
        ck_assert_int_eq(run_train(&resumed, &options, &result), CM_OK);
        char *again = loss_lines(resumed_dir);
        ck_assert_msg(strcmp(straight, again) == 0, "case %zu:\n%s\nresumed:\n%s", i, straight,
                      again);
        free(straight);
        free(again);
        char metrics[400];
        snprintf(metrics, sizeof metrics, "%s/metrics.jsonl", straight_dir);
        FILE *file = fopen(metrics, "r");
        char line[2048];
        int moe_lines = 0;
        while (fgets(line, sizeof line, file))
            moe_lines += strstr(line, "\"kind\": \"moe\"") != NULL;
        fclose(file);
        ck_assert_int_ge(moe_lines, 30); /* one per MoE layer per log step */
    }
    remove_corpus();
}
END_TEST

/* SMoE-Dropout: the router never changes, and k follows the schedule. */
START_TEST(test_smoe_router_frozen_and_k_scheduled) {
    write_corpus();
    char run_dir[300];
    snprintf(run_dir, sizeof run_dir, "%s/smoe", dir);
    cm_recipe recipe = tiny_recipe_with(run_dir, 12, moe_sections[2]);
    run_options options = {.quiet = true};
    run_result result;
    ck_assert_int_eq(run_train(&recipe, &options, &result), CM_OK);

    /* The same model freshly initialised: router weights must match the
     * trained checkpoint bit for bit, experts must not. */
    lm_config config = {.vocab = 256,
                        .d_model = 32,
                        .n_layer = 2,
                        .n_head = 2,
                        .d_ff = 64,
                        .max_seq = 16,
                        .dropout = 0.1f,
                        .init_std = 0.02f,
                        .scale_residual_init = true,
                        .layernorm_eps = 1e-5f,
                        .moe_every = 1};
    recipe_moe_config(&recipe, &config.moe);
    ag_params fresh, trained;
    lm_model model_a, model_b;
    ag_params_init(&fresh);
    ag_params_init(&trained);
    ck_assert_int_eq(lm_declare(&model_a, &config, &fresh), CM_OK);
    ck_assert_int_eq(lm_declare(&model_b, &config, &trained), CM_OK);
    ck_assert_int_eq(ag_params_finalize(&fresh, (uint64_t)recipe.train.seed), CM_OK);
    ck_assert_int_eq(ag_params_finalize(&trained, 1), CM_OK);
    char path[400];
    ckpt_path_for_step(run_dir, 12, path, sizeof path);
    ck_assert_msg(ckpt_load(path, &trained, NULL, true) == CM_OK, "%s", cm_error_message());
    for (int l = 0; l < 2; l++) {
        const ag_tensor *a = &model_a.blocks[l].moe.router.weight->tensor;
        const ag_tensor *b = &model_b.blocks[l].moe.router.weight->tensor;
        ck_assert(model_b.blocks[l].moe.router.weight->frozen);
        ck_assert_int_eq(memcmp(a->data, b->data, (size_t)a->numel * sizeof(float)), 0);
        const ag_tensor *w1a = &model_a.blocks[l].moe.w1->tensor;
        const ag_tensor *w1b = &model_b.blocks[l].moe.w1->tensor;
        ck_assert_int_ne(memcmp(w1a->data, w1b->data, (size_t)w1a->numel * sizeof(float)), 0);
    }
    ag_params_free(&fresh);
    ag_params_free(&trained);

    /* k per logged step equals the schedule at that step's update. */
    router_config router_cfg;
    recipe_router_config(&recipe, &router_cfg);
    char metrics[400], line[2048];
    snprintf(metrics, sizeof metrics, "%s/metrics.jsonl", run_dir);
    FILE *file = fopen(metrics, "r");
    int checked = 0;
    while (fgets(line, sizeof line, file)) {
        double step, k;
        if (!metrics_is_kind(line, "moe")) continue;
        ck_assert(metrics_find_number(line, "step", &step) && metrics_find_number(line, "k", &k));
        ck_assert_int_eq((int)k, router_k_at(&router_cfg.k_schedule, (int64_t)step - 1));
        checked++;
    }
    fclose(file);
    ck_assert_int_eq(checked, 24);
    ck_assert_int_eq(router_k_at(&router_cfg.k_schedule, 0), 1);
    ck_assert_int_eq(router_k_at(&router_cfg.k_schedule, 11), 4);
    remove_corpus();
}
END_TEST

/* A tiny LM with SwiGLU experts (and dropout inside them) learns: the loss
 * falls well below the first step's, and the validation bpc far below 8
 * bits; its MoE blocks have the up projection w3 / b3 and a dense GELU
 * model's do not. */
START_TEST(test_swiglu_experts_train) {
    write_corpus();
    char run_dir[300];
    snprintf(run_dir, sizeof run_dir, "%s/swiglu", dir);
    cm_recipe recipe = tiny_recipe_with(run_dir, 60,
                                        "moe: {enabled: true, num_experts: 4, split_dense: true, "
                                        "activation: swiglu, expert_dropout: 0.1}\n"
                                        "router: {type: topk, k: 2}\n");
    recipe.train.eval_every = 30;
    run_session *session = NULL;
    ck_assert_msg(run_session_open(&recipe, NULL, true, &session) == CM_OK, "%s",
                  cm_error_message());
    run_step_result first = {0};
    ck_assert_int_eq(run_session_step(session, 0, &first), CM_OK);
    int up_projections = 0;
    ag_params *params = run_session_params(session);
    for (int i = 0; i < params->count; i++)
        up_projections += strstr(params->items[i]->name, ".moe.experts.w3") != NULL ||
                          strstr(params->items[i]->name, ".moe.experts.b3") != NULL;
    ck_assert_int_eq(up_projections, 2 * 2); /* both blocks are MoE */
    run_session_close(session);

    run_options options = {.quiet = true};
    run_result result;
    ck_assert_msg(run_train(&recipe, &options, &result) == CM_OK, "%s", cm_error_message());
    ck_assert_msg(result.last_train_loss < 0.6 * first.loss, "loss %g -> %g", first.loss,
                  result.last_train_loss);
    double bpc = NAN;
    ck_assert(metrics_record_get(&result.periodic.record, "bpc", &bpc));
    ck_assert_msg(bpc < 4.0, "validation bpc %.3f after 60 steps", bpc);
    remove_corpus();
}
END_TEST

/* cmoe bench's model FLOPs count three matrices per SwiGLU expert: the
 * difference from GELU experts is one d x h product per chosen expert, 6
 * FLOPs per multiply-add per token (forward and backward). */
START_TEST(test_model_flops_count_swiglu_matrices) {
    write_corpus();
    double flops[2];
    for (int swiglu = 0; swiglu < 2; swiglu++) {
        char run_dir[300];
        snprintf(run_dir, sizeof run_dir, "%s/flops%d", dir, swiglu);
        cm_recipe recipe = tiny_recipe_with(
            run_dir, 4,
            swiglu ? "moe: {enabled: true, num_experts: 4, expert_hidden: 24, activation: swiglu}\n"
                     "router: {type: topk, k: 2}\n"
                   : "moe: {enabled: true, num_experts: 4, expert_hidden: 24}\n"
                     "router: {type: topk, k: 2}\n");
        run_session *session = NULL;
        ck_assert_msg(run_session_open(&recipe, NULL, false, &session) == CM_OK, "%s",
                      cm_error_message());
        flops[swiglu] =
            run_session_task(session)->model_flops_per_step(run_session_task_state(session));
        run_session_close(session);
    }
    /* 4 x 16 tokens, 2 MoE layers, k 2, d 32, h 24 */
    ck_assert_double_eq_tol(flops[1] - flops[0], 64.0 * 6.0 * 2 * 2 * 32 * 24, 1e-6 * flops[1]);
    remove_corpus();
}
END_TEST

int main(void) {
    Suite *suite = suite_create("trainer");
    TCase *tc = tcase_create("trainer");
    tcase_add_test(tc, test_resume_is_bit_identical);
    tcase_add_test(tc, test_training_lowers_the_loss);
    tcase_add_test(tc, test_missing_data_is_a_clear_error);
    tcase_add_test(tc, test_injected_failure_stops_the_run);
    tcase_add_test(tc, test_non_finite_loss_stops_the_run);
    tcase_add_test(tc, test_grad_accum_matches_one_batch);
    tcase_add_test(tc, test_grad_accum_resume_is_bit_identical);
    tcase_add_test(tc, test_untouched_experts_are_not_updated);
    tcase_add_test(tc, test_moe_routers_train_and_resume);
    tcase_add_test(tc, test_smoe_router_frozen_and_k_scheduled);
    tcase_add_test(tc, test_swiglu_experts_train);
    tcase_add_test(tc, test_model_flops_count_swiglu_matrices);
    tcase_set_timeout(tc, 300);
    suite_add_tcase(suite, tc);
    SRunner *runner = srunner_create(suite);
    srunner_run_all(runner, CK_NORMAL);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
