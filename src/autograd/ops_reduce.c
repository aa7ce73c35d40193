/* Reductions and the losses built on them: sum, mean, softmax, log-softmax,
 * fused softmax + cross-entropy, KL divergence and entropy.
 *
 * Every softmax-like op works row by row over the last dimension (V) and
 * subtracts the row maximum before exponentiating, so logits of any magnitude
 * give finite results. Scalar results are accumulated in double. */
#include <math.h>
#include <string.h>

#include "autograd/fastmath.h"
#include "autograd/op_write.h"

static const int scalar_shape[1] = {1};

/* ---- sum, mean ----------------------------------------------------------- */

/* a [*] -> [1]; da += dout * scale (1 for sum, 1/numel for mean, kept in saved) */
static void sum_backward(ag_ctx *ctx, ag_node *node) {
    (void)ctx;
    float scale = *(const float *)node->saved;
    ag_tensor *a = node->in[0];
    float da = node->out->grad[0] * scale;
    for (int64_t i = 0; i < a->numel; i++) a->grad[i] += da;
}

static ag_tensor *scaled_sum(ag_ctx *ctx, const char *op, ag_tensor *a, float scale) {
    ag_tensor *out = ag_empty(ctx, op, 1, scalar_shape);
    if (!out) return NULL;
    double total = 0.0;
    for (int64_t i = 0; i < a->numel; i++) total += a->data[i];
    out->data[0] = (float)(total * scale);
    ag_node *node = ag_record(ctx, op, sum_backward, out, 1, &a, sizeof(float));
    if (ag_failed(ctx)) return NULL;
    if (node) *(float *)node->saved = scale;
    return out;
}

ag_tensor *ag_sum(ag_ctx *ctx, ag_tensor *a) {
    AG_OP_BEGIN(ctx, a);
    return scaled_sum(ctx, "sum", a, 1.0f);
}

ag_tensor *ag_mean(ag_ctx *ctx, ag_tensor *a) {
    AG_OP_BEGIN(ctx, a);
    CM_ASSERT(a->numel > 0, "mean of an empty tensor");
    return scaled_sum(ctx, "mean", a, (float)(1.0 / (double)a->numel));
}

/* ---- row kernels --------------------------------------------------------- */

static float row_max(const float *x, int n) {
    float m = x[0];
    for (int i = 1; i < n; i++) m = x[i] > m ? x[i] : m;
    return m;
}

/* sum_i exp(x_i - shift); with shift = the row maximum no term overflows and
 * the largest is exactly 1, so the sum is in [1, n]. */
static float row_exp_sum(const float *x, int n, float shift) {
    float total = 0.0f;
    for (int i = 0; i < n; i++) total += cm_expf(x[i] - shift);
    return total;
}

/* ---- softmax, log-softmax ------------------------------------------------ */

/* a [...,V] -> [...,V]; dx = y * (dy - sum_v dy_v y_v), with y the output */
static void softmax_backward(ag_ctx *ctx, ag_node *node) {
    (void)ctx;
    ag_tensor *a = node->in[0];
    const float *y = node->out->data, *dy = node->out->grad;
    int v_size = ag_last_dim(a);
    int64_t rows = ag_rows(a);
    for (int64_t r = 0; r < rows; r++) {
        const float *y_row = y + r * v_size, *dy_row = dy + r * v_size;
        float *dx_row = a->grad + r * v_size;
        float dot = 0.0f;
        for (int v = 0; v < v_size; v++) dot += dy_row[v] * y_row[v];
        for (int v = 0; v < v_size; v++) dx_row[v] += y_row[v] * (dy_row[v] - dot);
    }
}

ag_tensor *ag_softmax(ag_ctx *ctx, ag_tensor *a) {
    AG_OP_BEGIN(ctx, a);
    ag_tensor *out = ag_empty(ctx, "softmax", a->ndim, a->shape);
    if (!out) return NULL;
    int v_size = ag_last_dim(a);
    int64_t rows = ag_rows(a);
    for (int64_t r = 0; r < rows; r++) {
        const float *x_row = a->data + r * v_size;
        float *y_row = out->data + r * v_size;
        float m = row_max(x_row, v_size);
        float total = 0.0f;
        for (int v = 0; v < v_size; v++) {
            y_row[v] = cm_expf(x_row[v] - m);
            total += y_row[v];
        }
        float inv_total = 1.0f / total;
        for (int v = 0; v < v_size; v++) y_row[v] *= inv_total;
    }
    ag_record(ctx, "softmax", softmax_backward, out, 1, &a, 0);
    return ag_failed(ctx) ? NULL : out;
}

