#include "study/study_run.h"

#include <cblas.h>
#include <errno.h>
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/fs.h"
#include "parallel/comm.h"
#include "study/report.h"
#include "train/checkpoint.h"
#include "train/merge.h"
#include "train/metrics.h"
#include "train/recipe.h"
#include "train/run.h"
#include "train/upcycle.h"

enum { PATH_CAP = 4096, OUT_CAP = 1024, CONFIG_CAP = 8192, MAX_SETS = STUDY_MAX_OVERRIDES + 8 };

/* ---- files ------------------------------------------------------------------------ */

/* The value after "key\t" in a state file (study-run.txt); false if absent. */
static bool state_value(const char *path, const char *key, char *value, size_t capacity) {
    FILE *file = fopen(path, "r");
    if (!file) return false;
    char *line = NULL;
    size_t size = 0;
    bool found = false;
    const size_t key_length = strlen(key);
    while (!found && getline(&line, &size, file) > 0) {
        if (strncmp(line, key, key_length) != 0 || line[key_length] != '\t') continue;
        snprintf(value, capacity, "%s", line + key_length + 1);
        value[strcspn(value, "\n")] = '\0';
        found = true;
    }
    free(line);
    fclose(file);
    return found;
}

/* Writes the state file whole (a temporary, then rename: never half written). */
static cm_status write_state(const char *dir, const char *config, bool done, double seconds) {
    char path[PATH_CAP], temporary[PATH_CAP + 8];
    snprintf(path, sizeof path, "%s/study-run.txt", dir);
    snprintf(temporary, sizeof temporary, "%s.tmp", path);
    FILE *file = fopen(temporary, "w");
    if (!file) return CM_ERR(CM_ERR_IO, "%s: cannot write: %s", temporary, strerror(errno));
    fprintf(file, "config\t%s\nstatus\t%s\nseconds\t%.3f\n", config, done ? "done" : "started",
            seconds);
    if (fclose(file) != 0 || rename(temporary, path) != 0)
        return CM_ERR(CM_ERR_IO, "%s: cannot write: %s", path, strerror(errno));
    return CM_OK;
}

/* ---- metrics -------------------------------------------------------------------------- */

/* Element `index` of the array after "key": in a line; false if absent. */
static bool find_array_number(const char *line, const char *key, int index, double *value) {
    char pattern[160];
    snprintf(pattern, sizeof pattern, "\"%s\": [", key);
    const char *at = strstr(line, pattern);
    if (!at) return false;
    at += strlen(pattern);
    for (int i = 0; i < index; i++) {
        at = strpbrk(at, ",]");
        if (!at || *at == ']') return false;
        at++;
    }
    char *end;
    *value = strtod(at, &end);
    return end != at;
}

/* The metric from the last line of its source's kind in FILE (keeps *value
 * and returns false when there is none). */
static bool metric_in_file(const char *path, const study_metric *metric, double *value) {
    FILE *file = fopen(path, "r");
    if (!file) return false;
    char *line = NULL;
    size_t size = 0;
    bool found = false;
    while (getline(&line, &size, file) > 0) {
        if (!metrics_is_kind(line, metric->source)) continue;
        double v;
        bool has = metric->index < 0 ? metrics_find_number(line, metric->field, &v)
                                     : find_array_number(line, metric->field, metric->index, &v);
        if (has) {
            *value = v;
            found = true;
        }
    }
    free(line);
    fclose(file);
    return found;
}

bool study_read_metric(const char *run_dir, const study_metric *metric, double *value) {
    char path[STUDY_PATH_CAP + 32];
    snprintf(path, sizeof path, "%s/metrics.jsonl", run_dir);
    bool found = metric_in_file(path, metric, value);
    snprintf(path, sizeof path, "%s/study-evals.jsonl", run_dir);
    return metric_in_file(path, metric, value) || found;
}

/* ---- one run -------------------------------------------------------------------------- */

