#include "parallel/shadow.h"

#include <assert.h>
#include <limits.h>
#include <string.h>

#include "autograd/op_write.h"
#include "parallel/comm.h"

const char *const shadow_mode_names[] = {"off", "auto", "force", NULL};
static_assert(sizeof shadow_mode_names / sizeof shadow_mode_names[0] == SHADOW_MODE_COUNT + 1,
              "shadow_mode_names out of sync with shadow_mode");

/* ---- the decision: a pure function of the counts ----------------------------- */

static int64_t expert_rows(const shadow_problem *problem, const int32_t *counts, int expert) {
    int64_t rows = 0;
    for (int p = 0; p < problem->ranks; p++) rows += counts[(int64_t)p * problem->experts + expert];
    return rows;
}

/* What shadowing `expert` (total rows `rows`) changes in rank p's cost: the
 * owner stops computing and moving the other ranks' rows and sends the
 * weights out and takes the gradients in from the P-1 others; any other rank
 * computes its own rows instead of moving them, and takes in the weights and
 * sends a gradient back. A row that crosses ranks moves 4 times. */
static int64_t shadow_delta(const shadow_problem *problem, const int32_t *counts, int expert,
                            int64_t rows, int p) {
    const int owner = expert / (problem->experts / problem->ranks);
    const int64_t own = counts[(int64_t)p * problem->experts + expert];
    const int64_t row_move = 4 * problem->row_floats * problem->float_cost;
    const int64_t weights_move = 2 * problem->weight_floats * problem->float_cost;
    if (p == owner)
        return -(rows - own) * (problem->row_flops + row_move) +
               (problem->ranks - 1) * weights_move;
    return own * (problem->row_flops - row_move) + weights_move;
}

/* rank_cost [P] without any shadowing: rows of the own experts computed, and
 * every row that crosses to or from the rank moved. */
static void base_costs(const shadow_problem *problem, const int32_t *counts, int64_t *rank_cost) {
    const int P = problem->ranks, E = problem->experts, per_rank = E / P;
    const int64_t row_move = 4 * problem->row_floats * problem->float_cost;
    for (int p = 0; p < P; p++) rank_cost[p] = 0;
    for (int e = 0; e < E; e++) {
        const int owner = e / per_rank;
        const int64_t rows = expert_rows(problem, counts, e);
        const int64_t crossing = rows - counts[(int64_t)owner * E + e];
        rank_cost[owner] += rows * problem->row_flops + crossing * row_move;
        for (int p = 0; p < P; p++)
            if (p != owner) rank_cost[p] += counts[(int64_t)p * E + e] * row_move;
    }
}

static int64_t max_cost(const int64_t *rank_cost, int ranks) {
    int64_t most = rank_cost[0];
    for (int p = 1; p < ranks; p++) most = rank_cost[p] > most ? rank_cost[p] : most;
    return most;
}

int64_t shadow_step_cost(const shadow_problem *problem, const int32_t *counts,
                         const uint8_t *shadowed, int64_t *rank_cost) {
    base_costs(problem, counts, rank_cost);
    for (int e = 0; shadowed && e < problem->experts; e++) {
        if (!shadowed[e]) continue;
        const int64_t rows = expert_rows(problem, counts, e);
        for (int p = 0; p < problem->ranks; p++)
            rank_cost[p] += shadow_delta(problem, counts, e, rows, p);
    }
    return max_cost(rank_cost, problem->ranks);
}

/* The step's cost if `expert` were shadowed too. */
static int64_t cost_with(const shadow_problem *problem, const int32_t *counts,
                         const int64_t *rank_cost, int expert, int64_t rows) {
    int64_t most = INT64_MIN;
    for (int p = 0; p < problem->ranks; p++) {
        int64_t cost = rank_cost[p] + shadow_delta(problem, counts, expert, rows, p);
        most = cost > most ? cost : most;
    }
    return most;
}

int shadow_decide(const shadow_problem *problem, const int32_t *counts, int64_t *rank_cost,
                  uint8_t *shadowed) {
    const int E = problem->experts;
    memset(shadowed, 0, (size_t)E);
    if (problem->ranks <= 1 || E % problem->ranks != 0) return 0;
    int64_t current = shadow_step_cost(problem, counts, NULL, rank_cost);
    int chosen = 0;
    for (;;) { /* greedy: the expert that lowers the maximum most; ties: the lowest */
        int best = -1;
        int64_t best_cost = current;
        for (int e = 0; e < E; e++) {
            const int64_t rows = expert_rows(problem, counts, e);
            if (shadowed[e] || rows == 0) continue;
            const int64_t cost = cost_with(problem, counts, rank_cost, e, rows);
            if (cost < best_cost) best = e, best_cost = cost;
        }
        if (best < 0) return chosen;
        const int64_t rows = expert_rows(problem, counts, best);
        for (int p = 0; p < problem->ranks; p++)
            rank_cost[p] += shadow_delta(problem, counts, best, rows, p);
        shadowed[best] = 1;
        current = best_cost;
        chosen++;
    }
}

cm_status shadow_gather_counts(MPI_Comm group, const int32_t *mine, int32_t *all, int experts,
                               dispatch_timing *timing) {
    if (comm_size(group) == 1) {
        memcpy(all, mine, (size_t)experts * sizeof(int32_t));
        return CM_OK;
    }
    double start = dispatch_timer_start(group, timing);
    int code = MPI_Allgather(mine, experts, MPI_INT32_T, all, experts, MPI_INT32_T, group);
    dispatch_timer_stop(start, timing);
    if (code != MPI_SUCCESS) return CM_ERR(CM_ERR_MPI, "MPI_Allgather of expert counts failed");
    return CM_OK;
}

