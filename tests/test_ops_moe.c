/* Gradient checks and values for ops_moe.c: gather_elements, segment_softmax,
 * sum_rows and grouped_linear (including experts with no rows and with all),
 * and the experts' hidden layer: grouped_linear_act and grouped_linear_hidden
 * (SwiGLU, and a dropout mask on the hidden units). */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "gradcheck.h"

static const int32_t gather_index[7] = {4, 0, 4, 11, 7, 3, 4};

static ag_tensor *forward_gather(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    (void)user;
    return ag_gather_elements(ctx, in[0], gather_index, 7);
}

START_TEST(test_gather_elements) {
    ag_tensor *x = gc_tensor_new(2, (int[]){3, 4}, -1, 1, 1, true);
    gc_options options = gc_default_options();
    gc_result r = gc_check("gather_elements", forward_gather, &x, 1, NULL, &options);
    ck_assert_msg(r.ok, "%s", r.message);
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, 1 << 20), CM_OK);
    memset(x->grad, 0, 12 * sizeof(float));
    ag_tensor *y = forward_gather(&ctx, &x, NULL);
    for (int i = 0; i < 7; i++) ck_assert_float_eq(y->data[i], x->data[gather_index[i]]);
    float ones[7] = {1, 1, 1, 1, 1, 1, 1};
    ck_assert_int_eq(ag_backward_from(&ctx, y, ones), CM_OK);
    ck_assert_float_eq(x->grad[4], 3.0f); /* picked three times */
    ck_assert_float_eq(x->grad[1], 0.0f); /* never picked */
    ag_ctx_free(&ctx);
    gc_tensor_free(x);
}
END_TEST

/* Segments of sizes 3, 0, 1, 4. */
static const int32_t segments[5] = {0, 3, 3, 4, 8};

static ag_tensor *forward_segment(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    (void)user;
    return ag_segment_softmax(ctx, in[0], segments, 4);
}

START_TEST(test_segment_softmax) {
    ag_tensor *x = gc_tensor_new(1, (int[]){8}, -3, 3, 2, true);
    gc_options options = gc_default_options();
    gc_result r = gc_check("segment_softmax", forward_segment, &x, 1, NULL, &options);
    ck_assert_msg(r.ok, "%s", r.message);
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, 1 << 20), CM_OK);
    x->data[4] = 80.0f; /* large values stay finite */
    ag_tensor *y = forward_segment(&ctx, &x, NULL);
    for (int g = 0; g < 4; g++) {
        double max = -1e30, total = 0;
        for (int i = segments[g]; i < segments[g + 1]; i++) max = fmax(max, x->data[i]);
        for (int i = segments[g]; i < segments[g + 1]; i++) total += exp(x->data[i] - max);
        for (int i = segments[g]; i < segments[g + 1]; i++)
            ck_assert_double_eq_tol(y->data[i], exp(x->data[i] - max) / total, 1e-6);
    }
    ck_assert_float_eq(y->data[3], 1.0f); /* a singleton segment */
    ag_ctx_free(&ctx);
    gc_tensor_free(x);
}
END_TEST

static ag_tensor *forward_sum_rows(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    (void)user;
    return ag_sum_rows(ctx, in[0]);
}

START_TEST(test_sum_rows) {
    ag_tensor *x = gc_tensor_new(2, (int[]){5, 3}, -1, 1, 3, true);
    gc_options options = gc_default_options();
    gc_result r = gc_check("sum_rows", forward_sum_rows, &x, 1, NULL, &options);
    ck_assert_msg(r.ok, "%s", r.message);
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, 1 << 20), CM_OK);
    ag_tensor *y = forward_sum_rows(&ctx, &x, NULL);
    for (int j = 0; j < 3; j++) {
        double want = 0;
        for (int i = 0; i < 5; i++) want += x->data[i * 3 + j];
        ck_assert_double_eq_tol(y->data[j], want, 1e-6);
    }
    ag_ctx_free(&ctx);
    gc_tensor_free(x);
}
END_TEST

/* 4 experts over 9 rows: 3, 0 (empty), 6, 0 (empty, last). */
static const int32_t expert_offsets[5] = {0, 3, 3, 9, 9};

typedef struct grouped_case {
    const int32_t *offsets;
} grouped_case;

static ag_tensor *forward_grouped(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    const grouped_case *c = user;
    return ag_grouped_linear(ctx, in[0], in[1], in[2], c->offsets);
}

