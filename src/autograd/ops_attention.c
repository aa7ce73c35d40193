/* Causal multi-head self-attention as one op over the fused qkv projection.
 *
 * qkv [B,T,3D] holds q, k and v side by side; head h reads columns
 * h*Dh .. (h+1)*Dh-1 of each (Dh = D/H). Every product is an sgemm that reads
 * q, k, v in place (leading dimension 3D) and writes the output in place
 * (leading dimension D): no head is ever copied out. Per (b,h):
 *   S = Q K^T / sqrt(Dh)   P = causal row softmax(S)   O = P V
 * P is not kept: backward computes S and P again per (b,h) (one more
 * T x T x Dh sgemm per head, about 2% of an lm step) instead of holding
 * [B,H,T,T] floats per layer until backward (67 MiB over lm-moe's four
 * layers). The sgemms compute the full T x T products and the softmax loops
 * touch only the j <= i part. */
#include <math.h>
#include <string.h>

#include "autograd/op_write.h"
#include "common/pool.h"

/* The softmax loops use GCC/Clang vector extensions: at the project's -O2,
 * GCC vectorises no loop with an unknown trip count, and never a float sum
 * without -ffast-math, so plain loops ran 3x slower. The width follows the
 * target: 4 floats on the x86-64 baseline (SSE2), 8 when the build enables
 * AVX (measured 1.4x faster again on this machine's softmax). */
#if defined(__AVX__)
enum { VEC_WIDTH = 8 };
#else
enum { VEC_WIDTH = 4 };
#endif
typedef float vec_f __attribute__((vector_size(VEC_WIDTH * sizeof(float))));
typedef int32_t vec_i __attribute__((vector_size(VEC_WIDTH * sizeof(int32_t))));

static inline vec_f vec_load(const float *p) {
    vec_f v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline void vec_store(float *p, vec_f v) {
    memcpy(p, &v, sizeof v);
}
static inline vec_f vec_splat(float x) {
    return (vec_f){0} + x;
}
static inline float vec_sum(vec_f v) {
    float total = 0.0f;
    for (int l = 0; l < VEC_WIDTH; l++) total += v[l];
    return total;
}
/* Lane-wise a > b ? a : b. NaN scores need no care here: exp turns them
 * into NaN probabilities whatever the maximum is. */
static inline vec_f vec_max(vec_f a, vec_f b) {
    vec_i a_greater = a > b;
    return (vec_f)((a_greater & (vec_i)a) | (~a_greater & (vec_i)b));
}

/* exp(x) lane-wise for x <= 0 (a score minus its row maximum), inline and
 * branch-free. Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, then a
 * degree-7 Taylor polynomial (truncation error below 1e-8 relative) and 2^n
 * built from the exponent bits. Inputs below -87 give exp(-87) ~ 1.6e-38
 * instead of underflowing, so 2^n stays a normal float. */
static inline vec_f vec_exp_nonpositive(vec_f x) {
    const vec_f lowest = vec_splat(-87.0f);
    vec_i below = x < lowest;
    x = (vec_f)((below & (vec_i)lowest) | (~below & (vec_i)x));
    /* Conversion truncates toward zero, so for x <= 0 this rounds to nearest. */
    vec_i n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, vec_i);
    vec_f n_float = __builtin_convertvector(n, vec_f);
    vec_f r = x - n_float * 0.693359375f + n_float * 2.12194440e-4f; /* ln2 in two parts */
    vec_f p = r * (1.0f / 5040.0f) + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return p * (vec_f)((n + 127) << 23);
}

/* scores [T,T] (already scaled) -> probabilities in place: row i is the
 * softmax of scores[i][0..i]; entries j > i are set to 0 (the sgemm O = P V
 * runs over full rows). */
static void causal_softmax_rows(float *scores, int t_len) {
    for (int i = 0; i < t_len; i++) {
        float *row = scores + (int64_t)i * t_len;
        int n = i + 1, n_vec = n - n % VEC_WIDTH, tail = n - n_vec;
        float row_max = row[0];
        if (n_vec) {
            vec_f maxima = vec_load(row);
            for (int j = VEC_WIDTH; j < n_vec; j += VEC_WIDTH)
                maxima = vec_max(vec_load(row + j), maxima);
            for (int l = 0; l < VEC_WIDTH; l++) row_max = maxima[l] > row_max ? maxima[l] : row_max;
        }
        for (int j = n_vec; j < n; j++) row_max = row[j] > row_max ? row[j] : row_max;

        vec_f totals = vec_splat(0.0f);
        for (int j = 0; j < n_vec; j += VEC_WIDTH) {
            vec_f e = vec_exp_nonpositive(vec_load(row + j) - row_max);
            vec_store(row + j, e);
            totals += e;
        }
        if (tail) { /* the last entries, padded to a vector whose pad lanes are dropped */
            float padded[VEC_WIDTH];
            for (int l = 0; l < VEC_WIDTH; l++) padded[l] = l < tail ? row[n_vec + l] : row_max;
            vec_f e = vec_exp_nonpositive(vec_load(padded) - row_max);
            for (int l = tail; l < VEC_WIDTH; l++) e[l] = 0.0f;
            vec_store(padded, e);
            memcpy(row + n_vec, padded, (size_t)tail * sizeof(float));
            totals += e;
        }
        float inv_total = 1.0f / vec_sum(totals);
        for (int j = 0; j < n_vec; j += VEC_WIDTH)
            vec_store(row + j, vec_load(row + j) * inv_total);
        for (int j = n_vec; j < n; j++) row[j] *= inv_total;
        memset(row + n, 0, (size_t)(t_len - n) * sizeof(float));
    }
}

