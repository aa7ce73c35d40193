/* The Mixture-of-Experts layer: route -> dispatch -> experts -> combine.
 *
 *   x [T,D] -> router: per token a list of (expert, gate) slots (CSR, S slots)
 *           -> dispatch: a stable counting sort of the slots by expert, so each
 *              expert's rows are contiguous; xs = x[token of slot] [S,D];
 *              with expert parallelism the rows travel to the ranks that own
 *              their experts (parallel/dispatch.h) and come back after, but
 *              the rows of experts shadowed in this call (config.shadow,
 *              parallel/shadow.h) stay and run through copies of their
 *              experts' weights; both come back in dispatch order
 *           -> experts: per expert e, a = act(xs_e W1_e^T + b1_e) [S_e,H],
 *              or with swiglu (LLaMA's MLP: W1 gate_proj, W3 up_proj, W2
 *              down_proj) a = silu(xs_e W1_e^T + b1_e) * (xs_e W3_e^T + b3_e);
 *              in training, dropout on a (expert_dropout); then
 *              y_e = a W2_e^T + b2_e [S_e,D] (one sgemm per expert and matrix;
 *              experts with no rows cost nothing)
 *           -> combine: out[t] = sum over t's slots of gate * y [T,D]
 * Backward runs the same path transposed (the ops' backward functions); the
 * gates, hence the router, get gradients; the selection itself does not.
 * Capacity dropping happens in the router: a dropped slot is simply absent,
 * so the token keeps its other experts and the residual carries it.
 *
 * Parameters (expert group, leading dimension = this rank's experts; the
 * values of expert e do not depend on how the experts are sharded):
 *   PREFIX.experts.w1 [E_local,H,D], .b1 [E_local,H], .w2 [E_local,D,H], .b2 [E_local,D],
 *   and with swiglu also .w3 [E_local,H,D], .b3 [E_local,H] (initialised like
 *   w1 and b1: normal(0, init_std) and zero); every expert has all biases,
 * and the router's PREFIX.router.weight [E,D] (+ bias) in the dense group.
 * Expert dropout (SMoE-Dropout's released experts drop inside the FFN,
 * METHODS.md 1.2): in training each hidden unit of each (token, expert) pair
 * is zeroed with probability expert_dropout and the others scaled by
 * 1/(1-p). The mask of unit u of expert e for global token t is the draw at
 * index (t E + e) H + u of the key (seed, step, pass * 2^24 + layer,
 * CM_RNG_EXPERT_DROPOUT): the same whatever the split of tokens over ranks
 * or their order by expert (with expert parallelism each row's global token
 * index travels with it).
 * Merged experts (MC-SMoE, METHODS.md 10.8; config.merged): the layer
 * also has PREFIX.group_of [E] (dense group, frozen, float32 holding
 * expert indices; initialised to the identity), which maps every expert to
 * the lowest-index member of its group, the one that holds the group's
 * weights. After routing, each slot's expert goes through the table, and
 * the slots of one token that land on the same group become one slot whose
 * gate is the sum of theirs (on the tape, so the router still gets its
 * gradients): the same output as calling the merged expert once per
 * selection, computed once. The router and its decisions are unchanged; the
 * statistics' tokens_per_expert count the groups' slots (0 for the other
 * members), routed_per_expert (the balance loss's counts) the router's own
 * choices. The other members' weight slots stay allocated but get no rows,
 * hence no gradient and no update. A table that is the identity changes
 * nothing, bit for bit.
 * Recomputation (recompute_experts, train.recompute: experts): the experts
 * run as one ag_grouped_ffn, which keeps only their input rows; backward
 * makes h, up, the mask (drawn again from the same key and indices) and a
 * again, so the results are those of keeping them, bit for bit.
 * Owns: parameter handles; all per-step buffers come from the arena. */
#ifndef CMOE_LAYERS_MOE_H
#define CMOE_LAYERS_MOE_H

#include "autograd/ops.h"
#include "autograd/params.h"
#include "parallel/dispatch.h"
#include "parallel/shadow.h"
#include "routers/router.h"

typedef struct moe_config {
    int d_model;              /* D */
    int hidden;               /* H, per expert */
    ag_activation activation; /* of the experts' hidden layer */
    float init_std;           /* w1 init std */
    float out_std;            /* w2 init std (residual projection) */
    float expert_dropout;     /* dropout on the hidden units in training, [0, 1) */
    bool merged;              /* declare the group table PREFIX.group_of (MC-SMoE) */
    bool recompute_experts;   /* the hidden layer (h, up, mask) made again in backward */
    router_config router;     /* router.num_experts = E */
    /* Expert parallelism: this rank holds experts
     * [ep_rank E/ep_size, (ep_rank+1) E/ep_size) and exchanges tokens with
     * the other ranks of ep_group. ep_size 0 or 1: all experts here. */
    MPI_Comm ep_group;
    int ep_rank, ep_size;
    dispatch_timing *timing; /* exchange time counters (cmoe bench); NULL: not timed */
    /* Dynamic shadowing of hot experts (parallel/shadow.h): off, auto (the
     * cost model decides per call, moving a float costing shadow_float_cost
     * flops), force (communication counted free). */
    shadow_mode shadow;
    int shadow_float_cost; /* 0: SHADOW_FLOPS_PER_FLOAT */
} moe_config;

typedef struct moe_layer {
    moe_config config;
    int layer;
    router router;
    int first_expert, local_experts; /* the experts held here */
    ag_param *w1, *b1, *w2, *b2;     /* [local_experts, ...] */
    ag_param *w3, *b3;               /* swiglu's up projection; NULL otherwise */
    ag_param *group_of;              /* [E] with config.merged, else NULL */
} moe_layer;

typedef struct moe_result {
    ag_tensor *out;      /* [T,D] */
    ag_tensor *aux_loss; /* [1] weighted router losses, or NULL */
    router_stats stats;
    int n_slots;
    /* The routing of x's tokens (arena, valid until the context is reset):
     * token t's slots are [offsets[t], offsets[t+1]), each an expert and its
     * gate, capacity drops removed. */
    const int32_t *offsets, *expert; /* [T+1], [n_slots] */
    const float *gates;              /* [n_slots] */
    const float *logits;             /* [T,E] router logits (router_output.logits) or NULL */
    int shadowed_experts;            /* experts computed where their tokens are (shadow.h) */
} moe_result;

cm_status moe_declare(moe_layer *moe, const moe_config *config, int layer, ag_params *params,
                      const char *prefix);

/* Runs the layer on x [T,D]; returns the context status. */
cm_status moe_forward(ag_ctx *ctx, const moe_layer *moe, ag_tensor *x, const router_call *call,
                      moe_result *result);

/* ---- merged experts (moe_groups.c) ---- */

/* Reads a group table [E] into `group_of` (ints): CM_ERR_FORMAT naming the
 * entry unless every entry is a whole number in [0, E), every expert's
 * group expert is its own group expert and not above it (the lowest index
 * of the group). *identity: whether no expert is mapped elsewhere. */
cm_status moe_read_groups(const float *table, int experts, int32_t *group_of, bool *identity);

/* Maps the routing through the layer's group table and merges the slots of
 * a token that land on the same group (their gates summed, in the order of
 * the first): rewrites routed's slots, gates and tokens_per_expert. No
 * table, or the identity: nothing changes. */
cm_status moe_apply_groups(ag_ctx *ctx, const moe_layer *moe, router_output *routed);

#endif
