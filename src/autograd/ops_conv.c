/* CNN ops (NCHW): conv2d on im2col + sgemm, batchnorm2d, max / average /
 * global-average pooling, and the per-sample channel gather and channel
 * scaling used by the channel-group MoE convolution. See ops_conv.h. */
#include "autograd/ops_conv.h"

#include <math.h>
#include <string.h>

#include "autograd/op_write.h"
#include "common/pool.h"

/* Output size along one axis (floor mode). */
static int pooled_size(int in, int kernel, int stride, int padding) {
    return (in + 2 * padding - kernel) / stride + 1;
}

/* The outputs o in [*lo, *hi) whose input position o*stride - padding + k
 * lies inside [0, in): the unpadded part of kernel offset k along an axis
 * with `out` outputs. Lets the im2col loops run without a bounds test. */
static void valid_outputs(int k, int in, int out, int stride, int padding, int *lo, int *hi) {
    int first = padding - k;         /* smallest valid o*stride */
    int last = in - 1 + padding - k; /* largest valid o*stride */
    int low = first > 0 ? (first + stride - 1) / stride : 0;
    int high = last >= 0 ? last / stride + 1 : 0;
    if (high > out) high = out;
    if (low > high) low = high;
    *lo = low;
    *hi = high;
}

/* ---- conv2d ------------------------------------------------------------------ */

typedef struct conv_geometry {
    int n, c, h, w; /* input [N,C,H,W] */
    int co, kh, kw; /* filters [CO,C,KH,KW] */
    int ho, wo;     /* output [N,CO,HO,WO] */
    int stride, padding;
    int groups; /* the weight holds groups x CO filters (1: a plain conv) */
} conv_geometry;

static int conv_col_rows(const conv_geometry *g) {
    return g->c * g->kh * g->kw;
}
static int conv_out_plane(const conv_geometry *g) {
    return g->ho * g->wo;
}
/* A 1x1 kernel with stride 1 and no padding: the image [C,H*W] is already
 * its own column matrix. */
static bool conv_is_pointwise(const conv_geometry *g) {
    return g->kh == 1 && g->kw == 1 && g->stride == 1 && g->padding == 0;
}

/* image [C,H,W] -> cols [C*KH*KW, HO*WO]; row (c,i,j) holds the input under
 * kernel tap (i,j) of channel c for every output position, 0 in the padding. */
static void im2col(const conv_geometry *g, const float *restrict image, float *restrict cols) {
    int wo = g->wo, plane = conv_out_plane(g), stride = g->stride;
    for (int c = 0; c < g->c; c++)
        for (int i = 0; i < g->kh; i++) {
            int oh_lo, oh_hi;
            valid_outputs(i, g->h, g->ho, stride, g->padding, &oh_lo, &oh_hi);
            for (int j = 0; j < g->kw; j++) {
                int ow_lo, ow_hi;
                valid_outputs(j, g->w, wo, stride, g->padding, &ow_lo, &ow_hi);
                float *row = cols + ((int64_t)(c * g->kh + i) * g->kw + j) * plane;
                memset(row, 0, (size_t)oh_lo * wo * sizeof(float));
                memset(row + (int64_t)oh_hi * wo, 0, (size_t)(g->ho - oh_hi) * wo * sizeof(float));
                int width = ow_hi - ow_lo;
                for (int oh = oh_lo; oh < oh_hi; oh++) {
                    float *dst = row + (int64_t)oh * wo;
                    for (int ow = 0; ow < ow_lo; ow++) dst[ow] = 0.0f;
                    for (int ow = ow_hi; ow < wo; ow++) dst[ow] = 0.0f;
                    if (width <= 0) continue;
                    int ih = oh * stride - g->padding + i;
                    const float *src =
                        image + ((int64_t)c * g->h + ih) * g->w + ow_lo * stride - g->padding + j;
                    if (stride == 1)
                        memcpy(dst + ow_lo, src, (size_t)width * sizeof(float));
                    else
                        for (int t = 0; t < width; t++) dst[ow_lo + t] = src[t * stride];
                }
            }
        }
}

/* The transpose of im2col: dimage [C,H,W] += cols [C*KH*KW, HO*WO] summed
 * back onto the input positions (padding entries are dropped). */
static void col2im_add(const conv_geometry *g, const float *restrict cols, float *restrict dimage) {
    int wo = g->wo, plane = conv_out_plane(g), stride = g->stride;
    for (int c = 0; c < g->c; c++)
        for (int i = 0; i < g->kh; i++) {
            int oh_lo, oh_hi;
            valid_outputs(i, g->h, g->ho, stride, g->padding, &oh_lo, &oh_hi);
            for (int j = 0; j < g->kw; j++) {
                int ow_lo, ow_hi;
                valid_outputs(j, g->w, wo, stride, g->padding, &ow_lo, &ow_hi);
                int width = ow_hi - ow_lo;
                if (width <= 0) continue;
                const float *row = cols + ((int64_t)(c * g->kh + i) * g->kw + j) * plane;
                for (int oh = oh_lo; oh < oh_hi; oh++) {
                    const float *src = row + (int64_t)oh * wo + ow_lo;
                    int ih = oh * stride - g->padding + i;
                    float *dst =
                        dimage + ((int64_t)c * g->h + ih) * g->w + ow_lo * stride - g->padding + j;
                    if (stride == 1)
                        for (int t = 0; t < width; t++) dst[t] += src[t];
                    else
                        for (int t = 0; t < width; t++) dst[t * stride] += src[t];
                }
            }
        }
}

