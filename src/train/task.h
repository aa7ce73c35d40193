/* Tasks: what the run loop (train/run.h) trains. A task is a model and its
 * data: it declares the parameters, loads a step's batch, builds the loss of
 * each phase of a step on the tape, evaluates, and reports its own figures.
 * The run loop owns everything else: parameters and optimizer state, the
 * arena, backward, the gradient reduction over the ranks, clipping, the
 * schedule, NaN handling, stopping, checkpoints, metrics and progress.
 *
 * A step has phases() optimizer updates on the same batch, each with its own
 * optimizer state (AdamW's step count) and its own set of trainable
 * parameters (a task may freeze some in phase_loss and restore them in
 * phase_end): one for most tasks, two for AdvMoE (experts, then routers).
 * Within a phase a task may run several forward passes (THOR's two, as its
 * router's registry row says); they end in one loss. With gradient
 * accumulation (train.grad_accum) a phase runs that loss and its backward
 * once per micro-batch, and updates once.
 *
 * The tasks are rows of one table indexed by model.arch (task_for); a new
 * model is one new file with its vtable and one row.
 * Owns: nothing; a task's state is created by create and freed by destroy. */
#ifndef CMOE_TRAIN_TASK_H
#define CMOE_TRAIN_TASK_H

#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "autograd/ops.h"
#include "autograd/params.h"
#include "common/status.h"
#include "parallel/comm.h"
#include "parallel/dispatch.h"
#include "train/metrics.h"
#include "train/progress.h"
#include "train/recipe.h"

/* What the run loop hands a task. */
typedef struct task_env {
    const cm_recipe *recipe;
    const cm_comm *comm;     /* NULL: one process */
    int rank, ranks;         /* in the world */
    MPI_Comm world;          /* the ranks sharing the global batch; 0 when alone */
    ag_params *params;       /* declared into by create; finalized by the run loop */
    ag_ctx *ctx;             /* the step arena, reset by the run loop per phase */
    dispatch_timing *timing; /* expert exchange counters (cmoe bench); may be NULL */
} task_env;

/* The loss of one micro-batch of a phase, on the tape. Every tensor is [1]
 * and holds this rank's and this micro-batch's share of the step's value:
 * the sum over the ranks and the micro-batches is the value of the step's
 * whole batch (train.grad_accum x data.batch_size), so the summed gradients
 * are that batch's. */
typedef struct task_loss {
    ag_tensor *objective; /* what backward runs on */
    ag_tensor *loss;      /* the training loss reported */
    ag_tensor *loss2;     /* a second pass's loss: the reported loss is their mean; or NULL */
    ag_tensor *aux;       /* auxiliary (router) losses inside objective; or NULL */
} task_loss;

/* An evaluation request and its result. */
typedef struct task_eval_request {
    cm_split split;
    int64_t max_batches; /* <= 0: the whole split */
    int k_override;      /* > 0: routers use this k (tasks with routers that take one) */
    /* Set by a signal handler (may be NULL): checked before every batch, on
     * every rank together (task_eval_stopped); once set the evaluation ends
     * early with task_eval.stopped and no figures. */
    volatile sig_atomic_t *stop;
} task_eval_request;

enum { TASK_EVAL_ARRAY_MAX = 64, TASK_EVAL_COUNTS_MAX = 1024 };
typedef struct task_eval {
    metrics_record record; /* kind "valid"/"test" and the figures, as metrics.jsonl gets them */
    double per_router[TASK_EVAL_ARRAY_MAX]; /* values of the record's array field, if any */
    int64_t counts[TASK_EVAL_COUNTS_MAX];   /* values of its integer array fields, if any */
    double headline;    /* the figure to compare runs by: LM mean loss (nats), CNN SA */
    int64_t items;      /* tokens or images evaluated */
    char text[2048];    /* the figures, for "SPLIT split: TEXT" (cmoe eval) */
    char summary[2048]; /* the line printed during training */
    bool stopped;       /* request.stop ended it early: nothing else is set */
} task_eval;

/* Whether request->stop is set on any rank of `world` (a collective when
 * there are several: every rank calls it before each batch). */
cm_status task_eval_stopped(const task_eval_request *request, MPI_Comm world, bool *stopped);

/* How a task wants to be evaluated during and after training. */
typedef struct task_eval_plan {
    task_eval_request periodic; /* every train.eval_every steps and at the last step */
    task_eval_request final;    /* after the last step */
    bool final_differs;         /* false: the periodic one at the last step is the final one */
} task_eval_plan;

typedef struct task_vtable {
    const char *name;      /* "transformer_lm", "resnet": the model.arch spelling */
    const char *item_name; /* "tok", "img": what throughput counts */
    /* Declares the model's parameters into env->params and allocates the
     * task's state; the env stays valid until destroy. */
    cm_status (*create)(const task_env *env, void **state);
    /* After the parameters are finalized: the training data (with_train:
     * the training split too; evaluation alone does not open it), batch
     * buffers, anything that needs parameter values. */
    cm_status (*open)(void *state, bool with_train);
    void (*destroy)(void *state);
    /* [cmoe] lines describing the model, printed before training. */
    void (*describe)(void *state, cm_progress *progress);
    /* Fields of the "model" metrics line (parameter counts are added by the loop). */
    void (*model_fields)(void *state, metrics_record *record);
    int64_t (*items_per_step)(void *state);      /* tokens or images of a whole step */
    double (*model_flops_per_step)(void *state); /* cmoe bench's model FLOPs */
    int (*phases)(void *state);                  /* NULL: 1 */
    /* This rank's rows of micro-batch `micro` (of train.grad_accum) of the
     * batch of 0-based `step`; the loop loads before each micro-batch's loss. */
    cm_status (*load)(void *state, int64_t step, int micro);
    cm_status (*phase_loss)(void *state, int phase, int64_t step, int micro, task_loss *out);
    /* After the phase (may be NULL): restores what phase_loss changed (frozen
     * flags) and, when the update was completed, e.g. averages state the
     * optimizer does not own over the ranks (collective then). */
    cm_status (*phase_end)(void *state, int phase, bool completed);
    /* Progress text after "loss X", and fields added to the "train" metrics
     * line (mean_loss: the window's mean training loss; collective: every
     * rank calls it, before write_window); either may be NULL. */
    void (*progress_text)(void *state, double loss, char *buffer, size_t size);
    cm_status (*window_fields)(void *state, double mean_loss, metrics_record *train_line);
    /* Extra metrics lines of the log window (e.g. per-layer routing), and
     * warnings about the window through progress_print; then the window
     * starts again. Collective: every rank calls it. May be NULL. */
    cm_status (*write_window)(void *state, cm_metrics *metrics, cm_progress *progress,
                              int64_t step);
    task_eval_plan (*eval_plan)(void *state);
    /* Collective. Checks the request (a clear error for a split or a k the
     * task does not have) before evaluating. */
    cm_status (*evaluate)(void *state, const task_eval_request *request, int64_t step,
                          task_eval *out);
    /* Whether k_override means something for this model (cmoe eval
     * --sweep-k); NULL: it does not. */
    bool (*takes_k)(void *state);
} task_vtable;

/* The task of model.arch. */
const task_vtable *task_for(cm_model_arch arch);

extern const task_vtable task_lm;  /* task_lm.c */
extern const task_vtable task_cnn; /* task_cnn.c */

/* The transformer of a task_lm state (run_session_task_state of a session
 * whose task is task_lm), for inference outside the run loop (cmoe sample). */
struct lm_model;
const struct lm_model *task_lm_model(void *state);

#endif
