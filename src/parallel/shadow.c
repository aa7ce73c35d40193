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

shadow_problem shadow_problem_for(int ranks, int experts, int64_t d_model, int64_t hidden,
                                  int matrices, shadow_mode mode, int64_t float_cost) {
    return (shadow_problem){.ranks = ranks,
                            .experts = experts,
                            .row_flops = 6 * matrices * d_model * hidden,
                            .row_floats = d_model,
                            .weight_floats =
                                matrices * d_model * hidden + (matrices - 1) * hidden + d_model,
                            .float_cost = mode == SHADOW_FORCE ? 0 : float_cost};
}

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

enum { MAX_RANKS = 1024, MAX_TENSORS = 8 };

static int group_rank(MPI_Comm group) {
    int rank = 0;
    if (comm_size(group) > 1) MPI_Comm_rank(group, &rank);
    return rank;
}

/* Where everything sits. The packed output is tensor-major: tensor i's
 * slices of experts 0..count-1 from count * before[i]. On the wire, rank p
 * sends its own experts (the consecutive first[p] .. first[p] + owned[p] - 1
 * of the set) tensor by tensor: block[p] floats from at[p], its tensor i from
 * at[p] + owned[p] * before[i]. Either way one (rank, tensor) pair is one
 * contiguous run of owned[p] * slice[i] floats. */
typedef struct pack_layout {
    int ranks, rank, tensors;
    int64_t slice[MAX_TENSORS], before[MAX_TENSORS], total; /* floats per expert */
    int first[MAX_RANKS], owned[MAX_RANKS];
    int block[MAX_RANKS], at[MAX_RANKS];
} pack_layout;

static void make_layout(ag_tensor *const *params, int n, const shadow_set *set, pack_layout *l) {
    l->ranks = comm_size(set->group);
    l->rank = group_rank(set->group);
    l->tensors = n;
    l->total = 0;
    for (int i = 0; i < n; i++) {
        l->slice[i] = params[i]->numel / params[i]->shape[0];
        l->before[i] = l->total;
        l->total += l->slice[i];
    }
    for (int p = 0; p < l->ranks; p++) l->owned[p] = 0, l->first[p] = set->count;
    for (int k = set->count - 1; k >= 0; k--) {
        const int owner = set->experts[k] / set->per_rank;
        l->owned[owner]++;
        l->first[owner] = k;
    }
    for (int p = 0, at = 0; p < l->ranks; p++) {
        l->block[p] = (int)(l->owned[p] * l->total);
        l->at[p] = at;
        at += l->block[p];
    }
}

/* Copies between the packed layout and the wire layout, one run per
 * (rank, tensor); to_wire chooses the direction. */
static void convert(const pack_layout *l, int count, float *packed, float *wire, bool to_wire) {
    for (int p = 0; p < l->ranks; p++)
        for (int i = 0; i < l->tensors; i++) {
            float *in_packed = packed + count * l->before[i] + l->first[p] * l->slice[i];
            float *in_wire = wire + l->at[p] + l->owned[p] * l->before[i];
            const size_t bytes = (size_t)(l->owned[p] * l->slice[i]) * sizeof(float);
            if (bytes == 0) continue;
            memcpy(to_wire ? in_wire : in_packed, to_wire ? in_packed : in_wire, bytes);
        }
}

/* This rank's own slices of params, or of their gradients, <-> `own` (its
 * block of the wire layout); add: own is added into the gradients. */
static void own_slices(ag_tensor *const *params, const shadow_set *set, const pack_layout *l,
                       float *own, bool add) {
    for (int i = 0; i < l->tensors; i++)
        for (int j = 0; j < l->owned[l->rank]; j++) {
            const int64_t local = set->experts[l->first[l->rank] + j] % set->per_rank;
            float *wire = own + l->owned[l->rank] * l->before[i] + j * l->slice[i];
            if (add) {
                float *grad = params[i]->grad + local * l->slice[i];
                for (int64_t u = 0; u < l->slice[i]; u++) grad[u] += wire[u];
            } else {
                memcpy(wire, params[i]->data + local * l->slice[i],
                       (size_t)l->slice[i] * sizeof(float));
            }
        }
}

typedef struct shadow_saved {
    shadow_set set;
} shadow_saved;

/* Every rank's gradient of the owners' slices goes to the owner
 * (MPI_Alltoallv), which sums them in rank order 0..P-1 and adds the sum to
 * its parameters' gradients. */
