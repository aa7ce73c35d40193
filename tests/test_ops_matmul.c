/* Gradient and value checks for ops_matmul.c: matmul with every transpose
 * combination, batched matmul, and linear (with and without bias, 1-D to 4-D
 * inputs, zero rows), on odd shapes. Values are compared with double loops. */
#include <check.h>
#include <math.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>

#include "gradcheck.h"

enum { M = 3, K = 5, N = 7, BATCH = 2 };

/* Element (row, col) of op(x) where x is stored [rows, cols] row-major, or
 * transposed [cols, rows]. */
static double element(const float *x, bool transposed, int rows, int cols, int row, int col) {
    return transposed ? x[(int64_t)col * rows + row] : x[(int64_t)row * cols + col];
}

/* out [m,n] = op(a) [m,k] op(b) [k,n], in double. */
static void naive_matmul(const float *a, const float *b, bool trans_a, bool trans_b, int m, int n,
                         int k, double *out) {
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) {
            double total = 0.0;
            for (int l = 0; l < k; l++)
                total += element(a, trans_a, m, k, i, l) * element(b, trans_b, k, n, l, j);
            out[i * n + j] = total;
        }
}

typedef struct transposes {
    bool a, b;
} transposes;

static const transposes all_transposes[4] = {
    {false, false}, {true, false}, {false, true}, {true, true}};

/* Stored shape of op(x) [rows, cols], after an optional leading batch dim. */
static ag_tensor *new_operand(bool batched, bool transposed, int rows, int cols, uint64_t seed,
                              bool requires_grad) {
    int shape[3] = {BATCH, transposed ? cols : rows, transposed ? rows : cols};
    return batched ? gc_tensor_new(3, shape, -1.0f, 1.0f, seed, requires_grad)
                   : gc_tensor_new(2, shape + 1, -1.0f, 1.0f, seed, requires_grad);
}

static ag_tensor *forward_matmul(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    const transposes *t = user;
    return ag_matmul(ctx, in[0], in[1], t->a, t->b);
}

static ag_tensor *forward_bmm(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    const transposes *t = user;
    return ag_bmm(ctx, in[0], in[1], t->a, t->b);
}

static void check_matmul_grad(bool batched) {
    gc_options options = gc_default_options();
    for (int c = 0; c < 4; c++) {
        transposes t = all_transposes[c];
        ag_tensor *in[2] = {new_operand(batched, t.a, M, K, 30 + c, true),
                            new_operand(batched, t.b, K, N, 40 + c, true)};
        gc_result r = gc_check(batched ? "bmm" : "matmul", batched ? forward_bmm : forward_matmul,
                               in, 2, &t, &options);
        ck_assert_msg(r.ok, "trans_a %d trans_b %d: %s", t.a, t.b, r.message);
        ck_assert_int_eq(r.checked, in[0]->numel + in[1]->numel);
        gc_tensor_free(in[0]);
        gc_tensor_free(in[1]);
    }
}

START_TEST(test_matmul_grad) {
    check_matmul_grad(false);
}
END_TEST

START_TEST(test_bmm_grad) {
    check_matmul_grad(true);
}
END_TEST

/* Only b takes a gradient: a's gradient buffer must stay untouched. */
START_TEST(test_matmul_grad_one_side) {
    gc_options options = gc_default_options();
    for (int c = 0; c < 4; c++) {
        transposes t = all_transposes[c];
        ag_tensor *in[2] = {new_operand(false, t.a, M, K, 50 + c, false),
                            new_operand(false, t.b, K, N, 60 + c, true)};
        gc_result r = gc_check("matmul", forward_matmul, in, 2, &t, &options);
        ck_assert_msg(r.ok, "trans_a %d trans_b %d: %s", t.a, t.b, r.message);
        for (int64_t i = 0; i < in[0]->numel; i++) ck_assert_float_eq(in[0]->grad[i], 0.0f);
        gc_tensor_free(in[0]);
        gc_tensor_free(in[1]);
    }
}
END_TEST