typedef struct study_ctx {
    const study *s;
    const study_options *o;
    const study_preset *preset;
    char out_dir[OUT_CAP];
    int n_seeds, world_rank;
    bool leader;
    int total, done, skipped; /* runs of this invocation */
    double started, run_seconds_here;
    study_results *results;
} study_ctx;

typedef struct run_plan {
    int arm, seed;
    char dir[STUDY_PATH_CAP];
    const char *sets[MAX_SETS];
    char storage[3][STUDY_PATH_CAP + 32];
    int n_sets;
    char config[CONFIG_CAP];
} run_plan;

static void plan_run(const study_ctx *c, int arm, int seed, run_plan *p) {
    const study_arm *a = &c->s->arms[arm];
    *p = (run_plan){.arm = arm, .seed = seed};
    snprintf(p->dir, sizeof p->dir, "%s/%s/seed-%d", c->out_dir, a->name, seed);
    p->n_sets = study_arm_overrides(c->s, arm, (int)(c->preset - c->s->presets), p->sets);
    snprintf(p->storage[0], sizeof p->storage[0], "train.seed=%d", seed);
    snprintf(p->storage[1], sizeof p->storage[1], "train.out_dir=%s", p->dir);
    snprintf(p->storage[2], sizeof p->storage[2], "checkpoint.dir=%s", p->dir);
    for (int i = 0; i < 3; i++) p->sets[p->n_sets++] = p->storage[i];
    int length = snprintf(p->config, sizeof p->config, "%s", a->recipe);
    for (int i = 0; i < p->n_sets && length < (int)sizeof p->config; i++)
        length += snprintf(p->config + length, sizeof p->config - (size_t)length, " --set %s",
                           p->sets[i]);
    if (a->from >= 0 && length < (int)sizeof p->config)
        length += snprintf(p->config + length, sizeof p->config - (size_t)length, " --from %s%s",
                           c->s->arms[a->from].name, a->upcycle ? " --upcycle" : "");
    const study_merge *m = &a->merge_settings;
    if (a->merge && length < (int)sizeof p->config)
        length += snprintf(p->config + length, sizeof p->config - (size_t)length,
                           " --merge groups=%d,grouping=%s,align=%s,weights=%s,mode=%s,"
                           "calib_windows=%d,seed=%d",
                           m->groups, merge_grouping_names[m->grouping], m->align ? "on" : "off",
                           merge_weighting_names[m->weights], merge_mode_names[m->mode],
                           m->calib_windows, m->seed);
    if (a->evaluate_only && length < (int)sizeof p->config)
        snprintf(p->config + length, sizeof p->config - (size_t)length, " --evaluate-only");
}

/* 0: run it, 1: done already; an error when the directory holds another
 * configuration. Rank 0 decides; every rank gets the answer. */
static cm_status decide(const study_ctx *c, const run_plan *p, int *state) {
    char path[PATH_CAP], config[CONFIG_CAP] = "", status[32] = "";
    snprintf(path, sizeof path, "%s/study-run.txt", p->dir);
    int verdict = 0; /* 0 run, 1 done, 2 mismatch */
    if (c->leader && state_value(path, "config", config, sizeof config)) {
        if (strcmp(config, p->config) != 0)
            verdict = 2;
        else if (state_value(path, "status", status, sizeof status) && strcmp(status, "done") == 0)
            verdict = 1;
    }
    if (MPI_Bcast(&verdict, 1, MPI_INT, 0, MPI_COMM_WORLD) != MPI_SUCCESS)
        return CM_ERR(CM_ERR_MPI, "MPI_Bcast failed");
    if (verdict == 2)
        return CM_ERR(CM_ERR_INVALID,
                      "%s holds a run of another configuration (%s), not this one (%s); pass "
                      "another --out or remove it",
                      p->dir, config, p->config);
    *state = verdict;
    return CM_OK;
}

