/* SMoE-Dropout's schedule of k, the experts per token during training
 * (METHODS.md 1.2): a pure function of the step, so a resumed run recomputes
 * it and nothing is checkpointed. Owns: nothing. */
#ifndef CMOE_ROUTERS_K_SCHEDULE_H
#define CMOE_ROUTERS_K_SCHEDULE_H

#include <stdint.h>

#include "common/status.h"

typedef enum router_k_mode {
    ROUTER_K_CONSTANT,            /* k_max */
    ROUTER_K_LINEAR_INCREASE,     /* round((k_max - k_min) * s / S) + k_min */
    ROUTER_K_COSINE_INCREASE,     /* k_max + round((k_min - k_max) * cos(pi s / 2S)) */
    ROUTER_K_EXP_INCREASE,        /* k_max + round((k_min - k_max) * 0.99^(s // (S //
                                    300))) */
    ROUTER_K_MULTI_STEP_INCREASE, /* [1, 2, 4, 8, 16][int(5 s / S)] */
    ROUTER_K_MODE_COUNT
} router_k_mode;
/* The spellings recipes use (router.k_schedule), in enum order, NULL-terminated. */
extern const char *const router_k_mode_names[ROUTER_K_MODE_COUNT + 1];

typedef struct router_k_schedule {
    router_k_mode mode;
    int k_min, k_max;
    int64_t total_steps; /* S */
} router_k_schedule;

/* Number of experts per token at training step `step`, the same value as
 * SMoE-Dropout's new_utils.py::calculate_gate_number: float64 arithmetic,
 * Python's round() (half to even), result clipped to [k_min, k_max].
 * Where Python would fail or wrap, this stays defined: cosine holds k_max for
 * step > S (Python's cosine would come back down after 2S), exp uses an
 * interval of max(1, S // 300) steps (Python divides by zero for S < 300), and
 * multi-step stays on the last entry from step S on (Python's list index runs
 * out of range). */
int router_k_at(const router_k_schedule *schedule, int64_t step);
cm_status router_k_schedule_check(const router_k_schedule *schedule);

/* Python's round() of a double: nearest integer, ties to the even one. */
double router_round_half_even(double x);

#endif
