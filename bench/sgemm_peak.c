/* The physical limit every "share of sgemm peak" of shared/BENCH.md is taken
 * against: raw cblas_sgemm throughput at n x n x n (row-major, no transpose,
 * beta 0), OpenBLAS at a given thread count, measured in the same run as the
 * models (bench/run.sh calls it before and after them).
 *
 *   sgemm_peak [--threads T] [--reps R] [--warmup W] [--n N]
 *
 * Defaults T 2, R 15, W 3, N 1024. After W untimed products (OpenBLAS's
 * buffers, the page faults of C, the clock up to speed), R products are timed
 * one by one; GFLOP/s = 2 n^3 / time. Prints one line:
 *   SGEMM {"threads": T, "n": N, "gflops_median": X, "gflops_max": Y}
 * The median is the figure to quote (the machine is shared); the max is the
 * best this machine did in the run. */
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench_util.h"

void openblas_set_num_threads(int);

/* n x n floats, 64-byte aligned, filled with values in [-1, 1) (any values
 * do: sgemm's time does not depend on them, only denormals would, and these
 * products have none). */
static float *new_matrix(int n, unsigned seed) {
    size_t count = (size_t)n * (size_t)n;
    size_t bytes = (count * sizeof(float) + 63) / 64 * 64;
    float *m = aligned_alloc(64, bytes);
    if (!m) {
        fprintf(stderr, "sgemm_peak: out of memory (%zu bytes)\n", bytes);
        exit(EXIT_FAILURE);
    }
    unsigned state = seed;
    for (size_t i = 0; i < count; i++) {
        state = state * 1664525u + 1013904223u; /* LCG: cheap and reproducible */
        m[i] = (float)(state >> 8) / (float)(1u << 24) * 2.0f - 1.0f;
    }
    return m;
}

/* c [n,n] = a [n,n] b [n,n] */
static void product(int n, const float *a, const float *b, float *c) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
}

int main(int argc, char **argv) {
    int threads = 2, reps = 15, warmup = 3, n = 1024;
    for (int i = 1; i < argc; i++) {
        const char *value = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(argv[i], "--threads"))
            threads = bench_parse_positive("sgemm_peak", argv[i], value), i++;
        else if (!strcmp(argv[i], "--reps"))
            reps = bench_parse_positive("sgemm_peak", argv[i], value), i++;
        else if (!strcmp(argv[i], "--warmup"))
            warmup = bench_parse_positive("sgemm_peak", argv[i], value), i++;
        else if (!strcmp(argv[i], "--n"))
            n = bench_parse_positive("sgemm_peak", argv[i], value), i++;
        else {
            fprintf(stderr, "usage: %s [--threads T] [--reps R] [--warmup W] [--n N]\n", argv[0]);
            return EXIT_FAILURE;
        }
    }
    openblas_set_num_threads(threads);
    float *a = new_matrix(n, 1), *b = new_matrix(n, 2), *c = new_matrix(n, 3);
    double *gflops = malloc((size_t)reps * sizeof *gflops);
    if (!gflops) {
        fprintf(stderr, "sgemm_peak: out of memory\n");
        return EXIT_FAILURE;
    }
    for (int i = 0; i < warmup; i++) product(n, a, b, c);
    const double flops = 2.0 * (double)n * (double)n * (double)n;
    for (int i = 0; i < reps; i++) {
        double start = bench_now();
        product(n, a, b, c);
        gflops[i] = flops / (bench_now() - start) / 1e9;
    }
    double median = bench_median(gflops, reps); /* sorts */
    /* c is read so the products cannot be dropped as dead stores. */
    if (c[0] != c[0]) fprintf(stderr, "sgemm_peak: NaN in the product\n");
    printf("SGEMM {\"threads\": %d, \"n\": %d, \"gflops_median\": %.1f, "
           "\"gflops_max\": %.1f}\n",
           threads, n, median, gflops[reps - 1]);
    free(gflops);
    free(a);
    free(b);
    free(c);
    return EXIT_SUCCESS;
}
