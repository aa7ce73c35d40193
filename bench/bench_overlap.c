/* Overlapping the expert-parallel exchange with the experts (issue 16):
 *
 *   OPENBLAS_NUM_THREADS=1 mpirun --allow-run-as-root --oversubscribe -np P \
 *       build/bench_overlap [--reps N] [--warmup W] [--part probe|pipeline|both]
 *
 * (bench/overlap.sh runs it at 2 and 4 ranks with both single-copy
 * mechanisms of Open MPI's shared-memory BTL and summarises the runs.)
 *
 * One lm-moe MoE layer of shared/BENCH.md (4096 tokens per step split over
 * the P ranks, D 256, 8 experts of hidden 1024, top-2, balanced routing:
 * every rank sends S/E rows to every expert), forward only, written here
 * with plain MPI and cblas_sgemm (no tape), so what is timed is the
 * exchange and the experts' products and nothing else. P must divide 8.
 *
 * Part 1, the probe: does Open MPI move a posted MPI_Ialltoallv while the
 * rank computes? Per rank, every repetition (after a barrier each; the
 * order rotates from one repetition to the next):
 *   exchange      blocking MPI_Alltoallv of the dispatched rows      T_x
 *   compute       the experts' forward sgemms, rows already here     T_c
 *   overlap       MPI_Ialltoallv, the same sgemms, MPI_Wait          T_o
 *   overlap+test  the same, MPI_Test after every sgemm
 * overlap achieved = (T_x + T_c - T_o) / min(T_x, T_c); the time left in
 * MPI_Wait and spent inside the MPI_Test calls says where the transfer ran.
 *
 * Part 2, the pipeline: the layer's forward (dispatch, each local expert's
 * rows gathered, its FFN with GELU, results back in place, combine) with the
 * exchange split into C chunks. Chunk c takes, from every (rank, local
 * expert) block, the rows of the experts of group c (C <= local experts) or
 * piece c of one expert's rows (C > local experts). Pipelined: dispatch of
 * chunk c+1 and combine of chunk c-1 are in flight while chunk c's experts
 * compute. Every variant's output must equal the blocking layer's, float
 * for float; the program exits 1 otherwise. (OpenBLAS 0.3.21's Haswell
 * kernel, OPENBLAS_CORETYPE=Haswell, gives a row of an sgemm different bits
 * depending on how many rows the call has, so the pieces of C > L fail the
 * check there; its SkylakeX kernel, the default here, gives the same bits
 * for the row counts used here, 512 and 1024.) "chunked blocking" splits the
 * same way without overlap (the cost of chunking alone), "experts alone"
 * skips the exchanges (what they cost the layer).
 *
 * Prints medians over the timed repetitions (defaults: 30 after 3 warm-up
 * rounds), per rank and for the slowest rank of each repetition (probe) and
 * the slowest rank's layer time (pipeline), then one line of JSON per rank
 * ("PROBE", rank -1 the slowest) and per layer variant ("LAYER"), with the
 * single-copy mechanism in use (read through MPI_T). Not a test: it times. */
#include <cblas.h>
#include <mpi.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "autograd/activations.h"
#include "bench_util.h"
#include "common/rng.h"

enum { TOKENS = 4096, D = 256, H = 1024, E = 8, K = 2 };
enum { MAX_REPS = 1000, MAX_RANKS = 8, MAX_CHUNKS = 4 };

/* One rank's share of the layer. Buffers [S,D] are rank-major, then local
 * expert: block (p, j) is rows [(p L + j) n, (p L + j + 1) n). */
typedef struct layer {
    MPI_Comm comm;
    int ranks, rank, local_experts; /* L */
    int slots;                      /* S, rows sent = rows received */
    int block_rows;                 /* n = S / E */
    float *x;                       /* [S,D] the dispatched rows, by destination */
    float *w1, *w2;                 /* [L,H,D], [L,D,H] */
    float *received;                /* [S,D] by source */
    float *rows, *hidden, *y;       /* one expert's [P n, D], [P n, H], [P n, D] */
    float *results;                 /* [S,D] the experts' outputs, by source */
    float *out;                     /* [S,D] back home, by destination */
    float *reference;               /* [S,D] the blocking layer's out */
} layer;

