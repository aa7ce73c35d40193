/* Tests for the non-convolution ops of ops_conv.c: batchnorm2d (training and
 * eval; gradient checks w.r.t. x, gamma, beta; batchnorm statistics and
 * PyTorch's running-statistics update), max / average / global average
 * pooling (maxpool ties and padding), gather_channels and mul_channels (both
 * inputs), and an MoE-conv shaped composition of them; forward values against
 * double-precision nested loops and the += rule (two backward passes give
 * twice one pass's gradient) for every op. The convolutions are in
 * test_ops_conv.c. */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "autograd/ops_conv.h"
#include "conv_testutil.h"
#include "gradcheck.h"

enum { ARENA_BYTES = 8 << 20 };

/* ---- batchnorm2d -------------------------------------------------------------- */

typedef struct batchnorm_case {
    bool training;
    float *running_mean, *running_var; /* [C] or NULL */
    float momentum, eps;
} batchnorm_case;

static ag_tensor *forward_batchnorm(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    batchnorm_case *c = user;
    return ag_batchnorm2d(ctx, in[0], in[1], in[2], c->running_mean, c->running_var, c->training,
                          c->momentum, c->eps);
}

enum { BN_N = 2, BN_C = 3, BN_H = 5, BN_W = 5 };

static void make_batchnorm_inputs(ag_tensor *in[3], uint64_t seed) {
    in[0] = gc_tensor_new(4, (int[]){BN_N, BN_C, BN_H, BN_W}, -2.0f, 2.0f, seed, true);
    in[1] = gc_tensor_new(1, (int[]){BN_C}, 0.5f, 1.5f, seed + 1, true);
    in[2] = gc_tensor_new(1, (int[]){BN_C}, -0.5f, 0.5f, seed + 2, true);
}

/* Per-channel mean and biased variance of x [N,C,H,W] in double. */
static void reference_statistics(const ag_tensor *x, double *mean, double *variance) {
    int batch = x->shape[0], channels = x->shape[1], plane = x->shape[2] * x->shape[3];
    for (int c = 0; c < channels; c++) {
        double total = 0.0, squares = 0.0;
        for (int n = 0; n < batch; n++)
            for (int p = 0; p < plane; p++) total += x->data[(n * channels + c) * plane + p];
        mean[c] = total / (batch * plane);
        for (int n = 0; n < batch; n++)
            for (int p = 0; p < plane; p++) {
                double centred = x->data[(n * channels + c) * plane + p] - mean[c];
                squares += centred * centred;
            }
        variance[c] = squares / (batch * plane);
    }
}

START_TEST(test_batchnorm_grad_training) {
    ag_tensor *in[3];
    make_batchnorm_inputs(in, 500);
    float running_mean[BN_C] = {0}, running_var[BN_C] = {1, 1, 1};
    batchnorm_case tracked = {true, running_mean, running_var, 0.1f, 1e-5f};
    batchnorm_case untracked = {true, NULL, NULL, 0.1f, 1e-5f};
    expect_gradcheck("batchnorm2d training", forward_batchnorm, in, 3, &tracked, 150 + 3 + 3);
    expect_gradcheck("batchnorm2d training untracked", forward_batchnorm, in, 3, &untracked,
                     150 + 3 + 3);
    for (int only = 0; only < 3; only++) {
        for (int i = 0; i < 3; i++) in[i]->requires_grad = i == only;
        expect_gradcheck("batchnorm2d training one input", forward_batchnorm, in, 3, &untracked,
                         in[only]->numel);
    }
    free_inputs(in, 3);
}
END_TEST

START_TEST(test_batchnorm_grad_eval) {
    ag_tensor *in[3];
    make_batchnorm_inputs(in, 600);
    float running_mean[BN_C] = {0.3f, -0.2f, 0.1f}, running_var[BN_C] = {0.5f, 1.7f, 0.9f};
    batchnorm_case eval = {false, running_mean, running_var, 0.1f, 1e-5f};
    expect_gradcheck("batchnorm2d eval", forward_batchnorm, in, 3, &eval, 150 + 3 + 3);
    in[1]->requires_grad = in[2]->requires_grad = false; /* as in an attack on the input */
    expect_gradcheck("batchnorm2d eval x only", forward_batchnorm, in, 3, &eval, 150);
    free_inputs(in, 3);
}
END_TEST

