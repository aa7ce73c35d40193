/* ops_rnn.c: the GRU cell against a hand computation on an H = 2 example
 * (METHODS.md 9.6.1: r, z, n and h to 1e-7), its gradient checks (the op
 * alone, and the whole cell with its projections W_ih, W_hh, b_ih, b_hh,
 * x and h), and gradients that accumulate into a state used twice. */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "gradcheck.h"

static double sigmoid(double v) {
    return 1.0 / (1.0 + exp(-v));
}

/* METHODS.md 9.2.3 in double, one row: gi, gh [3H], h [H] -> out [H]. */
static void reference_gru(const float *gi, const float *gh, const float *h, int hidden,
                          double *out) {
    for (int j = 0; j < hidden; j++) {
        double r = sigmoid((double)gi[j] + gh[j]);
        double z = sigmoid((double)gi[hidden + j] + gh[hidden + j]);
        double n = tanh((double)gi[2 * hidden + j] + r * gh[2 * hidden + j]);
        out[j] = (1.0 - z) * n + z * h[j];
    }
}

/* H = 2, one token, chosen numbers: the cell's output against the formulas
 * evaluated by hand in double. */
START_TEST(test_gru_cell_hand_example) {
    float gi[6] = {0.5f, -1.0f, 0.25f, 2.0f, -0.75f, 1.5f};
    float gh[6] = {-0.25f, 0.5f, 1.0f, -1.5f, 2.0f, -0.5f};
    float h[2] = {0.3f, -0.8f};
    /* r = s(0.25), s(-0.5); z = s(1.25), s(0.5); n = tanh(-0.75 + r0 2), tanh(1.5 - r1 0.5) */
    const double r0 = sigmoid(0.25), r1 = sigmoid(-0.5), z0 = sigmoid(1.25), z1 = sigmoid(0.5);
    const double n0 = tanh(-0.75 + r0 * 2.0), n1 = tanh(1.5 - r1 * 0.5);
    const double expected[2] = {(1 - z0) * n0 + z0 * (double)h[0],
                                (1 - z1) * n1 + z1 * (double)h[1]};
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, 1 << 20), CM_OK);
    ag_tensor tgi = ag_tensor_wrap(gi, NULL, 2, (int[]){1, 6}, false);
    ag_tensor tgh = ag_tensor_wrap(gh, NULL, 2, (int[]){1, 6}, false);
    ag_tensor th = ag_tensor_wrap(h, NULL, 2, (int[]){1, 2}, false);
    ag_tensor *out = ag_gru_cell(&ctx, &tgi, &tgh, &th);
    ck_assert_ptr_nonnull(out);
    ck_assert_int_eq(out->ndim, 2);
    ck_assert_int_eq(out->shape[1], 2);
    double reference[2];
    reference_gru(gi, gh, h, 2, reference);
    for (int j = 0; j < 2; j++) {
        ck_assert_double_eq_tol(out->data[j], expected[j], 1e-7);
        ck_assert_double_eq_tol(reference[j], expected[j], 1e-12);
    }
    ag_ctx_free(&ctx);
}
END_TEST

static ag_tensor *forward_cell(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    (void)user;
    return ag_gru_cell(ctx, in[0], in[1], in[2]);
}

START_TEST(test_gru_cell_grad) {
    enum { N = 5, H = 3 };
    ag_tensor *in[3] = {gc_tensor_new(2, (int[]){N, 3 * H}, -2, 2, 11, true),
                        gc_tensor_new(2, (int[]){N, 3 * H}, -2, 2, 12, true),
                        gc_tensor_new(2, (int[]){N, H}, -1, 1, 13, true)};
    gc_options options = gc_default_options();
    options.atol = 1e-4;
    options.rtol = 1e-3;
    gc_result r = gc_check("gru_cell", forward_cell, in, 3, NULL, &options);
    ck_assert_msg(r.ok, "%s", r.message);
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, 1 << 20), CM_OK);
    ag_tensor *out = forward_cell(&ctx, in, NULL);
    for (int row = 0; row < N; row++) {
        double reference[H];
        reference_gru(in[0]->data + row * 3 * H, in[1]->data + row * 3 * H, in[2]->data + row * H,
                      H, reference);
        for (int j = 0; j < H; j++)
            ck_assert_double_eq_tol(out->data[row * H + j], reference[j], 1e-6);
    }
    ag_ctx_free(&ctx);
    for (int i = 0; i < 3; i++) gc_tensor_free(in[i]);
}
END_TEST

