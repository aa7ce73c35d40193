/* Indexing and shape ops: row gather and scatter-add (the MoE dispatch and
 * combine permutations), embedding lookup, reshape, transpose, concat, slice.
 *
 * Row ops (gather_rows, scatter_add_rows, embedding) index along dimension 0;
 * a "row" is everything after it, so x [N,D] is the usual case and x [N,H,Dh]
 * works the same way (the output keeps the trailing dims).
 *
 * Index arrays are NOT copied: the tape node keeps the caller's pointer
 * (index, ids) and backward reads it again. The array must stay valid and
 * unchanged until backward has run, e.g. an arena array of the same step or
 * the batch buffer. Out-of-range entries are bugs (CM_ASSERT naming the
 * position and the value), checked in forward only.
 *
 * ag_reshape accepts one target size of -1, inferred from the element count
 * ([3,5,7] to {-1,7} gives [15,7]). Its output aliases the input's data but
 * has its own gradient buffer; backward adds that buffer into x->grad. */
#include <limits.h>
#include <stdio.h>
#include <string.h>

#include "autograd/op_write.h"

/* Elements in dims [from, to) of t. */
static int64_t span_numel(const ag_tensor *t, int from, int to) {
    int64_t count = 1;
    for (int d = from; d < to; d++) count *= t->shape[d];
    return count;
}

/* For each of `blocks` blocks: dst[b*dst_stride + j] (+)= src[b*src_stride + j]
 * for j < width. The shared kernel of concat and slice (both directions). */
static void copy_blocks(float *restrict dst, int64_t dst_stride, const float *restrict src,
                        int64_t src_stride, int64_t blocks, int64_t width, bool accumulate) {
    if (width == 0) return;
    for (int64_t b = 0; b < blocks; b++) {
        float *restrict d = dst + b * dst_stride;
        const float *restrict s = src + b * src_stride;
        if (accumulate)
            for (int64_t j = 0; j < width; j++) d[j] += s[j];
        else
            memcpy(d, s, (size_t)width * sizeof(float));
    }
}

/* ---- row gather / scatter-add ------------------------------------------------ */

/* dst [m,row] = src rows index[i] (src [N,row]) */
static void rows_gather(float *restrict dst, const float *restrict src, const int32_t *index, int m,
                        int64_t row) {
    if (row == 0) return;
    for (int i = 0; i < m; i++)
        memcpy(dst + i * row, src + (int64_t)index[i] * row, (size_t)row * sizeof(float));
}

/* dst [N,row]: dst[index[i]] += src[i] for src [m,row]; repeated indices add. */
static void rows_scatter_add(float *restrict dst, const float *restrict src, const int32_t *index,
                             int m, int64_t row) {
    for (int i = 0; i < m; i++) {
        float *restrict d = dst + (int64_t)index[i] * row;
        const float *restrict s = src + i * row;
        for (int64_t j = 0; j < row; j++) d[j] += s[j];
    }
}

/* dst [m,row]: dst[i] += src[index[i]] for src [N,row]. */
static void rows_gather_add(float *restrict dst, const float *restrict src, const int32_t *index,
                            int m, int64_t row) {
    for (int i = 0; i < m; i++) {
        float *restrict d = dst + i * row;
        const float *restrict s = src + (int64_t)index[i] * row;
        for (int64_t j = 0; j < row; j++) d[j] += s[j];
    }
}

static void check_indices(const char *op, const char *what, const int32_t *index, int count,
                          int limit) {
    CM_ASSERT(count >= 0, "%s: negative %s count %d", op, what, count);
    CM_ASSERT(index || count == 0, "%s: %s is NULL with %d entries", op, what, count);
    for (int i = 0; i < count; i++)
        CM_ASSERT(index[i] >= 0 && index[i] < limit, "%s: %s[%d] = %d is out of range [0,%d)", op,
                  what, i, (int)index[i], limit);
}

typedef struct rows_saved {
    const int32_t *index; /* caller-owned, see the file comment */
    int count;
} rows_saved;

/* x [N,D], index[m] -> [m,D]; backward dx[index[i]] += dout[i] */
static void gather_backward(ag_ctx *ctx, ag_node *node) {
    (void)ctx;
    const rows_saved *saved = node->saved;
    ag_tensor *x = node->in[0];
    rows_scatter_add(x->grad, node->out->grad, saved->index, saved->count,
                     span_numel(x, 1, x->ndim));
}

