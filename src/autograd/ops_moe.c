/* Ops for routing and expert computation: element gather, segment softmax,
 * row sums, the per-expert (grouped) linear layer, the experts' hidden layer
 * fused into their second product, and the whole expert FFN with its hidden
 * layer recomputed in backward (grouped_ffn, train.recompute: experts). */
#include <assert.h>
#include <math.h>
#include <string.h>

#include "autograd/fastmath.h"
#include "autograd/activations.h"
#include "autograd/op_write.h"
#include "common/pool.h"

/* ---- gather_elements: x [*] flat, index[s] -> [s] -------------------------- */

typedef struct gather_elements_saved {
    const int32_t *index;
} gather_elements_saved;

static void gather_elements_backward(ag_ctx *ctx, ag_node *node) {
    (void)ctx;
    const gather_elements_saved *saved = node->saved;
    ag_tensor *x = node->in[0];
    const float *dout = node->out->grad;
    for (int64_t i = 0; i < node->out->numel; i++) x->grad[saved->index[i]] += dout[i];
}

ag_tensor *ag_gather_elements(ag_ctx *ctx, ag_tensor *x, const int32_t *index, int s) {
    AG_OP_BEGIN(ctx, x);
    for (int i = 0; i < s; i++)
        CM_ASSERT(index[i] >= 0 && index[i] < x->numel,
                  "gather_elements: index[%d] = %d is out of range [0,%lld)", i, index[i],
                  (long long)x->numel);
    ag_tensor *out = ag_empty(ctx, "gather_elements", 1, &s);
    if (!out) return NULL;
    for (int i = 0; i < s; i++) out->data[i] = x->data[index[i]];
    ag_node *node = ag_record(ctx, "gather_elements", gather_elements_backward, out, 1, &x,
                              sizeof(gather_elements_saved));
    if (ag_failed(ctx)) return NULL;
    if (node) ((gather_elements_saved *)node->saved)->index = index;
    return out;
}

/* ---- segment_softmax: x [S], offsets[n+1] -> [S] ----------------------------- */

typedef struct segment_saved {
    const int32_t *offsets;
    int n_segments;
} segment_saved;

/* dx = y (dy - sum_segment(dy y)) */
static void segment_softmax_backward(ag_ctx *ctx, ag_node *node) {
    (void)ctx;
    const segment_saved *saved = node->saved;
    ag_tensor *x = node->in[0];
    const float *y = node->out->data, *dy = node->out->grad;
    for (int g = 0; g < saved->n_segments; g++) {
        int begin = saved->offsets[g], end = saved->offsets[g + 1];
        double dot = 0.0;
        for (int i = begin; i < end; i++) dot += (double)dy[i] * y[i];
        for (int i = begin; i < end; i++) x->grad[i] += y[i] * (dy[i] - (float)dot);
    }
}

ag_tensor *ag_segment_softmax(ag_ctx *ctx, ag_tensor *x, const int32_t *offsets, int n_segments) {
    AG_OP_BEGIN(ctx, x);
    CM_ASSERT(offsets[0] == 0 && offsets[n_segments] == x->numel,
              "segment_softmax: offsets span [%d,%d) but x has %lld elements", offsets[0],
              offsets[n_segments], (long long)x->numel);
    ag_tensor *out = ag_empty(ctx, "segment_softmax", x->ndim, x->shape);
    if (!out) return NULL;
    for (int g = 0; g < n_segments; g++) {
        int begin = offsets[g], end = offsets[g + 1];
        CM_ASSERT(begin <= end, "segment_softmax: offsets not ascending at segment %d", g);
        float max = -INFINITY;
        for (int i = begin; i < end; i++) max = x->data[i] > max ? x->data[i] : max;
        double total = 0.0;
        for (int i = begin; i < end; i++) {
            out->data[i] = cm_expf(x->data[i] - max);
            total += out->data[i];
        }
        float inverse = (float)(1.0 / total);
        for (int i = begin; i < end; i++) out->data[i] *= inverse;
    }
    ag_node *node = ag_record(ctx, "segment_softmax", segment_softmax_backward, out, 1, &x,
                              sizeof(segment_saved));
    if (ag_failed(ctx)) return NULL;
    if (node) *(segment_saved *)node->saved = (segment_saved){offsets, n_segments};
    return out;
}