/* The outstanding requests a compute slice drives (MPI_Testall after every
 * product), and the time spent in those calls. */
typedef struct pending_requests {
    MPI_Request *requests;
    int count;
    double test_seconds;
} pending_requests;

static float *new_floats(size_t count) {
    float *data = aligned_alloc(64, (count * sizeof(float) + 63) / 64 * 64);
    if (!data) {
        fprintf(stderr, "bench_overlap: out of memory (%zu floats)\n", count);
        exit(EXIT_FAILURE);
    }
    return data;
}

static void layer_init(layer *l, MPI_Comm comm) {
    l->comm = comm;
    MPI_Comm_size(comm, &l->ranks);
    MPI_Comm_rank(comm, &l->rank);
    l->local_experts = E / l->ranks;
    l->slots = TOKENS / l->ranks * K;
    l->block_rows = l->slots / E;
    const size_t rows = (size_t)l->slots * D, expert = (size_t)l->ranks * l->block_rows;
    const size_t weights = (size_t)l->local_experts * H * D;
    l->x = new_floats(rows), l->received = new_floats(rows), l->results = new_floats(rows);
    l->out = new_floats(rows), l->reference = new_floats(rows);
    l->w1 = new_floats(weights), l->w2 = new_floats(weights);
    l->rows = new_floats(expert * D), l->hidden = new_floats(expert * H);
    l->y = new_floats(expert * D);
    cm_rng_key key = {1, 0, (uint32_t)l->rank, CM_RNG_TEST};
    cm_rng_fill_uniform(key, 0, (int64_t)rows, -1, 1, l->x);
    cm_rng_fill_uniform(key, 1ull << 32, (int64_t)weights, -0.06f, 0.06f, l->w1);
    cm_rng_fill_uniform(key, 2ull << 32, (int64_t)weights, -0.03f, 0.03f, l->w2);
    cm_rng_fill_uniform(key, 3ull << 32, (int64_t)(expert * D), -1, 1, l->rows);
}

static void layer_free(layer *l) {
    float *buffers[] = {l->x,      l->w1, l->w2,      l->received, l->rows,
                        l->hidden, l->y,  l->results, l->out,      l->reference};
    for (size_t i = 0; i < sizeof buffers / sizeof buffers[0]; i++) free(buffers[i]);
}

/* Drives the outstanding requests once (NULL: no progress calls). */
static void drive(pending_requests *pending) {
    if (!pending || pending->count == 0) return;
    double start = bench_now();
    int done;
    MPI_Testall(pending->count, pending->requests, &done, MPI_STATUSES_IGNORE);
    pending->test_seconds += bench_now() - start;
}

/* y [m,D] = act(rows [m,D] w1_j^T) w2_j^T, act GELU or (gelu false) none:
 * the expert's two products, driving `pending` after each. */
static void expert_ffn(const layer *l, int j, int m, bool gelu, pending_requests *pending) {
    const float *w1 = l->w1 + (size_t)j * H * D, *w2 = l->w2 + (size_t)j * D * H;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, H, D, 1.0f, l->rows, D, w1, D, 0.0f,
                l->hidden, H);
    drive(pending);
    if (gelu)
        for (size_t i = 0; i < (size_t)m * H; i++) l->hidden[i] = ag_gelu_value(l->hidden[i]);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, D, H, 1.0f, l->hidden, H, w2, H, 0.0f,
                l->y, D);
    drive(pending);
}

/* ---- part 1: the probe -------------------------------------------------- */

typedef enum probe_variant {
    PROBE_EXCHANGE,
    PROBE_COMPUTE,
    PROBE_OVERLAP,
    PROBE_TESTED
} probe_variant;
enum { PROBE_VARIANTS = 4 };

/* What one run of a probe variant measured, in seconds: all of it, and
 * the parts spent in the MPI_Ialltoallv call, in the MPI_Wait after the
 * products and in the MPI_Test calls between them. */
