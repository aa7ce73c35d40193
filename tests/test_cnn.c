/* Tests for layers/cnn.c, layers/moe_conv.c and autograd/ops_cnn_extra.c:
 * - ops: the straight-through one-hot (values, identity backward, +=) and
 *   the row argmax (ties to the first maximum);
 * - dense ResNet: forward against a double-precision reference (training and
 *   eval batch norm, identity and projection shortcuts, strides), running
 *   statistics updated only in training, gradient check w.r.t. the input and
 *   parameters of every kind (training-mode BN) and w.r.t. the input in eval;
 * - MoE conv: gradient check (x, weight) of both computations, the
 *   straight-through router gradient against its formula (chosen logit gets
 *   sum dL/dout * out, the others 0), the grouped and literal computations
 *   agree on values and every gradient, E = 1 equals the dense conv;
 * - MoE-CNN: forward against the reference with both routings, argmax
 *   routing, gradient check with frozen routes, router gradients present
 *   only with the straight-through path, E = 1 r = 1 equals the dense net,
 *   router parameter list, config errors;
 * - FLOPs against hand counts, and the MoE/dense inference ratio. */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "autograd/ops_cnn_extra.h"
#include "autograd/ops_conv.h"
#include "gradcheck.h"
#include "layers/cnn.h"
#include "layers/moe_conv.h"

enum { ARENA_BYTES = 64 << 20 };

static void expect_close(const char *label, const float *got, const double *want, int64_t n,
                         double tol) {
    for (int64_t i = 0; i < n; i++) {
        double allowed = tol * (fabs(want[i]) > 1.0 ? fabs(want[i]) : 1.0);
        ck_assert_msg(fabs(got[i] - want[i]) <= allowed, "%s element %lld: got %.9g want %.9g",
                      label, (long long)i, got[i], want[i]);
    }
}

static void expect_gradcheck(const char *label, gc_forward_fn forward, ag_tensor *const *in,
                             int n_in, void *user, int64_t min_checked) {
    gc_options options = gc_default_options();
    gc_result r = gc_check(label, forward, in, n_in, user, &options);
    ck_assert_msg(r.ok, "%s", r.message);
    ck_assert_int_ge(r.checked, min_checked);
}

static bool ends_with(const char *text, const char *suffix) {
    size_t n = strlen(text), m = strlen(suffix);
    return n >= m && strcmp(text + n - m, suffix) == 0;
}

/* Replaces the structured init (BN 1/0, tiny classifier) by seeded values of
 * the same kind, so no gradient is trivially zero or one. */
static void randomize_params(ag_params *params, uint64_t seed) {
    for (int i = 0; i < params->count; i++) {
        ag_param *p = params->items[i];
        ag_tensor *t = ag_param_tensor(p);
        cm_rng_key key = {seed, (uint64_t)i, 0, CM_RNG_TEST};
        bool bn = strstr(p->name, "bn") != NULL;
        if (ends_with(p->name, "running_var") || (bn && ends_with(p->name, ".weight")))
            cm_rng_fill_uniform(key, 0, t->numel, 0.6f, 1.4f, t->data);
        else if (ends_with(p->name, "running_mean") || (bn && ends_with(p->name, ".bias")))
            cm_rng_fill_uniform(key, 0, t->numel, -0.3f, 0.3f, t->data);
        else if (strstr(p->name, "fc."))
            cm_rng_fill_uniform(key, 0, t->numel, -0.6f, 0.6f, t->data);
    }
}

/* Finite differences across a ReLU kink measure neither side's slope, and a
 * network has hundreds of ReLU inputs, some always within eps of 0. For the
 * network gradient checks, batch norm shifts of +-3 with gains in [0.5, 0.8]
 * put every ReLU input at least ~1 away from 0 (batch-normalised values stay
 * within about +-2.5 here): bn1, the stem and router BNs alternate on / off
 * by channel, so both ReLU branches are exercised; bn2 and the projection
 * BNs are +3, so the residual sum before the block's ReLU stays positive. */
static void avoid_relu_kinks(ag_params *params) {
    for (int i = 0; i < params->count; i++) {
        ag_param *p = params->items[i];
        ag_tensor *t = ag_param_tensor(p);
        if (!strstr(p->name, "bn")) continue;
        bool always_on = strstr(p->name, "bn2") || strstr(p->name, "shortcut.bn");
        for (int64_t c = 0; c < t->numel; c++) {
            if (ends_with(p->name, "bn.weight") || ends_with(p->name, "bn1.weight") ||
                ends_with(p->name, "bn2.weight"))
                t->data[c] = 0.5f + 0.3f * (float)((c * 7) % 5) / 4.0f;
            else if (ends_with(p->name, ".bias"))
                t->data[c] = always_on || c % 2 == 0 ? 3.0f : -3.0f;
        }
    }
}

