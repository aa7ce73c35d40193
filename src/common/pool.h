/* The process's compute threads: one pool that runs the step's parallel
 * loops and splits its sgemms, so OpenBLAS itself runs single-threaded.
 *
 * Why our own pool: OpenBLAS's threads spin (sched_yield) between its calls
 * while the rest of a step runs on one core, and its threaded sgemm mallocs
 * on every call. With the pool, OpenBLAS is set to one thread; a large
 * sgemm is cut into one block of rows (or columns) per thread, each an
 * ordinary single-threaded cblas_sgemm, and the elementwise ops run their
 * loops on the same threads. Nothing is allocated per call.
 *
 * cm_pool_run(tasks, fn, ctx) calls fn(ctx, task) for task in [0, tasks)
 * on the pool's threads (the caller's thread takes part) and returns when
 * all are done. Which thread runs which task is not fixed, so a task must
 * depend only on its index: results are then the same for any thread count
 * as long as the caller picks `tasks` independently of it, or the same for
 * a given thread count (the trainers' guarantee) when it does not.
 * A call made from inside a task runs its tasks inline, in order.
 *
 * Workers spin briefly after a job (the next one usually follows within
 * microseconds), then sleep on a condition variable. Tasks must not
 * allocate from an autograd arena or touch the calling thread's status;
 * only the thread that set the pool up may call cm_pool_run.
 * Owns: its threads, until cm_pool_shutdown (also registered with atexit). */
#ifndef CMOE_COMMON_POOL_H
#define CMOE_COMMON_POOL_H

#include <stdbool.h>
#include <stdint.h>

enum { CM_POOL_MAX_THREADS = 64 };

typedef void (*cm_pool_fn)(void *ctx, int task);

/* Sets the number of compute threads (>= 1; clamped to CM_POOL_MAX_THREADS)
 * and sets OpenBLAS to one thread. Starts or stops workers as needed. */
void cm_pool_set_threads(int threads);

/* The number of compute threads. Before any cm_pool_set_threads, the
 * default is chosen on first use: CMOE_THREADS, else OPENBLAS_NUM_THREADS,
 * else the online CPUs divided by the ranks on this node (Open MPI's
 * OMPI_COMM_WORLD_LOCAL_SIZE), at least 1. */
int cm_pool_threads(void);

/* Runs fn(ctx, task) for every task in [0, tasks); returns when all are done. */
void cm_pool_run(int tasks, cm_pool_fn fn, void *ctx);

/* True on a pool thread inside a task (nested parallel calls run inline). */
bool cm_pool_in_task(void);

/* [begin, end) of part `part` of `parts` equal parts of [0, n), each boundary
 * a multiple of `align` (except n itself). */
void cm_pool_split(int64_t n, int parts, int part, int64_t align, int64_t *begin, int64_t *end);

/* A loop over [0, n) cut into contiguous ranges (boundaries multiples of
 * 16), at most one per thread and none shorter than `grain` elements:
 * fn(ctx, begin, end) for each. For loops whose elements are independent,
 * so the result does not depend on the cut. */
typedef void (*cm_range_fn)(void *ctx, int64_t begin, int64_t end);
void cm_pool_for(int64_t n, int64_t grain, cm_range_fn fn, void *ctx);

/* How many tasks to cut `work` (any unit) into: at most the thread count,
 * and none with less than min_work_per_task (tiny work runs on the caller:
 * waking threads would cost more than it saves). */
int cm_pool_tasks_for(int64_t work, int64_t min_work_per_task);

/* Stops the workers (they are restarted by the next call that needs them). */
void cm_pool_shutdown(void);

#endif
