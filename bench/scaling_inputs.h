/* The scaling model's measured inputs (bench/scaling_model.c, its only
 * user): every expert's share of its MoE layer's rows, read from a
 * metrics.jsonl, and the collectives' latency and per-byte cost, fitted to
 * bench_alltoall's lines. Static functions: one copy in the one program
 * that includes it (as bench_util.h). fail() prints the program's message
 * and exits with status 1. */
#ifndef CMOE_BENCH_SCALING_INPUTS_H
#define CMOE_BENCH_SCALING_INPUTS_H

#include <ctype.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum {
    MAX_SAMPLES = 4096,
    MAX_LAYERS = 64,
    MAX_FILE_EXPERTS = 1024,
    MAX_POINTS = 512,
    MAX_LIST = 32,
    LINE_CAP = 1 << 16,
};

/* share[(s * layers + l) * experts + e]: expert e's share of layer l's rows
 * in sample s (one log step, or one evaluation). */
typedef struct routing {
    int samples, layers, experts, capacity;
    int64_t step[MAX_SAMPLES];
    double *share;
    unsigned char *seen; /* [capacity][MAX_LAYERS]: the layers read */
} routing;

/* time = alpha * x + beta * bytes (seconds), fitted or given. */
typedef struct cost_fit {
    double alpha, beta;
    int points;
    double worst_error; /* largest |model / measured - 1| of the points */
    char source[128];
} cost_fit;

/* Prints "scaling_model: MESSAGE" and exits with status 1 (an input that
 * cannot be used). */
static _Noreturn __attribute__((format(printf, 1, 2))) void fail(const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    fprintf(stderr, "scaling_model: ");
    vfprintf(stderr, fmt, args);
    fprintf(stderr, "\n");
    va_end(args);
    exit(EXIT_FAILURE);
}

/* ---- reading the routing statistics ------------------------------------------ */

/* The number after "name": in line, or NAN. */
static double json_number(const char *line, const char *name) {
    char key[64];
    snprintf(key, sizeof key, "\"%s\":", name);
    const char *at = strstr(line, key);
    if (!at) return NAN;
    char *end;
    double value = strtod(at + strlen(key), &end);
    return end == at + strlen(key) ? NAN : value;
}

/* The numbers of the array after "name": into values (at most cap);
 * returns how many, or -1 when there is no such array. */
static int json_array(const char *line, const char *name, double *values, int cap) {
    char key[64];
    snprintf(key, sizeof key, "\"%s\":", name);
    const char *at = strstr(line, key);
    if (!at) return -1;
    at += strlen(key);
    while (isspace((unsigned char)*at)) at++;
    if (*at++ != '[') return -1;
    int n = 0;
    for (;;) {
        while (isspace((unsigned char)*at) || *at == ',') at++;
        if (*at == ']') return n;
        char *end;
        double value = strtod(at, &end);
        if (end == at || n == cap) return -1;
        values[n++] = value;
        at = end;
    }
}

/* Grows r to hold `samples` samples of MAX_LAYERS layers. */
static void reserve(routing *r, int samples) {
    if (samples <= r->capacity) return;
    int capacity = r->capacity ? 2 * r->capacity : 64;
    while (capacity < samples) capacity *= 2;
    const size_t stride = (size_t)MAX_LAYERS * (size_t)r->experts;
    double *share = realloc(r->share, (size_t)capacity * stride * sizeof(double));
    unsigned char *seen = realloc(r->seen, (size_t)capacity * MAX_LAYERS);
    if (!share || !seen) fail("out of memory for the routing samples");
    memset(seen + (size_t)r->capacity * MAX_LAYERS, 0,
           (size_t)(capacity - r->capacity) * MAX_LAYERS);
    r->share = share, r->seen = seen, r->capacity = capacity;
}

/* Adds one layer's counts to the current sample (a new sample when the step
 * changes); counts become shares when the whole file is read. */
static void add_routing_layer(routing *r, int64_t step, int layer, const double *counts,
                              int experts) {
    if (r->experts == 0) r->experts = experts;
    if (experts != r->experts) fail("routing: the number of experts changes between lines");
    if (layer < 0 || layer >= MAX_LAYERS) fail("routing: MoE layer %d is out of range", layer);
    if (r->samples == 0 || r->step[r->samples - 1] != step) {
        if (r->samples == MAX_SAMPLES) fail("more than %d routing samples", MAX_SAMPLES);
        reserve(r, r->samples + 1);
        r->step[r->samples++] = step;
    }
    if (layer >= r->layers) r->layers = layer + 1;
    const size_t at = (size_t)(r->samples - 1) * MAX_LAYERS + (size_t)layer;
    memcpy(r->share + at * (size_t)experts, counts, (size_t)experts * sizeof(double));
    r->seen[at] = 1;
}