static ag_tensor *param(const ag_params *params, const char *name) {
    ag_param *p = ag_params_find(params, name);
    ck_assert_msg(p != NULL, "no parameter %s", name);
    return ag_param_tensor(p);
}

/* ---- double-precision reference network ------------------------------------------ */

typedef struct dtensor {
    int n, c, h, w;
    double *v;
} dtensor;

static dtensor dt_new(int n, int c, int h, int w) {
    return (dtensor){n, c, h, w, calloc((size_t)n * c * h * w, sizeof(double))};
}

static dtensor dt_from(const ag_tensor *t) {
    dtensor d = dt_new(t->shape[0], t->shape[1], t->shape[2], t->shape[3]);
    for (int64_t i = 0; i < t->numel; i++) d.v[i] = t->data[i];
    return d;
}

static double *dt_at(const dtensor *t, int n, int c, int h, int w) {
    return &t->v[((n * t->c + c) * t->h + h) * t->w + w];
}

/* co filters of size k (padding k/2); image n uses filters from group[n]*co
 * (group NULL: from 0) of the weight [*, C, k, k]. */
static dtensor dt_conv(const dtensor *x, const ag_tensor *weight, int co, int k, int stride,
                       const int32_t *group) {
    int pad = k / 2, ho = (x->h + 2 * pad - k) / stride + 1, wo = (x->w + 2 * pad - k) / stride + 1;
    dtensor y = dt_new(x->n, co, ho, wo);
    for (int n = 0; n < x->n; n++)
        for (int o = 0; o < co; o++) {
            int f = (group ? group[n] * co : 0) + o;
            for (int oh = 0; oh < ho; oh++)
                for (int ow = 0; ow < wo; ow++) {
                    double total = 0.0;
                    for (int c = 0; c < x->c; c++)
                        for (int i = 0; i < k; i++)
                            for (int j = 0; j < k; j++) {
                                int ih = oh * stride - pad + i, iw = ow * stride - pad + j;
                                if (ih < 0 || ih >= x->h || iw < 0 || iw >= x->w) continue;
                                total += *dt_at(x, n, c, ih, iw) *
                                         weight->data[((f * x->c + c) * k + i) * k + j];
                            }
                    *dt_at(&y, n, o, oh, ow) = total;
                }
        }
    return y;
}

static void dt_bn(dtensor *x, const cnn_bn *bn, bool training) {
    const float *gamma = ag_param_tensor(bn->weight)->data, *beta = ag_param_tensor(bn->bias)->data;
    const float *mean_run = ag_param_tensor(bn->running_mean)->data;
    const float *var_run = ag_param_tensor(bn->running_var)->data;
    int count = x->n * x->h * x->w;
    for (int c = 0; c < x->c; c++) {
        double mean = mean_run[c], var = var_run[c];
        if (training) {
            double sum = 0.0, sq = 0.0;
            for (int n = 0; n < x->n; n++)
                for (int p = 0; p < x->h * x->w; p++) sum += *dt_at(x, n, c, 0, p);
            mean = sum / count;
            for (int n = 0; n < x->n; n++)
                for (int p = 0; p < x->h * x->w; p++) {
                    double d = *dt_at(x, n, c, 0, p) - mean;
                    sq += d * d;
                }
            var = sq / count;
        }
        for (int n = 0; n < x->n; n++)
            for (int p = 0; p < x->h * x->w; p++) {
                double *v = dt_at(x, n, c, 0, p);
                *v = (*v - mean) / sqrt(var + bn->eps) * gamma[c] + beta[c];
            }
    }
}

static void dt_relu(dtensor *x) {
    for (int64_t i = 0; i < (int64_t)x->n * x->c * x->h * x->w; i++) x->v[i] = fmax(x->v[i], 0.0);
}

static void dt_add_relu(dtensor *a, const dtensor *b) {
    for (int64_t i = 0; i < (int64_t)a->n * a->c * a->h * a->w; i++) a->v[i] += b->v[i];
    dt_relu(a);
}

static dtensor dt_conv_bn(const dtensor *x, const cnn_conv_bn *unit, bool training, bool relu) {
    const ag_tensor *w = ag_param_tensor(unit->weight);
    dtensor y = dt_conv(x, w, w->shape[0], w->shape[2], unit->stride, NULL);
    dt_bn(&y, &unit->bn, training);
    if (relu) dt_relu(&y);
    return y;
}