enum { PROBE_TOTAL, PROBE_POST, PROBE_WAIT, PROBE_TESTS, PROBE_FIELDS };

/* The dispatch's counts and displacements in floats: S/P rows per rank. */
static void even_layout(const layer *l, int *counts, int *displacements) {
    for (int p = 0; p < l->ranks; p++) {
        counts[p] = l->slots / l->ranks * D;
        displacements[p] = p * counts[p];
    }
}

/* The experts' products on rows already here (the input of the exchange is
 * not read: it may be in flight). */
static void probe_compute(const layer *l, pending_requests *pending) {
    for (int j = 0; j < l->local_experts; j++)
        expert_ffn(l, j, l->ranks * l->block_rows, false, pending);
}

static void probe_once(layer *l, probe_variant variant, double seconds[PROBE_FIELDS]) {
    int counts[MAX_RANKS], displacements[MAX_RANKS];
    even_layout(l, counts, displacements);
    MPI_Request request = MPI_REQUEST_NULL;
    pending_requests tested = {&request, 1, 0.0};
    const bool overlapped = variant == PROBE_OVERLAP || variant == PROBE_TESTED;
    MPI_Barrier(l->comm);
    double start = bench_now();
    if (variant == PROBE_EXCHANGE)
        MPI_Alltoallv(l->x, counts, displacements, MPI_FLOAT, l->received, counts, displacements,
                      MPI_FLOAT, l->comm);
    if (overlapped)
        MPI_Ialltoallv(l->x, counts, displacements, MPI_FLOAT, l->received, counts, displacements,
                       MPI_FLOAT, l->comm, &request);
    double posted = bench_now();
    if (variant != PROBE_EXCHANGE) probe_compute(l, variant == PROBE_TESTED ? &tested : NULL);
    double waiting = bench_now();
    MPI_Wait(&request, MPI_STATUS_IGNORE);
    double end = bench_now();
    seconds[PROBE_TOTAL] = end - start;
    seconds[PROBE_POST] = overlapped ? posted - start : 0.0;
    seconds[PROBE_WAIT] = overlapped ? end - waiting : 0.0;
    seconds[PROBE_TESTS] = tested.test_seconds;
}

/* One rank's medians over the repetitions, in ms: [variant][field], and
 * the exchange time the compute did not hide, T_o - T_c of the same
 * repetition, for the overlap without and with MPI_Test. */
typedef struct probe_medians {
    double ms[PROBE_VARIANTS][PROBE_FIELDS];
    double exposed[2];
} probe_medians;

static probe_medians probe_summary(double (*samples)[PROBE_FIELDS][MAX_REPS], int reps) {
    static double exposed[2][MAX_REPS];
    probe_medians m;
    for (int rep = 0; rep < reps; rep++)
        for (int k = 0; k < 2; k++)
            exposed[k][rep] = samples[PROBE_OVERLAP + k][PROBE_TOTAL][rep] -
                              samples[PROBE_COMPUTE][PROBE_TOTAL][rep];
    for (int k = 0; k < 2; k++) m.exposed[k] = 1e3 * bench_median(exposed[k], reps);
    for (int v = 0; v < PROBE_VARIANTS; v++)
        for (int f = 0; f < PROBE_FIELDS; f++) m.ms[v][f] = 1e3 * bench_median(samples[v][f], reps);
    return m;
}

/* Fills samples [variant][field][rep] of this rank. */
static void probe_run(layer *l, int warmup, int reps, double (*samples)[PROBE_FIELDS][MAX_REPS]) {
    double seconds[PROBE_FIELDS];
    for (int rep = -warmup; rep < reps; rep++)
        for (int i = 0; i < PROBE_VARIANTS; i++) {
            int variant = (i + rep + warmup) % PROBE_VARIANTS;
            probe_once(l, (probe_variant)variant, seconds);
            if (rep < 0) continue;
            for (int f = 0; f < PROBE_FIELDS; f++) samples[variant][f][rep] = seconds[f];
        }
}

