/* The engine itself: arena, tape, gradient accumulation, pruning, no-grad
 * mode, error reporting, and memory reuse across steps. */
#include <check.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "autograd/ops.h"

static float ones[4096];

static void setup(void) {
    for (int i = 0; i < 4096; i++) ones[i] = 1.0f;
}

START_TEST(test_arena_alignment_reset_overflow) {
    ag_arena arena;
    ck_assert_int_eq(ag_arena_init(&arena, 4096), CM_OK);
    void *first = ag_arena_alloc(&arena, 3);
    void *second = ag_arena_alloc(&arena, 100);
    ck_assert_uint_eq((uintptr_t)first % AG_ARENA_ALIGN, 0);
    ck_assert_uint_eq((uintptr_t)second % AG_ARENA_ALIGN, 0);
    ck_assert_ptr_ne(first, second);
    ck_assert_ptr_null(ag_arena_alloc(&arena, 8192));     /* does not fit */
    ck_assert_ptr_null(ag_arena_alloc(&arena, SIZE_MAX)); /* no overflow in rounding */
    size_t high_water = arena.high_water;
    ag_arena_reset(&arena);
    ck_assert_ptr_eq(ag_arena_alloc(&arena, 3), first); /* memory reused */
    ck_assert_uint_eq(arena.high_water, high_water);
    ag_arena_free(&arena);
}
END_TEST

START_TEST(test_overflow_names_the_op) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, 4096), CM_OK);
    float *big = calloc(10000, sizeof(float));
    ag_tensor x = ag_tensor_wrap(big, NULL, 1, (int[]){10000}, false);
    ag_tensor *y = ag_relu(&ctx, &x);
    ck_assert_ptr_null(y);
    ck_assert_int_eq(ag_ctx_status(&ctx), CM_ERR_NOMEM);
    ck_assert_msg(strstr(cm_error_message(), "'relu'") != NULL, "message: %s", cm_error_message());
    ck_assert_msg(strstr(cm_error_message(), "arena") != NULL, "message: %s", cm_error_message());
    /* Sticky: later ops do nothing and return NULL, even small ones. */
    ag_tensor small = ag_tensor_wrap(big, NULL, 1, (int[]){4}, false);
    ck_assert_ptr_null(ag_scale(&ctx, &small, 2.0f));
    ck_assert_ptr_null(ag_add(&ctx, y, &small)); /* NULL input propagates */
    ck_assert_int_eq(ag_backward(&ctx, y), CM_ERR_NOMEM);
    /* A new step starts clean. */
    ag_ctx_reset(&ctx);
    ck_assert_ptr_nonnull(ag_scale(&ctx, &small, 2.0f));
    free(big);
    ag_ctx_free(&ctx);
}
END_TEST

START_TEST(test_tensor_used_twice_gets_both_contributions) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, 1 << 20), CM_OK);
    float data[3] = {-1.0f, 0.5f, 2.0f}, grad[3] = {0};
    ag_tensor x = ag_tensor_wrap(data, grad, 1, (int[]){3}, true);
    /* y = x*x + 3x  ->  dy/dx = 2x + 3 */
    ag_tensor *y = ag_add(&ctx, ag_mul(&ctx, &x, &x), ag_scale(&ctx, &x, 3.0f));
    ck_assert_int_eq(ag_backward_from(&ctx, y, ones), CM_OK);
    for (int i = 0; i < 3; i++) ck_assert_float_eq_tol(grad[i], 2.0f * data[i] + 3.0f, 1e-6f);
    /* A second step accumulates into the same leaf gradient (+=). */
    ag_ctx_reset(&ctx);
    y = ag_add(&ctx, ag_mul(&ctx, &x, &x), ag_scale(&ctx, &x, 3.0f));
    ck_assert_int_eq(ag_backward_from(&ctx, y, ones), CM_OK);
    for (int i = 0; i < 3; i++)
        ck_assert_float_eq_tol(grad[i], 2.0f * (2.0f * data[i] + 3.0f), 1e-6f);
    ag_ctx_free(&ctx);
}
END_TEST