static ag_tensor *forward_grouped_no_bias(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    const grouped_case *c = user;
    return ag_grouped_linear(ctx, in[0], in[1], NULL, c->offsets);
}

START_TEST(test_grouped_linear_grad) {
    grouped_case c = {expert_offsets};
    ag_tensor *in[3] = {gc_tensor_new(2, (int[]){9, 5}, -1, 1, 4, true),
                        gc_tensor_new(3, (int[]){4, 7, 5}, -1, 1, 5, true),
                        gc_tensor_new(2, (int[]){4, 7}, -1, 1, 6, true)};
    gc_options options = gc_default_options();
    options.max_checks_per_input = 1000;
    gc_result r = gc_check("grouped_linear", forward_grouped, in, 3, &c, &options);
    ck_assert_msg(r.ok, "%s", r.message);
    r = gc_check("grouped_linear (no bias)", forward_grouped_no_bias, in, 2, &c, &options);
    ck_assert_msg(r.ok, "%s", r.message);
    /* Empty experts get exactly no weight gradient. */
    for (int i = 0; i < 7 * 5; i++) {
        ck_assert_float_eq(in[1]->grad[1 * 35 + i], 0.0f);
        ck_assert_float_eq(in[1]->grad[3 * 35 + i], 0.0f);
    }
    for (int i = 0; i < 3; i++) gc_tensor_free(in[i]);
}
END_TEST

/* grouped_linear_act: h through each activation, then the group products. */
typedef struct act_case {
    const int32_t *offsets;
    ag_activation activation;
    bool bias;
} act_case;

static ag_tensor *forward_grouped_act(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    const act_case *c = user;
    return ag_grouped_linear_act(ctx, in[0], c->activation, in[1], c->bias ? in[2] : NULL,
                                 c->offsets);
}

START_TEST(test_grouped_linear_act_grad) {
    ag_tensor *in[3] = {gc_tensor_new(2, (int[]){9, 5}, -2, 2, 14, true),
                        gc_tensor_new(3, (int[]){4, 7, 5}, -1, 1, 15, true),
                        gc_tensor_new(2, (int[]){4, 7}, -1, 1, 16, true)};
    /* ReLU's kink: keep h away from 0 so central differences are exact */
    for (int i = 0; i < 45; i++)
        if (fabsf(in[0]->data[i]) < 0.05f) in[0]->data[i] = 0.3f;
    gc_options options = gc_default_options();
    options.max_checks_per_input = 1000;
    const char *names[3] = {"grouped_linear_act gelu", "grouped_linear_act relu",
                            "grouped_linear_act silu"};
    for (int a = 0; a < 3; a++)
        for (int bias = 0; bias < 2; bias++) {
            act_case c = {expert_offsets, (ag_activation)a, bias};
            gc_result r = gc_check(names[a], forward_grouped_act, in, bias ? 3 : 2, &c, &options);
            ck_assert_msg(r.ok, "%s (bias %d): %s", names[a], bias, r.message);
        }
    for (int i = 0; i < 3; i++) gc_tensor_free(in[i]);
}
END_TEST

/* The fused op equals the activation op then grouped_linear: outputs and
 * every gradient, for each activation, with all rows in one expert too. */
START_TEST(test_grouped_linear_act_matches_composition) {
    ag_tensor *(*activations[3])(ag_ctx *, ag_tensor *) = {ag_gelu, ag_relu, ag_silu};
    const int32_t *cases[2] = {expert_offsets, (const int32_t[]){0, 0, 0, 9, 9}};
    for (int a = 0; a < 3; a++)
        for (int c = 0; c < 2; c++) {
            float grads[2][45 + 140 + 28], outputs[2][63];
            for (int way = 0; way < 2; way++) {
                ag_ctx ctx;
                ck_assert_int_eq(ag_ctx_init(&ctx, 1 << 20), CM_OK);
                ag_tensor *h = gc_tensor_new(2, (int[]){9, 5}, -2, 2, 21, true);
                ag_tensor *w = gc_tensor_new(3, (int[]){4, 7, 5}, -1, 1, 22, true);
                ag_tensor *b = gc_tensor_new(2, (int[]){4, 7}, -1, 1, 23, true);
                ag_tensor *y =
                    way == 0 ? ag_grouped_linear_act(&ctx, h, (ag_activation)a, w, b, cases[c])
                             : ag_grouped_linear(&ctx, activations[a](&ctx, h), w, b, cases[c]);
                ck_assert_ptr_nonnull(y);
                float dout[63];
                for (int i = 0; i < 63; i++) dout[i] = (float)((i * 7) % 11) / 11.0f - 0.4f;
                ck_assert_int_eq(ag_backward_from(&ctx, y, dout), CM_OK);
                memcpy(outputs[way], y->data, sizeof outputs[way]);
                memcpy(grads[way], h->grad, 45 * sizeof(float));
                memcpy(grads[way] + 45, w->grad, 140 * sizeof(float));
                memcpy(grads[way] + 185, b->grad, 28 * sizeof(float));
                gc_tensor_free(h);
                gc_tensor_free(w);
                gc_tensor_free(b);
                ag_ctx_free(&ctx);
            }
            for (int i = 0; i < 63; i++)
                ck_assert_float_eq_tol(outputs[0][i], outputs[1][i], 1e-6f);
            for (int i = 0; i < 45 + 140 + 28; i++)
                ck_assert_msg(fabsf(grads[0][i] - grads[1][i]) <= 1e-5f,
                              "activation %d case %d gradient %d: fused %g, composed %g", a, c, i,
                              grads[0][i], grads[1][i]);
        }
}
END_TEST