START_TEST(test_batchnorm_values) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    ag_tensor *in[3];
    make_batchnorm_inputs(in, 700);
    /* Channels with different offsets and spreads. */
    for (int n = 0; n < BN_N; n++)
        for (int c = 0; c < BN_C; c++)
            for (int p = 0; p < BN_H * BN_W; p++)
                in[0]->data[(n * BN_C + c) * BN_H * BN_W + p] =
                    in[0]->data[(n * BN_C + c) * BN_H * BN_W + p] * (1.0f + c) + 3.0f * c;
    double mean[BN_C], variance[BN_C];
    reference_statistics(in[0], mean, variance);
    const float momentum = 0.1f, eps = 1e-5f;
    const float start_mean[BN_C] = {0.5f, -1.0f, 2.0f}, start_var[BN_C] = {2.0f, 0.5f, 1.0f};
    float running_mean[BN_C], running_var[BN_C];
    memcpy(running_mean, start_mean, sizeof running_mean);
    memcpy(running_var, start_var, sizeof running_var);
    batchnorm_case training = {true, running_mean, running_var, momentum, eps};

    /* Training, gamma = 1, beta = 0: every channel has mean 0 and biased
     * variance var / (var + eps), i.e. 1 to within eps / var. */
    for (int c = 0; c < BN_C; c++) in[1]->data[c] = 1.0f, in[2]->data[c] = 0.0f;
    ag_tensor *y = forward_batchnorm(&ctx, in, &training);
    ck_assert_ptr_nonnull(y);
    ck_assert(ag_same_shape(y, in[0]));
    double y_mean[BN_C], y_variance[BN_C];
    reference_statistics(y, y_mean, y_variance);
    for (int c = 0; c < BN_C; c++) {
        ck_assert_double_eq_tol(y_mean[c], 0.0, 1e-5);
        ck_assert_double_eq_tol(y_variance[c], 1.0, 1e-4);
    }

    /* PyTorch's update: r = (1 - m) r + m s, with the unbiased variance. */
    int count = BN_N * BN_H * BN_W;
    double want_mean[BN_C], want_var[BN_C];
    for (int c = 0; c < BN_C; c++) {
        want_mean[c] = (1.0 - momentum) * start_mean[c] + momentum * mean[c];
        want_var[c] =
            (1.0 - momentum) * start_var[c] + momentum * variance[c] * count / (count - 1);
    }
    expect_close("running_mean", running_mean, want_mean, BN_C, 1e-6);
    expect_close("running_var", running_var, want_var, BN_C, 1e-6);
    /* A second step compounds from the updated values. */
    y = forward_batchnorm(&ctx, in, &training);
    for (int c = 0; c < BN_C; c++) {
        want_mean[c] = (1.0 - momentum) * want_mean[c] + momentum * mean[c];
        want_var[c] = (1.0 - momentum) * want_var[c] + momentum * variance[c] * count / (count - 1);
    }
    expect_close("running_mean step 2", running_mean, want_mean, BN_C, 1e-6);
    expect_close("running_var step 2", running_var, want_var, BN_C, 1e-6);

    /* Training with gamma and beta against the reference formula. */
    for (int c = 0; c < BN_C; c++) in[1]->data[c] = 0.5f + c, in[2]->data[c] = 0.25f * c - 0.3f;
    batchnorm_case untracked = {true, NULL, NULL, momentum, eps};
    y = forward_batchnorm(&ctx, in, &untracked);
    double *want = malloc((size_t)in[0]->numel * sizeof(double));
    for (int64_t i = 0; i < in[0]->numel; i++) {
        int c = (int)(i / (BN_H * BN_W) % BN_C);
        want[i] =
            (in[0]->data[i] - mean[c]) / sqrt(variance[c] + eps) * in[1]->data[c] + in[2]->data[c];
    }
    expect_close("batchnorm2d training", y->data, want, y->numel, 1e-5);

    /* Eval uses the running statistics and leaves them alone. */
    float frozen_mean[BN_C], frozen_var[BN_C];
    memcpy(frozen_mean, running_mean, sizeof frozen_mean);
    memcpy(frozen_var, running_var, sizeof frozen_var);
    batchnorm_case eval = {false, running_mean, running_var, momentum, eps};
    y = forward_batchnorm(&ctx, in, &eval);
    for (int64_t i = 0; i < in[0]->numel; i++) {
        int c = (int)(i / (BN_H * BN_W) % BN_C);
        want[i] = (in[0]->data[i] - (double)frozen_mean[c]) / sqrt((double)frozen_var[c] + eps) *
                      in[1]->data[c] +
                  in[2]->data[c];
    }
    expect_close("batchnorm2d eval", y->data, want, y->numel, 1e-5);
    ck_assert_mem_eq(running_mean, frozen_mean, sizeof frozen_mean);
    ck_assert_mem_eq(running_var, frozen_var, sizeof frozen_var);
    free(want);
    free_inputs(in, 3);
    ag_ctx_free(&ctx);
}
END_TEST

