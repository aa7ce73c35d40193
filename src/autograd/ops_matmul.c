/* Matrix-product ops: matmul, batched matmul and linear (x w^T + bias), all
 * forward and backward passes on cblas_sgemm (OpenBLAS).
 *
 * Gradients accumulate with beta = 1 straight into the input gradients, so a
 * backward pass makes no temporary copies. For C = op(A) op(B):
 *   d op(A) = dC op(B)^T        d op(B) = op(A)^T dC
 * and when A (or B) is stored transposed, its gradient is the transpose of
 * that, which sgemm produces by swapping and transposing the factors. */
#include <cblas.h>
#include <limits.h>
#include <string.h>

#include "autograd/op_write.h"
#include "common/pool.h"

/* ---- the sgemm kernel ------------------------------------------------------- */

/* Below this many multiply-adds an sgemm runs on the calling thread: the
 * split would cost more than it saves (~0.1 ms of work at 2 threads). */
#define PARALLEL_MIN_MACS (1 << 21)

typedef struct sgemm_job {
    CBLAS_TRANSPOSE trans_a, trans_b;
    int m, n, k, lda, ldb, ldc, tasks;
    float alpha, beta;
    const float *a, *b;
    float *c;
    bool split_rows; /* else columns */
} sgemm_job;

/* One block of C's rows (or columns): an ordinary single-threaded sgemm. */
static void sgemm_block(void *context, int task) {
    const sgemm_job *j = context;
    int64_t begin, end;
    if (j->split_rows) {
        cm_pool_split(j->m, j->tasks, task, 16, &begin, &end);
        if (begin == end) return;
        int64_t a_offset = j->trans_a == CblasTrans ? begin : begin * j->lda;
        cblas_sgemm(CblasRowMajor, j->trans_a, j->trans_b, (int)(end - begin), j->n, j->k, j->alpha,
                    j->a + a_offset, j->lda, j->b, j->ldb, j->beta, j->c + begin * j->ldc, j->ldc);
    } else {
        cm_pool_split(j->n, j->tasks, task, 16, &begin, &end);
        if (begin == end) return;
        int64_t b_offset = j->trans_b == CblasTrans ? begin * j->ldb : begin;
        cblas_sgemm(CblasRowMajor, j->trans_a, j->trans_b, j->m, (int)(end - begin), j->k, j->alpha,
                    j->a, j->lda, j->b + b_offset, j->ldb, j->beta, j->c + begin, j->ldc);
    }
}

/* c [m,n] = alpha op(a) op(b) + beta c; op(a) [m,k] is stored as a [m,k]
 * (lda >= k) or, transposed, as a [k,m] (lda >= m); likewise op(b) [k,n]. */
void ag_sgemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const float *a, int lda,
              const float *b, int ldb, float beta, float *c, int ldc) {
    CM_ASSERT(m >= 0 && n >= 0 && k >= 0, "sgemm: negative size m=%d n=%d k=%d", m, n, k);
    CM_ASSERT(ldc >= n && lda >= (trans_a ? m : k) && ldb >= (trans_b ? k : n),
              "sgemm: leading dimension too small (m=%d n=%d k=%d lda=%d ldb=%d ldc=%d)", m, n, k,
              lda, ldb, ldc);
    if (m == 0 || n == 0) return;
    if (k == 0) {
        /* An empty product: C = beta C. OpenBLAS rejects the zero leading
         * dimensions this case can come with (e.g. a linear over 0 tokens). */
        for (int i = 0; i < m && beta != 1.0f; i++) {
            float *c_row = c + (int64_t)i * ldc;
            if (beta == 0.0f) /* not 0 * c: c may hold NaN garbage */
                memset(c_row, 0, (size_t)n * sizeof(float));
            else
                for (int j = 0; j < n; j++) c_row[j] *= beta;
        }
        return;
    }
    sgemm_job job = {.trans_a = trans_a ? CblasTrans : CblasNoTrans,
                     .trans_b = trans_b ? CblasTrans : CblasNoTrans,
                     .m = m,
                     .n = n,
                     .k = k,
                     .lda = lda,
                     .ldb = ldb,
                     .ldc = ldc,
                     .tasks = cm_pool_threads(),
                     .alpha = alpha,
                     .beta = beta,
                     .a = a,
                     .b = b,
                     .c = c,
                     .split_rows = m >= n};
    /* OpenBLAS runs single-threaded (cm_pool_set_threads): the pool's
     * threads each take a block of rows or columns of C */
    if (job.tasks == 1 || cm_pool_in_task() || (int64_t)m * n * k < PARALLEL_MIN_MACS)
        job.tasks = 1;
    cm_pool_run(job.tasks, sgemm_block, &job);
}

