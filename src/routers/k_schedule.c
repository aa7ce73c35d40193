#include "routers/k_schedule.h"

#include <assert.h>
#include <math.h>
#include <stddef.h>

const char *const router_k_mode_names[] = {"constant",     "linear_increase",     "cosine_increase",
                                           "exp_increase", "multi_step_increase", NULL};
static_assert(sizeof router_k_mode_names / sizeof router_k_mode_names[0] == ROUTER_K_MODE_COUNT + 1,
              "router_k_mode_names out of sync with router_k_mode");

static const double PI = 3.14159265358979323846;

double router_round_half_even(double x) {
    double floor_x = floor(x);
    double fraction = x - floor_x; /* exact for |x| < 2^52 */
    if (fraction > 0.5) return floor_x + 1.0;
    if (fraction < 0.5) return floor_x;
    return fmod(floor_x, 2.0) == 0.0 ? floor_x : floor_x + 1.0;
}

int router_k_at(const router_k_schedule *schedule, int64_t step) {
    static const int multi_step_k[] = {1, 2, 4, 8, 16};
    const int multi_step_count = (int)(sizeof multi_step_k / sizeof multi_step_k[0]);
    const int k_min = schedule->k_min, k_max = schedule->k_max;
    const int64_t total = schedule->total_steps;
    if (step < 0) step = 0;
    double k = k_max;
    /* total <= 0 is rejected by the check; treat it as a finished schedule. */
    router_k_mode mode = total > 0 ? schedule->mode : ROUTER_K_CONSTANT;
    switch (mode) {
    case ROUTER_K_CONSTANT:
        break;
    case ROUTER_K_LINEAR_INCREASE:
        /* Python: round(number_experts * steps / overall_steps) + min_experts; the
         * product is an exact integer, then one correctly rounded division. */
        k = router_round_half_even((double)((int64_t)(k_max - k_min) * step) / (double)total) +
            k_min;
        break;
    case ROUTER_K_COSINE_INCREASE: {
        int64_t s = step < total ? step : total;
        double cosine = cos(PI * (double)s / (double)(2 * total));
        k = router_round_half_even((double)(k_min - k_max) * cosine) + k_max;
        break;
    }
    case ROUTER_K_EXP_INCREASE: {
        int64_t interval = total / 300 > 0 ? total / 300 : 1;
        double decay = pow(0.99, (double)(step / interval));
        k = router_round_half_even((double)(k_min - k_max) * decay) + k_max;
        break;
    }
    case ROUTER_K_MULTI_STEP_INCREASE: {
        /* Python: int(length * steps / overall_steps), truncation of a float. */
        double position = (double)((int64_t)multi_step_count * step) / (double)total;
        int index = position >= multi_step_count ? multi_step_count - 1 : (int)position;
        k = multi_step_k[index];
        break;
    }
    case ROUTER_K_MODE_COUNT: /* rejected by the check; k_max */
        break;
    }
    if (k < k_min) k = k_min;
    if (k > k_max) k = k_max;
    return (int)k;
}

cm_status router_k_schedule_check(const router_k_schedule *schedule) {
    if (schedule->k_min < 1 || schedule->k_max < schedule->k_min)
        return CM_ERR(CM_ERR_INVALID, "k schedule needs 1 <= k_min (%d) <= k_max (%d)",
                      schedule->k_min, schedule->k_max);
    if (schedule->mode != ROUTER_K_CONSTANT && schedule->total_steps <= 0)
        return CM_ERR(CM_ERR_INVALID, "k schedule total_steps = %lld must be positive",
                      (long long)schedule->total_steps);
    if ((unsigned)schedule->mode >= ROUTER_K_MODE_COUNT)
        return CM_ERR(CM_ERR_INVALID, "unknown k schedule mode %d", (int)schedule->mode);
    return CM_OK;
}
