/* The tensor: float32, up to 4 dimensions, row-major, outermost first.
 *
 * A tensor either views a slice of a flat parameter buffer (params.h) or was
 * created by an op during the current step, with its data in the step arena.
 * `grad`, when not NULL, has the same layout as `data`; gradients always
 * accumulate into it (+=). A tensor does not own its memory. */
#ifndef CMOE_AUTOGRAD_TENSOR_H
#define CMOE_AUTOGRAD_TENSOR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum { AG_MAX_DIMS = 4 };

typedef struct ag_tensor {
    int ndim;
    int shape[AG_MAX_DIMS];
    int64_t numel;
    float *data;
    float *grad;        /* NULL until backward needs it (parameters: always set) */
    bool requires_grad; /* leaf: set by its owner; op output: any input requires it */
    const char *name;   /* parameter name or op name, for dumps and messages */
} ag_tensor;

/* Fills in the shape fields of `t` (data and grad untouched). */
void ag_tensor_set_shape(ag_tensor *t, int ndim, const int *shape);
/* Wraps caller-owned buffers as a tensor (grad may be NULL). */
ag_tensor ag_tensor_wrap(float *data, float *grad, int ndim, const int *shape, bool requires_grad);

bool ag_same_shape(const ag_tensor *a, const ag_tensor *b);
/* Size of the last dimension, and of all the others multiplied together. */
int ag_last_dim(const ag_tensor *t);
int64_t ag_rows(const ag_tensor *t);
/* "[2,3,5]" into buf; returns buf, for messages. */
const char *ag_shape_str(const ag_tensor *t, char *buf, size_t size);

#endif