/* ---- sum_rows: x [N,D] -> [D] ---------------------------------------------------- */

static void sum_rows_backward(ag_ctx *ctx, ag_node *node) {
    (void)ctx;
    ag_tensor *x = node->in[0];
    const int d = ag_last_dim(x);
    const float *dout = node->out->grad;
    for (int64_t row = 0; row < ag_rows(x); row++) {
        float *dx = x->grad + row * d;
        for (int j = 0; j < d; j++) dx[j] += dout[j];
    }
}

ag_tensor *ag_sum_rows(ag_ctx *ctx, ag_tensor *x) {
    AG_OP_BEGIN(ctx, x);
    const int d = ag_last_dim(x);
    ag_tensor *out = ag_zeros(ctx, "sum_rows", 1, &d);
    if (!out) return NULL;
    for (int64_t row = 0; row < ag_rows(x); row++) {
        const float *x_row = x->data + row * d;
        for (int j = 0; j < d; j++) out->data[j] += x_row[j];
    }
    ag_record(ctx, "sum_rows", sum_rows_backward, out, 1, &x, 0);
    return ag_failed(ctx) ? NULL : out;
}

/* ---- grouped_linear: x [S,IN], w [E,OUT,IN], bias [E,OUT] -> [S,OUT] ------------- */

typedef struct grouped_saved {
    const int32_t *offsets;
} grouped_saved;

/* dx [S,IN] += dy w_e (per group), dw += dy_e^T x_e, dbias += rows of dy, for
 * x [S,IN] (dx may be NULL: no input gradient wanted). */
static void grouped_backward_products(const int32_t *offsets, const float *x, float *dx,
                                      ag_tensor *w, ag_tensor *bias, const float *dy) {
    const int experts = w->shape[0], out_features = w->shape[1], in_features = w->shape[2];
    const int64_t w_stride = (int64_t)out_features * in_features;
    for (int e = 0; e < experts; e++) {
        int rows = offsets[e + 1] - offsets[e];
        if (rows == 0) continue;
        const float *dy_e = dy + (int64_t)offsets[e] * out_features;
        const float *x_e = x + (int64_t)offsets[e] * in_features;
        /* dx_e [rows,IN] += dy_e [rows,OUT] w_e [OUT,IN] */
        if (dx)
            ag_sgemm(false, false, rows, in_features, out_features, 1.0f, dy_e, out_features,
                     w->data + e * w_stride, in_features, 1.0f,
                     dx + (int64_t)offsets[e] * in_features, in_features);
        /* dw_e [OUT,IN] += dy_e^T [OUT,rows] x_e [rows,IN] */
        if (ag_wants_grad(w))
            ag_sgemm(true, false, out_features, in_features, rows, 1.0f, dy_e, out_features, x_e,
                     in_features, 1.0f, w->grad + e * w_stride, in_features);
        if (bias && ag_wants_grad(bias)) {
            float *db = bias->grad + (int64_t)e * out_features;
            for (int r = 0; r < rows; r++)
                for (int j = 0; j < out_features; j++) db[j] += dy_e[(int64_t)r * out_features + j];
        }
    }
}

static void grouped_linear_backward(ag_ctx *ctx, ag_node *node) {
    (void)ctx;
    const int32_t *offsets = ((const grouped_saved *)node->saved)->offsets;
    ag_tensor *x = node->in[0];
    grouped_backward_products(offsets, x->data, ag_wants_grad(x) ? x->grad : NULL, node->in[1],
                              node->n_in > 2 ? node->in[2] : NULL, node->out->grad);
}

/* out [S,OUT] = x w_e^T (+ bias_e) per group, x [S,IN]. */
static void grouped_forward_products(const int32_t *offsets, const float *x, const ag_tensor *w,
                                     const ag_tensor *bias, float *out) {
    const int experts = w->shape[0], out_features = w->shape[1], in_features = w->shape[2];
    const int64_t w_stride = (int64_t)out_features * in_features;
    for (int e = 0; e < experts; e++) {
        int rows = offsets[e + 1] - offsets[e];
        CM_ASSERT(rows >= 0, "grouped_linear: offsets not ascending at expert %d", e);
        if (rows == 0) continue;
        float *y_e = out + (int64_t)offsets[e] * out_features;
        float beta = 0.0f;
        if (bias) {
            const float *b = bias->data + (int64_t)e * out_features;
            for (int r = 0; r < rows; r++)
                memcpy(y_e + (int64_t)r * out_features, b, (size_t)out_features * sizeof(float));
            beta = 1.0f;
        }
        /* y_e [rows,OUT] = x_e [rows,IN] w_e^T [IN,OUT] (+ bias rows) */
        ag_sgemm(false, true, rows, out_features, in_features, 1.0f,
                 x + (int64_t)offsets[e] * in_features, in_features, w->data + e * w_stride,
                 in_features, beta, y_e, out_features);
    }
}

