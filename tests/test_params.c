/* The parameter registry: flat groups, aligned views, deterministic init,
 * zero-grad, frozen parameters and declaration errors. */
#include <check.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "autograd/params.h"

static ag_params make_params(uint64_t seed, ag_param **w, ag_param **b, ag_param **e) {
    ag_params params;
    ag_params_init(&params);
    ck_assert_int_eq(ag_params_declare(&params, "layer.w", AG_GROUP_DENSE, 2, (int[]){30, 17},
                                       (ag_init){AG_INIT_NORMAL, 0.0f, 0.02f}, w),
                     CM_OK);
    ck_assert_int_eq(ag_params_declare(&params, "layer.b", AG_GROUP_DENSE, 1, (int[]){5},
                                       (ag_init){AG_INIT_CONSTANT, 0.5f, 0.0f}, b),
                     CM_OK);
    ck_assert_int_eq(ag_params_declare(&params, "moe.experts.w1", AG_GROUP_EXPERT, 3,
                                       (int[]){4, 3, 7}, (ag_init){AG_INIT_UNIFORM, -1.0f, 1.0f},
                                       e),
                     CM_OK);
    ck_assert_int_eq(ag_params_finalize(&params, seed), CM_OK);
    return params;
}

START_TEST(test_layout_and_views) {
    ag_param *w, *b, *e;
    ag_params params = make_params(7, &w, &b, &e);
    ck_assert_ptr_eq(ag_params_find(&params, "layer.b"), b);
    ck_assert_ptr_null(ag_params_find(&params, "layer.c"));
    ck_assert_int_eq(ag_params_count(&params, AG_GROUP_DENSE), 30 * 17 + 5);
    ck_assert_int_eq(ag_params_count(&params, AG_GROUP_EXPERT), 4 * 3 * 7);
    /* Views point into one flat buffer per group, 64-byte aligned. */
    ag_param_buffer *dense = &params.buffers[AG_GROUP_DENSE];
    ck_assert_ptr_eq(w->tensor.data, dense->data);
    ck_assert_ptr_eq(b->tensor.data, dense->data + b->offset);
    ck_assert_ptr_eq(b->tensor.grad, dense->grad + b->offset);
    ck_assert_uint_eq(b->offset % 16, 0);
    ck_assert_uint_ge(b->offset, 30 * 17);
    ck_assert_uint_ge(dense->numel, b->offset + 5);
    ck_assert_ptr_eq(e->tensor.data, params.buffers[AG_GROUP_EXPERT].data);
    for (int i = 0; i < 5; i++) ck_assert_float_eq(b->tensor.data[i], 0.5f);
    for (int64_t i = 0; i < e->tensor.numel; i++)
        ck_assert(e->tensor.data[i] >= -1.0f && e->tensor.data[i] < 1.0f);
    /* Padding between parameters stays zero. */
    for (size_t i = 30 * 17; i < b->offset; i++) ck_assert_float_eq(dense->data[i], 0.0f);
    ag_params_free(&params);
}
END_TEST

START_TEST(test_init_deterministic_and_keyed_by_name) {
    ag_param *w1, *b1, *e1, *w2, *b2, *e2;
    ag_params first = make_params(11, &w1, &b1, &e1);
    ag_params second = make_params(11, &w2, &b2, &e2);
    ck_assert_int_eq(memcmp(w1->tensor.data, w2->tensor.data, 30 * 17 * sizeof(float)), 0);
    double mean = 0, var = 0;
    for (int i = 0; i < 510; i++) mean += w1->tensor.data[i];
    mean /= 510;
    for (int i = 0; i < 510; i++) var += pow(w1->tensor.data[i] - mean, 2);
    ck_assert_double_eq_tol(sqrt(var / 510), 0.02, 0.003);
    ag_params other_seed;
    ag_params_init(&other_seed);
    ag_param *w3;
    ck_assert_int_eq(ag_params_declare(&other_seed, "layer.w", AG_GROUP_DENSE, 2, (int[]){30, 17},
                                       (ag_init){AG_INIT_NORMAL, 0.0f, 0.02f}, &w3),
                     CM_OK);
    ck_assert_int_eq(ag_params_finalize(&other_seed, 12), CM_OK);
    ck_assert_int_ne(memcmp(w1->tensor.data, w3->tensor.data, 30 * 17 * sizeof(float)), 0);
    ag_params_free(&first);
    ag_params_free(&second);
    ag_params_free(&other_seed);
}
END_TEST