/* probs [T,T], dprobs [T,T] -> dprobs replaced in place by dS / scale:
 * dS_ij = P_ij (dP_ij - sum_k dP_ik P_ik), 0 above the diagonal. */
static void causal_softmax_backward_rows(const float *probs, float *dprobs, int t_len) {
    for (int i = 0; i < t_len; i++) {
        const float *p_row = probs + (int64_t)i * t_len;
        float *d_row = dprobs + (int64_t)i * t_len;
        int n = i + 1, n_vec = n - n % VEC_WIDTH;
        vec_f dots = vec_splat(0.0f);
        for (int j = 0; j < n_vec; j += VEC_WIDTH)
            dots += vec_load(d_row + j) * vec_load(p_row + j);
        float dot = vec_sum(dots);
        for (int j = n_vec; j < n; j++) dot += d_row[j] * p_row[j];
        for (int j = 0; j < n_vec; j += VEC_WIDTH)
            vec_store(d_row + j, vec_load(p_row + j) * (vec_load(d_row + j) - dot));
        for (int j = n_vec; j < n; j++) d_row[j] = p_row[j] * (d_row[j] - dot);
        memset(d_row + n, 0, (size_t)(t_len - n) * sizeof(float));
    }
}

/* Sizes and strides of one call, shared by forward and backward. */
typedef struct attention_shape {
    int batch, t_len, model_dim, n_head, head_dim;
    float scale; /* 1 / sqrt(head_dim) */
} attention_shape;

typedef struct attention_saved {
    attention_shape shape;
} attention_saved;

/* The (b,h) pairs are independent: the pool's threads take contiguous runs
 * of them (one run per task, each with its own [T,T] scratch block where
 * one is needed), and the sgemms inside a task run on its thread. */
typedef struct attention_job {
    const attention_shape *s;
    const float *qkv, *dout;
    float *out, *dqkv;
    float *scratch; /* per task: one [T,T] block (forward), two (backward) */
    int tasks;
} attention_job;

/* qkv [B,T,3D] -> out [B,T,D] for the (b,h) pairs of `task`. */
static void attention_forward_task(void *context, int task) {
    const attention_job *j = context;
    const attention_shape *s = j->s;
    int t_len = s->t_len, head_dim = s->head_dim, ld_qkv = 3 * s->model_dim;
    int64_t first, last;
    cm_pool_split((int64_t)s->batch * s->n_head, j->tasks, task, 1, &first, &last);
    for (int64_t pair = first; pair < last; pair++) {
        int64_t b = pair / s->n_head, h = pair % s->n_head;
        const float *q = j->qkv + b * t_len * ld_qkv + h * head_dim;
        const float *k = q + s->model_dim, *v = q + 2 * s->model_dim;
        float *o = j->out + b * t_len * s->model_dim + h * head_dim;
        float *p = j->scratch + (int64_t)task * t_len * t_len;
        /* S [T,T] = scale Q K^T */
        ag_sgemm(false, true, t_len, t_len, head_dim, s->scale, q, ld_qkv, k, ld_qkv, 0.0f, p,
                 t_len);
        causal_softmax_rows(p, t_len);
        /* O [T,Dh] = P V, written into the output's head columns */
        ag_sgemm(false, false, t_len, head_dim, t_len, 1.0f, p, t_len, v, ld_qkv, 0.0f, o,
                 s->model_dim);
    }
}