/* Shapes shared by grouped_linear and grouped_linear_act. */
static void check_grouped(const char *op, const ag_tensor *x, const ag_tensor *w,
                          const ag_tensor *bias, const int32_t *offsets) {
    AG_CHECK_SHAPES(x->ndim == 2 && w->ndim == 3 && x->shape[1] == w->shape[2], op, x, w);
    const int experts = w->shape[0], out_features = w->shape[1];
    if (bias)
        AG_CHECK_SHAPES(bias->ndim == 2 && bias->shape[0] == experts &&
                            bias->shape[1] == out_features,
                        op, w, bias);
    CM_ASSERT(offsets[0] == 0 && offsets[experts] == x->shape[0],
              "%s: offsets span [%d,%d) but x has %d rows", op, offsets[0], offsets[experts],
              x->shape[0]);
}

ag_tensor *ag_grouped_linear(ag_ctx *ctx, ag_tensor *x, ag_tensor *w, ag_tensor *bias,
                             const int32_t *offsets) {
    AG_OP_BEGIN(ctx, x, w);
    check_grouped("grouped_linear", x, w, bias, offsets);
    ag_tensor *out = ag_empty(ctx, "grouped_linear", 2, (int[]){x->shape[0], w->shape[1]});
    if (!out) return NULL;
    grouped_forward_products(offsets, x->data, w, bias, out->data);
    ag_tensor *inputs[3] = {x, w, bias};
    ag_node *node = ag_record(ctx, "grouped_linear", grouped_linear_backward, out, bias ? 3 : 2,
                              inputs, sizeof(grouped_saved));
    if (ag_failed(ctx)) return NULL;
    if (node) ((grouped_saved *)node->saved)->offsets = offsets;
    return out;
}

/* ---- grouped_linear_act / grouped_linear_hidden: the experts' hidden layer ---------
 * a [S,IN] from h (and up) per ag_hidden_layer, through w, bias -> [S,OUT] */

const char *const ag_activation_names[] = {"gelu", "relu", "silu", "swiglu", NULL};
static_assert(sizeof ag_activation_names / sizeof ag_activation_names[0] == AG_ACT_COUNT + 1,
              "ag_activation_names out of sync with ag_activation");

typedef struct grouped_act_saved {
    const int32_t *offsets;
    ag_hidden_layer hidden;
    bool has_bias; /* inputs: h, w, [bias], [up] */
} grouped_act_saved;

#define ACT_GRAIN 16384 /* elements per task below which the loop stays on one thread */

/* One range of the hidden layer; the pointers start at the same row. */
typedef struct act_job {
    ag_activation activation;
    const float *h, *up;
    const uint8_t *keep;
    float keep_scale;
    float *a, *da, *dh, *dup;
} act_job;

/* a = act(h) (swiglu: silu(h) up), then the dropout mask, over [begin, end) */
static void act_forward_range(void *context, int64_t begin, int64_t end) {
    const act_job *j = context;
    switch (j->activation) {
    case AG_ACT_RELU:
        for (int64_t i = begin; i < end; i++) j->a[i] = ag_relu_value(j->h[i]);
        break;
    case AG_ACT_SILU:
        for (int64_t i = begin; i < end; i++) j->a[i] = ag_silu_value(j->h[i]);
        break;
    case AG_ACT_SWIGLU:
        for (int64_t i = begin; i < end; i++) j->a[i] = ag_silu_value(j->h[i]) * j->up[i];
        break;
    case AG_ACT_GELU:
    case AG_ACT_COUNT: /* rejected by grouped_hidden */
        for (int64_t i = begin; i < end; i++) j->a[i] = ag_gelu_value(j->h[i]);
    }
    if (j->keep)
        for (int64_t i = begin; i < end; i++) j->a[i] = j->keep[i] ? j->a[i] * j->keep_scale : 0.0f;
}