/* grouped_linear_hidden: SwiGLU and a fixed dropout mask. Inputs h, w, up
 * (SwiGLU only), bias (when c->bias), in that order. */
typedef struct hidden_case {
    const int32_t *offsets;
    ag_activation activation;
    bool bias;
    const uint8_t *keep;
} hidden_case;

static const float KEEP_SCALE = 1.0f / (1.0f - 0.4f);

static ag_tensor *forward_hidden(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    const hidden_case *c = user;
    bool swiglu = c->activation == AG_ACT_SWIGLU;
    ag_hidden_layer hidden = {.activation = c->activation,
                              .up = swiglu ? in[2] : NULL,
                              .keep = c->keep,
                              .keep_scale = c->keep ? KEEP_SCALE : 0.0f};
    return ag_grouped_linear_hidden(ctx, in[0], &hidden, in[1], c->bias ? in[swiglu ? 3 : 2] : NULL,
                                    c->offsets);
}

/* A fixed mask over h [9,5]: 1 = kept, about 60% of them. */
static void make_keep(uint8_t keep[45]) {
    for (int i = 0; i < 45; i++)
        keep[i] = cm_rng_uniform((cm_rng_key){31, 0, 0, CM_RNG_TEST}, (uint64_t)i) >= 0.4f;
}

START_TEST(test_grouped_linear_hidden_grad) {
    ag_tensor *h = gc_tensor_new(2, (int[]){9, 5}, -2, 2, 41, true);
    ag_tensor *w = gc_tensor_new(3, (int[]){4, 7, 5}, -1, 1, 42, true);
    ag_tensor *up = gc_tensor_new(2, (int[]){9, 5}, -2, 2, 43, true);
    ag_tensor *b = gc_tensor_new(2, (int[]){4, 7}, -1, 1, 44, true);
    uint8_t keep[45];
    make_keep(keep);
    int kept = 0;
    for (int i = 0; i < 45; i++) kept += keep[i];
    ck_assert(kept > 10 && kept < 40); /* both kinds of unit are checked */
    gc_options options = gc_default_options();
    options.max_checks_per_input = 1000;
    const ag_activation activations[2] = {AG_ACT_SWIGLU, AG_ACT_GELU};
    for (int a = 0; a < 2; a++)
        for (int bias = 0; bias < 2; bias++)
            for (int masked = 0; masked < 2; masked++) {
                hidden_case c = {expert_offsets, activations[a], bias, masked ? keep : NULL};
                bool swiglu = activations[a] == AG_ACT_SWIGLU;
                ag_tensor *in[4] = {h, w, swiglu ? up : b, b};
                int n = 2 + swiglu + bias;
                gc_result r =
                    gc_check("grouped_linear_hidden", forward_hidden, in, n, &c, &options);
                ck_assert_msg(r.ok, "%s bias %d mask %d: %s", ag_activation_names[activations[a]],
                              bias, masked, r.message);
            }
    gc_tensor_free(h);
    gc_tensor_free(w);
    gc_tensor_free(up);
    gc_tensor_free(b);
}
END_TEST

/* The fused SwiGLU and masked hidden layers equal their compositions of
 * plain ops: grouped_linear((silu(h) * up or act(h)) * keep / (1-p)), in the
 * outputs and every gradient (h, up, w, bias). */