/* (T_x + T_c - T_o) / min(T_x, T_c) from the medians. */
static double overlap_achieved(const probe_medians *m, probe_variant overlapped) {
    double x = m->ms[PROBE_EXCHANGE][PROBE_TOTAL], c = m->ms[PROBE_COMPUTE][PROBE_TOTAL];
    return (x + c - m->ms[overlapped][PROBE_TOTAL]) / (x < c ? x : c);
}

/* One line of JSON per rank, for scripts that pool several runs. */
static void probe_json(const layer *l, const probe_medians *m, int rank, const char *single_copy) {
    const double(*ms)[PROBE_FIELDS] = m->ms;
    printf("PROBE {\"ranks\": %d, \"rank\": %d, \"single_copy\": \"%s\", \"t_x\": %.3f, "
           "\"t_c\": %.3f, \"t_o\": %.3f, \"post_o\": %.3f, \"wait_o\": %.3f, "
           "\"exposed_o\": %.3f, \"t_ot\": %.3f, \"post_ot\": %.3f, \"wait_ot\": %.3f, "
           "\"in_tests_ot\": %.3f, \"exposed_ot\": %.3f}\n",
           l->ranks, rank, single_copy, ms[PROBE_EXCHANGE][PROBE_TOTAL],
           ms[PROBE_COMPUTE][PROBE_TOTAL], ms[PROBE_OVERLAP][PROBE_TOTAL],
           ms[PROBE_OVERLAP][PROBE_POST], ms[PROBE_OVERLAP][PROBE_WAIT], m->exposed[0],
           ms[PROBE_TESTED][PROBE_TOTAL], ms[PROBE_TESTED][PROBE_POST],
           ms[PROBE_TESTED][PROBE_WAIT], ms[PROBE_TESTED][PROBE_TESTS], m->exposed[1]);
}

/* rank -1: the slowest rank's. */
static void probe_line(int rank, const probe_medians *m) {
    const double(*ms)[PROBE_FIELDS] = m->ms;
    char label[16] = "max";
    if (rank >= 0) snprintf(label, sizeof label, "%d", rank);
    printf("%4s %6.2f %7.2f | %7.2f %5.2f %5.2f %6.2f %5.0f%% | %7.2f %5.2f %5.2f %5.2f %6.2f "
           "%5.0f%%\n",
           label, ms[PROBE_EXCHANGE][PROBE_TOTAL], ms[PROBE_COMPUTE][PROBE_TOTAL],
           ms[PROBE_OVERLAP][PROBE_TOTAL], ms[PROBE_OVERLAP][PROBE_POST],
           ms[PROBE_OVERLAP][PROBE_WAIT], m->exposed[0], 100 * overlap_achieved(m, PROBE_OVERLAP),
           ms[PROBE_TESTED][PROBE_TOTAL], ms[PROBE_TESTED][PROBE_POST],
           ms[PROBE_TESTED][PROBE_WAIT], ms[PROBE_TESTED][PROBE_TESTS], m->exposed[1],
           100 * overlap_achieved(m, PROBE_TESTED));
}

/* Rank 0 prints every rank's medians, then those of the slowest rank of
 * each repetition (every figure the maximum over the ranks). */
static void probe_report(const layer *l, double (*samples)[PROBE_FIELDS][MAX_REPS], int reps,
                         const char *single_copy) {
    static double slowest[PROBE_VARIANTS][PROBE_FIELDS][MAX_REPS];
    probe_medians all[MAX_RANKS], mine = probe_summary(samples, reps);
    MPI_Gather(&mine, sizeof mine, MPI_BYTE, all, sizeof mine, MPI_BYTE, 0, l->comm);
    MPI_Reduce(samples, slowest, PROBE_VARIANTS * PROBE_FIELDS * MAX_REPS, MPI_DOUBLE, MPI_MAX, 0,
               l->comm);
    if (l->rank != 0) return;
    printf("probe: %d ranks, %d rows of %d floats sent per rank (%d to the others), "
           "%d local experts x %d rows, single copy %s; medians in ms\n",
           l->ranks, l->slots, D, l->slots - l->slots / l->ranks, l->local_experts,
           l->ranks * l->block_rows, single_copy);
    printf("                | Ialltoallv, sgemms, Wait                | the same, MPI_Test "
           "after each sgemm\n");
    printf("rank    T_x     T_c |     T_o  post  wait  T_o-T_c overlap |     T_o  post  wait "
           "tests T_o-T_c overlap\n");
    for (int p = 0; p < l->ranks; p++) probe_line(p, &all[p]);
    probe_medians max = probe_summary(slowest, reps);
    probe_line(-1, &max);
    for (int p = 0; p < l->ranks; p++) probe_json(l, &all[p], p, single_copy);
    probe_json(l, &max, -1, single_copy);
}

