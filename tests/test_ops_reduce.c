/* Tests for ops_reduce.c: sum, mean, softmax, log-softmax, cross-entropy,
 * KL divergence and entropy. Gradient checks on odd shapes for every input
 * that takes a gradient, and forward values against double-precision loops. */
#include <check.h>
#include <math.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>

#include "gradcheck.h"

enum { ARENA_BYTES = 16 << 20, IGNORE = -100 };

/* ---- double-precision references ----------------------------------------- */

static double ref_logsumexp(const float *x, int n) {
    double m = x[0];
    for (int i = 1; i < n; i++) m = x[i] > m ? x[i] : m;
    double total = 0.0;
    for (int i = 0; i < n; i++) total += exp((double)x[i] - m);
    return m + log(total);
}

/* Cross-entropy mean over rows with target != ignore_index (0 if none). */
static double ref_cross_entropy(const float *logits, int rows, int v_size, const int32_t *targets,
                                int32_t ignore_index) {
    double total = 0.0;
    int valid = 0;
    for (int r = 0; r < rows; r++) {
        if (targets[r] == ignore_index) continue;
        const float *row = logits + (int64_t)r * v_size;
        total += ref_logsumexp(row, v_size) - row[targets[r]];
        valid++;
    }
    return valid ? total / valid : 0.0;
}

static ag_tensor wrap(float *data, int ndim, const int *shape) {
    return ag_tensor_wrap(data, NULL, ndim, shape, false);
}

/* Writes value into every element of t. */
static void fill(ag_tensor *t, float value) {
    for (int64_t i = 0; i < t->numel; i++) t->data[i] = value;
}

/* Runs a gradcheck with the default options and asserts it passed on at
 * least min_checked elements. */
static void expect_gradcheck(const char *label, gc_forward_fn forward, ag_tensor *const *in, int n,
                             void *user, int64_t min_checked) {
    gc_options options = gc_default_options();
    gc_result r = gc_check(label, forward, in, n, user, &options);
    ck_assert_msg(r.ok, "%s", r.message);
    ck_assert_int_ge(r.checked, min_checked);
}

/* ---- sum, mean ----------------------------------------------------------- */

static ag_tensor *forward_sum(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    (void)user;
    return ag_sum(ctx, in[0]);
}

static ag_tensor *forward_mean(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    (void)user;
    return ag_mean(ctx, in[0]);
}

START_TEST(test_sum_mean_grad) {
    ag_tensor *x = gc_tensor_new(3, (int[]){2, 3, 7}, -2.0f, 2.0f, 11, true);
    expect_gradcheck("sum", forward_sum, &x, 1, NULL, 42);
    expect_gradcheck("mean", forward_mean, &x, 1, NULL, 42);
    gc_tensor_free(x);
}
END_TEST

/* A million values: a float accumulator would be off by far more than the
 * tolerance, so this also checks that the sum is accumulated in double. */
START_TEST(test_sum_mean_values) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    enum { N = 1000003 };
    ag_tensor *x = gc_tensor_new(1, (int[]){N}, 0.0f, 1.0f, 12, false);
    double want = 0.0;
    for (int i = 0; i < N; i++) want += x->data[i];
    ag_tensor *sum = ag_sum(&ctx, x), *mean = ag_mean(&ctx, x);
    ck_assert_int_eq(sum->ndim, 1);
    ck_assert_int_eq(sum->numel, 1);
    ck_assert_double_eq_tol(sum->data[0], want, 1e-6 * want);
    ck_assert_double_eq_tol(mean->data[0], want / N, 1e-6);
    gc_tensor_free(x);
    ag_ctx_free(&ctx);
}
END_TEST

/* ---- softmax, log-softmax ------------------------------------------------ */

static ag_tensor *forward_softmax(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    (void)user;
    return ag_softmax(ctx, in[0]);
}

static ag_tensor *forward_log_softmax(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    (void)user;
    return ag_log_softmax(ctx, in[0]);
}

START_TEST(test_softmax_grad) {
    ag_tensor *x = gc_tensor_new(2, (int[]){5, 7}, -3.0f, 3.0f, 21, true);
    ag_tensor *x3 = gc_tensor_new(3, (int[]){2, 3, 5}, -3.0f, 3.0f, 22, true);
    expect_gradcheck("softmax [5,7]", forward_softmax, &x, 1, NULL, 35);
    expect_gradcheck("softmax [2,3,5]", forward_softmax, &x3, 1, NULL, 30);
    gc_tensor_free(x);
    gc_tensor_free(x3);
}
END_TEST