/* global average pool + linear -> [N,V] (malloc'd) */
static double *dt_head(const dtensor *x, const ag_param *fc_weight, const ag_param *fc_bias) {
    const ag_tensor *w = &fc_weight->tensor, *b = &fc_bias->tensor;
    int classes = w->shape[0];
    double *logits = calloc((size_t)x->n * classes, sizeof(double));
    for (int n = 0; n < x->n; n++)
        for (int v = 0; v < classes; v++) {
            double total = b->data[v];
            for (int c = 0; c < x->c; c++) {
                double mean = 0.0;
                for (int p = 0; p < x->h * x->w; p++) mean += *dt_at(x, n, c, 0, p);
                total += mean / (x->h * x->w) * w->data[v * x->c + c];
            }
            logits[n * classes + v] = total;
        }
    return logits;
}

static double *ref_cnn(const cnn_model *model, const ag_tensor *x, bool training) {
    dtensor in = dt_from(x), h = dt_conv_bn(&in, &model->stem, training, true);
    free(in.v);
    for (int i = 0; i < model->n_blocks; i++) {
        const cnn_block *b = &model->blocks[i];
        dtensor a = dt_conv_bn(&h, &b->conv1, training, true);
        dtensor c = dt_conv_bn(&a, &b->conv2, training, false);
        dtensor skip = b->plan.projection ? dt_conv_bn(&h, &b->shortcut, training, false) : h;
        dt_add_relu(&c, &skip);
        if (skip.v != h.v) free(skip.v);
        free(a.v);
        free(h.v);
        h = c;
    }
    double *logits = dt_head(&h, model->fc_weight, model->fc_bias);
    free(h.v);
    return logits;
}

/* The MoE-CNN with the given experts per router (as the model's routers
 * numbered them); router_logits[r] receives router r's logits [N,E]. */
static double *ref_router(const moe_router_net *net, const dtensor *x, bool training) {
    dtensor h = {x->n, x->c, x->h, x->w, NULL};
    h.v = malloc((size_t)x->n * x->c * x->h * x->w * sizeof(double));
    memcpy(h.v, x->v, (size_t)x->n * x->c * x->h * x->w * sizeof(double));
    for (int i = 0; i < net->n_convs; i++) {
        dtensor next = dt_conv_bn(&h, &net->convs[i], training, true);
        free(h.v);
        h = next;
    }
    double *logits = dt_head(&h, net->fc_weight, net->fc_bias);
    free(h.v);
    return logits;
}

static dtensor dt_moe_conv(const dtensor *x, const moe_conv *conv, const int32_t *experts) {
    return dt_conv(x, ag_param_tensor(conv->weight), conv->expert_width, conv->kernel, conv->stride,
                   conv->num_experts > 1 ? experts : NULL);
}

static double *ref_moe(const moe_cnn_model *model, const ag_tensor *x, bool training,
                       int32_t *const *experts, double **router_logits) {
    bool per_layer = model->config.routing == MOE_CNN_ROUTING_PER_LAYER;
    bool routed = model->config.num_experts > 1;
    dtensor in = dt_from(x);
    if (routed && !per_layer) router_logits[0] = ref_router(&model->router, &in, training);
    dtensor h = dt_conv_bn(&in, &model->stem, training, true);
    free(in.v);
    for (int i = 0; i < model->n_blocks; i++) {
        const moe_cnn_block *b = &model->blocks[i];
        if (routed && per_layer) router_logits[2 * i] = ref_router(&b->router1, &h, training);
        dtensor a = dt_moe_conv(&h, &b->conv1, experts[per_layer ? 2 * i : 0]);
        dt_bn(&a, &b->bn1, training);
        dt_relu(&a);
        if (routed && per_layer) router_logits[2 * i + 1] = ref_router(&b->router2, &a, training);
        dtensor c = dt_moe_conv(&a, &b->conv2, experts[per_layer ? 2 * i + 1 : 0]);
        dt_bn(&c, &b->bn2, training);
        dtensor skip = b->plan.projection ? dt_conv_bn(&h, &b->shortcut, training, false) : h;
        dt_add_relu(&c, &skip);
        if (skip.v != h.v) free(skip.v);
        free(a.v);
        free(h.v);
        h = c;
    }
    double *logits = dt_head(&h, model->fc_weight, model->fc_bias);
    free(h.v);
    return logits;
}

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

/* stem 4, stage 0: one block of width 4 (identity shortcut), stage 1: one
 * block of width 6 (stride 2, projection); 3 input channels, 5 classes. */
static cnn_config tiny_config(void) {
    cnn_config c = cnn_default_config();
    c.in_channels = 3;
    c.num_classes = 5;
    c.stem_channels = 4;
    c.n_stages = 2;
    c.widths[0] = 4;
    c.widths[1] = 6;
    c.blocks[0] = c.blocks[1] = 1;
    return c;
}

typedef struct dense_fixture {
    ag_params params;
    cnn_model model;
} dense_fixture;

static void dense_setup(dense_fixture *f, const cnn_config *config, uint64_t seed) {
    ag_params_init(&f->params);
    ck_assert_int_eq(cnn_declare(&f->model, config, &f->params, NULL), CM_OK);
    ck_assert_int_eq(ag_params_finalize(&f->params, seed), CM_OK);
    randomize_params(&f->params, seed);
}

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

