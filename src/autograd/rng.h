/* Counter-based random numbers (Philox-4x32-10).
 *
 * Every draw is a pure function of a key (seed, step, layer, purpose) and a
 * 64-bit index, usually the global element or token index. There is no hidden
 * generator state: the same draw comes out whether the job runs on 1 or N
 * ranks, and a resumed run needs only the seed and the step to continue bit
 * for bit (DESIGN.md core idea 6). */
#ifndef CMOE_AUTOGRAD_RNG_H
#define CMOE_AUTOGRAD_RNG_H

#include <stdint.h>

typedef enum ag_rng_purpose {
    AG_RNG_INIT = 1, /* parameter initialisation */
    AG_RNG_DROPOUT,
    AG_RNG_DATA, /* batch sampling */
    AG_RNG_ROUTER,
    AG_RNG_NOISE, /* noisy gating */
    AG_RNG_AUGMENT,
    AG_RNG_ATTACK, /* PGD random start */
    AG_RNG_TEST,
} ag_rng_purpose;

typedef struct ag_rng_key {
    uint64_t seed;
    uint64_t step;
    uint32_t layer;
    uint32_t purpose;
} ag_rng_key;

/* The raw Philox-4x32 bijection with 10 rounds (Salmon et al., SC'11). */
void ag_philox4x32_10(const uint32_t counter[4], const uint32_t key[2], uint32_t out[4]);

/* 128 random bits for (key, index). */
void ag_rng_block(ag_rng_key key, uint64_t index, uint32_t out[4]);
uint64_t ag_rng_u64(ag_rng_key key, uint64_t index);
float ag_rng_uniform(ag_rng_key key, uint64_t index); /* [0, 1) */
float ag_rng_normal(ag_rng_key key, uint64_t index);  /* mean 0, std 1 */

/* out[i] uses index first_index + i and equals the single draw at that
 * index; bulk uniform fills take one Philox block per four values. */
void ag_rng_fill_uniform(ag_rng_key key, uint64_t first_index, int64_t n, float low, float high,
                         float *out);
void ag_rng_fill_normal(ag_rng_key key, uint64_t first_index, int64_t n, float mean, float std,
                        float *out);
/* out[i] = 1 with probability p, else 0. */
void ag_rng_fill_bernoulli(ag_rng_key key, uint64_t first_index, int64_t n, float p, float *out);
/* A uniform integer in [0, n) for (key, index); n > 0. */
uint64_t ag_rng_below(ag_rng_key key, uint64_t index, uint64_t n);
/* out = a uniformly random permutation of 0..n-1 (Fisher-Yates). */
void ag_rng_permutation(ag_rng_key key, int32_t n, int32_t *out);

/* FNV-1a of a string, for keying draws by name (parameter init). */
uint32_t ag_hash32(const char *text);

#endif
