/* Gradient and value checks for ops_attention.c (causal multi-head attention
 * over a fused qkv [B,T,3D]): gradchecks on odd shapes (several heads, one
 * head, one token), forward values against a double-precision reference,
 * the causal mask, large scores, and no-grad mode. */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "gradcheck.h"

typedef struct attention_case {
    int batch, t_len, model_dim, n_head;
} attention_case;

static ag_tensor *new_qkv(const attention_case *c, float magnitude, uint64_t seed,
                          bool requires_grad) {
    int shape[3] = {c->batch, c->t_len, 3 * c->model_dim};
    return gc_tensor_new(3, shape, -magnitude, magnitude, seed, requires_grad);
}

/* out [B,T,D] from qkv [B,T,3D], straight from the definition, in double. */
static void naive_attention(const attention_case *c, const float *qkv, double *out) {
    int t_len = c->t_len, d = c->model_dim, head_dim = d / c->n_head;
    double *probs = malloc((size_t)t_len * sizeof(double));
    for (int b = 0; b < c->batch; b++)
        for (int h = 0; h < c->n_head; h++)
            for (int i = 0; i < t_len; i++) {
                const float *q = qkv + ((int64_t)b * t_len + i) * 3 * d + h * head_dim;
                double row_max = -INFINITY, total = 0.0;
                for (int j = 0; j <= i; j++) {
                    const float *k = qkv + ((int64_t)b * t_len + j) * 3 * d + d + h * head_dim;
                    double score = 0.0;
                    for (int e = 0; e < head_dim; e++) score += (double)q[e] * k[e];
                    probs[j] = score / sqrt((double)head_dim);
                    row_max = fmax(row_max, probs[j]);
                }
                for (int j = 0; j <= i; j++) total += probs[j] = exp(probs[j] - row_max);
                for (int e = 0; e < head_dim; e++) {
                    double value = 0.0;
                    for (int j = 0; j <= i; j++)
                        value += probs[j] / total *
                                 qkv[((int64_t)b * t_len + j) * 3 * d + 2 * d + h * head_dim + e];
                    out[((int64_t)b * t_len + i) * d + h * head_dim + e] = value;
                }
            }
    free(probs);
}

static ag_tensor *forward_attention(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    return ag_causal_attention(ctx, in[0], ((const attention_case *)user)->n_head);
}

/* Inputs uniform in [-1, 1] keep the softmax away from saturation, where
 * finite differences of a nearly flat function say little. The default
 * tolerances (4-point stencil, eps 1e-2, atol 1e-3, rtol 1e-2) hold there. */
static void check_attention_grad(attention_case c, uint64_t seed) {
    ag_tensor *qkv = new_qkv(&c, 1.0f, seed, true);
    gc_options options = gc_default_options();
    options.max_checks_per_input = 1024; /* every element of these small inputs */
    gc_result r = gc_check("causal_attention", forward_attention, &qkv, 1, &c, &options);
    ck_assert_msg(r.ok, "B=%d T=%d D=%d H=%d: %s", c.batch, c.t_len, c.model_dim, c.n_head,
                  r.message);
    ck_assert_int_eq(r.checked, qkv->numel);
    gc_tensor_free(qkv);
}

START_TEST(test_attention_grad_two_heads) {
    check_attention_grad((attention_case){2, 5, 6, 2}, 200);
}
END_TEST

START_TEST(test_attention_grad_one_head) {
    check_attention_grad((attention_case){2, 5, 6, 1}, 201);
}
END_TEST

START_TEST(test_attention_grad_one_token) {
    check_attention_grad((attention_case){2, 1, 6, 2}, 202);
}
END_TEST

START_TEST(test_attention_grad_three_heads) {
    check_attention_grad((attention_case){1, 7, 9, 3}, 203);
}
END_TEST

