/* Token exchange for expert parallelism, as autograd ops.
 *
 * The MoE layer sorts its token slots by expert, so the rows bound for each
 * rank of the EP group are contiguous (ranks own consecutive experts). Then:
 *   1. dispatch_exchange_counts: MPI_Alltoall of the per-expert row counts,
 *      so each rank learns how many rows each source sends for each of its
 *      experts;
 *   2. ag_all_to_all: MPI_Alltoallv of the rows themselves;
 *   and after the experts the same op in reverse brings the results home.
 * The backward of ag_all_to_all is the reverse exchange of the gradients,
 * run by every rank at the same point of its (identical) tape, so the
 * collectives match. With a group of one rank the exchange is a copy on the
 * same code path. */
#ifndef CMOE_PARALLEL_DISPATCH_H
#define CMOE_PARALLEL_DISPATCH_H

#include <mpi.h>
#include <stdbool.h>

#include "autograd/ops.h"

/* Wall time spent in the exchanges' MPI calls, for `cmoe bench`; the caller
 * owns it and passes it down (NULL everywhere: not timed). With
 * separate_wait, each exchange first waits at a barrier for the slowest rank
 * of its group; that wait (the experts' load imbalance, not communication)
 * is counted apart in wait_seconds. The barrier is only for measuring. */
typedef struct dispatch_timing {
    double exchange_seconds; /* counts and rows, forward and backward */
    double wait_seconds;
    bool separate_wait;
    /* Shadowing (parallel/shadow.h): MoE layer calls that decided, and the
     * experts they shadowed in all. */
    int64_t shadow_decisions, shadowed_experts;
} dispatch_timing;

/* Times one collective into `timing` (NULL: nothing): start returns the
 * start time, after the barrier (counted as wait) when timing->separate_wait;
 * stop adds the time since start to exchange_seconds. */
double dispatch_timer_start(MPI_Comm group, dispatch_timing *timing);
void dispatch_timer_stop(double start, dispatch_timing *timing);

/* send[p * per_rank + j] rows go to rank p for its j-th local expert;
 * recv[p * per_rank + j] rows arrive from rank p for this rank's j-th expert. */
cm_status dispatch_exchange_counts(MPI_Comm group, const int32_t *send, int32_t *recv, int per_rank,
                                   dispatch_timing *timing);

/* x [S,D] with send_counts[p] rows for rank p, in rank order -> [R,D] with
 * recv_counts[p] rows from rank p, in rank order. The count arrays must stay
 * valid until backward (allocate them from the arena), and so must `timing`
 * (may be NULL). Returns NULL and sets the context error if MPI fails. */
ag_tensor *ag_all_to_all(ag_ctx *ctx, ag_tensor *x, const int32_t *send_counts,
                         const int32_t *recv_counts, MPI_Comm group, dispatch_timing *timing);

/* One 64-bit id per row (no gradient), laid out like ag_all_to_all's rows:
 * send_rows[p] ids for rank p, in rank order -> recv_rows[p] ids from rank
 * p, in rank order. The MoE layer sends each row's global token index with
 * it when the experts' dropout needs it. */
cm_status dispatch_exchange_ids(MPI_Comm group, const uint64_t *send, const int32_t *send_rows,
                                uint64_t *recv, const int32_t *recv_rows, dispatch_timing *timing);

#endif
