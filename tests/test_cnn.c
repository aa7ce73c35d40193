/* Tests for layers/cnn.c (the dense ResNet), layers/moe_conv.c and
 * autograd/ops_cnn_extra.c:
 * - ops: the straight-through one-hot (values, identity backward, +=) and
 *   the row argmax (ties to the first maximum);
 * - dense ResNet: forward against a double-precision reference (training and
 *   eval batch norm, identity and projection shortcuts, strides), running
 *   statistics updated only in training, gradient check w.r.t. the input and
 *   parameters of every kind (training-mode BN) and w.r.t. the input in eval;
 * - MoE conv: gradient check (x, weight) of both computations, the
 *   straight-through router gradient against its formula (chosen logit gets
 *   sum dL/dout * out, the others 0), the grouped and literal computations
 *   agree on values and every gradient, E = 1 equals the dense conv.
 * The MoE-CNN model, config errors and FLOPs are in test_cnn_moe.c; the
 * reference network is in cnn_ref.c. */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "autograd/ops_cnn_extra.h"
#include "autograd/ops_conv.h"
#include "cnn_ref.h"
#include "conv_testutil.h"
#include "gradcheck.h"
#include "layers/cnn.h"
#include "layers/moe_conv.h"

enum { ARENA_BYTES = 64 << 20 };

/* ---- ops_cnn_extra ------------------------------------------------------------- */

START_TEST(test_onehot_st) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    enum { N = 3, E = 5 };
    ag_tensor *logits = gc_tensor_new(2, (int[]){N, E}, -2.0f, 2.0f, 7, true);
    const int32_t choice[N] = {4, 0, 2};
    float dout[N * E];
    for (int i = 0; i < N * E; i++) dout[i] = (float)((i * 7) % 11) / 11.0f - 0.4f;
    for (int round = 1; round <= 2; round++) {
        ag_ctx_reset(&ctx);
        ag_tensor *mask = ag_onehot_st(&ctx, logits, choice);
        ck_assert_ptr_nonnull(mask);
        ck_assert(mask->ndim == 2 && mask->shape[0] == N && mask->shape[1] == E);
        for (int n = 0; n < N; n++)
            for (int e = 0; e < E; e++)
                ck_assert_float_eq(mask->data[n * E + e], e == choice[n] ? 1.0f : 0.0f);
        ck_assert_int_eq(ag_backward_from(&ctx, mask, dout), CM_OK);
        /* Straight-through: the mask gradient reaches every logit unchanged,
         * and a second pass adds to it. */
        for (int i = 0; i < N * E; i++) ck_assert_float_eq(logits->grad[i], (float)round * dout[i]);
    }
    /* Without a gradient-requiring input no node is recorded. */
    ag_ctx_reset(&ctx);
    logits->requires_grad = false;
    ag_tensor *constant = ag_onehot_st(&ctx, logits, choice);
    ck_assert(!constant->requires_grad);
    ck_assert_int_eq(ctx.tape_length, 0);
    gc_tensor_free(logits);
    ag_ctx_free(&ctx);
}
END_TEST

START_TEST(test_argmax_rows) {
    float data[4 * 3] = {0.1f,  0.7f,  0.3f,  /* */ 2.0f, 2.0f, 1.0f, /* tie: first */
                         -3.0f, -1.0f, -1.0f, /* */ 0.0f, 0.0f, 5.0f};
    ag_tensor x = ag_tensor_wrap(data, NULL, 2, (int[]){4, 3}, false);
    int32_t index[4];
    ag_argmax_rows(&x, index);
    const int32_t want[4] = {1, 0, 1, 2};
    for (int i = 0; i < 4; i++) ck_assert_int_eq(index[i], want[i]);
}
END_TEST

/* ---- the dense ResNet ------------------------------------------------------------ */

