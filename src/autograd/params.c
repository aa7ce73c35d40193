#include "autograd/params.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/rng.h"
#include "common/check.h"

enum { PARAM_ALIGN_FLOATS = 16 }; /* 64 bytes */

void ag_params_init(ag_params *params) {
    memset(params, 0, sizeof *params);
}

void ag_params_free(ag_params *params) {
    for (int i = 0; i < params->count; i++) {
        free(params->items[i]->slice_used);
        free(params->items[i]->slice_steps);
        free(params->items[i]);
    }
    free(params->items);
    for (int g = 0; g < AG_NUM_GROUPS; g++) {
        ag_param_buffer *buffer = &params->buffers[g];
        free(buffer->data);
        free(buffer->grad);
        free(buffer->m);
        free(buffer->v);
    }
    memset(params, 0, sizeof *params);
}

cm_status ag_params_declare(ag_params *params, const char *name, ag_group group, int ndim,
                            const int *shape, ag_init init, ag_param **out) {
    if (params->finalized)
        return CM_ERR(CM_ERR_INTERNAL, "parameter '%s' declared after finalize", name);
    if (strlen(name) >= AG_PARAM_NAME_MAX)
        return CM_ERR(CM_ERR_INVALID, "parameter name too long: '%s'", name);
    if (ndim < 1 || ndim > AG_MAX_DIMS)
        return CM_ERR(CM_ERR_INVALID, "parameter '%s' has rank %d", name, ndim);
    for (int i = 0; i < ndim; i++)
        if (shape[i] <= 0)
            return CM_ERR(CM_ERR_INVALID, "parameter '%s' has size %d in dimension %d", name,
                          shape[i], i);
    if (ag_params_find(params, name))
        return CM_ERR(CM_ERR_INVALID, "parameter '%s' declared twice", name);
    if (params->count == params->capacity) {
        int capacity = params->capacity ? 2 * params->capacity : 64;
        ag_param **items = realloc(params->items, (size_t)capacity * sizeof *items);
        if (!items) return CM_ERR(CM_ERR_NOMEM, "out of memory declaring parameters");
        params->items = items;
        params->capacity = capacity;
    }
    ag_param *param = calloc(1, sizeof *param);
    if (!param) return CM_ERR(CM_ERR_NOMEM, "out of memory declaring parameters");
    snprintf(param->name, sizeof param->name, "%s", name);
    param->group = group;
    param->init = init;
    ag_tensor_set_shape(&param->tensor, ndim, shape);
    param->tensor.requires_grad = true;
    param->tensor.name = param->name;
    params->items[params->count++] = param;
    if (out) *out = param;
    return CM_OK;
}

static void init_values(const ag_param *param, uint64_t seed, float *data) {
    cm_rng_key key = {seed, 0, cm_hash32(param->name), CM_RNG_INIT};
    int64_t n = param->tensor.numel;
    switch (param->init.kind) {
    case AG_INIT_ZERO:
        memset(data, 0, (size_t)n * sizeof(float));
        break;
    case AG_INIT_CONSTANT:
        for (int64_t i = 0; i < n; i++) data[i] = param->init.a;
        break;
    case AG_INIT_NORMAL:
        cm_rng_fill_normal(key, param->init_index_offset, n, param->init.a, param->init.b, data);
        break;
    case AG_INIT_UNIFORM:
        cm_rng_fill_uniform(key, param->init_index_offset, n, param->init.a, param->init.b, data);
        break;
    case AG_INIT_INDEX:
        for (int64_t i = 0; i < n; i++)
            data[i] = param->init.a + (float)(param->init_index_offset + (uint64_t)i);
        break;
    }
}

cm_status ag_params_finalize(ag_params *params, uint64_t seed) {
    if (params->finalized) return CM_ERR(CM_ERR_INTERNAL, "parameters finalized twice");
    size_t sizes[AG_NUM_GROUPS] = {0};
    for (int i = 0; i < params->count; i++) {
        ag_param *param = params->items[i];
        param->offset = sizes[param->group];
        size_t n = (size_t)param->tensor.numel;
        sizes[param->group] +=
            (n + PARAM_ALIGN_FLOATS - 1) / PARAM_ALIGN_FLOATS * PARAM_ALIGN_FLOATS;
    }
    for (int g = 0; g < AG_NUM_GROUPS; g++) {
        ag_param_buffer *buffer = &params->buffers[g];
        buffer->numel = sizes[g];
        size_t bytes = (sizes[g] ? sizes[g] : 1) * sizeof(float);
        buffer->data = calloc(1, bytes);
        buffer->grad = calloc(1, bytes);
        buffer->m = calloc(1, bytes);
        buffer->v = calloc(1, bytes);
        if (!buffer->data || !buffer->grad || !buffer->m || !buffer->v)
            return CM_ERR(CM_ERR_NOMEM, "cannot allocate %zu MiB of parameters", 4 * bytes >> 20);
    }
    for (int i = 0; i < params->count; i++) {
        ag_param *param = params->items[i];
        ag_param_buffer *buffer = &params->buffers[param->group];
        param->tensor.data = buffer->data + param->offset;
        param->tensor.grad = buffer->grad + param->offset;
        init_values(param, seed, param->tensor.data);
        if (param->group != AG_GROUP_EXPERT || param->tensor.ndim < 1) continue;
        param->slices = param->tensor.shape[0];
        param->slice_used = calloc((size_t)param->slices + 1, 1);
        param->slice_steps = calloc((size_t)param->slices + 1, sizeof(int64_t));
        if (!param->slice_used || !param->slice_steps)
            return CM_ERR(CM_ERR_NOMEM, "out of memory for %s", param->name);
    }
    params->finalized = true;
    return CM_OK;
}

ag_param *ag_params_find(const ag_params *params, const char *name) {
    for (int i = 0; i < params->count; i++)
        if (strcmp(params->items[i]->name, name) == 0) return params->items[i];
    return NULL;
}

void ag_params_zero_grad(ag_params *params) {
    for (int g = 0; g < AG_NUM_GROUPS; g++)
        if (params->buffers[g].grad)
            memset(params->buffers[g].grad, 0, params->buffers[g].numel * sizeof(float));
    for (int i = 0; i < params->count; i++)
        if (params->items[i]->slice_used)
            memset(params->items[i]->slice_used, 0, (size_t)params->items[i]->slices);
}

int64_t ag_params_count(const ag_params *params, ag_group group) {
    int64_t total = 0;
    for (int i = 0; i < params->count; i++)
        if (params->items[i]->group == group) total += params->items[i]->tensor.numel;
    return total;
}

void ag_param_set_frozen(ag_param *param, bool frozen) {
    param->frozen = frozen;
    param->tensor.requires_grad = !frozen;
}
