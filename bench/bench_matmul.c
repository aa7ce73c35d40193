/* Micro-benchmark: the matmul-family ops (ag_matmul, ag_linear,
 * ag_causal_attention) against the raw cblas_sgemm calls they are built on,
 * same shapes, same run, interleaved (A B B A ...) so machine noise hits
 * both alike. Prints median [min-max] milliseconds, GFLOP/s at the median, and
 * the op's overhead over raw sgemm as the median of the per-pair time ratios
 * (op_i / raw_i - 1). The op's result is first checked against the raw one.
 *
 *   bench_matmul [--threads N] [--reps R] [--warmup W]
 *
 * Shapes (BENCH.md): matmul 1024^3; the "small expert shape (512, 256, 1024)"
 * read as (M, N, K): x [512,1024] times [1024,256] -> [512,256], i.e. the
 * expert's second projection over 512 tokens (the first, 256 -> 1024, is the
 * same FLOPs with N and K swapped and is timed too); the lm-dense linears over
 * 4096 tokens (x [16,256,IN]): fc1 256 -> 1024, fc2 1024 -> 256, qkv 256 -> 768,
 * with bias (fc1 also without); and lm-dense attention (B 16, T 256, D 256,
 * 4 heads). Linear's raw backward is the two sgemms; the op's also sums dy's
 * columns into the bias gradient, which counts as overhead.
 *
 * Forward: the op runs with a context whose arena is reset every iteration,
 * grad off; raw is one sgemm (beta 0) into a preallocated buffer. Backward:
 * the op's tape node is built untimed, then its backward function is timed
 * alone; raw is the sgemms that backward needs (beta 1), after the same
 * untimed forward. Attention's raw side is every per-head sgemm of the op,
 * so its overhead is the masked softmax and its backward. */
#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench_util.h"

#include "autograd/ops.h"
#include "common/pool.h"

void openblas_set_num_threads(int);
static int bench_threads = 1;

enum { ARENA_BYTES = 96 << 20 };

static float *new_floats(int64_t count, uint64_t seed) {
    size_t bytes = ((size_t)count * sizeof(float) + 63) / 64 * 64;
    float *data = aligned_alloc(64, bytes ? bytes : 64);
    if (!data) {
        fprintf(stderr, "bench_matmul: out of memory (%zu bytes)\n", bytes);
        exit(EXIT_FAILURE);
    }
    cm_rng_fill_uniform((cm_rng_key){seed, 0, 0, CM_RNG_TEST}, 0, count, -1.0f, 1.0f, data);
    return data;
}

/* ---- one benchmark case -------------------------------------------------------- */

typedef enum { CASE_MATMUL, CASE_LINEAR, CASE_ATTENTION } case_kind;

typedef struct bench_case {
    const char *name;
    case_kind kind;
    /* matmul/linear: out [m,n] = x [m,k] times [k,n] (linear: w [n,k]).
     * attention: m = batch, n = t_len, k = model dim. */
    int m, n, k;
    int n_head;
    bool bias; /* linear only */
} bench_case;

/* Everything one case touches, allocated once. */
typedef struct bench_state {
    const bench_case *c;
    ag_ctx ctx;
    float *x, *w, *bias, *y_raw, *dy, *dx, *dw, *scratch;
    ag_tensor x_tensor, w_tensor, bias_tensor;
    ag_node *node; /* backward: the op's node, built by the setup */
} bench_state;

typedef void (*bench_fn)(bench_state *state);

/* Per-head pointers for the raw attention sgemms; see ops_attention.c. */
static void raw_attention(bench_state *s, bool backward) {
    const bench_case *c = s->c;
    int t_len = c->n, d = c->k, head_dim = d / c->n_head, ld = 3 * d;
    float scale = 1.0f / sqrtf((float)head_dim);
    for (int b = 0; b < c->m; b++)
        for (int h = 0; h < c->n_head; h++) {
            const float *q = s->x + (int64_t)b * t_len * ld + h * head_dim;
            const float *k = q + d, *v = q + 2 * d;
            float *o = s->y_raw + (int64_t)b * t_len * d + h * head_dim;
            float *p = s->scratch + ((int64_t)b * c->n_head + h) * t_len * t_len;
            if (!backward) {
                ag_sgemm(false, true, t_len, t_len, head_dim, scale, q, ld, k, ld, 0.0f, p, t_len);
                ag_sgemm(false, false, t_len, head_dim, t_len, 1.0f, p, t_len, v, ld, 0.0f, o, d);
                continue;
            }
            float *dq = s->dx + (int64_t)b * t_len * ld + h * head_dim;
            const float *dout = s->dy + (int64_t)b * t_len * d + h * head_dim;
            float *dp = s->dw; /* [T,T] */
            ag_sgemm(false, true, t_len, t_len, head_dim, 1.0f, dout, d, v, ld, 0.0f, dp, t_len);
            ag_sgemm(true, false, t_len, head_dim, t_len, 1.0f, p, t_len, dout, d, 1.0f, dq + 2 * d,
                     ld);
            ag_sgemm(false, false, t_len, head_dim, t_len, scale, dp, t_len, k, ld, 1.0f, dq, ld);
            ag_sgemm(true, false, t_len, head_dim, t_len, scale, dp, t_len, q, ld, 1.0f, dq + d,
                     ld);
        }
}