typedef struct conv_saved {
    conv_geometry geometry;
    int tasks;            /* images are split into this many contiguous runs */
    float *cols;          /* [tasks][C*KH*KW, HO*WO] scratch; NULL on the pointwise path */
    const int32_t *group; /* [N] filter group of each image (arena copy); NULL: one group */
} conv_saved;

/* The images of a batch are independent: the pool's threads take
 * contiguous runs of them, each with its own column buffer. */
typedef struct conv_job {
    const conv_geometry *g;
    int tasks;
    const float *x, *w, *bias, *dy;
    const int32_t *group; /* image n uses filters group[n]*CO.. (NULL: 0) */
    float *out, *cols, *dx;
    /* backward: task 0 adds into dw / dbias, task t > 0 into its own zeroed
     * partial block, summed in task order afterwards (the same result for a
     * given thread count) */
    float *dw, *dbias, *dw_partial, *dbias_partial;
} conv_job;

/* Multiply-adds below which a task is not worth a thread (~50 us). */
#define CONV_MIN_TASK_MACS (1 << 21)

static int conv_tasks(const conv_geometry *g) {
    int64_t macs = (int64_t)g->n * g->co * conv_col_rows(g) * conv_out_plane(g);
    int tasks = cm_pool_tasks_for(macs, CONV_MIN_TASK_MACS);
    return tasks < g->n ? tasks : (g->n > 0 ? g->n : 1);
}

static void conv_forward_task(void *context, int task) {
    const conv_job *j = context;
    const conv_geometry *g = j->g;
    bool pointwise = conv_is_pointwise(g);
    int rows = conv_col_rows(g), plane = conv_out_plane(g);
    int64_t image_size = (int64_t)g->c * g->h * g->w, out_size = (int64_t)g->co * plane;
    float *cols = pointwise ? NULL : j->cols + (int64_t)task * rows * plane;
    int64_t first, last;
    cm_pool_split(g->n, j->tasks, task, 1, &first, &last);
    for (int64_t n = first; n < last; n++) {
        const float *image = j->x + n * image_size;
        const float *w = j->w + (j->group ? (int64_t)j->group[n] * g->co * rows : 0);
        float *y = j->out + n * out_size;
        if (!pointwise) im2col(g, image, cols);
        ag_sgemm(false, false, g->co, plane, rows, 1.0f, w, rows, pointwise ? image : cols, plane,
                 0.0f, y, plane);
        if (j->bias)
            for (int co = 0; co < g->co; co++) {
                float *y_row = y + (int64_t)co * plane, b = j->bias[co];
                for (int p = 0; p < plane; p++) y_row[p] += b;
            }
    }
}

/* Per image n, with Y_n [CO,HO*WO] = W [CO,C*KH*KW] cols_n + bias:
 *   dbias += row sums of dY_n,  dW += dY_n cols_n^T,
 *   dx_n += col2im(W^T dY_n).
 * cols_n is rebuilt from x (keeping every image's columns would cost
 * KH*KW times the input); the same buffer then takes W^T dY_n. */
static void conv_backward_task(void *context, int task) {
    const conv_job *j = context;
    const conv_geometry *g = j->g;
    bool pointwise = conv_is_pointwise(g);
    int rows = conv_col_rows(g), plane = conv_out_plane(g);
    int64_t image_size = (int64_t)g->c * g->h * g->w, out_size = (int64_t)g->co * plane;
    float *cols = pointwise ? NULL : j->cols + (int64_t)task * rows * plane;
    float *dw_all = j->dw, *dbias = j->dbias;
    if (task > 0) {
        if (dw_all) dw_all = j->dw_partial + (int64_t)(task - 1) * g->groups * g->co * rows;
        if (dbias) dbias = j->dbias_partial + (int64_t)(task - 1) * g->co;
    }
    int64_t first, last;
    cm_pool_split(g->n, j->tasks, task, 1, &first, &last);
    for (int64_t n = first; n < last; n++) {
        const float *image = j->x + n * image_size;
        const float *dy = j->dy + n * out_size;
        const int64_t w_offset = j->group ? (int64_t)j->group[n] * g->co * rows : 0;
        const float *w = j->w + w_offset;
        float *dw = dw_all ? dw_all + w_offset : NULL;
        if (dbias)
            for (int co = 0; co < g->co; co++) {
                const float *dy_row = dy + (int64_t)co * plane;
                float total = 0.0f;
                for (int p = 0; p < plane; p++) total += dy_row[p];
                dbias[co] += total;
            }
        if (dw) {
            const float *image_cols = image;
            if (!pointwise) {
                im2col(g, image, cols);
                image_cols = cols;
            }
            ag_sgemm(false, true, g->co, rows, plane, 1.0f, dy, plane, image_cols, plane, 1.0f, dw,
                     rows);
        }
        if (j->dx) {
            float *dimage = j->dx + n * image_size;
            if (pointwise) {
                ag_sgemm(true, false, rows, plane, g->co, 1.0f, w, rows, dy, plane, 1.0f, dimage,
                         plane);
            } else {
                ag_sgemm(true, false, rows, plane, g->co, 1.0f, w, rows, dy, plane, 0.0f, cols,
                         plane);
                col2im_add(g, cols, dimage);
            }
        }
    }
}