START_TEST(test_cnn_structure) {
    dense_fixture f;
    cnn_config config = tiny_config();
    config.blocks[0] = 2; /* two identity blocks in stage 0 */
    dense_setup(&f, &config, 3);
    ck_assert_int_eq(f.model.n_blocks, 3);
    ck_assert(!f.model.blocks[0].plan.projection && !f.model.blocks[1].plan.projection);
    ck_assert(f.model.blocks[2].plan.projection && f.model.blocks[2].plan.stride == 2);
    ag_tensor *w = param(&f.params, "stages.1.blocks.0.conv1.weight");
    ck_assert(w->shape[0] == 6 && w->shape[1] == 4 && w->shape[2] == 3 && w->shape[3] == 3);
    w = param(&f.params, "stages.1.blocks.0.shortcut.conv.weight");
    ck_assert(w->shape[0] == 6 && w->shape[1] == 4 && w->shape[2] == 1);
    ck_assert_ptr_null(ag_params_find(&f.params, "stages.0.blocks.1.shortcut.conv.weight"));
    /* Running statistics: frozen state in the dense group, initialised 0 / 1. */
    ag_param *mean = ag_params_find(&f.params, "stem.bn.running_mean");
    ag_param *var = ag_params_find(&f.params, "stages.0.blocks.1.bn2.running_var");
    ck_assert(mean && var && mean->frozen && var->frozen && mean->group == AG_GROUP_DENSE);
    ck_assert(!mean->tensor.requires_grad && !ag_params_find(&f.params, "fc.weight")->frozen);
    /* Conv-bn units: stem + 3 blocks x 2 + 1 projection = 8, each a conv
     * weight and 4 BN tensors; then fc weight and bias. */
    ck_assert_int_eq(f.params.count, 8 * 4 + 8 + 2);
    ag_params_free(&f.params);
    /* Fresh init values (not randomized): BN 1/0, running 0/1, Kaiming convs. */
    ag_params_init(&f.params);
    ck_assert_int_eq(cnn_declare(&f.model, &config, &f.params, "net"), CM_OK);
    ck_assert_int_eq(ag_params_finalize(&f.params, 5), CM_OK);
    ck_assert_float_eq(param(&f.params, "net.stem.bn.running_var")->data[2], 1.0f);
    ck_assert_float_eq(param(&f.params, "net.stem.bn.weight")->data[1], 1.0f);
    ck_assert_float_eq(param(&f.params, "net.fc.bias")->data[0], 0.0f);
    ag_tensor *conv = param(&f.params, "net.stages.1.blocks.0.conv2.weight");
    double sq = 0.0;
    for (int64_t i = 0; i < conv->numel; i++) sq += (double)conv->data[i] * conv->data[i];
    /* std sqrt(2 / (6 * 9)) = 0.19; 324 samples give the sample std within 15%. */
    ck_assert_double_eq_tol(sqrt(sq / (double)conv->numel), sqrt(2.0 / 54.0), 0.03);
    ag_params_free(&f.params);
}
END_TEST

START_TEST(test_cnn_forward_values) {
    dense_fixture f;
    cnn_config config = tiny_config();
    dense_setup(&f, &config, 11);
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    ag_tensor *x = gc_tensor_new(4, (int[]){3, 3, 7, 7}, 0.0f, 1.0f, 12, false);
    ag_tensor *mean = param(&f.params, "stages.1.blocks.0.bn2.running_mean");
    float before = mean->data[0];
    for (int mode = 0; mode < 2; mode++) {
        bool training = mode == 0;
        ag_ctx_reset(&ctx);
        ag_tensor *logits = cnn_forward(&ctx, &f.model, x, &(cnn_forward_args){training});
        ck_assert_ptr_nonnull(logits);
        ck_assert(logits->ndim == 2 && logits->shape[0] == 3 && logits->shape[1] == 5);
        /* Training updated the running statistics (read by the eval reference). */
        if (training) ck_assert_float_ne(mean->data[0], before);
        double *want = ref_cnn(&f.model, x, training);
        expect_close(training ? "cnn train" : "cnn eval", logits->data, want, logits->numel, 2e-5);
        free(want);
    }
    /* Eval mode leaves the statistics alone. */
    float after_eval = mean->data[0];
    ag_ctx_reset(&ctx);
    cnn_forward(&ctx, &f.model, x, &(cnn_forward_args){false});
    ck_assert_float_eq(mean->data[0], after_eval);
    gc_tensor_free(x);
    ag_ctx_free(&ctx);
    ag_params_free(&f.params);
}
END_TEST

typedef struct dense_case {
    const cnn_model *model;
    bool training;
} dense_case;

static ag_tensor *forward_dense(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    const dense_case *c = user;
    return cnn_forward(ctx, c->model, in[0], &(cnn_forward_args){c->training});
}

