/* Elementwise ops: binary with broadcasting, scale, activations, dropout. */
#include <math.h>
#include <string.h>

#include "autograd/activations.h"
#include "autograd/op_write.h"
#include "common/pool.h"

/* ---- broadcasting binary ops ---------------------------------------------- */

typedef enum { BINARY_ADD, BINARY_SUB, BINARY_MUL } binary_kind;
static const char *const binary_names[] = {"add", "sub", "mul"};

/* a's shape and b's strides, both padded on the left to 4 dims; a b-stride
 * of 0 marks a broadcast dimension. */
typedef struct broadcast {
    int shape[4];
    int64_t b_stride[4];
} broadcast;

static broadcast make_broadcast(const ag_tensor *a, const ag_tensor *b, const char *op) {
    AG_CHECK_SHAPES(b->ndim <= a->ndim, op, a, b);
    broadcast bc;
    int64_t stride = 1;
    for (int d = 3; d >= 0; d--) {
        int ad = d - (4 - a->ndim), bd = d - (4 - b->ndim);
        int a_size = ad >= 0 ? a->shape[ad] : 1;
        int b_size = bd >= 0 ? b->shape[bd] : 1;
        AG_CHECK_SHAPES(b_size == a_size || b_size == 1, op, a, b);
        bc.shape[d] = a_size;
        bc.b_stride[d] = b_size == 1 ? 0 : stride;
        stride *= b_size;
    }
    return bc;
}

/* out = a (op) b over the broadcast; inner dimension specialised on whether
 * b is broadcast along it so the loop vectorises. */
static void binary_forward(binary_kind kind, const broadcast *bc, const float *a, const float *b,
                           float *out) {
    int n3 = bc->shape[3];
    int64_t bs3 = bc->b_stride[3];
    for (int i0 = 0; i0 < bc->shape[0]; i0++)
        for (int i1 = 0; i1 < bc->shape[1]; i1++)
            for (int i2 = 0; i2 < bc->shape[2]; i2++) {
                int64_t ai = (((int64_t)i0 * bc->shape[1] + i1) * bc->shape[2] + i2) * n3;
                int64_t bi = i0 * bc->b_stride[0] + i1 * bc->b_stride[1] + i2 * bc->b_stride[2];
                const float *arow = a + ai, *brow = b + bi;
                float *orow = out + ai;
                if (bs3) {
                    if (kind == BINARY_ADD)
                        for (int i = 0; i < n3; i++) orow[i] = arow[i] + brow[i];
                    else if (kind == BINARY_SUB)
                        for (int i = 0; i < n3; i++) orow[i] = arow[i] - brow[i];
                    else
                        for (int i = 0; i < n3; i++) orow[i] = arow[i] * brow[i];
                } else {
                    float bv = brow[0];
                    if (kind == BINARY_ADD)
                        for (int i = 0; i < n3; i++) orow[i] = arow[i] + bv;
                    else if (kind == BINARY_SUB)
                        for (int i = 0; i < n3; i++) orow[i] = arow[i] - bv;
                    else
                        for (int i = 0; i < n3; i++) orow[i] = arow[i] * bv;
                }
            }
}

typedef struct binary_saved {
    binary_kind kind;
    broadcast bc;
} binary_saved;

/* da += dout * (b or 1); db += sum over broadcast of dout * (a or +-1). */
static void binary_backward(ag_ctx *ctx, ag_node *node) {
    (void)ctx;
    const binary_saved *saved = node->saved;
    const broadcast *bc = &saved->bc;
    ag_tensor *a = node->in[0], *b = node->in[1];
    const float *dout = node->out->grad;
    bool want_a = ag_wants_grad(a), want_b = ag_wants_grad(b);
    int n3 = bc->shape[3];
    int64_t bs3 = bc->b_stride[3];
    for (int i0 = 0; i0 < bc->shape[0]; i0++)
        for (int i1 = 0; i1 < bc->shape[1]; i1++)
            for (int i2 = 0; i2 < bc->shape[2]; i2++) {
                int64_t ai = (((int64_t)i0 * bc->shape[1] + i1) * bc->shape[2] + i2) * n3;
                int64_t bi = i0 * bc->b_stride[0] + i1 * bc->b_stride[1] + i2 * bc->b_stride[2];
                const float *drow = dout + ai;
                if (want_a) {
                    float *da = a->grad + ai;
                    if (saved->kind != BINARY_MUL)
                        for (int i = 0; i < n3; i++) da[i] += drow[i];
                    else if (bs3)
                        for (int i = 0; i < n3; i++) da[i] += drow[i] * b->data[bi + i];
                    else
                        for (int i = 0; i < n3; i++) da[i] += drow[i] * b->data[bi];
                }
                if (want_b) {
                    float *db = b->grad + bi;
                    const float *arow = a->data + ai;
                    if (bs3) {
                        if (saved->kind == BINARY_ADD)
                            for (int i = 0; i < n3; i++) db[i] += drow[i];
                        else if (saved->kind == BINARY_SUB)
                            for (int i = 0; i < n3; i++) db[i] -= drow[i];
                        else
                            for (int i = 0; i < n3; i++) db[i] += drow[i] * arow[i];
                    } else {
                        double total = 0.0;
                        if (saved->kind == BINARY_MUL)
                            for (int i = 0; i < n3; i++) total += (double)drow[i] * arow[i];
                        else
                            for (int i = 0; i < n3; i++) total += drow[i];
                        db[0] += saved->kind == BINARY_SUB ? (float)-total : (float)total;
                    }
                }
            }
}