START_TEST(test_batchnorm_accumulates) {
    ag_tensor *in[3];
    make_batchnorm_inputs(in, 800);
    float running_mean[BN_C] = {0.3f, -0.2f, 0.1f}, running_var[BN_C] = {0.5f, 1.7f, 0.9f};
    batchnorm_case training = {true, NULL, NULL, 0.1f, 1e-5f};
    batchnorm_case eval = {false, running_mean, running_var, 0.1f, 1e-5f};
    expect_accumulates("batchnorm2d training", forward_batchnorm, in, 3, &training);
    expect_accumulates("batchnorm2d eval", forward_batchnorm, in, 3, &eval);
    free_inputs(in, 3);
}
END_TEST

/* ---- pooling ------------------------------------------------------------------- */

typedef struct pool_case {
    int n, c, h, w, kernel, stride, padding;
    bool max; /* maxpool, else avgpool */
} pool_case;

static ag_tensor *forward_pool(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    const pool_case *c = user;
    return c->max ? ag_maxpool2d(ctx, in[0], c->kernel, c->stride, c->padding)
                  : ag_avgpool2d(ctx, in[0], c->kernel, c->stride, c->padding);
}

static const pool_case pool_cases[] = {{2, 3, 5, 5, 3, 2, 1, true},  {2, 3, 7, 5, 2, 2, 0, true},
                                       {2, 3, 5, 7, 3, 1, 1, true},  {2, 3, 5, 5, 1, 2, 0, true},
                                       {2, 3, 5, 5, 3, 2, 1, false}, {2, 3, 7, 5, 2, 2, 0, false},
                                       {2, 3, 5, 7, 3, 1, 1, false}};
enum { N_POOL_CASES = sizeof pool_cases / sizeof pool_cases[0] };

/* x with all values distinct and 0.1 apart in shuffled order, so no window
 * has a tie and a +-2 eps nudge never changes a window's maximum. */
static ag_tensor *make_pool_input(const pool_case *c, uint64_t seed) {
    ag_tensor *x = gc_tensor_new(4, (int[]){c->n, c->c, c->h, c->w}, 0.0f, 1.0f, seed, true);
    int32_t *order = malloc((size_t)x->numel * sizeof(int32_t));
    cm_rng_permutation((cm_rng_key){seed, 0, 0, CM_RNG_TEST}, (int32_t)x->numel, order);
    for (int64_t i = 0; i < x->numel; i++) x->data[i] = 0.1f * (float)order[i] - 5.0f;
    free(order);
    return x;
}

/* Pooling in double; padding never wins a max and counts as 0 in a mean. */
static double *pool_reference(const pool_case *c, const ag_tensor *x, int *ho, int *wo) {
    *ho = (c->h + 2 * c->padding - c->kernel) / c->stride + 1;
    *wo = (c->w + 2 * c->padding - c->kernel) / c->stride + 1;
    double *out = malloc((size_t)c->n * c->c * *ho * *wo * sizeof(double));
    for (int q = 0; q < c->n * c->c; q++)
        for (int oh = 0; oh < *ho; oh++)
            for (int ow = 0; ow < *wo; ow++) {
                double best = -INFINITY, total = 0.0;
                for (int i = 0; i < c->kernel; i++)
                    for (int j = 0; j < c->kernel; j++) {
                        int ih = oh * c->stride - c->padding + i;
                        int iw = ow * c->stride - c->padding + j;
                        if (ih < 0 || ih >= c->h || iw < 0 || iw >= c->w) continue;
                        double v = x->data[(q * c->h + ih) * c->w + iw];
                        best = fmax(best, v);
                        total += v;
                    }
                out[(q * *ho + oh) * *wo + ow] = c->max ? best : total / (c->kernel * c->kernel);
            }
    return out;
}

