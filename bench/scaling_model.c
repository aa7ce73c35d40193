/* A scaling model of an expert-parallel cmoe step: predicted step time, the
 * all-to-all's, the all-reduce's and the wait's shares of it, and tokens/s
 * per rank, at ranks beyond this machine (docs/scaling.md), with
 * parallel.shadow_experts off and auto. Shadowing is decided by cmoe's own
 * shadow_decide (parallel/shadow.h) on the modelled counts, so "auto" is
 * what cmoe would do there.
 *
 * Measured inputs (bench/scaling.sh measures them all):
 *   --expert-gflops G   the experts' forward + backward rate of one rank with
 *                       one thread in place (bench/scaling.sh: from a one-rank
 *                       step beside its twin with experts of half the width);
 *   --one-rank-ms S     the recipe's step at 1 rank x 1 thread (cmoe bench):
 *                       its dense part is S minus its experts' time at G;
 *   --dense-params N    the replicated parameters (the all-reduce's floats);
 *   --comm FILE         bench_alltoall's lines, to which the latency alpha and
 *                       the per-byte cost beta of both collectives are fitted
 *                       (or --alltoall and --allreduce give them);
 *   --routing FILE      a metrics.jsonl: every expert's rows per MoE layer
 *                       ("moe" lines: per log step; else the last line with
 *                       layer_expert_tokens), as shares of each layer's rows.
 *
 * The model of one step at P ranks, T tokens per rank, E experts (E/P per
 * rank), L MoE layers, k experts per token, D x H experts of n matrices:
 *   counts[p][e]  = T k share[e] (every rank routes like the whole batch)
 *   experts       = sum over layers of max_q rows_q t_row (+ the shadowed
 *                   rows each rank runs itself), t_row = 6 n D H / rate
 *   wait          = max_q sum over layers of (max_q' rows_q' - rows_q) t_row
 *   imbalance     = sum over layers of (max_q rows_q - mean_q rows_q) t_row
 *   all-to-all    = per layer: the counts, alpha (P-1); the rows, 4 x
 *                   (alpha (P-1) + beta 4 D max_q max(rows sent, received));
 *                   shadowed weights out (ring Allgatherv) and gradients in
 *                   (Alltoallv to the owners) with the same alpha, beta
 *   all-reduce    = alpha_ar ceil(log2 P) (L + 2) + beta_ar 2 (P-1)/P 4 N
 *   dense         = (S - L T1 k t_row) T / T1, T1 the recipe's tokens
 * When --cores says the P ranks share C < P cores, the dense part and the
 * copies run at C / P of a core, and each layer's experts by processor
 * sharing: while n ranks still compute, each runs at min(1, C / n) (Open
 * MPI yields a waiting rank's core when the node is oversubscribed), which
 * sets when each rank is done in place of rows_q t_row above (--waiting
 * spin: every rank at C / P throughout instead). Every figure is the median
 * over the routing samples. */
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench_util.h"
#include "parallel/shadow.h"
#include "scaling_inputs.h"
#include "train/recipe.h"
#include "train/recipe_moe.h"

enum {
    MAX_SCENARIO_RANKS = 4096,
    MAX_CELLS = 1 << 24, /* ranks x experts */
    MAX_SETS = 64,
};

/* ---- inputs --------------------------------------------------------------- */

/* What the recipe says about the step. */
typedef struct model_shape {
    int moe_layers, d_model, hidden, matrices, k, experts;
    int64_t tokens_per_step;
    int64_t float_cost; /* parallel.shadow_float_cost */
} model_shape;

typedef struct inputs {
    model_shape shape;
    routing routing;
    double expert_flops;  /* per second, one rank, one thread, a core of its own */
    double one_rank_step; /* s */
    int64_t dense_params;
    cost_fit alltoall, allreduce;
    int cores; /* 0: a core per rank */
    bool spin; /* with fewer cores than ranks, a waiting rank keeps its share */
} inputs;

typedef enum expert_rule { EXPERTS_FIXED, EXPERTS_MAX, EXPERTS_PER_RANK } expert_rule;

typedef struct scenario {
    int ranks, experts;
    int64_t tokens_per_rank;
    shadow_mode mode;
} scenario;

/* One step's figures (s), and the experts shadowed per MoE layer call.
 * wait: the longest any rank waits for the busiest one at the exchanges (as
 * cmoe bench measures it); imbalance: what the busiest rank's expert rows
 * cost over the mean rank's, summed over the layers (what perfect balance
 * would save). */
typedef struct step_figures {
    double step, dense, experts, wait, imbalance, alltoall, allreduce, shadowed;
} step_figures;
enum { FIGURES = 8 };

/* ---- the model of one step ------------------------------------------------------- */

/* A rank and its experts' work in a layer (s at a core of its own). */
typedef struct ranked {
    double load;
    int rank;
} ranked;