static void conv2d_backward(ag_ctx *ctx, ag_node *node) {
    const conv_saved *saved = node->saved;
    const conv_geometry *g = &saved->geometry;
    ag_tensor *x = node->in[0], *w = node->in[1], *bias = node->n_in > 2 ? node->in[2] : NULL;
    conv_job job = {.g = g,
                    .tasks = saved->tasks,
                    .x = x->data,
                    .w = w->data,
                    .dy = node->out->grad,
                    .group = saved->group,
                    .cols = saved->cols,
                    .dx = ag_wants_grad(x) ? x->grad : NULL,
                    .dw = ag_wants_grad(w) ? w->grad : NULL,
                    .dbias = bias && ag_wants_grad(bias) ? bias->grad : NULL};
    int64_t w_size = (int64_t)g->groups * g->co * conv_col_rows(g), partials = job.tasks - 1;
    /* partial sums of the other tasks: scratch, freed after this backward */
    if (partials > 0 && job.dw) {
        job.dw_partial = ag_alloc_floats(ctx, partials * w_size, "conv2d backward");
        if (!job.dw_partial) return; /* ctx->status holds the error */
        memset(job.dw_partial, 0, (size_t)(partials * w_size) * sizeof(float));
    }
    if (partials > 0 && job.dbias) {
        job.dbias_partial = ag_alloc_floats(ctx, partials * g->co, "conv2d backward");
        if (!job.dbias_partial) return;
        memset(job.dbias_partial, 0, (size_t)(partials * g->co) * sizeof(float));
    }
    cm_pool_run(job.tasks, conv_backward_task, &job);
    for (int64_t t = 0; t < partials; t++) {
        if (job.dw)
            for (int64_t i = 0; i < w_size; i++) job.dw[i] += job.dw_partial[t * w_size + i];
        if (job.dbias)
            for (int co = 0; co < g->co; co++) job.dbias[co] += job.dbias_partial[t * g->co + co];
    }
}

/* ag_conv2d (groups 1, group NULL) and ag_conv2d_grouped. */
static ag_tensor *conv2d(ag_ctx *ctx, ag_tensor *x, ag_tensor *w, ag_tensor *bias, int groups,
                         const int32_t *group, int stride, int padding) {
    AG_OP_BEGIN(ctx, x, w);
    AG_CHECK_SHAPES(x->ndim == 4 && w->ndim == 4 && w->shape[1] == x->shape[1], "conv2d", x, w);
    CM_ASSERT(stride >= 1 && padding >= 0, "conv2d: stride %d, padding %d", stride, padding);
    CM_ASSERT(groups >= 1 && w->shape[0] % groups == 0,
              "conv2d: %d filters do not split into %d groups", w->shape[0], groups);
    conv_geometry g = {.n = x->shape[0],
                       .c = x->shape[1],
                       .h = x->shape[2],
                       .w = x->shape[3],
                       .co = w->shape[0] / groups,
                       .kh = w->shape[2],
                       .kw = w->shape[3],
                       .stride = stride,
                       .padding = padding,
                       .groups = groups};
    if (group)
        for (int n = 0; n < g.n; n++)
            CM_ASSERT(group[n] >= 0 && group[n] < groups, "conv2d: group[%d] = %d outside [0,%d)",
                      n, group[n], groups);
    AG_CHECK_SHAPES(g.h + 2 * padding >= g.kh && g.w + 2 * padding >= g.kw && g.kh > 0 && g.kw > 0,
                    "conv2d (kernel larger than the padded input)", x, w);
    if (bias) AG_CHECK_SHAPES(bias->ndim == 1 && bias->shape[0] == g.co, "conv2d bias", w, bias);
    g.ho = pooled_size(g.h, g.kh, stride, padding);
    g.wo = pooled_size(g.w, g.kw, stride, padding);

    ag_tensor *out = ag_empty(ctx, "conv2d", 4, (int[]){g.n, g.co, g.ho, g.wo});
    if (!out) return NULL;
    ag_tensor *inputs[3] = {x, w, bias};
    ag_node *node =
        ag_record(ctx, "conv2d", conv2d_backward, out, bias ? 3 : 2, inputs, sizeof(conv_saved));
    if (ag_failed(ctx)) return NULL;
    int32_t *group_copy = NULL; /* kept for backward */
    if (group && node) {
        group_copy = ag_alloc_ints(ctx, g.n, "conv2d");
        if (!group_copy) return NULL;
        memcpy(group_copy, group, (size_t)g.n * sizeof(int32_t));
    }
    /* Without a node the column buffers are released after the forward pass. */
    size_t scratch = ag_scratch_mark(ctx);
    conv_job job = {.g = &g,
                    .tasks = conv_tasks(&g),
                    .x = x->data,
                    .w = w->data,
                    .group = group,
                    .bias = bias ? bias->data : NULL,
                    .out = out->data};
    if (!conv_is_pointwise(&g)) {
        job.cols = ag_alloc_floats(ctx, (int64_t)job.tasks * conv_col_rows(&g) * conv_out_plane(&g),
                                   "conv2d");
        if (!job.cols) return NULL;
    }
    cm_pool_run(job.tasks, conv_forward_task, &job);
    if (node)
        *(conv_saved *)node->saved = (conv_saved){g, job.tasks, job.cols, group_copy};
    else
        ag_scratch_release(ctx, scratch);
    return out;
}

