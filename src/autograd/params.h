/* Parameter registry: named views into flat per-group buffers.
 *
 * Layers first declare their parameters (name, shape, group, init). Then
 * ag_params_finalize allocates, for each group, one contiguous buffer for the
 * values and mirrors of the same layout for the gradients and the two
 * optimizer moments, and points every parameter's tensor into them. AdamW,
 * clipping, zero-grad and the MPI all-reduce then each run over one span.
 *
 * Groups: DENSE is replicated on every rank; EXPERT holds this rank's shard of
 * the experts. Each parameter starts at a 64-byte boundary; the padding
 * between parameters is zero in every mirror.
 * Owns: the parameter structs and all four buffers of each group. */
#ifndef CMOE_AUTOGRAD_PARAMS_H
#define CMOE_AUTOGRAD_PARAMS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "autograd/tensor.h"
#include "common/status.h"

typedef enum ag_group { AG_GROUP_DENSE = 0, AG_GROUP_EXPERT = 1, AG_NUM_GROUPS = 2 } ag_group;

typedef enum ag_init_kind {
    AG_INIT_ZERO,
    AG_INIT_CONSTANT, /* every element = a */
    AG_INIT_NORMAL,   /* mean a, std b */
    AG_INIT_UNIFORM,  /* in [a, b) */
    AG_INIT_INDEX,    /* element i = a + i (an identity table, e.g. an MoE layer's group_of) */
} ag_init_kind;

typedef struct ag_init {
    ag_init_kind kind;
    float a, b;
} ag_init;

enum { AG_PARAM_NAME_MAX = 96 };

typedef struct ag_param {
    char name[AG_PARAM_NAME_MAX];
    ag_group group;
    ag_init init;
    bool frozen;   /* never updated, no gradient, no optimizer state use */
    bool no_decay; /* excluded from weight decay (norms, biases, embeddings) */
    /* Added to the element index when drawing the init, so a shard of a larger
     * tensor (this rank's experts) gets the values of its global position. */
    uint64_t init_index_offset;
    size_t offset; /* into the group's buffers, in floats */
    ag_tensor tensor;
    /* Expert parameters ([E_local, ...], AG_GROUP_EXPERT, ndim >= 1) are
     * updated per slice (one slice = one expert): slice_used says whether the
     * slice took part in the current step (set by the layer that uses it,
     * cleared by ag_params_zero_grad), slice_steps how many updates it has
     * had (AdamW's bias correction). NULL and 0 for dense parameters. */
    int slices;
    uint8_t *slice_used;  /* [slices] */
    int64_t *slice_steps; /* [slices] */
} ag_param;

typedef struct ag_param_buffer {
    float *data, *grad, *m, *v;
    size_t numel; /* including alignment padding */
} ag_param_buffer;

typedef struct ag_params {
    ag_param **items;
    int count, capacity;
    ag_param_buffer buffers[AG_NUM_GROUPS];
    bool finalized;
} ag_params;

void ag_params_init(ag_params *params);
void ag_params_free(ag_params *params);

/* Declares a parameter; `*out` stays valid until ag_params_free, and its
 * tensor becomes usable after finalize. Duplicate names are an error. */
cm_status ag_params_declare(ag_params *params, const char *name, ag_group group, int ndim,
                            const int *shape, ag_init init, ag_param **out);
/* Allocates the buffers and draws every initial value from (seed, name, index). */
cm_status ag_params_finalize(ag_params *params, uint64_t seed);

ag_param *ag_params_find(const ag_params *params, const char *name);
/* Zeroes every gradient and clears every slice_used flag. */
void ag_params_zero_grad(ag_params *params);
/* Marks slice `slice` of an expert parameter as used in this step. */
static inline void ag_param_mark_slice(ag_param *param, int slice) {
    if (param && param->slice_used && slice >= 0 && slice < param->slices)
        param->slice_used[slice] = 1;
}
int64_t ag_params_count(const ag_params *params, ag_group group); /* without padding */

static inline ag_tensor *ag_param_tensor(ag_param *param) {
    return &param->tensor;
}
void ag_param_set_frozen(ag_param *param, bool frozen);

#endif