/* Scratch of one scenario. */
typedef struct workspace {
    int32_t *counts;    /* [P][E]: rows rank p routes to expert e */
    int64_t *rank_cost; /* [P], shadow_decide's scratch */
    uint8_t *shadowed;  /* [E] */
    double *share;      /* [E]: this layer's shares */
    double *sorted;     /* [the routing file's experts] */
    /* [P]: rows rank q computes for its own experts, rows it computes with
     * copies, rows it sends and receives, shadowed experts it owns; its
     * wait over the step (s) */
    double *computed, *shadow_rows, *sent, *received, *owned, *wait;
    double *finish; /* [P]: when rank q's experts are done in a layer (s) */
    ranked *ranked; /* [P]: scratch of share_cores */
} workspace;

static uint64_t mix(uint64_t x) { /* splitmix64's finaliser */
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

static int descending(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x < y) - (x > y);
}

/* The measured shares of `from` experts as `to` experts with the same
 * spread: the sorted shares read as a quantile function at `to` evenly
 * spaced points from the largest to the smallest (linear between
 * neighbours, so no two experts tie unless measured so), renormalised, then
 * dealt to the experts in an order fixed by (layer, to), so the hot ones
 * land on arbitrary ranks. to == from: the shares as measured, where
 * measured. */
static void resample(const double *shares, int from, int to, int layer, double *sorted,
                     double *out) {
    if (to == from) {
        memcpy(out, shares, (size_t)to * sizeof(double));
        return;
    }
    memcpy(sorted, shares, (size_t)from * sizeof(double));
    qsort(sorted, (size_t)from, sizeof(double), descending);
    double total = 0.0;
    for (int j = 0; j < to; j++) {
        const double x = to > 1 ? (double)j * (from - 1) / (to - 1) : 0.0;
        const int i = (int)x;
        out[j] = i + 1 < from ? sorted[i] + (x - i) * (sorted[i + 1] - sorted[i]) : sorted[i];
        total += out[j];
    }
    for (int j = 0; j < to; j++) out[j] /= total;
    for (int j = to - 1; j > 0; j--) { /* Fisher-Yates */
        const uint64_t key = ((uint64_t)layer << 40) ^ ((uint64_t)to << 20) ^ (uint64_t)j;
        const int other = (int)(mix(key) % (uint64_t)(j + 1));
        const double value = out[j];
        out[j] = out[other], out[other] = value;
    }
}

/* counts[p][e] = T k share[e] for every rank p, rounded so that each rank
 * routes exactly T k rows. */
static void fill_counts(const scenario *sc, int k, const double *share, int32_t *counts) {
    const double rows = (double)sc->tokens_per_rank * k;
    double cumulative = 0.0;
    int64_t placed = 0;
    for (int e = 0; e < sc->experts; e++) {
        cumulative += share[e];
        const int64_t upto = e == sc->experts - 1 ? (int64_t)rows : llround(cumulative * rows);
        for (int p = 0; p < sc->ranks; p++)
            counts[(int64_t)p * sc->experts + e] = (int32_t)(upto - placed);
        placed = upto;
    }
}

/* Per rank q, one layer's rows under the decision `shadowed` (see workspace). */
static void layer_rows(const scenario *sc, const int32_t *counts, const uint8_t *shadowed,
                       workspace *w) {
    const int P = sc->ranks, E = sc->experts, per_rank = E / P;
    for (int q = 0; q < P; q++)
        w->computed[q] = w->shadow_rows[q] = w->sent[q] = w->received[q] = w->owned[q] = 0;
    for (int e = 0; e < E; e++) {
        const int owner = e / per_rank;
        if (shadowed[e]) w->owned[owner]++;
        for (int p = 0; p < P; p++) {
            const double rows = counts[(int64_t)p * E + e];
            if (shadowed[e]) {
                w->shadow_rows[p] += rows;
                continue;
            }
            w->computed[owner] += rows;
            if (p != owner) w->sent[p] += rows, w->received[owner] += rows;
        }
    }
}

static double max_of(const double *values, int n) {
    double most = values[0];
    for (int i = 1; i < n; i++) most = fmax(most, values[i]);
    return most;
}

/* The layer's exchanges: the counts, the rows 4 times (dispatch and combine,
 * forward and backward), and with shadowing the weights out to every rank
 * (a ring: each rank takes in every block but its own) and their gradients
 * back to the owners (an Alltoallv). */
static double layer_alltoall(const inputs *in, const scenario *sc, const shadow_problem *problem,
                             const workspace *w, int count) {
    const cost_fit *a = &in->alltoall;
    const int P = sc->ranks;
    const double peers = P - 1, weight_bytes = 4.0 * (double)problem->weight_floats;
    double rows_most = 0.0, fewest_owned = count, gradients_most = 0.0;
    for (int q = 0; q < P; q++) {
        rows_most = fmax(rows_most, fmax(w->sent[q], w->received[q]));
        fewest_owned = fmin(fewest_owned, w->owned[q]);
        gradients_most = fmax(gradients_most, fmax(count - w->owned[q], peers * w->owned[q]));
    }
    double seconds =
        a->alpha * peers + 4 * (a->alpha * peers + a->beta * 4.0 * in->shape.d_model * rows_most);
    if (count > 0)
        seconds += 2 * a->alpha * peers +
                   a->beta * weight_bytes * ((count - fewest_owned) + gradients_most);
    return seconds;
}