/* a [...,V] -> [...,V]; dx = dy - softmax * sum_v dy_v, with softmax = exp(output) */
static void log_softmax_backward(ag_ctx *ctx, ag_node *node) {
    (void)ctx;
    ag_tensor *a = node->in[0];
    const float *y = node->out->data, *dy = node->out->grad;
    int v_size = ag_last_dim(a);
    int64_t rows = ag_rows(a);
    for (int64_t r = 0; r < rows; r++) {
        const float *y_row = y + r * v_size, *dy_row = dy + r * v_size;
        float *dx_row = a->grad + r * v_size;
        float dy_total = 0.0f;
        for (int v = 0; v < v_size; v++) dy_total += dy_row[v];
        for (int v = 0; v < v_size; v++) dx_row[v] += dy_row[v] - cm_expf(y_row[v]) * dy_total;
    }
}

ag_tensor *ag_log_softmax(ag_ctx *ctx, ag_tensor *a) {
    AG_OP_BEGIN(ctx, a);
    ag_tensor *out = ag_empty(ctx, "log_softmax", a->ndim, a->shape);
    if (!out) return NULL;
    int v_size = ag_last_dim(a);
    int64_t rows = ag_rows(a);
    for (int64_t r = 0; r < rows; r++) {
        const float *x_row = a->data + r * v_size;
        float *y_row = out->data + r * v_size;
        /* (x - max) is exact in float; subtracting a rounded logsumexp from x
         * instead would lose digits when |x| is large. */
        float m = row_max(x_row, v_size);
        float log_total = logf(row_exp_sum(x_row, v_size, m));
        for (int v = 0; v < v_size; v++) y_row[v] = (x_row[v] - m) - log_total;
    }
    ag_record(ctx, "log_softmax", log_softmax_backward, out, 1, &a, 0);
    return ag_failed(ctx) ? NULL : out;
}

/* ---- cross-entropy ------------------------------------------------------- */

/* What backward needs: a copy of the targets (the caller's array may be
 * reused before backward runs) and each valid row's maximum and 1 / sum of
 * exp(x - max), so backward rebuilds the softmax in the same single pass that
 * writes the gradient. (Max and sum rather than a rounded logsumexp keep
 * x - max exact for large logits.) */
typedef struct cross_entropy_saved {
    int32_t *targets;   /* [N] */
    float *row_max;     /* [N], set for valid rows only */
    float *inv_exp_sum; /* [N], set for valid rows only */
    int32_t ignore_index;
    int64_t valid_rows; /* rows whose target != ignore_index */
} cross_entropy_saved;

/* logits [N,V] -> [1]; valid rows: dlogits += (softmax - onehot) dloss / valid_rows;
 * ignored rows get nothing. */
static void cross_entropy_backward(ag_ctx *ctx, ag_node *node) {
    (void)ctx;
    const cross_entropy_saved *saved = node->saved;
    ag_tensor *logits = node->in[0];
    if (saved->valid_rows == 0) return; /* every row ignored: the loss is the constant 0 */
    int v_size = logits->shape[1];
    int64_t rows = logits->shape[0];
    float scale = node->out->grad[0] / (float)saved->valid_rows;
    for (int64_t r = 0; r < rows; r++) {
        int32_t target = saved->targets[r];
        if (target == saved->ignore_index) continue;
        const float *x_row = logits->data + r * v_size;
        float *dx_row = logits->grad + r * v_size;
        float m = saved->row_max[r], row_scale = scale * saved->inv_exp_sum[r];
        for (int v = 0; v < v_size; v++) dx_row[v] += row_scale * cm_expf(x_row[v] - m);
        dx_row[target] -= scale;
    }
}

ag_tensor *ag_cross_entropy(ag_ctx *ctx, ag_tensor *logits, const int32_t *targets,
                            int32_t ignore_index) {
    AG_OP_BEGIN(ctx, logits);
    CM_ASSERT(logits->ndim == 2, "cross_entropy: logits must be [N,V], got %d dims", logits->ndim);
    CM_ASSERT(targets || logits->shape[0] == 0, "cross_entropy: targets is NULL");
    int64_t rows = logits->shape[0];
    int v_size = logits->shape[1];
    ag_tensor *out = ag_empty(ctx, "cross_entropy", 1, scalar_shape);
    if (!out) return NULL;
    ag_node *node = ag_record(ctx, "cross_entropy", cross_entropy_backward, out, 1, &logits,
                              sizeof(cross_entropy_saved));
    cross_entropy_saved *saved = node ? node->saved : NULL;
    if (saved) {
        saved->targets = ag_alloc_ints(ctx, rows, "cross_entropy");
        saved->row_max = ag_alloc_floats(ctx, rows, "cross_entropy");
        saved->inv_exp_sum = ag_alloc_floats(ctx, rows, "cross_entropy");
        saved->ignore_index = ignore_index;
    }
    if (ag_failed(ctx)) return NULL;

    /* Per valid row: -log softmax[target] = (max - x[target]) + log sum exp(x - max). */
    double total = 0.0;
    int64_t valid_rows = 0;
    for (int64_t r = 0; r < rows; r++) {
        int32_t target = targets[r];
        if (saved) saved->targets[r] = target;
        if (target == ignore_index) continue;
        CM_ASSERT(target >= 0 && target < v_size,
                  "cross_entropy: row %lld has target %d, outside [0,%d) and not ignore_index %d",
                  (long long)r, target, v_size, ignore_index);
        const float *x_row = logits->data + r * v_size;
        float m = row_max(x_row, v_size);
        float exp_sum = row_exp_sum(x_row, v_size, m);
        total += (double)(m - x_row[target]) + log((double)exp_sum);
        valid_rows++;
        if (saved) {
            saved->row_max[r] = m;
            saved->inv_exp_sum[r] = 1.0f / exp_sum;
        }
    }
    out->data[0] = valid_rows ? (float)(total / (double)valid_rows) : 0.0f;
    if (saved) saved->valid_rows = valid_rows;
    return out;
}