START_TEST(test_log_softmax_grad) {
    ag_tensor *x = gc_tensor_new(2, (int[]){5, 7}, -3.0f, 3.0f, 23, true);
    ag_tensor *x3 = gc_tensor_new(3, (int[]){2, 3, 5}, -3.0f, 3.0f, 24, true);
    expect_gradcheck("log_softmax [5,7]", forward_log_softmax, &x, 1, NULL, 35);
    expect_gradcheck("log_softmax [2,3,5]", forward_log_softmax, &x3, 1, NULL, 30);
    gc_tensor_free(x);
    gc_tensor_free(x3);
}
END_TEST

/* Rows of moderate, +-50 and +-500-offset logits. In float, exp(500)
 * overflows and exp(-500) underflows to 0, so without subtracting the row
 * maximum rows 2 and 3 would come out NaN. */
static void fill_extreme_logits(ag_tensor *x) {
    const int v_size = ag_last_dim(x);
    cm_rng_fill_uniform((cm_rng_key){31, 0, 0, CM_RNG_TEST}, 0, x->numel, -3.0f, 3.0f, x->data);
    for (int v = 0; v < v_size; v++) {
        x->data[1 * v_size + v] = v % 2 ? 50.0f - (float)v : -50.0f + (float)v;
        x->data[2 * v_size + v] += 500.0f;
        x->data[3 * v_size + v] -= 500.0f;
    }
}

START_TEST(test_softmax_values) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    enum { ROWS = 5, V = 7 };
    float data[ROWS * V];
    ag_tensor x = wrap(data, 2, (int[]){ROWS, V});
    fill_extreme_logits(&x);
    ag_tensor *y = ag_softmax(&ctx, &x), *log_y = ag_log_softmax(&ctx, &x);
    ck_assert_ptr_nonnull(y);
    ck_assert_ptr_nonnull(log_y);
    for (int r = 0; r < ROWS; r++) {
        double lse = ref_logsumexp(data + r * V, V), row_total = 0.0;
        for (int v = 0; v < V; v++) {
            int i = r * V + v;
            double want_log = (double)data[i] - lse;
            ck_assert_msg(isfinite(y->data[i]) && isfinite(log_y->data[i]), "row %d col %d", r, v);
            ck_assert_double_eq_tol(y->data[i], exp(want_log), 1e-6);
            /* Row 1 spans 100 nats: absolute error grows with |log y|. */
            ck_assert_double_eq_tol(log_y->data[i], want_log, 1e-6 * (1.0 + fabs(want_log)));
            row_total += y->data[i];
        }
        ck_assert_double_eq_tol(row_total, 1.0, 1e-6);
    }
    ag_ctx_free(&ctx);
}
END_TEST

/* ---- cross-entropy ------------------------------------------------------- */

typedef struct cross_entropy_case {
    const int32_t *targets;
    int32_t ignore_index;
} cross_entropy_case;

static ag_tensor *forward_cross_entropy(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    const cross_entropy_case *c = user;
    return ag_cross_entropy(ctx, in[0], c->targets, c->ignore_index);
}

START_TEST(test_cross_entropy_grad) {
    const int32_t targets[5] = {3, IGNORE, 0, 6, IGNORE};
    cross_entropy_case c = {targets, IGNORE};
    ag_tensor *logits = gc_tensor_new(2, (int[]){5, 7}, -3.0f, 3.0f, 41, true);
    expect_gradcheck("cross_entropy", forward_cross_entropy, &logits, 1, &c, 35);
    /* An ignore_index inside [0,V), as a padding token id would be. */
    const int32_t padded[5] = {2, 2, 5, 0, 2};
    cross_entropy_case padding = {padded, 2};
    expect_gradcheck("cross_entropy padding", forward_cross_entropy, &logits, 1, &padding, 35);
    gc_tensor_free(logits);
}
END_TEST

/* Backward against (softmax - onehot) * dloss / valid_rows, computed in
 * double; ignored rows must receive exactly 0. */