/* ---- part 2: the pipeline ----------------------------------------------- */

/* NO_EXCHANGE: the layer without its exchanges (the rows stay where they
 * are), to measure what the exchanges cost; its output is not checked. */
typedef enum layer_mode { BLOCKING, PIPELINED, PIPELINED_TESTED, NO_EXCHANGE } layer_mode;

typedef struct layer_variant {
    const char *name;
    int chunks;
    layer_mode mode;
} layer_variant;

/* The first is the reference the others are compared with. */
static const layer_variant layer_variants[] = {
    {"blocking", 1, BLOCKING},
    {"pipelined+test", 1, PIPELINED_TESTED},
    {"pipelined+test", 2, PIPELINED_TESTED},
    {"pipelined+test", 4, PIPELINED_TESTED},
    {"pipelined", 2, PIPELINED},
    {"pipelined", 4, PIPELINED},
    {"chunked blocking", 2, BLOCKING},
    {"chunked blocking", 4, BLOCKING},
    {"experts alone", 1, NO_EXCHANGE},
};
enum { LAYER_VARIANTS = sizeof layer_variants / sizeof layer_variants[0] };

/* Rows [lo, hi) of block (p, j), of n rows, that chunk c of C takes: all
 * of them when expert j is in group c (C divides L), else piece c % (C/L)
 * of expert c / (C/L) (L divides C). The same for every p. */
static void chunk_rows(int L, int n, int j, int c, int C, int *lo, int *hi) {
    *lo = *hi = 0;
    if (C <= L) {
        if (j / (L / C) == c) *hi = n;
        return;
    }
    const int pieces = C / L;
    if (c / pieces != j) return;
    *lo = c % pieces * n / pieces;
    *hi = (c % pieces + 1) * n / pieces;
}

/* Chunk c's rows of an [S,D] buffer, per rank, in floats: contiguous in
 * each rank's blocks (whole consecutive blocks, or a piece of one). */
static void chunk_layout(const layer *l, int c, int C, int *counts, int *displacements) {
    const int L = l->local_experts, n = l->block_rows;
    for (int p = 0; p < l->ranks; p++) {
        int first = -1, rows = 0;
        for (int j = 0; j < L; j++) {
            int lo, hi;
            chunk_rows(L, n, j, c, C, &lo, &hi);
            if (hi > lo && first < 0) first = (p * L + j) * n + lo;
            rows += hi - lo;
        }
        counts[p] = rows * D;
        displacements[p] = (first < 0 ? 0 : first) * D;
    }
}

/* Exchanges chunk c of `from` into `to`, both [S,D] laid out alike:
 * blocking, or posted into *request. */
static void exchange_chunk(const layer *l, const float *from, float *to, int c, int C,
                           layer_mode mode, MPI_Request *request) {
    int counts[MAX_RANKS], displacements[MAX_RANKS];
    if (mode == NO_EXCHANGE) return;
    chunk_layout(l, c, C, counts, displacements);
    if (mode == BLOCKING)
        MPI_Alltoallv(from, counts, displacements, MPI_FLOAT, to, counts, displacements, MPI_FLOAT,
                      l->comm);
    else
        MPI_Ialltoallv(from, counts, displacements, MPI_FLOAT, to, counts, displacements, MPI_FLOAT,
                       l->comm, request);
}

