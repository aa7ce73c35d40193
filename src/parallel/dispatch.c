#include "parallel/dispatch.h"

#include <string.h>

#include "autograd/op_write.h"
#include "parallel/comm.h"

double dispatch_timer_start(MPI_Comm group, dispatch_timing *timing) {
    double start = MPI_Wtime();
    if (!timing || !timing->separate_wait) return start;
    MPI_Barrier(group);
    double now = MPI_Wtime();
    timing->wait_seconds += now - start;
    return now;
}

void dispatch_timer_stop(double start, dispatch_timing *timing) {
    if (timing) timing->exchange_seconds += MPI_Wtime() - start;
}

cm_status dispatch_exchange_counts(MPI_Comm group, const int32_t *send, int32_t *recv, int per_rank,
                                   dispatch_timing *timing) {
    int ranks = comm_size(group);
    if (ranks == 1) {
        memcpy(recv, send, (size_t)per_rank * sizeof(int32_t));
        return CM_OK;
    }
    double start = dispatch_timer_start(group, timing);
    int code = MPI_Alltoall(send, per_rank, MPI_INT32_T, recv, per_rank, MPI_INT32_T, group);
    dispatch_timer_stop(start, timing);
    if (code != MPI_SUCCESS) return CM_ERR(CM_ERR_MPI, "MPI_Alltoall of expert counts failed");
    return CM_OK;
}

/* rows [R,D] in rank-ordered blocks: counts and displacements in floats. */
static void layout(const int32_t *rows, int ranks, int d, int *counts, int *displacements) {
    int offset = 0;
    for (int p = 0; p < ranks; p++) {
        counts[p] = rows[p] * d;
        displacements[p] = offset;
        offset += counts[p];
    }
}

/* Sends `in` (send_rows per rank) and receives into `out` (recv_rows per rank). */
static cm_status exchange(MPI_Comm group, const float *in, const int32_t *send_rows, float *out,
                          const int32_t *recv_rows, int d, int ranks, dispatch_timing *timing) {
    if (ranks == 1) {
        memcpy(out, in, (size_t)send_rows[0] * (size_t)d * sizeof(float));
        return CM_OK;
    }
    enum { MAX_RANKS = 1024 };
    int send_counts[MAX_RANKS], send_displacements[MAX_RANKS];
    int recv_counts[MAX_RANKS], recv_displacements[MAX_RANKS];
    if (ranks > MAX_RANKS)
        return CM_ERR(CM_ERR_INVALID, "expert-parallel groups of more than %d ranks", MAX_RANKS);
    layout(send_rows, ranks, d, send_counts, send_displacements);
    layout(recv_rows, ranks, d, recv_counts, recv_displacements);
    double start = dispatch_timer_start(group, timing);
    int code = MPI_Alltoallv(in, send_counts, send_displacements, MPI_FLOAT, out, recv_counts,
                             recv_displacements, MPI_FLOAT, group);
    dispatch_timer_stop(start, timing);
    if (code != MPI_SUCCESS) return CM_ERR(CM_ERR_MPI, "MPI_Alltoallv of token rows failed");
    return CM_OK;
}

typedef struct all_to_all_saved {
    const int32_t *send_counts, *recv_counts;
    MPI_Comm group;
    dispatch_timing *timing;
} all_to_all_saved;

/* dx [S,D] += reverse exchange of dout [R,D] */
static void all_to_all_backward(ag_ctx *ctx, ag_node *node) {
    const all_to_all_saved *saved = node->saved;
    ag_tensor *x = node->in[0];
    const int d = ag_last_dim(x), ranks = comm_size(saved->group);
    float *received = ag_alloc_floats(ctx, x->numel > 0 ? x->numel : 1, "all_to_all backward");
    if (!received) return;
    cm_status status = exchange(saved->group, node->out->grad, saved->recv_counts, received,
                                saved->send_counts, d, ranks, saved->timing);
    if (status != CM_OK) {
        ctx->status = status;
        return;
    }
    for (int64_t i = 0; i < x->numel; i++) x->grad[i] += received[i];
}

ag_tensor *ag_all_to_all(ag_ctx *ctx, ag_tensor *x, const int32_t *send_counts,
                         const int32_t *recv_counts, MPI_Comm group, dispatch_timing *timing) {
    AG_OP_BEGIN(ctx, x);
    const int ranks = comm_size(group), d = ag_last_dim(x);
    int64_t sent = 0, received = 0;
    for (int p = 0; p < ranks; p++) sent += send_counts[p], received += recv_counts[p];
    CM_ASSERT(x->ndim == 2 && sent == x->shape[0],
              "all_to_all: send counts total %lld rows but x has %d", (long long)sent, x->shape[0]);
    ag_tensor *out = ag_empty(ctx, "all_to_all", 2, (int[]){(int)received, d});
    if (!out) return NULL;
    cm_status status =
        exchange(group, x->data, send_counts, out->data, recv_counts, d, ranks, timing);
    if (status != CM_OK) {
        ctx->status = status;
        return NULL;
    }
    ag_node *node =
        ag_record(ctx, "all_to_all", all_to_all_backward, out, 1, &x, sizeof(all_to_all_saved));
    if (ag_failed(ctx)) return NULL;
    if (node)
        *(all_to_all_saved *)node->saved =
            (all_to_all_saved){send_counts, recv_counts, group, timing};
    return out;
}

cm_status dispatch_exchange_ids(MPI_Comm group, const uint64_t *send, const int32_t *send_rows,
                                uint64_t *recv, const int32_t *recv_rows, dispatch_timing *timing) {
    const int ranks = comm_size(group);
    if (ranks == 1) {
        memcpy(recv, send, (size_t)send_rows[0] * sizeof(uint64_t));
        return CM_OK;
    }
    enum { MAX_RANKS = 1024 };
    int send_counts[MAX_RANKS], send_displacements[MAX_RANKS];
    int recv_counts[MAX_RANKS], recv_displacements[MAX_RANKS];
    if (ranks > MAX_RANKS)
        return CM_ERR(CM_ERR_INVALID, "expert-parallel groups of more than %d ranks", MAX_RANKS);
    layout(send_rows, ranks, 1, send_counts, send_displacements);
    layout(recv_rows, ranks, 1, recv_counts, recv_displacements);
    double start = dispatch_timer_start(group, timing);
    int code = MPI_Alltoallv(send, send_counts, send_displacements, MPI_UINT64_T, recv, recv_counts,
                             recv_displacements, MPI_UINT64_T, group);
    dispatch_timer_stop(start, timing);
    if (code != MPI_SUCCESS) return CM_ERR(CM_ERR_MPI, "MPI_Alltoallv of row ids failed");
    return CM_OK;
}
