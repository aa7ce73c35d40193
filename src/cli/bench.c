/* `cmoe bench`: timed training steps of a recipe, the RESULT line of
 * shared/BENCH.md last.
 *
 * The steps are the run loop's own (run_session_step) from fresh
 * parameters, with no logging, evaluation or checkpoint. The first --skip
 * steps are warm-up (first touch of the arena, OpenBLAS's buffers); the
 * figures are over the rest:
 *   tok/s = tokens (images for a CNN) per step / step time, median, min, max;
 *   achieved GFLOP/s = model FLOPs per step / median step time, with
 *     the LM's model FLOPs of BENCH.md: tokens x (6 N_active + 12 n_layer
 *     seq_len d_model), N_active = n_layer (4 d^2 + FFN) + d vocab, FFN =
 *     2 d d_ff (dense) or k m d h + d E (MoE; m = 3 matrices per expert
 *     with swiglu, else 2); the CNN's 6 x inference
 *     multiply-adds per image (one expert group per MoE conv, plus the
 *     router) x images: the attacks of adversarial modes are not counted;
 *   peak RSS = getrusage's maximum resident set (the largest rank's);
 *   allocations = heap allocation calls of the whole process (all threads,
 *     all libraries) during each timed step: the most in one step is
 *     reported, in all and by where they come from (Open MPI, cmoe's own
 *     code, elsewhere: alloc_count.c);
 *   the parts of the step (run_clock): the medians of the batch load, the
 *     forward to the loss, the loss values' sum over the ranks, backward,
 *     the gradients' sums over the ranks and the update, the slowest rank's;
 *   under MPI, the all-to-all time of the expert exchange (the slowest
 *     rank's median) and, apart, the wait for the slowest rank before
 *     each exchange (a barrier absorbs it: expert load imbalance, not
 *     communication); step time as seen by rank 0. */
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "cli/commands.h"
#include "common/log.h"
#include "parallel/comm.h"
#include "parallel/dispatch.h"
#include "train/progress.h"
#include "train/recipe.h"
#include "train/run.h"

enum { MAX_OVERRIDES = 64, MAX_STEPS = 100000 };

static const char bench_help[] =
    "usage: cmoe bench RECIPE [--steps N] [--skip K] [--threads T] [--set SECTION.KEY=VALUE]...\n"
    "\n"
    "Runs N training steps (default 22) of RECIPE from fresh parameters, with no\n"
    "logging, evaluation or checkpoint, and reports the steps after the first K\n"
    "(default 2): tokens/s (images/s for a CNN) median, min and max, the model's\n"
    "GFLOP/s at the median step time, peak RSS, the heap allocations made in a step\n"
    "(in all, and how many came from Open MPI, from cmoe's code and from elsewhere)\n"
    "and the median time of each part of the step (load, forward, the loss values'\n"
    "sum over the ranks, backward, the gradients' sum over the ranks, update). T\n"
    "(default 2) is the number of threads of each process. The last line is\n"
    "  RESULT {\"model\": ..., \"tok_s_median\": ..., ...}\n"
    "(one line of JSON; docs/performance.md). The reference configurations are\n"
    "bench/lm-dense.yaml, bench/lm-moe.yaml, bench/cnn-moe.yaml and\n"
    "bench/cnn-advmoe.yaml; bench/run.sh compares them with PyTorch. Under\n"
    "mpirun every rank runs the step (expert parallel, as `cmoe train`); the\n"
    "all-to-all time of the expert exchange, the wait for the slowest rank before\n"
    "it, and forward + backward without them are reported too.\n";

/* The fields of run_clock, in order. */
enum { PART_LOAD, PART_FORWARD, PART_VALUES, PART_BACKWARD, PART_REDUCE, PART_UPDATE, N_PARTS };

static const char *const part_names[N_PARTS] = {"load",     "forward", "loss values",
                                                "backward", "reduce",  "update"};
static const char *const part_keys[N_PARTS] = {"load",     "forward", "values",
                                               "backward", "reduce",  "update"};

static void clock_parts(const run_clock *clock, double parts[N_PARTS]) {
    const double values[N_PARTS] = {clock->load,     clock->forward, clock->values,
                                    clock->backward, clock->reduce,  clock->update};
    memcpy(parts, values, sizeof values);
}

enum { N_KINDS = 1 + ALLOC_N_SOURCES }; /* allocations in all, then by source */

static const char *const source_keys[ALLOC_N_SOURCES] = {"mpi", "own", "elsewhere"};