START_TEST(test_pruning_and_no_grad) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, 1 << 20), CM_OK);
    float a_data[2] = {1, 2}, b_data[2] = {3, 4}, b_grad[2] = {0};
    ag_tensor a = ag_tensor_wrap(a_data, NULL, 1, (int[]){2}, false);
    ag_tensor b = ag_tensor_wrap(b_data, b_grad, 1, (int[]){2}, true);

    ag_tensor *constant = ag_mul(&ctx, &a, &a);
    ck_assert(!constant->requires_grad);
    ck_assert_int_eq(ctx.tape_length, 0); /* nothing to differentiate: no node */
    ck_assert_int_eq(ag_backward_from(&ctx, constant, ones), CM_ERR_INVALID);

    bool previous = ag_set_grad_enabled(&ctx, false);
    ck_assert(previous);
    ag_tensor *evaluated = ag_mul(&ctx, &a, &b);
    ck_assert(!evaluated->requires_grad);
    ck_assert_int_eq(ctx.tape_length, 0);
    ag_set_grad_enabled(&ctx, true);

    /* Gradient with respect to b only; a (not requiring one) gets none. */
    ag_tensor *y = ag_mul(&ctx, &a, &b);
    ck_assert_int_eq(ctx.tape_length, 1);
    ck_assert_int_eq(ag_backward_from(&ctx, y, ones), CM_OK);
    ck_assert_ptr_null(a.grad);
    ck_assert_float_eq(b_grad[0], 1.0f);
    ck_assert_float_eq(b_grad[1], 2.0f);
    ck_assert_int_eq(ctx.tape_length, 0); /* backward consumed the tape */
    ag_ctx_free(&ctx);
}
END_TEST

START_TEST(test_unused_branch_gets_no_gradient) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, 1 << 20), CM_OK);
    float data[2] = {1, -2}, grad[2] = {0};
    ag_tensor x = ag_tensor_wrap(data, grad, 1, (int[]){2}, true);
    ag_tensor *unused = ag_relu(&ctx, &x);
    ag_tensor *used = ag_scale(&ctx, &x, 5.0f);
    ck_assert_int_eq(ag_backward_from(&ctx, used, ones), CM_OK);
    ck_assert_ptr_null(unused->grad); /* its node was skipped */
    ck_assert_float_eq(grad[0], 5.0f);
    ck_assert_float_eq(grad[1], 5.0f);
    ag_ctx_free(&ctx);
}
END_TEST

START_TEST(test_backward_rejects_non_scalar) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, 1 << 20), CM_OK);
    float data[2] = {1, 2}, grad[2] = {0};
    ag_tensor x = ag_tensor_wrap(data, grad, 1, (int[]){2}, true);
    ag_tensor *y = ag_scale(&ctx, &x, 2.0f);
    ck_assert_int_eq(ag_backward(&ctx, y), CM_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(cm_error_message(), "scalar"));
    ag_ctx_free(&ctx);
}
END_TEST

START_TEST(test_mark_release) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, 1 << 20), CM_OK);
    float data[4] = {1, 2, 3, 4}, grad[4] = {0};
    ag_tensor x = ag_tensor_wrap(data, grad, 1, (int[]){4}, true);
    ag_tensor *kept = ag_scale(&ctx, &x, 2.0f);
    ag_mark mark = ag_ctx_mark(&ctx);
    size_t used = ctx.arena.used;
    for (int i = 0; i < 10; i++) ag_relu(&ctx, kept);
    ck_assert_int_eq(ctx.tape_length, 11);
    ag_ctx_release(&ctx, mark);
    ck_assert_int_eq(ctx.tape_length, 1);
    ck_assert_uint_eq(ctx.arena.used, used);
    ck_assert_int_eq(ag_backward_from(&ctx, kept, ones), CM_OK);
    ck_assert_float_eq(grad[3], 2.0f);
    ag_ctx_free(&ctx);
}
END_TEST

/* 100 training-like steps: the arena must hand out the same memory each
 * step and never grow past the first step's high-water mark. */
START_TEST(test_arena_reused_across_steps) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, 1 << 20), CM_OK);
    enum { N = 257 };
    float w_data[N], w_grad[N] = {0}, x_data[N];
    for (int i = 0; i < N; i++) w_data[i] = 0.01f * (float)(i - 128), x_data[i] = 1.0f;
    ag_tensor w = ag_tensor_wrap(w_data, w_grad, 1, (int[]){N}, true);
    ag_tensor x = ag_tensor_wrap(x_data, NULL, 1, (int[]){N}, false);
    float *first_data = NULL;
    size_t first_used = 0, first_high = 0;
    for (int step = 0; step < 100; step++) {
        ag_ctx_reset(&ctx);
        ag_tensor *h = ag_gelu(&ctx, ag_mul(&ctx, &x, &w));
        ag_tensor *y = ag_add(&ctx, ag_silu(&ctx, h), ag_relu(&ctx, h));
        ck_assert_int_eq(ag_backward_from(&ctx, y, ones), CM_OK);
        for (int i = 0; i < N; i++) w_data[i] -= 0.01f * w_grad[i], w_grad[i] = 0.0f;
        if (step == 0) {
            first_data = h->data;
            first_used = ctx.arena.used;
            first_high = ctx.arena.high_water;
        }
        ck_assert_ptr_eq(h->data, first_data);
        ck_assert_uint_eq(ctx.arena.used, first_used);
        ck_assert_uint_eq(ctx.arena.high_water, first_high);
    }
    ag_ctx_free(&ctx);
}
END_TEST

