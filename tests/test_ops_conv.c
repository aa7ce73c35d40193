/* Tests for the convolutions of ops_conv.c: gradient checks of conv2d (x, w,
 * bias; pointwise and im2col paths, strides 1 and 2, padding 0 and 1, a
 * non-square kernel) and of conv2d_grouped (each image through its group's
 * filter slice); forward values against double-precision nested loops; the
 * grouped conv against per-group sliced convs; and the += rule (two backward
 * passes give twice one pass's gradient). Batch norm, pooling and the channel
 * ops are in test_ops_bn_pool.c. */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "autograd/ops_conv.h"
#include "conv_testutil.h"
#include "gradcheck.h"

enum { ARENA_BYTES = 8 << 20 };

/* ---- conv2d ------------------------------------------------------------------ */

typedef struct conv_case {
    int n, c, h, w, co, kh, kw, stride, padding;
    bool bias;
} conv_case;

static ag_tensor *forward_conv(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    const conv_case *c = user;
    return ag_conv2d(ctx, in[0], in[1], c->bias ? in[2] : NULL, c->stride, c->padding);
}

static const conv_case conv_cases[] = {
    {2, 3, 5, 5, 4, 1, 1, 1, 0, true},  /* pointwise fast path */
    {2, 3, 5, 7, 5, 1, 1, 2, 0, false}, /* 1x1 with stride: im2col path */
    {2, 3, 5, 5, 4, 3, 3, 1, 1, true},  /* "same" convolution */
    {2, 3, 7, 7, 5, 3, 3, 2, 0, true},  {2, 3, 7, 5, 3, 3, 3, 2, 1, false},
    {2, 3, 5, 7, 4, 3, 2, 1, 1, true}, /* non-square kernel, non-square input */
    {1, 2, 3, 3, 3, 3, 3, 1, 0, true}, /* 1x1 output */
};
enum { N_CONV_CASES = sizeof conv_cases / sizeof conv_cases[0] };

static void make_conv_inputs(const conv_case *c, ag_tensor *in[3], uint64_t seed) {
    in[0] = gc_tensor_new(4, (int[]){c->n, c->c, c->h, c->w}, -1.0f, 1.0f, seed, true);
    in[1] = gc_tensor_new(4, (int[]){c->co, c->c, c->kh, c->kw}, -0.5f, 0.5f, seed + 1, true);
    in[2] = gc_tensor_new(1, &c->co, -0.5f, 0.5f, seed + 2, c->bias);
}

/* Straightforward convolution in double: out [N,CO,HO,WO]. */
static double *conv_reference(const conv_case *c, const ag_tensor *x, const ag_tensor *w,
                              const ag_tensor *bias, int *ho, int *wo) {
    *ho = (c->h + 2 * c->padding - c->kh) / c->stride + 1;
    *wo = (c->w + 2 * c->padding - c->kw) / c->stride + 1;
    double *out = calloc((size_t)c->n * c->co * *ho * *wo, sizeof(double));
    for (int n = 0; n < c->n; n++)
        for (int o = 0; o < c->co; o++)
            for (int oh = 0; oh < *ho; oh++)
                for (int ow = 0; ow < *wo; ow++) {
                    double total = c->bias ? bias->data[o] : 0.0;
                    for (int ci = 0; ci < c->c; ci++)
                        for (int i = 0; i < c->kh; i++)
                            for (int j = 0; j < c->kw; j++) {
                                int ih = oh * c->stride - c->padding + i;
                                int iw = ow * c->stride - c->padding + j;
                                if (ih < 0 || ih >= c->h || iw < 0 || iw >= c->w) continue;
                                total +=
                                    (double)x->data[((n * c->c + ci) * c->h + ih) * c->w + iw] *
                                    w->data[((o * c->c + ci) * c->kh + i) * c->kw + j];
                            }
                    out[((n * c->co + o) * *ho + oh) * *wo + ow] = total;
                }
    return out;
}

START_TEST(test_conv2d_values) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    const conv_case bigger = {3, 4, 9, 11, 6, 3, 3, 2, 1, true};
    for (int k = 0; k <= N_CONV_CASES; k++) {
        const conv_case *c = k < N_CONV_CASES ? &conv_cases[k] : &bigger;
        ag_tensor *in[3];
        make_conv_inputs(c, in, 100 + 10 * k);
        ag_ctx_reset(&ctx);
        ag_tensor *y = forward_conv(&ctx, in, (void *)c);
        ck_assert_ptr_nonnull(y);
        int ho, wo;
        double *want = conv_reference(c, in[0], in[1], in[2], &ho, &wo);
        ck_assert_int_eq(y->ndim, 4);
        ck_assert(y->shape[0] == c->n && y->shape[1] == c->co && y->shape[2] == ho &&
                  y->shape[3] == wo);
        expect_close("conv2d", y->data, want, y->numel, 1e-5);
        free(want);
        free_inputs(in, 3);
    }
    ag_ctx_free(&ctx);
}
END_TEST

