/* Optimizers, schedules and gradient clipping over the flat parameter buffers.
 *
 * AdamW and SGD update every non-frozen parameter of both groups of an
 * ag_params registry with one fused loop per parameter span. Their per-element
 * state lives in the registry's mirrors (AdamW: m and v; SGD: m is the momentum
 * buffer), so the only other optimizer state a checkpoint must save is
 * optim_state.step. Frozen parameters are skipped entirely: value, m and v stay
 * bit-identical. Parameters with no_decay set skip the weight decay.
 *
 * Learning-rate schedules are pure functions of the step:
 * a resumed run recomputes them from the step alone, nothing to checkpoint.
 *
 * Clipping computes the global L2 norm of the gradients in double. The sum of
 * squares is kept per group so a distributed job can combine it correctly
 * through an optim_norm_reducer (see below).
 * Owns: nothing; every function works on buffers owned by the caller. */
#ifndef CMOE_OPTIM_OPTIM_H
#define CMOE_OPTIM_OPTIM_H

#include <stdbool.h>
#include <stdint.h>

#include "autograd/params.h"
#include "common/status.h"

/* ---- optimizers ------------------------------------------------------------
 */

typedef enum optim_kind { OPTIM_ADAMW, OPTIM_SGD, OPTIM_KIND_COUNT } optim_kind;
/* The spellings recipes use (optim.type), in enum order, NULL-terminated. */
extern const char *const optim_kind_names[OPTIM_KIND_COUNT + 1];

typedef struct optim_adamw_config {
    double beta1, beta2, eps;
    double weight_decay; /* decoupled: p -= lr * weight_decay * p */
} optim_adamw_config;

typedef struct optim_sgd_config {
    double momentum;     /* 0 = plain SGD (the momentum buffer is still written) */
    double weight_decay; /* coupled, as in torch.optim.SGD: g += weight_decay * p */
    bool nesterov;       /* needs momentum > 0 */
} optim_sgd_config;

typedef struct optim_config {
    optim_kind kind;
    optim_adamw_config adamw;
    optim_sgd_config sgd;
    /* Expert slices (ag_param.slices) whose slice_used flag is clear are not
     * updated at all: value, moments and slice step count stay bit for bit,
     * as PyTorch skips a parameter that got no gradient. false: every slice
     * is updated every step (Megatron's grouped-GEMM semantics). */
    bool skip_unused_slices;
} optim_config;

/* What a checkpoint saves besides the m/v buffers of the registry. */
typedef struct optim_state {
    int64_t step; /* updates taken so far; AdamW's bias correction uses it */
} optim_state;

/* torch.optim.AdamW defaults: betas (0.9, 0.999), eps 1e-8, weight decay 0.01.
 */
optim_adamw_config optim_adamw_defaults(void);
/* CM_ERR_INVALID naming the bad field (betas in [0, 1), eps > 0, decay >= 0,
 * momentum in [0, 1), nesterov with momentum > 0). */
cm_status optim_config_check(const optim_config *config);

/* One AdamW update with PyTorch's semantics (torch.optim.AdamW), per element:
 *   p *= 1 - lr * weight_decay                (unless no_decay)
 *   m  = beta1 * m + (1 - beta1) * g
 *   v  = beta2 * v + (1 - beta2) * g^2
 *   p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
 * with t = state->step after incrementing it. Scalars are computed in double,
 * the per-element arithmetic in float. */
void optim_adamw_step(ag_params *params, const optim_adamw_config *config, double lr,
                      optim_state *state);

/* One SGD update with PyTorch's semantics (torch.optim.SGD, dampening 0):
 *   g  = g + weight_decay * p                 (unless no_decay)
 *   b  = momentum * b + g                     (b = m buffer; zero before step
 * 1, so step 1 gives b = g exactly) g  = nesterov ? g + momentum * b : b p -=
 * lr * g The gradient buffer itself is not modified. Increments state->step. */
void optim_sgd_step(ag_params *params, const optim_sgd_config *config, double lr,
                    optim_state *state);

/* The same two with the choice for unused expert slices. */
void optim_adamw_update(ag_params *params, const optim_adamw_config *config, double lr,
                        optim_state *state, bool skip_unused);
void optim_sgd_update(ag_params *params, const optim_sgd_config *config, double lr,
                      optim_state *state, bool skip_unused);
/* Dispatches on config->kind, with config->skip_unused_slices. The two
 * functions above update every slice (skip_unused_slices false). An expert
 * slice's AdamW bias correction uses its own step count (slice_steps), which
 * equals state->step for a slice updated every step. */
void optim_step(ag_params *params, const optim_config *config, double lr, optim_state *state);