/* Shared by gather_rows and embedding; `op` is what the tape records and
 * `what` names the index array in messages. */
static ag_tensor *gather_op(ag_ctx *ctx, const char *op, const char *what, ag_tensor *x,
                            const int32_t *index, int m) {
    AG_OP_BEGIN(ctx, x);
    check_indices(op, what, index, m, x->shape[0]);
    int shape[AG_MAX_DIMS];
    memcpy(shape, x->shape, sizeof shape);
    shape[0] = m;
    ag_tensor *out = ag_empty(ctx, op, x->ndim, shape);
    if (!out) return NULL;
    rows_gather(out->data, x->data, index, m, span_numel(x, 1, x->ndim));
    ag_node *node = ag_record(ctx, op, gather_backward, out, 1, &x, sizeof(rows_saved));
    if (ag_failed(ctx)) return NULL;
    if (node) *(rows_saved *)node->saved = (rows_saved){index, m};
    return out;
}

ag_tensor *ag_gather_rows(ag_ctx *ctx, ag_tensor *x, const int32_t *index, int m) {
    return gather_op(ctx, "gather_rows", "index", x, index, m);
}

ag_tensor *ag_embedding(ag_ctx *ctx, ag_tensor *table, const int32_t *ids, int n) {
    return gather_op(ctx, "embedding", "ids", table, ids, n);
}

/* x [M,D], index[M] -> [n_out,D]; backward dx[i] += dout[index[i]] */
static void scatter_add_backward(ag_ctx *ctx, ag_node *node) {
    (void)ctx;
    const rows_saved *saved = node->saved;
    ag_tensor *x = node->in[0];
    rows_gather_add(x->grad, node->out->grad, saved->index, saved->count,
                    span_numel(x, 1, x->ndim));
}

ag_tensor *ag_scatter_add_rows(ag_ctx *ctx, ag_tensor *x, const int32_t *index, int n_out) {
    AG_OP_BEGIN(ctx, x);
    const char *op = "scatter_add_rows";
    CM_ASSERT(n_out >= 0, "%s: negative output row count %d", op, n_out);
    int rows_in = x->shape[0];
    check_indices(op, "index", index, rows_in, n_out);
    int shape[AG_MAX_DIMS];
    memcpy(shape, x->shape, sizeof shape);
    shape[0] = n_out;
    ag_tensor *out = ag_zeros(ctx, op, x->ndim, shape);
    if (!out) return NULL;
    rows_scatter_add(out->data, x->data, index, rows_in, span_numel(x, 1, x->ndim));
    ag_node *node = ag_record(ctx, op, scatter_add_backward, out, 1, &x, sizeof(rows_saved));
    if (ag_failed(ctx)) return NULL;
    if (node) *(rows_saved *)node->saved = (rows_saved){index, rows_in};
    return out;
}

/* ---- scatter_add_rows_scaled ------------------------------------------------------- */

typedef struct scaled_rows_saved {
    const int32_t *index;
    int count;
} scaled_rows_saved;

/* dx[s] += scale[s] dout[index[s]],  dscale[s] += x[s] . dout[index[s]] */
static void scatter_scaled_backward(ag_ctx *ctx, ag_node *node) {
    (void)ctx;
    const scaled_rows_saved *saved = node->saved;
    ag_tensor *x = node->in[0], *scale = node->in[1];
    const int64_t d = span_numel(x, 1, x->ndim);
    bool want_x = ag_wants_grad(x), want_scale = ag_wants_grad(scale);
    for (int s = 0; s < saved->count; s++) {
        const float *dout = node->out->grad + (int64_t)saved->index[s] * d;
        const float *x_row = x->data + (int64_t)s * d;
        if (want_x) {
            float *dx = x->grad + (int64_t)s * d, factor = scale->data[s];
            for (int64_t j = 0; j < d; j++) dx[j] += factor * dout[j];
        }
        if (want_scale) {
            float dot = 0.0f;
            for (int64_t j = 0; j < d; j++) dot += x_row[j] * dout[j];
            scale->grad[s] += dot;
        }
    }
}