static int by_load(const void *a, const void *b) {
    const double x = ((const ranked *)a)->load, y = ((const ranked *)b)->load;
    return (x > y) - (x < y);
}

/* The experts' phase of a layer, load [P] seconds of work per rank at a
 * core of its own, on `cores` cores shared by processor sharing: while n
 * ranks still compute, each runs at min(1, cores / n) of a core (Open MPI
 * yields the core of a waiting rank when the node is oversubscribed). Sets
 * finish [P], when each rank is done, and returns the last; with a core per
 * rank, finish = load. spin: a waiting rank keeps its share instead (busy
 * polling), so every rank runs at cores / P throughout. */
static double share_cores(const double *load, int ranks, double cores, bool spin, workspace *w) {
    if (spin) { /* every rank at cores / P of a core throughout */
        const double speed = fmin(1.0, cores / ranks);
        for (int q = 0; q < ranks; q++) w->finish[q] = load[q] / speed;
        return max_of(w->finish, ranks);
    }
    for (int q = 0; q < ranks; q++) w->ranked[q] = (ranked){load[q], q};
    qsort(w->ranked, (size_t)ranks, sizeof(ranked), by_load);
    double now = 0.0, done = 0.0; /* work done so far by each rank still running */
    for (int i = 0; i < ranks; i++) {
        const double speed = fmin(1.0, cores / (ranks - i));
        now += (w->ranked[i].load - done) / speed;
        done = w->ranked[i].load;
        w->finish[w->ranked[i].rank] = now;
    }
    return now;
}

/* Adds one layer of one sample to *f; t_row: seconds per row computed at a
 * core of its own; cores: the cores the ranks share. */
static void add_layer_figures(const inputs *in, const scenario *sc, const shadow_problem *problem,
                              workspace *w, int count, double t_row, double cores,
                              step_figures *f) {
    const int P = sc->ranks;
    double total = 0.0;
    for (int q = 0; q < P; q++) {
        w->computed[q] *= t_row; /* rows -> seconds */
        total += w->computed[q];
    }
    const double last = share_cores(w->computed, P, cores, in->spin, w);
    const double speed = fmin(1.0, cores / P);
    f->experts += last + max_of(w->shadow_rows, P) * t_row / speed; /* the copies: balanced */
    for (int q = 0; q < P; q++) w->wait[q] += last - w->finish[q];
    f->imbalance += last - total / P / speed;
    f->alltoall += layer_alltoall(in, sc, problem, w, count);
    f->shadowed += (double)count / in->shape.moe_layers;
}

/* The share of a core each rank gets when all compute: 1, or cores / P
 * when the P ranks share fewer cores. */
static double core_share(const inputs *in, int ranks) {
    return in->cores > 0 && in->cores < ranks ? (double)in->cores / ranks : 1.0;
}

static double row_flops(const model_shape *shape) {
    return 6.0 * shape->matrices * shape->d_model * shape->hidden;
}

/* The dense part of a step per token (s) at a core of its own: the one-rank
 * step less its experts (every row at the measured rate). */
static double dense_per_token(const inputs *in) {
    const model_shape *m = &in->shape;
    const double rows = (double)m->moe_layers * m->tokens_per_step * m->k;
    const double dense = in->one_rank_step - rows * row_flops(m) / in->expert_flops;
    if (dense <= 0)
        fail("--one-rank-ms %.0f is less than the experts' %.0f ms at --expert-gflops %.1f",
             1e3 * in->one_rank_step, 1e3 * (in->one_rank_step - dense), in->expert_flops / 1e9);
    return dense / m->tokens_per_step;
}

/* The step's all-reduces: the dense gradients (a ring) and, for their
 * latency only, the L + 1 small ones of the routers and the loss. */
static double step_allreduce(const inputs *in, int ranks) {
    const cost_fit *r = &in->allreduce;
    const double bytes = 4.0 * (double)in->dense_params;
    return r->alpha * ceil_log2(ranks) * (in->shape.moe_layers + 2) +
           r->beta * 2.0 * (ranks - 1) / ranks * bytes;
}