/* da through the mask (in place), then dh += da act'(h) (swiglu: dh += da up
 * silu'(h), dup += da silu(h)) over [begin, end); dh or dup may be NULL. */
static void act_backward_range(void *context, int64_t begin, int64_t end) {
    const act_job *j = context;
    float *da = j->da;
    if (j->keep)
        for (int64_t i = begin; i < end; i++) da[i] = j->keep[i] ? da[i] * j->keep_scale : 0.0f;
    switch (j->activation) {
    case AG_ACT_RELU:
        for (int64_t i = begin; i < end; i++) j->dh[i] += da[i] * ag_relu_derivative(j->h[i]);
        break;
    case AG_ACT_SILU:
        for (int64_t i = begin; i < end; i++) j->dh[i] += da[i] * ag_silu_derivative(j->h[i]);
        break;
    case AG_ACT_SWIGLU:
        if (j->dh)
            for (int64_t i = begin; i < end; i++)
                j->dh[i] += da[i] * j->up[i] * ag_silu_derivative(j->h[i]);
        if (j->dup)
            for (int64_t i = begin; i < end; i++) j->dup[i] += da[i] * ag_silu_value(j->h[i]);
        break;
    case AG_ACT_GELU:
    case AG_ACT_COUNT: /* rejected by grouped_hidden */
        for (int64_t i = begin; i < end; i++) j->dh[i] += da[i] * ag_gelu_derivative(j->h[i]);
    }
}

/* The rows of the largest group. */
static int most_rows(const int32_t *offsets, int experts) {
    int most = 0;
    for (int e = 0; e < experts; e++)
        if (offsets[e + 1] - offsets[e] > most) most = offsets[e + 1] - offsets[e];
    return most;
}

/* Expert e's part of t [E,...] (weight, bias and gradient) as a one-group
 * tensor [1,...] in *slice; NULL when t is. */
static ag_tensor *expert_slice(const ag_tensor *t, int e, ag_tensor *slice) {
    if (!t) return NULL;
    const int64_t size = t->numel / t->shape[0], at = (int64_t)e * size;
    int shape[3] = {1, t->shape[1], t->ndim == 3 ? t->shape[2] : 0};
    *slice = ag_tensor_wrap(t->data + at, t->grad ? t->grad + at : NULL, t->ndim, shape,
                            t->requires_grad);
    return slice;
}

/* One expert at a time, so the scratch (a again, and its gradient) is the
 * size of the largest expert's rows, not of all of h. */
static void grouped_linear_act_backward(ag_ctx *ctx, ag_node *node) {
    const grouped_act_saved *saved = node->saved;
    const int32_t *offsets = saved->offsets;
    const ag_hidden_layer *hidden = &saved->hidden;
    ag_tensor *h = node->in[0], *w = node->in[1], *bias = saved->has_bias ? node->in[2] : NULL;
    ag_tensor *up = hidden->up;
    const int experts = w->shape[0], out_features = w->shape[1], in_features = w->shape[2];
    const int largest = most_rows(offsets, experts);
    if (largest == 0) return;
    const bool h_grad = ag_wants_grad(h), up_grad = up && ag_wants_grad(up);
    const int64_t scratch_size = (int64_t)largest * in_features;
    float *a = ag_alloc_floats(ctx, scratch_size, "grouped_linear_act backward");
    float *da = h_grad || up_grad
                    ? ag_alloc_floats(ctx, scratch_size, "grouped_linear_act backward")
                    : NULL;
    if (!a || ((h_grad || up_grad) && !da)) return; /* ctx->status holds the error */
    int32_t one_group[2] = {0, 0};
    for (int e = 0; e < experts; e++) {
        int rows = offsets[e + 1] - offsets[e];
        if (rows == 0) continue;
        int64_t first = offsets[e], count = (int64_t)rows * in_features;
        ag_tensor w_e, b_e;
        const int64_t at = first * in_features;
        act_job job = {.activation = hidden->activation,
                       .h = h->data + at,
                       .up = up ? up->data + at : NULL,
                       .keep = hidden->keep ? hidden->keep + at : NULL,
                       .keep_scale = hidden->keep_scale,
                       .a = a};
        cm_pool_for(count, ACT_GRAIN, act_forward_range, &job);
        if (da) memset(da, 0, (size_t)count * sizeof(float));
        one_group[1] = rows;
        grouped_backward_products(one_group, a, da, expert_slice(w, e, &w_e),
                                  expert_slice(bias, e, &b_e),
                                  node->out->grad + first * out_features);
        if (!da) continue;
        job.da = da;
        job.dh = h_grad ? h->grad + at : NULL;
        job.dup = up_grad ? up->grad + at : NULL;
        cm_pool_for(count, ACT_GRAIN, act_backward_range, &job);
    }
}

