/* THE run loop: one for every model (every task of train/task.h).
 *
 * run_train owns a whole run: it builds the task's model from the recipe,
 * opens the data, optionally resumes from a checkpoint, runs the step loop,
 * logs to runs/NAME/metrics.jsonl with a progress display, evaluates
 * periodically and at the end (as the task's eval plan says), writes
 * checkpoints (periodic, final, and on SIGINT/SIGTERM through
 * `stop_requested`), and renders the curves with gnuplot.
 *
 * A step = the task's phases on one batch; each phase: the task's loss on
 * the tape -> the global batch's loss summed over the ranks (a NaN or
 * infinite loss stops the run with CM_ERR_NUMERIC) -> backward -> gradients
 * summed over the ranks that share them (dense: the world; expert: the
 * data-parallel replicas of each expert shard) -> global-norm clipping
 * (optim.grad_clip) -> the optimizer update at the schedule's learning rate,
 * with the phase's own optimizer state.
 * A step is a pure function of (seed, step, parameters, optimizer state):
 * batches, dropout masks and router draws are keyed by the step, so a run
 * resumed from a checkpoint continues bit for bit (same thread count).
 * Under MPI every rank calls run_train; a stop (signal, --stop-at) is agreed
 * by all ranks; before every checkpoint the ranks check that they hold the
 * same dense parameters; rank 0 prints and writes the files.
 * Owns: everything it allocates, for the duration of a call (or of a
 * session, for run_session_*). */
#ifndef CMOE_TRAIN_RUN_H
#define CMOE_TRAIN_RUN_H

#include <signal.h>
#include <stdbool.h>
#include <stdint.h>

#include "autograd/params.h"
#include "common/status.h"
#include "parallel/comm.h"
#include "train/recipe.h"
#include "train/task.h"

typedef struct run_options {
    const char *resume; /* NULL, a checkpoint path, or "auto" */
    /* A run that does not resume (no --resume, or "auto" finding no
     * checkpoint) starts at step 0 from this checkpoint's parameters (NULL:
     * from the recipe's init), with fresh optimizer state: cmoe train --init
     * (an upcycled model). The file holds the same model in the global
     * layout, from any rank count. */
    const char *init;
    volatile sig_atomic_t *stop_requested; /* set by a signal handler; may be NULL */
    bool quiet;                            /* no progress output (tests) */
    int64_t stop_at_step; /* > 0: save a checkpoint and stop once this step is done */
    const cm_comm *comm;  /* MPI groups (NULL: one process); every rank calls run_train */
    /* Fault injection, for tests of the error paths: world rank fail_rank
     * fails with CM_ERR_INTERNAL when it starts step fail_step (1-based;
     * 0: never). */
    int fail_rank;
    int64_t fail_step;
} run_options;

typedef struct run_result {
    int64_t steps_done;        /* global step reached */
    bool interrupted;          /* stopped by stop_requested or stop_at_step */
    double last_train_loss;    /* of the global batch (nats for the LM) */
    double items_per_second;   /* tokens or images; over the whole run once it ends */
    double step_seconds;       /* mean wall time of a step of this run */
    metrics_record last_train; /* the last "train" line (its scalars) */
    bool has_periodic, has_final;
    task_eval periodic; /* the last periodic evaluation (record: scalars only) */
    task_eval final;    /* the evaluation after the last step */
    char last_checkpoint[4096];
} run_result;

cm_status run_train(const cm_recipe *recipe, const run_options *options, run_result *result);

/* Loads the model of `recipe` with the weights of `checkpoint` and evaluates
 * it as the request says (NULL: the evaluation run_train ends with); every
 * rank of comm (NULL: one process) calls it. The record's step is the
 * checkpoint's. `stop` (may be NULL), set by a signal handler, ends the
 * evaluation early with out->stopped and no figures. */
cm_status run_evaluate(const cm_recipe *recipe, const char *checkpoint,
                       const task_eval_request *request, volatile sig_atomic_t *stop,
                       const cm_comm *comm, task_eval *out);

/* ---- sessions: the model, its task and optimizer without the loop's files,
 * for cmoe bench and for tests ---------------------------------------------- */

typedef struct run_session run_session;

/* Builds the task's model (initialised from train.seed) and optimizer and
 * opens the data (with_train: the training split too). */
cm_status run_session_open(const cm_recipe *recipe, const cm_comm *comm, bool with_train,
                           run_session **out);
void run_session_close(run_session *session);
ag_params *run_session_params(run_session *session);
const task_vtable *run_session_task(run_session *session);
void *run_session_task_state(run_session *session);
/* The exchange time counters the session's MoE layers add to. */
dispatch_timing *run_session_timing(run_session *session);

/* Where the steps' time went, in seconds summed since the session opened
 * (cmoe bench's breakdown). The expert exchange and the wait before it
 * (dispatch_timing) happen inside forward and backward and are counted
 * there too. */
typedef struct run_clock {
    double load;     /* the task's batch (task->load) */
    double forward;  /* the loss, from the batch to the objective */
    double values;   /* the loss values summed over the ranks */
    double backward; /* ag_backward */
    double reduce;   /* gradients and expert-slice usage summed over the ranks */
    double update;   /* clipping (with its norm's sum over the ranks) and the optimizer */
} run_clock;
const run_clock *run_session_clock(const run_session *session);

typedef struct run_step_result {
    double loss;      /* the global batch's reported loss (last phase run) */
    double aux;       /* its auxiliary losses */
    double grad_norm; /* before clipping; NAN without optim.grad_clip */
} run_step_result;

/* One step at 0-based `step`: the batch, then every phase; *out describes
 * the first phase (the training loss; AdvMoE: the expert phase). */
cm_status run_session_step(run_session *session, int64_t step, run_step_result *out);
/* The batch of `step` and one phase of it alone (tests of AdvMoE's phases). */
cm_status run_session_phase(run_session *session, int64_t step, int phase, run_step_result *out);
cm_status run_session_evaluate(run_session *session, const task_eval_request *request, int64_t step,
                               task_eval *out);

#endif