START_TEST(test_cnn_gradcheck) {
    dense_fixture f;
    cnn_config config = tiny_config();
    dense_setup(&f, &config, 21);
    avoid_relu_kinks(&f.params);
    ag_tensor *x = gc_tensor_new(4, (int[]){2, 3, 7, 7}, 0.0f, 1.0f, 22, true);
    /* The input and one parameter of every kind: stem conv, a BN gain and
     * shift, identity-block conv, strided conv, projection, classifier. */
    ag_tensor *in[] = {x,
                       param(&f.params, "stem.conv.weight"),
                       param(&f.params, "stem.bn.weight"),
                       param(&f.params, "stages.0.blocks.0.bn1.bias"),
                       param(&f.params, "stages.0.blocks.0.conv2.weight"),
                       param(&f.params, "stages.1.blocks.0.conv1.weight"),
                       param(&f.params, "stages.1.blocks.0.shortcut.conv.weight"),
                       param(&f.params, "fc.weight"),
                       param(&f.params, "fc.bias")};
    dense_case c = {&f.model, true};
    expect_gradcheck("cnn train", forward_dense, in, 9, &c, 600);
    c.training = false; /* eval BN, as the attacks run it: the input gradient */
    expect_gradcheck("cnn eval", forward_dense, in, 1, &c, 256);
    gc_tensor_free(x);
    ag_params_free(&f.params);
}
END_TEST

/* ---- the MoE conv ------------------------------------------------------------------ */

enum { MC_N = 5, MC_E = 3, MC_W = 2, MC_C = 3 };

typedef struct moe_conv_case {
    moe_conv conv;
    int32_t choice[MC_N];
    bool all_groups;
} moe_conv_case;

/* in: x [N,C,H,W], the conv weight, logits [N,E] (a gradient only for the
 * straight-through test; finite differences cannot see it). */
static ag_tensor *forward_moe_conv(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    const moe_conv_case *c = user;
    ag_tensor *mask = ag_onehot_st(ctx, in[2], c->choice);
    return moe_conv_forward(ctx, &c->conv, in[0], mask, c->choice, c->all_groups);
}

typedef struct moe_conv_fixture {
    ag_params params;
    moe_conv_case c;
    ag_tensor *in[3];
} moe_conv_fixture;

/* Logits with a clear winner per image (margin >= 1): experts 2,0,2,1,0. */
static void moe_conv_setup(moe_conv_fixture *f, int stride, uint64_t seed) {
    ag_params_init(&f->params);
    ck_assert_int_eq(moe_conv_declare(&f->c.conv, &f->params, "conv", MC_C, MC_W, MC_E, 3, stride),
                     CM_OK);
    ck_assert_int_eq(ag_params_finalize(&f->params, seed), CM_OK);
    ag_tensor *w = ag_param_tensor(f->c.conv.weight);
    ck_assert(w->shape[0] == MC_E * MC_W && w->shape[1] == MC_C && w->shape[2] == 3);
    f->in[0] = gc_tensor_new(4, (int[]){MC_N, MC_C, 7, 5}, -1.0f, 1.0f, seed + 1, true);
    f->in[1] = w;
    f->in[2] = gc_tensor_new(2, (int[]){MC_N, MC_E}, -0.5f, 0.5f, seed + 2, false);
    const int32_t winners[MC_N] = {2, 0, 2, 1, 0};
    for (int n = 0; n < MC_N; n++) f->in[2]->data[n * MC_E + winners[n]] = 2.0f;
    ag_argmax_rows(f->in[2], f->c.choice);
    for (int n = 0; n < MC_N; n++) ck_assert_int_eq(f->c.choice[n], winners[n]);
}

static void moe_conv_teardown(moe_conv_fixture *f) {
    gc_tensor_free(f->in[0]);
    gc_tensor_free(f->in[2]);
    ag_params_free(&f->params);
}

START_TEST(test_moe_conv_gradcheck) {
    for (int stride = 1; stride <= 2; stride++)
        for (int all = 0; all < 2; all++) {
            moe_conv_fixture f;
            moe_conv_setup(&f, stride, 40 + stride);
            f.c.all_groups = all;
            expect_gradcheck(all ? "moe_conv all groups" : "moe_conv grouped", forward_moe_conv,
                             f.in, 3, &f.c, 256 + MC_E * MC_W * MC_C * 9);
            moe_conv_teardown(&f);
        }
}
END_TEST

/* Output, input / weight / logit gradients of one pass with upstream dout. */
typedef struct moe_conv_pass {
    float *y, *dx, *dw, *dlogits;
    int64_t y_numel;
} moe_conv_pass;