/* One line of a metrics.jsonl: a "moe" line (one layer of one log step) or
 * an evaluation's layer_expert_tokens (every layer; moe_layers from the
 * "model" line); other lines are skipped. last_eval keeps the latest. */
static void read_line(routing *r, const char *line, int64_t first, int64_t last, int *moe_layers,
                      double *last_eval, int *last_eval_n) {
    static double counts[MAX_FILE_EXPERTS * MAX_LAYERS];
    const double step = json_number(line, "step");
    const bool wanted = step >= (double)first && step <= (double)last;
    const double layers = json_number(line, "moe_layers");
    if (strstr(line, "\"kind\": \"model\"") && layers >= 0 && layers <= MAX_LAYERS)
        *moe_layers = (int)layers;
    if (strstr(line, "\"kind\": \"moe\"")) {
        int n = json_array(line, "tokens_per_expert", counts, MAX_FILE_EXPERTS);
        if (n <= 0 || isnan(step)) fail("a \"moe\" line without step or tokens_per_expert");
        if (wanted) add_routing_layer(r, (int64_t)step, (int)json_number(line, "layer"), counts, n);
    } else if (strstr(line, "\"layer_expert_tokens\"") && wanted) {
        int n = json_array(line, "layer_expert_tokens", counts, MAX_FILE_EXPERTS * MAX_LAYERS);
        if (n > 0) memcpy(last_eval, counts, (size_t)n * sizeof(double)), *last_eval_n = n;
    }
}

/* Every (sample, layer) as shares, packed [samples][layers][experts]; every
 * sample must have every layer. */
static void counts_to_shares(routing *r) {
    for (int s = 0; s < r->samples; s++)
        for (int l = 0; l < r->layers; l++) {
            const size_t at = (size_t)s * MAX_LAYERS + (size_t)l;
            if (!r->seen[at])
                fail("routing: step %lld lacks MoE layer %d", (long long)r->step[s], l);
            const double *in = r->share + at * (size_t)r->experts;
            double *out = r->share + ((size_t)s * r->layers + (size_t)l) * (size_t)r->experts;
            double total = 0.0;
            for (int e = 0; e < r->experts; e++) total += in[e];
            if (!(total > 0.0))
                fail("routing: MoE layer %d has no rows at step %lld", l, (long long)r->step[s]);
            for (int e = 0; e < r->experts; e++) out[e] = in[e] / total; /* out <= in */
        }
}

static void read_routing(routing *r, const char *path, int64_t first, int64_t last) {
    static char line[LINE_CAP];
    static double last_eval[MAX_FILE_EXPERTS * MAX_LAYERS];
    FILE *file = fopen(path, "r");
    if (!file) fail("cannot read the routing file '%s'", path);
    int moe_layers = 0, last_eval_n = 0;
    while (fgets(line, sizeof line, file)) {
        if (!strchr(line, '\n') && !feof(file))
            fail("%s: a line longer than %d bytes", path, LINE_CAP);
        read_line(r, line, first, last, &moe_layers, last_eval, &last_eval_n);
    }
    fclose(file);
    if (r->samples == 0 && last_eval_n > 0 && moe_layers > 0 && last_eval_n % moe_layers == 0)
        for (int l = 0; l < moe_layers; l++)
            add_routing_layer(r, 0, l, last_eval + l * (last_eval_n / moe_layers),
                              last_eval_n / moe_layers);
    if (r->samples == 0) fail("no routing counts in '%s' (in the steps asked for)", path);
    counts_to_shares(r);
}

/* ---- the collectives' costs ---------------------------------------------------- */

/* One measured point: time t for x latency units and `bytes` per-byte units. */
typedef struct point {
    double x, bytes, t;
} point;

static int ceil_log2(int n) {
    int levels = 0;
    while ((1 << levels) < n) levels++;
    return levels;
}