static void check_attention_values(attention_case c, float magnitude, uint64_t seed,
                                   double tolerance) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, 8 << 20), CM_OK);
    ag_tensor *qkv = new_qkv(&c, magnitude, seed, false);
    ag_tensor *out = ag_causal_attention(&ctx, qkv, c.n_head);
    ck_assert_ptr_nonnull(out);
    ck_assert_int_eq(out->ndim, 3);
    ck_assert_int_eq(out->shape[0], c.batch);
    ck_assert_int_eq(out->shape[1], c.t_len);
    ck_assert_int_eq(out->shape[2], c.model_dim);
    double *want = malloc((size_t)out->numel * sizeof(double));
    naive_attention(&c, qkv->data, want);
    for (int64_t i = 0; i < out->numel; i++) {
        ck_assert_msg(isfinite(out->data[i]), "element %lld not finite", (long long)i);
        ck_assert_msg(fabs(out->data[i] - want[i]) <= tolerance * (1.0 + fabs(want[i])),
                      "element %lld: %.9g, want %.9g", (long long)i, out->data[i], want[i]);
    }
    free(want);
    gc_tensor_free(qkv);
    ag_ctx_free(&ctx);
}

START_TEST(test_attention_values) {
    check_attention_values((attention_case){2, 5, 6, 2}, 1.0f, 210, 1e-6);
    check_attention_values((attention_case){2, 5, 6, 1}, 1.0f, 211, 1e-6);
    check_attention_values((attention_case){2, 1, 6, 2}, 1.0f, 212, 1e-6);
    /* Big enough for OpenBLAS's blocked kernels, and T not a multiple of 8. */
    check_attention_values((attention_case){2, 37, 64, 4}, 1.0f, 213, 2e-6);
}
END_TEST

/* Scores in the hundreds: without the row-max subtraction exp overflows. The
 * float result can only be as accurate as the float scores it starts from
 * (relative 1e-7 of a score ~ 500 moves a probability by ~5e-5). */
START_TEST(test_attention_large_scores) {
    check_attention_values((attention_case){1, 9, 16, 2}, 12.0f, 220, 1e-3);
}
END_TEST

/* Changing token j's q, k and v leaves every output before j bit for bit the
 * same (masked probabilities are exactly 0) and changes output j. */
START_TEST(test_attention_causal_mask) {
    const attention_case c = {2, 6, 6, 2};
    const int changed_token = 3;
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, 1 << 20), CM_OK);
    ag_tensor *qkv = new_qkv(&c, 1.0f, 230, false);
    ag_tensor *before = ag_causal_attention(&ctx, qkv, c.n_head);
    ck_assert_ptr_nonnull(before);
    for (int b = 0; b < c.batch; b++)
        for (int e = 0; e < 3 * c.model_dim; e++)
            qkv->data[((int64_t)b * c.t_len + changed_token) * 3 * c.model_dim + e] += 0.75f;
    ag_tensor *after = ag_causal_attention(&ctx, qkv, c.n_head);
    ck_assert_ptr_nonnull(after);
    for (int b = 0; b < c.batch; b++)
        for (int t = 0; t < c.t_len; t++) {
            int64_t row = ((int64_t)b * c.t_len + t) * c.model_dim;
            bool same = memcmp(before->data + row, after->data + row,
                               (size_t)c.model_dim * sizeof(float)) == 0;
            if (t < changed_token)
                ck_assert_msg(same, "batch %d token %d saw a future token", b, t);
            else if (t == changed_token)
                ck_assert_msg(!same, "batch %d token %d ignored its own change", b, t);
        }
    gc_tensor_free(qkv);
    ag_ctx_free(&ctx);
}
END_TEST

/* No-grad mode reuses one [T,T] block for all heads; the values must equal
 * the grad-mode ones exactly, and nothing is recorded. */