static ag_tensor *grouped_hidden(ag_ctx *ctx, const char *op, ag_tensor *h,
                                 const ag_hidden_layer *hidden, ag_tensor *w, ag_tensor *bias,
                                 const int32_t *offsets) {
    check_grouped(op, h, w, bias, offsets);
    const ag_activation activation = hidden->activation;
    CM_ASSERT(activation >= 0 && activation < AG_ACT_COUNT, "%s: unknown activation %d", op,
              (int)activation);
    ag_tensor *up = hidden->up;
    CM_ASSERT((activation == AG_ACT_SWIGLU) == (up != NULL),
              "%s: the up projection is for swiglu alone (activation %s, up %s)", op,
              ag_activation_names[activation], up ? "given" : "missing");
    if (up) AG_CHECK_SHAPES(up->ndim == 2 && up->numel == h->numel, op, h, up);
    CM_ASSERT(!hidden->keep || hidden->keep_scale >= 1.0f,
              "%s: dropout keep_scale %g is not 1/(1-p) of a p in [0,1)", op,
              (double)hidden->keep_scale);
    ag_tensor *out = ag_empty(ctx, op, 2, (int[]){h->shape[0], w->shape[1]});
    if (!out) return NULL;
    ag_tensor *inputs[4] = {h, w};
    int n_in = 2;
    if (bias) inputs[n_in++] = bias;
    if (up) inputs[n_in++] = up;
    ag_node *node = ag_record(ctx, op, grouped_linear_act_backward, out, n_in, inputs,
                              sizeof(grouped_act_saved));
    if (ag_failed(ctx)) return NULL;
    if (node)
        *(grouped_act_saved *)node->saved = (grouped_act_saved){offsets, *hidden, bias != NULL};
    /* a lives only while the products use it */
    size_t scratch = ag_scratch_mark(ctx);
    float *a = ag_alloc_floats(ctx, h->numel, op);
    if (!a) return NULL;
    act_job job = {.activation = activation,
                   .h = h->data,
                   .up = up ? up->data : NULL,
                   .keep = hidden->keep,
                   .keep_scale = hidden->keep_scale,
                   .a = a};
    cm_pool_for(h->numel, ACT_GRAIN, act_forward_range, &job);
    grouped_forward_products(offsets, a, w, bias, out->data);
    ag_scratch_release(ctx, scratch);
    return out;
}

ag_tensor *ag_grouped_linear_act(ag_ctx *ctx, ag_tensor *h, ag_activation activation, ag_tensor *w,
                                 ag_tensor *bias, const int32_t *offsets) {
    AG_OP_BEGIN(ctx, h, w);
    CM_ASSERT(activation != AG_ACT_SWIGLU,
              "grouped_linear_act: swiglu needs the up projection (ag_grouped_linear_hidden)");
    return grouped_hidden(ctx, "grouped_linear_act", h,
                          &(ag_hidden_layer){.activation = activation}, w, bias, offsets);
}

ag_tensor *ag_grouped_linear_hidden(ag_ctx *ctx, ag_tensor *h, const ag_hidden_layer *hidden,
                                    ag_tensor *w, ag_tensor *bias, const int32_t *offsets) {
    AG_OP_BEGIN(ctx, h, w);
    if (hidden->activation == AG_ACT_SWIGLU && !hidden->up) return NULL; /* a failed input */
    return grouped_hidden(ctx, "grouped_linear_hidden", h, hidden, w, bias, offsets);
}

/* ---- grouped_ffn: x [S,IN] -> [S,OUT], the hidden layer recomputed --------------- */