static void raw_forward(bench_state *s) {
    const bench_case *c = s->c;
    if (c->kind == CASE_ATTENTION)
        raw_attention(s, false);
    else
        cblas_sgemm(CblasRowMajor, CblasNoTrans, c->kind == CASE_LINEAR ? CblasTrans : CblasNoTrans,
                    c->m, c->n, c->k, 1.0f, s->x, c->k, s->w, c->kind == CASE_LINEAR ? c->k : c->n,
                    0.0f, s->y_raw, c->n);
}

/* dx [m,k] += dy [m,n] op(w)^T;  dw += (x^T dy) or, for linear, dy^T x. */
static void raw_backward(bench_state *s) {
    const bench_case *c = s->c;
    if (c->kind == CASE_ATTENTION) {
        raw_attention(s, true);
        return;
    }
    bool linear = c->kind == CASE_LINEAR;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, linear ? CblasNoTrans : CblasTrans, c->m, c->k, c->n,
                1.0f, s->dy, c->n, s->w, linear ? c->k : c->n, 1.0f, s->dx, c->k);
    if (linear)
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, c->n, c->k, c->m, 1.0f, s->dy, c->n,
                    s->x, c->k, 1.0f, s->dw, c->k);
    else
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, c->k, c->n, c->m, 1.0f, s->x, c->k,
                    s->dy, c->n, 1.0f, s->dw, c->n);
}

static ag_tensor *run_op(bench_state *s) {
    const bench_case *c = s->c;
    if (c->kind == CASE_MATMUL) return ag_matmul(&s->ctx, &s->x_tensor, &s->w_tensor, false, false);
    if (c->kind == CASE_LINEAR)
        return ag_linear(&s->ctx, &s->x_tensor, &s->w_tensor, c->bias ? &s->bias_tensor : NULL);
    return ag_causal_attention(&s->ctx, &s->x_tensor, c->n_head);
}

static void op_forward(bench_state *s) {
    ag_ctx_reset(&s->ctx);
    if (!run_op(s)) {
        fprintf(stderr, "bench_matmul: %s forward failed: %s\n", s->c->name, cm_error_message());
        exit(EXIT_FAILURE);
    }
}

/* Untimed: a recorded forward whose output gradient is dy. */
static void op_backward_setup(bench_state *s) {
    ag_ctx_reset(&s->ctx);
    ag_set_grad_enabled(&s->ctx, true);
    ag_tensor *y = run_op(s);
    ag_set_grad_enabled(&s->ctx, false);
    if (!y || !s->ctx.tape_tail) {
        fprintf(stderr, "bench_matmul: %s: no tape node: %s\n", s->c->name, cm_error_message());
        exit(EXIT_FAILURE);
    }
    y->grad = s->dy;
    s->node = s->ctx.tape_tail;
}

static void op_backward(bench_state *s) {
    s->node->backward(&s->ctx, s->node);
}

typedef struct timing {
    double median, min, max; /* seconds */
} timing;

static timing summarise(double *seconds, int reps) {
    double median = bench_median(seconds, reps); /* sorts */
    return (timing){median, seconds[0], seconds[reps - 1]};
}

/* Times raw and op alternately; setup (untimed, may be NULL) runs before each.
 * Returns the median over pairs of op time / raw time: neighbours in time see
 * the same machine load, so this ratio is steadier than a ratio of medians. */