static void alloc_counts(long long counts[N_KINDS]) {
    counts[0] = alloc_count_total();
    for (int k = 0; k < ALLOC_N_SOURCES; k++) counts[1 + k] = alloc_count_from((alloc_source)k);
}

typedef struct bench_timer {
    int64_t steps;
    const dispatch_timing *exchange; /* the session's counters */
    const run_clock *clock;          /* the session's */
    double last_time, last_exchange, last_wait, last_parts[N_PARTS];
    long long last_allocations[N_KINDS];
    double *seconds, *exchange_seconds, *wait_seconds;
    double *part_seconds[N_PARTS];
    double *compute_seconds;         /* forward + backward less the exchange and the wait */
    long long *allocations[N_KINDS]; /* per step: in all, then per alloc_source */
    bool print;
} bench_timer;

static void on_step(void *user, int64_t steps_done) {
    bench_timer *t = user;
    double now = cm_now(), exchange = t->exchange->exchange_seconds,
           wait = t->exchange->wait_seconds;
    long long allocations[N_KINDS];
    alloc_counts(allocations);
    double parts[N_PARTS];
    clock_parts(t->clock, parts);
    if (steps_done > 0) {
        int64_t i = steps_done - 1;
        t->seconds[i] = now - t->last_time;
        for (int p = 0; p < N_PARTS; p++) t->part_seconds[p][i] = parts[p] - t->last_parts[p];
        t->exchange_seconds[i] = exchange - t->last_exchange;
        t->wait_seconds[i] = wait - t->last_wait;
        t->compute_seconds[i] = t->part_seconds[PART_FORWARD][i] +
                                t->part_seconds[PART_BACKWARD][i] - t->exchange_seconds[i] -
                                t->wait_seconds[i];
        for (int k = 0; k < N_KINDS; k++)
            t->allocations[k][i] = allocations[k] - t->last_allocations[k];
        if (t->print) {
            fprintf(stderr, "\rstep %lld/%lld  %.1f ms", (long long)steps_done, (long long)t->steps,
                    1e3 * t->seconds[i]);
            fflush(stderr);
        }
    }
    /* read the clock last, so the bookkeeping above is not timed */
    alloc_counts(t->last_allocations);
    t->last_exchange = t->exchange->exchange_seconds;
    t->last_wait = t->exchange->wait_seconds;
    memcpy(t->last_parts, parts, sizeof parts);
    t->last_time = cm_now();
}

static int compare_doubles(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(const double *values, int64_t n) {
    double *sorted = malloc((size_t)n * sizeof *sorted);
    if (!sorted) return NAN;
    memcpy(sorted, values, (size_t)n * sizeof *sorted);
    qsort(sorted, (size_t)n, sizeof *sorted, compare_doubles);
    double m = n % 2 ? sorted[n / 2] : 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]);
    free(sorted);
    return m;
}

/* Runs the timed steps; the model FLOPs per step and the throughput unit
 * come from the task. */
static cm_status run_steps(const cm_recipe *recipe, const cm_comm *comm, bench_timer *timer,
                           double *flops_per_step, const char **item_name) {
    run_session *session;
    CM_TRY(run_session_open(recipe, comm, true, &session));
    const task_vtable *task = run_session_task(session);
    void *state = run_session_task_state(session);
    *flops_per_step = task->model_flops_per_step(state);
    *item_name = task->item_name;
    dispatch_timing *exchange = run_session_timing(session);
    exchange->separate_wait = true;
    timer->exchange = exchange;
    timer->clock = run_session_clock(session);
    cm_status status = CM_OK;
    on_step(timer, 0);
    for (int64_t step = 0; step < timer->steps && status == CM_OK; step++) {
        run_step_result done;
        status = run_session_step(session, step, &done);
        if (status == CM_OK) on_step(timer, step + 1);
    }
    run_session_close(session);
    return status;
}

static double max_over_ranks(const cm_comm *comm, double value) {
    if (comm->world_size > 1)
        MPI_Allreduce(MPI_IN_PLACE, &value, 1, MPI_DOUBLE, MPI_MAX, comm->world);
    return value;
}

static double sum_over_ranks(const cm_comm *comm, double value) {
    if (comm->world_size > 1)
        MPI_Allreduce(MPI_IN_PLACE, &value, 1, MPI_DOUBLE, MPI_SUM, comm->world);
    return value;
}

