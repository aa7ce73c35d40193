/* Expert parallelism cost per MoE layer: the all-to-all token exchange
 * (dispatch and combine, forward and backward) next to the expert compute
 * (forward and backward of the layer's experts with the MoE layer's own ops:
 * ag_grouped_linear with bias, then ag_grouped_linear_act with GELU and
 * bias), for the lm-moe configuration of BENCH.md: --tokens tokens per step
 * (default 4096) split over the ranks, d_model 256, 8 experts of hidden
 * 1024, top-2, balanced routing, one compute thread per rank.
 *
 *   OPENBLAS_NUM_THREADS=1 mpirun -np P build/bench_moe_mpi [--reps N] [--tokens N]
 *
 * Prints medians over the repetitions (after 3 warm-up rounds), the
 * exchange's share of the layer, and last one line of JSON:
 *   MOE {"ranks": P, "rows_per_rank": R, "exchange_ms_median": X,
 *        "experts_ms_median": Y, "expert_gflops": G}
 * with G = R rows x 6 x 2 x d_model x hidden FLOPs / Y: the experts' rate
 * in place (one thread), an input of the scaling model (docs/scaling.md).
 * Every rank computes at the same time, so at more ranks than cores the
 * rate is the shared one. Not a test: it only times. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "autograd/ops.h"
#include "bench_util.h"
#include "common/pool.h"
#include "parallel/comm.h"
#include "parallel/dispatch.h"
#include "train/progress.h"

enum { D = 256, H = 1024, E = 8, K = 2, MAX_REPS = 200 };

/* One rank's share of the layer: its rows and its experts' weights. */
typedef struct layer_data {
    int ranks, local_experts, tokens, slots, received;
    int32_t *send_rows, *recv_rows, *offsets;
    float *x, *w1, *b1, *w2, *b2, *w1_grad, *b1_grad, *w2_grad, *b2_grad, *seed_grad;
} layer_data;

static float *floats(size_t n, bool zero) {
    return zero ? calloc(n, sizeof(float)) : malloc(n * sizeof(float));
}

/* Balanced routing: every rank sends slots / ranks rows to every rank, which
 * splits them evenly over its experts. false: out of memory. */
static bool make_layer(layer_data *l, int ranks, int rank, int tokens_per_step) {
    l->ranks = ranks;
    l->local_experts = E / ranks;
    l->tokens = tokens_per_step / ranks;
    l->slots = l->tokens * K;
    l->received = l->slots; /* as many as sent when balanced */
    l->send_rows = malloc(sizeof(int32_t) * (size_t)ranks);
    l->recv_rows = malloc(sizeof(int32_t) * (size_t)ranks);
    l->offsets = malloc(sizeof(int32_t) * (size_t)(l->local_experts + 1));
    const size_t rows = (size_t)l->slots * D, weights = (size_t)l->local_experts * H * D;
    l->x = floats(rows, false), l->seed_grad = floats(rows, false);
    l->w1 = floats(weights, false), l->w2 = floats(weights, false);
    l->b1 = floats((size_t)l->local_experts * H, true);
    l->b2 = floats((size_t)l->local_experts * D, true);
    l->w1_grad = floats(weights, true), l->w2_grad = floats(weights, true);
    l->b1_grad = floats((size_t)l->local_experts * H, true);
    l->b2_grad = floats((size_t)l->local_experts * D, true);
    if (!l->send_rows || !l->recv_rows || !l->offsets || !l->x || !l->seed_grad || !l->w1 ||
        !l->w2 || !l->b1 || !l->b2 || !l->w1_grad || !l->w2_grad || !l->b1_grad || !l->b2_grad)
        return false;
    for (int p = 0; p < ranks; p++) l->send_rows[p] = l->recv_rows[p] = l->slots / ranks;
    for (int j = 0; j <= l->local_experts; j++)
        l->offsets[j] = j * (l->received / l->local_experts);
    l->offsets[l->local_experts] = l->received;
    cm_rng_key key = {1, 0, (uint32_t)rank, CM_RNG_TEST};
    cm_rng_fill_uniform(key, 0, (int64_t)rows, -1, 1, l->x);
    cm_rng_fill_uniform(key, 1u << 30, (int64_t)weights, -0.05f, 0.05f, l->w1);
    cm_rng_fill_uniform(key, 2u << 30, (int64_t)weights, -0.05f, 0.05f, l->w2);
    cm_rng_fill_uniform(key, 3u << 30, (int64_t)rows, -1, 1, l->seed_grad);
    return true;
}

static void free_layer(layer_data *l) {
    void *all[] = {l->send_rows, l->recv_rows, l->offsets, l->x,  l->seed_grad,
                   l->w1,        l->w2,        l->b1,      l->b2, l->w1_grad,
                   l->w2_grad,   l->b1_grad,   l->b2_grad};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) free(all[i]);
}

/* The exchange: dispatch and combine, each forward + backward (s). */
static double time_exchange(ag_ctx *ctx, const layer_data *l, const cm_comm *comm) {
    ag_ctx_reset(ctx);
    ag_tensor x = ag_tensor_wrap(l->x, NULL, 2, (int[]){l->slots, D}, true);
    MPI_Barrier(comm->world);
    double start = cm_now();
    ag_tensor *there = ag_all_to_all(ctx, &x, l->send_rows, l->recv_rows, comm->ep, NULL);
    ag_tensor *back = ag_all_to_all(ctx, there, l->recv_rows, l->send_rows, comm->ep, NULL);
    if (ag_backward_from(ctx, back, l->seed_grad) != CM_OK) return -1.0;
    MPI_Barrier(comm->world);
    return cm_now() - start;
}

