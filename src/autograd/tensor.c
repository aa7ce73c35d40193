#include "autograd/tensor.h"

#include <stdio.h>

#include "common/check.h"

void ag_tensor_set_shape(ag_tensor *t, int ndim, const int *shape) {
    CM_ASSERT(ndim >= 1 && ndim <= AG_MAX_DIMS, "tensor rank %d not in [1,%d]", ndim, AG_MAX_DIMS);
    t->ndim = ndim;
    t->numel = 1;
    for (int i = 0; i < AG_MAX_DIMS; i++) {
        t->shape[i] = i < ndim ? shape[i] : 1;
        if (i < ndim) {
            CM_ASSERT(shape[i] >= 0, "negative size %d in dimension %d", shape[i], i);
            t->numel *= shape[i];
        }
    }
}

ag_tensor ag_tensor_wrap(float *data, float *grad, int ndim, const int *shape, bool requires_grad) {
    ag_tensor t = {0};
    ag_tensor_set_shape(&t, ndim, shape);
    t.data = data;
    t.grad = grad;
    t.requires_grad = requires_grad;
    return t;
}

bool ag_same_shape(const ag_tensor *a, const ag_tensor *b) {
    if (a->ndim != b->ndim) return false;
    for (int i = 0; i < a->ndim; i++)
        if (a->shape[i] != b->shape[i]) return false;
    return true;
}

int ag_last_dim(const ag_tensor *t) {
    return t->shape[t->ndim - 1];
}

int64_t ag_rows(const ag_tensor *t) {
    int last = ag_last_dim(t);
    return last ? t->numel / last : 0;
}

const char *ag_shape_str(const ag_tensor *t, char *buf, size_t size) {
    size_t n = (size_t)snprintf(buf, size, "[");
    for (int i = 0; i < t->ndim && n < size; i++)
        n += (size_t)snprintf(buf + n, size - n, i ? ",%d" : "%d", t->shape[i]);
    if (n < size) snprintf(buf + n, size - n, "]");
    return buf;
}