/* Experts shadowed per MoE layer call over the whole run (parallel/shadow.h). */
static double shadowed_experts_per_call(const dispatch_timing *exchange) {
    if (!exchange || exchange->shadow_decisions == 0) return 0.0;
    return (double)exchange->shadowed_experts / (double)exchange->shadow_decisions;
}

/* The expert exchange's lines of the report (more than one rank). */
static void print_exchange(const cm_recipe *recipe, double exchange_median, double wait_median,
                           double step_median, double shadowed_per_call) {
    printf("  all-to-all %.2f ms median per step (%.1f%% of the step)\n", 1e3 * exchange_median,
           100.0 * exchange_median / step_median);
    printf("  wait for the slowest rank %.2f ms median per step (%.1f%% of the step)\n",
           1e3 * wait_median, 100.0 * wait_median / step_median);
    printf("  shadowed experts %.2f per MoE layer call (parallel.shadow_experts: %s)\n",
           shadowed_per_call, shadow_mode_names[recipe->parallel.shadow_experts]);
}

/* The medians over the timed steps of each part of the step (run_clock), the
 * slowest rank's, into parts_ms, and of forward + backward less the
 * exchange and the wait inside them into *compute_ms. */
static void median_parts(const cm_comm *comm, const bench_timer *t, int64_t skip,
                         double parts_ms[N_PARTS], double *compute_ms) {
    const int64_t n = t->steps - skip;
    for (int p = 0; p < N_PARTS; p++)
        parts_ms[p] = 1e3 * max_over_ranks(comm, median(t->part_seconds[p] + skip, n));
    *compute_ms = 1e3 * max_over_ranks(comm, median(t->compute_seconds + skip, n));
}

/* The breakdown's lines of the report. */
static void print_parts(const double parts_ms[N_PARTS], double compute_ms, double step_ms,
                        bool ranks) {
    printf("  parts of the step, median ms (the slowest rank's):");
    double sum = 0.0;
    for (int p = 0; p < N_PARTS; p++) {
        printf(" %s %.1f,", part_names[p], parts_ms[p]);
        sum += parts_ms[p];
    }
    printf(" the rest %.1f\n", step_ms - sum);
    if (ranks)
        printf("  forward + backward outside the all-to-all and the wait: %.1f ms median\n",
               compute_ms);
}

/* The most allocations in one timed step, in all and per source, the
 * largest over the ranks, and rank 0's total over the timed steps. */
static void allocation_maxima(const cm_comm *comm, const bench_timer *t, int64_t skip,
                              double most[N_KINDS], long long *total) {
    *total = 0;
    for (int k = 0; k < N_KINDS; k++) {
        long long max = 0;
        for (int64_t i = skip; i < t->steps; i++) {
            max = t->allocations[k][i] > max ? t->allocations[k][i] : max;
            if (k == 0) *total += t->allocations[k][i];
        }
        most[k] = max_over_ranks(comm, (double)max);
    }
}

static void print_allocations(const double most[N_KINDS], long long total) {
    if (!alloc_count_available()) {
        printf("  heap allocations: not counted in a sanitizer build\n");
        return;
    }
    printf("  heap allocations per timed step: at most %.0f (%lld in all on rank 0); the most in "
           "a step from Open MPI %.0f, from cmoe's code %.0f, from elsewhere %.0f\n",
           most[0], total, most[1 + ALLOC_MPI], most[1 + ALLOC_OWN], most[1 + ALLOC_ELSEWHERE]);
}