START_TEST(test_conv2d_grad) {
    for (int k = 0; k < N_CONV_CASES; k++) {
        const conv_case *c = &conv_cases[k];
        ag_tensor *in[3];
        make_conv_inputs(c, in, 200 + 10 * k);
        int64_t expected = checks_for(in[0]) + checks_for(in[1]) + (c->bias ? c->co : 0);
        expect_gradcheck("conv2d", forward_conv, in, 3, (void *)c, expected);
        free_inputs(in, 3);
    }
}
END_TEST

/* Each input alone: the input-only case is the adversarial attack's. */
START_TEST(test_conv2d_grad_one_input) {
    const int picks[2] = {0, 2}; /* pointwise and im2col paths */
    for (int p = 0; p < 2; p++) {
        const conv_case *c = &conv_cases[picks[p]];
        ag_tensor *in[3];
        make_conv_inputs(c, in, 300 + p);
        for (int only = 0; only < 3; only++) {
            for (int i = 0; i < 3; i++) in[i]->requires_grad = i == only;
            expect_gradcheck("conv2d one input", forward_conv, in, 3, (void *)c,
                             checks_for(in[only]));
        }
        free_inputs(in, 3);
    }
}
END_TEST

/* ---- conv2d_grouped: each image through its group's filter slice ------------ */

typedef struct grouped_case {
    conv_case conv; /* co = filters per group */
    int groups;
    const int32_t *group; /* [n] */
} grouped_case;

static ag_tensor *forward_grouped(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    const grouped_case *g = user;
    return ag_conv2d_grouped(ctx, in[0], in[1], g->groups, g->group, g->conv.stride,
                             g->conv.padding);
}

static const int32_t small_groups[3] = {2, 0, 2}; /* group 1 unused */

static void make_grouped_inputs(const grouped_case *g, ag_tensor *in[2], uint64_t seed) {
    const conv_case *c = &g->conv;
    in[0] = gc_tensor_new(4, (int[]){c->n, c->c, c->h, c->w}, -1.0f, 1.0f, seed, true);
    in[1] = gc_tensor_new(4, (int[]){g->groups * c->co, c->c, c->kh, c->kw}, -0.5f, 0.5f, seed + 1,
                          true);
}

START_TEST(test_conv2d_grouped_values_and_grad) {
    const grouped_case cases[2] = {{{3, 2, 5, 5, 2, 3, 3, 1, 1, false}, 3, small_groups},
                                   {{3, 2, 6, 6, 2, 3, 3, 2, 0, false}, 3, small_groups}};
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    for (int k = 0; k < 2; k++) {
        const grouped_case *g = &cases[k];
        const conv_case *c = &g->conv;
        ag_tensor *in[2];
        make_grouped_inputs(g, in, 700 + 10 * k);
        ag_ctx_reset(&ctx);
        ag_tensor *y = forward_grouped(&ctx, in, (void *)g);
        ck_assert_ptr_nonnull(y);
        /* image n against the reference conv with its group's filters */
        const int64_t w_group = (int64_t)c->co * c->c * c->kh * c->kw;
        for (int n = 0; n < c->n; n++) {
            conv_case one = *c;
            one.n = 1;
            ag_tensor x1 = *in[0], w1 = *in[1];
            x1.data = in[0]->data + (int64_t)n * c->c * c->h * c->w;
            w1.data = in[1]->data + g->group[n] * w_group;
            int ho, wo;
            double *want = conv_reference(&one, &x1, &w1, NULL, &ho, &wo);
            const int64_t plane = (int64_t)c->co * ho * wo;
            ck_assert(y->shape[0] == c->n && y->shape[1] == c->co && y->shape[2] == ho);
            expect_close("conv2d_grouped", y->data + n * plane, want, plane, 1e-5);
            free(want);
        }
        expect_gradcheck("conv2d_grouped", forward_grouped, in, 2, (void *)g,
                         checks_for(in[0]) + checks_for(in[1]));
        /* the unused group's filters get no gradient */
        for (int64_t i = 0; i < w_group; i++) ck_assert(in[1]->grad[w_group + i] == 0.0f);
        expect_accumulates("conv2d_grouped", forward_grouped, in, 2, (void *)g);
        free_inputs(in, 2);
    }
    ag_ctx_free(&ctx);
}
END_TEST