/* One step of routing sample `sample` in scenario sc. */
static step_figures estimate_sample(const inputs *in, const scenario *sc, int sample,
                                    workspace *w) {
    const model_shape *m = &in->shape;
    const routing *r = &in->routing;
    const double share_of_core = core_share(in, sc->ranks);
    const double cores = in->cores > 0 ? in->cores : sc->ranks;
    const double t_row = row_flops(m) / in->expert_flops; /* at a core of its own */
    const shadow_problem problem = shadow_problem_for(sc->ranks, sc->experts, m->d_model, m->hidden,
                                                      m->matrices, sc->mode, m->float_cost);
    step_figures f = {0};
    for (int q = 0; q < sc->ranks; q++) w->wait[q] = 0;
    for (int l = 0; l < m->moe_layers; l++) {
        const double *measured = r->share + ((size_t)sample * r->layers + (size_t)l) * r->experts;
        resample(measured, r->experts, sc->experts, l, w->sorted, w->share);
        fill_counts(sc, m->k, w->share, w->counts);
        int count = 0;
        memset(w->shadowed, 0, (size_t)sc->experts);
        if (sc->mode != SHADOW_OFF)
            count = shadow_decide(&problem, w->counts, w->rank_cost, w->shadowed);
        layer_rows(sc, w->counts, w->shadowed, w);
        add_layer_figures(in, sc, &problem, w, count, t_row, cores, &f);
    }
    f.wait = max_of(w->wait, sc->ranks);
    f.dense = dense_per_token(in) * (double)sc->tokens_per_rank / share_of_core;
    f.allreduce = step_allreduce(in, sc->ranks);
    f.step = f.dense + f.experts + f.alltoall + f.allreduce;
    return f;
}

static bool make_workspace(const inputs *in, const scenario *sc, workspace *w) {
    const size_t P = (size_t)sc->ranks, E = (size_t)sc->experts;
    w->counts = malloc(P * E * sizeof(int32_t));
    w->rank_cost = malloc(P * sizeof(int64_t));
    w->shadowed = malloc(E);
    w->share = malloc(E * sizeof(double));
    w->sorted = malloc((size_t)in->routing.experts * sizeof(double));
    double **per_rank[] = {&w->computed, &w->shadow_rows, &w->sent,  &w->received,
                           &w->owned,    &w->wait,        &w->finish};
    w->ranked = malloc(P * sizeof(ranked));
    bool ok = w->counts && w->rank_cost && w->shadowed && w->share && w->sorted && w->ranked;
    for (size_t i = 0; i < sizeof per_rank / sizeof per_rank[0]; i++)
        ok = (*per_rank[i] = malloc(P * sizeof(double))) && ok;
    return ok;
}

static void free_workspace(workspace *w) {
    void *all[] = {w->counts,   w->rank_cost,   w->shadowed, w->share,    w->sorted,
                   w->computed, w->shadow_rows, w->sent,     w->received, w->owned,
                   w->wait,     w->finish,      w->ranked};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) free(all[i]);
}

/* Each figure's median over the routing samples (as cmoe bench reports
 * each figure's median over its steps). */
static step_figures estimate(const inputs *in, const scenario *sc) {
    const int n = in->routing.samples;
    workspace w = {0};
    double *values = malloc((size_t)n * FIGURES * sizeof(double));
    if (!values || !make_workspace(in, sc, &w))
        fail("out of memory for %d ranks x %d experts", sc->ranks, sc->experts);
    for (int s = 0; s < n; s++) {
        const step_figures f = estimate_sample(in, sc, s, &w);
        const double each[FIGURES] = {f.step,      f.dense,    f.experts,   f.wait,
                                      f.imbalance, f.alltoall, f.allreduce, f.shadowed};
        for (int i = 0; i < FIGURES; i++) values[(size_t)i * n + s] = each[i];
    }
    step_figures out;
    double *fields[FIGURES] = {&out.step,      &out.dense,    &out.experts,   &out.wait,
                               &out.imbalance, &out.alltoall, &out.allreduce, &out.shadowed};
    for (int i = 0; i < FIGURES; i++) *fields[i] = bench_median(values + (size_t)i * n, n);
    free_workspace(&w);
    free(values);
    return out;
}

/* ---- the scenarios and the report ------------------------------------------------ */

typedef struct options {
    const char *recipe, *routing, *comm;
    const char *sets[MAX_SETS];
    int n_sets;
    int64_t first_step, last_step;
    comm_filter filter;
    int ranks[MAX_LIST], n_ranks;
    shadow_mode modes[SHADOW_MODE_COUNT];
    int n_modes;
    bool strong, json;
    int64_t tokens_per_rank; /* 0: the recipe's tokens / 2 (weak) */
    expert_rule experts;
} options;

/* E at P ranks under the rule; fails when cmoe could not split them. */
static int experts_at(const options *o, int base, int ranks) {
    int experts = base;
    if (o->experts == EXPERTS_MAX && ranks > base) experts = ranks;
    if (o->experts == EXPERTS_PER_RANK) experts = base / 2 * ranks;
    if (experts % ranks != 0)
        fail("cmoe splits the experts evenly over the ranks: not %d over %d", experts, ranks);
    if ((int64_t)experts * ranks > MAX_CELLS)
        fail("%d experts x %d ranks is more than this program models", experts, ranks);
    return experts;
}

