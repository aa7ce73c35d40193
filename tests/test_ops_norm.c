/* Tests for ops_norm.c: layernorm gradient checks for x, gamma and beta
 * (together and one at a time), forward values against a double-precision
 * reference (including rows with a large mean), and the += rule. */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "gradcheck.h"

enum { ARENA_BYTES = 4 << 20 };

typedef struct layernorm_case {
    float eps;
} layernorm_case;

static ag_tensor *forward_layernorm(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    return ag_layernorm(ctx, in[0], in[1], in[2], ((const layernorm_case *)user)->eps);
}

/* x, gamma, beta for a layernorm over the last dimension of x_shape. */
static void make_inputs(ag_tensor *in[3], int ndim, const int *x_shape, uint64_t seed) {
    int d_size = x_shape[ndim - 1];
    in[0] = gc_tensor_new(ndim, x_shape, -2.0f, 2.0f, seed, true);
    in[1] = gc_tensor_new(1, &d_size, 0.5f, 1.5f, seed + 1, true);
    in[2] = gc_tensor_new(1, &d_size, -0.5f, 0.5f, seed + 2, true);
}

static void free_inputs(ag_tensor *in[3]) {
    for (int i = 0; i < 3; i++) gc_tensor_free(in[i]);
}

static void expect_gradcheck(const char *label, ag_tensor *in[3], layernorm_case *c,
                             int64_t min_checked) {
    gc_options options = gc_default_options();
    gc_result r = gc_check(label, forward_layernorm, in, 3, c, &options);
    ck_assert_msg(r.ok, "%s", r.message);
    ck_assert_int_ge(r.checked, min_checked);
}

START_TEST(test_layernorm_grad_d7) {
    ag_tensor *in[3];
    make_inputs(in, 3, (int[]){2, 3, 7}, 100);
    layernorm_case c = {1e-5f};
    expect_gradcheck("layernorm [2,3,7]", in, &c, 42 + 7 + 7);
    /* Each input alone, so the backward's "only wanted grads" paths run. */
    for (int only = 0; only < 3; only++) {
        for (int i = 0; i < 3; i++) in[i]->requires_grad = i == only;
        expect_gradcheck("layernorm [2,3,7] one input", in, &c, 7);
    }
    free_inputs(in);
}
END_TEST

/* D = 2: with a small eps each normalised row is about (-1, 1) whatever x
 * is, so dx is nearly 0 and the check would prove little; eps = 0.5 makes
 * dx of order 1. Rows keep |x0 - x1| > 0.2, far from the kink at x0 == x1. */
START_TEST(test_layernorm_grad_d2) {
    ag_tensor *in[3];
    make_inputs(in, 2, (int[]){5, 2}, 200);
    for (int r = 0; r < 5; r++) {
        float *row = in[0]->data + 2 * r;
        if (fabsf(row[0] - row[1]) < 0.2f) row[1] = row[0] + (r % 2 ? 0.4f : -0.4f);
    }
    layernorm_case wide = {0.5f}, tight = {1e-5f};
    expect_gradcheck("layernorm [5,2] eps 0.5", in, &wide, 10 + 2 + 2);
    expect_gradcheck("layernorm [5,2] eps 1e-5", in, &tight, 10 + 2 + 2);
    free_inputs(in);
}
END_TEST

/* Reference: biased variance, as PyTorch's LayerNorm. */
static void check_against_reference(const ag_tensor *x, const ag_tensor *gamma,
                                    const ag_tensor *beta, float eps, const ag_tensor *y,
                                    double tol) {
    int d_size = ag_last_dim(x);
    for (int64_t r = 0; r < ag_rows(x); r++) {
        const float *x_row = x->data + r * d_size;
        double mean = 0.0, variance = 0.0;
        for (int i = 0; i < d_size; i++) mean += x_row[i];
        mean /= d_size;
        for (int i = 0; i < d_size; i++) variance += (x_row[i] - mean) * (x_row[i] - mean);
        variance /= d_size;
        double rstd = 1.0 / sqrt(variance + eps);
        for (int i = 0; i < d_size; i++) {
            double want = (x_row[i] - mean) * rstd * gamma->data[i] + beta->data[i];
            double got = y->data[r * d_size + i];
            ck_assert_msg(fabs(got - want) <= tol, "row %lld col %d: got %.9g want %.9g",
                          (long long)r, i, got, want);
        }
    }
}

