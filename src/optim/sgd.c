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

void optim_sgd_update(ag_params *params, const optim_sgd_config *config, double lr,
                      optim_state *state, bool skip_unused) {
    state->step++;
    for (int i = 0; i < params->count; i++) {
        ag_param *param = params->items[i];
        if (param->frozen) continue;
        ag_param_buffer *buffer = &params->buffers[param->group];
        float weight_decay = param->no_decay ? 0.0f : (float)config->weight_decay;
        const int slices = param->slices > 0 ? param->slices : 1;
        const int64_t n = param->tensor.numel / slices;
        for (int j = 0; j < slices; j++) {
            if (param->slices > 0) {
                if (skip_unused && !param->slice_used[j]) continue;
                param->slice_steps[j] = skip_unused ? param->slice_steps[j] + 1 : state->step;
            }
            size_t at = param->offset + (size_t)(j * n);
            sgd_span(buffer->data + at, buffer->grad + at, buffer->m + at, n, (float)lr,
                     (float)config->momentum, weight_decay, config->nesterov);
        }
    }
}

void optim_sgd_step(ag_params *params, const optim_sgd_config *config, double lr,
                    optim_state *state) {
    optim_sgd_update(params, config, lr, state, false);
}
