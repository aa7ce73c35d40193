/* Normalisation ops: layer normalisation over the last dimension. */
#include <math.h>
#include <string.h>

#include "autograd/norm_stats.h"
#include "autograd/op_write.h"

/* ---- layernorm ----------------------------------------------------------- */

/* Per-row statistics from the forward pass, so backward needs no recount. */
typedef struct layernorm_saved {
    float *mean; /* [rows] */
    float *rstd; /* [rows] 1 / sqrt(biased variance + eps) */
} layernorm_saved;

/* x [...,D], gamma [D], beta [D] -> [...,D].
 * With xhat = (x - mean) rstd and g = dy gamma, per row:
 *   dbeta += dy,  dgamma += dy xhat,
 *   dx += rstd (g - mean_D(g) - xhat mean_D(g xhat)).
 * Pass 1 gathers the two row means (and the parameter gradients), pass 2
 * writes dx; when dx is not wanted pass 2 is skipped. */
static void layernorm_backward(ag_ctx *ctx, ag_node *node) {
    (void)ctx;
    const layernorm_saved *saved = node->saved;
    ag_tensor *x = node->in[0], *gamma = node->in[1], *beta = node->in[2];
    bool want_x = ag_wants_grad(x), want_gamma = ag_wants_grad(gamma),
         want_beta = ag_wants_grad(beta);
    const float *dy = node->out->grad;
    int d_size = ag_last_dim(x);
    int64_t rows = ag_rows(x);
    float inv_d = 1.0f / (float)d_size;
    for (int64_t r = 0; r < rows; r++) {
        const float *x_row = x->data + r * d_size, *dy_row = dy + r * d_size;
        float mean = saved->mean[r], rstd = saved->rstd[r];
        float g_total = 0.0f, g_xhat_total = 0.0f;
        for (int i = 0; i < d_size; i++) {
            float xhat = (x_row[i] - mean) * rstd;
            float g = dy_row[i] * gamma->data[i];
            g_total += g;
            g_xhat_total += g * xhat;
            if (want_gamma) gamma->grad[i] += dy_row[i] * xhat;
            if (want_beta) beta->grad[i] += dy_row[i];
        }
        if (!want_x) continue;
        float g_mean = g_total * inv_d, g_xhat_mean = g_xhat_total * inv_d;
        float *dx_row = x->grad + r * d_size;
        for (int i = 0; i < d_size; i++) {
            float xhat = (x_row[i] - mean) * rstd;
            dx_row[i] += rstd * (dy_row[i] * gamma->data[i] - g_mean - xhat * g_xhat_mean);
        }
    }
}

ag_tensor *ag_layernorm(ag_ctx *ctx, ag_tensor *x, ag_tensor *gamma, ag_tensor *beta, float eps) {
    AG_OP_BEGIN(ctx, x, gamma, beta);
    int d_size = ag_last_dim(x);
    AG_CHECK_SHAPES(gamma->ndim == 1 && gamma->shape[0] == d_size, "layernorm gamma", x, gamma);
    AG_CHECK_SHAPES(beta->ndim == 1 && beta->shape[0] == d_size, "layernorm beta", x, beta);
    CM_ASSERT(eps >= 0.0f, "layernorm: eps %g is negative", (double)eps);
    int64_t rows = ag_rows(x);
    ag_tensor *out = ag_empty(ctx, "layernorm", x->ndim, x->shape);
    if (!out) return NULL;
    ag_tensor *inputs[3] = {x, gamma, beta};
    ag_node *node =
        ag_record(ctx, "layernorm", layernorm_backward, out, 3, inputs, sizeof(layernorm_saved));
    layernorm_saved *saved = node ? node->saved : NULL;
    if (saved) {
        saved->mean = ag_alloc_floats(ctx, rows, "layernorm");
        saved->rstd = ag_alloc_floats(ctx, rows, "layernorm");
    }
    if (ag_failed(ctx)) return NULL;

    for (int64_t r = 0; r < rows; r++) {
        const float *x_row = x->data + r * d_size;
        float *y_row = out->data + r * d_size;
        /* Pass 1: mean and biased variance (norm_stats.h). */
        float mean, rstd;
        ag_norm_row_stats(x_row, (int)d_size, eps, &mean, &rstd);
        /* Pass 2: normalise, scale, shift. */
        for (int i = 0; i < d_size; i++)
            y_row[i] = (x_row[i] - mean) * rstd * gamma->data[i] + beta->data[i];
        if (saved) {
            saved->mean[r] = mean;
            saved->rstd[r] = rstd;
        }
    }
    return out;
}