/* The experts' FFN on chunk c's received rows, results in place: expert
 * j's rows from every source are gathered, computed, put back. */
static void experts_of_chunk(layer *l, int c, int C, pending_requests *pending) {
    const int L = l->local_experts, n = l->block_rows;
    for (int j = 0; j < L; j++) {
        int lo, hi;
        chunk_rows(L, n, j, c, C, &lo, &hi);
        const size_t m = (size_t)(hi - lo), block = m * D * sizeof(float);
        if (m == 0) continue;
        for (int q = 0; q < l->ranks; q++)
            memcpy(l->rows + q * m * D, l->received + ((size_t)(q * L + j) * n + lo) * D, block);
        expert_ffn(l, j, (int)m * l->ranks, true, pending);
        for (int q = 0; q < l->ranks; q++)
            memcpy(l->results + ((size_t)(q * L + j) * n + lo) * D, l->y + q * m * D, block);
    }
}

/* The layer's forward, x -> out. requests [2C]: dispatch c at c, combine c
 * at C + c. Pipelined, dispatch c+1 is posted before chunk c computes. */
static void layer_forward(layer *l, const layer_variant *variant) {
    const int C = variant->chunks;
    const layer_mode mode = variant->mode;
    MPI_Request requests[2 * MAX_CHUNKS];
    for (int i = 0; i < 2 * C; i++) requests[i] = MPI_REQUEST_NULL;
    pending_requests tested = {requests, 2 * C, 0.0};
    const bool pipelined = mode == PIPELINED || mode == PIPELINED_TESTED;
    if (pipelined) exchange_chunk(l, l->x, l->received, 0, C, mode, &requests[0]);
    for (int c = 0; c < C; c++) {
        if (!pipelined)
            exchange_chunk(l, l->x, l->received, c, C, mode, NULL);
        else if (c + 1 < C)
            exchange_chunk(l, l->x, l->received, c + 1, C, mode, &requests[c + 1]);
        MPI_Wait(&requests[c], MPI_STATUS_IGNORE);
        experts_of_chunk(l, c, C, mode == PIPELINED_TESTED ? &tested : NULL);
        exchange_chunk(l, l->results, l->out, c, C, mode, &requests[C + c]);
    }
    MPI_Waitall(C, requests + C, MPI_STATUSES_IGNORE);
}

/* Zeroes what a layer forward writes, so that a row it fails to move or
 * compute cannot pass the check with the previous run's value. */
static void clear_outputs(layer *l) {
    const size_t bytes = (size_t)l->slots * D * sizeof(float);
    memset(l->received, 0, bytes);
    memset(l->results, 0, bytes);
    memset(l->out, 0, bytes);
}

/* One run of `variant` after a barrier: its seconds. *differs: its output
 * is not the blocking layer's (NO_EXCHANGE is not checked; it computes on
 * the rows the previous run received). */
static double time_variant(layer *l, const layer_variant *variant, bool *differs) {
    const size_t bytes = (size_t)l->slots * D * sizeof(float);
    const bool checked = variant->mode != NO_EXCHANGE;
    if (checked) clear_outputs(l);
    MPI_Barrier(l->comm);
    double start = bench_now();
    layer_forward(l, variant);
    double elapsed = bench_now() - start;
    *differs = checked && memcmp(l->out, l->reference, bytes) != 0;
    if (*differs)
        fprintf(stderr, "bench_overlap: rank %d: %s, %d chunks: output differs\n", l->rank,
                variant->name, variant->chunks);
    return elapsed;
}

/* Times every variant `reps` times after `warmup` rounds, into seconds
 * [variant][rep] of this rank; returns how many outputs differed from the
 * blocking layer's. */