static moe_conv_pass run_moe_conv(moe_conv_fixture *f, const float *dout) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    for (int i = 0; i < 3; i++) memset(f->in[i]->grad, 0, (size_t)f->in[i]->numel * sizeof(float));
    ag_tensor *y = forward_moe_conv(&ctx, f->in, &f->c);
    ck_assert_ptr_nonnull(y);
    ck_assert_int_eq(ag_backward_from(&ctx, y, dout), CM_OK);
    moe_conv_pass pass = {.y_numel = y->numel};
    const ag_tensor *sources[4] = {y, f->in[0], f->in[1], f->in[2]};
    float **targets[4] = {&pass.y, &pass.dx, &pass.dw, &pass.dlogits};
    for (int k = 0; k < 4; k++) {
        size_t bytes = (size_t)sources[k]->numel * sizeof(float);
        *targets[k] = malloc(bytes);
        memcpy(*targets[k], k == 0 ? sources[k]->data : sources[k]->grad, bytes);
    }
    ag_ctx_free(&ctx);
    return pass;
}

static void free_pass(moe_conv_pass *pass) {
    free(pass->y);
    free(pass->dx);
    free(pass->dw);
    free(pass->dlogits);
}

START_TEST(test_moe_conv_straight_through) {
    moe_conv_fixture f;
    moe_conv_setup(&f, 2, 50);
    f.in[2]->requires_grad = true;
    const int64_t y_numel = (int64_t)MC_N * MC_W * 4 * 3; /* 7x5 with stride 2 -> 4x3 */
    float *dout = malloc((size_t)y_numel * sizeof(float));
    cm_rng_fill_uniform((cm_rng_key){51, 0, 0, CM_RNG_TEST}, 0, y_numel, -1.0f, 1.0f, dout);
    moe_conv_pass passes[2];
    for (int all = 0; all < 2; all++) {
        f.c.all_groups = all;
        passes[all] = run_moe_conv(&f, dout);
        ck_assert_int_eq(passes[all].y_numel, y_numel);
        /* dL/dlogit[n,e] = sum over the chosen group's channels and positions
         * of dL/dout * out for e = expert[n]; 0 for the other experts. */
        const int64_t per_image = y_numel / MC_N;
        for (int n = 0; n < MC_N; n++)
            for (int e = 0; e < MC_E; e++) {
                double want = 0.0;
                if (e == f.c.choice[n])
                    for (int64_t k = 0; k < per_image; k++)
                        want += (double)dout[n * per_image + k] * passes[all].y[n * per_image + k];
                float got = passes[all].dlogits[n * MC_E + e];
                if (e == f.c.choice[n]) {
                    ck_assert_msg(fabs(got - want) <= 1e-5 * (1.0 + fabs(want)),
                                  "all=%d image %d expert %d: dlogit %g want %g", all, n, e, got,
                                  want);
                    ck_assert(fabs(want) > 1e-3);
                } else {
                    ck_assert_msg(got == 0.0f, "image %d expert %d not chosen: dlogit %g", n, e,
                                  got);
                }
            }
    }
    /* The grouped and the literal computation agree everywhere. */
    const struct {
        const char *what;
        const float *a, *b;
        int64_t n;
    } same[4] = {{"out", passes[0].y, passes[1].y, y_numel},
                 {"dx", passes[0].dx, passes[1].dx, f.in[0]->numel},
                 {"dweight", passes[0].dw, passes[1].dw, f.in[1]->numel},
                 {"dlogits", passes[0].dlogits, passes[1].dlogits, f.in[2]->numel}};
    for (int k = 0; k < 4; k++)
        for (int64_t i = 0; i < same[k].n; i++)
            ck_assert_msg(fabsf(same[k].a[i] - same[k].b[i]) <=
                              1e-5f * (1.0f + fabsf(same[k].b[i])),
                          "%s[%lld]: grouped %g, all groups %g", same[k].what, (long long)i,
                          same[k].a[i], same[k].b[i]);
    /* Unchosen filters get no weight gradient: expert 1 serves image 3 only,
     * so zeroing that image's upstream gradient must zero its filter slice. */
    for (int64_t k = 0; k < y_numel / MC_N; k++) dout[3 * (y_numel / MC_N) + k] = 0.0f;
    f.c.all_groups = false;
    moe_conv_pass quiet = run_moe_conv(&f, dout);
    const int64_t filter_size = MC_C * 9;
    for (int64_t i = MC_W * filter_size; i < 2 * MC_W * filter_size; i++)
        ck_assert_float_eq(quiet.dw[i], 0.0f);
    free_pass(&quiet);
    free_pass(&passes[0]);
    free_pass(&passes[1]);
    free(dout);
    moe_conv_teardown(&f);
}
END_TEST

