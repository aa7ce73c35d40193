/* Dynamic expert shadowing: load-aware expert execution under expert
 * parallelism (the idea of FasterMoE, written for cmoe).
 *
 * Without it, rank p of an EP group computes every row routed to its own
 * experts, so the rank holding the hottest experts sets the pace of the step.
 * Per MoE layer and call, every rank of the group learns how many rows each
 * rank routes to each expert (one MPI_Allgather of E int32s per rank), and
 * from these counts alone decides the same set of "shadowed" experts:
 *   forward   the owners send those experts' current weights to every rank
 *             (ag_shadow_pack: one MPI_Allgatherv per layer call);
 *             every rank computes its own rows for them where they are, and
 *             those rows never travel;
 *   backward  every rank sends its gradient of the copies to the owner
 *             (MPI_Alltoallv), which sums them in rank order 0..P-1 and adds
 *             the sum to its own gradient: deterministic, and the same
 *             tokens go through the same weights as without shadowing.
 * The decision (shadow_decide) is a pure function of the counts, so every
 * rank takes the same one, the collectives match, and a resumed run takes
 * the same decisions as the uninterrupted one.
 *
 * The cost model, in flops of one rank (integers, so every rank computes
 * bit-identical costs): a rank's time is
 *   rows it computes x row_flops  +  floats it sends or receives x float_cost
 * where row_flops = 6 n_mat D H (forward and backward of the n_mat expert
 * matrices for one row), a row that crosses ranks moves D floats four times
 * (its input there, its output back, and both gradients in backward), and a
 * shadowed expert's weights (weight_floats) go out to the P-1 other ranks
 * and their gradients come back (the owner moves 2 (P-1) weight_floats, any
 * other rank 2 weight_floats). The step costs the maximum over the ranks.
 * Greedy: add the expert whose shadowing lowers that maximum the most;
 * stop when none lowers it. float_cost (SHADOW_FLOPS_PER_FLOAT) is the ratio
 * of the in-situ expert sgemm rate of one thread (~100 GFLOP/s here) to the
 * shared-memory MPI rate of collectives (~5 GB/s = 1.25 Gfloat/s), so
 * moving one float costs as much time as about 80 flops; docs/performance.md
 * has the measurements. That is the default of the recipe key
 * parallel.shadow_float_cost, which sets float_cost: docs/scaling.md
 * measured about 750 on a loaded 2-core machine and about 7 on a fast
 * network. SHADOW_FORCE sets float_cost to 0 (communication free: shadow
 * whenever it evens out the rows computed), for tests and measurement.
 * Balanced counts shadow nothing in every mode. */
#ifndef CMOE_PARALLEL_SHADOW_H
#define CMOE_PARALLEL_SHADOW_H

#include <mpi.h>
#include <stdint.h>

#include "autograd/ops.h"
#include "parallel/dispatch.h"

typedef enum shadow_mode { SHADOW_OFF, SHADOW_AUTO, SHADOW_FORCE, SHADOW_MODE_COUNT } shadow_mode;
extern const char *const shadow_mode_names[]; /* "off", "auto", "force", NULL */

enum { SHADOW_FLOPS_PER_FLOAT = 80 };

/* One layer's sizes for the cost model (see the top of this file). */
typedef struct shadow_problem {
    int ranks, experts;    /* P, E; rank p owns experts [p E/P, (p+1) E/P) */
    int64_t row_flops;     /* 6 n_mat D H */
    int64_t row_floats;    /* D */
    int64_t weight_floats; /* one expert's parameters */
    int64_t float_cost;    /* flops per float moved; 0: communication is free */
} shadow_problem;

/* The problem of a layer of experts with n_mat matrices D x H each (2, or 3
 * with swiglu; biases H for all but the output matrix, D for it), in
 * `mode`, with moving one float costing float_cost flops
 * (parallel.shadow_float_cost; SHADOW_FORCE: communication free). The MoE
 * layer and bench/scaling_model both take it from here. */
shadow_problem shadow_problem_for(int ranks, int experts, int64_t d_model, int64_t hidden,
                                  int matrices, shadow_mode mode, int64_t float_cost);

/* counts [P][E]: rows rank p routes to expert e (the same array on every
 * rank). Sets shadowed[e] to 1 for the experts to shadow, else 0, and
 * returns how many; rank_cost [P] is scratch. Pure: no MPI, no allocation.
 * One rank, or no rows: none. */
int shadow_decide(const shadow_problem *problem, const int32_t *counts, int64_t *rank_cost,
                  uint8_t *shadowed);

/* The rank's modelled cost (flops) of the step under the decision `shadowed`
 * (NULL: none), the maximum over the ranks; for logs and tests. */
int64_t shadow_step_cost(const shadow_problem *problem, const int32_t *counts,
                         const uint8_t *shadowed, int64_t *rank_cost);

/* all [P][E] = every rank's mine [E] (MPI_Allgather; one rank: a copy). */
cm_status shadow_gather_counts(MPI_Comm group, const int32_t *mine, int32_t *all, int experts,
                               dispatch_timing *timing);

/* The shadowed experts of a layer call, ascending (so each owner's are
 * consecutive): experts[k] for k in [0, count), owned by rank
 * experts[k] / per_rank. */
typedef struct shadow_set {
    int count;
    const int32_t *experts; /* [count], arena */
    int per_rank;           /* experts per rank, E / P */
    MPI_Comm group;
    dispatch_timing *timing; /* may be NULL */
} shadow_set;

/* params[i] [L, ...] (i < n, n <= 8): this rank's experts' slices of a
 * layer's expert parameters -> packed [count * (slice_0 + ... + slice_n-1)]:
 * the shadowed experts' slices from their owners, tensor by tensor (tensor i
 * as [count, ...] at offset count * (slice_0 + ... + slice_i-1)), on every
 * rank, in one MPI_Allgatherv. Backward: one MPI_Alltoallv takes each copy's
 * gradient to its owner, which sums them in rank order 0..P-1 and adds the
 * sum to its parameters' gradients. Every rank of the group must call it
 * with the same set, at the same point of its tape. */
ag_tensor *ag_shadow_pack(ag_ctx *ctx, ag_tensor *const *params, int n, const shadow_set *set);

/* The floats [offset, offset + numel(shape)) of packed as a tensor (no copy;
 * backward adds its gradient into packed's). */
ag_tensor *ag_shadow_view(ag_ctx *ctx, ag_tensor *packed, int64_t offset, int ndim,
                          const int *shape);

#endif
