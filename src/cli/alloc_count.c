/* Counts heap allocations for `cmoe bench` (BENCH.md: a steady-state step
 * must make none).
 *
 * The cmoe executable defines the malloc family itself, so every allocation
 * in the process goes through here: cmoe's own, OpenBLAS's, Open MPI's and
 * libc's internal ones (glibc supports replacing malloc this way). Each
 * function forwards to glibc's allocator under its exported __libc_ name and,
 * while counting is on, adds one to a process-wide counter. free is not
 * counted. Sanitizer builds keep the sanitizer's allocator: there the count
 * is not available.
 *
 * Each counted allocation is also put down to where it comes from, by its
 * call stack (glibc's backtrace, each frame's object by dladdr): Open MPI's
 * when a frame lies in one of its libraries (libmpi, libopen-pal,
 * libopen-rte, its mca_ components, the PMIx, libevent and hwloc it runs
 * on), else cmoe's own when a frame lies in the cmoe executable, else
 * elsewhere (OpenBLAS, libc, a stack that does not unwind). An allocation
 * made while the tracer itself runs (libgcc's unwinder is loaded on first
 * use) counts as elsewhere. */
#define _GNU_SOURCE /* dladdr */
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
long long alloc_count_from(alloc_source source) {
    (void)source;
    return -1;
}

#else

#include <dlfcn.h>
#include <errno.h>
#include <execinfo.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

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

enum { MAX_FRAMES = 48 };

static atomic_bool counting;
static atomic_llong allocations, by_source[ALLOC_N_SOURCES];
static _Thread_local bool tracing; /* this thread is inside the tracer */
static void *executable_base;      /* where the cmoe executable is loaded (dladdr) */

/* Open MPI's own libraries and those it runs on, by file name. */
static bool is_mpi_object(const char *path) {
    static const char *const prefixes[] = {"libmpi",  "libopen-pal", "libopen-rte", "mca_",
                                           "libpmix", "libevent",    "libhwloc",    "libucp",
                                           "libucs",  "libuct",      "libfabric",   "libpsm"};
    const char *name = strrchr(path, '/');
    name = name ? name + 1 : path;
    for (size_t i = 0; i < sizeof prefixes / sizeof *prefixes; i++)
        if (strncmp(name, prefixes[i], strlen(prefixes[i])) == 0) return true;
    return false;
}

/* Where the allocation being made comes from, by the objects of its call
 * stack: frames[0] is in trace_source, [1] in count_one, [2] in the
 * allocation function, [3] its caller (none of the three is inlined). */
__attribute__((noinline)) static alloc_source trace_source(void) {
    void *frames[MAX_FRAMES];
    int depth = backtrace(frames, MAX_FRAMES);
    Dl_info info;
    bool own = false;
    for (int i = 0; i < depth; i++) {
        if (!dladdr(frames[i], &info) || !info.dli_fname) continue;
        if (is_mpi_object(info.dli_fname)) return ALLOC_MPI;
        if (info.dli_fbase == executable_base && i >= 3) own = true; /* past the hook's frames */
    }
    return own ? ALLOC_OWN : ALLOC_ELSEWHERE;
}

__attribute__((noinline)) static void count_one(void) {
    if (!atomic_load_explicit(&counting, memory_order_relaxed)) return;
    atomic_fetch_add_explicit(&allocations, 1, memory_order_relaxed);
    alloc_source source = ALLOC_ELSEWHERE;
    if (!tracing) {
        tracing = true;
        source = trace_source();
        tracing = false;
    }
    atomic_fetch_add_explicit(&by_source[source], 1, memory_order_relaxed);
}

bool alloc_count_available(void) {
    return true;
}
void alloc_count_enable(bool on) {
    if (on) { /* the first backtrace loads libgcc's unwinder: not while counting */
        void *frame;
        backtrace(&frame, 1);
        Dl_info self;
        executable_base = dladdr((void *)trace_source, &self) ? self.dli_fbase : NULL;
    }
    atomic_store(&counting, on);
}
long long alloc_count_total(void) {
    return atomic_load(&allocations);
}
long long alloc_count_from(alloc_source source) {
    return atomic_load(&by_source[source]);
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