/* ---- the weights out, the gradients back ------------------------------------- */

enum { MAX_RANKS = 1024 };

static int group_rank(MPI_Comm group) {
    int rank = 0;
    if (comm_size(group) > 1) MPI_Comm_rank(group, &rank);
    return rank;
}

/* counts[p], displacements[p] (floats) of rank p's slices within [count, slice]. */
static void owner_layout(const shadow_set *set, int ranks, int64_t slice, int *counts,
                         int *displacements) {
    for (int p = 0; p < ranks; p++) counts[p] = 0;
    for (int k = 0; k < set->count; k++) counts[set->experts[k] / set->per_rank] += (int)slice;
    for (int p = 0, at = 0; p < ranks; p++) {
        displacements[p] = at;
        at += counts[p];
    }
}

typedef struct shadow_saved {
    shadow_set set;
} shadow_saved;

/* The slices' gradients [count, slice] -> their owners; this rank sums what it
 * receives for its own slices in rank order and adds it to param's gradient. */
static void shadow_slices_backward(ag_ctx *ctx, ag_node *node) {
    const shadow_set *set = &((const shadow_saved *)node->saved)->set;
    ag_tensor *param = node->in[0];
    const int ranks = comm_size(set->group), rank = group_rank(set->group);
    const int64_t slice = param->numel / param->shape[0];
    int send_counts[MAX_RANKS], send_displacements[MAX_RANKS];
    int recv_counts[MAX_RANKS], recv_displacements[MAX_RANKS];
    owner_layout(set, ranks, slice, send_counts, send_displacements);
    const int mine = send_counts[rank]; /* floats of this rank's own slices */
    float *received = node->out->grad;
    if (ranks > 1) {
        received = ag_alloc_floats(ctx, (int64_t)ranks * mine + 1, "shadow_slices backward");
        if (!received) return;
        for (int q = 0; q < ranks; q++) recv_counts[q] = mine, recv_displacements[q] = q * mine;
        double start = dispatch_timer_start(set->group, set->timing);
        int code = MPI_Alltoallv(node->out->grad, send_counts, send_displacements, MPI_FLOAT,
                                 received, recv_counts, recv_displacements, MPI_FLOAT, set->group);
        dispatch_timer_stop(start, set->timing);
        if (code != MPI_SUCCESS) {
            ctx->status = CM_ERR(CM_ERR_MPI, "MPI_Alltoallv of shadow gradients failed");
            return;
        }
        for (int q = 1; q < ranks; q++) /* rank order: the same sum on every run */
            for (int i = 0; i < mine; i++) received[i] += received[(int64_t)q * mine + i];
    }
    if (!ag_wants_grad(param)) return;
    for (int k = 0, own = 0; k < set->count; k++) {
        if (set->experts[k] / set->per_rank != rank) continue;
        float *grad = param->grad + (set->experts[k] % set->per_rank) * slice;
        const float *sum = received + (int64_t)own++ * slice;
        for (int64_t i = 0; i < slice; i++) grad[i] += sum[i];
    }
}

/* out [count, slice]: this rank's slices packed at its displacement. */
static void pack_own_slices(const ag_tensor *param, const shadow_set *set, int rank, int64_t slice,
                            float *out) {
    for (int k = 0; k < set->count; k++)
        if (set->experts[k] / set->per_rank == rank)
            memcpy(out + k * slice, param->data + (set->experts[k] % set->per_rank) * slice,
                   (size_t)slice * sizeof(float));
}

ag_tensor *ag_shadow_slices(ag_ctx *ctx, ag_tensor *param, const shadow_set *set) {
    AG_OP_BEGIN(ctx, param);
    const int ranks = comm_size(set->group), rank = group_rank(set->group);
    CM_ASSERT(param->ndim >= 1 && param->ndim <= 4 && param->shape[0] == set->per_rank &&
                  ranks <= MAX_RANKS,
              "shadow_slices: parameter '%s' has %d leading slices, %d per rank, %d ranks",
              param->name ? param->name : "?", param->ndim ? param->shape[0] : 0, set->per_rank,
              ranks);
    const int64_t slice = param->numel / param->shape[0];
    CM_ASSERT((int64_t)set->count * slice < INT_MAX, "shadow_slices: %d slices of %lld floats",
              set->count, (long long)slice);
    int shape[4] = {set->count};
    for (int i = 1; i < param->ndim; i++) shape[i] = param->shape[i];
    ag_tensor *out = ag_empty(ctx, "shadow_slices", param->ndim, shape);
    if (!out) return NULL;
    pack_own_slices(param, set, rank, slice, out->data);
    if (ranks > 1) {
        int counts[MAX_RANKS], displacements[MAX_RANKS];
        owner_layout(set, ranks, slice, counts, displacements);
        double start = dispatch_timer_start(set->group, set->timing);
        int code = MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_FLOAT, out->data, counts, displacements,
                                  MPI_FLOAT, set->group);
        dispatch_timer_stop(start, set->timing);
        if (code != MPI_SUCCESS) {
            ctx->status = CM_ERR(CM_ERR_MPI, "MPI_Allgatherv of shadowed expert weights failed");
            return NULL;
        }
    }
    ag_node *node = ag_record(ctx, "shadow_slices", shadow_slices_backward, out, 1, &param,
                              sizeof(shadow_saved));
    if (ag_failed(ctx)) return NULL;
    if (node) ((shadow_saved *)node->saved)->set = *set;
    return out;
}