static void check_matmul_values(bool batched) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, 1 << 20), CM_OK);
    double want[M * N];
    for (int c = 0; c < 4; c++) {
        transposes t = all_transposes[c];
        ag_tensor *a = new_operand(batched, t.a, M, K, 70 + c, false);
        ag_tensor *b = new_operand(batched, t.b, K, N, 80 + c, false);
        ag_tensor *y = batched ? ag_bmm(&ctx, a, b, t.a, t.b) : ag_matmul(&ctx, a, b, t.a, t.b);
        ck_assert_ptr_nonnull(y);
        ck_assert_int_eq(y->ndim, batched ? 3 : 2);
        ck_assert_int_eq(y->shape[y->ndim - 2], M);
        ck_assert_int_eq(y->shape[y->ndim - 1], N);
        for (int i = 0; i < (batched ? BATCH : 1); i++) {
            naive_matmul(a->data + i * M * K, b->data + i * K * N, t.a, t.b, M, N, K, want);
            for (int e = 0; e < M * N; e++)
                ck_assert_double_eq_tol(y->data[i * M * N + e], want[e], 1e-5);
        }
        gc_tensor_free(a);
        gc_tensor_free(b);
    }
    ag_ctx_free(&ctx);
}

START_TEST(test_matmul_values) {
    check_matmul_values(false);
}
END_TEST

START_TEST(test_bmm_values) {
    check_matmul_values(true);
}
END_TEST

/* ---- linear ------------------------------------------------------------------ */

static ag_tensor *forward_linear(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    bool has_bias = *(const bool *)user;
    return ag_linear(ctx, in[0], in[1], has_bias ? in[2] : NULL);
}

/* x [x_shape..., 5], w [7,5], bias [7] when has_bias. */
static void check_linear_grad(int x_ndim, const int *x_shape, bool has_bias, bool x_grad) {
    const int w_shape[2] = {N, K}, bias_shape[1] = {N};
    ag_tensor *in[3] = {gc_tensor_new(x_ndim, x_shape, -1.0f, 1.0f, 90, x_grad),
                        gc_tensor_new(2, w_shape, -1.0f, 1.0f, 91, true),
                        gc_tensor_new(1, bias_shape, -1.0f, 1.0f, 92, true)};
    gc_options options = gc_default_options();
    gc_result r = gc_check("linear", forward_linear, in, has_bias ? 3 : 2, &has_bias, &options);
    ck_assert_msg(r.ok, "%d-D x, bias %d: %s", x_ndim, has_bias, r.message);
    int64_t expected = (x_grad ? in[0]->numel : 0) + in[1]->numel + (has_bias ? N : 0);
    ck_assert_int_eq(r.checked, expected);
    if (!x_grad)
        for (int64_t i = 0; i < in[0]->numel; i++) ck_assert_float_eq(in[0]->grad[i], 0.0f);
    for (int i = 0; i < 3; i++) gc_tensor_free(in[i]);
}

START_TEST(test_linear_grad_bias) {
    check_linear_grad(2, (int[]){M, K}, true, true);
}
END_TEST

START_TEST(test_linear_grad_no_bias) {
    check_linear_grad(2, (int[]){M, K}, false, true);
}
END_TEST

START_TEST(test_linear_grad_3d) {
    check_linear_grad(3, (int[]){2, M, K}, true, true);
    check_linear_grad(3, (int[]){2, M, K}, false, true);
}
END_TEST

START_TEST(test_linear_grad_1d_4d) {
    check_linear_grad(1, (int[]){K}, true, true);
    check_linear_grad(4, (int[]){2, 1, M, K}, true, true);
}
END_TEST

/* A frozen input (the first layer's x): only w and bias get gradients. */
START_TEST(test_linear_grad_weights_only) {
    check_linear_grad(2, (int[]){M, K}, true, false);
}
END_TEST