/* ---- the MoE-CNN ------------------------------------------------------------------- */

/* tiny_config at ratio 0.5 (expert widths 2 and 3, projections in both
 * blocks since the stem stays 4), E = 2, routers of one conv (3 / 2 wide). */
static moe_cnn_config tiny_moe_config(moe_cnn_routing routing) {
    moe_cnn_config c = moe_cnn_default_config();
    c.body = tiny_config();
    c.body.ratio = 0.5f;
    c.num_experts = 2;
    c.routing = routing;
    c.router = (moe_router_config){1, {3}};
    c.layer_router = (moe_router_config){1, {2}};
    return c;
}

typedef struct moe_fixture {
    ag_params params;
    moe_cnn_model model;
} moe_fixture;

static void moe_setup(moe_fixture *f, const moe_cnn_config *config, uint64_t seed) {
    ag_params_init(&f->params);
    ck_assert_int_eq(moe_cnn_declare(&f->model, config, &f->params, NULL), CM_OK);
    ck_assert_int_eq(ag_params_finalize(&f->params, seed), CM_OK);
    randomize_params(&f->params, seed);
}

START_TEST(test_moe_cnn_structure) {
    moe_fixture f;
    moe_cnn_config config = tiny_moe_config(MOE_CNN_ROUTING_IMAGE);
    moe_setup(&f, &config, 70);
    ag_tensor *w = param(&f.params, "stages.0.blocks.0.conv1.weight");
    ck_assert(w->shape[0] == 2 * 2 && w->shape[1] == 4); /* E*w filters on the 4-wide stem */
    w = param(&f.params, "stages.1.blocks.0.conv2.weight");
    ck_assert(w->shape[0] == 2 * 3 && w->shape[1] == 3);
    ck_assert_int_eq(param(&f.params, "stages.1.blocks.0.bn2.weight")->shape[0], 3);
    ck_assert_int_eq(param(&f.params, "fc.weight")->shape[1], 3);
    ck_assert_int_eq(param(&f.params, "router.fc.weight")->shape[0], 2);
    ck_assert(f.model.blocks[0].plan.projection && f.model.blocks[1].plan.projection);
    ck_assert_int_eq(moe_cnn_router_count(&f.model), 1);
    ag_param *router[64];
    int n = moe_cnn_router_params(&f.model, router, 64);
    ck_assert_int_eq(n, 1 + 4 + 2); /* conv, its BN, fc weight and bias */
    for (int i = 0; i < n; i++)
        ck_assert_msg(strncmp(router[i]->name, "router.", 7) == 0, "%s", router[i]->name);
    ck_assert_int_eq(moe_cnn_router_params(&f.model, router, 3), n); /* count beyond capacity */
    ag_params_free(&f.params);

    config = tiny_moe_config(MOE_CNN_ROUTING_PER_LAYER);
    moe_setup(&f, &config, 71);
    ck_assert_int_eq(moe_cnn_router_count(&f.model), 4);
    n = moe_cnn_router_params(&f.model, router, 64);
    ck_assert_int_eq(n, 4 * 7);
    for (int i = 0; i < n; i++) ck_assert(strstr(router[i]->name, ".router.") != NULL);
    ck_assert_int_eq(
        param(&f.params, "stages.1.blocks.0.conv1.router.convs.0.conv.weight")->shape[1],
        2); /* reads conv1's input: block 0's output, width 2 */
    ck_assert_ptr_null(ag_params_find(&f.params, "router.fc.weight"));
    ag_params_free(&f.params);
}
END_TEST

START_TEST(test_moe_cnn_forward_values) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    enum { N = 4 };
    ag_tensor *x = gc_tensor_new(4, (int[]){N, 3, 7, 7}, 0.0f, 1.0f, 80, false);
    for (int routing = 0; routing < 2; routing++) {
        moe_fixture f;
        moe_cnn_config config = tiny_moe_config((moe_cnn_routing)routing);
        moe_setup(&f, &config, 81 + routing);
        const int routers = moe_cnn_router_count(&f.model);
        int32_t forced_storage[4][N] = {{1, 0, 0, 1}, {0, 1, 1, 0}, {1, 1, 0, 0}, {0, 0, 1, 1}};
        const int32_t *forced[4] = {forced_storage[0], forced_storage[1], forced_storage[2],
                                    forced_storage[3]};
        for (int pass = 0; pass < 4; pass++) {
            bool training = pass % 2 == 0, force = pass >= 2;
            ag_ctx_reset(&ctx);
            moe_cnn_forward_args args = {.training = training,
                                         .forced_experts = force ? forced : NULL};
            moe_cnn_output out;
            ck_assert_int_eq(moe_cnn_forward(&ctx, &f.model, x, &args, &out), CM_OK);
            ck_assert_int_eq(out.n_routers, routers);
            int32_t *experts[4] = {0};
            for (int r = 0; r < routers; r++) {
                experts[r] = out.experts[r];
                int32_t argmax[N];
                ag_argmax_rows(out.router_logits[r], argmax);
                for (int n = 0; n < N; n++)
                    ck_assert_int_eq(experts[r][n], force ? forced[r][n] : argmax[n]);
            }
            double *router_logits[4] = {0};
            double *want = ref_moe(&f.model, x, training, experts, router_logits);
            expect_close("moe_cnn logits", out.logits->data, want, out.logits->numel, 2e-5);
            for (int r = 0; r < routers; r++) {
                expect_close("router logits", out.router_logits[r]->data, router_logits[r], N * 2,
                             2e-5);
                free(router_logits[r]);
            }
            free(want);
        }
        ag_params_free(&f.params);
    }
    gc_tensor_free(x);
    ag_ctx_free(&ctx);
}
END_TEST