static int pipeline_run(layer *l, int warmup, int reps, double (*seconds)[MAX_REPS]) {
    layer_forward(l, &layer_variants[0]);
    memcpy(l->reference, l->out, (size_t)l->slots * D * sizeof(float));
    int mismatches = 0;
    for (int rep = -warmup; rep < reps; rep++)
        for (int i = 0; i < LAYER_VARIANTS; i++) {
            const int v = (i + rep + warmup) % LAYER_VARIANTS;
            bool differs;
            double elapsed = time_variant(l, &layer_variants[v], &differs);
            mismatches += differs;
            if (rep >= 0) seconds[v][rep] = elapsed;
        }
    return mismatches;
}

/* Rank 0: per variant the slowest rank's layer time (median, min-max over
 * the repetitions) and the median of its per-repetition difference from
 * the blocking layer. slowest [variant][rep] in seconds. */
static void pipeline_report(const layer *l, double (*slowest)[MAX_REPS], int reps,
                            const char *single_copy) {
    static double sorted[MAX_REPS], difference[MAX_REPS];
    memcpy(sorted, slowest[0], (size_t)reps * sizeof(double));
    const double blocking = bench_median(sorted, reps);
    printf("pipeline: %d ranks, layer forward (dispatch, experts, combine), slowest rank, "
           "ms over %d repetitions\n",
           l->ranks, reps);
    printf("%-17s %6s %8s %17s %10s %8s\n", "variant", "chunks", "median", "min-max", "vs blocking",
           "");
    for (int v = 0; v < LAYER_VARIANTS; v++) {
        for (int rep = 0; rep < reps; rep++) difference[rep] = slowest[v][rep] - slowest[0][rep];
        memcpy(sorted, slowest[v], (size_t)reps * sizeof(double));
        double median = bench_median(sorted, reps), change = bench_median(difference, reps);
        printf("%-17s %6d %8.2f %8.2f-%-8.2f %+10.2f %+7.1f%%\n", layer_variants[v].name,
               layer_variants[v].chunks, 1e3 * median, 1e3 * sorted[0], 1e3 * sorted[reps - 1],
               1e3 * change, 100 * change / blocking);
        printf("LAYER {\"ranks\": %d, \"single_copy\": \"%s\", \"variant\": \"%s\", "
               "\"chunks\": %d, \"median_ms\": %.3f, \"change_ms\": %.3f, "
               "\"change_pct\": %.2f}\n",
               l->ranks, single_copy, layer_variants[v].name, layer_variants[v].chunks,
               1e3 * median, 1e3 * change, 100 * change / blocking);
    }
}

/* ---- the environment ----------------------------------------------------- */

/* The name of enum value `value` of control variable `index`. */
static void enum_name(int index, int value, char *name, int size) {
    char cvar[128], item[64];
    int cvar_length = sizeof cvar, description_length = 0, verbosity, binding, scope, items;
    MPI_Datatype type;
    MPI_T_enum enumtype;
    snprintf(name, (size_t)size, "%d", value);
    if (MPI_T_cvar_get_info(index, cvar, &cvar_length, &verbosity, &type, &enumtype, NULL,
                            &description_length, &binding, &scope) != MPI_SUCCESS ||
        enumtype == MPI_T_ENUM_NULL)
        return;
    int enum_length = sizeof item;
    if (MPI_T_enum_get_info(enumtype, &items, item, &enum_length) != MPI_SUCCESS) return;
    for (int i = 0; i < items; i++) {
        int item_value, item_length = sizeof item;
        if (MPI_T_enum_get_item(enumtype, i, &item_value, item, &item_length) == MPI_SUCCESS &&
            item_value == value)
            snprintf(name, (size_t)size, "%s", item);
    }
}

/* The single-copy mechanism Open MPI's shared-memory BTL uses in this
 * process (vader sets it to none when CMA does not work), read through the
 * MPI tool interface; "unknown" without it. */
static void single_copy_mechanism(char *name, int size) {
    int provided, index, count, value;
    MPI_T_cvar_handle handle;
    snprintf(name, (size_t)size, "unknown");
    if (MPI_T_init_thread(MPI_THREAD_SINGLE, &provided) != MPI_SUCCESS) return;
    if (MPI_T_cvar_get_index("btl_vader_single_copy_mechanism", &index) == MPI_SUCCESS &&
        MPI_T_cvar_handle_alloc(index, NULL, &handle, &count) == MPI_SUCCESS) {
        if (count == 1 && MPI_T_cvar_read(handle, &value) == MPI_SUCCESS)
            enum_name(index, value, name, size);
        MPI_T_cvar_handle_free(&handle);
    }
    MPI_T_finalize();
}