/* Every product of the (b,h) pairs of `task` accumulates into dqkv. */
static void attention_backward_task(void *context, int task) {
    const attention_job *j = context;
    const attention_shape *s = j->s;
    int t_len = s->t_len, head_dim = s->head_dim, ld_qkv = 3 * s->model_dim;
    float *probs = j->scratch + (int64_t)2 * task * t_len * t_len, *dprobs = probs + t_len * t_len;
    int64_t first, last;
    cm_pool_split((int64_t)s->batch * s->n_head, j->tasks, task, 1, &first, &last);
    for (int64_t pair = first; pair < last; pair++) {
        int64_t b = pair / s->n_head, h = pair % s->n_head;
        int64_t q_offset = b * t_len * ld_qkv + h * head_dim;
        const float *q = j->qkv + q_offset;
        const float *k = q + s->model_dim, *v = q + 2 * s->model_dim;
        float *dq = j->dqkv + q_offset;
        float *dk = dq + s->model_dim, *dv = dq + 2 * s->model_dim;
        const float *dout = j->dout + b * t_len * s->model_dim + h * head_dim;
        /* P again: S = scale Q K^T, causal softmax */
        ag_sgemm(false, true, t_len, t_len, head_dim, s->scale, q, ld_qkv, k, ld_qkv, 0.0f, probs,
                 t_len);
        causal_softmax_rows(probs, t_len);
        const float *p = probs;
        /* dP [T,T] = dO V^T */
        ag_sgemm(false, true, t_len, t_len, head_dim, 1.0f, dout, s->model_dim, v, ld_qkv, 0.0f,
                 dprobs, t_len);
        /* dV [T,Dh] += P^T dO */
        ag_sgemm(true, false, t_len, head_dim, t_len, 1.0f, p, t_len, dout, s->model_dim, 1.0f, dv,
                 ld_qkv);
        causal_softmax_backward_rows(p, dprobs, t_len);
        /* dQ [T,Dh] += scale dS K;  dK [T,Dh] += scale dS^T Q */
        ag_sgemm(false, false, t_len, head_dim, t_len, s->scale, dprobs, t_len, k, ld_qkv, 1.0f, dq,
                 ld_qkv);
        ag_sgemm(true, false, t_len, head_dim, t_len, s->scale, dprobs, t_len, q, ld_qkv, 1.0f, dk,
                 ld_qkv);
    }
}

static int attention_tasks(const attention_shape *s) {
    int64_t pairs = (int64_t)s->batch * s->n_head;
    /* multiply-adds of the two products, at least ~50 us per task */
    int64_t macs = pairs * 2 * (int64_t)s->t_len * s->t_len * s->head_dim;
    int tasks = cm_pool_tasks_for(macs, (int64_t)1 << 21);
    return tasks < pairs ? tasks : (int)(pairs > 0 ? pairs : 1);
}

/* qkv [B,T,3D] -> out [B,T,D] */
static void attention_backward(ag_ctx *ctx, ag_node *node) {
    const attention_saved *saved = node->saved;
    const attention_shape *s = &saved->shape;
    ag_tensor *qkv = node->in[0];
    attention_job job = {.s = s,
                         .qkv = qkv->data,
                         .dout = node->out->grad,
                         .dqkv = qkv->grad,
                         .tasks = attention_tasks(s)};
    job.scratch =
        ag_alloc_floats(ctx, (int64_t)job.tasks * s->t_len * s->t_len, "causal_attention backward");
    if (!job.scratch) return; /* ctx->status holds the error */
    cm_pool_run(job.tasks, attention_backward_task, &job);
}

/* qkv [B,T,3D] -> [B,T,D] */
ag_tensor *ag_causal_attention(ag_ctx *ctx, ag_tensor *qkv, int n_head) {
    AG_OP_BEGIN(ctx, qkv);
    const char *op = "causal_attention";
    CM_ASSERT(qkv->ndim == 3 && qkv->shape[2] % 3 == 0,
              "%s: qkv must be [B,T,3D], got %d dims with last size %d", op, qkv->ndim,
              ag_last_dim(qkv));
    attention_shape s = {.batch = qkv->shape[0],
                         .t_len = qkv->shape[1],
                         .model_dim = qkv->shape[2] / 3,
                         .n_head = n_head};
    CM_ASSERT(n_head > 0 && s.model_dim % n_head == 0, "%s: model dim %d not divisible by %d heads",
              op, s.model_dim, n_head);
    s.head_dim = s.model_dim / n_head;
    s.scale = 1.0f / sqrtf((float)s.head_dim);

    int out_shape[3] = {s.batch, s.t_len, s.model_dim};
    ag_tensor *out = ag_empty(ctx, op, 3, out_shape);
    if (!out) return NULL;
    ag_node *node = ag_record(ctx, op, attention_backward, out, 1, &qkv, sizeof(attention_saved));
    if (ag_failed(ctx)) return NULL;
    if (node) *(attention_saved *)node->saved = (attention_saved){s};
    /* one [T,T] block per task serves its heads in turn; freed at the end */
    attention_job job = {.s = &s, .qkv = qkv->data, .out = out->data, .tasks = attention_tasks(&s)};
    size_t scratch = ag_scratch_mark(ctx);
    job.scratch = ag_alloc_floats(ctx, (int64_t)job.tasks * s.t_len * s.t_len, op);
    if (!job.scratch) return NULL;
    cm_pool_run(job.tasks, attention_forward_task, &job);
    ag_scratch_release(ctx, scratch);
    return out;
}