typedef struct moe_case {
    const moe_cnn_model *model;
    moe_cnn_forward_args args;
    bool router_sees_copy; /* router_input = a constant copy of x */
    ag_tensor *router_copy;
} moe_case;

static ag_tensor *forward_moe(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    moe_case *c = user;
    moe_cnn_forward_args args = c->args;
    if (c->router_sees_copy) args.router_input = c->router_copy;
    moe_cnn_output out;
    return moe_cnn_forward(ctx, c->model, in[0], &args, &out) == CM_OK ? out.logits : NULL;
}

/* The input and every kind of backbone parameter; the routes are fixed (no
 * argmax can flip under finite differences) and carry no gradient, since the
 * straight-through gradient is not the derivative finite differences see. */
START_TEST(test_moe_cnn_gradcheck) {
    const int32_t route_a[2] = {1, 0}, route_b[2] = {0, 1};
    const int32_t *forced[4] = {route_a, route_b, route_b, route_a};
    for (int variant = 0; variant < 3; variant++) {
        moe_fixture f;
        moe_cnn_config config =
            tiny_moe_config(variant == 1 ? MOE_CNN_ROUTING_PER_LAYER : MOE_CNN_ROUTING_IMAGE);
        moe_setup(&f, &config, 90 + variant);
        avoid_relu_kinks(&f.params);
        ag_tensor *x = gc_tensor_new(4, (int[]){2, 3, 7, 7}, 0.0f, 1.0f, 95, true);
        moe_case c = {
            .model = &f.model,
            .args = {.training = true, .forced_experts = forced, .no_router_gradient = true}};
        if (variant == 2) {
            /* Image routing by the argmax with the straight-through path on:
             * the router reads a constant copy of x, so x's gradient is the
             * experts' alone and no route depends on a checked input. */
            c.args = (moe_cnn_forward_args){.training = true};
            c.router_sees_copy = true;
            c.router_copy = gc_tensor_new(4, x->shape, 0.0f, 1.0f, 95, false);
        }
        ag_tensor *in[] = {x,
                           param(&f.params, "stem.conv.weight"),
                           param(&f.params, "stages.0.blocks.0.conv1.weight"),
                           param(&f.params, "stages.0.blocks.0.bn1.weight"),
                           param(&f.params, "stages.0.blocks.0.shortcut.conv.weight"),
                           param(&f.params, "stages.1.blocks.0.conv2.weight"),
                           param(&f.params, "stages.1.blocks.0.bn2.bias"),
                           param(&f.params, "fc.weight")};
        expect_gradcheck(variant == 0   ? "moe_cnn image"
                         : variant == 1 ? "moe_cnn per-layer"
                                        : "moe_cnn argmax",
                         forward_moe, in, 8, &c, 500);
        gc_tensor_free(c.router_copy);
        gc_tensor_free(x);
        ag_params_free(&f.params);
    }
}
END_TEST

/* Gradients of the parameters and the input after one backward of a fixed
 * weighted sum of the logits. */
