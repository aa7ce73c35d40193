/* The key/value-cache decoder (layers/lm_decode.h) against lm_forward: for a
 * tiny model of each router, with random weights, the logits of the
 * incremental path at every position equal those of one full no-grad
 * evaluation forward over the whole sequence (RMoE: the router state
 * carried across the MoE layers of each position). */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/rng.h"
#include "layers/lm_decode.h"
#include "train/run.h"

enum { SEQ = 24, VOCAB = 256 };

typedef struct decode_case {
    const char *name;
    const char *sections; /* YAML moe/router sections ("" = dense) */
} decode_case;

static const decode_case cases[] = {
    {"dense", ""},
    {"topk softmax_topk", "moe: {enabled: true, num_experts: 4}\n"
                          "router: {type: topk, k: 2, gating: softmax_topk, bias: true}\n"},
    {"topk topk_softmax", "moe: {enabled: true, num_experts: 4, activation: swiglu}\n"
                          "router: {type: topk, k: 2, gating: topk_softmax}\n"},
    {"top_p", "moe: {enabled: true, num_experts: 4, activation: relu}\n"
              "router: {type: top_p, top_p: 0.6}\n"},
    {"smoe_dropout", "moe: {enabled: true, num_experts: 4, split_dense: true}\n"
                     "router: {type: smoe_dropout, k: 2, k_min: 1, k_max: 4}\n"},
    {"smoe_dropout eval_k", "moe: {enabled: true, num_experts: 4, split_dense: true}\n"
                            "router: {type: smoe_dropout, k: 2, k_min: 1, k_max: 4, eval_k: 3}\n"},
    {"thor per_sequence", "moe: {enabled: true, num_experts: 4, every: 2}\n"
                          "router: {type: thor, thor_level: per_sequence}\n"},
    {"thor per_token", "moe: {enabled: true, num_experts: 4}\n"
                       "router: {type: thor, thor_level: per_token}\n"},
    /* RMoE: the state crosses the MoE layers 0 and 2 over the dense layer 1 */
    {"rmoe every 2", "moe: {enabled: true, num_experts: 4, every: 2}\n"
                     "router: {type: rmoe, k: 2, gating: topk_softmax, rnn_hidden: 8}\n"},
    {"rmoe all layers", "moe: {enabled: true, num_experts: 4, activation: swiglu}\n"
                        "router: {type: rmoe, k: 2, rnn_hidden: 5, rnn_state: detach}\n"},
    {"rmoe zero", "moe: {enabled: true, num_experts: 4}\n"
                  "router: {type: rmoe, k: 1, rnn_hidden: 6, rnn_state: zero}\n"},
};

static cm_recipe tiny_recipe(const char *sections) {
    char text[2048];
    snprintf(text, sizeof text,
             "name: decode\n"
             "model: {n_layers: 3, d_model: 32, n_heads: 4, d_ff: 64}\n"
             "data: {seq_len: %d, batch_size: 2}\n"
             "train: {seed: 77, threads: 1}\n%s",
             SEQ, sections);
    cm_recipe recipe;
    ck_assert_msg(recipe_load_text(text, "decode", NULL, 0, &recipe) == CM_OK, "%s",
                  cm_error_message());
    return recipe;
}

/* Every parameter value plus normal(0, 0.15) noise: biases and norms away
 * from their init, routers far from uniform. */
static void perturb(ag_params *params, uint64_t seed) {
    for (int g = 0; g < AG_NUM_GROUPS; g++) {
        ag_param_buffer *buffer = &params->buffers[g];
        cm_rng_key key = {seed, 0, (uint32_t)g, CM_RNG_TEST};
        for (size_t i = 0; i < buffer->numel; i++)
            buffer->data[i] += 0.15f * cm_rng_normal(key, (uint64_t)i);
    }
}

