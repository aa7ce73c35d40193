/* Helpers shared by the benchmark programs of bench/ (each includes this
 * header; the functions are static, one copy per program). */
#ifndef CMOE_BENCH_UTIL_H
#define CMOE_BENCH_UTIL_H

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static inline double bench_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static inline int bench_compare_doubles(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Sorts values[0..count) and returns their median. */
static inline double bench_median(double *values, int count) {
    qsort(values, (size_t)count, sizeof *values, bench_compare_doubles);
    return count % 2 ? values[count / 2] : 0.5 * (values[count / 2 - 1] + values[count / 2]);
}

/* The value of option `flag` (text may be NULL when it is missing), a
 * positive integer up to 100000; exits with a message naming `program`
 * otherwise. */
static inline int bench_parse_positive(const char *program, const char *flag, const char *text) {
    char *end;
    long value = strtol(text ? text : "", &end, 10);
    if (!text || *end || value <= 0 || value > 100000) {
        fprintf(stderr, "%s: %s needs a positive integer, got '%s'\n", program, flag,
                text ? text : "");
        exit(EXIT_FAILURE);
    }
    return (int)value;
}

#endif