ag_tensor *ag_conv2d(ag_ctx *ctx, ag_tensor *x, ag_tensor *w, ag_tensor *bias, int stride,
                     int padding) {
    return conv2d(ctx, x, w, bias, 1, NULL, stride, padding);
}

ag_tensor *ag_conv2d_grouped(ag_ctx *ctx, ag_tensor *x, ag_tensor *w, int groups,
                             const int32_t *group, int stride, int padding) {
    CM_ASSERT(group, "conv2d_grouped: no group per image");
    return conv2d(ctx, x, w, NULL, groups, group, stride, padding);
}

/* ---- batchnorm2d ---------------------------------------------------------------- */

typedef struct batchnorm_saved {
    float *mean; /* [C] the statistics that normalised x (batch or running) */
    float *rstd; /* [C] 1 / sqrt(variance + eps) */
    bool training;
} batchnorm_saved;

/* With xhat = (x - mean) rstd, per channel over its M = N*H*W elements:
 *   dbeta += sum dy,  dgamma += sum dy xhat,
 *   training: dx += gamma rstd (dy - sum(dy) / M - xhat sum(dy xhat) / M)
 *   eval:     dx += gamma rstd dy (the statistics are constants). */
/* Channels are independent: the pool's threads take runs of them. */
typedef struct batchnorm_job {
    const ag_tensor *x, *gamma, *beta;
    const float *dy;
    float *out, *running_mean, *running_var;
    float *mean, *rstd;
    bool training, want_x, want_gamma, want_beta;
    float momentum, eps;
} batchnorm_job;

/* Channels per task so that a task has at least ~64 K elements. */
static int64_t channels_per_task(const ag_tensor *x) {
    int64_t per_channel = (int64_t)x->shape[0] * x->shape[2] * x->shape[3];
    return per_channel >= 65536 ? 1 : 65536 / (per_channel > 0 ? per_channel : 1);
}

static void batchnorm_backward_channels(void *context, int64_t c_begin, int64_t c_end) {
    const batchnorm_job *j = context;
    const ag_tensor *x = j->x, *gamma = j->gamma, *beta = j->beta;
    int batch = x->shape[0], channels = x->shape[1];
    int64_t plane = (int64_t)x->shape[2] * x->shape[3];
    double count = (double)batch * plane;
    for (int64_t c = c_begin; c < c_end; c++) {
        float mean = j->mean[c], rstd = j->rstd[c];
        double dy_total = 0.0, dy_xhat_total = 0.0;
        for (int n = 0; n < batch; n++) {
            int64_t offset = ((int64_t)n * channels + c) * plane;
            const float *x_row = x->data + offset, *dy_row = j->dy + offset;
            float row_dy = 0.0f, row_dy_xhat = 0.0f;
            for (int64_t p = 0; p < plane; p++) {
                row_dy += dy_row[p];
                row_dy_xhat += dy_row[p] * (x_row[p] - mean) * rstd;
            }
            dy_total += row_dy;
            dy_xhat_total += row_dy_xhat;
        }
        if (j->want_gamma) gamma->grad[c] += (float)dy_xhat_total;
        if (j->want_beta) beta->grad[c] += (float)dy_total;
        if (!j->want_x) continue;
        float scale = gamma->data[c] * rstd;
        float dy_mean = j->training ? (float)(dy_total / count) : 0.0f;
        float dy_xhat_mean = j->training ? (float)(dy_xhat_total / count) : 0.0f;
        for (int n = 0; n < batch; n++) {
            int64_t offset = ((int64_t)n * channels + c) * plane;
            const float *x_row = x->data + offset, *dy_row = j->dy + offset;
            float *dx_row = x->grad + offset;
            for (int64_t p = 0; p < plane; p++) {
                float xhat = (x_row[p] - mean) * rstd;
                dx_row[p] += scale * (dy_row[p] - dy_mean - xhat * dy_xhat_mean);
            }
        }
    }
}