static scenario make_scenario(const options *o, const inputs *in, int ranks, shadow_mode mode) {
    const int64_t tokens = in->shape.tokens_per_step;
    int64_t per_rank = o->tokens_per_rank > 0 ? o->tokens_per_rank : tokens / 2;
    if (o->strong) per_rank = tokens / ranks;
    if (per_rank < 1) fail("no tokens per rank at %d ranks", ranks);
    return (scenario){ranks, experts_at(o, in->shape.experts, ranks), per_rank, mode};
}

static void print_json(const scenario *sc, const step_figures *f) {
    printf("PREDICT {\"ranks\": %d, \"experts\": %d, \"tokens_per_rank\": %lld, \"shadow\": "
           "\"%s\", \"step_ms\": %.2f, \"dense_ms\": %.2f, \"experts_ms\": %.2f, \"wait_ms\": "
           "%.2f, \"imbalance_ms\": %.2f, \"alltoall_ms\": %.2f, \"allreduce_ms\": %.2f, "
           "\"shadowed_per_call\": %.2f, \"tok_s_per_rank\": %.1f}\n",
           sc->ranks, sc->experts, (long long)sc->tokens_per_rank, shadow_mode_names[sc->mode],
           1e3 * f->step, 1e3 * f->dense, 1e3 * f->experts, 1e3 * f->wait, 1e3 * f->imbalance,
           1e3 * f->alltoall, 1e3 * f->allreduce, f->shadowed,
           (double)sc->tokens_per_rank / f->step);
}

static void print_row(const scenario *sc, const step_figures *f) {
    printf(
        "| %d | %d | %lld | %s | %.0f | %.0f | %.1f%% | %.1f%% | %.1f%% | %.1f%% | %.2f | %.0f / "
        "%.0f |\n",
        sc->ranks, sc->experts, (long long)sc->tokens_per_rank, shadow_mode_names[sc->mode],
        1e3 * f->step, (double)sc->tokens_per_rank / f->step, 100 * f->alltoall / f->step,
        100 * f->allreduce / f->step, 100 * f->wait / f->step, 100 * f->imbalance / f->step,
        f->shadowed, 1e3 * f->dense, 1e3 * f->experts);
}

/* The busiest expert's load over the mean, per layer, median over samples. */
static void print_skew(const routing *r) {
    double *values = malloc((size_t)r->samples * sizeof(double));
    if (!values) fail("out of memory for the routing summary");
    printf("  busiest expert / mean, per MoE layer (median over the samples):");
    for (int l = 0; l < r->layers; l++) {
        for (int s = 0; s < r->samples; s++) {
            const double *share = r->share + ((size_t)s * r->layers + (size_t)l) * r->experts;
            values[s] = max_of(share, r->experts) * r->experts;
        }
        printf(" %.2f", bench_median(values, r->samples));
    }
    printf("\n");
    free(values);
}

static void print_inputs(const options *o, const inputs *in) {
    const model_shape *m = &in->shape;
    const routing *r = &in->routing;
    const double dense = dense_per_token(in) * m->tokens_per_step;
    printf("model: %s: %d MoE layers of %d experts (%d x %d, %d matrices), top-%d, %lld tokens "
           "per step, %lld dense parameters\n",
           o->recipe, m->moe_layers, m->experts, m->d_model, m->hidden, m->matrices, m->k,
           (long long)m->tokens_per_step, (long long)in->dense_params);
    printf("routing: %s, %d sample(s) of %d layers x %d experts (steps %lld..%lld)\n", o->routing,
           r->samples, r->layers, r->experts, (long long)r->step[0],
           (long long)r->step[r->samples - 1]);
    print_skew(r);
    printf("compute: experts %.1f GFLOP/s per rank; one-rank step %.0f ms = dense %.0f ms + "
           "experts %.0f ms\n",
           in->expert_flops / 1e9, 1e3 * in->one_rank_step, 1e3 * dense,
           1e3 * (in->one_rank_step - dense));
    const cost_fit *fits[2] = {&in->alltoall, &in->allreduce};
    const char *names[2] = {"all-to-all: alpha %.1f us per peer", "all-reduce: alpha %.1f us "
                                                                  "per level"};
    for (int i = 0; i < 2; i++) {
        printf(names[i], 1e6 * fits[i]->alpha);
        printf(", beta %.3f GB/s (%s, worst error %.0f%%)\n",
               fits[i]->beta > 0 ? 1e-9 / fits[i]->beta : INFINITY, fits[i]->source,
               100 * fits[i]->worst_error);
    }
    const char *rules[] = {"moe.num_experts", "max(moe.num_experts, P)", "moe.num_experts / 2 x P"};
    printf("scaling: %s, experts %s, ",
           o->strong ? "strong (the recipe's batch over P)" : "weak (tokens per rank fixed)",
           rules[o->experts]);
    if (in->cores > 0)
        printf("the ranks share %d cores (a waiting rank %s)\n", in->cores,
               in->spin ? "keeps its share" : "yields its core");
    else
        printf("a core per rank\n");
}