/* Backward frees an op output's gradient once that op's backward has run
 * and reuses the block: a chain of 20 ops then needs the memory of a couple
 * of live gradients, not 20. Leaves keep theirs; keep_grads keeps all. */
START_TEST(test_intermediate_gradients_recycled) {
    enum { N = 4096, CHAIN = 20 };
    size_t grown[2];
    for (int keep = 0; keep < 2; keep++) {
        ag_ctx ctx;
        ck_assert_int_eq(ag_ctx_init(&ctx, 8 << 20), CM_OK);
        ctx.keep_grads = keep;
        float *x_data = calloc(N, sizeof(float)), *x_grad = calloc(N, sizeof(float));
        for (int i = 0; i < N; i++) x_data[i] = 0.001f * (float)i;
        ag_tensor x = ag_tensor_wrap(x_data, x_grad, 1, (int[]){N}, true);
        ag_tensor *chain[CHAIN];
        ag_tensor *y = &x;
        for (int i = 0; i < CHAIN; i++) y = chain[i] = ag_scale(&ctx, y, 1.0f + 0.01f * (float)i);
        size_t before = ctx.arena.used;
        ck_assert_int_eq(ag_backward_from(&ctx, y, ones), CM_OK);
        grown[keep] = ctx.arena.used - before;
        double factor = 1.0;
        for (int i = 0; i < CHAIN; i++) factor *= 1.0 + 0.01 * i;
        ck_assert_double_eq_tol(x_grad[N - 1], factor, 1e-4);
        for (int i = 0; i < CHAIN; i++)
            ck_assert(keep ? chain[i]->grad != NULL : chain[i]->grad == NULL);
        free(x_data);
        free(x_grad);
        ag_ctx_free(&ctx);
    }
    /* every one of the 20 gradients kept vs two blocks alternating */
    ck_assert_uint_ge(grown[1], (size_t)CHAIN * N * sizeof(float));
    ck_assert_uint_le(grown[0], 3 * (N * sizeof(float) + 64));
}
END_TEST

/* Blocks freed inside a released scope are not handed out afterwards (they
 * lie above the mark, where new tensors now live). */
START_TEST(test_release_drops_freed_blocks_above_mark) {
    enum { N = 1024 };
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, 1 << 20), CM_OK);
    float x_data[N], x_grad[N] = {0};
    for (int i = 0; i < N; i++) x_data[i] = 1.0f;
    ag_tensor x = ag_tensor_wrap(x_data, x_grad, 1, (int[]){N}, true);
    ag_mark mark = ag_ctx_mark(&ctx);
    ag_tensor *inner = ag_scale(&ctx, ag_scale(&ctx, &x, 2.0f), 3.0f);
    ck_assert_int_eq(ag_backward_from(&ctx, inner, ones), CM_OK);
    ck_assert_ptr_nonnull(ctx.grad_free); /* the scope's freed gradients */
    ag_ctx_release(&ctx, mark);
    ck_assert_ptr_null(ctx.grad_free);
    /* what comes next reuses the scope's memory and computes correctly */
    memset(x_grad, 0, sizeof x_grad);
    ag_tensor *outer = ag_scale(&ctx, ag_scale(&ctx, &x, 5.0f), 7.0f);
    ck_assert_int_eq(ag_backward_from(&ctx, outer, ones), CM_OK);
    for (int i = 0; i < N; i++) ck_assert_float_eq(x_grad[i], 35.0f);
    ck_assert_float_eq(outer->data[0], 35.0f);
    ag_ctx_free(&ctx);
}
END_TEST

int main(void) {
    setup();
    Suite *suite = suite_create("autograd");
    TCase *tc = tcase_create("engine");
    tcase_add_test(tc, test_arena_alignment_reset_overflow);
    tcase_add_test(tc, test_overflow_names_the_op);
    tcase_add_test(tc, test_tensor_used_twice_gets_both_contributions);
    tcase_add_test(tc, test_pruning_and_no_grad);
    tcase_add_test(tc, test_unused_branch_gets_no_gradient);
    tcase_add_test(tc, test_backward_rejects_non_scalar);
    tcase_add_test(tc, test_mark_release);
    tcase_add_test(tc, test_arena_reused_across_steps);
    tcase_add_test(tc, test_intermediate_gradients_recycled);
    tcase_add_test(tc, test_release_drops_freed_blocks_above_mark);
    suite_add_tcase(suite, tc);
    SRunner *runner = srunner_create(suite);
    srunner_run_all(runner, CK_NORMAL);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
