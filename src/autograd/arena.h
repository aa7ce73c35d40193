/* Bump allocator for everything a training step creates.
 *
 * Activations, saved tensors, gradients of intermediates and tape nodes all
 * come from one block allocated at start-up; ag_arena_reset at the top of each
 * step makes the whole block free again, so the training loop never calls
 * malloc. Capacity is fixed: an allocation that does not fit returns NULL and
 * the caller (ag_alloc in tape.h) turns that into an error naming the op.
 * Owns: the block. */
#ifndef CMOE_AUTOGRAD_ARENA_H
#define CMOE_AUTOGRAD_ARENA_H

#include <stddef.h>

#include "common/status.h"

enum { AG_ARENA_ALIGN = 64 }; /* one cache line; enough for any SIMD load */

typedef struct ag_arena {
    unsigned char *base;
    size_t capacity;
    size_t used;
    size_t high_water; /* largest `used` seen since init */
} ag_arena;

cm_status ag_arena_init(ag_arena *arena, size_t capacity);
void ag_arena_free(ag_arena *arena);
/* Aligned to AG_ARENA_ALIGN; contents are not cleared. NULL when full. */
void *ag_arena_alloc(ag_arena *arena, size_t bytes);
void ag_arena_reset(ag_arena *arena);

#endif