START_TEST(test_pool_values) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    for (int k = 0; k < N_POOL_CASES; k++) {
        const pool_case *c = &pool_cases[k];
        ag_tensor *x =
            gc_tensor_new(4, (int[]){c->n, c->c, c->h, c->w}, -2.0f, 1.0f, 900 + k, false);
        ag_ctx_reset(&ctx);
        ag_tensor *y = forward_pool(&ctx, &x, (void *)c);
        int ho, wo;
        double *want = pool_reference(c, x, &ho, &wo);
        ck_assert(y->shape[0] == c->n && y->shape[1] == c->c && y->shape[2] == ho &&
                  y->shape[3] == wo);
        expect_close(c->max ? "maxpool2d" : "avgpool2d", y->data, want, y->numel, 1e-6);
        free(want);
        gc_tensor_free(x);
    }
    ag_ctx_free(&ctx);
}
END_TEST

START_TEST(test_pool_grad) {
    for (int k = 0; k < N_POOL_CASES; k++) {
        const pool_case *c = &pool_cases[k];
        ag_tensor *x = make_pool_input(c, 1000 + k);
        expect_gradcheck(c->max ? "maxpool2d" : "avgpool2d", forward_pool, &x, 1, (void *)c,
                         checks_for(x));
        gc_tensor_free(x);
    }
}
END_TEST

START_TEST(test_pool_accumulates) {
    for (int k = 0; k < N_POOL_CASES; k++) {
        const pool_case *c = &pool_cases[k];
        ag_tensor *x = make_pool_input(c, 1100 + k);
        expect_accumulates(c->max ? "maxpool2d" : "avgpool2d", forward_pool, &x, 1, (void *)c);
        gc_tensor_free(x);
    }
}
END_TEST

/* dx of maxpool2d(x) for x [1,1,h,w] with dy = 1 everywhere. */
static void maxpool_input_grad(ag_ctx *ctx, float *x_data, int h, int w, int kernel, int stride,
                               int padding, float *dx, float *y_out) {
    ag_ctx_reset(ctx);
    memset(dx, 0, (size_t)h * w * sizeof(float));
    ag_tensor x = ag_tensor_wrap(x_data, dx, 4, (int[]){1, 1, h, w}, true);
    ag_tensor *y = ag_maxpool2d(ctx, &x, kernel, stride, padding);
    ck_assert_ptr_nonnull(y);
    memcpy(y_out, y->data, (size_t)y->numel * sizeof(float));
    float *ones = malloc((size_t)y->numel * sizeof(float));
    for (int64_t i = 0; i < y->numel; i++) ones[i] = 1.0f;
    ck_assert_int_eq(ag_backward_from(ctx, y, ones), CM_OK);
    free(ones);
}

START_TEST(test_maxpool_ties_and_padding) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    float dx[16], y[16];

    /* Constant 4x4, 2x2 windows: each window's gradient goes to its first
     * (top-left) element, as PyTorch. */
    float flat[16];
    for (int i = 0; i < 16; i++) flat[i] = 1.5f;
    maxpool_input_grad(&ctx, flat, 4, 4, 2, 2, 0, dx, y);
    for (int i = 0; i < 16; i++) {
        int row = i / 4, col = i % 4;
        ck_assert_float_eq(dx[i], row % 2 == 0 && col % 2 == 0 ? 1.0f : 0.0f);
    }
    for (int i = 0; i < 4; i++) ck_assert_float_eq(y[i], 1.5f);

    /* Constant 3x3, kernel 3, stride 1, padding 1: the first valid element of
     * each clipped window wins; window tops/lefts -1,0,1 pick rows/cols
     * 0,0,1, so (0,0) wins 4 windows, (0,1) and (1,0) two, (1,1) one. */
    float constant[9];
    for (int i = 0; i < 9; i++) constant[i] = 2.0f;
    maxpool_input_grad(&ctx, constant, 3, 3, 3, 1, 1, dx, y);
    const float want_ties[9] = {4, 2, 0, 2, 1, 0, 0, 0, 0};
    for (int i = 0; i < 9; i++) ck_assert_float_eq(dx[i], want_ties[i]);

    /* All-negative input with padding: padding is not a zero candidate, so
     * every output is a (negative) input value and the gradient (9 in all)
     * lands on input positions. */
    float negative[9] = {-9, -8, -7, -6, -5, -4, -3, -2, -1};
    maxpool_input_grad(&ctx, negative, 3, 3, 3, 1, 1, dx, y);
    const float want_y[9] = {-5, -4, -4, -2, -1, -1, -2, -1, -1};
    const float want_dx[9] = {0, 0, 0, 0, 1, 2, 0, 2, 4};
    for (int i = 0; i < 9; i++) {
        ck_assert_float_eq(y[i], want_y[i]);
        ck_assert_float_eq(dx[i], want_dx[i]);
    }

    /* A tie between a later and an earlier element with different values in
     * between: the earlier one keeps the gradient. */
    float tie[4] = {0.5f, 3.0f, 1.0f, 3.0f};
    maxpool_input_grad(&ctx, tie, 2, 2, 2, 1, 0, dx, y);
    ck_assert_float_eq(y[0], 3.0f);
    ck_assert_float_eq(dx[1], 1.0f);
    ck_assert_float_eq(dx[3], 0.0f);
    ag_ctx_free(&ctx);
}
END_TEST