static void batchnorm_backward(ag_ctx *ctx, ag_node *node) {
    (void)ctx;
    const batchnorm_saved *saved = node->saved;
    ag_tensor *x = node->in[0], *gamma = node->in[1], *beta = node->in[2];
    batchnorm_job job = {.x = x,
                         .gamma = gamma,
                         .beta = beta,
                         .dy = node->out->grad,
                         .mean = saved->mean,
                         .rstd = saved->rstd,
                         .training = saved->training,
                         .want_x = ag_wants_grad(x),
                         .want_gamma = ag_wants_grad(gamma),
                         .want_beta = ag_wants_grad(beta)};
    cm_pool_for(x->shape[1], channels_per_task(x), batchnorm_backward_channels, &job);
}

/* Batch mean and biased variance of channel c, in double, from sums of
 * x - x[0,c,0,0]: the shift keeps E[x^2] - E[x]^2 from cancelling when the
 * mean is large next to the spread. */
static void channel_statistics(const ag_tensor *x, int c, double *mean, double *variance) {
    int batch = x->shape[0], channels = x->shape[1];
    int64_t plane = (int64_t)x->shape[2] * x->shape[3];
    double shift = x->data[(int64_t)c * plane], total = 0.0, squares = 0.0;
    for (int n = 0; n < batch; n++) {
        const float *x_row = x->data + ((int64_t)n * channels + c) * plane;
        for (int64_t p = 0; p < plane; p++) {
            double centred = x_row[p] - shift;
            total += centred;
            squares += centred * centred;
        }
    }
    double count = (double)batch * plane, shifted_mean = total / count;
    *mean = shift + shifted_mean;
    *variance = squares / count - shifted_mean * shifted_mean;
    if (*variance < 0.0) *variance = 0.0;
}

static void batchnorm_forward_channels(void *context, int64_t c_begin, int64_t c_end) {
    const batchnorm_job *j = context;
    const ag_tensor *x = j->x;
    int batch = x->shape[0], channels = x->shape[1];
    int64_t plane = (int64_t)x->shape[2] * x->shape[3], count = batch * plane;
    float *mean = j->mean, *rstd = j->rstd, momentum = j->momentum;
    for (int64_t c = c_begin; c < c_end; c++) {
        if (j->training) {
            double batch_mean, batch_variance;
            channel_statistics(x, (int)c, &batch_mean, &batch_variance);
            mean[c] = (float)batch_mean;
            rstd[c] = (float)(1.0 / sqrt(batch_variance + j->eps));
            if (j->running_mean) {
                double unbiased = batch_variance * (double)count / (double)(count - 1);
                j->running_mean[c] = (1.0f - momentum) * j->running_mean[c] + momentum * mean[c];
                j->running_var[c] =
                    (1.0f - momentum) * j->running_var[c] + momentum * (float)unbiased;
            }
        } else {
            mean[c] = j->running_mean[c];
            rstd[c] = (float)(1.0 / sqrt((double)j->running_var[c] + j->eps));
        }
        /* y = (x - mean) rstd gamma + beta as one multiply-add per element. */
        float scale = rstd[c] * j->gamma->data[c], offset = j->beta->data[c] - mean[c] * scale;
        for (int n = 0; n < batch; n++) {
            int64_t row = ((int64_t)n * channels + c) * plane;
            const float *x_row = x->data + row;
            float *y_row = j->out + row;
            for (int64_t p = 0; p < plane; p++) y_row[p] = x_row[p] * scale + offset;
        }
    }
}

ag_tensor *ag_batchnorm2d(ag_ctx *ctx, ag_tensor *x, ag_tensor *gamma, ag_tensor *beta,
                          float *running_mean, float *running_var, bool training, float momentum,
                          float eps) {
    AG_OP_BEGIN(ctx, x, gamma, beta);
    AG_CHECK_SHAPES(x->ndim == 4, "batchnorm2d", x, gamma);
    int batch = x->shape[0], channels = x->shape[1];
    int64_t plane = (int64_t)x->shape[2] * x->shape[3], count = batch * plane;
    AG_CHECK_SHAPES(gamma->ndim == 1 && gamma->shape[0] == channels, "batchnorm2d gamma", x, gamma);
    AG_CHECK_SHAPES(beta->ndim == 1 && beta->shape[0] == channels, "batchnorm2d beta", x, beta);
    CM_ASSERT(eps >= 0.0f, "batchnorm2d: eps %g is negative", (double)eps);
    CM_ASSERT((running_mean == NULL) == (running_var == NULL),
              "batchnorm2d: give both running statistics or neither");
    CM_ASSERT(training || running_mean, "batchnorm2d: eval mode needs the running statistics");
    CM_ASSERT(!training || count > 1,
              "batchnorm2d: training needs more than one value per channel, got N*H*W = %lld",
              (long long)count);

    ag_tensor *out = ag_empty(ctx, "batchnorm2d", 4, x->shape);
    if (!out) return NULL;
    ag_tensor *inputs[3] = {x, gamma, beta};
    ag_node *node =
        ag_record(ctx, "batchnorm2d", batchnorm_backward, out, 3, inputs, sizeof(batchnorm_saved));
    float *mean = ag_alloc_floats(ctx, channels, "batchnorm2d");
    float *rstd = ag_alloc_floats(ctx, channels, "batchnorm2d");
    if (ag_failed(ctx)) return NULL;

    batchnorm_job job = {.x = x,
                         .gamma = gamma,
                         .beta = beta,
                         .out = out->data,
                         .running_mean = running_mean,
                         .running_var = running_var,
                         .mean = mean,
                         .rstd = rstd,
                         .training = training,
                         .momentum = momentum,
                         .eps = eps};
    cm_pool_for(channels, channels_per_task(x), batchnorm_forward_channels, &job);
    if (node) *(batchnorm_saved *)node->saved = (batchnorm_saved){mean, rstd, training};
    return out;
}