ag_tensor *ag_scatter_add_rows_scaled(ag_ctx *ctx, ag_tensor *x, ag_tensor *scale,
                                      const int32_t *index, int n_out) {
    AG_OP_BEGIN(ctx, x, scale);
    const char *op = "scatter_add_rows_scaled";
    CM_ASSERT(n_out >= 0, "%s: negative output row count %d", op, n_out);
    int rows_in = x->shape[0];
    AG_CHECK_SHAPES(scale->numel == rows_in, op, x, scale);
    check_indices(op, "index", index, rows_in, n_out);
    int shape[AG_MAX_DIMS];
    memcpy(shape, x->shape, sizeof shape);
    shape[0] = n_out;
    ag_tensor *out = ag_zeros(ctx, op, x->ndim, shape);
    if (!out) return NULL;
    const int64_t d = span_numel(x, 1, x->ndim);
    for (int s = 0; s < rows_in; s++) {
        float *out_row = out->data + (int64_t)index[s] * d, factor = scale->data[s];
        const float *x_row = x->data + (int64_t)s * d;
        for (int64_t j = 0; j < d; j++) out_row[j] += factor * x_row[j];
    }
    ag_tensor *inputs[2] = {x, scale};
    ag_node *node =
        ag_record(ctx, op, scatter_scaled_backward, out, 2, inputs, sizeof(scaled_rows_saved));
    if (ag_failed(ctx)) return NULL;
    if (node) *(scaled_rows_saved *)node->saved = (scaled_rows_saved){index, rows_in};
    return out;
}

/* ---- reshape --------------------------------------------------------------------- */

static const char *dims_str(int ndim, const int *shape, char *buf, size_t size) {
    size_t n = (size_t)snprintf(buf, size, "[");
    for (int i = 0; i < ndim && n < size; i++)
        n += (size_t)snprintf(buf + n, size - n, i ? ",%d" : "%d", shape[i]);
    if (n < size) snprintf(buf + n, size - n, "]");
    return buf;
}

/* x [*] -> [*] (same numel): dx += dout */
static void reshape_backward(ag_ctx *ctx, ag_node *node) {
    (void)ctx;
    ag_tensor *x = node->in[0];
    const float *restrict dout = node->out->grad;
    float *restrict dx = x->grad;
    for (int64_t i = 0; i < x->numel; i++) dx[i] += dout[i];
}

ag_tensor *ag_reshape(ag_ctx *ctx, ag_tensor *x, int ndim, const int *shape) {
    AG_OP_BEGIN(ctx, x);
    CM_ASSERT(ndim >= 1 && ndim <= AG_MAX_DIMS, "reshape: target rank %d not in [1,%d]", ndim,
              AG_MAX_DIMS);
    char have[64], want[64];
    int resolved[AG_MAX_DIMS];
    int inferred = -1;
    int64_t known = 1;
    for (int d = 0; d < ndim; d++) {
        resolved[d] = shape[d];
        if (shape[d] == -1) {
            CM_ASSERT(inferred < 0, "reshape: more than one -1 in target %s",
                      dims_str(ndim, shape, want, sizeof want));
            inferred = d;
        } else {
            CM_ASSERT(shape[d] >= 0, "reshape: negative size in target %s",
                      dims_str(ndim, shape, want, sizeof want));
            known *= shape[d];
        }
    }
    if (inferred >= 0) {
        CM_ASSERT(known > 0 && x->numel % known == 0 && x->numel / known <= INT_MAX,
                  "reshape: cannot infer the -1 in %s from %s (%lld elements)",
                  dims_str(ndim, shape, want, sizeof want), ag_shape_str(x, have, sizeof have),
                  (long long)x->numel);
        resolved[inferred] = (int)(x->numel / known);
        known *= resolved[inferred];
    }
    CM_ASSERT(known == x->numel, "reshape: %s (%lld elements) cannot become %s (%lld elements)",
              ag_shape_str(x, have, sizeof have), (long long)x->numel,
              dims_str(ndim, resolved, want, sizeof want), (long long)known);
    ag_tensor *out = ag_alias(ctx, "reshape", x->data, ndim, resolved);
    if (!out) return NULL;
    ag_record(ctx, "reshape", reshape_backward, out, 1, &x, 0);
    return ag_failed(ctx) ? NULL : out;
}

/* ---- transpose ------------------------------------------------------------------- */

/* The output's shape padded on the left to 4 dims, and for each output dim
 * the input stride it walks: output element (i0,i1,i2,i3), stored
 * contiguously, is input element sum_k i_k * in_stride[k]. */
