/* Backward through a composed graph: a 2-layer MLP with cross-entropy,
 * against gradients derived by hand and computed in double. */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "autograd/ops.h"
#include "autograd/params.h"

enum { N = 6, IN = 3, HIDDEN = 5, CLASSES = 4 };

START_TEST(test_mlp_cross_entropy_matches_hand_derivation) {
    ag_params params;
    ag_params_init(&params);
    ag_param *w1, *b1, *w2, *b2;
    ag_init init = {AG_INIT_NORMAL, 0.0f, 0.7f};
    ck_assert_int_eq(
        ag_params_declare(&params, "w1", AG_GROUP_DENSE, 2, (int[]){HIDDEN, IN}, init, &w1), CM_OK);
    ck_assert_int_eq(
        ag_params_declare(&params, "b1", AG_GROUP_DENSE, 1, (int[]){HIDDEN}, init, &b1), CM_OK);
    ck_assert_int_eq(
        ag_params_declare(&params, "w2", AG_GROUP_DENSE, 2, (int[]){CLASSES, HIDDEN}, init, &w2),
        CM_OK);
    ck_assert_int_eq(
        ag_params_declare(&params, "b2", AG_GROUP_DENSE, 1, (int[]){CLASSES}, init, &b2), CM_OK);
    ck_assert_int_eq(ag_params_finalize(&params, 99), CM_OK);

    float x_data[N * IN], x_grad[N * IN] = {0};
    cm_rng_fill_uniform((cm_rng_key){3, 0, 0, CM_RNG_TEST}, 0, N * IN, -2.0f, 2.0f, x_data);
    const int32_t labels[N] = {0, 3, 1, -1, 2, 3}; /* row 3 is ignored */
    ag_tensor x = ag_tensor_wrap(x_data, x_grad, 2, (int[]){N, IN}, true);

    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, 1 << 20), CM_OK);
    ag_tensor *pre = ag_linear(&ctx, &x, &w1->tensor, &b1->tensor);
    ag_tensor *logits = ag_linear(&ctx, ag_relu(&ctx, pre), &w2->tensor, &b2->tensor);
    ag_tensor *loss = ag_cross_entropy(&ctx, logits, labels, -1);
    ck_assert_int_eq(ag_backward(&ctx, loss), CM_OK);

    /* The same network by hand, in double. */
    const float *W1 = w1->tensor.data, *B1 = b1->tensor.data, *W2 = w2->tensor.data,
                *B2 = b2->tensor.data;
    double h_pre[N][HIDDEN], h[N][HIDDEN], z[N][CLASSES], dz[N][CLASSES] = {{0}};
    double dW1[HIDDEN][IN] = {{0}}, dB1[HIDDEN] = {0}, dW2[CLASSES][HIDDEN] = {{0}},
           dB2[CLASSES] = {0}, dX[N][IN] = {{0}}, want_loss = 0;
    int valid = 0;
    for (int n = 0; n < N; n++) valid += labels[n] >= 0;
    for (int n = 0; n < N; n++) {
        for (int j = 0; j < HIDDEN; j++) {
            h_pre[n][j] = B1[j];
            for (int i = 0; i < IN; i++) h_pre[n][j] += (double)W1[j * IN + i] * x_data[n * IN + i];
            h[n][j] = h_pre[n][j] > 0 ? h_pre[n][j] : 0;
        }
        double max = -1e300, total = 0;
        for (int c = 0; c < CLASSES; c++) {
            z[n][c] = B2[c];
            for (int j = 0; j < HIDDEN; j++) z[n][c] += (double)W2[c * HIDDEN + j] * h[n][j];
            max = fmax(max, z[n][c]);
        }
        for (int c = 0; c < CLASSES; c++) total += exp(z[n][c] - max);
        if (labels[n] < 0) continue;
        want_loss += (max + log(total) - z[n][labels[n]]) / valid;
        /* dL/dz = (softmax - onehot) / valid */
        for (int c = 0; c < CLASSES; c++)
            dz[n][c] = (exp(z[n][c] - max) / total - (c == labels[n])) / valid;
    }
    for (int n = 0; n < N; n++) {
        double dh[HIDDEN] = {0};
        for (int c = 0; c < CLASSES; c++) {
            dB2[c] += dz[n][c];
            for (int j = 0; j < HIDDEN; j++) {
                dW2[c][j] += dz[n][c] * h[n][j];
                dh[j] += dz[n][c] * W2[c * HIDDEN + j];
            }
        }
        for (int j = 0; j < HIDDEN; j++) {
            double dpre = h_pre[n][j] > 0 ? dh[j] : 0;
            dB1[j] += dpre;
            for (int i = 0; i < IN; i++) {
                dW1[j][i] += dpre * x_data[n * IN + i];
                dX[n][i] += dpre * W1[j * IN + i];
            }
        }
    }