/* Appends one evaluation record to RUN/study-evals.jsonl (rank 0). */
static cm_status append_eval(const study_ctx *c, const char *dir, const metrics_record *record) {
    if (!c->leader) return CM_OK;
    char path[PATH_CAP];
    snprintf(path, sizeof path, "%s/study-evals.jsonl", dir);
    FILE *file = fopen(path, "a");
    if (!file) return CM_ERR(CM_ERR_IO, "%s: cannot write: %s", path, strerror(errno));
    metrics_format_record(file, record);
    fputc('\n', file);
    if (fclose(file) != 0) return CM_ERR(CM_ERR_IO, "%s: cannot write", path);
    return CM_OK;
}

/* The study's evaluations of the run's final checkpoint, each value with
 * its own recipe override. A signal stops them (*interrupted): the run is
 * not done, and its evaluations are made again when the study resumes. */
static cm_status evaluate_run(const study_ctx *c, const run_plan *p, const char *checkpoint,
                              const cm_comm *comm, bool *interrupted) {
    static const char *const splits[] = {"valid", "test", "train"};
    for (int e = 0; e < c->s->n_evaluations; e++) {
        const study_evaluation *ev = &c->s->evaluations[e];
        if (!ev->arms[p->arm]) continue;
        for (int v = 0; v < ev->n_values; v++) {
            const char *sets[MAX_SETS + 1];
            memcpy(sets, p->sets, sizeof(const char *) * (size_t)p->n_sets);
            char extra[STUDY_SET_CAP], kind[STUDY_NAME_CAP * 2 + 2];
            snprintf(extra, sizeof extra, "%s=%s", ev->key, ev->values[v]);
            sets[p->n_sets] = extra;
            cm_recipe recipe;
            CM_TRY(recipe_load(c->s->arms[p->arm].recipe, sets, p->n_sets + 1, &recipe));
            task_eval_request request = {0};
            for (int s = 0; s < 3; s++)
                if (strcmp(ev->split, splits[s]) == 0) request.split = (cm_split)s;
            task_eval eval;
            CM_TRY(run_evaluate(&recipe, checkpoint, &request, c->o->stop_requested, comm, &eval));
            if ((*interrupted = eval.stopped)) return CM_OK;
            snprintf(kind, sizeof kind, "%s=%s", ev->name, ev->values[v]);
            eval.record.kind = kind;
            CM_TRY(append_eval(c, p->dir, &eval.record));
            if (c->leader && !c->o->quiet) printf("[study]   %s: %s\n", kind, eval.text);
        }
    }
    return CM_OK;
}

/* Merges the source checkpoint `init` into `path` with the source arm's
 * recipe (the model it was trained as) and this arm's merge settings. */
static cm_status merge_source(const study_ctx *c, const run_plan *p, const char *init,
                              const char *path) {
    const int from = c->s->arms[p->arm].from;
    run_plan source;
    plan_run(c, from, p->seed, &source);
    cm_recipe recipe;
    CM_TRY(recipe_load(c->s->arms[from].recipe, source.sets, source.n_sets, &recipe));
    merge_options options;
    study_merge_options(c->s, p->arm, &options);
    CM_TRY(merge_checkpoint(init, &recipe, &options, path, NULL));
    if (!c->o->quiet) printf("[study]   merged %s -> %s\n", init, path);
    return CM_OK;
}

/* With upcycle or merge: turns the source checkpoint `init` into
 * RUN/upcycled.h5 or RUN/merged.h5 and points init at it. Rank 0 writes it
 * once: a file that exists is complete (both writers rename a finished
 * temporary), so a resumed run does not upcycle or merge again. */