START_TEST(test_linear_values) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, 1 << 20), CM_OK);
    const int shapes[4][4] = {{K}, {M, K}, {2, M, K}, {2, 3, 1, K}};
    ag_tensor *w = gc_tensor_new(2, (int[]){N, K}, -1.0f, 1.0f, 100, false);
    ag_tensor *bias = gc_tensor_new(1, (int[]){N}, -1.0f, 1.0f, 101, false);
    for (int ndim = 1; ndim <= 4; ndim++) {
        ag_tensor *x = gc_tensor_new(ndim, shapes[ndim - 1], -2.0f, 2.0f, 102 + ndim, false);
        ag_tensor *with_bias = ag_linear(&ctx, x, w, bias);
        ag_tensor *without_bias = ag_linear(&ctx, x, w, NULL);
        ck_assert_ptr_nonnull(with_bias);
        ck_assert_ptr_nonnull(without_bias);
        ck_assert_int_eq(with_bias->ndim, ndim);
        for (int d = 0; d < ndim - 1; d++) ck_assert_int_eq(with_bias->shape[d], x->shape[d]);
        ck_assert_int_eq(with_bias->shape[ndim - 1], N);
        int64_t rows = x->numel / K;
        ck_assert_int_eq(with_bias->numel, rows * N);
        for (int64_t r = 0; r < rows; r++)
            for (int o = 0; o < N; o++) {
                double total = 0.0;
                for (int i = 0; i < K; i++)
                    total += (double)x->data[r * K + i] * w->data[o * K + i];
                ck_assert_double_eq_tol(without_bias->data[r * N + o], total, 1e-5);
                ck_assert_double_eq_tol(with_bias->data[r * N + o], total + bias->data[o], 1e-5);
            }
        gc_tensor_free(x);
    }
    gc_tensor_free(w);
    gc_tensor_free(bias);
    ag_ctx_free(&ctx);
}
END_TEST

/* An expert that receives no tokens: x [0,IN] -> [0,OUT]; a backward through
 * it (via the tape, then by calling the node directly so the k = 0 sgemm path
 * runs even if the driver skips the empty output) leaves the weight and bias
 * gradients unchanged. */
START_TEST(test_linear_zero_rows) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, 1 << 20), CM_OK);
    ag_tensor *x = gc_tensor_new(2, (int[]){0, K}, -1.0f, 1.0f, 110, true);
    ag_tensor *w = gc_tensor_new(2, (int[]){N, K}, -1.0f, 1.0f, 111, true);
    ag_tensor *bias = gc_tensor_new(1, (int[]){N}, -1.0f, 1.0f, 112, true);
    for (int i = 0; i < N * K; i++) w->grad[i] = 0.5f;
    ag_tensor *y = ag_linear(&ctx, x, w, bias);
    ck_assert_ptr_nonnull(y);
    ck_assert_int_eq(y->ndim, 2);
    ck_assert_int_eq(y->shape[0], 0);
    ck_assert_int_eq(y->shape[1], N);
    ag_node *node = ctx.tape_tail;
    ck_assert_ptr_nonnull(node);
    float unused = 0.0f;
    ck_assert_int_eq(ag_backward_from(&ctx, y, &unused), CM_OK);
    y->grad = &unused;
    node->backward(&ctx, node);
    for (int i = 0; i < N * K; i++) ck_assert_float_eq(w->grad[i], 0.5f);
    for (int i = 0; i < N; i++) ck_assert_float_eq(bias->grad[i], 0.0f);
    gc_tensor_free(x);
    gc_tensor_free(w);
    gc_tensor_free(bias);
    ag_ctx_free(&ctx);
}
END_TEST

/* Backward ADDS into existing gradients (beta = 1): a second forward and
 * backward with the same upstream gradient must double every input gradient.
 * gc_check zeroes the gradients first, so it cannot see this. */
static void check_accumulates(const char *label, gc_forward_fn forward, ag_tensor *const *in,
                              int n_inputs, void *user) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, 1 << 20), CM_OK);
    for (int i = 0; i < n_inputs; i++) memset(in[i]->grad, 0, (size_t)in[i]->numel * sizeof(float));
    float *once[3] = {NULL, NULL, NULL};
    for (int pass = 0; pass < 2; pass++) {
        ag_ctx_reset(&ctx);
        ag_tensor *y = forward(&ctx, in, user);
        ck_assert_ptr_nonnull(y);
        float *dy = malloc((size_t)y->numel * sizeof(float));
        for (int64_t e = 0; e < y->numel; e++) dy[e] = (float)(e % 5) - 1.5f;
        ck_assert_int_eq(ag_backward_from(&ctx, y, dy), CM_OK);
        free(dy);
        for (int i = 0; i < n_inputs && pass == 0; i++) {
            once[i] = malloc((size_t)in[i]->numel * sizeof(float));
            memcpy(once[i], in[i]->grad, (size_t)in[i]->numel * sizeof(float));
        }
    }
    for (int i = 0; i < n_inputs; i++) {
        for (int64_t e = 0; e < in[i]->numel; e++)
            ck_assert_msg(fabsf(in[i]->grad[e] - 2.0f * once[i][e]) <=
                              1e-5f * (1.0f + fabsf(once[i][e])),
                          "%s input %d element %lld: %g after two passes, %g after one", label, i,
                          (long long)e, in[i]->grad[e], once[i][e]);
        free(once[i]);
    }
    ag_ctx_free(&ctx);
}