typedef struct grouped_ffn_saved {
    const int32_t *offsets;
    ag_expert_ffn ffn;
} grouped_ffn_saved;

/* Per-expert buffers, each the size of the largest expert's [rows,H]. */
typedef struct ffn_scratch {
    float *h, *up, *a, *da, *dup; /* up, dup: swiglu; da, dup: backward */
    uint8_t *keep;                /* dropout only */
} ffn_scratch;

static bool ffn_scratch_alloc(ag_ctx *ctx, const ag_expert_ffn *ffn, int64_t size, bool backward,
                              ffn_scratch *s) {
    const char *op = "grouped_ffn";
    const bool swiglu = ffn->activation == AG_ACT_SWIGLU;
    *s = (ffn_scratch){.h = ag_alloc_floats(ctx, size, op), .a = ag_alloc_floats(ctx, size, op)};
    if (swiglu) s->up = ag_alloc_floats(ctx, size, op);
    if (backward) s->da = ag_alloc_floats(ctx, size, op);
    if (backward && swiglu) s->dup = ag_alloc_floats(ctx, size, op);
    if (ffn->keep_fn) s->keep = ag_alloc(ctx, (size_t)size, op);
    return !ag_failed(ctx);
}

/* h, up, the mask and a of expert e, rows [first, first+rows) of x, into s:
 * the products of ag_grouped_linear and the loop of grouped_hidden. */
static act_job ffn_hidden(const ag_expert_ffn *ffn, const float *x, int e, int first, int rows,
                          const ffn_scratch *s) {
    const int in_features = ffn->w1->shape[2], hidden = ffn->w1->shape[1];
    const float *x_e = x + (int64_t)first * in_features;
    const int32_t one_group[2] = {0, rows};
    ag_tensor w_e, b_e;
    grouped_forward_products(one_group, x_e, expert_slice(ffn->w1, e, &w_e),
                             expert_slice(ffn->b1, e, &b_e), s->h);
    if (ffn->w3)
        grouped_forward_products(one_group, x_e, expert_slice(ffn->w3, e, &w_e),
                                 expert_slice(ffn->b3, e, &b_e), s->up);
    if (ffn->keep_fn) ffn->keep_fn(ffn->keep_context, first, rows, s->keep);
    act_job job = {.activation = ffn->activation,
                   .h = s->h,
                   .up = s->up,
                   .keep = s->keep,
                   .keep_scale = ffn->keep_scale,
                   .a = s->a};
    cm_pool_for((int64_t)rows * hidden, ACT_GRAIN, act_forward_range, &job);
    return job;
}

/* Expert by expert, in the composition's order: dW2, db2 and da (through
 * the mask and the activation: dh, dup), then w3's products, then w1's. */
static void grouped_ffn_backward(ag_ctx *ctx, ag_node *node) {
    const grouped_ffn_saved *saved = node->saved;
    const ag_expert_ffn *ffn = &saved->ffn;
    const int32_t *offsets = saved->offsets;
    ag_tensor *x = node->in[0];
    const int experts = ffn->w1->shape[0], hidden = ffn->w1->shape[1];
    const int in_features = x->shape[1], out_features = ffn->w2->shape[1];
    const int largest = most_rows(offsets, experts);
    ffn_scratch s;
    if (largest == 0 || !ffn_scratch_alloc(ctx, ffn, (int64_t)largest * hidden, true, &s)) return;
    for (int e = 0; e < experts; e++) {
        const int first = offsets[e], rows = offsets[e + 1] - first;
        if (rows == 0) continue;
        const size_t bytes = (size_t)rows * (size_t)hidden * sizeof(float);
        const int32_t one_group[2] = {0, rows};
        ag_tensor w_e, b_e;
        act_job job = ffn_hidden(ffn, x->data, e, first, rows, &s);
        memset(s.da, 0, bytes);
        grouped_backward_products(one_group, s.a, s.da, expert_slice(ffn->w2, e, &w_e),
                                  expert_slice(ffn->b2, e, &b_e),
                                  node->out->grad + (int64_t)first * out_features);
        memset(s.a, 0, bytes); /* a is spent: it holds dh now */
        if (s.dup) memset(s.dup, 0, bytes);
        job.da = s.da;
        job.dh = s.a;
        job.dup = s.dup;
        cm_pool_for((int64_t)rows * hidden, ACT_GRAIN, act_backward_range, &job);
        const float *x_e = x->data + (int64_t)first * in_features;
        float *dx_e = ag_wants_grad(x) ? x->grad + (int64_t)first * in_features : NULL;
        if (ffn->w3)
            grouped_backward_products(one_group, x_e, dx_e, expert_slice(ffn->w3, e, &w_e),
                                      expert_slice(ffn->b3, e, &b_e), s.dup);
        grouped_backward_products(one_group, x_e, dx_e, expert_slice(ffn->w1, e, &w_e),
                                  expert_slice(ffn->b1, e, &b_e), s.a);
    }
}