/* Large enough for the pool to split the images (per-task partial weight
 * gradients): equal to ag_conv2d of each group's slice on that group's
 * images, gathered, to float rounding. */
START_TEST(test_conv2d_grouped_matches_sliced_convs) {
    enum { N = 8, C = 16, H = 16, CO = 16, G = 2 };
    const int32_t group[N] = {1, 0, 0, 1, 1, 1, 0, 1};
    const grouped_case g = {{N, C, H, H, CO, 3, 3, 1, 1, false}, G, group};
    ag_tensor *in[2];
    make_grouped_inputs(&g, in, 800);
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, 64 << 20), CM_OK);
    float *dy = malloc(sizeof(float) * N * CO * H * H);
    for (int i = 0; i < N * CO * H * H; i++) dy[i] = (float)((i * 13) % 17) / 17.0f - 0.5f;
    ag_tensor *y = forward_grouped(&ctx, in, (void *)&g);
    ck_assert_ptr_nonnull(y);
    ck_assert_int_eq(ag_backward_from(&ctx, y, dy), CM_OK);
    float *y_grouped = malloc(sizeof(float) * (size_t)y->numel);
    memcpy(y_grouped, y->data, sizeof(float) * (size_t)y->numel);
    float *dx = malloc(sizeof(float) * (size_t)in[0]->numel);
    float *dw = malloc(sizeof(float) * (size_t)in[1]->numel);
    memcpy(dx, in[0]->grad, sizeof(float) * (size_t)in[0]->numel);
    memcpy(dw, in[1]->grad, sizeof(float) * (size_t)in[1]->numel);

    memset(in[0]->grad, 0, sizeof(float) * (size_t)in[0]->numel);
    memset(in[1]->grad, 0, sizeof(float) * (size_t)in[1]->numel);
    ag_ctx_reset(&ctx);
    const int64_t out_plane = (int64_t)CO * H * H;
    for (int e = 0; e < G; e++) {
        int32_t rows[N];
        int count = 0;
        for (int n = 0; n < N; n++)
            if (group[n] == e) rows[count++] = n;
        ag_tensor *part = ag_conv2d(&ctx, ag_gather_rows(&ctx, in[0], rows, count),
                                    ag_slice(&ctx, in[1], 0, e * CO, CO), NULL, 1, 1);
        ck_assert_ptr_nonnull(part);
        float *part_dy = malloc(sizeof(float) * (size_t)part->numel);
        for (int i = 0; i < count; i++) {
            for (int64_t p = 0; p < out_plane; p++)
                ck_assert_msg(fabsf(part->data[i * out_plane + p] -
                                    y_grouped[rows[i] * out_plane + p]) <= 1e-4f,
                              "image %d output %lld", rows[i], (long long)p);
            memcpy(part_dy + i * out_plane, dy + rows[i] * out_plane, sizeof(float) * out_plane);
        }
        ck_assert_int_eq(ag_backward_from(&ctx, part, part_dy), CM_OK);
        free(part_dy);
    }
    for (int64_t i = 0; i < in[0]->numel; i++)
        ck_assert_msg(fabsf(dx[i] - in[0]->grad[i]) <= 1e-4f * (1.0f + fabsf(dx[i])), "dx %lld",
                      (long long)i);
    for (int64_t i = 0; i < in[1]->numel; i++)
        ck_assert_msg(fabsf(dw[i] - in[1]->grad[i]) <= 1e-4f * (1.0f + fabsf(dw[i])),
                      "dw %lld: %g vs %g", (long long)i, dw[i], in[1]->grad[i]);
    free(dy);
    free(y_grouped);
    free(dx);
    free(dw);
    free_inputs(in, 2);
    ag_ctx_free(&ctx);
}
END_TEST

START_TEST(test_conv2d_accumulates) {
    for (int k = 0; k < N_CONV_CASES; k++) {
        const conv_case *c = &conv_cases[k];
        ag_tensor *in[3];
        make_conv_inputs(c, in, 400 + 10 * k);
        expect_accumulates("conv2d", forward_conv, in, 3, (void *)c);
        free_inputs(in, 3);
    }
}
END_TEST

int main(void) {
    Suite *suite = suite_create("ops_conv");
    TCase *tc = tcase_create("conv");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_conv2d_values);
    tcase_add_test(tc, test_conv2d_grad);
    tcase_add_test(tc, test_conv2d_grad_one_input);
    tcase_add_test(tc, test_conv2d_grouped_values_and_grad);
    tcase_add_test(tc, test_conv2d_grouped_matches_sliced_convs);
    tcase_add_test(tc, test_conv2d_accumulates);
    suite_add_tcase(suite, tc);
    SRunner *runner = srunner_create(suite);
    srunner_run_all(runner, CK_NORMAL);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
