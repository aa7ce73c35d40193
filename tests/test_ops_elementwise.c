/* Gradient checks for ops_elementwise.c: broadcasting add/sub/mul, scale,
 * GELU, ReLU, SiLU and dropout, on odd shapes. */
#include <check.h>
#include <math.h>
#include <stdlib.h>

#include "gradcheck.h"

typedef struct binary_case {
    ag_tensor *(*op)(ag_ctx *, ag_tensor *, ag_tensor *);
} binary_case;

static ag_tensor *forward_binary(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    return ((binary_case *)user)->op(ctx, in[0], in[1]);
}

/* Checks op(a, b) for a [2,3,5] against every broadcast form of b. */
static void check_binary(const char *label, ag_tensor *(*op)(ag_ctx *, ag_tensor *, ag_tensor *)) {
    const int a_shape[3] = {2, 3, 5};
    const struct {
        int ndim;
        int shape[3];
    } b_shapes[] = {{3, {2, 3, 5}}, {1, {5}},    {2, {3, 5}}, {3, {2, 3, 1}},
                    {3, {2, 1, 5}}, {2, {3, 1}}, {1, {1}}};
    binary_case user = {op};
    gc_options options = gc_default_options();
    for (size_t c = 0; c < sizeof b_shapes / sizeof b_shapes[0]; c++) {
        ag_tensor *in[2] = {
            gc_tensor_new(3, a_shape, -1.5f, 1.5f, 10 + c, true),
            gc_tensor_new(b_shapes[c].ndim, b_shapes[c].shape, -1.5f, 1.5f, 20 + c, true)};
        gc_result r = gc_check(label, forward_binary, in, 2, &user, &options);
        ck_assert_msg(r.ok, "case %zu: %s", c, r.message);
        ck_assert_int_gt(r.checked, 30);
        gc_tensor_free(in[0]);
        gc_tensor_free(in[1]);
    }
}

START_TEST(test_add_grad) {
    check_binary("add", ag_add);
}
END_TEST

START_TEST(test_sub_grad) {
    check_binary("sub", ag_sub);
}
END_TEST

START_TEST(test_mul_grad) {
    check_binary("mul", ag_mul);
}
END_TEST

START_TEST(test_broadcast_values) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, 1 << 20), CM_OK);
    float a_data[6] = {1, 2, 3, 4, 5, 6}, row[3] = {10, 20, 30}, column[2] = {2, 3};
    ag_tensor a = ag_tensor_wrap(a_data, NULL, 2, (int[]){2, 3}, false);
    ag_tensor r = ag_tensor_wrap(row, NULL, 1, (int[]){3}, false);
    ag_tensor c = ag_tensor_wrap(column, NULL, 2, (int[]){2, 1}, false);
    ag_tensor *sum = ag_add(&ctx, &a, &r);
    ag_tensor *product = ag_mul(&ctx, &a, &c);
    ag_tensor *difference = ag_sub(&ctx, &a, &r);
    const float want_sum[6] = {11, 22, 33, 14, 25, 36}, want_product[6] = {2, 4, 6, 12, 15, 18};
    for (int i = 0; i < 6; i++) {
        ck_assert_float_eq(sum->data[i], want_sum[i]);
        ck_assert_float_eq(product->data[i], want_product[i]);
        ck_assert_float_eq(difference->data[i], a_data[i] - row[i % 3]);
    }
    ag_ctx_free(&ctx);
}
END_TEST

typedef struct unary_case {
    ag_tensor *(*op)(ag_ctx *, ag_tensor *);
} unary_case;

static ag_tensor *forward_unary(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    return ((unary_case *)user)->op(ctx, in[0]);
}

static ag_tensor *forward_scale(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    (void)user;
    return ag_scale(ctx, in[0], -2.5f);
}

static void check_unary(const char *label, gc_forward_fn forward, void *user) {
    const int shape[2] = {7, 9};
    ag_tensor *x = gc_tensor_new(2, shape, -3.0f, 3.0f, 77, true);
    /* Keep samples away from ReLU's kink, where the numeric derivative is
     * meaningless (the gradient there is defined as 0). */
    for (int64_t i = 0; i < x->numel; i++)
        if (fabsf(x->data[i]) < 0.05f) x->data[i] = 0.1f;
    gc_options options = gc_default_options();
    gc_result r = gc_check(label, forward, &x, 1, user, &options);
    ck_assert_msg(r.ok, "%s", r.message);
    ck_assert_int_eq(r.checked, 63);
    gc_tensor_free(x);
}

START_TEST(test_scale_grad) {
    check_unary("scale", forward_scale, NULL);
}
END_TEST

START_TEST(test_gelu_grad) {
    check_unary("gelu", forward_unary, &(unary_case){ag_gelu});
}
END_TEST