static double time_pair(bench_state *s, bench_fn raw_setup, bench_fn raw, bench_fn op_setup,
                        bench_fn op, int warmup, int reps, timing *raw_timing, timing *op_timing) {
    double *raw_seconds = malloc((size_t)reps * sizeof(double));
    double *op_seconds = malloc((size_t)reps * sizeof(double));
    double *ratios = malloc((size_t)reps * sizeof(double));
    for (int i = -warmup; i < reps; i++) {
        double raw_time = 0.0, op_time = 0.0;
        /* A B B A ...: neither side always runs first (warm caches, turbo). */
        for (int turn = 0; turn < 2; turn++) {
            bool raw_turn = (turn == 0) == (i % 2 == 0);
            /* raw: OpenBLAS's own threads; op: OpenBLAS single-threaded under
             * cmoe's pool, as in training (common/pool.h) */
            openblas_set_num_threads(raw_turn ? bench_threads : 1);
            if (raw_turn && raw_setup) raw_setup(s);
            if (!raw_turn && op_setup) op_setup(s);
            double start = bench_now();
            (raw_turn ? raw : op)(s);
            double elapsed = bench_now() - start;
            *(raw_turn ? &raw_time : &op_time) = elapsed;
        }
        if (i >= 0) {
            raw_seconds[i] = raw_time;
            op_seconds[i] = op_time;
            ratios[i] = op_time / raw_time;
        }
    }
    double ratio = bench_median(ratios, reps);
    *raw_timing = summarise(raw_seconds, reps);
    *op_timing = summarise(op_seconds, reps);
    free(raw_seconds);
    free(op_seconds);
    free(ratios);
    return ratio;
}

static void print_row(const char *name, const char *pass, double flops, timing raw, timing op,
                      double ratio) {
    printf("%-34s %-4s %8.3f [%7.3f-%7.3f] %7.1f   %8.3f [%7.3f-%7.3f] %7.1f   %+6.1f%%\n", name,
           pass, 1e3 * raw.median, 1e3 * raw.min, 1e3 * raw.max, 1e-9 * flops / raw.median,
           1e3 * op.median, 1e3 * op.min, 1e3 * op.max, 1e-9 * flops / op.median,
           100.0 * (ratio - 1.0));
}

/* The op's forward output against the raw sgemm result (+ bias): they run
 * the same sgemm, so anything beyond rounding is a bug. */
static void check_forward(bench_state *s) {
    const bench_case *c = s->c;
    raw_forward(s);
    ag_ctx_reset(&s->ctx);
    ag_tensor *y = run_op(s);
    if (c->kind == CASE_ATTENTION) return; /* softmax makes raw differ; tests cover values */
    double worst = 0.0;
    for (int64_t r = 0; r < c->m; r++)
        for (int j = 0; j < c->n; j++) {
            double want = s->y_raw[r * c->n + j] + (c->bias ? s->bias[j] : 0.0f);
            worst = fmax(worst, fabs(y->data[r * c->n + j] - want) / (1.0 + fabs(want)));
        }
    if (!(worst < 1e-4)) {
        fprintf(stderr, "bench_matmul: %s: op differs from raw sgemm by %g\n", c->name, worst);
        exit(EXIT_FAILURE);
    }
}