/* Prints the figures of the timed steps [skip, steps) and the RESULT line. */
static void report(const cm_recipe *recipe, const cm_comm *comm, const bench_timer *t, int64_t skip,
                   double flops_per_step, const char *item_name, int threads) {
    const int64_t n = t->steps - skip;
    const double *seconds = t->seconds + skip;
    double step_median = median(seconds, n), step_min = seconds[0], step_max = seconds[0];
    for (int64_t i = 0; i < n; i++) {
        step_min = fmin(step_min, seconds[i]);
        step_max = fmax(step_max, seconds[i]);
    }
    struct rusage usage;
    getrusage(RUSAGE_SELF, &usage);
    double rss_mib = (double)usage.ru_maxrss / 1024.0; /* ru_maxrss is in KiB on Linux */
    double rss_max = max_over_ranks(comm, rss_mib), rss_sum = sum_over_ranks(comm, rss_mib);
    double exchange_median = max_over_ranks(comm, median(t->exchange_seconds + skip, n));
    double wait_median = max_over_ranks(comm, median(t->wait_seconds + skip, n));
    double allocations_most[N_KINDS];
    long long allocations_total;
    allocation_maxima(comm, t, skip, allocations_most, &allocations_total);
    double parts_ms[N_PARTS], compute_ms;
    median_parts(comm, t, skip, parts_ms, &compute_ms);
    if (comm->world_rank != 0) return;
    const bool tokens_counted = strcmp(item_name, "tok") == 0;
    /* a step takes train.grad_accum micro-batches */
    const double tokens = (tokens_counted ? (double)recipe->data.batch_size * recipe->data.seq_len
                                          : (double)recipe->data.batch_size) *
                          recipe->train.grad_accum;
    const char *name = recipe->name;
    if (strncmp(name, "bench-", 6) == 0) name += 6;
    fprintf(stderr, "\n");
    printf("%s: %d rank(s) x %d thread(s), %lld timed steps after %lld warm-up\n", recipe->name,
           comm->world_size, threads, (long long)n, (long long)skip);
    printf("  step      %.1f ms median (%.1f - %.1f)\n", 1e3 * step_median, 1e3 * step_min,
           1e3 * step_max);
    printf("  %s/s  %.0f median (%.0f - %.0f)\n", tokens_counted ? "tokens" : "images",
           tokens / step_median, tokens / step_max, tokens / step_min);
    printf("  model     %.2f GFLOP per step, %.1f GFLOP/s\n", flops_per_step / 1e9,
           flops_per_step / step_median / 1e9);
    printf("  peak RSS  %.0f MiB%s\n", rss_max, comm->world_size > 1 ? " (largest rank)" : "");
    print_allocations(allocations_most, allocations_total);
    const double shadowed_per_call = shadowed_experts_per_call(t->exchange);
    print_parts(parts_ms, compute_ms, 1e3 * step_median, comm->world_size > 1);
    if (comm->world_size > 1)
        print_exchange(recipe, exchange_median, wait_median, step_median, shadowed_per_call);
    printf("RESULT {\"model\": \"%s\", \"tok_s_median\": %.1f, \"tok_s_min\": %.1f, "
           "\"tok_s_max\": %.1f, \"achieved_gflops\": %.2f, \"peak_rss_mib\": %.1f, "
           "\"step_ms_median\": %.2f, \"ranks\": %d, \"threads\": %d, \"steps\": %lld, "
           "\"model_gflop_per_step\": %.3f, \"allocs_per_step_max\": %.0f",
           name, tokens / step_median, tokens / step_max, tokens / step_min,
           flops_per_step / step_median / 1e9, rss_max, 1e3 * step_median, comm->world_size,
           threads, (long long)n, flops_per_step / 1e9,
           alloc_count_available() ? allocations_most[0] : -1.0);
    for (int k = 0; k < ALLOC_N_SOURCES; k++)
        printf(", \"allocs_%s_per_step_max\": %.0f", source_keys[k],
               alloc_count_available() ? allocations_most[1 + k] : -1.0);
    for (int p = 0; p < N_PARTS; p++) printf(", \"%s_ms_median\": %.3f", part_keys[p], parts_ms[p]);
    if (comm->world_size > 1)
        printf(", \"peak_rss_mib_sum\": %.1f, \"alltoall_ms_median\": %.3f, "
               "\"imbalance_wait_ms_median\": %.3f, \"shadowed_per_call\": %.3f, "
               "\"compute_ms_median\": %.3f",
               rss_sum, 1e3 * exchange_median, 1e3 * wait_median, shadowed_per_call, compute_ms);
    printf("}\n");
    fflush(stdout);
}

static int parse_count(const char *flag, const char *text, long long low, long long *out) {
    char *end;
    long long value = strtoll(text, &end, 10);
    if (*end || end == text || value < low || value > MAX_STEPS) {
        fprintf(stderr, "cmoe bench: %s takes an integer in [%lld, %d], not '%s'\n", flag, low,
                MAX_STEPS, text);
        return -1;
    }
    *out = value;
    return 0;
}

typedef struct bench_args {
    const char *recipe_path;
    const char *overrides[MAX_OVERRIDES];
    int n_overrides;
    long long steps, skip, threads;
} bench_args;

