/* The cost of the two collectives an expert-parallel step is made of, on
 * this machine, for the scaling model (bench/scaling_model.c,
 * docs/scaling.md):
 *   MPI_Alltoallv  every rank sends b bytes to every other rank and none to
 *                  itself (the rows of the MoE exchange), b from 1 KiB to
 *                  --max-bytes in steps of 4x;
 *   MPI_Allreduce  n bytes of floats summed in place (the dense gradients,
 *                  and at 4 bytes the run loop's small reductions), n from 4
 *                  bytes to --max-bytes in steps of 4x.
 *
 *   OPENBLAS_NUM_THREADS=1 mpirun -np P bench_alltoall [--reps R] [--warmup W]
 *                                       [--max-bytes B] [--pool-mib M]
 *
 * Defaults R 21, W 3, B 16 MiB, M 256. Each repetition is a barrier, then
 * the collective alone on the clock; its time is the slowest rank's
 * (MPI_MAX), and the figure is the median over the R repetitions after W
 * untimed ones. The buffers walk through a pool of M MiB (touched once
 * before timing), a fresh region for every send and receive buffer, so that
 * the data is not in cache, as in a training step, whose exchanges read and
 * write activations last touched a layer or a step earlier; on this machine
 * that costs 10-20x the cached figure (docs/scaling.md). --pool-mib 0 reuses
 * the same two buffers: the cached figure. Prints, on rank 0, one line per
 * size:
 *   ALLTOALLV {"ranks": P, "pool_mib": M, "bytes_per_pair": b, "us_median": t, "us_min": t}
 *   ALLREDUCE {"ranks": P, "pool_mib": M, "bytes": n, "us_median": t, "us_min": t}
 * scaling_model --comm FILE fits latency and per-byte cost to these lines.
 * Not a test: it only times. */
#include <mpi.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench_util.h"

enum { MAX_REPS = 1000, PAGE_FLOATS = 1024 };

typedef struct options {
    int reps, warmup;
    long max_bytes, pool_mib;
} options;

/* The buffers of the collective under test: consecutive regions of `pool`,
 * handed out in turn from `next` and wrapping around at the end. */
typedef struct exchange {
    int ranks, rank;
    float *pool;
    size_t pool_floats, next;
    int *send_counts, *recv_counts, *displs; /* [ranks], in floats */
} exchange;

/* The next `floats` of the pool, page aligned. */
static float *take(exchange *x, size_t floats) {
    const size_t span = (floats + PAGE_FLOATS - 1) / PAGE_FLOATS * PAGE_FLOATS;
    if (x->next + span > x->pool_floats) x->next = 0;
    float *buffer = x->pool + x->next;
    x->next += span;
    return buffer;
}

/* b bytes (a multiple of 4) to every other rank, none to itself. */
static void set_pair_bytes(exchange *x, long bytes) {
    const int floats = (int)(bytes / (long)sizeof(float));
    for (int p = 0; p < x->ranks; p++) {
        x->send_counts[p] = x->recv_counts[p] = p == x->rank ? 0 : floats;
        x->displs[p] = p * floats;
    }
}

typedef enum collective { ALLTOALLV, ALLREDUCE } collective;

/* One Alltoallv as set by set_pair_bytes (count: floats per pair) or one
 * Allreduce of `count` floats, on fresh buffers; the time (s) on the clock. */