/* ---- matmul and bmm ------------------------------------------------------------ */

/* One shape for both ops (matmul is bmm with batch 1). Per batch item:
 * a [m,k] or [k,m], b [k,n] or [n,k], out [m,n]. */
typedef struct matmul_saved {
    bool trans_a, trans_b;
    int batch, m, n, k;
} matmul_saved;

static int64_t matmul_a_size(const matmul_saved *s) {
    return (int64_t)s->m * s->k;
}
static int64_t matmul_b_size(const matmul_saved *s) {
    return (int64_t)s->k * s->n;
}
static int64_t matmul_out_size(const matmul_saved *s) {
    return (int64_t)s->m * s->n;
}
/* Row lengths of a and b as stored. */
static int matmul_lda(const matmul_saved *s) {
    return s->trans_a ? s->m : s->k;
}
static int matmul_ldb(const matmul_saved *s) {
    return s->trans_b ? s->k : s->n;
}

/* a [batch,(m,k)|(k,m)], b [batch,(k,n)|(n,k)] -> out [batch,m,n] */
static void matmul_forward(const matmul_saved *s, const float *a, const float *b, float *out) {
    for (int i = 0; i < s->batch; i++)
        ag_sgemm(s->trans_a, s->trans_b, s->m, s->n, s->k, 1.0f, a + i * matmul_a_size(s),
                 matmul_lda(s), b + i * matmul_b_size(s), matmul_ldb(s), 0.0f,
                 out + i * matmul_out_size(s), s->n);
}

static void matmul_backward(ag_ctx *ctx, ag_node *node) {
    (void)ctx;
    const matmul_saved *s = node->saved;
    ag_tensor *a = node->in[0], *b = node->in[1];
    bool want_a = ag_wants_grad(a), want_b = ag_wants_grad(b);
    int m = s->m, n = s->n, k = s->k, lda = matmul_lda(s), ldb = matmul_ldb(s);
    for (int i = 0; i < s->batch; i++) {
        const float *dout = node->out->grad + i * matmul_out_size(s);
        const float *a_i = a->data + i * matmul_a_size(s);
        const float *b_i = b->data + i * matmul_b_size(s);
        if (want_a) {
            float *da = a->grad + i * matmul_a_size(s);
            if (s->trans_a) /* da [k,m] += op(b) dout^T */
                ag_sgemm(s->trans_b, true, k, m, n, 1.0f, b_i, ldb, dout, n, 1.0f, da, m);
            else /* da [m,k] += dout op(b)^T */
                ag_sgemm(false, !s->trans_b, m, k, n, 1.0f, dout, n, b_i, ldb, 1.0f, da, k);
        }
        if (want_b) {
            float *db = b->grad + i * matmul_b_size(s);
            if (s->trans_b) /* db [n,k] += dout^T op(a) */
                ag_sgemm(true, s->trans_a, n, k, m, 1.0f, dout, n, a_i, lda, 1.0f, db, k);
            else /* db [k,n] += op(a)^T dout */
                ag_sgemm(!s->trans_a, false, k, n, m, 1.0f, a_i, lda, dout, n, 1.0f, db, n);
        }
    }
}

/* matmul (batch_dims 0) or bmm (batch_dims 1): the matrices are the last two
 * dimensions of a and b. */
static ag_tensor *matmul_op(ag_ctx *ctx, const char *op, ag_tensor *a, ag_tensor *b, bool trans_a,
                            bool trans_b, int batch_dims) {
    int ndim = batch_dims + 2;
    AG_CHECK_SHAPES(a->ndim == ndim && b->ndim == ndim, op, a, b);
    AG_CHECK_SHAPES(batch_dims == 0 || a->shape[0] == b->shape[0], op, a, b);
    const int *a_mat = a->shape + batch_dims, *b_mat = b->shape + batch_dims;
    matmul_saved s = {
        .trans_a = trans_a,
        .trans_b = trans_b,
        .batch = batch_dims ? a->shape[0] : 1,
        .m = trans_a ? a_mat[1] : a_mat[0],
        .k = trans_a ? a_mat[0] : a_mat[1],
        .n = trans_b ? b_mat[0] : b_mat[1],
    };
    AG_CHECK_SHAPES((trans_b ? b_mat[1] : b_mat[0]) == s.k, op, a, b);
    int out_shape[3] = {s.batch, s.m, s.n};
    ag_tensor *out = ag_empty(ctx, op, ndim, out_shape + 1 - batch_dims);
    if (!out) return NULL;
    matmul_forward(&s, a->data, b->data, out->data);
    ag_tensor *inputs[2] = {a, b};
    ag_node *node = ag_record(ctx, op, matmul_backward, out, 2, inputs, sizeof s);
    if (ag_failed(ctx)) return NULL;
    if (node) *(matmul_saved *)node->saved = s;
    return out;
}