static void print_load(const char *when) {
    char load[128] = "unknown";
    FILE *file = fopen("/proc/loadavg", "r");
    if (file) {
        if (!fgets(load, sizeof load, file)) snprintf(load, sizeof load, "unknown\n");
        fclose(file);
    }
    printf("load %s: %s", when, load);
}

typedef struct options {
    int reps, warmup;
    bool probe, pipeline;
} options;

static void usage_exit(const char *message) {
    fprintf(stderr,
            "bench_overlap: %s\nusage: bench_overlap [--reps N] [--warmup W] "
            "[--part probe|pipeline|both]\n",
            message);
    exit(EXIT_FAILURE);
}

static options parse_options(int argc, char **argv) {
    options o = {30, 3, true, true};
    for (int i = 1; i < argc; i++) {
        const char *value = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(argv[i], "--reps") == 0)
            o.reps = bench_parse_positive("bench_overlap", "--reps", value), i++;
        else if (strcmp(argv[i], "--warmup") == 0)
            o.warmup = bench_parse_positive("bench_overlap", "--warmup", value), i++;
        else if (strcmp(argv[i], "--part") == 0 && value) {
            o.probe = strcmp(value, "pipeline") != 0;
            o.pipeline = strcmp(value, "probe") != 0;
            if (strcmp(value, "both") != 0 && o.probe == o.pipeline) usage_exit("unknown --part");
            i++;
        } else
            usage_exit("unknown option");
    }
    if (o.reps > MAX_REPS) usage_exit("too many repetitions (--reps at most 1000)");
    return o;
}

/* Part 2 on every rank; returns how many outputs differed (all ranks). */
static int pipeline_part(layer *l, const options *o, const char *single_copy) {
    static double seconds[LAYER_VARIANTS][MAX_REPS], slowest[LAYER_VARIANTS][MAX_REPS];
    int mismatches = pipeline_run(l, o->warmup, o->reps, seconds), all_mismatches;
    MPI_Allreduce(&mismatches, &all_mismatches, 1, MPI_INT, MPI_SUM, l->comm);
    MPI_Reduce(seconds, slowest, LAYER_VARIANTS * MAX_REPS, MPI_DOUBLE, MPI_MAX, 0, l->comm);
    if (l->rank == 0) pipeline_report(l, slowest, o->reps, single_copy);
    if (l->rank == 0 && all_mismatches)
        printf("FAILED: %d outputs differ from the blocking layer's\n", all_mismatches);
    return all_mismatches;
}

int main(int argc, char **argv) {
    options o = parse_options(argc, argv);
    int ranks, rank;
    MPI_Init(&argc, &argv);
    MPI_Comm_size(MPI_COMM_WORLD, &ranks);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    if (E % ranks != 0 || ranks > MAX_RANKS) {
        if (rank == 0) fprintf(stderr, "bench_overlap: needs a rank count dividing %d\n", E);
        MPI_Finalize();
        return EXIT_FAILURE;
    }
    layer l;
    layer_init(&l, MPI_COMM_WORLD);
    char single_copy[64];
    single_copy_mechanism(single_copy, sizeof single_copy);
    if (rank == 0) print_load("before");
    if (o.probe) {
        static double samples[PROBE_VARIANTS][PROBE_FIELDS][MAX_REPS];
        probe_run(&l, o.warmup, o.reps, samples);
        probe_report(&l, samples, o.reps, single_copy);
    }
    int mismatches = o.pipeline ? pipeline_part(&l, &o, single_copy) : 0;
    if (rank == 0) print_load("after");
    layer_free(&l);
    MPI_Finalize();
    return mismatches ? EXIT_FAILURE : EXIT_SUCCESS;
}