static void report(const options *o, const inputs *in) {
    scenario scenarios[MAX_LIST * SHADOW_MODE_COUNT];
    int n = 0;
    for (int i = 0; i < o->n_ranks; i++) /* every one checked before anything is printed */
        for (int j = 0; j < o->n_modes; j++)
            scenarios[n++] = make_scenario(o, in, o->ranks[i], o->modes[j]);
    if (!o->json) {
        print_inputs(o, in);
        printf("\n| ranks | experts | tokens/rank | shadow | step ms | tok/s per rank | "
               "all-to-all | all-reduce | wait | imbalance | shadowed / layer call | dense / "
               "experts ms |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | "
               "--- |\n");
    }
    for (int i = 0; i < n; i++) {
        const step_figures f = estimate(in, &scenarios[i]);
        if (o->json)
            print_json(&scenarios[i], &f);
        else
            print_row(&scenarios[i], &f);
    }
}

/* ---- the command line ------------------------------------------------------------ */

static const char usage[] =
    "usage: scaling_model RECIPE --routing METRICS --expert-gflops G --one-rank-ms S\n"
    "                     --dense-params N (--comm FILE | --alltoall US:GBS --allreduce US:GBS)\n"
    "                     [options]\n"
    "\n"
    "Predicts RECIPE's expert-parallel training step (a language model with top-k MoE\n"
    "layers, every rank in one expert-parallel group) at P ranks: the step time, the\n"
    "shares of the all-to-all, the all-reduce and the wait for the slowest rank, tokens/s\n"
    "per rank and the experts shadowed per MoE layer call, with parallel.shadow_experts\n"
    "off and auto (decided by cmoe's own shadow_decide). docs/scaling.md has the model and\n"
    "its assumptions; bench/scaling.sh measures the inputs and checks the model against\n"
    "cmoe bench at 2 and 4 ranks.\n"
    "\n"
    "Measured inputs:\n"
    "  --routing FILE         a metrics.jsonl: its \"moe\" lines (each expert's rows per MoE\n"
    "                         layer and log step; a sample per step), or else its last line\n"
    "                         with layer_expert_tokens (one sample)\n"
    "  --routing-steps A:B    only the samples of steps A..B\n"
    "  --expert-gflops G      the experts' forward + backward GFLOP/s of one rank with one\n"
    "                         thread in a step (bench/scaling.sh measures it)\n"
    "  --one-rank-ms S        RECIPE's step at 1 rank x 1 thread (cmoe bench --threads 1)\n"
    "  --dense-params N       the replicated parameters (metrics.jsonl: parameters less\n"
    "                         expert_parameters), all-reduced every step\n"
    "  --comm FILE            bench_alltoall's lines, to fit time = alpha x + beta bytes\n"
    "  --comm-ranks LIST      fit only the lines of these rank counts (default: all)\n"
    "  --alltoall-bytes A:B   fit the ALLTOALLV lines of A..B bytes per pair\n"
    "                         (default 16384:4194304)\n"
    "  --allreduce-bytes A:B  fit the ALLREDUCE lines of A..B bytes (default 65536:16777216)\n"
    "  --alltoall US:GBS      the all-to-all's alpha (us per peer) and bandwidth (GB/s)\n"
    "                         instead of a fit; --allreduce US:GBS: alpha per tree level\n"
    "Scenarios:\n"
    "  --ranks LIST           rank counts, e.g. 2,4,8 (default 2,4,8,16,32,64)\n"
    "  --scaling weak|strong  weak (default): tokens per rank fixed at the recipe's tokens\n"
    "                         per step / 2, its 2-rank value; strong: tokens per step / P\n"
    "  --tokens-per-rank T    weak scaling with T tokens per rank\n"
    "  --experts RULE         max (default): max(moe.num_experts, P); fixed:\n"
    "                         moe.num_experts; per-rank: moe.num_experts / 2 per rank\n"
    "  --shadow LIST          modes of parallel.shadow_experts (default off,auto)\n"
    "  --cores C              the ranks share C cores: when P > C, the dense part at C / P\n"
    "                         of a core, the experts by processor sharing (see --waiting)\n"
    "  --waiting yield|spin   with P > C, a waiting rank gives its core to those still\n"
    "                         computing (yield, the default: Open MPI when oversubscribed)\n"
    "                         or keeps its share (spin): the two ends of what MPI does\n"
    "  --set K=V              override a recipe key (repeatable)\n"
    "  --json                 one PREDICT line of JSON per scenario instead of the table\n"
    "Exit status: 0 done, 1 an input cannot be used, 2 bad usage.\n";

/* Prints "scaling_model: MESSAGE (see --help)" and exits with status 2. */
static _Noreturn __attribute__((format(printf, 1, 2))) void bad_usage(const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    fprintf(stderr, "scaling_model: ");
    vfprintf(stderr, fmt, args);
    fprintf(stderr, " (see --help)\n");
    va_end(args);
    exit(2);
}

/* A bad value of an option. */
static _Noreturn void bad_value(const char *flag, const char *value) {
    bad_usage("%s does not take '%s'", flag, value ? value : "");
}