START_TEST(test_cross_entropy_backward_values) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    enum { ROWS = 5, V = 7 };
    const int32_t targets[ROWS] = {3, IGNORE, 0, 6, IGNORE};
    ag_tensor *logits = gc_tensor_new(2, (int[]){ROWS, V}, -3.0f, 3.0f, 42, true);
    fill_extreme_logits(logits);
    const float dloss = 0.75f;
    ag_tensor *loss = ag_cross_entropy(&ctx, logits, targets, IGNORE);
    ck_assert_ptr_nonnull(loss);
    ck_assert_int_eq(loss->numel, 1);
    ck_assert_double_eq_tol(loss->data[0],
                            ref_cross_entropy(logits->data, ROWS, V, targets, IGNORE), 1e-5);
    ck_assert_int_eq(ag_backward_from(&ctx, loss, &dloss), CM_OK);
    for (int r = 0; r < ROWS; r++) {
        const float *row = logits->data + r * V;
        double lse = ref_logsumexp(row, V);
        for (int v = 0; v < V; v++) {
            float got = logits->grad[r * V + v];
            if (targets[r] == IGNORE) {
                ck_assert_msg(got == 0.0f, "ignored row %d col %d has gradient %g", r, v, got);
                continue;
            }
            double want = (exp(row[v] - lse) - (v == targets[r])) * dloss / 3.0;
            ck_assert_double_eq_tol(got, want, 1e-6);
        }
    }
    gc_tensor_free(logits);
    ag_ctx_free(&ctx);
}
END_TEST

/* The hot size (V = 256) and a larger row count, with an in-range
 * ignore_index, against the double reference. */
START_TEST(test_cross_entropy_values) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    enum { ROWS = 67, V = 256 };
    ag_tensor *logits = gc_tensor_new(2, (int[]){ROWS, V}, -8.0f, 8.0f, 43, false);
    int32_t targets[ROWS];
    for (int r = 0; r < ROWS; r++) targets[r] = (int32_t)((r * 37 + 5) % V);
    targets[4] = targets[10] = targets[66] = 7; /* ignored */
    ag_tensor *loss = ag_cross_entropy(&ctx, logits, targets, 7);
    ck_assert_ptr_nonnull(loss);
    ck_assert_double_eq_tol(loss->data[0], ref_cross_entropy(logits->data, ROWS, V, targets, 7),
                            1e-5);
    gc_tensor_free(logits);
    ag_ctx_free(&ctx);
}
END_TEST

START_TEST(test_cross_entropy_all_ignored) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    const int32_t targets[3] = {IGNORE, IGNORE, IGNORE};
    ag_tensor *logits = gc_tensor_new(2, (int[]){3, 5}, -3.0f, 3.0f, 44, true);
    ag_tensor *loss = ag_cross_entropy(&ctx, logits, targets, IGNORE);
    ck_assert_ptr_nonnull(loss);
    ck_assert_float_eq(loss->data[0], 0.0f);
    ck_assert_int_eq(ag_backward(&ctx, loss), CM_OK);
    for (int i = 0; i < 15; i++) ck_assert_float_eq(logits->grad[i], 0.0f);
    gc_tensor_free(logits);
    ag_ctx_free(&ctx);
}
END_TEST

/* A target outside [0,V) that is not ignore_index is a bug: abort. */
START_TEST(test_cross_entropy_bad_target) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    const int32_t targets[3] = {1, 5, 0}; /* 5 == V */
    ag_tensor *logits = gc_tensor_new(2, (int[]){3, 5}, -3.0f, 3.0f, 45, false);
    ag_cross_entropy(&ctx, logits, targets, IGNORE);
    ck_abort_msg("cross_entropy accepted target 5 with V = 5");
}
END_TEST

/* ---- KL divergence ------------------------------------------------------- */

static ag_tensor *forward_kl_raw(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    (void)user;
    return ag_kl_div(ctx, in[0], in[1]);
}

static ag_tensor *forward_kl_normalised(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    (void)user;
    return ag_kl_div(ctx, ag_log_softmax(ctx, in[0]), ag_log_softmax(ctx, in[1]));
}

/* THOR's consistency loss: 0.5 (KL(P1||P2) + KL(P2||P1)), from two logit sets. */
static ag_tensor *forward_kl_symmetric(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    (void)user;
    ag_tensor *log_p1 = ag_log_softmax(ctx, in[0]), *log_p2 = ag_log_softmax(ctx, in[1]);
    ag_tensor *both = ag_add(ctx, ag_kl_div(ctx, log_p1, log_p2), ag_kl_div(ctx, log_p2, log_p1));
    return ag_scale(ctx, both, 0.5f);
}

