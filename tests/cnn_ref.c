/* Shared helpers of the CNN tests (see cnn_ref.h). */
#include "cnn_ref.h"

#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

static bool ends_with(const char *text, const char *suffix) {
    size_t n = strlen(text), m = strlen(suffix);
    return n >= m && strcmp(text + n - m, suffix) == 0;
}

/* Replaces the structured init (BN 1/0, tiny classifier) by seeded values of
 * the same kind, so no gradient is trivially zero or one. */
void randomize_params(ag_params *params, uint64_t seed) {
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
void avoid_relu_kinks(ag_params *params) {
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

ag_tensor *param(const ag_params *params, const char *name) {
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

double *ref_cnn(const cnn_model *model, const ag_tensor *x, bool training) {
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

double *ref_moe(const moe_cnn_model *model, const ag_tensor *x, bool training,
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

/* stem 4, stage 0: one block of width 4 (identity shortcut), stage 1: one
 * block of width 6 (stride 2, projection); 3 input channels, 5 classes. */
cnn_config tiny_config(void) {
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

void dense_setup(dense_fixture *f, const cnn_config *config, uint64_t seed) {
    ag_params_init(&f->params);
    ck_assert_int_eq(cnn_declare(&f->model, config, &f->params, NULL), CM_OK);
    ck_assert_int_eq(ag_params_finalize(&f->params, seed), CM_OK);
    randomize_params(&f->params, seed);
}