#define CLOSE(got, want) ck_assert_double_eq_tol((got), (want), 1e-5 * (1.0 + fabs(want)))
    CLOSE(loss->data[0], want_loss);
    for (int j = 0; j < HIDDEN; j++) {
        CLOSE(b1->tensor.grad[j], dB1[j]);
        for (int i = 0; i < IN; i++) CLOSE(w1->tensor.grad[j * IN + i], dW1[j][i]);
    }
    for (int c = 0; c < CLASSES; c++) {
        CLOSE(b2->tensor.grad[c], dB2[c]);
        for (int j = 0; j < HIDDEN; j++) CLOSE(w2->tensor.grad[c * HIDDEN + j], dW2[c][j]);
    }
    for (int n = 0; n < N; n++)
        for (int i = 0; i < IN; i++) CLOSE(x_grad[n * IN + i], dX[n][i]);
    /* The ignored row still reaches x only through nothing: zero gradient. */
    for (int i = 0; i < IN; i++) ck_assert_float_eq(x_grad[3 * IN + i], 0.0f);
#undef CLOSE
    ag_ctx_free(&ctx);
    ag_params_free(&params);
}
END_TEST

/* Input-only gradients (what an adversarial attack needs): parameters
 * frozen, the input gets its gradient and the parameter grads stay zero. */
START_TEST(test_gradient_with_respect_to_input_only) {
    ag_params params;
    ag_params_init(&params);
    ag_param *w;
    ck_assert_int_eq(ag_params_declare(&params, "w", AG_GROUP_DENSE, 2, (int[]){CLASSES, IN},
                                       (ag_init){AG_INIT_NORMAL, 0.0f, 1.0f}, &w),
                     CM_OK);
    ck_assert_int_eq(ag_params_finalize(&params, 5), CM_OK);
    ag_param_set_frozen(w, true);
    float x_data[N * IN], x_grad[N * IN] = {0};
    cm_rng_fill_uniform((cm_rng_key){4, 0, 0, CM_RNG_TEST}, 0, N * IN, -1.0f, 1.0f, x_data);
    ag_tensor x = ag_tensor_wrap(x_data, x_grad, 2, (int[]){N, IN}, true);
    const int32_t labels[N] = {0, 1, 2, 3, 0, 1};
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, 1 << 20), CM_OK);
    ag_tensor *loss = ag_cross_entropy(&ctx, ag_linear(&ctx, &x, &w->tensor, NULL), labels, -1);
    ck_assert_int_eq(ag_backward(&ctx, loss), CM_OK);
    double input_norm = 0;
    for (int i = 0; i < N * IN; i++) input_norm += fabs(x_grad[i]);
    ck_assert_double_gt(input_norm, 1e-3);
    for (int i = 0; i < CLASSES * IN; i++) ck_assert_float_eq(w->tensor.grad[i], 0.0f);
    ag_ctx_free(&ctx);
    ag_params_free(&params);
}
END_TEST

int main(void) {
    Suite *suite = suite_create("composed");
    TCase *tc = tcase_create("composed");
    tcase_add_test(tc, test_mlp_cross_entropy_matches_hand_derivation);
    tcase_add_test(tc, test_gradient_with_respect_to_input_only);
    suite_add_tcase(suite, tc);
    SRunner *runner = srunner_create(suite);
    srunner_run_all(runner, CK_NORMAL);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