/* The experts on the received rows, forward + backward (s), as moe.c runs
 * them without dropout or recomputation. */
static double time_experts(ag_ctx *ctx, layer_data *l) {
    const int L = l->local_experts;
    ag_tensor w1 = ag_tensor_wrap(l->w1, l->w1_grad, 3, (int[]){L, H, D}, true);
    ag_tensor b1 = ag_tensor_wrap(l->b1, l->b1_grad, 2, (int[]){L, H}, true);
    ag_tensor w2 = ag_tensor_wrap(l->w2, l->w2_grad, 3, (int[]){L, D, H}, true);
    ag_tensor b2 = ag_tensor_wrap(l->b2, l->b2_grad, 2, (int[]){L, D}, true);
    ag_ctx_reset(ctx);
    ag_tensor rows = ag_tensor_wrap(l->x, NULL, 2, (int[]){l->received, D}, true);
    double start = cm_now();
    ag_tensor *h = ag_grouped_linear(ctx, &rows, &w1, &b1, l->offsets);
    ag_tensor *y = ag_grouped_linear_act(ctx, h, AG_ACT_GELU, &w2, &b2, l->offsets);
    if (!y || ag_backward_from(ctx, y, l->seed_grad) != CM_OK) return -1.0;
    return cm_now() - start;
}

static void print_result(const layer_data *l, double exchange, double experts) {
    const double bytes = 4.0 * (double)l->slots * D * sizeof(float); /* 4 exchanges of the rows */
    const double flops = (double)l->received * 6.0 * 2.0 * D * H;
    printf("ranks %d, %d tokens/rank, %d experts/rank, %d rows exchanged per direction\n", l->ranks,
           l->tokens, l->local_experts, l->slots);
    printf("all-to-all (dispatch+combine, fwd+bwd): %8.2f ms  (%.2f GB/s of rows)\n", exchange,
           bytes / exchange / 1e6);
    printf("expert compute (fwd+bwd):               %8.2f ms  (%.1f GFLOP/s)\n", experts,
           flops / experts / 1e6);
    printf("all-to-all share of the MoE layer:      %8.1f%%\n",
           100.0 * exchange / (exchange + experts));
    printf("MOE {\"ranks\": %d, \"rows_per_rank\": %d, \"exchange_ms_median\": %.3f, "
           "\"experts_ms_median\": %.3f, \"expert_gflops\": %.2f}\n",
           l->ranks, l->received, exchange, experts, flops / experts / 1e6);
}

/* --reps and --tokens; exits with a message on anything else. */
static void parse_args(int argc, char **argv, int *reps, int *tokens) {
    for (int i = 1; i < argc; i++) {
        const char *value = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(argv[i], "--reps") == 0)
            *reps = bench_parse_positive("bench_moe_mpi", argv[i], value), i++;
        else if (strcmp(argv[i], "--tokens") == 0)
            *tokens = bench_parse_positive("bench_moe_mpi", argv[i], value), i++;
        else {
            fprintf(stderr, "usage: bench_moe_mpi [--reps N (1..%d)] [--tokens N]\n", MAX_REPS);
            exit(1);
        }
    }
    if (*reps > MAX_REPS) *reps = MAX_REPS;
}

int main(int argc, char **argv) {
    int reps = 20, tokens = 4096;
    parse_args(argc, argv, &reps, &tokens);
    if (comm_start(&argc, &argv) != CM_OK) return 1;
    cm_comm comm;
    if (comm_init(&comm, 0) != CM_OK || E % comm.ep_size != 0 ||
        tokens % (comm.ep_size * comm.ep_size) != 0) {
        fprintf(stderr,
                "bench_moe_mpi: needs a rank count P dividing %d, and P^2 dividing "
                "--tokens\n",
                E);
        return 1;
    }
    cm_pool_set_threads(1);
    layer_data layer = {0};
    ag_ctx ctx;
    if (!make_layer(&layer, comm.ep_size, comm.world_rank, tokens) ||
        ag_ctx_init(&ctx, (size_t)1024 << 20) != CM_OK) {
        fprintf(stderr, "bench_moe_mpi: out of memory\n");
        return 1;
    }
    double exchange_ms[MAX_REPS], expert_ms[MAX_REPS];
    for (int rep = -3; rep < reps; rep++) {
        double exchanged = time_exchange(&ctx, &layer, &comm);
        MPI_Barrier(comm.world); /* every rank computes at the same time */
        double computed = time_experts(&ctx, &layer);
        if (exchanged < 0 || computed < 0) {
            fprintf(stderr, "bench_moe_mpi: %s\n", cm_error_message());
            MPI_Abort(comm.world, 1);
        }
        if (rep >= 0) exchange_ms[rep] = 1e3 * exchanged, expert_ms[rep] = 1e3 * computed;
    }
    if (comm.world_rank == 0)
        print_result(&layer, bench_median(exchange_ms, reps), bench_median(expert_ms, reps));
    ag_ctx_free(&ctx);
    free_layer(&layer);
    comm_free(&comm);
    comm_stop();
    return 0;
}