/* ---- KL divergence ------------------------------------------------------- */

/* logp, logq [N,V] -> [1] = (1/N) sum_rows sum_v p_v (logp_v - logq_v), p = exp(logp).
 * logp is treated as a free input (not assumed normalised), so, times dloss / N,
 *   d/dlogp_v = p_v (logp_v - logq_v + 1),   d/dlogq_v = -p_v.
 * A term with p_v == 0 counts as 0 (the 0 log 0 convention), also when logp is -inf. */
static void kl_div_backward(ag_ctx *ctx, ag_node *node) {
    (void)ctx;
    ag_tensor *logp = node->in[0], *logq = node->in[1];
    bool want_p = ag_wants_grad(logp), want_q = ag_wants_grad(logq);
    float scale = node->out->grad[0] / (float)ag_rows(logp);
    for (int64_t i = 0; i < logp->numel; i++) {
        float p = expf(logp->data[i]);
        if (p == 0.0f) continue;
        if (want_p) logp->grad[i] += scale * p * (logp->data[i] - logq->data[i] + 1.0f);
        if (want_q) logq->grad[i] -= scale * p;
    }
}

ag_tensor *ag_kl_div(ag_ctx *ctx, ag_tensor *logp, ag_tensor *logq) {
    AG_OP_BEGIN(ctx, logp, logq);
    AG_CHECK_SHAPES(ag_same_shape(logp, logq), "kl_div", logp, logq);
    int64_t rows = ag_rows(logp);
    CM_ASSERT(rows > 0, "kl_div of an empty tensor");
    ag_tensor *out = ag_empty(ctx, "kl_div", 1, scalar_shape);
    if (!out) return NULL;
    double total = 0.0;
    for (int64_t i = 0; i < logp->numel; i++) {
        float p = expf(logp->data[i]);
        if (p != 0.0f) total += (double)p * ((double)logp->data[i] - logq->data[i]);
    }
    out->data[0] = (float)(total / (double)rows);
    ag_tensor *inputs[2] = {logp, logq};
    ag_record(ctx, "kl_div", kl_div_backward, out, 2, inputs, 0);
    return ag_failed(ctx) ? NULL : out;
}

/* ---- entropy ------------------------------------------------------------- */

/* Floor applied to p inside the log only, so p == 0 (a fully confident router)
 * gives a finite loss and gradient instead of 0 * -inf. Below the floor the
 * term is -p log(floor), and backward uses that term's exact derivative. */
#define ENTROPY_LOG_FLOOR 1e-12f

/* p [N,V] -> [1] = -(1/N) sum p log max(p, floor); dp = -(log p + 1) / N for
 * p >= floor, -log(floor) / N below it. */
static void entropy_backward(ag_ctx *ctx, ag_node *node) {
    (void)ctx;
    ag_tensor *p = node->in[0];
    float scale = node->out->grad[0] / (float)ag_rows(p);
    const float log_floor = logf(ENTROPY_LOG_FLOOR);
    for (int64_t i = 0; i < p->numel; i++) {
        float value = p->data[i];
        float dterm = value >= ENTROPY_LOG_FLOOR ? logf(value) + 1.0f : log_floor;
        p->grad[i] -= scale * dterm;
    }
}

ag_tensor *ag_entropy(ag_ctx *ctx, ag_tensor *p) {
    AG_OP_BEGIN(ctx, p);
    int64_t rows = ag_rows(p);
    CM_ASSERT(rows > 0, "entropy of an empty tensor");
    ag_tensor *out = ag_empty(ctx, "entropy", 1, scalar_shape);
    if (!out) return NULL;
    double total = 0.0;
    for (int64_t i = 0; i < p->numel; i++) {
        float value = p->data[i];
        total -= (double)value * logf(value >= ENTROPY_LOG_FLOOR ? value : ENTROPY_LOG_FLOOR);
    }
    out->data[0] = (float)(total / (double)rows);
    ag_record(ctx, "entropy", entropy_backward, out, 1, &p, 0);
    return ag_failed(ctx) ? NULL : out;
}
