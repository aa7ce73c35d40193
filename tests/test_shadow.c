/* The shadowing decision (parallel/shadow.h) alone: a pure function of the
 * per-rank, per-expert row counts. The cost model against a hand
 * computation; none when the load is balanced, one rank or no rows; the hot
 * experts of the loaded rank when skewed (lm-moe's sizes, a 28/72 split);
 * weights too dear for a small skew under auto, but shadowed under force;
 * the same answer whatever the scratch held (every rank decides alike); and
 * a greedy optimum: no further expert lowers the modelled step. The MPI side
 * (equality of losses and gradients) is in tests/mpi/test_moe_mpi.c. */
#include <check.h>
#include <stdlib.h>
#include <string.h>

#include "parallel/shadow.h"

enum { MAX_E = 16, MAX_P = 4 };

/* lm-moe: D 256, H 1024, GELU experts (two matrices). */
static shadow_problem lm_moe(int ranks, int experts, shadow_mode mode) {
    return shadow_problem_for(ranks, experts, 256, 1024, 2, mode, SHADOW_FLOPS_PER_FLOAT);
}

static int decide(const shadow_problem *problem, const int32_t *counts, uint8_t *shadowed) {
    int64_t rank_cost[MAX_P];
    return shadow_decide(problem, counts, rank_cost, shadowed);
}

/* The model by hand: P 2, E 2, row 10 flops, 1 float per row, 3 per expert,
 * 2 flops per float moved; rank 0 sends 4 and 1 rows to experts 0 and 1,
 * rank 1 sends 6 and 0. Unshadowed: rank 0 computes 10 rows (100) and moves
 * 6 + 1 rows 4 times (56): 156; rank 1 computes 1 (10) and moves 1 + 6 (56):
 * 66. Shadowing expert 0: rank 0 computes 4 rows of it and 1 row moves (40 +
 * 8) and sends the weights out and takes the gradient in (12): 60; rank 1
 * computes 7 rows (70) and moves 1 (8), weights (12): 90. Then expert 1:
 * rank 0 computes 5 (50), weights twice (24): 74; rank 1 computes 6 (60),
 * weights twice (24): 84. */
START_TEST(test_cost_by_hand) {
    const shadow_problem problem = {2, 2, 10, 1, 3, 2};
    const int32_t counts[] = {4, 1, 6, 0};
    int64_t rank_cost[2];
    ck_assert_int_eq(shadow_step_cost(&problem, counts, NULL, rank_cost), 156);
    ck_assert_int_eq(rank_cost[1], 66);
    ck_assert_int_eq(shadow_step_cost(&problem, counts, (uint8_t[]){1, 0}, rank_cost), 90);
    ck_assert_int_eq(rank_cost[0], 60);
    ck_assert_int_eq(shadow_step_cost(&problem, counts, (uint8_t[]){1, 1}, rank_cost), 84);
    ck_assert_int_eq(rank_cost[0], 74);
    uint8_t shadowed[2];
    ck_assert_int_eq(decide(&problem, counts, shadowed), 2);
    ck_assert(shadowed[0] && shadowed[1]);
}
END_TEST

/* The sizes the MoE layer and bench/scaling_model give the cost model:
 * forward and backward of each matrix per row, the row's D floats, one
 * expert's weights and biases; force counts moving data as free. */
