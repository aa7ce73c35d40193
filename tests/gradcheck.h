/* Finite-difference gradient checker shared by every op and layer test.
 *
 * The forward callback maps leaf inputs to an output tensor of any shape.
 * The checker reduces the output to a scalar with a fixed *random-weighted*
 * sum, L = sum_k w_k y_k (w_k uniform in [-1, 1], from the seed), so the
 * upstream gradient is not all-ones and a wrong transpose or swapped rows
 * cannot hide. The analytic gradient comes from one backward seeded with w;
 * the numeric one from central differences of L, accumulated in double
 * (2-point, or the 4-point stencil when `precise`). An element passes when
 * |analytic - numeric| <= atol + rtol * |numeric|. Every analytic gradient
 * must also be finite. Inputs with requires_grad == false are not checked. */
#ifndef CMOE_TESTS_GRADCHECK_H
#define CMOE_TESTS_GRADCHECK_H

#include <stdbool.h>
#include <stdint.h>

#include "autograd/ops.h"

typedef ag_tensor *(*gc_forward_fn)(ag_ctx *ctx, ag_tensor *const *inputs, void *user);

typedef struct gc_options {
    double eps;
    double atol;
    double rtol;
    int64_t max_checks_per_input; /* larger inputs: a seeded sample of elements */
    bool precise;                 /* 4-point stencil */
    uint64_t seed;
} gc_options;

/* eps 1e-2 with the 4-point stencil, atol 1e-3, rtol 1e-2, 256 checks per input. */
gc_options gc_default_options(void);

typedef struct gc_result {
    bool ok;
    int64_t checked; /* elements compared */
    int worst_input; /* -1 if none */
    int64_t worst_index;
    double worst_analytic, worst_numeric;
    double worst_ratio; /* error / allowed; > 1 fails */
    char message[512];
} gc_result;

gc_result gc_check(const char *label, gc_forward_fn forward, ag_tensor *const *inputs, int n_inputs,
                   void *user, const gc_options *options);

/* Test-owned leaf with malloc'd data and grad, values uniform in [low, high). */
ag_tensor *gc_tensor_new(int ndim, const int *shape, float low, float high, uint64_t seed,
                         bool requires_grad);
void gc_tensor_free(ag_tensor *t);

#endif
