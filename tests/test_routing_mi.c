/* train/routing_mi.c: the top-1 pairs of consecutive MoE layers (largest
 * gate, ties to the lower expert, tokens without a slot skipped) and the
 * mutual information of their counts (independent: 0; identical over E
 * equally used experts: log2 E; a hand-computed 2 x 2 table). */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "train/routing_mi.h"

START_TEST(test_mutual_information_values) {
    /* identical choices, 4 experts used equally: 2 bits */
    int64_t identical[16] = {0};
    for (int e = 0; e < 4; e++) identical[e * 4 + e] = 5;
    ck_assert_double_eq_tol(routing_top1_mutual_information(identical, 1, 4), 2.0, 1e-12);
    /* independent: every pair equally often */
    int64_t independent[16];
    for (int i = 0; i < 16; i++) independent[i] = 3;
    ck_assert_double_eq_tol(routing_top1_mutual_information(independent, 1, 4), 0.0, 1e-12);
    /* [[3,1],[1,3]]: 2 (3/8) log2(3/2) + 2 (1/8) log2(1/2) */
    int64_t table[8] = {3, 1, 1, 3, 0, 0, 0, 0}; /* a second pair with no count is skipped */
    const double expected = 0.75 * log2(1.5) - 0.25;
    ck_assert_double_eq_tol(routing_top1_mutual_information(table, 2, 2), expected, 1e-12);
    /* the mean over two pairs */
    int64_t two[8] = {3, 1, 1, 3, 2, 0, 0, 2};
    ck_assert_double_eq_tol(routing_top1_mutual_information(two, 2, 2), (expected + 1.0) / 2,
                            1e-12);
    int64_t none[4] = {0};
    ck_assert(isnan(routing_top1_mutual_information(none, 1, 2)));
}
END_TEST

START_TEST(test_count_top1_pairs) {
    /* 3 tokens, 3 layers, 3 experts; layer 1 gives token 2 no slot */
    const int32_t offsets0[4] = {0, 2, 4, 5}, expert0[5] = {0, 2, 1, 2, 1};
    const float gates0[5] = {0.3f, 0.7f, 0.5f, 0.5f, 1.0f}; /* top-1: 2, 1 (tie), 1 */
    const int32_t offsets1[4] = {0, 1, 3, 3}, expert1[3] = {0, 0, 2};
    const float gates1[3] = {1.0f, 0.2f, 0.8f}; /* top-1: 0, 2, none */
    const int32_t offsets2[4] = {0, 1, 2, 3}, expert2[3] = {1, 1, 0};
    const float gates2[3] = {1.0f, 1.0f, 1.0f}; /* top-1: 1, 1, 0 */
    lm_moe_report report = {.n_layers = 3};
    const int32_t *offsets[3] = {offsets0, offsets1, offsets2};
    const int32_t *experts[3] = {expert0, expert1, expert2};
    const float *gates[3] = {gates0, gates1, gates2};
    for (int i = 0; i < 3; i++) {
        report.stats[i].tokens = 3;
        report.offsets[i] = offsets[i];
        report.expert[i] = experts[i];
        report.gates[i] = gates[i];
    }
    int64_t counts[2 * 9] = {0};
    routing_count_top1_pairs(&report, 3, counts);
    int64_t expected[2 * 9] = {0};
    expected[2 * 3 + 0] = 1;     /* layer 0 -> 1, token 0: 2 -> 0 */
    expected[1 * 3 + 2] = 1;     /* token 1: 1 -> 2; token 2 skipped */
    expected[9 + 0 * 3 + 1] = 1; /* layer 1 -> 2, token 0: 0 -> 1 */
    expected[9 + 2 * 3 + 1] = 1; /* token 1: 2 -> 1; token 2 skipped */
    for (int i = 0; i < 18; i++) ck_assert_int_eq(counts[i], expected[i]);
    routing_count_top1_pairs(&report, 3, counts); /* adds */
    ck_assert_int_eq(counts[2 * 3 + 0], 2);
}
END_TEST

int main(void) {
    Suite *suite = suite_create("routing_mi");
    TCase *tc = tcase_create("routing_mi");
    tcase_add_test(tc, test_mutual_information_values);
    tcase_add_test(tc, test_count_top1_pairs);
    suite_add_tcase(suite, tc);
    SRunner *runner = srunner_create(suite);
    srunner_run_all(runner, CK_NORMAL);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