/* a [M,K] (or [K,M]), b [K,N] (or [N,K]) -> [M,N] */
ag_tensor *ag_matmul(ag_ctx *ctx, ag_tensor *a, ag_tensor *b, bool trans_a, bool trans_b) {
    AG_OP_BEGIN(ctx, a, b);
    return matmul_op(ctx, "matmul", a, b, trans_a, trans_b, 0);
}

/* a [B,M,K] (or [B,K,M]), b [B,K,N] (or [B,N,K]) -> [B,M,N] */
ag_tensor *ag_bmm(ag_ctx *ctx, ag_tensor *a, ag_tensor *b, bool trans_a, bool trans_b) {
    AG_OP_BEGIN(ctx, a, b);
    return matmul_op(ctx, "bmm", a, b, trans_a, trans_b, 1);
}

/* ---- linear ------------------------------------------------------------------------ */

/* x [N,IN] (leading dims flattened), w [OUT,IN], bias [OUT] -> y [N,OUT] */
static void linear_backward(ag_ctx *ctx, ag_node *node) {
    (void)ctx;
    ag_tensor *x = node->in[0], *w = node->in[1], *bias = node->n_in > 2 ? node->in[2] : NULL;
    const float *dy = node->out->grad;
    int rows = (int)ag_rows(x), in_features = w->shape[1], out_features = w->shape[0];
    if (ag_wants_grad(x)) /* dx [N,IN] += dy [N,OUT] w [OUT,IN] */
        ag_sgemm(false, false, rows, in_features, out_features, 1.0f, dy, out_features, w->data,
                 in_features, 1.0f, x->grad, in_features);
    if (ag_wants_grad(w)) /* dw [OUT,IN] += dy^T x */
        ag_sgemm(true, false, out_features, in_features, rows, 1.0f, dy, out_features, x->data,
                 in_features, 1.0f, w->grad, in_features);
    /* dbias [OUT] += column sums of dy, one BLAS axpy per row: a plain loop
     * is not vectorised at -O2 and took 5 ms (15% of this backward) on
     * [4096,1024]; saxpy takes 0.6 ms. */
    if (bias && ag_wants_grad(bias))
        for (int r = 0; r < rows; r++)
            cblas_saxpy(out_features, 1.0f, dy + (int64_t)r * out_features, 1, bias->grad, 1);
}

ag_tensor *ag_linear(ag_ctx *ctx, ag_tensor *x, ag_tensor *w, ag_tensor *bias) {
    AG_OP_BEGIN(ctx, x, w);
    AG_CHECK_SHAPES(w->ndim == 2 && ag_last_dim(x) == w->shape[1], "linear", x, w);
    int in_features = w->shape[1], out_features = w->shape[0];
    if (bias) AG_CHECK_SHAPES(bias->ndim == 1 && bias->shape[0] == out_features, "linear", w, bias);
    int64_t rows = ag_rows(x);
    CM_ASSERT(rows <= INT_MAX, "linear: %lld rows exceed the sgemm size limit", (long long)rows);

    int out_shape[AG_MAX_DIMS];
    memcpy(out_shape, x->shape, sizeof out_shape);
    out_shape[x->ndim - 1] = out_features;
    ag_tensor *y = ag_empty(ctx, "linear", x->ndim, out_shape);
    if (!y) return NULL;
    /* With a bias, the rows start as the bias and sgemm adds x w^T (beta 1):
     * the same single pass over y that sgemm's beta 0 zeroing would make. */
    if (bias)
        for (int64_t r = 0; r < rows; r++)
            memcpy(y->data + r * out_features, bias->data, (size_t)out_features * sizeof(float));
    ag_sgemm(false, true, (int)rows, out_features, in_features, 1.0f, x->data, in_features, w->data,
             in_features, bias ? 1.0f : 0.0f, y->data, out_features);

    ag_tensor *inputs[3] = {x, w, bias};
    ag_record(ctx, "linear", linear_backward, y, bias ? 3 : 2, inputs, 0);
    return ag_failed(ctx) ? NULL : y;
}
