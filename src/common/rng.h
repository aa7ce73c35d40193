/* Counter-based random numbers (Philox-4x32-10).
 *
 * Every draw is a pure function of a key (seed, step, layer, purpose) and a
 * 64-bit index, usually the global element or token index. There is no hidden
 * generator state: the same draw comes out whether the job runs on 1 or N
 * ranks, and a resumed run needs only the seed and the step to continue bit
 * for bit (DESIGN.md core idea 6). */
#ifndef CMOE_COMMON_RNG_H
#define CMOE_COMMON_RNG_H

#include <stdint.h>

typedef enum cm_rng_purpose {
    CM_RNG_INIT = 1, /* parameter initialisation */
    CM_RNG_DROPOUT,
    CM_RNG_DATA, /* batch sampling */
    CM_RNG_ROUTER,
    CM_RNG_NOISE, /* noisy gating */
    CM_RNG_AUGMENT,
    CM_RNG_ATTACK, /* PGD random start */
    CM_RNG_TEST,
    CM_RNG_EXPERT_DROPOUT, /* the MoE experts' hidden units (layers/moe.c) */
    CM_RNG_SAMPLE,         /* bytes drawn by cmoe sample, indexed by output position */
    CM_RNG_UPCYCLE,        /* Drop-Upcycling's unit sets and re-drawn weights (train/upcycle.c) */
    CM_RNG_MERGE,          /* cmoe merge's random groups (train/merge_plan.c) */
} cm_rng_purpose;

typedef struct cm_rng_key {
    uint64_t seed;
    uint64_t step;
    uint32_t layer;
    uint32_t purpose;
} cm_rng_key;

/* The raw Philox-4x32 bijection with 10 rounds (Salmon et al., SC'11). */
void cm_philox4x32_10(const uint32_t counter[4], const uint32_t key[2], uint32_t out[4]);

/* 128 random bits for (key, index). */
void cm_rng_block(cm_rng_key key, uint64_t index, uint32_t out[4]);
uint64_t cm_rng_u64(cm_rng_key key, uint64_t index);
float cm_rng_uniform(cm_rng_key key, uint64_t index); /* [0, 1) */
float cm_rng_normal(cm_rng_key key, uint64_t index);  /* mean 0, std 1 */

/* out[i] uses index first_index + i and equals the single draw at that
 * index; bulk uniform fills take one Philox block per four values. */
void cm_rng_fill_uniform(cm_rng_key key, uint64_t first_index, int64_t n, float low, float high,
                         float *out);
void cm_rng_fill_normal(cm_rng_key key, uint64_t first_index, int64_t n, float mean, float std,
                        float *out);
/* out[i] = 1 with probability p, else 0. */
void cm_rng_fill_bernoulli(cm_rng_key key, uint64_t first_index, int64_t n, float p, float *out);
/* A uniform integer in [0, n) for (key, index); n > 0. */
uint64_t cm_rng_below(cm_rng_key key, uint64_t index, uint64_t n);
/* out = a uniformly random permutation of 0..n-1 (Fisher-Yates). */
void cm_rng_permutation(cm_rng_key key, int32_t n, int32_t *out);

/* FNV-1a of a string, for keying draws by name (parameter init). */
uint32_t cm_hash32(const char *text);

#endif
