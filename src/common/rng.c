#include "common/rng.h"

#include <math.h>

/* Philox-4x32 round constants (Salmon et al., SC'11). */
#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u

static uint64_t mix64(uint64_t x) {
    x ^= x >> 30;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 27;
    x *= 0x94D049BB133111EBull;
    x ^= x >> 31;
    return x;
}

void cm_philox4x32_10(const uint32_t counter[4], const uint32_t key[2], uint32_t out[4]) {
    uint32_t c0 = counter[0], c1 = counter[1], c2 = counter[2], c3 = counter[3];
    uint32_t k0 = key[0], k1 = key[1];
    for (int round = 0; round < 10; round++) {
        uint64_t p0 = (uint64_t)PHILOX_M0 * c0;
        uint64_t p1 = (uint64_t)PHILOX_M1 * c2;
        uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0;
        uint32_t n1 = (uint32_t)p1;
        uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
        uint32_t n3 = (uint32_t)p0;
        c0 = n0, c1 = n1, c2 = n2, c3 = n3;
        k0 += PHILOX_W0;
        k1 += PHILOX_W1;
    }
    out[0] = c0, out[1] = c1, out[2] = c2, out[3] = c3;
}

void cm_rng_block(cm_rng_key key, uint64_t index, uint32_t out[4]) {
    /* 64-bit Philox key from (seed, layer, purpose); counter = (index, step). */
    uint64_t k = mix64(key.seed ^ mix64(((uint64_t)key.layer << 32 | key.purpose) + 1));
    const uint32_t philox_key[2] = {(uint32_t)k, (uint32_t)(k >> 32)};
    const uint32_t counter[4] = {(uint32_t)index, (uint32_t)(index >> 32), (uint32_t)key.step,
                                 (uint32_t)(key.step >> 32)};
    cm_philox4x32_10(counter, philox_key, out);
}

uint64_t cm_rng_u64(cm_rng_key key, uint64_t index) {
    uint32_t bits[4];
    cm_rng_block(key, index, bits);
    return (uint64_t)bits[0] << 32 | bits[1];
}

/* 24 random bits -> [0, 1) exactly representable in float. */
static float bits_to_unit(uint32_t bits) {
    return (float)(bits >> 8) * (1.0f / 16777216.0f);
}

/* Uniform draws use one 32-bit word each: index i is word i % 4 of the block
 * at counter i / 4, so bulk fills cost one Philox call per four values and
 * every value is still a pure function of (key, i). */
float cm_rng_uniform(cm_rng_key key, uint64_t index) {
    uint32_t bits[4];
    cm_rng_block(key, index >> 2, bits);
    return bits_to_unit(bits[index & 3]);
}

float cm_rng_normal(cm_rng_key key, uint64_t index) {
    uint32_t bits[4];
    cm_rng_block(key, index >> 1, bits);
    /* Box-Muller on two 32-bit uniforms (words 0,1 or 2,3 of the block); the
     * first in (0, 1] keeps the log finite. */
    const uint32_t *pair = bits + 2 * (index & 1);
    double u1 = ((double)pair[0] + 1.0) / 4294967296.0;
    double u2 = (double)pair[1] / 4294967296.0;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

void cm_rng_fill_uniform(cm_rng_key key, uint64_t first_index, int64_t n, float low, float high,
                         float *out) {
    const float range = high - low;
    int64_t i = 0;
    while (i < n) {
        uint64_t index = first_index + (uint64_t)i;
        uint32_t bits[4];
        cm_rng_block(key, index >> 2, bits);
        for (unsigned word = (unsigned)(index & 3); word < 4 && i < n; word++, i++)
            out[i] = low + range * bits_to_unit(bits[word]);
    }
}

void cm_rng_fill_normal(cm_rng_key key, uint64_t first_index, int64_t n, float mean, float std,
                        float *out) {
    for (int64_t i = 0; i < n; i++)
        out[i] = mean + std * cm_rng_normal(key, first_index + (uint64_t)i);
}

void cm_rng_fill_bernoulli(cm_rng_key key, uint64_t first_index, int64_t n, float p, float *out) {
    cm_rng_fill_uniform(key, first_index, n, 0.0f, 1.0f, out);
    for (int64_t i = 0; i < n; i++) out[i] = out[i] < p ? 1.0f : 0.0f;
}

uint64_t cm_rng_below(cm_rng_key key, uint64_t index, uint64_t n) {
    /* Multiply-shift on 64 bits: bias below 2^-32 for any n < 2^32. */
    return (uint64_t)(((unsigned __int128)cm_rng_u64(key, index) * n) >> 64);
}

void cm_rng_permutation(cm_rng_key key, int32_t n, int32_t *out) {
    for (int32_t i = 0; i < n; i++) out[i] = i;
    for (int32_t i = n - 1; i > 0; i--) {
        int32_t j = (int32_t)cm_rng_below(key, (uint64_t)i, (uint64_t)i + 1);
        int32_t tmp = out[i];
        out[i] = out[j];
        out[j] = tmp;
    }
}

uint32_t cm_hash32(const char *text) {
    uint32_t hash = 2166136261u;
    for (; *text; text++) hash = (hash ^ (uint8_t)*text) * 16777619u;
    return hash;
}
