/* The counter-based generator: Philox known answers, determinism, key
 * separation and the moments of each distribution. */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/rng.h"

START_TEST(test_philox_known_answers) {
    /* Known-answer vectors published with the Random123 library. */
    const struct {
        uint32_t counter[4], key[2], expected[4];
    } cases[] = {
        {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
        {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff},
         {0xffffffff, 0xffffffff},
         {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
        {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344},
         {0xa4093822, 0x299f31d0},
         {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        uint32_t out[4];
        cm_philox4x32_10(cases[c].counter, cases[c].key, out);
        for (int i = 0; i < 4; i++)
            ck_assert_msg(out[i] == cases[c].expected[i], "case %zu word %d: %08x != %08x", c, i,
                          out[i], cases[c].expected[i]);
    }
}
END_TEST

START_TEST(test_determinism_and_key_separation) {
    cm_rng_key key = {42, 7, 3, CM_RNG_DROPOUT};
    ck_assert_uint_eq(cm_rng_u64(key, 1000), cm_rng_u64(key, 1000));
    cm_rng_key other_seed = key, other_step = key, other_layer = key, other_purpose = key;
    other_seed.seed++;
    other_step.step++;
    other_layer.layer++;
    other_purpose.purpose = CM_RNG_DATA;
    int same = 0;
    for (uint64_t i = 0; i < 1000; i++) {
        uint64_t v = cm_rng_u64(key, i);
        same += v == cm_rng_u64(other_seed, i);
        same += v == cm_rng_u64(other_step, i);
        same += v == cm_rng_u64(other_layer, i);
        same += v == cm_rng_u64(other_purpose, i);
        same += v == cm_rng_u64(key, i + 1);
    }
    ck_assert_int_eq(same, 0);
}
END_TEST

enum { SAMPLES = 200000 };

START_TEST(test_uniform_moments) {
    float *x = malloc(SAMPLES * sizeof(float));
    cm_rng_fill_uniform((cm_rng_key){1, 0, 0, CM_RNG_TEST}, 0, SAMPLES, -2.0f, 4.0f, x);
    double mean = 0, var = 0;
    for (int i = 0; i < SAMPLES; i++) {
        ck_assert(x[i] >= -2.0f && x[i] < 4.0f);
        mean += x[i];
    }
    mean /= SAMPLES;
    for (int i = 0; i < SAMPLES; i++) var += (x[i] - mean) * (x[i] - mean);
    var /= SAMPLES;
    /* mean 1, variance 36/12 = 3; standard error of the mean ~0.004 */
    ck_assert_double_eq_tol(mean, 1.0, 0.02);
    ck_assert_double_eq_tol(var, 3.0, 0.05);
    free(x);
}
END_TEST

START_TEST(test_normal_moments) {
    float *x = malloc(SAMPLES * sizeof(float));
    cm_rng_fill_normal((cm_rng_key){2, 0, 0, CM_RNG_TEST}, 0, SAMPLES, 0.5f, 2.0f, x);
    double mean = 0, var = 0, within_one_sd = 0;
    for (int i = 0; i < SAMPLES; i++) mean += x[i];
    mean /= SAMPLES;
    for (int i = 0; i < SAMPLES; i++) {
        var += (x[i] - mean) * (x[i] - mean);
        within_one_sd += fabs(x[i] - 0.5) < 2.0;
    }
    var /= SAMPLES;
    ck_assert_double_eq_tol(mean, 0.5, 0.02);
    ck_assert_double_eq_tol(var, 4.0, 0.06);
    ck_assert_double_eq_tol(within_one_sd / SAMPLES, 0.6827, 0.005);
    free(x);
}
END_TEST

START_TEST(test_bernoulli_rate) {
    float *x = malloc(SAMPLES * sizeof(float));
    cm_rng_fill_bernoulli((cm_rng_key){3, 0, 0, CM_RNG_TEST}, 0, SAMPLES, 0.3f, x);
    double ones = 0;
    for (int i = 0; i < SAMPLES; i++) {
        ck_assert(x[i] == 0.0f || x[i] == 1.0f);
        ones += x[i];
    }
    ck_assert_double_eq_tol(ones / SAMPLES, 0.3, 0.005);
    free(x);
}
END_TEST

START_TEST(test_below_and_permutation) {
    int counts[7] = {0};
    cm_rng_key key = {4, 0, 0, CM_RNG_TEST};
    for (uint64_t i = 0; i < 70000; i++) {
        uint64_t v = cm_rng_below(key, i, 7);
        ck_assert_uint_lt(v, 7);
        counts[v]++;
    }
    for (int v = 0; v < 7; v++) ck_assert_int_gt(counts[v], 9500);

    enum { N = 1000 };
    int32_t perm[N], again[N];
    int seen[N] = {0};
    cm_rng_permutation(key, N, perm);
    cm_rng_permutation(key, N, again);
    int fixed_points = 0;
    for (int i = 0; i < N; i++) {
        ck_assert(perm[i] >= 0 && perm[i] < N);
        seen[perm[i]]++;
        fixed_points += perm[i] == i;
        ck_assert_int_eq(perm[i], again[i]);
    }
    for (int i = 0; i < N; i++) ck_assert_int_eq(seen[i], 1);
    ck_assert_int_lt(fixed_points, 10); /* expected 1 for a random permutation */
}
END_TEST

START_TEST(test_bulk_fill_equals_single_draws) {
    /* Every offset and length, so the block alignment is exercised. */
    cm_rng_key key = {6, 2, 1, CM_RNG_TEST};
    float bulk[23], normal[23];
    for (uint64_t first = 0; first < 9; first++)
        for (int64_t n = 0; n <= 23; n++) {
            cm_rng_fill_uniform(key, first, n, -1.0f, 3.0f, bulk);
            cm_rng_fill_normal(key, first, n, 0.5f, 2.0f, normal);
            for (int64_t i = 0; i < n; i++) {
                ck_assert_float_eq(bulk[i],
                                   -1.0f + 4.0f * cm_rng_uniform(key, first + (uint64_t)i));
                ck_assert_float_eq(normal[i],
                                   0.5f + 2.0f * cm_rng_normal(key, first + (uint64_t)i));
            }
        }
    /* Neighbouring indices share a block but not a value. */
    ck_assert_float_ne(cm_rng_uniform(key, 4), cm_rng_uniform(key, 5));
    ck_assert_float_ne(cm_rng_normal(key, 4), cm_rng_normal(key, 5));
}
END_TEST

int main(void) {
    Suite *suite = suite_create("rng");
    TCase *tc = tcase_create("rng");
    tcase_add_test(tc, test_philox_known_answers);
    tcase_add_test(tc, test_determinism_and_key_separation);
    tcase_add_test(tc, test_uniform_moments);
    tcase_add_test(tc, test_normal_moments);
    tcase_add_test(tc, test_bernoulli_rate);
    tcase_add_test(tc, test_below_and_permutation);
    tcase_add_test(tc, test_bulk_fill_equals_single_draws);
    suite_add_tcase(suite, tc);
    SRunner *runner = srunner_create(suite);
    srunner_run_all(runner, CK_NORMAL);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
