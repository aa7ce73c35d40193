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

static adamw_scalars scalars_at(const optim_adamw_config *config, double lr, int64_t step) {
    double t = (double)step;
    double bias1 = 1.0 - pow(config->beta1, t);
    double bias2 = 1.0 - pow(config->beta2, t);
    return (adamw_scalars){
        .one_minus_beta1 = (float)(1.0 - config->beta1),
        .beta2 = (float)config->beta2,
        .one_minus_beta2 = (float)(1.0 - config->beta2),
        .step_size = (float)(lr / bias1),
        .sqrt_bias2 = (float)sqrt(bias2),
        .eps = (float)config->eps,
    };
}

/* An expert parameter, slice by slice, each with its own step count. */
static void adamw_slices(ag_params *params, ag_param *param, const optim_adamw_config *config,
                         double lr, const optim_state *state, bool skip_unused,
                         float decay_factor) {
    ag_param_buffer *buffer = &params->buffers[param->group];
    const int64_t n = param->tensor.numel / param->slices;
    for (int j = 0; j < param->slices; j++) {
        if (skip_unused && !param->slice_used[j]) continue;
        param->slice_steps[j] = skip_unused ? param->slice_steps[j] + 1 : state->step;
        adamw_scalars s = scalars_at(config, lr, param->slice_steps[j]);
        size_t at = param->offset + (size_t)(j * n);
        adamw_span(buffer->data + at, buffer->grad + at, buffer->m + at, buffer->v + at, n, &s,
                   decay_factor);
    }
}

void optim_adamw_update(ag_params *params, const optim_adamw_config *config, double lr,
                        optim_state *state, bool skip_unused) {
    state->step++;
    adamw_scalars s = scalars_at(config, lr, state->step);
    float decay_factor = (float)(1.0 - lr * config->weight_decay);
    for (int i = 0; i < params->count; i++) {
        ag_param *param = params->items[i];
        if (param->frozen) continue;
        float decay = param->no_decay ? 1.0f : decay_factor;
        if (param->slices > 0) {
            adamw_slices(params, param, config, lr, state, skip_unused, decay);
            continue;
        }
        ag_param_buffer *buffer = &params->buffers[param->group];
        size_t at = param->offset;
        adamw_span(buffer->data + at, buffer->grad + at, buffer->m + at, buffer->v + at,
                   param->tensor.numel, &s, decay);
    }
}

void optim_adamw_step(ag_params *params, const optim_adamw_config *config, double lr,
                      optim_state *state) {
    optim_adamw_update(params, config, lr, state, false);
}
