/* Learning-rate schedules: pure functions of the step (see optim.h). */
#include <assert.h>
#include <math.h>

#include "optim/optim.h"

const char *const optim_lr_kind_names[] = {"constant", "cosine", "step", NULL};
static_assert(sizeof optim_lr_kind_names / sizeof optim_lr_kind_names[0] == OPTIM_LR_KIND_COUNT + 1,
              "optim_lr_kind_names out of sync with optim_lr_kind");

static const double PI = 3.14159265358979323846;

/* ---- learning rate
 * ----------------------------------------------------------- */

double optim_lr_at(const optim_lr_schedule *schedule, int64_t step) {
    if (step < 0) step = 0;
    double lr = schedule->lr;
    switch (schedule->kind) {
    case OPTIM_LR_CONSTANT:
        break;
    case OPTIM_LR_COSINE: {
        int64_t decay_steps = schedule->total_steps - schedule->warmup_steps;
        double progress =
            decay_steps > 0 ? (double)(step - schedule->warmup_steps) / (double)decay_steps : 1.0;
        if (progress < 0.0) progress = 0.0;
        if (progress > 1.0) progress = 1.0;
        lr =
            schedule->min_lr + (schedule->lr - schedule->min_lr) * 0.5 * (1.0 + cos(PI * progress));
        break;
    }
    case OPTIM_LR_STEP:
        if (schedule->step_size > 0) /* else: rejected by the check; no decay */
            lr = schedule->lr * pow(schedule->gamma, (double)(step / schedule->step_size));
        break;
    case OPTIM_LR_KIND_COUNT: /* rejected by the check; constant */
        break;
    }
    if (step < schedule->warmup_steps) lr *= (double)(step + 1) / (double)schedule->warmup_steps;
    return lr;
}

cm_status optim_lr_schedule_check(const optim_lr_schedule *schedule) {
    if (!(schedule->lr > 0.0 && isfinite(schedule->lr)))
        return CM_ERR(CM_ERR_INVALID, "learning rate %g must be positive", schedule->lr);
    if (schedule->warmup_steps < 0)
        return CM_ERR(CM_ERR_INVALID, "warmup_steps = %lld must be >= 0",
                      (long long)schedule->warmup_steps);
    switch (schedule->kind) {
    case OPTIM_LR_CONSTANT:
        return CM_OK;
    case OPTIM_LR_COSINE:
        if (!(schedule->min_lr >= 0.0 && schedule->min_lr <= schedule->lr))
            return CM_ERR(CM_ERR_INVALID, "cosine min_lr = %g must be in [0, lr = %g]",
                          schedule->min_lr, schedule->lr);
        if (schedule->total_steps <= schedule->warmup_steps)
            return CM_ERR(CM_ERR_INVALID, "cosine total_steps = %lld must exceed warmup = %lld",
                          (long long)schedule->total_steps, (long long)schedule->warmup_steps);
        return CM_OK;
    case OPTIM_LR_STEP:
        if (schedule->step_size <= 0)
            return CM_ERR(CM_ERR_INVALID, "step decay step_size = %lld must be positive",
                          (long long)schedule->step_size);
        if (!(schedule->gamma > 0.0 && schedule->gamma <= 1.0))
            return CM_ERR(CM_ERR_INVALID, "step decay gamma = %g must be in (0, 1]",
                          schedule->gamma);
        return CM_OK;
    case OPTIM_LR_KIND_COUNT:
        break;
    }
    return CM_ERR(CM_ERR_INVALID, "unknown learning-rate schedule %d", (int)schedule->kind);
}
