/* Vectorisable elementary functions for the hot elementwise loops.
 *
 * libm's expf/tanhf are calls the compiler cannot vectorise, and in GELU they
 * took a quarter of a training step. cm_expf is plain arithmetic (range
 * reduction to [-ln2/2, ln2/2], a degree-6 polynomial, the power of two built
 * in the exponent bits), so loops that use it vectorise; its relative error is
 * below 3e-7 over the clamped range. Inputs are clamped to [-87.3, 88.3]:
 * results below ~1e-38 flush to that value instead of 0, larger ones
 * saturate at ~2.2e38 instead of inf. A NaN input gives NaN. */
#ifndef CMOE_AUTOGRAD_FASTMATH_H
#define CMOE_AUTOGRAD_FASTMATH_H

#include <stdint.h>

static inline float cm_expf(float x) {
    x = x < -87.3f ? -87.3f : x;
    x = x > 88.3f ? 88.3f : x;
    /* n = round(x / ln2) by the 1.5 * 2^23 trick (valid for |n| < 2^22). */
    const float shifter = 12582912.0f;
    float n = (x * 1.44269504088896341f + shifter) - shifter;
    /* r = x - n ln2, with ln2 split in two for accuracy. */
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    /* A NaN input gives a NaN p; its exponent must not reach the float to
     * int conversion (undefined, and the sanitizer build aborts on it). */
    float exponent = n == n ? n : 0.0f;
    union {
        uint32_t bits;
        float value;
    } scale = {.bits = (uint32_t)((int32_t)exponent + 127) << 23};
    return p * scale.value;
}

/* tanh(x) = 1 - 2 / (1 + e^{2x}); absolute error below 1e-6. */
static inline float cm_tanhf(float x) {
    return 1.0f - 2.0f / (1.0f + cm_expf(2.0f * x));
}

/* 1 / (1 + e^{-x}) */
static inline float cm_sigmoidf(float x) {
    return 1.0f / (1.0f + cm_expf(-x));
}

#endif