/* ---- max / average pooling ------------------------------------------------------ */

typedef struct pool_geometry {
    int planes; /* N*C: pooling treats every channel of every image alike */
    int h, w, ho, wo;
    int kernel, stride, padding;
} pool_geometry;

static pool_geometry make_pool_geometry(const ag_tensor *x, int kernel, int stride, int padding,
                                        const char *op) {
    char shape[64];
    CM_ASSERT(x->ndim == 4, "%s: x must be [N,C,H,W], got %s", op,
              ag_shape_str(x, shape, sizeof shape));
    CM_ASSERT(kernel >= 1 && stride >= 1 && padding >= 0 && 2 * padding <= kernel,
              "%s: kernel %d, stride %d, padding %d (need padding <= kernel / 2)", op, kernel,
              stride, padding);
    CM_ASSERT(x->shape[2] + 2 * padding >= kernel && x->shape[3] + 2 * padding >= kernel,
              "%s: kernel %d larger than the padded input %s", op, kernel,
              ag_shape_str(x, shape, sizeof shape));
    return (pool_geometry){.planes = x->shape[0] * x->shape[1],
                           .h = x->shape[2],
                           .w = x->shape[3],
                           .ho = pooled_size(x->shape[2], kernel, stride, padding),
                           .wo = pooled_size(x->shape[3], kernel, stride, padding),
                           .kernel = kernel,
                           .stride = stride,
                           .padding = padding};
}

/* The window of output (oh, ow) clipped to the input: rows [*h0, *h1),
 * columns [*w0, *w1); never empty since padding <= kernel / 2. */
static void pool_window(const pool_geometry *g, int oh, int ow, int *h0, int *h1, int *w0,
                        int *w1) {
    int top = oh * g->stride - g->padding, left = ow * g->stride - g->padding;
    *h0 = top > 0 ? top : 0;
    *h1 = top + g->kernel < g->h ? top + g->kernel : g->h;
    *w0 = left > 0 ? left : 0;
    *w1 = left + g->kernel < g->w ? left + g->kernel : g->w;
}

typedef struct maxpool_saved {
    pool_geometry geometry;
    int32_t *argmax; /* [N*C*HO*WO] position in its H*W plane of each window's maximum */
} maxpool_saved;

/* dx[argmax] += dy: each output's gradient goes to the element it copied. */
static void maxpool_backward(ag_ctx *ctx, ag_node *node) {
    (void)ctx;
    const maxpool_saved *saved = node->saved;
    const pool_geometry *g = &saved->geometry;
    ag_tensor *x = node->in[0];
    int64_t in_plane = (int64_t)g->h * g->w, out_plane = (int64_t)g->ho * g->wo;
    for (int64_t q = 0; q < g->planes; q++) {
        float *dx = x->grad + q * in_plane;
        const float *dy = node->out->grad + q * out_plane;
        const int32_t *argmax = saved->argmax + q * out_plane;
        for (int64_t o = 0; o < out_plane; o++) dx[argmax[o]] += dy[o];
    }
}

ag_tensor *ag_maxpool2d(ag_ctx *ctx, ag_tensor *x, int kernel, int stride, int padding) {
    AG_OP_BEGIN(ctx, x);
    pool_geometry g = make_pool_geometry(x, kernel, stride, padding, "maxpool2d");
    ag_tensor *out = ag_empty(ctx, "maxpool2d", 4, (int[]){x->shape[0], x->shape[1], g.ho, g.wo});
    if (!out) return NULL;
    ag_node *node =
        ag_record(ctx, "maxpool2d", maxpool_backward, out, 1, &x, sizeof(maxpool_saved));
    int32_t *argmax = node ? ag_alloc_ints(ctx, out->numel, "maxpool2d") : NULL;
    if (ag_failed(ctx)) return NULL;

    int64_t in_plane = (int64_t)g.h * g.w, out_plane = (int64_t)g.ho * g.wo;
    for (int64_t q = 0; q < g.planes; q++) {
        const float *image = x->data + q * in_plane;
        float *y = out->data + q * out_plane;
        for (int oh = 0; oh < g.ho; oh++)
            for (int ow = 0; ow < g.wo; ow++) {
                int h0, h1, w0, w1;
                pool_window(&g, oh, ow, &h0, &h1, &w0, &w1);
                int best = h0 * g.w + w0;
                float best_value = image[best];
                for (int ih = h0; ih < h1; ih++)
                    for (int iw = w0; iw < w1; iw++) {
                        float value = image[ih * g.w + iw];
                        /* Strictly greater keeps the first of equal maxima;
                         * value != value lets a NaN through, as PyTorch. */
                        if (value > best_value || value != value) {
                            best_value = value;
                            best = ih * g.w + iw;
                        }
                    }
                y[oh * g.wo + ow] = best_value;
                if (argmax) argmax[q * out_plane + oh * g.wo + ow] = best;
            }
    }
    if (node) *(maxpool_saved *)node->saved = (maxpool_saved){g, argmax};
    return out;
}

