#include "autograd/arena.h"

#include <stdint.h>
#include <stdlib.h>

cm_status ag_arena_init(ag_arena *arena, size_t capacity) {
    capacity = (capacity + AG_ARENA_ALIGN - 1) / AG_ARENA_ALIGN * AG_ARENA_ALIGN;
    arena->base = aligned_alloc(AG_ARENA_ALIGN, capacity ? capacity : AG_ARENA_ALIGN);
    arena->capacity = capacity;
    arena->used = 0;
    arena->high_water = 0;
    if (!arena->base)
        return CM_ERR(CM_ERR_NOMEM, "cannot allocate a step arena of %zu MiB", capacity >> 20);
    return CM_OK;
}

void ag_arena_free(ag_arena *arena) {
    free(arena->base);
    arena->base = NULL;
    arena->capacity = arena->used = 0;
}

void *ag_arena_alloc(ag_arena *arena, size_t bytes) {
    size_t rounded = (bytes + AG_ARENA_ALIGN - 1) / AG_ARENA_ALIGN * AG_ARENA_ALIGN;
    if (rounded < bytes || rounded > arena->capacity - arena->used) return NULL;
    void *block = arena->base + arena->used;
    arena->used += rounded;
    if (arena->used > arena->high_water) arena->high_water = arena->used;
    return block;
}

void ag_arena_reset(ag_arena *arena) {
    arena->used = 0;
}