static void check_ffn(const ag_tensor *x, const ag_expert_ffn *ffn, const int32_t *offsets) {
    const char *op = "grouped_ffn";
    check_grouped(op, x, ffn->w1, ffn->b1, offsets);
    const bool swiglu = ffn->activation == AG_ACT_SWIGLU;
    CM_ASSERT(ffn->activation >= 0 && ffn->activation < AG_ACT_COUNT && swiglu == (ffn->w3 != NULL),
              "%s: activation %d with%s an up projection", op, (int)ffn->activation,
              ffn->w3 ? "" : "out");
    if (swiglu) AG_CHECK_SHAPES(ag_same_shape(ffn->w1, ffn->w3), op, ffn->w1, ffn->w3);
    AG_CHECK_SHAPES(ffn->w2->ndim == 3 && ffn->w2->shape[0] == ffn->w1->shape[0] &&
                        ffn->w2->shape[2] == ffn->w1->shape[1],
                    op, ffn->w1, ffn->w2);
    if (ffn->b2)
        AG_CHECK_SHAPES(ffn->b2->ndim == 2 && ffn->b2->shape[0] == ffn->w2->shape[0] &&
                            ffn->b2->shape[1] == ffn->w2->shape[1],
                        op, ffn->w2, ffn->b2);
    CM_ASSERT(!ffn->keep_fn || ffn->keep_scale >= 1.0f,
              "%s: dropout keep_scale %g is not 1/(1-p) of a p in [0,1)", op,
              (double)ffn->keep_scale);
}

ag_tensor *ag_grouped_ffn(ag_ctx *ctx, ag_tensor *x, const ag_expert_ffn *ffn,
                          const int32_t *offsets) {
    AG_OP_BEGIN(ctx, x, ffn->w1, ffn->w2);
    check_ffn(x, ffn, offsets);
    const int experts = ffn->w1->shape[0], hidden = ffn->w1->shape[1];
    ag_tensor *out = ag_empty(ctx, "grouped_ffn", 2, (int[]){x->shape[0], ffn->w2->shape[1]});
    if (!out) return NULL;
    ag_tensor *inputs[7] = {x};
    int n_in = 1;
    ag_tensor *const params[6] = {ffn->w1, ffn->b1, ffn->w3, ffn->b3, ffn->w2, ffn->b2};
    for (int i = 0; i < 6; i++)
        if (params[i]) inputs[n_in++] = params[i];
    ag_node *node = ag_record(ctx, "grouped_ffn", grouped_ffn_backward, out, n_in, inputs,
                              sizeof(grouped_ffn_saved));
    if (ag_failed(ctx)) return NULL;
    if (node) *(grouped_ffn_saved *)node->saved = (grouped_ffn_saved){offsets, *ffn};
    const int largest = most_rows(offsets, experts);
    size_t mark = ag_scratch_mark(ctx);
    ffn_scratch s;
    if (largest > 0 && !ffn_scratch_alloc(ctx, ffn, (int64_t)largest * hidden, false, &s))
        return NULL;
    for (int e = 0; e < experts && largest > 0; e++) {
        const int first = offsets[e], rows = offsets[e + 1] - first;
        if (rows == 0) continue;
        ffn_hidden(ffn, x->data, e, first, rows, &s);
        ag_tensor w_e, b_e;
        grouped_forward_products((const int32_t[]){0, rows}, s.a, expert_slice(ffn->w2, e, &w_e),
                                 expert_slice(ffn->b2, e, &b_e),
                                 out->data + (int64_t)first * ffn->w2->shape[1]);
    }
    ag_scratch_release(ctx, mark);
    return out;
}