static ag_tensor *forward_global_avgpool(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    (void)user;
    return ag_global_avgpool(ctx, in[0]);
}

START_TEST(test_global_avgpool) {
    ag_tensor *x = gc_tensor_new(4, (int[]){2, 3, 5, 7}, -1.0f, 1.0f, 1200, true);
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    ag_tensor *y = ag_global_avgpool(&ctx, x);
    ck_assert(y->ndim == 2 && y->shape[0] == 2 && y->shape[1] == 3);
    double want[6];
    for (int q = 0; q < 6; q++) {
        double total = 0.0;
        for (int p = 0; p < 35; p++) total += x->data[q * 35 + p];
        want[q] = total / 35.0;
    }
    expect_close("global_avgpool", y->data, want, 6, 1e-6);
    ag_ctx_free(&ctx);
    expect_gradcheck("global_avgpool", forward_global_avgpool, &x, 1, NULL, x->numel);
    expect_accumulates("global_avgpool", forward_global_avgpool, &x, 1, NULL);
    gc_tensor_free(x);
}
END_TEST

/* ---- channel gather and channel scaling ------------------------------------------- */

enum { CH_N = 2, CH_C = 5, CH_H = 3, CH_W = 5, CH_K = 3 };
/* Sample 0 keeps channels 4, 1, 4 (a repeat: its gradient must add twice);
 * sample 1 keeps 0, 2, 3. */
static const int32_t gather_index[CH_N * CH_K] = {4, 1, 4, 0, 2, 3};

static ag_tensor *forward_gather_channels(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    return ag_gather_channels(ctx, in[0], user, CH_K);
}

START_TEST(test_gather_channels) {
    ag_tensor *x = gc_tensor_new(4, (int[]){CH_N, CH_C, CH_H, CH_W}, -1.0f, 1.0f, 1300, true);
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    int32_t index[CH_N * CH_K];
    memcpy(index, gather_index, sizeof index);
    ag_tensor *y = ag_gather_channels(&ctx, x, index, CH_K);
    ck_assert(y->ndim == 4 && y->shape[0] == CH_N && y->shape[1] == CH_K && y->shape[2] == CH_H &&
              y->shape[3] == CH_W);
    const int plane = CH_H * CH_W;
    for (int n = 0; n < CH_N; n++)
        for (int k = 0; k < CH_K; k++)
            for (int p = 0; p < plane; p++)
                ck_assert_float_eq(y->data[(n * CH_K + k) * plane + p],
                                   x->data[(n * CH_C + index[n * CH_K + k]) * plane + p]);
    /* The op keeps its own copy: changing the caller's array before backward
     * does not move the gradient. dy = 1 gives each channel its use count. */
    for (int i = 0; i < CH_N * CH_K; i++) index[i] = 0;
    float ones[CH_N * CH_K * CH_H * CH_W];
    for (int i = 0; i < CH_N * CH_K * plane; i++) ones[i] = 1.0f;
    memset(x->grad, 0, (size_t)x->numel * sizeof(float));
    ck_assert_int_eq(ag_backward_from(&ctx, y, ones), CM_OK);
    const float uses[CH_N][CH_C] = {{0, 1, 0, 0, 2}, {1, 0, 1, 1, 0}};
    for (int n = 0; n < CH_N; n++)
        for (int c = 0; c < CH_C; c++)
            for (int p = 0; p < plane; p++)
                ck_assert_float_eq(x->grad[(n * CH_C + c) * plane + p], uses[n][c]);
    ag_ctx_free(&ctx);
    expect_gradcheck("gather_channels", forward_gather_channels, &x, 1, (void *)gather_index,
                     x->numel);
    expect_accumulates("gather_channels", forward_gather_channels, &x, 1, (void *)gather_index);
    gc_tensor_free(x);
}
END_TEST

static ag_tensor *forward_mul_channels(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    (void)user;
    return ag_mul_channels(ctx, in[0], in[1]);
}