static cm_status derive_start(const study_ctx *c, const run_plan *p, const cm_recipe *recipe,
                              char *init) {
    const study_arm *a = &c->s->arms[p->arm];
    if (!a->upcycle && !a->merge) return CM_OK;
    char path[PATH_CAP];
    snprintf(path, sizeof path, "%s/%s", p->dir, a->merge ? "merged.h5" : "upcycled.h5");
    int code = CM_OK;
    FILE *existing = c->leader ? fopen(path, "rb") : NULL;
    if (existing)
        fclose(existing);
    else if (c->leader)
        code = (int)(a->merge ? merge_source(c, p, init, path)
                              : upcycle_checkpoint(init, recipe, path, NULL));
    MPI_Bcast(&code, 1, MPI_INT, 0, MPI_COMM_WORLD);
    if (code != CM_OK)
        return c->leader ? (cm_status)code
                         : CM_ERR((cm_status)code, "rank 0 could not %s %s",
                                  a->merge ? "merge" : "upcycle", init);
    snprintf(init, PATH_CAP, "%s", path);
    return CM_OK;
}

/* The checkpoint an arm with `from` starts from (into init, PATH_CAP): the
 * final checkpoint of the source arm's run with the same seed, upcycled or
 * merged when the arm says so (derive_start). */
static cm_status starting_point(const study_ctx *c, const run_plan *p, const cm_recipe *recipe,
                                char *init) {
    const study_arm *a = &c->s->arms[p->arm], *source = &c->s->arms[a->from];
    char dir[STUDY_PATH_CAP + 64], path[PATH_CAP], status[32] = "";
    snprintf(dir, sizeof dir, "%s/%s/seed-%d", c->out_dir, source->name, p->seed);
    snprintf(path, sizeof path, "%s/study-run.txt", dir);
    if (!state_value(path, "status", status, sizeof status) || strcmp(status, "done") != 0)
        return CM_ERR(CM_ERR_INVALID,
                      "arm %s starts from arm %s's run %s, which is not done: run arm %s first "
                      "(the study runs the arms in file order)",
                      a->name, source->name, dir, source->name);
    CM_TRY(ckpt_find_latest(dir, init, PATH_CAP));
    return derive_start(c, p, recipe, init);
}

/* Trains (or resumes) the run from `init` (NULL: the recipe's init) and
 * finds its final checkpoint; *has_final: the run's own final evaluation is
 * in metrics.jsonl (not when it was resumed at its last step). */
static cm_status train_run(const study_ctx *c, const cm_recipe *recipe, const char *init,
                           const cm_comm *comm, char *checkpoint, bool *has_final,
                           bool *interrupted) {
    run_options options = {.resume = "auto",
                           .init = init,
                           .stop_requested = c->o->stop_requested,
                           .quiet = c->o->quiet,
                           .comm = comm};
    run_result result;
    CM_TRY(run_train(recipe, &options, &result));
    *interrupted = result.interrupted;
    *has_final = result.has_final;
    if (result.interrupted) return CM_OK;
    char dir[PATH_CAP];
    CM_TRY(recipe_checkpoint_dir(recipe, dir, sizeof dir));
    return ckpt_find_latest(dir, checkpoint, PATH_CAP);
}

/* Trains (or resumes) the run, evaluates it, marks it done. An
 * evaluate_only arm trains nothing: its starting point is the final model. */
static cm_status execute(study_ctx *c, const run_plan *p, const cm_recipe *recipe,
                         const cm_comm *comm, bool *interrupted) {
    const double start = cm_now();
    /* A run resumed after a stop adds to the time its earlier part took. */
    char path[PATH_CAP], text[64] = "0";
    snprintf(path, sizeof path, "%s/study-run.txt", p->dir);
    const double before = state_value(path, "seconds", text, sizeof text) ? atof(text) : 0.0;
    if (c->leader) {
        CM_TRY(cm_make_dirs(p->dir));
        CM_TRY(write_state(p->dir, p->config, false, before));
        snprintf(path, sizeof path, "%s/study-evals.jsonl", p->dir);
        remove(path);
    }
    const study_arm *a = &c->s->arms[p->arm];
    char init[PATH_CAP], checkpoint[PATH_CAP];
    if (a->from >= 0) CM_TRY(starting_point(c, p, recipe, init));
    bool has_final = false;
    if (a->evaluate_only)
        snprintf(checkpoint, sizeof checkpoint, "%s", init);
    else
        CM_TRY(train_run(c, recipe, a->from >= 0 ? init : NULL, comm, checkpoint, &has_final,
                         interrupted));
    if (!*interrupted && !has_final) { /* evaluate_only, or resumed at the last step */
        task_eval eval;
        CM_TRY(run_evaluate(recipe, checkpoint, NULL, c->o->stop_requested, comm, &eval));
        *interrupted = eval.stopped;
        if (!eval.stopped) CM_TRY(append_eval(c, p->dir, &eval.record));
        if (!eval.stopped && c->leader && !c->o->quiet) printf("[study]   %s\n", eval.text);
    }
    if (!*interrupted) CM_TRY(evaluate_run(c, p, checkpoint, comm, interrupted));
    if (*interrupted)
        return c->leader ? write_state(p->dir, p->config, false, before + cm_now() - start) : CM_OK;
    const double seconds = cm_now() - start;
    c->run_seconds_here += seconds;
    if (c->leader) CM_TRY(write_state(p->dir, p->config, true, before + seconds));
    return CM_OK;
}

