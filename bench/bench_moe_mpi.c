/* Expert parallelism cost per MoE layer: the all-to-all token exchange
 * (dispatch and combine, forward and backward) next to the expert compute
 * (two grouped linears and a GELU, forward and backward), for the lm-moe
 * configuration of BENCH.md: 4096 tokens per step (split over the ranks),
 * d_model 256, 8 experts of hidden 1024, top-2, balanced routing.
 *
 *   OPENBLAS_NUM_THREADS=1 mpirun -np 2 build/bench_moe_mpi [--reps N]
 *
 * Prints medians over the repetitions (after 3 warm-up rounds) and the
 * exchange's share of the layer. Not a test: it only times. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "autograd/ops.h"
#include "parallel/comm.h"
#include "parallel/dispatch.h"
#include "train/progress.h"

enum { TOKENS = 4096, D = 256, H = 1024, E = 8, K = 2, MAX_REPS = 200 };

static int compare(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *values, int n) {
    qsort(values, (size_t)n, sizeof *values, compare);
    return n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

int main(int argc, char **argv) {
    int reps = 20;
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--reps") == 0 && i + 1 < argc) reps = atoi(argv[++i]);
    if (reps < 1 || reps > MAX_REPS) reps = 20;
    if (comm_start(&argc, &argv) != CM_OK) return 1;
    cm_comm comm;
    if (comm_init(&comm, 0) != CM_OK || E % comm.ep_size != 0) {
        fprintf(stderr, "bench_moe_mpi: needs a rank count dividing %d\n", E);
        return 1;
    }
    const int ranks = comm.ep_size, local_experts = E / ranks;
    const int tokens = TOKENS / ranks, slots = tokens * K;
    /* Balanced routing: every rank sends slots / ranks rows to every rank,
     * which splits them evenly over its experts. */
    int32_t *send_rows = malloc(sizeof(int32_t) * (size_t)ranks);
    int32_t *recv_rows = malloc(sizeof(int32_t) * (size_t)ranks);
    int32_t *offsets = malloc(sizeof(int32_t) * (size_t)(local_experts + 1));
    for (int p = 0; p < ranks; p++) send_rows[p] = recv_rows[p] = slots / ranks;
    int received = slots; /* same as sent when balanced */
    for (int j = 0; j <= local_experts; j++) offsets[j] = j * (received / local_experts);
    offsets[local_experts] = received;

    float *x_data = malloc(sizeof(float) * (size_t)slots * D);
    float *w1_data = malloc(sizeof(float) * (size_t)local_experts * H * D);
    float *w2_data = malloc(sizeof(float) * (size_t)local_experts * D * H);
    float *w1_grad = calloc((size_t)local_experts * H * D, sizeof(float));
    float *w2_grad = calloc((size_t)local_experts * D * H, sizeof(float));
    float *seed_grad = malloc(sizeof(float) * (size_t)slots * D);
    cm_rng_key key = {1, 0, (uint32_t)comm.world_rank, CM_RNG_TEST};
    cm_rng_fill_uniform(key, 0, (int64_t)slots * D, -1, 1, x_data);
    cm_rng_fill_uniform(key, 1u << 30, (int64_t)local_experts * H * D, -0.05f, 0.05f, w1_data);
    cm_rng_fill_uniform(key, 2u << 30, (int64_t)local_experts * D * H, -0.05f, 0.05f, w2_data);
    cm_rng_fill_uniform(key, 3u << 30, (int64_t)slots * D, -1, 1, seed_grad);
    ag_tensor w1 = ag_tensor_wrap(w1_data, w1_grad, 3, (int[]){local_experts, H, D}, true);
    ag_tensor w2 = ag_tensor_wrap(w2_data, w2_grad, 3, (int[]){local_experts, D, H}, true);
    ag_ctx ctx;
    if (ag_ctx_init(&ctx, (size_t)512 << 20) != CM_OK) return 1;

    double exchange_ms[MAX_REPS], expert_ms[MAX_REPS];
    for (int rep = -3; rep < reps; rep++) {
        /* The exchange: dispatch and combine, each forward + backward. */
        ag_ctx_reset(&ctx);
        ag_tensor x = ag_tensor_wrap(x_data, NULL, 2, (int[]){slots, D}, true);
        MPI_Barrier(comm.world);
        double start = cm_now();
        ag_tensor *there = ag_all_to_all(&ctx, &x, send_rows, recv_rows, comm.ep, NULL);
        ag_tensor *back = ag_all_to_all(&ctx, there, recv_rows, send_rows, comm.ep, NULL);
        if (ag_backward_from(&ctx, back, seed_grad) != CM_OK) return 1;
        MPI_Barrier(comm.world);
        double exchanged = cm_now() - start;

        /* The experts on the received rows. */
        ag_ctx_reset(&ctx);
        ag_tensor rows = ag_tensor_wrap(x_data, NULL, 2, (int[]){received, D}, true);
        start = cm_now();
        ag_tensor *h = ag_gelu(&ctx, ag_grouped_linear(&ctx, &rows, &w1, NULL, offsets));
        ag_tensor *y = ag_grouped_linear(&ctx, h, &w2, NULL, offsets);
        if (!y || ag_backward_from(&ctx, y, seed_grad) != CM_OK) return 1;
        double computed = cm_now() - start;
        if (rep >= 0) {
            exchange_ms[rep] = 1e3 * exchanged;
            expert_ms[rep] = 1e3 * computed;
        }
    }
    double exchange = median(exchange_ms, reps), expert = median(expert_ms, reps);
    double bytes = 4.0 * (double)slots * D * sizeof(float); /* 4 exchanges of the rows */
    if (comm.world_rank == 0) {
        printf("ranks %d, %d tokens/rank, %d experts/rank, %d rows exchanged per direction\n",
               ranks, tokens, local_experts, slots);
        printf("all-to-all (dispatch+combine, fwd+bwd): %8.2f ms  (%.2f GB/s of rows)\n", exchange,
               bytes / exchange / 1e6);
        printf("expert compute (fwd+bwd):               %8.2f ms\n", expert);
        printf("all-to-all share of the MoE layer:      %8.1f%%\n",
               100.0 * exchange / (exchange + expert));
    }
    ag_ctx_free(&ctx);
    comm_free(&comm);
    comm_stop();
    return 0;
}