/* max |decoder - full| / max |full| over every position's logits. */
static double compare_case(const decode_case *test_case, int *distinct_experts) {
    cm_recipe recipe = tiny_recipe(test_case->sections);
    run_session *session;
    ck_assert_msg(run_session_open(&recipe, NULL, false, &session) == CM_OK, "%s: %s",
                  test_case->name, cm_error_message());
    perturb(run_session_params(session), 5);
    const lm_model *model = task_lm_model(run_session_task_state(session));

    int32_t ids[SEQ];
    for (int t = 0; t < SEQ; t++)
        ids[t] = (int32_t)cm_rng_below((cm_rng_key){3, 0, 0, CM_RNG_TEST}, (uint64_t)t, VOCAB);
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, (size_t)16 << 20), CM_OK);
    ag_set_grad_enabled(&ctx, false);
    lm_moe_report report;
    lm_forward_args args = {.ids = ids,
                            .batch = 1,
                            .seq_len = SEQ,
                            .seed = (uint64_t)recipe.train.seed,
                            .k_override = recipe.router.eval_k,
                            .report = &report};
    ag_tensor *full = lm_forward(&ctx, model, &args);
    ck_assert_msg(full != NULL, "%s: %s", test_case->name, cm_error_message());
    *distinct_experts = 0;
    for (int i = 0; i < report.n_layers; i++)
        for (int e = 0; e < recipe.moe.num_experts; e++)
            *distinct_experts += report.stats[i].tokens_per_expert[e] > 0;

    lm_decoder *decoder;
    lm_decode_options options = {.seed = (uint64_t)recipe.train.seed,
                                 .k_override = recipe.router.eval_k};
    ck_assert_msg(lm_decoder_create(model, &options, &decoder) == CM_OK, "%s: %s", test_case->name,
                  cm_error_message());
    float logits[VOCAB];
    double worst = 0.0, scale = 0.0;
    for (int t = 0; t < SEQ; t++) {
        ck_assert_int_eq(lm_decoder_step(decoder, ids[t], logits), CM_OK);
        const float *row = full->data + (size_t)t * VOCAB;
        for (int v = 0; v < VOCAB; v++) {
            worst = fmax(worst, fabs((double)logits[v] - row[v]));
            scale = fmax(scale, fabs((double)row[v]));
        }
    }
    /* The cache is full: one more byte is an error, not an overrun. */
    ck_assert_int_eq(lm_decoder_step(decoder, 0, logits), CM_ERR_INVALID);
    lm_decoder_free(decoder);
    ag_ctx_free(&ctx);
    run_session_close(session);
    ck_assert_double_gt(scale, 1.0); /* the logits are not all near zero */
    return worst / scale;
}

START_TEST(test_cache_matches_full_forward) {
    const decode_case *test_case = &cases[_i];
    int distinct = 0;
    double difference = compare_case(test_case, &distinct);
    printf("lm_decode %-20s max |kv - full| / max |logit| = %.3g (%d layer-experts used)\n",
           test_case->name, difference, distinct);
    ck_assert_msg(difference <= 1e-5, "%s: relative difference %.3g", test_case->name, difference);
    /* Routing really varies: over the layers, several experts take tokens
     * (per_sequence THOR: one per MoE layer). */
    if (test_case->sections[0] != '\0') ck_assert_int_ge(distinct, 2);
}
END_TEST

START_TEST(test_expert_choice_is_refused) {
    cm_recipe recipe = tiny_recipe("moe: {enabled: true, num_experts: 4}\n"
                                   "router: {type: expert_choice, capacity_factor: 1.0}\n");
    run_session *session;
    ck_assert_int_eq(run_session_open(&recipe, NULL, false, &session), CM_OK);
    lm_decoder *decoder = NULL;
    lm_decode_options options = {.seed = 1};
    ck_assert_int_eq(
        lm_decoder_create(task_lm_model(run_session_task_state(session)), &options, &decoder),
        CM_ERR_INVALID);
    ck_assert_ptr_null(decoder);
    ck_assert_ptr_nonnull(strstr(cm_error_message(), "not causal"));
    run_session_close(session);
}
END_TEST

/* After a reset the decoder starts again at position 0 and gives the same
 * logits as a fresh one; bytes outside the vocabulary are refused. */
START_TEST(test_reset_restarts_the_context) {
    cm_recipe recipe = tiny_recipe(cases[1].sections);
    run_session *session;
    ck_assert_int_eq(run_session_open(&recipe, NULL, false, &session), CM_OK);
    perturb(run_session_params(session), 9);
    lm_decoder *decoder;
    lm_decode_options options = {.seed = 77};
    ck_assert_int_eq(
        lm_decoder_create(task_lm_model(run_session_task_state(session)), &options, &decoder),
        CM_OK);
    float first[VOCAB], again[VOCAB];
    ck_assert_int_eq(lm_decoder_step(decoder, 'a', first), CM_OK);
    ck_assert_int_eq(lm_decoder_step(decoder, 'b', NULL), CM_OK);
    ck_assert_int_eq(lm_decoder_length(decoder), 2);
    lm_decoder_reset(decoder);
    ck_assert_int_eq(lm_decoder_length(decoder), 0);
    ck_assert_int_eq(lm_decoder_step(decoder, 'a', again), CM_OK);
    for (int v = 0; v < VOCAB; v++) ck_assert_float_eq(first[v], again[v]);
    ck_assert_int_eq(lm_decoder_step(decoder, VOCAB, again), CM_ERR_INVALID);
    ck_assert_int_eq(lm_decoder_step(decoder, -1, again), CM_ERR_INVALID);
    ck_assert_int_eq(lm_decoder_capacity(decoder), SEQ);
    lm_decoder_free(decoder);
    run_session_close(session);
}
END_TEST