START_TEST(test_grouped_linear_hidden_matches_composition) {
    uint8_t keep[45];
    make_keep(keep);
    const int32_t *cases[2] = {expert_offsets, (const int32_t[]){0, 0, 0, 9, 9}};
    const ag_activation activations[2] = {AG_ACT_SWIGLU, AG_ACT_RELU};
    for (int a = 0; a < 2; a++)
        for (int masked = 0; masked < 2; masked++)
            for (int c = 0; c < 2; c++) {
                float grads[2][45 + 45 + 140 + 28], outputs[2][63];
                for (int way = 0; way < 2; way++) {
                    ag_ctx ctx;
                    ck_assert_int_eq(ag_ctx_init(&ctx, 1 << 20), CM_OK);
                    ag_tensor *h = gc_tensor_new(2, (int[]){9, 5}, -2, 2, 51, true);
                    ag_tensor *up = gc_tensor_new(2, (int[]){9, 5}, -2, 2, 52, true);
                    ag_tensor *w = gc_tensor_new(3, (int[]){4, 7, 5}, -1, 1, 53, true);
                    ag_tensor *b = gc_tensor_new(2, (int[]){4, 7}, -1, 1, 54, true);
                    bool swiglu = activations[a] == AG_ACT_SWIGLU;
                    ag_tensor *y;
                    if (way == 0) {
                        ag_hidden_layer hidden = {.activation = activations[a],
                                                  .up = swiglu ? up : NULL,
                                                  .keep = masked ? keep : NULL,
                                                  .keep_scale = KEEP_SCALE};
                        y = ag_grouped_linear_hidden(&ctx, h, &hidden, w, b, cases[c]);
                    } else {
                        ag_tensor *hidden =
                            swiglu ? ag_mul(&ctx, ag_silu(&ctx, h), up) : ag_relu(&ctx, h);
                        if (masked) {
                            ag_tensor *mask = ag_empty(&ctx, "mask", 2, (int[]){9, 5});
                            for (int i = 0; i < 45; i++)
                                mask->data[i] = keep[i] ? KEEP_SCALE : 0.0f;
                            hidden = ag_mul(&ctx, hidden, mask);
                        }
                        y = ag_grouped_linear(&ctx, hidden, w, b, cases[c]);
                    }
                    ck_assert_ptr_nonnull(y);
                    float dout[63];
                    for (int i = 0; i < 63; i++) dout[i] = (float)((i * 7) % 11) / 11.0f - 0.4f;
                    ck_assert_int_eq(ag_backward_from(&ctx, y, dout), CM_OK);
                    memcpy(outputs[way], y->data, sizeof outputs[way]);
                    memcpy(grads[way], h->grad, 45 * sizeof(float));
                    memcpy(grads[way] + 45, up->grad, 45 * sizeof(float));
                    memcpy(grads[way] + 90, w->grad, 140 * sizeof(float));
                    memcpy(grads[way] + 230, b->grad, 28 * sizeof(float));
                    gc_tensor_free(h);
                    gc_tensor_free(up);
                    gc_tensor_free(w);
                    gc_tensor_free(b);
                    ag_ctx_free(&ctx);
                }
                for (int i = 0; i < 63; i++)
                    ck_assert_float_eq_tol(outputs[0][i], outputs[1][i], 1e-5f);
                for (int i = 0; i < 45 + 45 + 140 + 28; i++)
                    ck_assert_msg(fabsf(grads[0][i] - grads[1][i]) <= 1e-5f,
                                  "%s mask %d case %d gradient %d: fused %g, composed %g",
                                  ag_activation_names[activations[a]], masked, c, i, grads[0][i],
                                  grads[1][i]);
            }
}
END_TEST