START_TEST(test_attention_no_grad_mode) {
    const attention_case c = {2, 7, 12, 3};
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, 1 << 20), CM_OK);
    ag_tensor *qkv = new_qkv(&c, 1.0f, 240, true);
    ag_tensor *with_grad = ag_causal_attention(&ctx, qkv, c.n_head);
    ck_assert_ptr_nonnull(with_grad);
    ck_assert_int_eq(ctx.tape_length, 1);
    ag_set_grad_enabled(&ctx, false);
    ag_tensor *without_grad = ag_causal_attention(&ctx, qkv, c.n_head);
    ck_assert_ptr_nonnull(without_grad);
    ck_assert_int_eq(ctx.tape_length, 1);
    ck_assert(!without_grad->requires_grad);
    ck_assert_mem_eq(with_grad->data, without_grad->data, (size_t)with_grad->numel * sizeof(float));
    gc_tensor_free(qkv);
    ag_ctx_free(&ctx);
}
END_TEST

/* Backward ADDS into qkv's gradient (gc_check zeroes it first, so cannot
 * see this): a second forward and backward doubles it. */
START_TEST(test_attention_backward_accumulates) {
    const attention_case c = {2, 6, 6, 2};
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, 1 << 20), CM_OK);
    ag_tensor *qkv = new_qkv(&c, 1.0f, 245, true);
    float *once = malloc((size_t)qkv->numel * sizeof(float));
    float dout[2 * 6 * 6];
    for (int e = 0; e < 2 * 6 * 6; e++) dout[e] = (float)(e % 5) - 1.5f;
    for (int pass = 0; pass < 2; pass++) {
        ag_ctx_reset(&ctx);
        ag_tensor *out = ag_causal_attention(&ctx, qkv, c.n_head);
        ck_assert_ptr_nonnull(out);
        ck_assert_int_eq(ag_backward_from(&ctx, out, dout), CM_OK);
        if (pass == 0) memcpy(once, qkv->grad, (size_t)qkv->numel * sizeof(float));
    }
    int nonzero = 0;
    for (int64_t e = 0; e < qkv->numel; e++) {
        ck_assert_msg(fabsf(qkv->grad[e] - 2.0f * once[e]) <= 1e-5f * (1.0f + fabsf(once[e])),
                      "element %lld: %g after two passes, %g after one", (long long)e, qkv->grad[e],
                      once[e]);
        nonzero += once[e] != 0.0f;
    }
    /* q of token 0 is the only part with no gradient (its one score is
     * softmaxed alone), so almost every element must have moved. */
    ck_assert_int_ge(nonzero, qkv->numel - 2 * c.model_dim);
    free(once);
    gc_tensor_free(qkv);
    ag_ctx_free(&ctx);
}
END_TEST

/* A full arena is an error value, not a crash: 40 KiB holds the 32 KiB
 * output but not the [T,T] scratch block behind it (16 KiB per task). */
START_TEST(test_attention_arena_full) {
    const attention_case c = {4, 64, 32, 4};
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, 40 << 10), CM_OK);
    ag_tensor *qkv = new_qkv(&c, 1.0f, 250, true);
    ck_assert_ptr_null(ag_causal_attention(&ctx, qkv, c.n_head));
    ck_assert_int_eq(ag_ctx_status(&ctx), CM_ERR_NOMEM);
    gc_tensor_free(qkv);
    ag_ctx_free(&ctx);
}
END_TEST

int main(void) {
    Suite *suite = suite_create("ops_attention");
    TCase *tc = tcase_create("attention");
    tcase_add_test(tc, test_attention_grad_two_heads);
    tcase_add_test(tc, test_attention_grad_one_head);
    tcase_add_test(tc, test_attention_grad_one_token);
    tcase_add_test(tc, test_attention_grad_three_heads);
    tcase_add_test(tc, test_attention_values);
    tcase_add_test(tc, test_attention_large_scores);
    tcase_add_test(tc, test_attention_causal_mask);
    tcase_add_test(tc, test_attention_no_grad_mode);
    tcase_add_test(tc, test_attention_backward_accumulates);
    tcase_add_test(tc, test_attention_arena_full);
    suite_add_tcase(suite, tc);
    SRunner *runner = srunner_create(suite);
    srunner_run_all(runner, CK_NORMAL);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