static float *moe_gradients(moe_fixture *f, ag_tensor *x, const moe_cnn_forward_args *args,
                            float **logits, float **router_logit_grad) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    ctx.keep_grads = true; /* the router logits' gradient is read after backward */
    ag_params_zero_grad(&f->params);
    memset(x->grad, 0, (size_t)x->numel * sizeof(float));
    moe_cnn_output out;
    ck_assert_int_eq(moe_cnn_forward(&ctx, &f->model, x, args, &out), CM_OK);
    int64_t n = out.logits->numel;
    float *dout = malloc((size_t)n * sizeof(float));
    cm_rng_fill_uniform((cm_rng_key){7, 7, 0, CM_RNG_TEST}, 0, n, -1.0f, 1.0f, dout);
    ck_assert_int_eq(ag_backward_from(&ctx, out.logits, dout), CM_OK);
    *logits = malloc((size_t)n * sizeof(float));
    memcpy(*logits, out.logits->data, (size_t)n * sizeof(float));
    if (router_logit_grad) {
        ag_tensor *r = out.router_logits[0];
        *router_logit_grad = calloc((size_t)r->numel, sizeof(float));
        if (r->grad) memcpy(*router_logit_grad, r->grad, (size_t)r->numel * sizeof(float));
    }
    const ag_param_buffer *buffer = &f->params.buffers[AG_GROUP_DENSE];
    float *grads = malloc((buffer->numel + (size_t)x->numel) * sizeof(float));
    memcpy(grads, buffer->grad, buffer->numel * sizeof(float));
    memcpy(grads + buffer->numel, x->grad, (size_t)x->numel * sizeof(float));
    free(dout);
    ag_ctx_free(&ctx);
    return grads;
}

START_TEST(test_moe_cnn_router_gradient) {
    enum { N = 4 };
    for (int routing = 0; routing < 2; routing++) {
        moe_fixture f;
        moe_cnn_config config = tiny_moe_config((moe_cnn_routing)routing);
        moe_setup(&f, &config, 100 + routing);
        ag_tensor *x = gc_tensor_new(4, (int[]){N, 3, 7, 7}, 0.0f, 1.0f, 102, true);
        const size_t n_grads = f.params.buffers[AG_GROUP_DENSE].numel + (size_t)x->numel;
        float *logits[3], *dlogits[3], *grads[3];
        /* grouped with straight-through, all groups with it, grouped without */
        for (int k = 0; k < 3; k++) {
            moe_cnn_forward_args args = {
                .training = true, .compute_all_groups = k == 1, .no_router_gradient = k == 2};
            grads[k] = moe_gradients(&f, x, &args, &logits[k], &dlogits[k]);
        }
        for (int64_t i = 0; i < N * 5; i++)
            ck_assert_float_eq_tol(logits[0][i], logits[1][i], 1e-6f);
        for (size_t i = 0; i < n_grads; i++)
            ck_assert_msg(fabsf(grads[0][i] - grads[1][i]) <= 1e-5f * (1.0f + fabsf(grads[1][i])),
                          "gradient %zu: grouped %g, all groups %g", i, grads[0][i], grads[1][i]);
        ag_param *router[64];
        int n_router = moe_cnn_router_params(&f.model, router, 64);
        for (int i = 0; i < n_router; i++) {
            if (router[i]->frozen) continue;
            double with = 0.0, without = 0.0;
            for (int64_t j = 0; j < router[i]->tensor.numel; j++) {
                with += fabs(grads[0][router[i]->offset + j]);
                without += fabs(grads[2][router[i]->offset + j]);
            }
            ck_assert_msg(with > 1e-6, "%s gets no straight-through gradient", router[i]->name);
            ck_assert_msg(without == 0.0, "%s has a gradient without the straight-through path",
                          router[i]->name);
        }
        if (routing == MOE_CNN_ROUTING_IMAGE) {
            /* Only the chosen logit of each image receives a gradient. */
            ag_ctx ctx;
            ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
            moe_cnn_output out;
            moe_cnn_forward_args args = {.training = true};
            ck_assert_int_eq(moe_cnn_forward(&ctx, &f.model, x, &args, &out), CM_OK);
            for (int n = 0; n < N; n++) {
                int chosen = out.experts[0][n];
                ck_assert_float_eq(dlogits[0][n * 2 + 1 - chosen], 0.0f);
                ck_assert(fabsf(dlogits[0][n * 2 + chosen]) > 1e-7f);
            }
            ag_ctx_free(&ctx);
        }
        for (int k = 0; k < 3; k++) {
            free(logits[k]);
            free(dlogits[k]);
            free(grads[k]);
        }
        gc_tensor_free(x);
        ag_params_free(&f.params);
    }
}
END_TEST