typedef struct permuted_view {
    int shape[4];
    int64_t in_stride[4];
} permuted_view;

static permuted_view transpose_view(const ag_tensor *x, int dim0, int dim1) {
    permuted_view view;
    int pad = 4 - x->ndim;
    int64_t stride = 1;
    for (int d = 3; d >= 0; d--) {
        int size = d >= pad ? x->shape[d - pad] : 1;
        view.shape[d] = size;
        view.in_stride[d] = stride;
        stride *= size;
    }
    int a = dim0 + pad, b = dim1 + pad;
    int size_a = view.shape[a];
    int64_t stride_a = view.in_stride[a];
    view.shape[a] = view.shape[b];
    view.in_stride[a] = view.in_stride[b];
    view.shape[b] = size_a;
    view.in_stride[b] = stride_a;
    return view;
}

/* Walks the output contiguously. Forward: out = x through the view. Backward
 * (accumulate): dx through the view += dout; the view is a permutation, so
 * no two output elements hit the same dx element. When the last input dim is
 * not moved (e.g. [B,T,H,Dh] -> [B,H,T,Dh]) each innermost run is contiguous
 * on both sides: memcpy / a unit-stride add loop. */
static void permute_copy(const permuted_view *view, float *restrict strided,
                         float *restrict contiguous, bool accumulate) {
    int n3 = view->shape[3];
    int64_t s3 = view->in_stride[3];
    if ((int64_t)view->shape[0] * view->shape[1] * view->shape[2] * n3 == 0) return;
    float *restrict c = contiguous;
    for (int i0 = 0; i0 < view->shape[0]; i0++)
        for (int i1 = 0; i1 < view->shape[1]; i1++)
            for (int i2 = 0; i2 < view->shape[2]; i2++, c += n3) {
                float *restrict s = strided + i0 * view->in_stride[0] + i1 * view->in_stride[1] +
                                    i2 * view->in_stride[2];
                if (accumulate) {
                    if (s3 == 1)
                        for (int i3 = 0; i3 < n3; i3++) s[i3] += c[i3];
                    else
                        for (int i3 = 0; i3 < n3; i3++) s[i3 * s3] += c[i3];
                } else {
                    if (s3 == 1)
                        memcpy(c, s, (size_t)n3 * sizeof(float));
                    else
                        for (int i3 = 0; i3 < n3; i3++) c[i3] = s[i3 * s3];
                }
            }
}

/* x [..a..b..] -> [..b..a..]; dx += dout transposed back */
static void transpose_backward(ag_ctx *ctx, ag_node *node) {
    (void)ctx;
    permute_copy(node->saved, node->in[0]->grad, node->out->grad, true);
}

ag_tensor *ag_transpose(ag_ctx *ctx, ag_tensor *x, int dim0, int dim1) {
    AG_OP_BEGIN(ctx, x);
    char have[64];
    CM_ASSERT(dim0 >= 0 && dim0 < x->ndim && dim1 >= 0 && dim1 < x->ndim,
              "transpose: dims %d and %d not both in [0,%d) for %s", dim0, dim1, x->ndim,
              ag_shape_str(x, have, sizeof have));
    permuted_view view = transpose_view(x, dim0, dim1);
    int shape[AG_MAX_DIMS];
    memcpy(shape, x->shape, sizeof shape);
    shape[dim0] = x->shape[dim1];
    shape[dim1] = x->shape[dim0];
    ag_tensor *out = ag_empty(ctx, "transpose", x->ndim, shape);
    if (!out) return NULL;
    permute_copy(&view, x->data, out->data, false);
    ag_node *node =
        ag_record(ctx, "transpose", transpose_backward, out, 1, &x, sizeof(permuted_view));
    if (ag_failed(ctx)) return NULL;
    if (node) *(permuted_view *)node->saved = view;
    return out;
}

/* ---- concat ---------------------------------------------------------------------- */

/* xs[k] [..., n_k, ...] -> [..., sum n_k, ...]; dxs[k] += its window of dout */
static void concat_backward(ag_ctx *ctx, ag_node *node) {
    (void)ctx;
    int dim = *(const int *)node->saved;
    const ag_tensor *out = node->out;
    int64_t blocks = span_numel(out, 0, dim), inner = span_numel(out, dim + 1, out->ndim);
    int64_t out_width = out->shape[dim] * inner, offset = 0;
    for (int k = 0; k < node->n_in; k++) {
        ag_tensor *x = node->in[k];
        int64_t width = x->shape[dim] * inner;
        if (ag_wants_grad(x))
            copy_blocks(x->grad, width, out->grad + offset, out_width, blocks, width, true);
        offset += width;
    }
}