START_TEST(test_kl_div_grad) {
    const int shape[2] = {5, 7};
    /* Raw inputs: logp is not normalised, as the op's contract allows. */
    ag_tensor *raw[2] = {gc_tensor_new(2, shape, -3.0f, 0.5f, 51, true),
                         gc_tensor_new(2, shape, -3.0f, 0.5f, 52, true)};
    expect_gradcheck("kl_div raw", forward_kl_raw, raw, 2, NULL, 70);
    raw[0]->requires_grad = false; /* only logq */
    expect_gradcheck("kl_div raw, logq only", forward_kl_raw, raw, 2, NULL, 35);
    raw[0]->requires_grad = true;
    raw[1]->requires_grad = false; /* only logp */
    expect_gradcheck("kl_div raw, logp only", forward_kl_raw, raw, 2, NULL, 35);

    ag_tensor *logits[2] = {gc_tensor_new(2, shape, -3.0f, 3.0f, 53, true),
                            gc_tensor_new(2, shape, -3.0f, 3.0f, 54, true)};
    expect_gradcheck("kl_div log_softmax", forward_kl_normalised, logits, 2, NULL, 70);
    expect_gradcheck("kl_div symmetric", forward_kl_symmetric, logits, 2, NULL, 70);
    for (int i = 0; i < 2; i++) {
        gc_tensor_free(raw[i]);
        gc_tensor_free(logits[i]);
    }
}
END_TEST

START_TEST(test_kl_div_values) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    enum { ROWS = 5, V = 7 };
    const int shape[2] = {ROWS, V};
    ag_tensor *z1 = gc_tensor_new(2, shape, -3.0f, 3.0f, 55, false);
    ag_tensor *z2 = gc_tensor_new(2, shape, -3.0f, 3.0f, 56, false);
    ag_tensor *log_p = ag_log_softmax(&ctx, z1), *log_q = ag_log_softmax(&ctx, z2);

    double want = 0.0;
    for (int i = 0; i < ROWS * V; i++)
        want += exp(log_p->data[i]) * ((double)log_p->data[i] - log_q->data[i]);
    want /= ROWS;
    ag_tensor *kl = ag_kl_div(&ctx, log_p, log_q);
    ck_assert_int_eq(kl->numel, 1);
    ck_assert_double_eq_tol(kl->data[0], want, 1e-6);
    ck_assert_double_gt(kl->data[0], 0.01); /* Gibbs: > 0 for different distributions */
    ck_assert_double_gt(ag_kl_div(&ctx, log_q, log_p)->data[0], 0.01);

    /* Equal distributions, as the same tensor and as an equal copy: 0. */
    ck_assert_float_eq(ag_kl_div(&ctx, log_p, log_p)->data[0], 0.0f);
    ag_tensor *log_p_copy = ag_log_softmax(&ctx, z1);
    ck_assert_float_eq(ag_kl_div(&ctx, log_p, log_p_copy)->data[0], 0.0f);

    /* p == 0 (logp = -inf) contributes 0, not NaN. */
    log_p->data[3] = -INFINITY;
    ck_assert(isfinite(ag_kl_div(&ctx, log_p, log_q)->data[0]));
    gc_tensor_free(z1);
    gc_tensor_free(z2);
    ag_ctx_free(&ctx);
}
END_TEST

/* ---- entropy ------------------------------------------------------------- */

static ag_tensor *forward_entropy(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    (void)user;
    return ag_entropy(ctx, in[0]);
}

static ag_tensor *forward_entropy_of_softmax(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    (void)user;
    return ag_entropy(ctx, ag_softmax(ctx, in[0]));
}

START_TEST(test_entropy_grad) {
    const int shape[2] = {5, 7};
    ag_tensor *z = gc_tensor_new(2, shape, -3.0f, 3.0f, 61, true);
    expect_gradcheck("entropy(softmax)", forward_entropy_of_softmax, &z, 1, NULL, 35);
    /* Direct, unnormalised positive inputs well above eps = 1e-2. */
    ag_tensor *p = gc_tensor_new(2, shape, 0.05f, 1.0f, 62, true);
    expect_gradcheck("entropy", forward_entropy, &p, 1, NULL, 35);
    gc_tensor_free(z);
    gc_tensor_free(p);
}
END_TEST