START_TEST(test_moe_conv_single_expert_is_dense) {
    ag_params params;
    ag_params_init(&params);
    moe_conv conv;
    ck_assert_int_eq(moe_conv_declare(&conv, &params, "conv", 3, 4, 1, 3, 2), CM_OK);
    ck_assert_int_eq(ag_params_finalize(&params, 60), CM_OK);
    ag_tensor *w = ag_param_tensor(conv.weight);
    ag_tensor *x = gc_tensor_new(4, (int[]){3, 3, 7, 5}, -1.0f, 1.0f, 61, true);
    float ones[3] = {1.0f, 1.0f, 1.0f};
    ag_tensor mask = ag_tensor_wrap(ones, NULL, 2, (int[]){3, 1}, false);
    const int32_t zeros[3] = {0, 0, 0};
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    ag_tensor *dense = ag_conv2d(&ctx, x, w, NULL, 2, 1);
    const int64_t y_numel = dense->numel;
    float *dout = malloc((size_t)y_numel * sizeof(float));
    cm_rng_fill_uniform((cm_rng_key){62, 0, 0, CM_RNG_TEST}, 0, y_numel, -1.0f, 1.0f, dout);
    ck_assert_int_eq(ag_backward_from(&ctx, dense, dout), CM_OK);
    float *want_y = malloc((size_t)y_numel * sizeof(float));
    float *want_dx = malloc((size_t)x->numel * sizeof(float));
    float *want_dw = malloc((size_t)w->numel * sizeof(float));
    memcpy(want_y, dense->data, (size_t)y_numel * sizeof(float));
    memcpy(want_dx, x->grad, (size_t)x->numel * sizeof(float));
    memcpy(want_dw, w->grad, (size_t)w->numel * sizeof(float));
    /* no mask (the release's n_expert == 1), grouped, all groups */
    for (int variant = 0; variant < 3; variant++) {
        ag_ctx_reset(&ctx);
        memset(x->grad, 0, (size_t)x->numel * sizeof(float));
        memset(w->grad, 0, (size_t)w->numel * sizeof(float));
        ag_tensor *y =
            moe_conv_forward(&ctx, &conv, x, variant ? &mask : NULL, zeros, variant == 2);
        ck_assert_ptr_nonnull(y);
        ck_assert_int_eq(y->numel, y_numel);
        ck_assert_int_eq(ag_backward_from(&ctx, y, dout), CM_OK);
        for (int64_t i = 0; i < y->numel; i++) ck_assert_float_eq(y->data[i], want_y[i]);
        for (int64_t i = 0; i < x->numel; i++)
            ck_assert_float_eq_tol(x->grad[i], want_dx[i], 1e-6f);
        for (int64_t i = 0; i < w->numel; i++)
            ck_assert_float_eq_tol(w->grad[i], want_dw[i], 1e-6f);
    }
    free(want_y);
    free(want_dx);
    free(want_dw);
    free(dout);
    gc_tensor_free(x);
    ag_ctx_free(&ctx);
    ag_params_free(&params);
}
END_TEST

int main(void) {
    Suite *suite = suite_create("cnn");
    TCase *ops = tcase_create("ops");
    tcase_add_test(ops, test_onehot_st);
    tcase_add_test(ops, test_argmax_rows);
    suite_add_tcase(suite, ops);
    TCase *dense = tcase_create("dense");
    tcase_add_test(dense, test_cnn_structure);
    tcase_add_test(dense, test_cnn_forward_values);
    tcase_add_test(dense, test_cnn_gradcheck);
    suite_add_tcase(suite, dense);
    TCase *moe = tcase_create("moe");
    tcase_set_timeout(moe, 60);
    tcase_add_test(moe, test_moe_conv_gradcheck);
    tcase_add_test(moe, test_moe_conv_straight_through);
    tcase_add_test(moe, test_moe_conv_single_expert_is_dense);
    suite_add_tcase(suite, moe);
    SRunner *runner = srunner_create(suite);
    srunner_run_all(runner, CK_NORMAL);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