/* Alltoallv of b bytes per pair at P ranks: (P-1) latencies, (P-1) b bytes
 * through each rank. Allreduce of n bytes: ceil(log2 P) latencies, a ring's
 * 2 (P-1)/P n bytes. */
static point alltoall_point(int ranks, double bytes_per_pair, double seconds) {
    return (point){ranks - 1, (ranks - 1) * bytes_per_pair, seconds};
}

static point allreduce_point(int ranks, double bytes, double seconds) {
    return (point){ceil_log2(ranks), 2.0 * (ranks - 1) / ranks * bytes, seconds};
}

/* Least squares in relative terms: minimises the sum of
 * ((alpha x + beta bytes) / t - 1)^2, so that 1 KiB and 4 MiB count alike;
 * a negative coefficient is dropped and the other fitted alone. */
static void fit_points(const point *points, int n, cost_fit *fit) {
    double uu = 0, uv = 0, vv = 0, u1 = 0, v1 = 0;
    for (int i = 0; i < n; i++) {
        const double u = points[i].x / points[i].t, v = points[i].bytes / points[i].t;
        uu += u * u, uv += u * v, vv += v * v, u1 += u, v1 += v;
    }
    const double det = uu * vv - uv * uv;
    fit->alpha = det != 0 ? (u1 * vv - v1 * uv) / det : 0;
    fit->beta = det != 0 ? (v1 * uu - u1 * uv) / det : 0;
    if (fit->alpha < 0 || det == 0) fit->alpha = 0, fit->beta = vv > 0 ? v1 / vv : 0;
    if (fit->beta < 0) fit->beta = 0, fit->alpha = uu > 0 ? u1 / uu : 0;
    fit->points = n;
    fit->worst_error = 0;
    for (int i = 0; i < n; i++) {
        const double model = fit->alpha * points[i].x + fit->beta * points[i].bytes;
        fit->worst_error = fmax(fit->worst_error, fabs(model / points[i].t - 1));
    }
}

/* Which lines of the --comm file the fits take. */
typedef struct comm_filter {
    int ranks[MAX_LIST], n_ranks;                                    /* none: every rank count */
    double alltoall_min, alltoall_max, allreduce_min, allreduce_max; /* bytes */
} comm_filter;

static bool ranks_wanted(const comm_filter *f, int ranks) {
    for (int i = 0; i < f->n_ranks; i++)
        if (f->ranks[i] == ranks) return true;
    return f->n_ranks == 0;
}

/* Reads bench_alltoall's lines and fits the two collectives' costs. */
static void fit_comm(const char *path, const comm_filter *f, cost_fit *alltoall,
                     cost_fit *allreduce) {
    static char line[LINE_CAP];
    static point a2a[MAX_POINTS], ar[MAX_POINTS];
    int n_a2a = 0, n_ar = 0;
    FILE *file = fopen(path, "r");
    if (!file) fail("cannot read the --comm file '%s'", path);
    while (fgets(line, sizeof line, file)) {
        const int ranks = (int)json_number(line, "ranks");
        const double us = json_number(line, "us_median");
        if (isnan(us) || ranks < 2 || !ranks_wanted(f, ranks) || us <= 0) continue;
        const double pair = json_number(line, "bytes_per_pair"), bytes = json_number(line, "bytes");
        if (!strncmp(line, "ALLTOALLV ", 10) && pair >= f->alltoall_min &&
            pair <= f->alltoall_max && n_a2a < MAX_POINTS)
            a2a[n_a2a++] = alltoall_point(ranks, pair, 1e-6 * us);
        if (!strncmp(line, "ALLREDUCE ", 10) && bytes >= f->allreduce_min &&
            bytes <= f->allreduce_max && n_ar < MAX_POINTS)
            ar[n_ar++] = allreduce_point(ranks, bytes, 1e-6 * us);
    }
    fclose(file);
    if (alltoall->source[0] == 0) {
        if (n_a2a < 2) fail("fewer than two ALLTOALLV lines to fit in '%s'", path);
        fit_points(a2a, n_a2a, alltoall);
        snprintf(alltoall->source, sizeof alltoall->source, "fitted to %d points", n_a2a);
    }
    if (allreduce->source[0] == 0) {
        if (n_ar < 2) fail("fewer than two ALLREDUCE lines to fit in '%s'", path);
        fit_points(ar, n_ar, allreduce);
        snprintf(allreduce->source, sizeof allreduce->source, "fitted to %d points", n_ar);
    }
}

#endif
