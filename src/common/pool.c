#include "common/pool.h"

#include <cblas.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "common/check.h"

/* How long an idle worker spins before it sleeps: long enough to bridge the
 * gap between two ops of a step, short enough not to hold a core after it. */
#define SPIN_SECONDS 2e-4

static struct {
    int threads; /* 0 until configured */
    int workers; /* running worker threads (threads - 1 once started) */
    pthread_t ids[CM_POOL_MAX_THREADS];
    pthread_mutex_t lock;
    pthread_cond_t wake;
    atomic_uint_fast64_t generation; /* bumped once per job (and to quit) */
    atomic_int sleepers;             /* workers blocked on `wake` or about to be */
    atomic_bool quit;
    /* the current job, written before its generation is published */
    cm_pool_fn fn;
    void *ctx;
    int tasks;
    atomic_int next_task;
    atomic_int finished; /* workers done with the current job */
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};

static _Thread_local bool inside_task;

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static double seconds_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void run_tasks(void) {
    int task;
    while ((task = atomic_fetch_add(&pool.next_task, 1)) < pool.tasks) pool.fn(pool.ctx, task);
}

/* Waits for a generation other than `seen`: spins, then sleeps. */
static uint_fast64_t wait_for_job(uint_fast64_t seen) {
    uint_fast64_t now = atomic_load(&pool.generation);
    double deadline = seconds_now() + SPIN_SECONDS;
    for (int spins = 0; now == seen; spins++) {
        cpu_relax();
        now = atomic_load(&pool.generation);
        if ((spins & 63) == 63 && seconds_now() > deadline) break;
    }
    if (now != seen) return now;
    pthread_mutex_lock(&pool.lock);
    atomic_fetch_add(&pool.sleepers, 1);
    /* re-check after announcing the sleep: a job published before the
     * announcement is seen here, one after it broadcasts */
    while ((now = atomic_load(&pool.generation)) == seen) pthread_cond_wait(&pool.wake, &pool.lock);
    atomic_fetch_sub(&pool.sleepers, 1);
    pthread_mutex_unlock(&pool.lock);
    return now;
}

static void *worker_main(void *arg) {
    uint_fast64_t seen = (uint_fast64_t)(uintptr_t)arg;
    inside_task = true; /* anything a worker runs is inside a task */
    for (;;) {
        seen = wait_for_job(seen);
        if (atomic_load(&pool.quit)) break;
        run_tasks();
        atomic_fetch_add(&pool.finished, 1);
    }
    return NULL;
}

/* Publishes a new generation and wakes sleeping workers. */
static void publish(void) {
    atomic_fetch_add(&pool.generation, 1);
    if (atomic_load(&pool.sleepers) > 0) {
        pthread_mutex_lock(&pool.lock);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.lock);
    }
}

void cm_pool_shutdown(void) {
    if (pool.workers == 0) return;
    atomic_store(&pool.quit, true);
    publish();
    for (int i = 0; i < pool.workers; i++) pthread_join(pool.ids[i], NULL);
    pool.workers = 0;
    atomic_store(&pool.quit, false);
}

static void start_workers(void) {
    static bool registered;
    if (!registered) {
        atexit(cm_pool_shutdown);
        registered = true;
    }
    uint_fast64_t generation = atomic_load(&pool.generation);
    while (pool.workers < pool.threads - 1) {
        int code = pthread_create(&pool.ids[pool.workers], NULL, worker_main,
                                  (void *)(uintptr_t)generation);
        if (code != 0) break; /* fewer threads: still correct, only slower */
        pool.workers++;
    }
}

static int env_threads(const char *name) {
    const char *text = getenv(name);
    if (!text) return 0;
    char *end;
    long value = strtol(text, &end, 10);
    return *end == '\0' && value >= 1
               ? (int)(value < CM_POOL_MAX_THREADS ? value : CM_POOL_MAX_THREADS)
               : 0;
}

static int default_threads(void) {
    int threads = env_threads("CMOE_THREADS");
    if (!threads) threads = env_threads("OPENBLAS_NUM_THREADS");
    if (threads) return threads;
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    int local_ranks = env_threads("OMPI_COMM_WORLD_LOCAL_SIZE");
    if (cpus < 1) cpus = 1;
    if (local_ranks > 1) cpus /= local_ranks;
    return cpus < 1 ? 1 : cpus < CM_POOL_MAX_THREADS ? (int)cpus : CM_POOL_MAX_THREADS;
}

void cm_pool_set_threads(int threads) {
    CM_ASSERT(!inside_task, "cm_pool_set_threads called from a pool task");
    if (threads < 1) threads = 1;
    if (threads > CM_POOL_MAX_THREADS) threads = CM_POOL_MAX_THREADS;
    openblas_set_num_threads(1);
    if (threads == pool.threads) return;
    cm_pool_shutdown();
    pool.threads = threads; /* workers start with the first parallel job */
}

int cm_pool_threads(void) {
    if (pool.threads == 0) cm_pool_set_threads(default_threads());
    return pool.threads;
}

bool cm_pool_in_task(void) {
    return inside_task;
}

void cm_pool_run(int tasks, cm_pool_fn fn, void *ctx) {
    if (tasks <= 0) return;
    if (tasks == 1 || inside_task || cm_pool_threads() == 1) {
        bool was_inside = inside_task;
        inside_task = true;
        for (int task = 0; task < tasks; task++) fn(ctx, task);
        inside_task = was_inside;
        return;
    }
    if (pool.workers < pool.threads - 1) start_workers();
    pool.fn = fn;
    pool.ctx = ctx;
    pool.tasks = tasks;
    atomic_store(&pool.next_task, 0);
    atomic_store(&pool.finished, 0);
    publish();
    inside_task = true;
    run_tasks();
    inside_task = false;
    for (int spins = 0; atomic_load(&pool.finished) < pool.workers; spins++) {
        cpu_relax();
        if ((spins & 1023) == 1023) sched_yield(); /* a worker may be descheduled */
    }
}

void cm_pool_split(int64_t n, int parts, int part, int64_t align, int64_t *begin, int64_t *end) {
    if (align < 1) align = 1;
    int64_t chunk = (n + parts - 1) / parts;
    chunk = (chunk + align - 1) / align * align;
    int64_t first = (int64_t)part * chunk;
    *begin = first < n ? first : n;
    *end = first + chunk < n ? first + chunk : n;
}

typedef struct range_job {
    int64_t n;
    int tasks;
    cm_range_fn fn;
    void *ctx;
} range_job;

static void range_task(void *context, int task) {
    const range_job *job = context;
    int64_t begin, end;
    cm_pool_split(job->n, job->tasks, task, 16, &begin, &end);
    if (begin < end) job->fn(job->ctx, begin, end);
}

void cm_pool_for(int64_t n, int64_t grain, cm_range_fn fn, void *ctx) {
    if (n <= 0) return;
    if (grain < 1) grain = 1;
    int64_t most = n / grain;
    int threads = inside_task ? 1 : cm_pool_threads();
    int tasks = most < threads ? (int)(most > 1 ? most : 1) : threads;
    if (tasks == 1) {
        fn(ctx, 0, n);
        return;
    }
    range_job job = {n, tasks, fn, ctx};
    cm_pool_run(tasks, range_task, &job);
}

int cm_pool_tasks_for(int64_t work, int64_t min_work_per_task) {
    if (inside_task || min_work_per_task < 1) return 1;
    int64_t most = work / min_work_per_task;
    int threads = cm_pool_threads();
    return most < 1 ? 1 : most < threads ? (int)most : threads;
}
