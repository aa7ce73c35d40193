/* Learning-rate and k schedules: pure functions of the step (see optim.h). */
#include <math.h>

#include "optim/optim.h"

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
    }
    return CM_ERR(CM_ERR_INVALID, "unknown learning-rate schedule %d", (int)schedule->kind);
}

/* ---- SMoE-Dropout k
 * ------------------------------------------------------------ */

double optim_round_half_even(double x) {
    double floor_x = floor(x);
    double fraction = x - floor_x; /* exact for |x| < 2^52 */
    if (fraction > 0.5) return floor_x + 1.0;
    if (fraction < 0.5) return floor_x;
    return fmod(floor_x, 2.0) == 0.0 ? floor_x : floor_x + 1.0;
}

int optim_k_at(const optim_k_schedule *schedule, int64_t step) {
    static const int multi_step_k[] = {1, 2, 4, 8, 16};
    const int multi_step_count = (int)(sizeof multi_step_k / sizeof multi_step_k[0]);
    const int k_min = schedule->k_min, k_max = schedule->k_max;
    const int64_t total = schedule->total_steps;
    if (step < 0) step = 0;
    double k = k_max;
    /* total <= 0 is rejected by the check; treat it as a finished schedule. */
    optim_k_mode mode = total > 0 ? schedule->mode : OPTIM_K_CONSTANT;
    switch (mode) {
    case OPTIM_K_CONSTANT:
        break;
    case OPTIM_K_LINEAR_INCREASE:
        /* Python: round(number_experts * steps / overall_steps) + min_experts; the
         * product is an exact integer, then one correctly rounded division. */
        k = optim_round_half_even((double)((int64_t)(k_max - k_min) * step) / (double)total) +
            k_min;
        break;
    case OPTIM_K_COSINE_INCREASE: {
        int64_t s = step < total ? step : total;
        double cosine = cos(PI * (double)s / (double)(2 * total));
        k = optim_round_half_even((double)(k_min - k_max) * cosine) + k_max;
        break;
    }
    case OPTIM_K_EXP_INCREASE: {
        int64_t interval = total / 300 > 0 ? total / 300 : 1;
        double decay = pow(0.99, (double)(step / interval));
        k = optim_round_half_even((double)(k_min - k_max) * decay) + k_max;
        break;
    }
    case OPTIM_K_MULTI_STEP_INCREASE: {
        /* Python: int(length * steps / overall_steps), truncation of a float. */
        double position = (double)((int64_t)multi_step_count * step) / (double)total;
        int index = position >= multi_step_count ? multi_step_count - 1 : (int)position;
        k = multi_step_k[index];
        break;
    }
    }
    if (k < k_min) k = k_min;
    if (k > k_max) k = k_max;
    return (int)k;
}

cm_status optim_k_schedule_check(const optim_k_schedule *schedule) {
    if (schedule->k_min < 1 || schedule->k_max < schedule->k_min)
        return CM_ERR(CM_ERR_INVALID, "k schedule needs 1 <= k_min (%d) <= k_max (%d)",
                      schedule->k_min, schedule->k_max);
    if (schedule->mode != OPTIM_K_CONSTANT && schedule->total_steps <= 0)
        return CM_ERR(CM_ERR_INVALID, "k schedule total_steps = %lld must be positive",
                      (long long)schedule->total_steps);
    if ((unsigned)schedule->mode > OPTIM_K_MULTI_STEP_INCREASE)
        return CM_ERR(CM_ERR_INVALID, "unknown k schedule mode %d", (int)schedule->mode);
    return CM_OK;
}
