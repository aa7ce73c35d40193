/* Incremental decoding of the byte LM (layers/transformer.h) with a
 * key/value cache: each new byte costs one position's forward, not a
 * recompute of the whole context.
 *
 *   byte at position t -> x = wte[byte] + wpe[t]
 *     -> per layer: ln1 -> qkv [3D]; k, v appended to the layer's cache
 *        [context, D]; each head attends over cache rows 0..t (scale
 *        1/sqrt(Dh), the causal mask is the cache length); proj; residual;
 *        ln2 -> MLP (GELU, tanh form) or the MoE layer; residual
 *     -> ln_f -> head -> logits [V] of the byte at t + 1
 * The same math as lm_forward in evaluation mode (no dropout), on plain
 * float buffers with cblas_sgemv for the products; no tape. The weights are
 * read in place from the model's parameters, which must outlive the decoder.
 *
 * MoE layers route the one new token with the model's own router
 * (router_route on a [1,D] input, no-grad, eval mode): top-k with either
 * gating, SMoE-Dropout at its eval k, top-p, and THOR's inference draws
 * keyed by (seed, step 0, layer) and the token's position, as `cmoe eval`
 * keys them for a window starting at byte 0 (per sequence: one expert for
 * the whole context; per token: one per position). Expert choice is refused:
 * its experts pick tokens from the whole batch, so it is not causal and a
 * token at a time cannot reproduce it. A router with a capacity factor is
 * decoded dropless (one token never overflows an expert). RMoE carries the
 * token's router state from one MoE layer to the next, as lm_forward does.
 * Owns: the caches, the window's bytes and scratch buffers (allocated at
 * create). */
#ifndef CMOE_LAYERS_LM_DECODE_H
#define CMOE_LAYERS_LM_DECODE_H

#include <stdint.h>

#include "common/status.h"
#include "layers/transformer.h"

typedef struct lm_decoder lm_decoder;

typedef struct lm_decode_options {
    uint64_t seed;  /* the run seed (train.seed): THOR's inference draws */
    int k_override; /* > 0: routers that take a k use this one (router.eval_k) */
} lm_decode_options;

/* A decoder over `model` with an empty cache that holds up to
 * model->config.max_seq positions. CM_ERR_INVALID for a router that cannot
 * decode causally (expert choice) or an expert-parallel model. */
cm_status lm_decoder_create(const lm_model *model, const lm_decode_options *options,
                            lm_decoder **out);
void lm_decoder_free(lm_decoder *decoder);

/* Empties the cache: the next byte goes to position 0. */
void lm_decoder_reset(lm_decoder *decoder);
/* Positions in the cache (the next byte's position). */
int lm_decoder_length(const lm_decoder *decoder);
/* Positions the cache holds at most (max_seq). */
int lm_decoder_capacity(const lm_decoder *decoder);

/* Feeds `byte` at position lm_decoder_length() and writes the logits [V]
 * of the next byte to `logits` (may be NULL when only the cache matters).
 * CM_ERR_INVALID when the cache is full or byte is not in [0, V). */
cm_status lm_decoder_step(lm_decoder *decoder, int32_t byte, float *logits);

/* A sliding window over an unbounded text: like lm_decoder_step, but when
 * the cache is full it first drops the oldest half of the window (keeps the
 * newest capacity / 2 bytes), empties the cache and re-encodes the kept
 * bytes from position 0, so every position stays within the learned table
 * (max_seq). The byte then goes after them. */
cm_status lm_decoder_push(lm_decoder *decoder, int32_t byte, float *logits);
/* Times lm_decoder_push slid the window since create. */
int64_t lm_decoder_slides(const lm_decoder *decoder);

/* A token drawn from softmax(logits / temperature) over the top_k largest
 * logits (0: all of them; entries equal to the k-th largest are kept too),
 * by inverting the cumulative distribution at `uniform` in [0, 1) in token
 * order. temperature > 0; scratch holds vocab floats. */
int lm_sample_logits(const float *logits, int vocab, float temperature, int top_k, float uniform,
                     float *scratch);

#endif