START_TEST(test_problem_for_a_layer) {
    const shadow_problem gelu =
        shadow_problem_for(4, 8, 256, 1024, 2, SHADOW_AUTO, SHADOW_FLOPS_PER_FLOAT);
    ck_assert_int_eq(gelu.ranks, 4);
    ck_assert_int_eq(gelu.experts, 8);
    ck_assert_int_eq(gelu.row_flops, 6 * 2 * 256 * 1024);
    ck_assert_int_eq(gelu.row_floats, 256);
    ck_assert_int_eq(gelu.weight_floats, 2 * 256 * 1024 + 1024 + 256);
    ck_assert_int_eq(gelu.float_cost, SHADOW_FLOPS_PER_FLOAT);
    const shadow_problem swiglu = shadow_problem_for(2, 8, 64, 96, 3, SHADOW_FORCE, 750);
    ck_assert_int_eq(swiglu.row_flops, 6 * 3 * 64 * 96);
    ck_assert_int_eq(swiglu.weight_floats, 3 * 64 * 96 + 2 * 96 + 64);
    ck_assert_int_eq(swiglu.float_cost, 0);
    ck_assert_int_eq(shadow_problem_for(2, 8, 64, 96, 2, SHADOW_OFF, 750).float_cost, 750);
}
END_TEST

/* Every rank sends the same rows to every expert: nothing to even out. */
START_TEST(test_balanced_shadows_nothing) {
    for (int ranks = 1; ranks <= MAX_P; ranks *= 2)
        for (int mode = SHADOW_AUTO; mode <= SHADOW_FORCE; mode++) {
            const shadow_problem problem = lm_moe(ranks, 8, (shadow_mode)mode);
            int32_t counts[MAX_P * 8];
            for (int i = 0; i < ranks * 8; i++) counts[i] = 512;
            uint8_t shadowed[8];
            memset(shadowed, 7, sizeof shadowed);
            ck_assert_int_eq(decide(&problem, counts, shadowed), 0);
            for (int e = 0; e < 8; e++) ck_assert_int_eq(shadowed[e], 0);
        }
}
END_TEST

START_TEST(test_one_rank_or_no_rows) {
    int32_t counts[2 * 8] = {0};
    uint8_t shadowed[8];
    const shadow_problem two = lm_moe(2, 8, SHADOW_FORCE);
    ck_assert_int_eq(decide(&two, counts, shadowed), 0);
    const shadow_problem one = lm_moe(1, 8, SHADOW_FORCE);
    counts[3] = 4000; /* all rows on one expert, but only one rank */
    ck_assert_int_eq(decide(&one, counts, shadowed), 0);
}
END_TEST

/* lm-moe's layer 0 on 2 ranks: 8192 rows split 28/72; rank 1's experts 4..7
 * hold 72%, expert 5 the most. The hot experts shadowed are rank 1's, the
 * hottest among them, and the modelled step gets faster. */
static const int32_t skewed[2 * 8] = {
    /* rank 0 */ 300, 250, 320, 277, 900, 1100, 750, 199,
    /* rank 1 */ 310, 240, 330, 267, 880, 1120, 730, 200,
};

START_TEST(test_skewed_shadows_the_hot_experts) {
    for (int mode = SHADOW_AUTO; mode <= SHADOW_FORCE; mode++) {
        const shadow_problem problem = lm_moe(2, 8, (shadow_mode)mode);
        uint8_t shadowed[8];
        int count = decide(&problem, skewed, shadowed);
        ck_assert_int_ge(count, 1);
        ck_assert_int_eq(shadowed[5], 1); /* the hottest */
        for (int e = 0; e < 4; e++) ck_assert_int_eq(shadowed[e], 0);
        int64_t rank_cost[2];
        int64_t before = shadow_step_cost(&problem, skewed, NULL, rank_cost);
        int64_t after = shadow_step_cost(&problem, skewed, shadowed, rank_cost);
        ck_assert_int_lt(after, before);
        /* greedy optimum: no single further expert lowers the step */
        for (int e = 0; e < 8; e++) {
            if (shadowed[e]) continue;
            shadowed[e] = 1;
            ck_assert_int_ge(shadow_step_cost(&problem, skewed, shadowed, rank_cost), after);
            shadowed[e] = 0;
        }
    }
}
END_TEST

/* Rank 1 computes 40 rows more than rank 0, and 10 of its expert 4's rows
 * come from rank 0: shadowing expert 4 evens out 10 rows (31 MFLOP) but
 * moves its weights out and their gradient back (2 x 525k floats, 84 MFLOP
 * at 80 flops per float): not under auto, but under force. */