static double parse_number(const char *flag, const char *text, double low, double high) {
    char *end;
    double value = strtod(text ? text : "", &end);
    if (!text || !*text || *end || !(value >= low && value <= high)) bad_value(flag, text);
    return value;
}

/* "A:B" -> *a, *b (ordered: A <= B) */
static void parse_pair(const char *flag, const char *text, bool ordered, double *a, double *b) {
    const char *colon = text ? strchr(text, ':') : NULL;
    char first[64];
    if (!colon || colon - text >= (long)sizeof first) bad_value(flag, text);
    memcpy(first, text, (size_t)(colon - text));
    first[colon - text] = 0;
    *a = parse_number(flag, first, 0, 1e18);
    *b = parse_number(flag, colon + 1, 0, 1e18);
    if (ordered && *b < *a) bad_value(flag, text);
}

/* "2,4,8" -> values (each in [2, MAX_SCENARIO_RANKS]) */
static int parse_ranks(const char *flag, const char *text, int *values) {
    int n = 0;
    const char *at = text ? text : "";
    while (*at) {
        char *end;
        long value = strtol(at, &end, 10);
        if (end == at || value < 2 || value > MAX_SCENARIO_RANKS || n == MAX_LIST)
            bad_value(flag, text);
        values[n++] = (int)value;
        at = *end == ',' ? end + 1 : end;
        if (*end && *end != ',') bad_value(flag, text);
    }
    if (n == 0) bad_value(flag, text);
    return n;
}

static int parse_modes(const char *text, shadow_mode *modes) {
    char copy[128];
    int n = 0;
    if (!text || strlen(text) >= sizeof copy) bad_value("--shadow", text);
    strcpy(copy, text);
    for (char *name = strtok(copy, ","); name; name = strtok(NULL, ",")) {
        int mode = 0;
        while (shadow_mode_names[mode] && strcmp(shadow_mode_names[mode], name)) mode++;
        if (!shadow_mode_names[mode] || n == SHADOW_MODE_COUNT) bad_value("--shadow", text);
        modes[n++] = (shadow_mode)mode;
    }
    if (n == 0) bad_value("--shadow", text);
    return n;
}

static void parse_cost(const char *flag, const char *text, cost_fit *fit) {
    double microseconds, gigabytes;
    parse_pair(flag, text, false, &microseconds, &gigabytes);
    if (gigabytes <= 0) bad_value(flag, text);
    *fit = (cost_fit){.alpha = 1e-6 * microseconds, .beta = 1e-9 / gigabytes};
    snprintf(fit->source, sizeof fit->source, "given: %s", text);
}

/* The measured inputs given on the command line. */
typedef struct given {
    double expert_gflops, one_rank_ms, dense_params;
} given;

/* An option of the measured inputs with its value; false: not one of them. */
static bool input_option(const char *flag, const char *value, options *o, given *g, inputs *in) {
    double a, b;
    if (!strcmp(flag, "--routing")) {
        o->routing = value;
    } else if (!strcmp(flag, "--routing-steps")) {
        parse_pair(flag, value, true, &a, &b);
        o->first_step = (int64_t)a, o->last_step = (int64_t)b;
    } else if (!strcmp(flag, "--expert-gflops")) {
        g->expert_gflops = parse_number(flag, value, 1e-3, 1e9);
    } else if (!strcmp(flag, "--one-rank-ms")) {
        g->one_rank_ms = parse_number(flag, value, 1e-3, 1e9);
    } else if (!strcmp(flag, "--dense-params")) {
        g->dense_params = parse_number(flag, value, 0, 1e15);
    } else if (!strcmp(flag, "--comm")) {
        o->comm = value;
    } else if (!strcmp(flag, "--comm-ranks")) {
        o->filter.n_ranks = parse_ranks(flag, value, o->filter.ranks);
    } else if (!strcmp(flag, "--alltoall-bytes")) {
        parse_pair(flag, value, true, &o->filter.alltoall_min, &o->filter.alltoall_max);
    } else if (!strcmp(flag, "--allreduce-bytes")) {
        parse_pair(flag, value, true, &o->filter.allreduce_min, &o->filter.allreduce_max);
    } else if (!strcmp(flag, "--alltoall")) {
        parse_cost(flag, value, &in->alltoall);
    } else if (!strcmp(flag, "--allreduce")) {
        parse_cost(flag, value, &in->allreduce);
    } else {
        return false;
    }
    return true;
}