START_TEST(test_grouped_linear_values_and_all_rows) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, 1 << 20), CM_OK);
    ag_tensor *x = gc_tensor_new(2, (int[]){9, 5}, -1, 1, 7, false);
    ag_tensor *w = gc_tensor_new(3, (int[]){4, 7, 5}, -1, 1, 8, false);
    ag_tensor *b = gc_tensor_new(2, (int[]){4, 7}, -1, 1, 9, false);
    const int32_t *cases[2] = {expert_offsets, (const int32_t[]){0, 0, 0, 9, 9}};
    for (int c = 0; c < 2; c++) {
        ag_tensor *y = ag_grouped_linear(&ctx, x, w, b, cases[c]);
        for (int e = 0; e < 4; e++)
            for (int row = cases[c][e]; row < cases[c][e + 1]; row++)
                for (int o = 0; o < 7; o++) {
                    double want = b->data[e * 7 + o];
                    for (int i = 0; i < 5; i++)
                        want += (double)x->data[row * 5 + i] * w->data[(e * 7 + o) * 5 + i];
                    ck_assert_double_eq_tol(y->data[row * 7 + o], want, 1e-5);
                }
    }
    /* One group over all rows is ag_linear. */
    ag_tensor w0 = ag_tensor_wrap(w->data, NULL, 2, (int[]){7, 5}, false);
    ag_tensor b0 = ag_tensor_wrap(b->data, NULL, 1, (int[]){7}, false);
    ag_tensor w_one = ag_tensor_wrap(w->data, NULL, 3, (int[]){1, 7, 5}, false);
    ag_tensor b_one = ag_tensor_wrap(b->data, NULL, 2, (int[]){1, 7}, false);
    ag_tensor *dense = ag_linear(&ctx, x, &w0, &b0);
    ag_tensor *grouped = ag_grouped_linear(&ctx, x, &w_one, &b_one, (const int32_t[]){0, 9});
    ck_assert_int_eq(memcmp(dense->data, grouped->data, 9 * 7 * sizeof(float)), 0);
    gc_tensor_free(x);
    gc_tensor_free(w);
    gc_tensor_free(b);
    ag_ctx_free(&ctx);
}
END_TEST

/* Backward accumulates (+=): two passes give exactly twice one pass, for
 * every input of every op here. */
START_TEST(test_gradients_accumulate) {
    grouped_case c = {expert_offsets};
    ag_tensor *in[3] = {gc_tensor_new(2, (int[]){9, 5}, -1, 1, 14, true),
                        gc_tensor_new(3, (int[]){4, 7, 5}, -1, 1, 15, true),
                        gc_tensor_new(2, (int[]){4, 7}, -1, 1, 16, true)};
    ag_tensor *flat = gc_tensor_new(1, (int[]){8}, -1, 1, 17, true);
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, 1 << 20), CM_OK);
    float *once[4];
    ag_tensor *all[4] = {in[0], in[1], in[2], flat};
    for (int pass = 0; pass < 2; pass++) {
        ag_ctx_reset(&ctx);
        ag_tensor *y = forward_grouped(&ctx, in, &c);
        ag_tensor *g = ag_segment_softmax(
            &ctx, ag_gather_elements(&ctx, flat, (const int32_t[]){5, 0, 7, 5, 2, 3}, 6),
            (const int32_t[]){0, 2, 6}, 2);
        ag_tensor *total = ag_add(&ctx, ag_sum(&ctx, ag_sum_rows(&ctx, ag_mul(&ctx, y, y))),
                                  ag_sum(&ctx, ag_mul(&ctx, g, g)));
        ck_assert_int_eq(ag_backward(&ctx, total), CM_OK);
        for (int i = 0; i < 4 && pass == 0; i++) {
            once[i] = malloc((size_t)all[i]->numel * sizeof(float));
            memcpy(once[i], all[i]->grad, (size_t)all[i]->numel * sizeof(float));
        }
    }
    for (int i = 0; i < 4; i++) {
        for (int64_t j = 0; j < all[i]->numel; j++)
            ck_assert_float_eq_tol(all[i]->grad[j], 2.0f * once[i][j],
                                   1e-5f * (1.0f + fabsf(once[i][j])));
        free(once[i]);
    }
    ag_ctx_free(&ctx);
    for (int i = 0; i < 3; i++) gc_tensor_free(in[i]);
    gc_tensor_free(flat);
}
END_TEST

int main(void) {
    Suite *suite = suite_create("ops_moe");
    TCase *tc = tcase_create("moe ops");
    tcase_add_test(tc, test_gather_elements);
    tcase_add_test(tc, test_segment_softmax);
    tcase_add_test(tc, test_sum_rows);
    tcase_add_test(tc, test_grouped_linear_grad);
    tcase_add_test(tc, test_grouped_linear_act_grad);
    tcase_add_test(tc, test_grouped_linear_act_matches_composition);
    tcase_add_test(tc, test_grouped_linear_hidden_grad);
    tcase_add_test(tc, test_grouped_linear_hidden_matches_composition);
    tcase_add_test(tc, test_grouped_linear_values_and_all_rows);
    tcase_add_test(tc, test_gradients_accumulate);
    suite_add_tcase(suite, tc);
    SRunner *runner = srunner_create(suite);
    srunner_run_all(runner, CK_NORMAL);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