static ag_tensor *binary_op(ag_ctx *ctx, binary_kind kind, ag_tensor *a, ag_tensor *b) {
    AG_OP_BEGIN(ctx, a, b);
    const char *op = binary_names[kind];
    broadcast bc = make_broadcast(a, b, op);
    ag_tensor *out = ag_empty(ctx, op, a->ndim, a->shape);
    if (!out) return NULL;
    binary_forward(kind, &bc, a->data, b->data, out->data);
    ag_tensor *inputs[2] = {a, b};
    ag_node *node = ag_record(ctx, op, binary_backward, out, 2, inputs, sizeof(binary_saved));
    if (ag_failed(ctx)) return NULL;
    if (node) *(binary_saved *)node->saved = (binary_saved){kind, bc};
    return out;
}

ag_tensor *ag_add(ag_ctx *ctx, ag_tensor *a, ag_tensor *b) {
    return binary_op(ctx, BINARY_ADD, a, b);
}
ag_tensor *ag_sub(ag_ctx *ctx, ag_tensor *a, ag_tensor *b) {
    return binary_op(ctx, BINARY_SUB, a, b);
}
ag_tensor *ag_mul(ag_ctx *ctx, ag_tensor *a, ag_tensor *b) {
    return binary_op(ctx, BINARY_MUL, a, b);
}

/* ---- unary ops ------------------------------------------------------------- */

/* Output of a unary op, with a node whose `saved` holds `saved_bytes`.
 * Returns NULL on failure; *node is NULL when no gradient is needed. */
static ag_tensor *unary_begin(ag_ctx *ctx, const char *op, ag_backward_fn backward, ag_tensor *a,
                              size_t saved_bytes, ag_node **node) {
    *node = NULL;
    ag_tensor *out = ag_empty(ctx, op, a->ndim, a->shape);
    if (!out) return NULL;
    *node = ag_record(ctx, op, backward, out, 1, &a, saved_bytes);
    return ag_failed(ctx) ? NULL : out;
}

/* a [*] -> [*] */
static void scale_backward(ag_ctx *ctx, ag_node *node) {
    (void)ctx;
    float factor = *(const float *)node->saved;
    ag_tensor *a = node->in[0];
    const float *dout = node->out->grad;
    for (int64_t i = 0; i < a->numel; i++) a->grad[i] += factor * dout[i];
}

ag_tensor *ag_scale(ag_ctx *ctx, ag_tensor *a, float factor) {
    AG_OP_BEGIN(ctx, a);
    ag_node *node;
    ag_tensor *out = unary_begin(ctx, "scale", scale_backward, a, sizeof(float), &node);
    if (!out) return NULL;
    for (int64_t i = 0; i < a->numel; i++) out->data[i] = factor * a->data[i];
    if (node) *(float *)node->saved = factor;
    return out;
}

/* Elements per task below which an elementwise loop stays on one thread. */
#define ELEMENTWISE_GRAIN 16384

typedef struct gelu_job {
    const float *x, *dout;
    float *out, *dx;
} gelu_job;

static void gelu_backward_range(void *context, int64_t begin, int64_t end) {
    const gelu_job *j = context;
    for (int64_t i = begin; i < end; i++) j->dx[i] += j->dout[i] * ag_gelu_derivative(j->x[i]);
}

static void gelu_backward(ag_ctx *ctx, ag_node *node) {
    (void)ctx;
    ag_tensor *a = node->in[0];
    gelu_job job = {.x = a->data, .dout = node->out->grad, .dx = a->grad};
    cm_pool_for(a->numel, ELEMENTWISE_GRAIN, gelu_backward_range, &job);
}

static void gelu_forward_range(void *context, int64_t begin, int64_t end) {
    const gelu_job *j = context;
    for (int64_t i = begin; i < end; i++) j->out[i] = ag_gelu_value(j->x[i]);
}