START_TEST(test_relu_grad) {
    check_unary("relu", forward_unary, &(unary_case){ag_relu});
}
END_TEST

START_TEST(test_silu_grad) {
    check_unary("silu", forward_unary, &(unary_case){ag_silu});
}
END_TEST

START_TEST(test_softplus_grad) {
    check_unary("softplus", forward_unary, &(unary_case){ag_softplus});
}
END_TEST

/* softplus: log(1 + exp(v)) without overflow at large |v|. */
START_TEST(test_softplus_values) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, 1 << 20), CM_OK);
    float x[6] = {-100.0f, -3.0f, -0.5f, 0.0f, 2.0f, 100.0f};
    ag_tensor t = ag_tensor_wrap(x, NULL, 1, (int[]){6}, false);
    ag_tensor *y = ag_softplus(&ctx, &t);
    for (int i = 1; i < 5; i++)
        ck_assert_double_eq_tol(y->data[i], log(1.0 + exp((double)x[i])), 1e-6);
    ck_assert_double_eq_tol(y->data[0], exp(-100.0), 1e-45);
    ck_assert_double_eq_tol(y->data[5], 100.0, 1e-5);
    ag_ctx_free(&ctx);
}
END_TEST

START_TEST(test_activation_values) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, 1 << 20), CM_OK);
    float x[4] = {-2.0f, -0.5f, 0.0f, 1.5f};
    ag_tensor t = ag_tensor_wrap(x, NULL, 1, (int[]){4}, false);
    ag_tensor *gelu = ag_gelu(&ctx, &t), *relu = ag_relu(&ctx, &t), *silu = ag_silu(&ctx, &t);
    for (int i = 0; i < 4; i++) {
        double v = x[i];
        double want_gelu =
            0.5 * v * (1.0 + tanh(sqrt(2.0 / 3.14159265358979323846) * (v + 0.044715 * v * v * v)));
        ck_assert_double_eq_tol(gelu->data[i], want_gelu, 1e-6);
        ck_assert_float_eq(relu->data[i], x[i] > 0 ? x[i] : 0.0f);
        ck_assert_double_eq_tol(silu->data[i], v / (1.0 + exp(-v)), 1e-6);
    }
    ag_ctx_free(&ctx);
}
END_TEST

static ag_tensor *forward_dropout(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    (void)user;
    return ag_dropout(ctx, in[0], 0.3f, (cm_rng_key){5, 1, 2, CM_RNG_DROPOUT}, 100);
}

START_TEST(test_dropout_grad) {
    check_unary("dropout", forward_dropout, NULL);
}
END_TEST

START_TEST(test_dropout_statistics) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, 16 << 20), CM_OK);
    enum { N = 100000 };
    float *ones = malloc(N * sizeof(float));
    for (int i = 0; i < N; i++) ones[i] = 1.0f;
    ag_tensor x = ag_tensor_wrap(ones, NULL, 1, (int[]){N}, false);
    cm_rng_key key = {9, 3, 0, CM_RNG_DROPOUT};
    ag_tensor *y = ag_dropout(&ctx, &x, 0.25f, key, 0);
    ag_tensor *again = ag_dropout(&ctx, &x, 0.25f, key, 0);
    int kept = 0;
    for (int i = 0; i < N; i++) {
        ck_assert(y->data[i] == 0.0f || fabsf(y->data[i] - 1.0f / 0.75f) < 1e-6f);
        ck_assert_float_eq(y->data[i], again->data[i]); /* same key, same mask */
        kept += y->data[i] != 0.0f;
    }
    /* 75% kept; 5 standard deviations of a binomial is about 0.7%. */
    ck_assert_double_eq_tol(kept / (double)N, 0.75, 0.007);
    ck_assert_ptr_eq(ag_dropout(&ctx, &x, 0.0f, key, 0), &x);
    free(ones);
    ag_ctx_free(&ctx);
}
END_TEST

int main(void) {
    Suite *suite = suite_create("ops_elementwise");
    TCase *tc = tcase_create("elementwise");
    tcase_add_test(tc, test_add_grad);
    tcase_add_test(tc, test_sub_grad);
    tcase_add_test(tc, test_mul_grad);
    tcase_add_test(tc, test_broadcast_values);
    tcase_add_test(tc, test_scale_grad);
    tcase_add_test(tc, test_gelu_grad);
    tcase_add_test(tc, test_relu_grad);
    tcase_add_test(tc, test_silu_grad);
    tcase_add_test(tc, test_softplus_grad);
    tcase_add_test(tc, test_softplus_values);
    tcase_add_test(tc, test_activation_values);
    tcase_add_test(tc, test_dropout_grad);
    tcase_add_test(tc, test_dropout_statistics);
    suite_add_tcase(suite, tc);
    SRunner *runner = srunner_create(suite);
    srunner_run_all(runner, CK_NORMAL);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