static void print_progress(const study_ctx *c) {
    if (!c->leader) return;
    const int finished = c->done + c->skipped;
    const double elapsed = cm_now() - c->started;
    char eta[64] = "unknown";
    if (c->done > 0) {
        const double left = c->run_seconds_here / c->done * (c->total - finished);
        snprintf(eta, sizeof eta, "%d:%02d:%02d", (int)(left / 3600), (int)fmod(left / 60, 60),
                 (int)fmod(left, 60));
    }
    printf("[study] %s (%s): %d/%d runs done (%d were done before), elapsed %d:%02d:%02d, ETA %s\n",
           c->s->name, c->preset->name, finished, c->total, c->skipped, (int)(elapsed / 3600),
           (int)fmod(elapsed / 60, 60), (int)fmod(elapsed, 60), eta);
    fflush(stdout);
}

static cm_status run_one(study_ctx *c, int arm, int seed, bool *interrupted) {
    run_plan p;
    plan_run(c, arm, seed, &p);
    int state = 0;
    CM_TRY(decide(c, &p, &state));
    if (c->o->dry_run) {
        if (c->leader)
            printf("[study] run %d/%d: arm %s, seed %d -> %s: %s\n", c->done + c->skipped + 1,
                   c->total, c->s->arms[arm].name, seed, p.dir, state == 1 ? "done" : "to run");
        c->skipped++;
        return CM_OK;
    }
    if (state == 1) {
        c->skipped++;
        return CM_OK;
    }
    cm_recipe recipe;
    CM_TRY(recipe_load(c->s->arms[arm].recipe, p.sets, p.n_sets, &recipe));
    if (c->leader)
        printf("[study] run %d/%d: arm %s, seed %d -> %s\n", c->done + c->skipped + 1, c->total,
               c->s->arms[arm].name, seed, p.dir);
    fflush(stdout);
    cm_comm comm;
    CM_TRY(comm_init(&comm, recipe.parallel.expert_parallel));
    cm_status status = execute(c, &p, &recipe, &comm, interrupted);
    comm_free(&comm);
    CM_TRY(status);
    if (!*interrupted) c->done++;
    return CM_OK;
}

/* ---- the study ------------------------------------------------------------------------ */

static bool arm_selected(const study_ctx *c, int arm) {
    return !c->o->only_arm || strcmp(c->o->only_arm, c->s->arms[arm].name) == 0;
}

static void describe_machine(char *out, size_t size) {
    struct utsname host;
    char kernel[160] = "unknown";
    if (uname(&host) == 0) snprintf(kernel, sizeof kernel, "%s %s", host.sysname, host.release);
    const char *coretype = getenv("OPENBLAS_CORETYPE");
    snprintf(out, size, "%ld cores, %s, %s%s%s", sysconf(_SC_NPROCESSORS_ONLN), kernel,
             openblas_get_config(), coretype ? ", OPENBLAS_CORETYPE=" : "",
             coretype ? coretype : "");
}