START_TEST(test_moe_cnn_single_expert_is_dense) {
    dense_fixture d;
    cnn_config body = tiny_config();
    dense_setup(&d, &body, 110);
    moe_fixture m;
    moe_cnn_config config = tiny_moe_config(MOE_CNN_ROUTING_IMAGE);
    config.body = body;
    config.num_experts = 1;
    moe_setup(&m, &config, 111);
    /* Same names, same shapes; copy the dense values over. */
    ck_assert_int_eq(m.params.count, d.params.count);
    for (int i = 0; i < m.params.count; i++) {
        ag_tensor *mine = ag_param_tensor(m.params.items[i]);
        ag_tensor *theirs = param(&d.params, m.params.items[i]->name);
        ck_assert(ag_same_shape(mine, theirs));
        memcpy(mine->data, theirs->data, (size_t)mine->numel * sizeof(float));
    }
    ck_assert_int_eq(moe_cnn_router_count(&m.model), 0);
    ag_tensor *x = gc_tensor_new(4, (int[]){3, 3, 7, 7}, 0.0f, 1.0f, 112, true);
    float *logits,
        *grads = moe_gradients(&m, x, &(moe_cnn_forward_args){.training = true}, &logits, NULL);
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    memset(x->grad, 0, (size_t)x->numel * sizeof(float));
    ag_tensor *y = cnn_forward(&ctx, &d.model, x, &(cnn_forward_args){true});
    float dout[3 * 5];
    cm_rng_fill_uniform((cm_rng_key){7, 7, 0, CM_RNG_TEST}, 0, 15, -1.0f, 1.0f, dout);
    ck_assert_int_eq(ag_backward_from(&ctx, y, dout), CM_OK);
    for (int i = 0; i < 15; i++) ck_assert_float_eq(y->data[i], logits[i]);
    for (int i = 0; i < m.params.count; i++) {
        const ag_param *p = m.params.items[i];
        const ag_tensor *theirs = param(&d.params, p->name);
        for (int64_t j = 0; j < theirs->numel; j++)
            ck_assert_float_eq(grads[p->offset + j], theirs->grad[j]);
    }
    const size_t x_offset = m.params.buffers[AG_GROUP_DENSE].numel;
    for (int64_t j = 0; j < x->numel; j++) ck_assert_float_eq(grads[x_offset + j], x->grad[j]);
    free(logits);
    free(grads);
    gc_tensor_free(x);
    ag_ctx_free(&ctx);
    ag_params_free(&m.params);
    ag_params_free(&d.params);
}
END_TEST

START_TEST(test_config_errors) {
    cnn_config c = tiny_config();
    c.ratio = 0.1f; /* int(0.1 * 4) = 0 channels */
    ck_assert_int_eq(cnn_config_check(&c), CM_ERR_INVALID);
    c = tiny_config();
    c.n_stages = CNN_MAX_STAGES + 1;
    ck_assert_int_eq(cnn_config_check(&c), CM_ERR_INVALID);
    c = tiny_config();
    c.blocks[1] = 0;
    ck_assert_int_eq(cnn_config_check(&c), CM_ERR_INVALID);
    c = tiny_config();
    c.num_classes = 1;
    ck_assert_int_eq(cnn_config_check(&c), CM_ERR_INVALID);
    ck_assert_int_eq(cnn_config_check(&(cnn_config){0}), CM_ERR_INVALID);
    /* int(ratio * width) as Python computes it, despite 0.7f < 0.7. */
    c.ratio = 0.7f;
    c.widths[0] = 10;
    ck_assert_int_eq(cnn_stage_width(&c, 0), 7);
    c.ratio = 0.5f;
    c.widths[0] = 7;
    ck_assert_int_eq(cnn_stage_width(&c, 0), 3);

    moe_cnn_config m = tiny_moe_config(MOE_CNN_ROUTING_IMAGE);
    ck_assert_int_eq(moe_cnn_config_check(&m), CM_OK);
    m.num_experts = 0;
    ck_assert_int_eq(moe_cnn_config_check(&m), CM_ERR_INVALID);
    m.num_experts = MOE_CONV_MAX_EXPERTS + 1;
    ck_assert_int_eq(moe_cnn_config_check(&m), CM_ERR_INVALID);
    m = tiny_moe_config(MOE_CNN_ROUTING_IMAGE);
    m.router.n_convs = MOE_ROUTER_MAX_CONVS + 1;
    ck_assert_int_eq(moe_cnn_config_check(&m), CM_ERR_INVALID);
    m = tiny_moe_config(MOE_CNN_ROUTING_IMAGE);
    m.layer_router.widths[0] = 0;
    ck_assert_int_eq(moe_cnn_config_check(&m), CM_ERR_INVALID);
    m = tiny_moe_config((moe_cnn_routing)7);
    ck_assert_int_eq(moe_cnn_config_check(&m), CM_ERR_INVALID);

    /* router_input only makes sense with one image-level router. */
    moe_fixture f;
    m = tiny_moe_config(MOE_CNN_ROUTING_PER_LAYER);
    moe_setup(&f, &m, 120);
    ag_tensor *x = gc_tensor_new(4, (int[]){2, 3, 7, 7}, 0.0f, 1.0f, 121, false);
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    moe_cnn_output out;
    moe_cnn_forward_args args = {.router_input = x};
    ck_assert_int_eq(moe_cnn_forward(&ctx, &f.model, x, &args, &out), CM_ERR_INVALID);
    /* A full arena is reported, not a crash. */
    ag_ctx tiny;
    ck_assert_int_eq(ag_ctx_init(&tiny, 4096), CM_OK);
    args.router_input = NULL;
    ck_assert_int_eq(moe_cnn_forward(&tiny, &f.model, x, &args, &out), CM_ERR_NOMEM);
    ag_ctx_free(&tiny);
    ag_ctx_free(&ctx);
    gc_tensor_free(x);
    ag_params_free(&f.params);
}
END_TEST

