/* SGD with momentum over the flat parameter buffers (see optim.h for the exact
 * update). The momentum buffer is the registry's m mirror; v is unused. */
#include "optim/optim.h"

/* p, g, buf [n]: one fused pass over a parameter's span; g is only read. */
static void sgd_span(float *restrict p, const float *restrict g, float *restrict buf, int64_t n,
                     float lr, float momentum, float weight_decay, bool nesterov) {
    for (int64_t i = 0; i < n; i++) {
        float d_p = g[i] + weight_decay * p[i];
        float b = momentum * buf[i] + d_p;
        buf[i] = b;
        p[i] -= lr * (nesterov ? d_p + momentum * b : b);
    }
}

void optim_sgd_step(ag_params *params, const optim_sgd_config *config, double lr,
                    optim_state *state) {
    state->step++;
    for (int i = 0; i < params->count; i++) {
        ag_param *param = params->items[i];
        if (param->frozen) continue;
        ag_param_buffer *buffer = &params->buffers[param->group];
        size_t at = param->offset;
        float weight_decay = param->no_decay ? 0.0f : (float)config->weight_decay;
        sgd_span(buffer->data + at, buffer->grad + at, buffer->m + at, param->tensor.numel,
                 (float)lr, (float)config->momentum, weight_decay, config->nesterov);
    }
}