START_TEST(test_small_skew_not_worth_the_weights) {
    int32_t counts[2 * 8];
    for (int i = 0; i < 16; i++) counts[i] = 500;
    counts[4] = 10, counts[8 + 4] = 1030;
    uint8_t shadowed[8];
    const shadow_problem automatic = lm_moe(2, 8, SHADOW_AUTO);
    ck_assert_int_eq(decide(&automatic, counts, shadowed), 0);
    const shadow_problem forced = lm_moe(2, 8, SHADOW_FORCE);
    ck_assert_int_eq(decide(&forced, counts, shadowed), 1);
    ck_assert_int_eq(shadowed[4], 1);
}
END_TEST

/* parallel.shadow_float_cost: the dearer moving a float, the fewer experts
 * auto shadows. Rank 1's expert 4 gets 1300 rows from rank 1 and 200 from
 * rank 0, every other expert 500 from each rank: shadowing expert 4 pays at
 * the default 80 flops per float, not at the 750 measured on the loaded
 * 2-core machine (docs/scaling.md), nor at 100,000. */
START_TEST(test_dearer_floats_shadow_fewer) {
    int32_t counts[2 * 8];
    for (int i = 0; i < 16; i++) counts[i] = 500;
    counts[4] = 200, counts[8 + 4] = 1300;
    const int64_t costs[3] = {SHADOW_FLOPS_PER_FLOAT, 750, 100000};
    const int expected[3] = {1, 0, 0};
    for (int i = 0; i < 3; i++) {
        const shadow_problem problem =
            shadow_problem_for(2, 8, 256, 1024, 2, SHADOW_AUTO, costs[i]);
        uint8_t shadowed[8];
        ck_assert_int_eq(decide(&problem, counts, shadowed), expected[i]);
        ck_assert_int_eq(shadowed[4], expected[i]);
    }
}
END_TEST

/* The answer depends on the counts alone, not on what the scratch and the
 * output held before: every rank of the group decides the same. */
START_TEST(test_same_decision_whatever_the_scratch) {
    const shadow_problem problem = lm_moe(4, 16, SHADOW_AUTO);
    int32_t counts[4 * 16];
    for (int i = 0; i < 4 * 16; i++) counts[i] = (int32_t)((i * 7919) % 600 + (i % 16 == 13) * 900);
    uint8_t first[16], again[16];
    int64_t rank_cost[4] = {0};
    int count = shadow_decide(&problem, counts, rank_cost, first);
    for (int trial = 0; trial < 3; trial++) {
        int64_t garbage[4] = {-1, INT64_MAX / 3, 42, -7 * trial};
        memset(again, 0xa5 + trial, sizeof again);
        ck_assert_int_eq(shadow_decide(&problem, counts, garbage, again), count);
        ck_assert_mem_eq(first, again, sizeof first);
    }
    ck_assert_int_ge(count, 1);
    ck_assert_int_eq(first[13], 1); /* the expert every rank sends 900 more */
}
END_TEST

int main(void) {
    Suite *suite = suite_create("shadow");
    TCase *tc = tcase_create("decision");
    tcase_add_test(tc, test_cost_by_hand);
    tcase_add_test(tc, test_problem_for_a_layer);
    tcase_add_test(tc, test_balanced_shadows_nothing);
    tcase_add_test(tc, test_dearer_floats_shadow_fewer);
    tcase_add_test(tc, test_one_rank_or_no_rows);
    tcase_add_test(tc, test_skewed_shadows_the_hot_experts);
    tcase_add_test(tc, test_small_skew_not_worth_the_weights);
    tcase_add_test(tc, test_same_decision_whatever_the_scratch);
    suite_add_tcase(suite, tc);
    SRunner *runner = srunner_create(suite);
    srunner_run_all(runner, CK_NORMAL);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