static void shadow_pack_backward(ag_ctx *ctx, ag_node *node) {
    const shadow_set *set = &((const shadow_saved *)node->saved)->set;
    pack_layout l;
    make_layout(node->in, node->n_in, set, &l);
    const int mine = l.block[l.rank];
    float *wire = ag_alloc_floats(ctx, node->out->numel + 1, "shadow backward");
    float *received = ag_alloc_floats(ctx, (int64_t)l.ranks * mine + 1, "shadow backward");
    if (!wire || !received) return;
    convert(&l, set->count, node->out->grad, wire, true);
    if (l.ranks > 1) {
        int recv_counts[MAX_RANKS], recv_at[MAX_RANKS];
        for (int q = 0; q < l.ranks; q++) recv_counts[q] = mine, recv_at[q] = q * mine;
        double start = dispatch_timer_start(set->group, set->timing);
        int code = MPI_Alltoallv(wire, l.block, l.at, MPI_FLOAT, received, recv_counts, recv_at,
                                 MPI_FLOAT, set->group);
        dispatch_timer_stop(start, set->timing);
        if (code != MPI_SUCCESS) {
            ctx->status = CM_ERR(CM_ERR_MPI, "MPI_Alltoallv of shadow gradients failed");
            return;
        }
        for (int q = 1; q < l.ranks; q++) /* rank order: the same sum on every run */
            for (int u = 0; u < mine; u++) received[u] += received[(int64_t)q * mine + u];
    } else {
        memcpy(received, wire, (size_t)mine * sizeof(float));
    }
    own_slices(node->in, set, &l, received, true);
}

ag_tensor *ag_shadow_pack(ag_ctx *ctx, ag_tensor *const *params, int n, const shadow_set *set) {
    if (ag_failed(ctx)) return NULL;
    CM_ASSERT(n >= 1 && n <= MAX_TENSORS && comm_size(set->group) <= MAX_RANKS,
              "shadow_pack: %d tensors (at most %d), %d ranks (at most %d)", n, MAX_TENSORS,
              comm_size(set->group), MAX_RANKS);
    for (int i = 0; i < n; i++) {
        if (!params[i]) return NULL;
        CM_ASSERT(params[i]->ndim >= 1 && params[i]->shape[0] == set->per_rank,
                  "shadow_pack: '%s' does not hold %d experts", params[i]->name, set->per_rank);
    }
    pack_layout l;
    make_layout(params, n, set, &l);
    CM_ASSERT(set->count * l.total < INT_MAX, "shadow_pack: %d experts of %lld floats", set->count,
              (long long)l.total);
    ag_tensor *out = ag_empty(ctx, "shadow_pack", 1, (int[]){(int)(set->count * l.total)});
    if (!out) return NULL;
    size_t scratch = ag_scratch_mark(ctx); /* the wire buffer lives only here */
    float *wire = ag_alloc_floats(ctx, out->numel + 1, "shadow_pack");
    if (!wire) return NULL;
    own_slices(params, set, &l, wire + l.at[l.rank], false);
    if (l.ranks > 1) {
        double start = dispatch_timer_start(set->group, set->timing);
        int code =
            MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_FLOAT, wire, l.block, l.at, MPI_FLOAT, set->group);
        dispatch_timer_stop(start, set->timing);
        if (code != MPI_SUCCESS) {
            ctx->status = CM_ERR(CM_ERR_MPI, "MPI_Allgatherv of shadowed expert weights failed");
            return NULL;
        }
    }
    convert(&l, set->count, out->data, wire, false);
    ag_scratch_release(ctx, scratch);
    ag_node *node =
        ag_record(ctx, "shadow_pack", shadow_pack_backward, out, n, params, sizeof(shadow_saved));
    if (ag_failed(ctx)) return NULL;
    if (node) ((shadow_saved *)node->saved)->set = *set;
    return out;
}

/* packed [*] -> its floats from `offset`, shaped `shape` (no copy). */
static void shadow_view_backward(ag_ctx *ctx, ag_node *node) {
    (void)ctx;
    const int64_t offset = *(const int64_t *)node->saved;
    float *restrict grad = node->in[0]->grad + offset;
    const float *restrict dout = node->out->grad;
    for (int64_t u = 0; u < node->out->numel; u++) grad[u] += dout[u];
}

ag_tensor *ag_shadow_view(ag_ctx *ctx, ag_tensor *packed, int64_t offset, int ndim,
                          const int *shape) {
    AG_OP_BEGIN(ctx, packed);
    int64_t numel = 1;
    for (int d = 0; d < ndim; d++) numel *= shape[d];
    CM_ASSERT(offset >= 0 && offset + numel <= packed->numel,
              "shadow_view: floats [%lld, %lld) of a packed tensor of %lld", (long long)offset,
              (long long)(offset + numel), (long long)packed->numel);
    ag_tensor *out = ag_alias(ctx, "shadow_view", packed->data + offset, ndim, shape);
    if (!out) return NULL;
    ag_node *node =
        ag_record(ctx, "shadow_view", shadow_view_backward, out, 1, &packed, sizeof(int64_t));
    if (ag_failed(ctx)) return NULL;
    if (node) *(int64_t *)node->saved = offset;
    return out;
}