static void run_case(const bench_case *c, int warmup, int reps) {
    bench_state s = {.c = c};
    if (ag_ctx_init(&s.ctx, ARENA_BYTES) != CM_OK) {
        fprintf(stderr, "bench_matmul: %s\n", cm_error_message());
        exit(EXIT_FAILURE);
    }
    ag_set_grad_enabled(&s.ctx, false);
    int64_t x_count, w_count, y_count, dw_count;
    double forward_flops, backward_flops;
    if (c->kind == CASE_ATTENTION) {
        int64_t t_len = c->n, heads = (int64_t)c->m * c->n_head;
        x_count = (int64_t)c->m * t_len * 3 * c->k;
        w_count = 1;
        y_count = (int64_t)c->m * t_len * c->k;
        dw_count = t_len * t_len;
        s.scratch = new_floats(heads * t_len * t_len, 5);
        forward_flops = 2.0 * heads * (2.0 * t_len * t_len * (c->k / c->n_head));
        backward_flops = 2.0 * forward_flops;
        s.x_tensor = ag_tensor_wrap(NULL, NULL, 3, (int[]){c->m, c->n, 3 * c->k}, true);
    } else {
        x_count = (int64_t)c->m * c->k;
        w_count = (int64_t)c->k * c->n;
        y_count = (int64_t)c->m * c->n;
        dw_count = w_count;
        forward_flops = 2.0 * c->m * c->n * c->k;
        backward_flops = 2.0 * forward_flops;
        /* linear: x as [B,256,IN] like the LM's activations when rows allow */
        if (c->kind == CASE_LINEAR && c->m % 256 == 0)
            s.x_tensor = ag_tensor_wrap(NULL, NULL, 3, (int[]){c->m / 256, 256, c->k}, true);
        else
            s.x_tensor = ag_tensor_wrap(NULL, NULL, 2, (int[]){c->m, c->k}, true);
        int w_shape[2] = {c->kind == CASE_LINEAR ? c->n : c->k,
                          c->kind == CASE_LINEAR ? c->k : c->n};
        s.w_tensor = ag_tensor_wrap(NULL, NULL, 2, w_shape, true);
        s.bias_tensor = ag_tensor_wrap(NULL, NULL, 1, (int[]){c->n}, true);
    }
    s.x = new_floats(x_count, 1);
    s.w = new_floats(w_count, 2);
    s.bias = new_floats(c->n, 3);
    s.y_raw = new_floats(y_count, 4);
    s.dy = new_floats(y_count, 6);
    s.dx = new_floats(x_count, 7);
    s.dw = new_floats(dw_count, 8);
    float *bias_grad = new_floats(c->n, 9);
    /* Scale dy down so 30 accumulations into dx and dw stay far from overflow. */
    for (int64_t i = 0; i < y_count; i++) s.dy[i] *= 1e-3f;
    s.x_tensor.data = s.x;
    s.x_tensor.grad = s.dx;
    s.w_tensor.data = s.w;
    s.w_tensor.grad = s.dw;
    s.bias_tensor.data = s.bias;
    s.bias_tensor.grad = bias_grad;

    check_forward(&s);
    timing raw, op;
    double ratio = time_pair(&s, NULL, raw_forward, NULL, op_forward, warmup, reps, &raw, &op);
    print_row(c->name, "fwd", forward_flops, raw, op, ratio);
    /* Before each raw backward, the same untimed forward the op's setup does. */
    ratio = time_pair(&s, raw_forward, raw_backward, op_backward_setup, op_backward, warmup, reps,
                      &raw, &op);
    print_row(c->name, "bwd", backward_flops, raw, op, ratio);
    fflush(stdout);

    free(s.x);
    free(s.w);
    free(s.bias);
    free(s.y_raw);
    free(s.dy);
    free(s.dx);
    free(s.dw);
    free(s.scratch);
    free(bias_grad);
    ag_ctx_free(&s.ctx);
}

int main(int argc, char **argv) {
    int threads = 2, reps = 25, warmup = 3;
    for (int i = 1; i < argc; i++) {
        const char *value = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(argv[i], "--threads"))
            threads = bench_parse_positive("bench_matmul", argv[i], value), i++;
        else if (!strcmp(argv[i], "--reps"))
            reps = bench_parse_positive("bench_matmul", argv[i], value), i++;
        else if (!strcmp(argv[i], "--warmup"))
            warmup = bench_parse_positive("bench_matmul", argv[i], value), i++;
        else {
            fprintf(stderr, "usage: %s [--threads N] [--reps R] [--warmup W]\n", argv[0]);
            return EXIT_FAILURE;
        }
    }
    bench_threads = threads;
    cm_pool_set_threads(threads);

    const bench_case cases[] = {
        {"matmul 1024x1024x1024", CASE_MATMUL, 1024, 1024, 1024, 0, false},
        {"matmul expert (M,N,K)=(512,256,1024)", CASE_MATMUL, 512, 256, 1024, 0, false},
        {"matmul expert (M,N,K)=(512,1024,256)", CASE_MATMUL, 512, 1024, 256, 0, false},
        {"linear fc1 4096x256 -> 1024 +b", CASE_LINEAR, 4096, 1024, 256, 0, true},
        {"linear fc1 4096x256 -> 1024 no b", CASE_LINEAR, 4096, 1024, 256, 0, false},
        {"linear fc2 4096x1024 -> 256 +b", CASE_LINEAR, 4096, 256, 1024, 0, true},
        {"linear qkv 4096x256 -> 768 +b", CASE_LINEAR, 4096, 768, 256, 0, true},
        {"attention B16 T256 D256 H4", CASE_ATTENTION, 16, 256, 256, 4, false},
    };
    printf("bench_matmul: %d thread(s), %d reps after %d warm-up, raw and op interleaved; "
           "overhead = median of per-pair op/raw - 1\n",
           threads, reps, warmup);
    printf("%-34s %-4s %8s [%15s] %7s   %8s [%15s] %7s   %7s\n", "case", "pass", "raw ms",
           "min-max", "GFLOP/s", "op ms", "min-max", "GFLOP/s", "overhead");
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) run_case(&cases[i], warmup, reps);
    return EXIT_SUCCESS;
}
