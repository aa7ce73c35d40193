/* Shared by moe.c and moe_shadow.c; not part of the MoE layer's API. */
#ifndef CMOE_LAYERS_MOE_INTERNAL_H
#define CMOE_LAYERS_MOE_INTERNAL_H

#include "layers/moe.h"

/* The weights one expert computation runs with: the layer's own [L, ...]
 * parameters, or the shadowed experts' copies [K, ...]; w3, b3 with swiglu. */
typedef struct moe_expert_weights {
    ag_tensor *w1, *b1, *w2, *b2, *w3, *b3;
} moe_expert_weights;

/* How one layer call splits its dispatch order (the slots sorted by expert,
 * S positions) between the exchange and the shadowed experts. */
typedef struct moe_shadow_plan {
    shadow_set set;                  /* set.count 0: nothing shadowed, the exchange as before */
    const int32_t *all_counts;       /* [P][E] rows each rank sends to each expert, shadowed ones
                                        zeroed; NULL: the exchange counts them itself */
    const int32_t *exchange_offsets; /* [E+1] over the exchanged positions */
    const int32_t *exchange_token;   /* [exchanged] token of each exchanged position */
    const int32_t *shadow_token;     /* [shadowed] token of each shadowed position */
    const int32_t *shadow_offsets;   /* [set.count + 1] over the shadowed positions */
    const int32_t *merge;            /* [S] row of [exchanged; shadowed] per position */
    int exchanged, shadowed;
} moe_shadow_plan;

/* Gathers the counts and decides (parallel/shadow.h) when moe.config.shadow
 * is on and the EP group has more than one rank; expert_offsets [E+1] and
 * sorted_token [S] describe the dispatch order. Off, or one rank: the plan
 * is the dispatch order itself (set.count 0, all_counts NULL). */
cm_status moe_plan_shadow(ag_ctx *ctx, const moe_layer *moe, const int32_t *expert_offsets,
                          const int32_t *sorted_token, int S, moe_shadow_plan *plan);

/* Marks the shadowed experts held here as used in this step. */
void moe_mark_shadowed(const moe_layer *moe, const moe_shadow_plan *plan);

/* The shadowed experts' weights from their owners (ag_shadow_pack), as views. */
void moe_shadow_weights(ag_ctx *ctx, const moe_layer *moe, const moe_shadow_plan *plan,
                        moe_expert_weights *weights);

/* Each shadowed position's global token and expert, for the dropout masks. */
void moe_shadow_rows(const moe_shadow_plan *plan, uint64_t first_token, uint64_t *row_token,
                     int32_t *row_expert);

#endif