/* The whole cell: x [N,I], h [N,H], W_ih [3H,I], W_hh [3H,H], b_ih, b_hh [3H]. */
static ag_tensor *forward_full(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    (void)user;
    ag_tensor *gi = ag_linear(ctx, in[0], in[2], in[4]);
    ag_tensor *gh = ag_linear(ctx, in[1], in[3], in[5]);
    return ag_gru_cell(ctx, gi, gh, in[1]);
}

/* Two steps with one shared cell: h2 = cell(x2, cell(x1, h0)); the
 * weights' gradient is the sum of both steps' and reaches x1 through h1. */
static ag_tensor *forward_two_steps(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    (void)user;
    ag_tensor *h1 = ag_gru_cell(ctx, ag_linear(ctx, in[0], in[2], in[4]),
                                ag_linear(ctx, in[1], in[3], in[5]), in[1]);
    return ag_gru_cell(ctx, ag_linear(ctx, in[6], in[2], in[4]), ag_linear(ctx, h1, in[3], in[5]),
                       h1);
}

START_TEST(test_gru_full_cell_grad) {
    enum { N = 4, I = 5, H = 3 };
    ag_tensor *in[7] = {gc_tensor_new(2, (int[]){N, I}, -1, 1, 21, true),
                        gc_tensor_new(2, (int[]){N, H}, -1, 1, 22, true),
                        gc_tensor_new(2, (int[]){3 * H, I}, -0.8f, 0.8f, 23, true),
                        gc_tensor_new(2, (int[]){3 * H, H}, -0.8f, 0.8f, 24, true),
                        gc_tensor_new(1, (int[]){3 * H}, -0.5f, 0.5f, 25, true),
                        gc_tensor_new(1, (int[]){3 * H}, -0.5f, 0.5f, 26, true),
                        gc_tensor_new(2, (int[]){N, I}, -1, 1, 27, true)};
    gc_options options = gc_default_options();
    options.atol = 1e-4;
    options.rtol = 1e-3;
    gc_result r = gc_check("gru_full", forward_full, in, 6, NULL, &options);
    ck_assert_msg(r.ok, "%s", r.message);
    r = gc_check("gru_two_steps", forward_two_steps, in, 7, NULL, &options);
    ck_assert_msg(r.ok, "%s", r.message);
    for (int i = 0; i < 7; i++) gc_tensor_free(in[i]);
}
END_TEST

/* No gradient wanted for h (a state from no-grad code): the op still
 * records and fills gi's and gh's gradients. */
START_TEST(test_gru_cell_constant_state) {
    enum { N = 3, H = 2 };
    ag_tensor *in[3] = {gc_tensor_new(2, (int[]){N, 3 * H}, -2, 2, 31, true),
                        gc_tensor_new(2, (int[]){N, 3 * H}, -2, 2, 32, true),
                        gc_tensor_new(2, (int[]){N, H}, -1, 1, 33, false)};
    gc_options options = gc_default_options();
    gc_result r = gc_check("gru_cell_constant_state", forward_cell, in, 3, NULL, &options);
    ck_assert_msg(r.ok, "%s", r.message);
    for (int i = 0; i < 3; i++) gc_tensor_free(in[i]);
}
END_TEST

int main(void) {
    Suite *suite = suite_create("ops_rnn");
    TCase *tc = tcase_create("gru");
    tcase_add_test(tc, test_gru_cell_hand_example);
    tcase_add_test(tc, test_gru_cell_grad);
    tcase_add_test(tc, test_gru_full_cell_grad);
    tcase_add_test(tc, test_gru_cell_constant_state);
    suite_add_tcase(suite, tc);
    SRunner *runner = srunner_create(suite);
    srunner_run_all(runner, CK_NORMAL);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