static double run_once(exchange *x, collective op, int count) {
    const size_t floats = op == ALLTOALLV ? (size_t)x->ranks * (size_t)count : (size_t)count;
    float *send = take(x, floats), *recv = op == ALLTOALLV ? take(x, floats) : NULL;
    MPI_Barrier(MPI_COMM_WORLD);
    double start = bench_now();
    if (op == ALLTOALLV)
        MPI_Alltoallv(send, x->send_counts, x->displs, MPI_FLOAT, recv, x->recv_counts, x->displs,
                      MPI_FLOAT, MPI_COMM_WORLD);
    else
        MPI_Allreduce(MPI_IN_PLACE, send, count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    return bench_now() - start;
}

/* The median over o->reps of the slowest rank's time (s); *fastest gets
 * the smallest of those times. */
static double time_collective(exchange *x, const options *o, collective op, int count,
                              double *fastest) {
    double seconds[MAX_REPS];
    for (int rep = -o->warmup; rep < o->reps; rep++) {
        double took = run_once(x, op, count);
        MPI_Allreduce(MPI_IN_PLACE, &took, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
        if (rep >= 0) seconds[rep] = took;
    }
    double median = bench_median(seconds, o->reps); /* sorts */
    *fastest = seconds[0];
    return median;
}

static void measure(exchange *x, const options *o) {
    double fastest;
    for (long bytes = 1024; bytes <= o->max_bytes; bytes *= 4) {
        set_pair_bytes(x, bytes);
        const int floats = (int)(bytes / (long)sizeof(float));
        double median = time_collective(x, o, ALLTOALLV, floats, &fastest);
        if (x->rank == 0)
            printf("ALLTOALLV {\"ranks\": %d, \"pool_mib\": %ld, \"bytes_per_pair\": %ld, "
                   "\"us_median\": %.2f, \"us_min\": %.2f}\n",
                   x->ranks, o->pool_mib, bytes, 1e6 * median, 1e6 * fastest);
    }
    for (long bytes = 4; bytes <= o->max_bytes; bytes *= 4) {
        const int floats = (int)(bytes / (long)sizeof(float));
        double median = time_collective(x, o, ALLREDUCE, floats, &fastest);
        if (x->rank == 0)
            printf("ALLREDUCE {\"ranks\": %d, \"pool_mib\": %ld, \"bytes\": %ld, "
                   "\"us_median\": %.2f, \"us_min\": %.2f}\n",
                   x->ranks, o->pool_mib, bytes, 1e6 * median, 1e6 * fastest);
    }
    fflush(stdout);
}

static const char usage[] =
    "usage: mpirun -np P bench_alltoall [--reps R] [--warmup W] [--max-bytes B] [--pool-mib M]\n"
    "Times MPI_Alltoallv (b bytes to every other rank, none to itself, b = 1 KiB..B) and\n"
    "MPI_Allreduce (n bytes of floats, n = 4..B) at P ranks, on buffers taken in turn from a\n"
    "pool of M MiB so that they are not in cache (M = 0: the same buffers every time).\n"
    "Prints ALLTOALLV and ALLREDUCE lines (JSON) with the median and the fastest of R\n"
    "repetitions, each timed as the slowest rank's. Defaults: R 21 after W = 3 untimed,\n"
    "B 16 MiB (1 KiB..64 MiB), M 256 (0..65536). The input of scaling_model --comm.\n";

/* Parses a long in [low, high] into *out; false (with a message) if it is not. */
static bool parse_long(const char *flag, const char *text, long low, long high, long *out,
                       int rank) {
    char *end;
    long value = strtol(text ? text : "", &end, 10);
    if (!text || !*text || *end || value < low || value > high) {
        if (rank == 0)
            fprintf(stderr, "bench_alltoall: %s takes an integer in [%ld, %ld], not '%s'\n", flag,
                    low, high, text ? text : "");
        return false;
    }
    *out = value;
    return true;
}

/* Returns 0 with *o filled, -1 after --help, else the exit status. */
static int parse_options(int argc, char **argv, options *o, int rank) {
    for (int i = 1; i < argc; i++) {
        const char *value = i + 1 < argc ? argv[i + 1] : NULL;
        long number = 0;
        bool ok = true;
        if (!strcmp(argv[i], "--reps")) {
            ok = parse_long(argv[i], value, 1, MAX_REPS, &number, rank), i++;
            o->reps = (int)number;
        } else if (!strcmp(argv[i], "--warmup")) {
            ok = parse_long(argv[i], value, 0, MAX_REPS, &number, rank), i++;
            o->warmup = (int)number;
        } else if (!strcmp(argv[i], "--max-bytes")) {
            ok = parse_long(argv[i], value, 1024, 64L << 20, &o->max_bytes, rank), i++;
        } else if (!strcmp(argv[i], "--pool-mib")) {
            ok = parse_long(argv[i], value, 0, 65536, &o->pool_mib, rank), i++;
        } else {
            const bool help = !strcmp(argv[i], "--help") || !strcmp(argv[i], "-h");
            if (rank == 0 && !help)
                fprintf(stderr, "bench_alltoall: unknown option '%s'\n", argv[i]);
            if (rank == 0) fputs(usage, help ? stdout : stderr);
            return help ? -1 : EXIT_FAILURE;
        }
        if (!ok) return EXIT_FAILURE;
    }
    return 0;
}

/* The pool: M MiB, and at least two of the largest buffers; every page
 * touched once, so no timed collective takes a page fault. */
static bool make_pool(exchange *x, const options *o) {
    const size_t largest = (size_t)x->ranks * (size_t)(o->max_bytes / (long)sizeof(float));
    const size_t wanted = (size_t)o->pool_mib << 18; /* MiB -> floats */
    x->pool_floats = 2 * (largest + PAGE_FLOATS);
    if (wanted > x->pool_floats) x->pool_floats = wanted;
    x->pool = malloc(x->pool_floats * sizeof(float));
    x->send_counts = calloc((size_t)x->ranks, sizeof(int));
    x->recv_counts = calloc((size_t)x->ranks, sizeof(int));
    x->displs = calloc((size_t)x->ranks, sizeof(int));
    if (!x->pool || !x->send_counts || !x->recv_counts || !x->displs) return false;
    memset(x->pool, 0, x->pool_floats * sizeof(float));
    return true;
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    exchange x = {0};
    MPI_Comm_size(MPI_COMM_WORLD, &x.ranks);
    MPI_Comm_rank(MPI_COMM_WORLD, &x.rank);
    options o = {.reps = 21, .warmup = 3, .max_bytes = 16L << 20, .pool_mib = 256};
    int status = parse_options(argc, argv, &o, x.rank);
    if (status == 0) { /* every rank measures, or none */
        int failed = !make_pool(&x, &o);
        if (failed)
            fprintf(stderr, "bench_alltoall: out of memory (a pool of %zu MiB)\n",
                    x.pool_floats >> 18);
        MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
        if (failed) status = EXIT_FAILURE;
    }
    if (status == 0) measure(&x, &o);
    free(x.pool);
    free(x.send_counts);
    free(x.recv_counts);
    free(x.displs);
    MPI_Finalize();
    return status < 0 ? EXIT_SUCCESS : status;
}