/* Past the cache's capacity the window slides: the logits are those of a
 * fresh decoder fed the bytes the window kept. */
START_TEST(test_window_slides_by_half) {
    cm_recipe recipe = tiny_recipe(cases[7].sections); /* THOR per token: keyed by position */
    run_session *session;
    ck_assert_int_eq(run_session_open(&recipe, NULL, false, &session), CM_OK);
    perturb(run_session_params(session), 11);
    const lm_model *model = task_lm_model(run_session_task_state(session));
    lm_decode_options options = {.seed = 77};
    lm_decoder *sliding, *fresh;
    ck_assert_int_eq(lm_decoder_create(model, &options, &sliding), CM_OK);
    ck_assert_int_eq(lm_decoder_create(model, &options, &fresh), CM_OK);
    enum { TOTAL = 40 };
    int32_t bytes[TOTAL];
    for (int i = 0; i < TOTAL; i++) bytes[i] = (int32_t)('a' + (i * 7) % 26);
    float slid[VOCAB], direct[VOCAB];
    for (int i = 0; i < TOTAL; i++)
        ck_assert_int_eq(lm_decoder_push(sliding, bytes[i], slid), CM_OK);
    /* slides at bytes 24 (keeps 12..23) and 36 (keeps 24..35): 24..39 remain */
    ck_assert_int_eq((int)lm_decoder_slides(sliding), 2);
    ck_assert_int_eq(lm_decoder_length(sliding), 16);
    for (int i = 24; i < TOTAL; i++)
        ck_assert_int_eq(lm_decoder_step(fresh, bytes[i], direct), CM_OK);
    for (int v = 0; v < VOCAB; v++) ck_assert_float_eq(slid[v], direct[v]);
    lm_decoder_free(sliding);
    lm_decoder_free(fresh);
    run_session_close(session);
}
END_TEST

START_TEST(test_sampling_inverts_the_distribution) {
    float scratch[4];
    const float two[2] = {0.0f, logf(3.0f)}; /* p = 1/4, 3/4 */
    ck_assert_int_eq(lm_sample_logits(two, 2, 1.0f, 0, 0.2f, scratch), 0);
    ck_assert_int_eq(lm_sample_logits(two, 2, 1.0f, 0, 0.3f, scratch), 1);
    /* temperature 0.5: p = 1/10, 9/10 */
    ck_assert_int_eq(lm_sample_logits(two, 2, 0.5f, 0, 0.05f, scratch), 0);
    ck_assert_int_eq(lm_sample_logits(two, 2, 0.5f, 0, 0.15f, scratch), 1);
    /* top-k 1 is the argmax whatever the draw; top-k 2 of 4 never picks the rest */
    const float four[4] = {2.0f, -1.0f, 3.0f, 1.0f};
    ck_assert_int_eq(lm_sample_logits(four, 4, 1.0f, 1, 0.0f, scratch), 2);
    ck_assert_int_eq(lm_sample_logits(four, 4, 1.0f, 1, 0.999f, scratch), 2);
    for (int i = 0; i < 100; i++) {
        int token = lm_sample_logits(four, 4, 5.0f, 2, (float)i / 100.0f, scratch);
        ck_assert(token == 0 || token == 2);
    }
    ck_assert_int_eq(lm_sample_logits(four, 4, 5.0f, 0, 0.999f, scratch), 3);
}
END_TEST

static Suite *decode_suite(void) {
    Suite *suite = suite_create("lm_decode");
    TCase *core = tcase_create("core");
    tcase_set_timeout(core, 60);
    tcase_add_loop_test(core, test_cache_matches_full_forward, 0,
                        (int)(sizeof cases / sizeof cases[0]));
    tcase_add_test(core, test_expert_choice_is_refused);
    tcase_add_test(core, test_reset_restarts_the_context);
    tcase_add_test(core, test_window_slides_by_half);
    tcase_add_test(core, test_sampling_inverts_the_distribution);
    suite_add_tcase(suite, core);
    return suite;
}

int main(void) {
    SRunner *runner = srunner_create(decode_suite());
    srunner_run_all(runner, CK_NORMAL);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