ag_tensor *ag_concat(ag_ctx *ctx, ag_tensor *const *xs, int n, int dim) {
    if (ag_failed(ctx)) return NULL;
    CM_ASSERT(n >= 1 && xs, "concat: needs at least one input, got %d", n);
    for (int k = 0; k < n; k++)
        if (!xs[k]) return NULL;
    const ag_tensor *first = xs[0];
    CM_ASSERT(dim >= 0 && dim < first->ndim, "concat: dim %d not in [0,%d)", dim, first->ndim);
    int64_t total = 0;
    for (int k = 0; k < n; k++) {
        bool match = xs[k]->ndim == first->ndim;
        for (int d = 0; match && d < first->ndim; d++)
            match = d == dim || xs[k]->shape[d] == first->shape[d];
        AG_CHECK_SHAPES(match, "concat", first, xs[k]);
        total += xs[k]->shape[dim];
    }
    CM_ASSERT(total <= INT_MAX, "concat: %lld rows along dim %d", (long long)total, dim);
    int shape[AG_MAX_DIMS];
    memcpy(shape, first->shape, sizeof shape);
    shape[dim] = (int)total;
    ag_tensor *out = ag_empty(ctx, "concat", first->ndim, shape);
    if (!out) return NULL;
    int64_t blocks = span_numel(out, 0, dim), inner = span_numel(out, dim + 1, out->ndim);
    int64_t out_width = total * inner, offset = 0;
    for (int k = 0; k < n; k++) {
        int64_t width = xs[k]->shape[dim] * inner;
        copy_blocks(out->data + offset, out_width, xs[k]->data, width, blocks, width, false);
        offset += width;
    }
    ag_node *node = ag_record(ctx, "concat", concat_backward, out, n, xs, sizeof(int));
    if (ag_failed(ctx)) return NULL;
    if (node) *(int *)node->saved = dim;
    return out;
}

/* ---- slice ----------------------------------------------------------------------- */

typedef struct slice_saved {
    int dim;
    int start;
} slice_saved;

/* x [..., n, ...] -> [..., length, ...]; dx[..., start:start+length, ...] += dout */
static void slice_backward(ag_ctx *ctx, ag_node *node) {
    (void)ctx;
    const slice_saved *saved = node->saved;
    ag_tensor *x = node->in[0];
    int64_t blocks = span_numel(x, 0, saved->dim), inner = span_numel(x, saved->dim + 1, x->ndim);
    int64_t out_width = node->out->shape[saved->dim] * inner;
    copy_blocks(x->grad + saved->start * inner, x->shape[saved->dim] * inner, node->out->grad,
                out_width, blocks, out_width, true);
}

ag_tensor *ag_slice(ag_ctx *ctx, ag_tensor *x, int dim, int start, int length) {
    AG_OP_BEGIN(ctx, x);
    char have[64];
    CM_ASSERT(dim >= 0 && dim < x->ndim, "slice: dim %d not in [0,%d) for %s", dim, x->ndim,
              ag_shape_str(x, have, sizeof have));
    CM_ASSERT(start >= 0 && length >= 0 && (int64_t)start + length <= x->shape[dim],
              "slice: start %d length %d out of bounds of dim %d of %s", start, length, dim,
              ag_shape_str(x, have, sizeof have));
    int shape[AG_MAX_DIMS];
    memcpy(shape, x->shape, sizeof shape);
    shape[dim] = length;
    ag_tensor *out = ag_empty(ctx, "slice", x->ndim, shape);
    if (!out) return NULL;
    int64_t blocks = span_numel(x, 0, dim), inner = span_numel(x, dim + 1, x->ndim);
    int64_t out_width = length * inner;
    copy_blocks(out->data, out_width, x->data + start * inner, x->shape[dim] * inner, blocks,
                out_width, false);
    ag_node *node = ag_record(ctx, "slice", slice_backward, out, 1, &x, sizeof(slice_saved));
    if (ag_failed(ctx)) return NULL;
    if (node) *(slice_saved *)node->saved = (slice_saved){dim, start};
    return out;
}