/* Fills *args; returns -1 when parsed, else the exit status (help: 0). */
static int parse_bench_args(int argc, char **argv, bench_args *args) {
    for (int i = 0; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            fputs(bench_help, stdout);
            return 0;
        } else if (strcmp(argv[i], "--steps") == 0 && i + 1 < argc) {
            if (parse_count("--steps", argv[++i], 1, &args->steps)) return 2;
        } else if (strcmp(argv[i], "--skip") == 0 && i + 1 < argc) {
            if (parse_count("--skip", argv[++i], 0, &args->skip)) return 2;
        } else if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc) {
            if (parse_count("--threads", argv[++i], 1, &args->threads)) return 2;
        } else if (strcmp(argv[i], "--set") == 0 && i + 1 < argc) {
            if (args->n_overrides == MAX_OVERRIDES) {
                fprintf(stderr, "cmoe bench: too many --set\n");
                return 2;
            }
            args->overrides[args->n_overrides++] = argv[++i];
        } else if (argv[i][0] == '-' || args->recipe_path) {
            fprintf(stderr, "cmoe bench: unexpected argument '%s' (see cmoe bench --help)\n",
                    argv[i]);
            return 2;
        } else {
            args->recipe_path = argv[i];
        }
    }
    if (!args->recipe_path) {
        fprintf(stderr, "cmoe bench: missing RECIPE (see cmoe bench --help)\n");
        return 2;
    }
    if (args->skip >= args->steps) {
        fprintf(stderr, "cmoe bench: --skip %lld leaves no timed step of --steps %lld\n",
                args->skip, args->steps);
        return 2;
    }
    return -1;
}

/* The timer's per-step arrays (t->steps each); false if one is missing. */
static bool timer_alloc(bench_timer *t) {
    const size_t n = (size_t)t->steps;
    t->seconds = calloc(n, sizeof(double));
    t->exchange_seconds = calloc(n, sizeof(double));
    t->wait_seconds = calloc(n, sizeof(double));
    t->compute_seconds = calloc(n, sizeof(double));
    bool allocated = t->seconds && t->exchange_seconds && t->wait_seconds && t->compute_seconds;
    for (int k = 0; k < N_KINDS; k++) {
        t->allocations[k] = calloc(n, sizeof(long long));
        allocated = allocated && t->allocations[k];
    }
    for (int p = 0; p < N_PARTS; p++) {
        t->part_seconds[p] = calloc(n, sizeof(double));
        allocated = allocated && t->part_seconds[p];
    }
    return allocated;
}

static void timer_free(bench_timer *t) {
    free(t->seconds);
    free(t->exchange_seconds);
    free(t->wait_seconds);
    free(t->compute_seconds);
    for (int k = 0; k < N_KINDS; k++) free(t->allocations[k]);
    for (int p = 0; p < N_PARTS; p++) free(t->part_seconds[p]);
}

int command_bench(int argc, char **argv) {
    bench_args args = {.steps = 22, .skip = 2, .threads = 2};
    int parsed = parse_bench_args(argc, argv, &args);
    if (parsed >= 0) return parsed;
    const long long steps = args.steps, skip = args.skip, threads = args.threads;
    if (comm_start(&argc, &argv) != CM_OK) {
        fprintf(stderr, "cmoe bench: %s\n", cm_error_message());
        return EXIT_FAILURE;
    }
    cm_recipe recipe;
    cm_comm comm;
    bool comm_ready = false;
    cm_status status = recipe_load(args.recipe_path, args.overrides, args.n_overrides, &recipe);
    if (status == CM_OK) {
        recipe.train.threads = (int)threads;
        status = comm_init(&comm, recipe.parallel.expert_parallel);
        comm_ready = status == CM_OK;
    }
    bench_timer timer = {.steps = steps, .print = cm_log_rank() == 0};
    if (!timer_alloc(&timer) && status == CM_OK) status = CM_ERR(CM_ERR_NOMEM, "out of memory");
    double flops_per_step = 0.0;
    const char *item_name = "tok";
    int exit_code = EXIT_FAILURE;
    if (status == CM_OK) {
        alloc_count_enable(true);
        status = run_steps(&recipe, &comm, &timer, &flops_per_step, &item_name);
        alloc_count_enable(false);
        exit_code = status == CM_OK ? 0 : EXIT_FAILURE;
        if (exit_code == 0)
            report(&recipe, &comm, &timer, skip, flops_per_step, item_name, (int)threads);
    }
    if (exit_code != 0) {
        char reason[2300];
        snprintf(reason, sizeof reason, "cmoe bench: %s", cm_error_message());
        if (comm_ready && comm.world_size > 1) comm_abort(reason);
        if (cm_log_rank() == 0) fprintf(stderr, "%s\n", reason);
    }
    timer_free(&timer);
    if (comm_ready) comm_free(&comm);
    comm_stop();
    return exit_code;
}