/* dx += dy / kernel^2 over each window's unpadded part. */
static void avgpool_backward(ag_ctx *ctx, ag_node *node) {
    (void)ctx;
    const pool_geometry *g = node->saved;
    ag_tensor *x = node->in[0];
    float inv_area = 1.0f / (float)(g->kernel * g->kernel);
    int64_t in_plane = (int64_t)g->h * g->w, out_plane = (int64_t)g->ho * g->wo;
    for (int64_t q = 0; q < g->planes; q++) {
        float *dx = x->grad + q * in_plane;
        const float *dy = node->out->grad + q * out_plane;
        for (int oh = 0; oh < g->ho; oh++)
            for (int ow = 0; ow < g->wo; ow++) {
                int h0, h1, w0, w1;
                pool_window(g, oh, ow, &h0, &h1, &w0, &w1);
                float share = dy[oh * g->wo + ow] * inv_area;
                for (int ih = h0; ih < h1; ih++)
                    for (int iw = w0; iw < w1; iw++) dx[ih * g->w + iw] += share;
            }
    }
}

ag_tensor *ag_avgpool2d(ag_ctx *ctx, ag_tensor *x, int kernel, int stride, int padding) {
    AG_OP_BEGIN(ctx, x);
    pool_geometry g = make_pool_geometry(x, kernel, stride, padding, "avgpool2d");
    ag_tensor *out = ag_empty(ctx, "avgpool2d", 4, (int[]){x->shape[0], x->shape[1], g.ho, g.wo});
    if (!out) return NULL;
    ag_node *node =
        ag_record(ctx, "avgpool2d", avgpool_backward, out, 1, &x, sizeof(pool_geometry));
    if (ag_failed(ctx)) return NULL;

    float inv_area = 1.0f / (float)(kernel * kernel);
    int64_t in_plane = (int64_t)g.h * g.w, out_plane = (int64_t)g.ho * g.wo;
    for (int64_t q = 0; q < g.planes; q++) {
        const float *image = x->data + q * in_plane;
        float *y = out->data + q * out_plane;
        for (int oh = 0; oh < g.ho; oh++)
            for (int ow = 0; ow < g.wo; ow++) {
                int h0, h1, w0, w1;
                pool_window(&g, oh, ow, &h0, &h1, &w0, &w1);
                float total = 0.0f;
                for (int ih = h0; ih < h1; ih++)
                    for (int iw = w0; iw < w1; iw++) total += image[ih * g.w + iw];
                y[oh * g.wo + ow] = total * inv_area;
            }
    }
    if (node) *(pool_geometry *)node->saved = g;
    return out;
}

/* x [N,C,H,W] -> [N,C]; dx += dy / (H*W) */
static void global_avgpool_backward(ag_ctx *ctx, ag_node *node) {
    (void)ctx;
    ag_tensor *x = node->in[0];
    int64_t planes = (int64_t)x->shape[0] * x->shape[1], plane = (int64_t)x->shape[2] * x->shape[3];
    float inv_plane = 1.0f / (float)plane;
    for (int64_t q = 0; q < planes; q++) {
        float share = node->out->grad[q] * inv_plane, *dx = x->grad + q * plane;
        for (int64_t p = 0; p < plane; p++) dx[p] += share;
    }
}

ag_tensor *ag_global_avgpool(ag_ctx *ctx, ag_tensor *x) {
    AG_OP_BEGIN(ctx, x);
    char shape[64];
    CM_ASSERT(x->ndim == 4 && x->shape[2] * x->shape[3] > 0,
              "global_avgpool: x must be [N,C,H,W] with H*W > 0, got %s",
              ag_shape_str(x, shape, sizeof shape));
    ag_tensor *out = ag_empty(ctx, "global_avgpool", 2, x->shape);
    if (!out) return NULL;
    ag_record(ctx, "global_avgpool", global_avgpool_backward, out, 1, &x, 0);
    if (ag_failed(ctx)) return NULL;
    int64_t plane = (int64_t)x->shape[2] * x->shape[3];
    for (int64_t q = 0; q < out->numel; q++) {
        const float *image = x->data + q * plane;
        float total = 0.0f;
        for (int64_t p = 0; p < plane; p++) total += image[p];
        out->data[q] = total / (float)plane;
    }
    return out;
}

