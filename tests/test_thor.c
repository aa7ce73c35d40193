/* THOR in the language model: the two training passes draw their experts
 * independently, and the consistency loss between them is exactly 0 when all
 * experts are equal and positive otherwise. */
#include <check.h>
#include <stdlib.h>
#include <string.h>

#include "layers/transformer.h"

enum { B = 2, T = 8, E = 3, LAYERS = 2 };

static void build(lm_model *model, ag_params *params) {
    lm_config config = {.vocab = 256,
                        .d_model = 16,
                        .n_layer = LAYERS,
                        .n_head = 2,
                        .d_ff = 24,
                        .max_seq = T,
                        .dropout = 0.0f,
                        .init_std = 0.2f,
                        .scale_residual_init = true,
                        .layernorm_eps = 1e-5f,
                        .moe_every = 1};
    config.moe = (moe_config){
        .hidden = 12,
        .activation = AG_ACT_GELU,
        .router = {.kind = ROUTER_THOR, .num_experts = E, .thor_level = ROUTER_THOR_PER_SEQUENCE}};
    ag_params_init(params);
    ck_assert_msg(lm_declare(model, &config, params) == CM_OK, "%s", cm_error_message());
    ck_assert_int_eq(ag_params_finalize(params, 5), CM_OK);
}

/* The expert each layer used in one pass (THOR sends the batch to one). */
static int chosen_expert(const lm_moe_report *report, int layer) {
    for (int e = 0; e < E; e++)
        if (report->stats[layer].tokens_per_expert[e] == B * T) return e;
    return -1;
}

/* Consistency between pass 0 and pass 1 at `step`; *differs: whether any
 * layer used a different expert in the two passes. */
static double consistency(ag_ctx *ctx, const lm_model *model, const int32_t *ids, uint64_t step,
                          bool *differs) {
    ag_ctx_reset(ctx);
    lm_moe_report first, second;
    lm_forward_args args = {.ids = ids,
                            .batch = B,
                            .seq_len = T,
                            .training = true,
                            .seed = 7,
                            .step = step,
                            .report = &first};
    ag_tensor *logits1 = lm_forward(ctx, model, &args);
    args.pass = 1;
    args.report = &second;
    ag_tensor *logits2 = lm_forward(ctx, model, &args);
    ag_tensor *loss = lm_thor_consistency(ctx, logits1, logits2);
    ck_assert_int_eq(ag_ctx_status(ctx), CM_OK);
    *differs = false;
    for (int l = 0; l < LAYERS; l++) {
        int a = chosen_expert(&first, l), b = chosen_expert(&second, l);
        ck_assert(a >= 0 && b >= 0);
        *differs = *differs || a != b;
    }
    return loss->data[0];
}

START_TEST(test_passes_differ_and_consistency_is_positive) {
    lm_model model;
    ag_params params;
    build(&model, &params);
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, 16 << 20), CM_OK);
    int32_t ids[B * T];
    for (int i = 0; i < B * T; i++) ids[i] = (i * 37 + 11) % 256;
    int differing = 0;
    for (uint64_t step = 0; step < 40; step++) {
        bool differs;
        double value = consistency(&ctx, &model, ids, step, &differs);
        differing += differs;
        if (differs)
            ck_assert_msg(value > 1e-6, "step %llu: consistency %g", (unsigned long long)step,
                          value);
        else
            ck_assert_double_eq_tol(value, 0.0, 1e-7); /* same experts, no dropout */
    }
    /* Two layers, 3 experts: the passes agree everywhere with probability 1/9. */
    ck_assert_int_ge(differing, 25);
    ag_ctx_free(&ctx);
    ag_params_free(&params);
}
END_TEST

START_TEST(test_consistency_zero_when_experts_equal) {
    lm_model model;
    ag_params params;
    build(&model, &params);
    for (int l = 0; l < LAYERS; l++) {
        const moe_layer *moe = &model.blocks[l].moe;
        ag_param *tensors[4] = {moe->w1, moe->b1, moe->w2, moe->b2};
        for (int i = 0; i < 4; i++) {
            ag_tensor *t = &tensors[i]->tensor;
            int64_t per_expert = t->numel / E;
            for (int e = 1; e < E; e++)
                memcpy(t->data + e * per_expert, t->data, (size_t)per_expert * sizeof(float));
        }
    }
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, 16 << 20), CM_OK);
    int32_t ids[B * T];
    for (int i = 0; i < B * T; i++) ids[i] = (i * 53 + 3) % 256;
    int differing = 0;
    for (uint64_t step = 0; step < 20; step++) {
        bool differs;
        ck_assert_double_eq(consistency(&ctx, &model, ids, step, &differs), 0.0);
        differing += differs;
    }
    ck_assert_int_gt(differing, 0); /* different experts were drawn, yet the loss is 0 */
    ag_ctx_free(&ctx);
    ag_params_free(&params);
}
END_TEST

int main(void) {
    Suite *suite = suite_create("thor");
    TCase *tc = tcase_create("thor");
    tcase_add_test(tc, test_passes_differ_and_consistency_is_positive);
    tcase_add_test(tc, test_consistency_zero_when_experts_equal);
    suite_add_tcase(suite, tc);
    SRunner *runner = srunner_create(suite);
    srunner_run_all(runner, CK_NORMAL);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