START_TEST(test_entropy_values) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    enum { ROWS = 5, V = 7 };
    const int shape[2] = {ROWS, V};
    float uniform_data[ROWS * V];
    ag_tensor uniform = wrap(uniform_data, 2, shape);
    fill(&uniform, 1.0f / V);
    ck_assert_double_eq_tol(ag_entropy(&ctx, &uniform)->data[0], log((double)V), 1e-6);

    ag_tensor *z = gc_tensor_new(2, shape, -3.0f, 3.0f, 63, false);
    ag_tensor *p = ag_softmax(&ctx, z);
    double want = 0.0;
    for (int i = 0; i < ROWS * V; i++) want -= p->data[i] * log((double)p->data[i]);
    want /= ROWS;
    ck_assert_double_eq_tol(ag_entropy(&ctx, p)->data[0], want, 1e-6);

    /* A one-hot row has entropy 0; the zeros go through the log floor and
     * must give a finite value and a finite gradient. */
    float onehot_data[V] = {0};
    float onehot_grad[V] = {0};
    onehot_data[2] = 1.0f;
    ag_tensor onehot = ag_tensor_wrap(onehot_data, onehot_grad, 2, (int[]){1, V}, true);
    ag_tensor *h = ag_entropy(&ctx, &onehot);
    ck_assert_float_eq(h->data[0], 0.0f);
    ck_assert_int_eq(ag_backward(&ctx, h), CM_OK);
    for (int v = 0; v < V; v++) ck_assert(isfinite(onehot_grad[v]));
    ck_assert_double_eq_tol(onehot_grad[2], -1.0, 1e-6); /* -(log 1 + 1) */
    gc_tensor_free(z);
    ag_ctx_free(&ctx);
}
END_TEST

/* ---- the += rule --------------------------------------------------------- */

/* Two forward/backward rounds without zeroing must give twice the gradient
 * of one: every backward adds into its inputs' gradients. */
START_TEST(test_gradients_accumulate) {
    const int32_t targets[5] = {3, IGNORE, 0, 6, 1};
    cross_entropy_case c = {targets, IGNORE};
    const struct {
        const char *name;
        gc_forward_fn forward;
        void *user;
        float low;
    } cases[] = {{"sum", forward_sum, NULL, -2.0f},
                 {"mean", forward_mean, NULL, -2.0f},
                 {"softmax", forward_softmax, NULL, -2.0f},
                 {"log_softmax", forward_log_softmax, NULL, -2.0f},
                 {"cross_entropy", forward_cross_entropy, &c, -2.0f},
                 {"kl_div", forward_kl_raw, NULL, -2.0f},
                 {"entropy", forward_entropy, NULL, 0.05f}};
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        ag_tensor *in[2] = {gc_tensor_new(2, (int[]){5, 7}, cases[k].low, 1.0f, 70 + k, true),
                            gc_tensor_new(2, (int[]){5, 7}, cases[k].low, 1.0f, 80 + k, true)};
        float once[2][35];
        for (int round = 0; round < 2; round++) {
            ag_ctx_reset(&ctx);
            ag_tensor *y = cases[k].forward(&ctx, in, cases[k].user);
            float *dout = ag_alloc_floats(&ctx, y->numel, "test");
            for (int64_t i = 0; i < y->numel; i++) dout[i] = 0.5f + 0.01f * (float)i;
            ck_assert_int_eq(ag_backward_from(&ctx, y, dout), CM_OK);
            if (round == 0)
                for (int t = 0; t < 2; t++) memcpy(once[t], in[t]->grad, sizeof once[t]);
        }
        for (int t = 0; t < 2; t++)
            for (int i = 0; i < 35; i++)
                ck_assert_msg(fabsf(in[t]->grad[i] - 2.0f * once[t][i]) <=
                                  1e-6f * (1.0f + fabsf(once[t][i])),
                              "%s input %d element %d: %g after two rounds, %g after one",
                              cases[k].name, t, i, in[t]->grad[i], once[t][i]);
        gc_tensor_free(in[0]);
        gc_tensor_free(in[1]);
    }
    ag_ctx_free(&ctx);
}
END_TEST

int main(void) {
    Suite *suite = suite_create("ops_reduce");
    TCase *tc = tcase_create("reduce");
    tcase_add_test(tc, test_sum_mean_grad);
    tcase_add_test(tc, test_sum_mean_values);
    tcase_add_test(tc, test_softmax_grad);
    tcase_add_test(tc, test_log_softmax_grad);
    tcase_add_test(tc, test_softmax_values);
    tcase_add_test(tc, test_cross_entropy_grad);
    tcase_add_test(tc, test_cross_entropy_backward_values);
    tcase_add_test(tc, test_cross_entropy_values);
    tcase_add_test(tc, test_cross_entropy_all_ignored);
    tcase_add_test_raise_signal(tc, test_cross_entropy_bad_target, SIGABRT);
    tcase_add_test(tc, test_kl_div_grad);
    tcase_add_test(tc, test_kl_div_values);
    tcase_add_test(tc, test_entropy_grad);
    tcase_add_test(tc, test_entropy_values);
    tcase_add_test(tc, test_gradients_accumulate);
    suite_add_tcase(suite, tc);
    SRunner *runner = srunner_create(suite);
    srunner_run_all(runner, CK_NORMAL);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