START_TEST(test_backward_accumulates) {
    for (int batched = 0; batched <= 1; batched++)
        for (int c = 0; c < 4; c++) {
            transposes t = all_transposes[c];
            ag_tensor *in[2] = {new_operand(batched, t.a, M, K, 140 + c, true),
                                new_operand(batched, t.b, K, N, 150 + c, true)};
            check_accumulates(batched ? "bmm" : "matmul", batched ? forward_bmm : forward_matmul,
                              in, 2, &t);
            gc_tensor_free(in[0]);
            gc_tensor_free(in[1]);
        }
    bool has_bias = true;
    ag_tensor *in[3] = {gc_tensor_new(3, (int[]){2, M, K}, -1.0f, 1.0f, 160, true),
                        gc_tensor_new(2, (int[]){N, K}, -1.0f, 1.0f, 161, true),
                        gc_tensor_new(1, (int[]){N}, -1.0f, 1.0f, 162, true)};
    check_accumulates("linear", forward_linear, in, 3, &has_bias);
    for (int i = 0; i < 3; i++) gc_tensor_free(in[i]);
}
END_TEST

START_TEST(test_linear_shape_mismatch_aborts) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, 1 << 20), CM_OK);
    ag_tensor *x = gc_tensor_new(2, (int[]){M, K}, -1.0f, 1.0f, 130, false);
    ag_tensor *w = gc_tensor_new(2, (int[]){N, K + 1}, -1.0f, 1.0f, 131, false);
    ag_linear(&ctx, x, w, NULL); /* aborts */
}
END_TEST

START_TEST(test_sgemm_leading_dims) {
    /* op(a) [2,3] read from a wider buffer (lda 4), into c with ldc 5 and
     * alpha/beta applied; the padding columns must not be touched. */
    const float a[8] = {1, 2, 3, -9, 4, 5, 6, -9};
    const float b[6] = {1, 0, 0, 1, 1, 1}; /* [3,2] */
    float c[10] = {1, 1, 7, 7, 7, 1, 1, 7, 7, 7};
    ag_sgemm(false, false, 2, 2, 3, 2.0f, a, 4, b, 2, 0.5f, c, 5);
    const float want[10] = {8.5f, 10.5f, 7, 7, 7, 20.5f, 22.5f, 7, 7, 7};
    for (int i = 0; i < 10; i++) ck_assert_float_eq(c[i], want[i]);
    /* k = 0: c = beta c; beta 0 clears even NaN. */
    float d[2] = {NAN, 3.0f};
    ag_sgemm(false, false, 1, 2, 0, 1.0f, a, 0, b, 2, 0.0f, d, 2);
    ck_assert_float_eq(d[0], 0.0f);
    ck_assert_float_eq(d[1], 0.0f);
}
END_TEST

int main(void) {
    Suite *suite = suite_create("ops_matmul");
    TCase *tc = tcase_create("matmul");
    tcase_add_test(tc, test_matmul_grad);
    tcase_add_test(tc, test_bmm_grad);
    tcase_add_test(tc, test_matmul_grad_one_side);
    tcase_add_test(tc, test_matmul_values);
    tcase_add_test(tc, test_bmm_values);
    tcase_add_test(tc, test_linear_grad_bias);
    tcase_add_test(tc, test_linear_grad_no_bias);
    tcase_add_test(tc, test_linear_grad_3d);
    tcase_add_test(tc, test_linear_grad_1d_4d);
    tcase_add_test(tc, test_linear_grad_weights_only);
    tcase_add_test(tc, test_linear_values);
    tcase_add_test(tc, test_linear_zero_rows);
    tcase_add_test(tc, test_backward_accumulates);
    tcase_add_test_raise_signal(tc, test_linear_shape_mismatch_aborts, SIGABRT);
    tcase_add_test(tc, test_sgemm_leading_dims);
    suite_add_tcase(suite, tc);
    SRunner *runner = srunner_create(suite);
    srunner_run_all(runner, CK_NORMAL);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
