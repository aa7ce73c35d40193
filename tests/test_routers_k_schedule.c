/* SMoE-Dropout's k schedule (routers/k_schedule.h): Python's round(), the
 * released linear schedule step by step, and the other modes against values
 * from Python 3. */
#include <check.h>
#include <stdlib.h>

#include "routers/k_schedule.h"

START_TEST(test_round_half_even) {
    const double in[] = {0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, 2.4999999, 2.5000001, 7.0, -0.2};
    const double want[] = {0, 2, 2, 4, 0, -2, -2, 2, 3, 7, 0};
    for (size_t i = 0; i < sizeof in / sizeof in[0]; i++)
        ck_assert_double_eq(router_round_half_even(in[i]), want[i]);
}
END_TEST

/* The released Table-1 script: k_min 8, k_max 16, S = 400000. (k_max - k_min) s
 * / S = s / 50000 hits x.5 exactly at s = 25000, 75000, ...; half-to-even
 * rounds 0.5 down, 1.5 up, 2.5 down, ... so k changes at these steps (values
 * from Python 3's round(); METHODS.md's "9 at 25k" is one step early). */
START_TEST(test_k_linear_increase_smoe_script) {
    router_k_schedule s = {ROUTER_K_LINEAR_INCREASE, 8, 16, 400000};
    ck_assert_int_eq(router_k_schedule_check(&s), CM_OK);
    const int64_t first_step[] = {25001, 75000, 125001, 175000, 225001, 275000, 325001, 375000};
    ck_assert_int_eq(router_k_at(&s, 0), 8);
    ck_assert_int_eq(router_k_at(&s, 24999), 8);
    for (int k = 9; k <= 16; k++) {
        ck_assert_int_eq(router_k_at(&s, first_step[k - 9] - 1), k - 1);
        ck_assert_int_eq(router_k_at(&s, first_step[k - 9]), k);
    }
    ck_assert_int_eq(router_k_at(&s, 400000), 16);
    ck_assert_int_eq(router_k_at(&s, 1000000), 16);
    /* k only ever steps up by one. */
    int previous = router_k_at(&s, 0);
    for (int64_t step = 1; step <= 400000; step += 7) {
        int k = router_k_at(&s, step);
        ck_assert(k == previous || k == previous + 1);
        previous = k;
    }
}
END_TEST

START_TEST(test_k_other_modes) {
    /* Expected values from Python 3 (round(), math.cos) on the formulas. */
    router_k_schedule cosine = {ROUTER_K_COSINE_INCREASE, 2, 16, 1000};
    const int64_t cos_steps[] = {0, 250, 500, 750, 999, 1000, 5000};
    const int cos_k[] = {2, 3, 6, 11, 16, 16, 16};
    for (int i = 0; i < 7; i++) ck_assert_int_eq(router_k_at(&cosine, cos_steps[i]), cos_k[i]);

    router_k_schedule exp_inc = {ROUTER_K_EXP_INCREASE, 2, 16, 30000}; /* interval 100 */
    const int64_t exp_steps[] = {0, 99, 100, 399, 400, 29999, 30000};
    const int exp_k[] = {2, 2, 2, 2, 3, 15, 15};
    for (int i = 0; i < 7; i++) ck_assert_int_eq(router_k_at(&exp_inc, exp_steps[i]), exp_k[i]);

    router_k_schedule multi = {ROUTER_K_MULTI_STEP_INCREASE, 1, 16, 1000};
    const int64_t multi_steps[] = {0, 199, 200, 399, 400, 600, 800, 999, 1000};
    const int multi_k[] = {1, 1, 2, 2, 4, 8, 16, 16, 16};
    for (int i = 0; i < 9; i++) ck_assert_int_eq(router_k_at(&multi, multi_steps[i]), multi_k[i]);
    multi.k_min = 2, multi.k_max = 8; /* clipped into [2, 8] */
    ck_assert_int_eq(router_k_at(&multi, 0), 2);
    ck_assert_int_eq(router_k_at(&multi, 999), 8);

    router_k_schedule constant = {ROUTER_K_CONSTANT, 2, 4, 0};
    ck_assert_int_eq(router_k_schedule_check(&constant), CM_OK);
    ck_assert_int_eq(router_k_at(&constant, 0), 4);
    ck_assert_int_eq(router_k_at(&constant, 123456), 4);

    router_k_schedule bad = {ROUTER_K_LINEAR_INCREASE, 4, 2, 100};
    ck_assert_int_eq(router_k_schedule_check(&bad), CM_ERR_INVALID);
    bad = (router_k_schedule){ROUTER_K_LINEAR_INCREASE, 2, 4, 0};
    ck_assert_int_eq(router_k_schedule_check(&bad), CM_ERR_INVALID);
    bad = (router_k_schedule){ROUTER_K_MODE_COUNT, 2, 4, 100};
    ck_assert_int_eq(router_k_schedule_check(&bad), CM_ERR_INVALID);
}
END_TEST

int main(void) {
    Suite *suite = suite_create("routers_k_schedule");
    TCase *tc = tcase_create("k_schedule");
    tcase_add_test(tc, test_round_half_even);
    tcase_add_test(tc, test_k_linear_increase_smoe_script);
    tcase_add_test(tc, test_k_other_modes);
    suite_add_tcase(suite, tc);
    SRunner *runner = srunner_create(suite);
    srunner_run_all(runner, CK_NORMAL);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