/* An option of the scenarios with its value; false: not one of them. */
static bool scenario_option(const char *flag, const char *value, options *o, inputs *in) {
    if (!strcmp(flag, "--ranks")) {
        o->n_ranks = parse_ranks(flag, value, o->ranks);
    } else if (!strcmp(flag, "--scaling")) {
        if (strcmp(value, "weak") && strcmp(value, "strong")) bad_value(flag, value);
        o->strong = !strcmp(value, "strong");
    } else if (!strcmp(flag, "--tokens-per-rank")) {
        o->tokens_per_rank = (int64_t)parse_number(flag, value, 1, 1e12);
    } else if (!strcmp(flag, "--experts")) {
        const char *rules[] = {"fixed", "max", "per-rank"};
        int rule = 0;
        while (rule < 3 && strcmp(rules[rule], value)) rule++;
        if (rule == 3) bad_value(flag, value);
        o->experts = (expert_rule)rule;
    } else if (!strcmp(flag, "--shadow")) {
        o->n_modes = parse_modes(value, o->modes);
    } else if (!strcmp(flag, "--cores")) {
        in->cores = (int)parse_number(flag, value, 1, 1e6);
    } else if (!strcmp(flag, "--waiting")) {
        if (strcmp(value, "yield") && strcmp(value, "spin")) bad_value(flag, value);
        in->spin = !strcmp(value, "spin");
    } else if (!strcmp(flag, "--set")) {
        if (o->n_sets == MAX_SETS) bad_usage("more than %d --set", MAX_SETS);
        o->sets[o->n_sets++] = value;
    } else {
        return false;
    }
    return true;
}

static void parse_args(int argc, char **argv, options *o, given *g, inputs *in) {
    for (int i = 1; i < argc; i++) {
        const char *flag = argv[i], *value = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(flag, "--help") || !strcmp(flag, "-h")) {
            fputs(usage, stdout);
            exit(0);
        } else if (!strcmp(flag, "--json")) {
            o->json = true;
        } else if (flag[0] != '-') {
            if (o->recipe) bad_usage("a second RECIPE '%s'", flag);
            o->recipe = flag;
        } else if (!value) {
            bad_usage("no value after %s", flag);
        } else if (input_option(flag, value, o, g, in) || scenario_option(flag, value, o, in)) {
            i++;
        } else {
            bad_usage("unknown option %s", flag);
        }
    }
    if (!o->recipe) bad_usage("no RECIPE");
    if (!o->routing) bad_usage("no --routing");
    if (!(g->expert_gflops > 0) || !(g->one_rank_ms > 0))
        bad_usage("--expert-gflops and --one-rank-ms are needed");
    if (!(g->dense_params >= 0)) bad_usage("--dense-params is needed");
    if (!o->comm && (in->alltoall.source[0] == 0 || in->allreduce.source[0] == 0))
        bad_usage("--comm, or both --alltoall and --allreduce, are needed");
}

/* The step's shape from the recipe: an LM whose MoE layers route top-k. */
static model_shape load_shape(const options *o) {
    cm_recipe recipe;
    if (recipe_load(o->recipe, o->sets, o->n_sets, &recipe) != CM_OK)
        fail("%s", cm_error_message());
    if (recipe.model.arch != CM_ARCH_TRANSFORMER_LM || !recipe.moe.enabled)
        fail("%s: not a language model with MoE layers (model.arch transformer_lm, moe.enabled)",
             o->recipe);
    if (recipe.train.grad_accum != 1) fail("%s: train.grad_accum must be 1", o->recipe);
    model_shape m = {.d_model = recipe.model.d_model,
                     .hidden = recipe_expert_hidden(&recipe),
                     .matrices = recipe.moe.activation == AG_ACT_SWIGLU ? 3 : 2,
                     .k = recipe.router.k,
                     .experts = recipe.moe.num_experts,
                     .tokens_per_step = (int64_t)recipe.data.batch_size * recipe.data.seq_len,
                     .float_cost = recipe.parallel.shadow_float_cost};
    for (int l = 0; l < recipe.model.n_layers; l++) m.moe_layers += recipe_layer_is_moe(&recipe, l);
    return m;
}

int main(int argc, char **argv) {
    options o = {.first_step = INT64_MIN,
                 .last_step = INT64_MAX,
                 .filter = {.alltoall_min = 16384,
                            .alltoall_max = 4194304,
                            .allreduce_min = 65536,
                            .allreduce_max = 16777216},
                 .ranks = {2, 4, 8, 16, 32, 64},
                 .n_ranks = 6,
                 .modes = {SHADOW_OFF, SHADOW_AUTO},
                 .n_modes = 2,
                 .experts = EXPERTS_MAX};
    given g = {.dense_params = -1};
    static inputs in;
    parse_args(argc, argv, &o, &g, &in);
    in.shape = load_shape(&o);
    read_routing(&in.routing, o.routing, o.first_step, o.last_step);
    if (in.routing.layers != in.shape.moe_layers)
        fail("the routing file has another number of MoE layers than %s", o.recipe);
    in.expert_flops = 1e9 * g.expert_gflops;
    in.one_rank_step = 1e-3 * g.one_rank_ms;
    in.dense_params = (int64_t)g.dense_params;
    if (o.comm) fit_comm(o.comm, &o.filter, &in.alltoall, &in.allreduce);
    report(&o, &in);
    free(in.routing.share);
    free(in.routing.seen);
    return 0;
}
