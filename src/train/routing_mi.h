/* Cross-layer routing dependence (METHODS.md 9.7): how much a token's top-1
 * expert at one MoE layer says about its top-1 expert at the next, as the
 * mutual information of the co-occurrence counts of consecutive layers'
 * choices over an evaluation. Evaluation lines report it as
 * "layer_top1_mi" (bits; 0: independent choices, log2 E at most).
 * Owns nothing: the counts are the caller's. */
#ifndef CMOE_TRAIN_ROUTING_MI_H
#define CMOE_TRAIN_ROUTING_MI_H

#include <stdint.h>

#include "layers/transformer.h"

/* For each pair of consecutive MoE layers (i, i+1) of one forward's report
 * and each token with a slot at both, adds 1 to counts[i][a][b] (counts
 * [n_layers-1][E][E]), a and b the token's top-1 experts: its slot with the
 * largest gate, ties to the lower expert. */
void routing_count_top1_pairs(const lm_moe_report *report, int experts, int64_t *counts);

/* The mean over the `pairs` layer pairs with any count of the mutual
 * information, in bits, of the empirical joint distribution counts[i]
 * [E][E]; NAN when no pair has a count. */
double routing_top1_mutual_information(const int64_t *counts, int pairs, int experts);

#endif
