/* Global gradient norm and norm clipping over both parameter groups. */
#include <math.h>

#include "optim/optim.h"

void optim_grad_sq_norm_local(const ag_params *params, double group_sq[AG_NUM_GROUPS]) {
    for (int g = 0; g < AG_NUM_GROUPS; g++) group_sq[g] = 0.0;
    for (int i = 0; i < params->count; i++) {
        const ag_param *param = params->items[i];
        if (param->frozen) continue;
        const float *grad = params->buffers[param->group].grad + param->offset;
        double sum = 0.0;
        for (int64_t j = 0; j < param->tensor.numel; j++) sum += (double)grad[j] * grad[j];
        group_sq[param->group] += sum;
    }
}

cm_status optim_grad_norm_reduced(const ag_params *params, const optim_norm_reducer *reducer,
                                  double *norm) {
    double group_sq[AG_NUM_GROUPS];
    optim_grad_sq_norm_local(params, group_sq);
    if (reducer && reducer->fn) CM_TRY(reducer->fn(group_sq, reducer->user));
    double total = 0.0;
    for (int g = 0; g < AG_NUM_GROUPS; g++) total += group_sq[g];
    *norm = sqrt(total);
    return CM_OK;
}

double optim_grad_norm(const ag_params *params) {
    double norm = 0.0;
    optim_grad_norm_reduced(params, NULL, &norm); /* cannot fail without a reducer */
    return norm;
}

cm_status optim_clip_grad_norm_reduced(ag_params *params, double max_norm,
                                       const optim_norm_reducer *reducer, double *norm_before) {
    if (!(max_norm > 0.0))
        return CM_ERR(CM_ERR_INVALID, "gradient clipping needs max_norm > 0, got %g", max_norm);
    double norm = 0.0;
    CM_TRY(optim_grad_norm_reduced(params, reducer, &norm));
    if (norm_before) *norm_before = norm;
    if (!isfinite(norm))
        return CM_ERR(CM_ERR_NUMERIC, "gradient norm is %g; gradients left unclipped", norm);
    if (norm <= max_norm) return CM_OK;
    float scale = (float)(max_norm / norm);
    for (int i = 0; i < params->count; i++) {
        ag_param *param = params->items[i];
        if (param->frozen) continue;
        float *grad = params->buffers[param->group].grad + param->offset;
        for (int64_t j = 0; j < param->tensor.numel; j++) grad[j] *= scale;
    }
    return CM_OK;
}

cm_status optim_clip_grad_norm(ag_params *params, double max_norm, double *norm_before) {
    return optim_clip_grad_norm_reduced(params, max_norm, NULL, norm_before);
}
