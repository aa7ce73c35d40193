/* The pointwise activations and their derivatives, shared by the
 * elementwise ops (ops_elementwise.c) and the fused expert op
 * (ag_grouped_linear_act in ops_moe.c), so both compute the same values. */
#ifndef CMOE_AUTOGRAD_ACTIVATIONS_H
#define CMOE_AUTOGRAD_ACTIVATIONS_H

#include "autograd/fastmath.h"

#define AG_GELU_SQRT_2_OVER_PI 0.7978845608028654f
#define AG_GELU_CUBIC          0.044715f

/* GELU, tanh form: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) */
static inline float ag_gelu_value(float x) {
    return 0.5f * x * (1.0f + cm_tanhf(AG_GELU_SQRT_2_OVER_PI * (x + AG_GELU_CUBIC * x * x * x)));
}
static inline float ag_gelu_derivative(float x) {
    float t = cm_tanhf(AG_GELU_SQRT_2_OVER_PI * (x + AG_GELU_CUBIC * x * x * x));
    float dinner = AG_GELU_SQRT_2_OVER_PI * (1.0f + 3.0f * AG_GELU_CUBIC * x * x);
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * dinner;
}

/* ReLU; the derivative at 0 is taken as 0 */
static inline float ag_relu_value(float x) {
    return x > 0.0f ? x : 0.0f;
}
static inline float ag_relu_derivative(float x) {
    return x > 0.0f ? 1.0f : 0.0f;
}

/* SiLU: x sigmoid(x); derivative s (1 + x (1 - s)) */
static inline float ag_silu_value(float x) {
    return x * cm_sigmoidf(x);
}
static inline float ag_silu_derivative(float x) {
    float s = cm_sigmoidf(x);
    return s * (1.0f + x * (1.0f - s));
}

#endif