/* ---- channel gather and channel scaling (MoE convolution) ---------------------- */

typedef struct gather_channels_saved {
    int32_t *channel_index; /* [N*K], a copy */
    int k;
} gather_channels_saved;

/* dx[n, index[n*K+k]] += dout[n,k] */
static void gather_channels_backward(ag_ctx *ctx, ag_node *node) {
    (void)ctx;
    const gather_channels_saved *saved = node->saved;
    ag_tensor *x = node->in[0];
    int batch = x->shape[0], channels = x->shape[1], k = saved->k;
    int64_t plane = (int64_t)x->shape[2] * x->shape[3];
    for (int n = 0; n < batch; n++)
        for (int j = 0; j < k; j++) {
            const float *src = node->out->grad + ((int64_t)n * k + j) * plane;
            float *dst =
                x->grad + ((int64_t)n * channels + saved->channel_index[n * k + j]) * plane;
            for (int64_t p = 0; p < plane; p++) dst[p] += src[p];
        }
}

ag_tensor *ag_gather_channels(ag_ctx *ctx, ag_tensor *x, const int32_t *channel_index, int k) {
    AG_OP_BEGIN(ctx, x);
    char shape[64];
    CM_ASSERT(x->ndim == 4 && k >= 0, "gather_channels: x %s (need [N,C,H,W]), k %d",
              ag_shape_str(x, shape, sizeof shape), k);
    int batch = x->shape[0], channels = x->shape[1];
    int64_t plane = (int64_t)x->shape[2] * x->shape[3];
    for (int i = 0; i < batch * k; i++)
        CM_ASSERT(channel_index[i] >= 0 && channel_index[i] < channels,
                  "gather_channels: channel_index[%d] = %d outside [0,%d)", i, channel_index[i],
                  channels);
    ag_tensor *out =
        ag_empty(ctx, "gather_channels", 4, (int[]){batch, k, x->shape[2], x->shape[3]});
    if (!out) return NULL;
    ag_node *node = ag_record(ctx, "gather_channels", gather_channels_backward, out, 1, &x,
                              sizeof(gather_channels_saved));
    int32_t *index_copy = node ? ag_alloc_ints(ctx, (int64_t)batch * k, "gather_channels") : NULL;
    if (ag_failed(ctx)) return NULL;
    for (int n = 0; n < batch; n++)
        for (int j = 0; j < k; j++)
            if (plane)
                memcpy(out->data + ((int64_t)n * k + j) * plane,
                       x->data + ((int64_t)n * channels + channel_index[n * k + j]) * plane,
                       (size_t)plane * sizeof(float));
    if (node) {
        if (batch > 0 && k > 0)
            memcpy(index_copy, channel_index, (size_t)batch * k * sizeof(int32_t));
        *(gather_channels_saved *)node->saved = (gather_channels_saved){index_copy, k};
    }
    return out;
}

/* dx[n,c] += dout[n,c] scale[n,c];  dscale[n,c] += sum over H,W of dout x */
static void mul_channels_backward(ag_ctx *ctx, ag_node *node) {
    (void)ctx;
    ag_tensor *x = node->in[0], *scale = node->in[1];
    bool want_x = ag_wants_grad(x), want_scale = ag_wants_grad(scale);
    int64_t plane = (int64_t)x->shape[2] * x->shape[3];
    for (int64_t q = 0; q < scale->numel; q++) {
        const float *dy = node->out->grad + q * plane, *x_row = x->data + q * plane;
        if (want_x) {
            float s = scale->data[q], *dx = x->grad + q * plane;
            for (int64_t p = 0; p < plane; p++) dx[p] += dy[p] * s;
        }
        if (want_scale) {
            float total = 0.0f;
            for (int64_t p = 0; p < plane; p++) total += dy[p] * x_row[p];
            scale->grad[q] += total;
        }
    }
}

ag_tensor *ag_mul_channels(ag_ctx *ctx, ag_tensor *x, ag_tensor *scale) {
    AG_OP_BEGIN(ctx, x, scale);
    AG_CHECK_SHAPES(x->ndim == 4 && scale->ndim == 2 && scale->shape[0] == x->shape[0] &&
                        scale->shape[1] == x->shape[1],
                    "mul_channels", x, scale);
    ag_tensor *out = ag_empty(ctx, "mul_channels", 4, x->shape);
    if (!out) return NULL;
    ag_tensor *inputs[2] = {x, scale};
    ag_record(ctx, "mul_channels", mul_channels_backward, out, 2, inputs, 0);
    if (ag_failed(ctx)) return NULL;
    int64_t plane = (int64_t)x->shape[2] * x->shape[3];
    for (int64_t q = 0; q < scale->numel; q++) {
        const float *x_row = x->data + q * plane;
        float s = scale->data[q], *y = out->data + q * plane;
        for (int64_t p = 0; p < plane; p++) y[p] = x_row[p] * s;
    }
    return out;
}
