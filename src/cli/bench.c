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
 *     reported (alloc_count.c);
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
    "GFLOP/s at the median step time, peak RSS and the heap allocations made in a\n"
    "step. T (default 2) is the number of threads of each process. The last line is\n"
    "  RESULT {\"model\": ..., \"tok_s_median\": ..., ...}\n"
    "(one line of JSON; docs/performance.md). The reference configurations are\n"
    "bench/lm-dense.yaml, bench/lm-moe.yaml, bench/cnn-moe.yaml and\n"
    "bench/cnn-advmoe.yaml; bench/run.sh compares them with PyTorch. Under\n"
    "mpirun every rank runs the step (expert parallel, as `cmoe train`) and the\n"
    "all-to-all time of the expert exchange is reported too.\n";

typedef struct bench_timer {
    int64_t steps;
    const dispatch_timing *exchange; /* the session's counters */
    double last_time, last_exchange, last_wait;
    long long last_allocations;
    double *seconds, *exchange_seconds, *wait_seconds;
    long long *allocations;
    bool print;
} bench_timer;

static void on_step(void *user, int64_t steps_done) {
    bench_timer *t = user;
    double now = cm_now(), exchange = t->exchange->exchange_seconds,
           wait = t->exchange->wait_seconds;
    long long allocations = alloc_count_total();
    if (steps_done > 0) {
        int64_t i = steps_done - 1;
        t->seconds[i] = now - t->last_time;
        t->exchange_seconds[i] = exchange - t->last_exchange;
        t->wait_seconds[i] = wait - t->last_wait;
        t->allocations[i] = allocations - t->last_allocations;
        if (t->print) {
            fprintf(stderr, "\rstep %lld/%lld  %.1f ms", (long long)steps_done, (long long)t->steps,
                    1e3 * t->seconds[i]);
            fflush(stderr);
        }
    }
    /* read the clock last, so the bookkeeping above is not timed */
    t->last_allocations = alloc_count_total();
    t->last_exchange = t->exchange->exchange_seconds;
    t->last_wait = t->exchange->wait_seconds;
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

/* Prints the figures of the timed steps [skip, steps) and the RESULT line. */
static void report(const cm_recipe *recipe, const cm_comm *comm, const bench_timer *t, int64_t skip,
                   double flops_per_step, const char *item_name, int threads) {
    const int64_t n = t->steps - skip;
    const double *seconds = t->seconds + skip;
    double step_median = median(seconds, n), step_min = seconds[0], step_max = seconds[0];
    long long allocations_max = 0, allocations_total = 0;
    for (int64_t i = 0; i < n; i++) {
        step_min = fmin(step_min, seconds[i]);
        step_max = fmax(step_max, seconds[i]);
        allocations_max =
            t->allocations[skip + i] > allocations_max ? t->allocations[skip + i] : allocations_max;
        allocations_total += t->allocations[skip + i];
    }
    struct rusage usage;
    getrusage(RUSAGE_SELF, &usage);
    double rss_mib = (double)usage.ru_maxrss / 1024.0; /* ru_maxrss is in KiB on Linux */
    double rss_max = max_over_ranks(comm, rss_mib), rss_sum = sum_over_ranks(comm, rss_mib);
    double exchange_median = max_over_ranks(comm, median(t->exchange_seconds + skip, n));
    double wait_median = max_over_ranks(comm, median(t->wait_seconds + skip, n));
    double allocations_most = max_over_ranks(comm, (double)allocations_max);
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
    if (alloc_count_available())
        printf("  heap allocations per timed step: at most %.0f (%lld in all on rank 0)\n",
               allocations_most, allocations_total);
    else
        printf("  heap allocations: not counted in a sanitizer build\n");
    const double shadowed_per_call = shadowed_experts_per_call(t->exchange);
    if (comm->world_size > 1)
        print_exchange(recipe, exchange_median, wait_median, step_median, shadowed_per_call);
    printf("RESULT {\"model\": \"%s\", \"tok_s_median\": %.1f, \"tok_s_min\": %.1f, "
           "\"tok_s_max\": %.1f, \"achieved_gflops\": %.2f, \"peak_rss_mib\": %.1f, "
           "\"step_ms_median\": %.2f, \"ranks\": %d, \"threads\": %d, \"steps\": %lld, "
           "\"model_gflop_per_step\": %.3f, \"allocs_per_step_max\": %.0f",
           name, tokens / step_median, tokens / step_max, tokens / step_min,
           flops_per_step / step_median / 1e9, rss_max, 1e3 * step_median, comm->world_size,
           threads, (long long)n, flops_per_step / 1e9,
           alloc_count_available() ? allocations_most : -1.0);
    if (comm->world_size > 1)
        printf(", \"peak_rss_mib_sum\": %.1f, \"alltoall_ms_median\": %.3f, "
               "\"imbalance_wait_ms_median\": %.3f, \"shadowed_per_call\": %.3f",
               rss_sum, 1e3 * exchange_median, 1e3 * wait_median, shadowed_per_call);
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
    timer.seconds = calloc((size_t)steps, sizeof(double));
    timer.exchange_seconds = calloc((size_t)steps, sizeof(double));
    timer.wait_seconds = calloc((size_t)steps, sizeof(double));
    timer.allocations = calloc((size_t)steps, sizeof(long long));
    if (status == CM_OK &&
        (!timer.seconds || !timer.exchange_seconds || !timer.wait_seconds || !timer.allocations))
        status = CM_ERR(CM_ERR_NOMEM, "out of memory");
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
    free(timer.seconds);
    free(timer.exchange_seconds);
    free(timer.wait_seconds);
    free(timer.allocations);
    if (comm_ready) comm_free(&comm);
    comm_stop();
    return exit_code;
}