/* Sets every parameter's no_decay flag from its name and rank. The rule:
 *  - an *embedding* is a parameter whose name contains "emb", "wte" or "wpe";
 *  - otherwise, a parameter of effective rank 1 is a *bias* when the last
 *    dot-separated component of its name is "bias" or "b" followed only by
 *    digits ("b", "b1"), and a *norm* parameter otherwise (LayerNorm and
 *    BatchNorm gains; a norm's shift named "bias" counts as a bias);
 *  - everything else (matrices, conv kernels) always decays.
 * Effective rank is the tensor rank, minus one for AG_GROUP_EXPERT parameters,
 * whose leading dimension indexes the local experts ([E, d] is a per-expert
 * bias). A class decays only when its flag is true. A model that needs a
 * different decision sets param->no_decay itself after calling this. */
void optim_apply_decay_policy(ag_params *params, bool decay_norms, bool decay_biases,
                              bool decay_embeddings);

/* ---- gradient norm and clipping -------------------------------------------
 */

/* Combines this process's per-group sums of squared gradients into the job's,
 * in place. NULL reducer (or NULL fn) = a single process: nothing to combine.
 * A distributed job must sum group_sq[AG_GROUP_EXPERT] over the ranks holding
 * different expert shards, and count group_sq[AG_GROUP_DENSE] once (after the
 * data-parallel all-reduce every rank holds the same dense gradient), then
 * every rank gets the same norm and the same clipping factor. */
typedef cm_status (*optim_sq_norm_reduce_fn)(double group_sq[AG_NUM_GROUPS], void *user);
typedef struct optim_norm_reducer {
    optim_sq_norm_reduce_fn fn;
    void *user;
} optim_norm_reducer;

/* Sum of squared gradients of this process's non-frozen parameters, per group,
 * accumulated in double. */
void optim_grad_sq_norm_local(const ag_params *params, double group_sq[AG_NUM_GROUPS]);

/* sqrt of the sum over both groups, single process. */
double optim_grad_norm(const ag_params *params);
cm_status optim_grad_norm_reduced(const ag_params *params, const optim_norm_reducer *reducer,
                                  double *norm);

/* When the global norm exceeds max_norm, scales every non-frozen gradient by
 * max_norm / norm, so the new norm is max_norm (up to float rounding); smaller
 * gradients are left untouched. Unlike torch.nn.utils.clip_grad_norm_ there is
 * no +1e-6 in the denominator (norm > max_norm > 0 already excludes 0).
 * *norm_before (may be NULL) gets the norm before clipping. A NaN or infinite
 * norm returns CM_ERR_NUMERIC and leaves the gradients unchanged, so the
 * caller can skip the step; max_norm <= 0 is CM_ERR_INVALID. */
cm_status optim_clip_grad_norm(ag_params *params, double max_norm, double *norm_before);
cm_status optim_clip_grad_norm_reduced(ag_params *params, double max_norm,
                                       const optim_norm_reducer *reducer, double *norm_before);

/* ---- learning-rate schedules ----------------------------------------------
 */

typedef enum optim_lr_kind {
    OPTIM_LR_CONSTANT, /* lr */
    OPTIM_LR_COSINE,   /* cosine from lr at step warmup to min_lr at total_steps */
    OPTIM_LR_STEP,     /* lr * gamma^floor(step / step_size) */
    OPTIM_LR_KIND_COUNT
} optim_lr_kind;
/* The spellings recipes use (schedule.type), in enum order, NULL-terminated. */
extern const char *const optim_lr_kind_names[OPTIM_LR_KIND_COUNT + 1];

typedef struct optim_lr_schedule {
    optim_lr_kind kind;
    double lr;
    double min_lr;        /* cosine: value at and after total_steps */
    int64_t warmup_steps; /* 0 = no warmup */
    int64_t total_steps;  /* cosine */
    int64_t step_size;    /* step decay, > 0 */
    double gamma;         /* step decay */
} optim_lr_schedule;

/* Learning rate for the update with 0-based index `step`.
 * Warmup (all kinds): for step < warmup_steps the scheduled value is scaled by
 * (step + 1) / warmup_steps, so step 0 already moves the weights and step
 * warmup_steps - 1 reaches the full value.
 * Cosine: progress = (step - warmup) / (total - warmup), clamped to [0, 1];
 * lr_t = min_lr + (lr - min_lr) * (1 + cos(pi * progress)) / 2, i.e. the cosine
 * starts where warmup ends and the midpoint is (lr + min_lr) / 2.
 * Step decay counts absolute steps (boundaries at multiples of step_size,
 * warmup included), like torch's StepLR. */
double optim_lr_at(const optim_lr_schedule *schedule, int64_t step);
cm_status optim_lr_schedule_check(const optim_lr_schedule *schedule);

#endif