START_TEST(test_mul_channels) {
    ag_tensor *in[2] = {gc_tensor_new(4, (int[]){CH_N, CH_C, CH_H, CH_W}, -1.0f, 1.0f, 1400, true),
                        gc_tensor_new(2, (int[]){CH_N, CH_C}, -1.5f, 1.5f, 1401, true)};
    in[1]->data[2] = 0.0f; /* a switched-off channel still gets d/dscale */
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    ag_tensor *y = ag_mul_channels(&ctx, in[0], in[1]);
    ck_assert(ag_same_shape(y, in[0]));
    const int plane = CH_H * CH_W;
    for (int64_t i = 0; i < y->numel; i++)
        ck_assert_float_eq(y->data[i], in[0]->data[i] * in[1]->data[i / plane]);
    ag_ctx_free(&ctx);
    expect_gradcheck("mul_channels", forward_mul_channels, in, 2, NULL, in[0]->numel + CH_N * CH_C);
    for (int only = 0; only < 2; only++) {
        for (int i = 0; i < 2; i++) in[i]->requires_grad = i == only;
        expect_gradcheck("mul_channels one input", forward_mul_channels, in, 2, NULL,
                         in[only]->numel);
    }
    in[0]->requires_grad = in[1]->requires_grad = true;
    expect_accumulates("mul_channels", forward_mul_channels, in, 2, NULL);
    free_inputs(in, 2);
}
END_TEST

/* ---- an MoE-conv shaped composition ---------------------------------------------- */

typedef struct moe_conv_case {
    const int32_t *index; /* [N*K] */
} moe_conv_case;

/* conv (all experts' filters) -> batchnorm -> gather one group per sample ->
 * scale by gates -> maxpool -> global average: every op's backward in one
 * chain, so a wrong layout between ops shows up. */
static ag_tensor *forward_moe_conv(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    const moe_conv_case *c = user;
    ag_tensor *y = ag_conv2d(ctx, in[0], in[1], in[2], 1, 1);
    y = ag_batchnorm2d(ctx, y, in[3], in[4], NULL, NULL, true, 0.1f, 1e-5f);
    y = ag_gather_channels(ctx, y, c->index, 2);
    y = ag_mul_channels(ctx, y, in[5]);
    y = ag_avgpool2d(ctx, y, 3, 2, 1);
    return ag_global_avgpool(ctx, y);
}

START_TEST(test_moe_conv_chain_grad) {
    /* 4 output channels = 2 experts of 2 channels; sample 0 takes expert 1,
     * sample 1 expert 0. */
    static const int32_t index[4] = {2, 3, 0, 1};
    moe_conv_case c = {index};
    ag_tensor *in[6] = {gc_tensor_new(4, (int[]){2, 3, 5, 5}, -1.0f, 1.0f, 1500, true),
                        gc_tensor_new(4, (int[]){4, 3, 3, 3}, -0.5f, 0.5f, 1501, true),
                        gc_tensor_new(1, (int[]){4}, -0.5f, 0.5f, 1502, true),
                        gc_tensor_new(1, (int[]){4}, 0.5f, 1.5f, 1503, true),
                        gc_tensor_new(1, (int[]){4}, -0.5f, 0.5f, 1504, true),
                        gc_tensor_new(2, (int[]){2, 2}, 0.2f, 1.0f, 1505, true)};
    in[2]->requires_grad = false; /* batchnorm cancels a conv bias exactly */
    expect_gradcheck("moe conv chain", forward_moe_conv, in, 6, &c, 150 + 108 + 4 + 4 + 4);
    free_inputs(in, 6);
}
END_TEST

int main(void) {
    Suite *suite = suite_create("ops_bn_pool");
    TCase *tc = tcase_create("bn_pool");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_batchnorm_grad_training);
    tcase_add_test(tc, test_batchnorm_grad_eval);
    tcase_add_test(tc, test_batchnorm_values);
    tcase_add_test(tc, test_batchnorm_accumulates);
    tcase_add_test(tc, test_pool_values);
    tcase_add_test(tc, test_pool_grad);
    tcase_add_test(tc, test_pool_accumulates);
    tcase_add_test(tc, test_maxpool_ties_and_padding);
    tcase_add_test(tc, test_global_avgpool);
    tcase_add_test(tc, test_gather_channels);
    tcase_add_test(tc, test_mul_channels);
    tcase_add_test(tc, test_moe_conv_chain_grad);
    suite_add_tcase(suite, tc);
    SRunner *runner = srunner_create(suite);
    srunner_run_all(runner, CK_NORMAL);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
