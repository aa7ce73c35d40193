/* AdamW over the flat parameter buffers (see optim.h for the exact update). */
#include <math.h>

#include "optim/optim.h"

optim_adamw_config optim_adamw_defaults(void) {
    return (optim_adamw_config){.beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8, .weight_decay = 0.01};
}

/* The per-step scalars, computed once in double as torch does in Python. */
typedef struct adamw_scalars {
    float one_minus_beta1, beta2, one_minus_beta2;
    float step_size;  /* lr / (1 - beta1^t) */
    float sqrt_bias2; /* sqrt(1 - beta2^t) */
    float eps;
} adamw_scalars;

/* p, g, m, v [n]: one fused pass over a parameter's span. The arithmetic is
 * ordered as in torch's single-tensor AdamW (p *= 1 - lr wd; m by lerp; v by
 * mul
 * + addcmul; then addcdiv), so results agree with it to within rounding.
 * decay_factor is exactly 1 for no_decay parameters, and p * 1.0f == p. */
static void adamw_span(float *restrict p, const float *restrict g, float *restrict m,
                       float *restrict v, int64_t n, const adamw_scalars *s, float decay_factor) {
    for (int64_t i = 0; i < n; i++) {
        float p_i = p[i] * decay_factor;
        float m_i = m[i] + s->one_minus_beta1 * (g[i] - m[i]); /* = beta1 m + (1-beta1) g */
        float v_i = s->beta2 * v[i] + s->one_minus_beta2 * g[i] * g[i];
        m[i] = m_i;
        v[i] = v_i;
        p[i] = p_i - s->step_size * (m_i / (sqrtf(v_i) / s->sqrt_bias2 + s->eps));
    }
}

void optim_adamw_step(ag_params *params, const optim_adamw_config *config, double lr,
                      optim_state *state) {
    state->step++;
    double t = (double)state->step;
    double bias1 = 1.0 - pow(config->beta1, t);
    double bias2 = 1.0 - pow(config->beta2, t);
    adamw_scalars s = {
        .one_minus_beta1 = (float)(1.0 - config->beta1),
        .beta2 = (float)config->beta2,
        .one_minus_beta2 = (float)(1.0 - config->beta2),
        .step_size = (float)(lr / bias1),
        .sqrt_bias2 = (float)sqrt(bias2),
        .eps = (float)config->eps,
    };
    float decay_factor = (float)(1.0 - lr * config->weight_decay);
    for (int i = 0; i < params->count; i++) {
        ag_param *param = params->items[i];
        if (param->frozen) continue;
        ag_param_buffer *buffer = &params->buffers[param->group];
        size_t at = param->offset;
        adamw_span(buffer->data + at, buffer->grad + at, buffer->m + at, buffer->v + at,
                   param->tensor.numel, &s, param->no_decay ? 1.0f : decay_factor);
    }
}