/* a [*] -> [*]: GELU (tanh form, activations.h) */
ag_tensor *ag_gelu(ag_ctx *ctx, ag_tensor *a) {
    AG_OP_BEGIN(ctx, a);
    ag_node *node;
    ag_tensor *out = unary_begin(ctx, "gelu", gelu_backward, a, 0, &node);
    if (!out) return NULL;
    gelu_job job = {.x = a->data, .out = out->data};
    cm_pool_for(a->numel, ELEMENTWISE_GRAIN, gelu_forward_range, &job);
    return out;
}

/* a [*] -> [*]: max(a, 0); the gradient at 0 is taken as 0 */
static void relu_backward(ag_ctx *ctx, ag_node *node) {
    (void)ctx;
    ag_tensor *a = node->in[0];
    const float *dout = node->out->grad;
    for (int64_t i = 0; i < a->numel; i++) a->grad[i] += dout[i] * ag_relu_derivative(a->data[i]);
}

ag_tensor *ag_relu(ag_ctx *ctx, ag_tensor *a) {
    AG_OP_BEGIN(ctx, a);
    ag_node *node;
    ag_tensor *out = unary_begin(ctx, "relu", relu_backward, a, 0, &node);
    if (!out) return NULL;
    for (int64_t i = 0; i < a->numel; i++) out->data[i] = ag_relu_value(a->data[i]);
    return out;
}

/* a [*] -> [*]: a sigmoid(a); derivative s (1 + a (1 - s)) */
static void silu_backward(ag_ctx *ctx, ag_node *node) {
    (void)ctx;
    ag_tensor *a = node->in[0];
    const float *dout = node->out->grad;
    for (int64_t i = 0; i < a->numel; i++) a->grad[i] += dout[i] * ag_silu_derivative(a->data[i]);
}

ag_tensor *ag_silu(ag_ctx *ctx, ag_tensor *a) {
    AG_OP_BEGIN(ctx, a);
    ag_node *node;
    ag_tensor *out = unary_begin(ctx, "silu", silu_backward, a, 0, &node);
    if (!out) return NULL;
    for (int64_t i = 0; i < a->numel; i++) out->data[i] = ag_silu_value(a->data[i]);
    return out;
}

/* a [*] -> [*]: log(1 + exp(a)), computed as max(a, 0) + log1p(exp(-|a|))
 * so it neither overflows nor loses the small values; derivative sigmoid(a) */
static void softplus_backward(ag_ctx *ctx, ag_node *node) {
    (void)ctx;
    ag_tensor *a = node->in[0];
    const float *dout = node->out->grad;
    for (int64_t i = 0; i < a->numel; i++) {
        double v = a->data[i];
        double sigmoid = v >= 0.0 ? 1.0 / (1.0 + exp(-v)) : exp(v) / (1.0 + exp(v));
        a->grad[i] += (float)(dout[i] * sigmoid);
    }
}

ag_tensor *ag_softplus(ag_ctx *ctx, ag_tensor *a) {
    AG_OP_BEGIN(ctx, a);
    ag_node *node;
    ag_tensor *out = unary_begin(ctx, "softplus", softplus_backward, a, 0, &node);
    if (!out) return NULL;
    for (int64_t i = 0; i < a->numel; i++) {
        double v = a->data[i];
        out->data[i] = (float)(fmax(v, 0.0) + log1p(exp(-fabs(v))));
    }
    return out;
}

/* ---- dropout ---------------------------------------------------------------- */

typedef struct dropout_saved {
    uint8_t *keep;
    float scale;
} dropout_saved;

/* a [*] -> [*] */
static void dropout_backward(ag_ctx *ctx, ag_node *node) {
    (void)ctx;
    const dropout_saved *saved = node->saved;
    ag_tensor *a = node->in[0];
    const float *dout = node->out->grad;
    for (int64_t i = 0; i < a->numel; i++)
        a->grad[i] += saved->keep[i] ? saved->scale * dout[i] : 0.0f;
}

ag_tensor *ag_dropout(ag_ctx *ctx, ag_tensor *a, float p, cm_rng_key key, uint64_t first_index) {
    AG_OP_BEGIN(ctx, a);
    CM_ASSERT(p >= 0.0f && p < 1.0f, "dropout probability %g not in [0, 1)", (double)p);
    if (p == 0.0f) return a;
    uint8_t *keep = ag_alloc(ctx, (size_t)a->numel, "dropout");
    ag_node *node;
    ag_tensor *out = unary_begin(ctx, "dropout", dropout_backward, a, sizeof(dropout_saved), &node);
    if (!out || !keep) return NULL;
    float scale = 1.0f / (1.0f - p);
    /* The uniforms go through out->data, then become the output. */
    cm_rng_fill_uniform(key, first_index, a->numel, 0.0f, 1.0f, out->data);
    for (int64_t i = 0; i < a->numel; i++) {
        keep[i] = out->data[i] >= p;
        out->data[i] = keep[i] ? scale * a->data[i] : 0.0f;
    }
    if (node) *(dropout_saved *)node->saved = (dropout_saved){keep, scale};
    return out;
}