START_TEST(test_layernorm_values) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    ag_tensor *in[3];
    make_inputs(in, 3, (int[]){2, 3, 7}, 300);
    ag_tensor *y = ag_layernorm(&ctx, in[0], in[1], in[2], 1e-5f);
    ck_assert_ptr_nonnull(y);
    ck_assert(ag_same_shape(y, in[0]));
    check_against_reference(in[0], in[1], in[2], 1e-5f, y, 1e-5);
    free_inputs(in);

    /* The hot size, D = 256. */
    make_inputs(in, 2, (int[]){9, 256}, 310);
    y = ag_layernorm(&ctx, in[0], in[1], in[2], 1e-5f);
    check_against_reference(in[0], in[1], in[2], 1e-5f, y, 1e-5);

    /* Rows with a mean 1e4 times their spread: E[x^2] - E[x]^2 summed in
     * float would cancel to noise (variance error of order 10). The mean is
     * kept as a float, so it is rounded by up to ulp(1e4) / 2 ~ 5e-4, which
     * moves every output by at most that times rstd * gamma (< 1e-3). */
    for (int64_t i = 0; i < in[0]->numel; i++) in[0]->data[i] += 1e4f;
    y = ag_layernorm(&ctx, in[0], in[1], in[2], 1e-5f);
    check_against_reference(in[0], in[1], in[2], 1e-5f, y, 2e-3);
    free_inputs(in);

    /* A constant row normalises to 0 (output = beta), not NaN. */
    make_inputs(in, 2, (int[]){1, 5}, 320);
    for (int i = 0; i < 5; i++) in[0]->data[i] = 3.25f;
    y = ag_layernorm(&ctx, in[0], in[1], in[2], 1e-5f);
    for (int i = 0; i < 5; i++) ck_assert_float_eq(y->data[i], in[2]->data[i]);
    free_inputs(in);
    ag_ctx_free(&ctx);
}
END_TEST

/* Two forward/backward rounds without zeroing give twice one round's
 * gradient for x, gamma and beta. */
START_TEST(test_layernorm_accumulates) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    ag_tensor *in[3];
    make_inputs(in, 2, (int[]){5, 7}, 400);
    float once[3][35];
    for (int round = 0; round < 2; round++) {
        ag_ctx_reset(&ctx);
        ag_tensor *y = ag_layernorm(&ctx, in[0], in[1], in[2], 1e-5f);
        float dy[35];
        for (int i = 0; i < 35; i++) dy[i] = (float)((i * 7) % 11) / 11.0f - 0.4f;
        ck_assert_int_eq(ag_backward_from(&ctx, y, dy), CM_OK);
        if (round == 0)
            for (int t = 0; t < 3; t++)
                memcpy(once[t], in[t]->grad, (size_t)in[t]->numel * sizeof(float));
    }
    for (int t = 0; t < 3; t++)
        for (int64_t i = 0; i < in[t]->numel; i++)
            ck_assert_msg(fabsf(in[t]->grad[i] - 2.0f * once[t][i]) <=
                              1e-6f * (1.0f + fabsf(once[t][i])),
                          "input %d element %lld: %g after two rounds, %g after one", t,
                          (long long)i, in[t]->grad[i], once[t][i]);
    free_inputs(in);
    ag_ctx_free(&ctx);
}
END_TEST

int main(void) {
    Suite *suite = suite_create("ops_norm");
    TCase *tc = tcase_create("norm");
    tcase_add_test(tc, test_layernorm_grad_d7);
    tcase_add_test(tc, test_layernorm_grad_d2);
    tcase_add_test(tc, test_layernorm_values);
    tcase_add_test(tc, test_layernorm_accumulates);
    suite_add_tcase(suite, tc);
    SRunner *runner = srunner_create(suite);
    srunner_run_all(runner, CK_NORMAL);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