/* ---- FLOPs ---------------------------------------------------------------------------- */

START_TEST(test_flops) {
    /* 1 input channel, 8x8, stem 4, stage widths 4 and 8, one block each,
     * 10 classes. Multiply-adds by hand (CO * CI * K * K * HO * WO):
     *   stem 4*1*9*64 = 2304
     *   block 0 (4 -> 4, 8x8, identity): 4*4*9*64 + 4*4*9*64 = 18432
     *   block 1 (4 -> 8, stride 2, 4x4): 8*4*9*16 + 8*8*9*16 + 8*4*16 = 14336
     *   fc 8*10 = 80                                        total 35152 */
    cnn_config dense = cnn_default_config();
    dense.stem_channels = 4;
    dense.n_stages = 2;
    dense.widths[0] = 4;
    dense.widths[1] = 8;
    dense.blocks[0] = dense.blocks[1] = 1;
    ck_assert_int_eq(cnn_flops(&dense, 8, 8), 35152);

    /* E = 2, ratio 0.5: widths 2 and 4, stem 4 (projection in block 0):
     *   stem 2304
     *   block 0 (4 -> 2): 2*4*9*64 + 2*2*9*64 + 2*4*64 = 4608 + 2304 + 512
     *   block 1 (2 -> 4, stride 2): 4*2*9*16 + 4*4*9*16 + 4*2*16 = 1152 + 2304 + 128
     *   fc 4*10 = 40                               backbone 13352
     * every group: stem + 2*(4608+2304) + 512 + 2*(1152+2304) + 128 + 40 = 23720
     * image router, one conv of 2: 2*1*9*64 + 2*2 = 1156 -> inference 14508
     * per-layer routers (one conv of 2 each, on each MoE conv's input):
     *   4 ch 8x8: 2*4*9*64 + 4 = 4612;  2 ch 8x8: 2*2*9*64 + 4 = 2308 (twice);
     *   4 ch at 4x4: 2*4*9*16 + 4 = 1156                    router 10384 */
    moe_cnn_config moe = moe_cnn_default_config();
    moe.body = dense;
    moe.body.ratio = 0.5f;
    moe.num_experts = 2;
    moe.router = (moe_router_config){1, {2}};
    moe.layer_router = (moe_router_config){1, {2}};
    moe_cnn_flops_report r = moe_cnn_flops(&moe, 8, 8);
    ck_assert_int_eq(r.backbone, 13352);
    ck_assert_int_eq(r.all_groups, 23720);
    ck_assert_int_eq(r.router, 1156);
    ck_assert_int_eq(r.total, 14508);
    double share = (double)r.total / 35152.0;
    ck_assert_msg(share >= 0.25 && share <= 0.5, "MoE inference at %.3f of dense", share);
    moe.routing = MOE_CNN_ROUTING_PER_LAYER;
    r = moe_cnn_flops(&moe, 8, 8);
    ck_assert_int_eq(r.backbone, 13352);
    ck_assert_int_eq(r.router, 10384);

    /* E = 1 is the dense count at the same ratio, with no router. */
    moe.num_experts = 1;
    moe.body.ratio = 1.0f;
    r = moe_cnn_flops(&moe, 8, 8);
    ck_assert_int_eq(r.backbone, 35152);
    ck_assert_int_eq(r.all_groups, 35152);
    ck_assert_int_eq(r.router, 0);

    /* The Fashion-MNIST defaults keep the paper's claim (25-50% of dense). */
    moe_cnn_config fashion = moe_cnn_default_config();
    cnn_config fashion_dense = cnn_default_config();
    share =
        (double)moe_cnn_flops(&fashion, 28, 28).total / (double)cnn_flops(&fashion_dense, 28, 28);
    ck_assert_msg(share >= 0.25 && share <= 0.5, "default MoE at %.3f of dense", share);
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
    tcase_add_test(moe, test_moe_cnn_structure);
    tcase_add_test(moe, test_moe_cnn_forward_values);
    tcase_add_test(moe, test_moe_cnn_gradcheck);
    tcase_add_test(moe, test_moe_cnn_router_gradient);
    tcase_add_test(moe, test_moe_cnn_single_expert_is_dense);
    tcase_add_test(moe, test_config_errors);
    tcase_add_test(moe, test_flops);
    suite_add_tcase(suite, moe);
    SRunner *runner = srunner_create(suite);
    srunner_run_all(runner, CK_NORMAL);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
