/* Training and evaluation of the byte-level LM from a recipe.
 *
 * trainer_run owns a whole run: it builds the model from the recipe, opens the
 * data, optionally resumes from a checkpoint, runs the step loop (forward,
 * backward, clip, schedule, update), logs to runs/NAME/metrics.jsonl with a
 * progress display, evaluates the validation split periodically and the test
 * split at the end, writes checkpoints (periodic, final, and on SIGINT/SIGTERM
 * through `stop_requested`), and renders the curves with gnuplot.
 *
 * A step is a pure function of (seed, step, parameters, optimizer state):
 * batches and dropout masks are keyed by the step, so a run resumed from a
 * checkpoint continues bit for bit (same thread count).
 * Owns: everything it allocates, for the duration of the call. */
#ifndef CMOE_TRAIN_TRAINER_H
#define CMOE_TRAIN_TRAINER_H

#include <signal.h>
#include <stdbool.h>
#include <stdint.h>

#include "common/status.h"
#include "parallel/comm.h"
#include "train/recipe.h"

typedef struct trainer_options {
    const char *resume;                    /* NULL, a checkpoint path, or "auto" */
    volatile sig_atomic_t *stop_requested; /* set by a signal handler; may be NULL */
    bool quiet;                            /* no progress output (tests) */
    int64_t stop_at_step; /* > 0: save a checkpoint and stop once this step is done */
    const cm_comm *comm;  /* MPI groups (NULL: one process); every rank calls trainer_run */
} trainer_options;

typedef struct trainer_result {
    int64_t steps_done;     /* global step reached */
    bool interrupted;       /* stopped by stop_requested */
    double last_train_loss; /* nats */
    double last_valid_bpc;  /* NAN if never evaluated */
    double test_bpc;        /* NAN if not evaluated */
    double tokens_per_second;
    double mean_k; /* activated experts per token in the last log window (0: dense) */
    char last_checkpoint[4096];
} trainer_result;

cm_status trainer_run(const cm_recipe *recipe, const trainer_options *options,
                      trainer_result *result);

/* Loads the model of `recipe` with the weights of `checkpoint` and returns
 * the mean cross-entropy (nats per byte) over the whole `split`
 * (max_batches <= 0: every batch). Routers use k_override experts per token
 * when > 0, else router.eval_k, else router.k. */
cm_status trainer_evaluate(const cm_recipe *recipe, const char *checkpoint, cm_split split,
                           int64_t max_batches, int k_override, double *mean_loss, int64_t *tokens,
                           const cm_comm *comm);

/* Called by trainer_bench with steps_done = 0 before the first step and after
 * every step (so the caller can time each step and count its allocations). */
typedef void (*trainer_step_hook)(void *user, int64_t steps_done);

/* The training step alone, for `cmoe bench`: builds the model of `recipe`
 * from fresh parameters, opens its training split and runs `steps` steps
 * (forward, backward, gradient reduction, clipping, update) with no
 * logging, evaluation or checkpoint; every rank of comm calls it. */
cm_status trainer_bench(const cm_recipe *recipe, const cm_comm *comm, int64_t steps,
                        trainer_step_hook hook, void *user);

#endif
