/* Running a study: every (arm, seed) as an ordinary training run, in
 * process, then the study's evaluations of the final model, then the report.
 *
 * Runs go in seed-major order (every arm at seed 1, then seed 2, ...) so a
 * stopped study already holds complete paired comparisons. Run (arm, seed)
 * lives in OUT/ARM/seed-S (OUT default runs/study-NAME) with the recipe
 * overrides: the preset's, the arm's, train.seed=S, train.out_dir and
 * checkpoint.dir = that directory. Its state file study-run.txt records the
 * configuration (the overrides), whether it is done and its wall time (over
 * its invocations; the part a SIGKILL cut short is not counted): a done run is skipped,
 * a started one resumes from its newest checkpoint (--resume auto), and a
 * directory holding a run of another configuration is an error (another
 * preset: pass another OUT). The evaluations' records go to
 * study-evals.jsonl, kind NAME=VALUE (and "test" again when the run's own
 * final evaluation is missing: a run killed between its last checkpoint and
 * that evaluation). An arm with `from` starts at step 0 (train --init) from
 * its source's final checkpoint of the same seed, first upcycled into
 * RUN/upcycled.h5 or merged into RUN/merged.h5 when it says so (once: an
 * existing file is complete); an evaluate_only arm trains nothing and
 * evaluates that starting point (its "test" record in study-evals.jsonl).
 * Under mpirun every rank runs every run (each on all
 * ranks); rank 0 decides what to skip, prints and writes the files.
 * Owns: nothing after the call. */
#ifndef CMOE_STUDY_STUDY_RUN_H
#define CMOE_STUDY_STUDY_RUN_H

#include <signal.h>
#include <stdbool.h>

#include "common/status.h"
#include "study/study.h"

typedef struct study_options {
    const char *preset;     /* a preset of the study */
    const char *only_arm;   /* NULL: every arm */
    int seeds;              /* 0: the preset's */
    const char *out_dir;    /* NULL: runs/study-NAME */
    const char *report_dir; /* NULL: docs/studies */
    bool report_only;       /* no runs: report what OUT holds */
    bool dry_run;           /* no runs, no report: list the runs and whether they are done */
    bool quiet;             /* the runs' own progress off */
    volatile sig_atomic_t *stop_requested;
    const char *command; /* the command line, for the report */
} study_options;

/* *interrupted: a run was stopped by stop_requested (its checkpoint saved);
 * no report is written then. */
cm_status study_run(const study *s, const study_options *options, bool *interrupted);

/* The value of `metric` in run directory `run_dir` (its metrics.jsonl, then
 * study-evals.jsonl: the last line of the metric's source kind); false when
 * absent. */
bool study_read_metric(const char *run_dir, const study_metric *metric, double *value);

#endif