/* values[arm][metric][seed] and run_dir[arm][seed] from OUT's finished runs. */
static void collect(study_ctx *c) {
    study_results *r = c->results;
    r->s = c->s;
    r->preset = c->preset->name;
    r->n_seeds = c->n_seeds;
    r->wall_seconds = 0;
    for (int a = 0; a < c->s->n_arms; a++) {
        for (int seed = 0; seed < c->n_seeds; seed++) {
            run_plan p;
            plan_run(c, a, seed + 1, &p);
            char path[PATH_CAP], status[32] = "", seconds[64] = "";
            snprintf(path, sizeof path, "%s/study-run.txt", p.dir);
            bool done =
                state_value(path, "status", status, sizeof status) && strcmp(status, "done") == 0;
            if (done && state_value(path, "seconds", seconds, sizeof seconds))
                r->wall_seconds += atof(seconds);
            snprintf(r->run_dir[a][seed], sizeof r->run_dir[a][seed], "%s", done ? p.dir : "");
            for (int m = 0; m < c->s->n_metrics; m++) {
                double value = NAN;
                if (done && !study_read_metric(p.dir, &c->s->metrics[m], &value)) value = NAN;
                r->values[a][m][seed] = value;
            }
        }
    }
    describe_machine(r->machine, sizeof r->machine);
    snprintf(r->command, sizeof r->command, "%s", c->o->command ? c->o->command : "");
}

static cm_status setup(study_ctx *c, const study *s, const study_options *o) {
    *c = (study_ctx){.s = s, .o = o};
    const int preset = study_find_preset(s, o->preset);
    if (preset < 0) return CM_ERR(CM_ERR_INVALID, "%s has no preset '%s'", s->path, o->preset);
    c->preset = &s->presets[preset];
    c->n_seeds = o->seeds > 0 ? o->seeds : c->preset->seeds;
    if (c->n_seeds > STUDY_MAX_SEEDS)
        return CM_ERR(CM_ERR_INVALID, "--seeds: at most %d", STUDY_MAX_SEEDS);
    if (o->only_arm && study_find_arm(s, o->only_arm) < 0)
        return CM_ERR(CM_ERR_INVALID, "%s has no arm '%s'", s->path, o->only_arm);
    if (o->out_dir)
        snprintf(c->out_dir, sizeof c->out_dir, "%s", o->out_dir);
    else
        snprintf(c->out_dir, sizeof c->out_dir, "runs/study-%s", s->name);
    MPI_Comm_rank(MPI_COMM_WORLD, &c->world_rank);
    c->leader = c->world_rank == 0;
    for (int a = 0; a < s->n_arms; a++) c->total += arm_selected(c, a) ? c->n_seeds : 0;
    c->started = cm_now();
    return CM_OK;
}

cm_status study_run(const study *s, const study_options *o, bool *interrupted) {
    *interrupted = false;
    study_ctx c;
    CM_TRY(setup(&c, s, o));
    for (int seed = 1; seed <= c.n_seeds && !o->report_only; seed++) {
        for (int a = 0; a < s->n_arms; a++) {
            if (!arm_selected(&c, a)) continue;
            const int done_before = c.done;
            CM_TRY(run_one(&c, a, seed, interrupted));
            if (*interrupted) return CM_OK;
            if (c.done > done_before) print_progress(&c);
        }
    }
    if (o->dry_run || !c.leader) return CM_OK;
    if (c.done == 0 && !o->report_only) print_progress(&c);
    c.results = calloc(1, sizeof *c.results);
    if (!c.results) return CM_ERR(CM_ERR_NOMEM, "out of memory");
    collect(&c);
    const char *report_dir = o->report_dir ? o->report_dir : "docs/studies";
    cm_status status = study_report(c.results, report_dir);
    free(c.results);
    CM_TRY(status);
    printf("[study] report: %s/%s.md\n", report_dir, s->name);
    return CM_OK;
}