START_TEST(test_shard_offset_reproduces_global_init) {
    /* Experts 2..3 of a [4,3,7] tensor, declared alone with an index offset,
     * get the same values as in the full tensor: rank-count independence. */
    ag_param *w, *b, *full;
    ag_params whole = make_params(5, &w, &b, &full);
    ag_params shard;
    ag_params_init(&shard);
    ag_param *part;
    ck_assert_int_eq(ag_params_declare(&shard, "moe.experts.w1", AG_GROUP_EXPERT, 3,
                                       (int[]){2, 3, 7}, (ag_init){AG_INIT_UNIFORM, -1.0f, 1.0f},
                                       &part),
                     CM_OK);
    part->init_index_offset = 2 * 3 * 7;
    ck_assert_int_eq(ag_params_finalize(&shard, 5), CM_OK);
    ck_assert_int_eq(
        memcmp(part->tensor.data, full->tensor.data + 2 * 3 * 7, 2 * 3 * 7 * sizeof(float)), 0);
    ag_params_free(&whole);
    ag_params_free(&shard);
}
END_TEST

START_TEST(test_zero_grad_and_frozen) {
    ag_param *w, *b, *e;
    ag_params params = make_params(3, &w, &b, &e);
    for (int g = 0; g < AG_NUM_GROUPS; g++)
        for (size_t i = 0; i < params.buffers[g].numel; i++) params.buffers[g].grad[i] = 1.0f;
    ag_params_zero_grad(&params);
    for (int g = 0; g < AG_NUM_GROUPS; g++)
        for (size_t i = 0; i < params.buffers[g].numel; i++)
            ck_assert_float_eq(params.buffers[g].grad[i], 0.0f);
    ck_assert(w->tensor.requires_grad);
    ag_param_set_frozen(w, true);
    ck_assert(w->frozen);
    ck_assert(!w->tensor.requires_grad);
    ag_params_free(&params);
}
END_TEST

START_TEST(test_declaration_errors) {
    ag_params params;
    ag_params_init(&params);
    ag_init zero = {AG_INIT_ZERO, 0, 0};
    ck_assert_int_eq(ag_params_declare(&params, "a", AG_GROUP_DENSE, 1, (int[]){3}, zero, NULL),
                     CM_OK);
    ck_assert_int_eq(ag_params_declare(&params, "a", AG_GROUP_DENSE, 1, (int[]){3}, zero, NULL),
                     CM_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(cm_error_message(), "declared twice"));
    ck_assert_int_eq(ag_params_declare(&params, "b", AG_GROUP_DENSE, 2, (int[]){3, 0}, zero, NULL),
                     CM_ERR_INVALID);
    ck_assert_int_eq(
        ag_params_declare(&params, "c", AG_GROUP_DENSE, 5, (int[]){1, 1, 1, 1, 1}, zero, NULL),
        CM_ERR_INVALID);
    ck_assert_int_eq(ag_params_finalize(&params, 1), CM_OK);
    ck_assert_int_eq(ag_params_declare(&params, "d", AG_GROUP_DENSE, 1, (int[]){3}, zero, NULL),
                     CM_ERR_INTERNAL);
    ag_params_free(&params);
}
END_TEST

int main(void) {
    Suite *suite = suite_create("params");
    TCase *tc = tcase_create("params");
    tcase_add_test(tc, test_layout_and_views);
    tcase_add_test(tc, test_init_deterministic_and_keyed_by_name);
    tcase_add_test(tc, test_shard_offset_reproduces_global_init);
    tcase_add_test(tc, test_zero_grad_and_frozen);
    tcase_add_test(tc, test_declaration_errors);
    suite_add_tcase(suite, tc);
    SRunner *runner = srunner_create(suite);
    srunner_run_all(runner, CK_NORMAL);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
