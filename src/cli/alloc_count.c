/* Counts heap allocations for `cmoe bench` (BENCH.md: a steady-state step
 * must make none).
 *
 * The cmoe executable defines the malloc family itself, so every allocation
 * in the process goes through here: cmoe's own, OpenBLAS's, Open MPI's and
 * libc's internal ones (glibc supports replacing malloc this way). Each
 * function forwards to glibc's allocator under its exported __libc_ name and,
 * while counting is on, adds one to a process-wide counter. free is not
 * counted. Sanitizer builds keep the sanitizer's allocator: there the count
 * is not available. */
#include "cli/commands.h"

#if defined(__SANITIZE_ADDRESS__)

bool alloc_count_available(void) {
    return false;
}
void alloc_count_enable(bool on) {
    (void)on;
}
long long alloc_count_total(void) {
    return -1;
}

#else

#include <errno.h>
#include <stdatomic.h>
#include <stdlib.h>

void *__libc_malloc(size_t size);
void *__libc_calloc(size_t count, size_t size);
void *__libc_realloc(void *pointer, size_t size);
void *__libc_memalign(size_t alignment, size_t size);
void *__libc_valloc(size_t size);
void *__libc_pvalloc(size_t size);
void __libc_free(void *pointer);
void *memalign(size_t alignment, size_t size);
void *pvalloc(size_t size);
void *valloc(size_t size);

static atomic_bool counting;
static atomic_llong allocations;

static inline void count_one(void) {
    if (atomic_load_explicit(&counting, memory_order_relaxed))
        atomic_fetch_add_explicit(&allocations, 1, memory_order_relaxed);
}

bool alloc_count_available(void) {
    return true;
}
void alloc_count_enable(bool on) {
    atomic_store(&counting, on);
}
long long alloc_count_total(void) {
    return atomic_load(&allocations);
}

void *malloc(size_t size) {
    count_one();
    return __libc_malloc(size);
}
void *calloc(size_t count, size_t size) {
    count_one();
    return __libc_calloc(count, size);
}
void *realloc(void *pointer, size_t size) {
    count_one();
    return __libc_realloc(pointer, size);
}
void free(void *pointer) {
    __libc_free(pointer);
}
void *memalign(size_t alignment, size_t size) {
    count_one();
    return __libc_memalign(alignment, size);
}
void *aligned_alloc(size_t alignment, size_t size) {
    count_one();
    return __libc_memalign(alignment, size);
}
int posix_memalign(void **out, size_t alignment, size_t size) {
    /* alignment must be a power of two multiple of sizeof(void *) */
    if (alignment % sizeof(void *) != 0 || (alignment & (alignment - 1)) != 0) return EINVAL;
    count_one();
    void *pointer = __libc_memalign(alignment, size);
    if (!pointer) return ENOMEM;
    *out = pointer;
    return 0;
}
void *valloc(size_t size) {
    count_one();
    return __libc_valloc(size);
}
void *pvalloc(size_t size) {
    count_one();
    return __libc_pvalloc(size);
}

#endif
