/* THOR's stochastic experts (METHODS.md 2.2): no router network. In training
 * every token of the batch goes to one expert drawn per layer and per forward
 * pass; at inference the draw is per sequence (inference level 1) or per token
 * (level 0). The gate is a constant 1.
 *
 * Draws use the key (seed, step, layer, CM_RNG_ROUTER). The three uses take
 * disjoint index ranges of that key, so they are independent of each other:
 *   training     index = micro-batch * 2^16 + pass  (small)
 *   per sequence index = 2^62 + global sequence     (first_token + t) / seq_len
 *   per token    index = 2^63 + global token        first_token + t
 * Global indices make the routing the same on any number of ranks. */
#include <math.h>

#include "routers/router_internal.h"

#define THOR_SEQUENCE_INDEX_BASE (UINT64_C(1) << 62)
#define THOR_TOKEN_INDEX_BASE    (UINT64_C(1) << 63)

cm_status router_thor_route(ag_ctx *ctx, const router *r, ag_tensor *x, const router_call *call,
                            router_output *out) {
    if (ag_failed(ctx)) return ag_ctx_status(ctx);
    int experts = r->config.num_experts, tokens = (int)ag_rows(x);
    bool per_sequence = !call->training && r->config.thor_level == ROUTER_THOR_PER_SEQUENCE;
    if (per_sequence && call->seq_len < 1)
        return CM_ERR(CM_ERR_INVALID,
                      "THOR per-sequence inference needs the sequence length (got %d)",
                      call->seq_len);
    cm_rng_key key = {call->seed, call->step, (uint32_t)r->layer, CM_RNG_ROUTER};

    int32_t *token = ag_alloc_ints(ctx, tokens ? tokens : 1, "router_thor");
    int32_t *expert = ag_alloc_ints(ctx, tokens ? tokens : 1, "router_thor");
    float *priority = ag_alloc_floats(ctx, tokens ? tokens : 1, "router_thor");
    if (!token || !expert || !priority) return ag_ctx_status(ctx);
    /* one draw per (micro-batch, pass); micro-batch 0 draws at index = pass */
    uint64_t draw = ((uint64_t)call->micro << 16) + (uint64_t)call->pass;
    int32_t batch_expert =
        call->training ? (int32_t)cm_rng_below(key, draw, (uint64_t)experts) : -1;
    uint64_t previous_sequence = UINT64_MAX;
    int32_t sequence_expert = -1;
    for (int t = 0; t < tokens; t++) {
        uint64_t global_token = call->first_token + (uint64_t)t;
        int32_t e;
        if (call->training) {
            e = batch_expert;
        } else if (per_sequence) {
            uint64_t sequence = global_token / (uint64_t)call->seq_len;
            if (sequence != previous_sequence) {
                sequence_expert = (int32_t)cm_rng_below(key, THOR_SEQUENCE_INDEX_BASE + sequence,
                                                        (uint64_t)experts);
                previous_sequence = sequence;
            }
            e = sequence_expert;
        } else {
            e = (int32_t)cm_rng_below(key, THOR_TOKEN_INDEX_BASE + global_token, (uint64_t)experts);
        }
        token[t] = t;
        expert[t] = e;
        priority[t] = 1.0f; /* capacity ties: earlier tokens first */
    }

    router_candidates candidates = {.count = tokens,
                                    .token = token,
                                    .expert = expert,
                                    .priority = priority,
                                    .gates = NULL, /* constant ones */
                                    .capacity_load = (double)tokens};
    CM_TRY(router_finish(ctx, r, tokens, 1, &candidates, out));
    out->aux_loss = NULL;
    out->stats.entropy = NAN;
    out->stats.k = 1;
    return ag_ctx_status(ctx);
}
