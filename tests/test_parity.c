/* Parity with PyTorch: a tiny dense byte LM with the same weights (read by
 * tests/parity/lm_parity.py from a cmoe checkpoint with h5py) must give the
 * same loss, the same gradient for every parameter, and the same parameters
 * after 3 AdamW steps, to 1e-4 relative. The reference runs in float64, so
 * the differences measured are cmoe's own float32 error. */
#include <check.h>
#include <hdf5.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "layers/transformer.h"
#include "optim/optim.h"
#include "parity_util.h"
#include "train/checkpoint.h"

#ifndef CMOE_SOURCE_DIR
#define CMOE_SOURCE_DIR "."
#endif

enum { BATCH = 3, SEQ = 8, LAYERS = 2, HEADS = 2, STEPS = 3 };

/* AdamW settings. eps is 1e-5 rather than 1e-8: some gradients are exactly
 * zero in exact arithmetic (the key bias: softmax ignores a per-row shift),
 * and Adam divides by sqrt(v) + eps, which turns float32 rounding noise of
 * ~1e-10 into updates of lr * noise / eps. With eps 1e-5 that stays far below
 * the tolerance; the other gradients are 1e-4 and larger, where eps does not
 * matter. */
static const double LR = 1e-2, BETA1 = 0.9, BETA2 = 0.95, EPS = 1e-5, WEIGHT_DECAY = 0.1;

START_TEST(test_dense_lm_matches_pytorch) {
    char dir[] = "/tmp/cmoe-parity-XXXXXX";
    ck_assert_ptr_nonnull(mkdtemp(dir));
    lm_config config = {.vocab = 256,
                        .d_model = 16,
                        .n_layer = LAYERS,
                        .n_head = HEADS,
                        .d_ff = 24,
                        .max_seq = SEQ,
                        .dropout = 0.0f,
                        .init_std = 0.1f,
                        .scale_residual_init = true,
                        .layernorm_eps = 1e-5f};
    ag_params params;
    ag_params_init(&params);
    lm_model model;
    ck_assert_int_eq(lm_declare(&model, &config, &params), CM_OK);
    ck_assert_int_eq(ag_params_finalize(&params, 3), CM_OK);
    optim_apply_decay_policy(&params, false, false, false);
    /* Non-trivial LayerNorm parameters, so their gradients are tested too. */
    for (int i = 0; i < params.count; i++) {
        ag_param *p = params.items[i];
        if (strstr(p->name, "ln") && p->tensor.ndim == 1)
            for (int64_t j = 0; j < p->tensor.numel; j++)
                p->tensor.data[j] +=
                    0.1f * cm_rng_normal((cm_rng_key){9, 0, (uint32_t)i, CM_RNG_TEST}, (uint64_t)j);
    }

    /* The batch: BATCH windows of SEQ+1 random bytes. */
    int32_t window[BATCH * (SEQ + 1)], inputs[BATCH * SEQ], targets[BATCH * SEQ];
    for (int i = 0; i < BATCH * (SEQ + 1); i++)
        window[i] = (int32_t)cm_rng_below((cm_rng_key){4, 0, 0, CM_RNG_TEST}, (uint64_t)i, 256);
    for (int b = 0; b < BATCH; b++)
        for (int t = 0; t < SEQ; t++) {
            inputs[b * SEQ + t] = window[b * (SEQ + 1) + t];
            targets[b * SEQ + t] = window[b * (SEQ + 1) + t + 1];
        }
    char ckpt_path[128], batch_path[128], out_path[128], command[1024];
    snprintf(ckpt_path, sizeof ckpt_path, "%s/init.h5", dir);
    snprintf(batch_path, sizeof batch_path, "%s/batch.bin", dir);
    snprintf(out_path, sizeof out_path, "%s/reference.h5", dir);
    ckpt_meta meta = {0, 3, 0};
    ck_assert_int_eq(ckpt_save(ckpt_path, &params, &meta, NULL), CM_OK);
    FILE *batch_file = fopen(batch_path, "wb");
    ck_assert_int_eq(fwrite(window, sizeof window, 1, batch_file), 1);
    fclose(batch_file);
    snprintf(command, sizeof command,
             "/usr/bin/python3 %s/tests/parity/lm_parity.py %s %s %s --batch-size %d --seq %d "
             "--layers %d --heads %d --lr %g --beta1 %g --beta2 %g --eps %g --weight-decay %g "
             "--steps %d",
             CMOE_SOURCE_DIR, ckpt_path, batch_path, out_path, BATCH, SEQ, LAYERS, HEADS, LR, BETA1,
             BETA2, EPS, WEIGHT_DECAY, STEPS);
    ck_assert_msg(system(command) == 0,
                  "the PyTorch reference failed: %s (needs python3-torch and python3-h5py; run "
                  "scripts/install-deps.sh)",
                  command);

    /* cmoe: the same three steps. */
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, 16 << 20), CM_OK);
    optim_adamw_config adamw = {BETA1, BETA2, EPS, WEIGHT_DECAY};
    optim_state state = {0};
    double losses[STEPS];
    float *first_grads = malloc(params.buffers[AG_GROUP_DENSE].numel * sizeof(float));
    for (int step = 0; step < STEPS; step++) {
        ag_ctx_reset(&ctx);
        ag_params_zero_grad(&params);
        lm_forward_args args = {.ids = inputs, .batch = BATCH, .seq_len = SEQ};
        ag_tensor *loss = lm_loss(&ctx, lm_forward(&ctx, &model, &args), targets);
        ck_assert_int_eq(ag_backward(&ctx, loss), CM_OK);
        losses[step] = loss->data[0];
        if (step == 0)
            memcpy(first_grads, params.buffers[AG_GROUP_DENSE].grad,
                   params.buffers[AG_GROUP_DENSE].numel * sizeof(float));
        optim_adamw_step(&params, &adamw, LR, &state);
    }

    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    hid_t file = H5Fopen(out_path, H5F_ACC_RDONLY, H5P_DEFAULT);
    ck_assert_int_ge(file, 0);
    double *want_losses = parity_read_doubles(file, "losses", STEPS);
    for (int step = 0; step < STEPS; step++) {
        double error = fabs(losses[step] - want_losses[step]) / fabs(want_losses[step]);
        printf("parity: step %d loss cmoe %.8f torch %.8f (relative %.2e)\n", step, losses[step],
               want_losses[step], error);
        ck_assert_msg(error < 1e-4, "loss at step %d differs by %.3e", step, error);
    }
    ck_assert_double_gt(fabs(want_losses[0] - want_losses[STEPS - 1]), 1e-3); /* it trained */
    free(want_losses);
    double worst_grad = 0.0, worst_param = 0.0;
    for (int i = 0; i < params.count; i++) {
        ag_param *p = params.items[i];
        char name[160];
        snprintf(name, sizeof name, "grads/%s", p->name);
        double *want = parity_read_doubles(file, name, p->tensor.numel);
        double error = parity_relative_error(first_grads + p->offset, want, p->tensor.numel);
        worst_grad = fmax(worst_grad, error);
        ck_assert_msg(error < 1e-4, "gradient of %s differs by %.3e (relative to its max)", p->name,
                      error);
        free(want);
        snprintf(name, sizeof name, "params_after/%s", p->name);
        want = parity_read_doubles(file, name, p->tensor.numel);
        error = parity_relative_error(p->tensor.data, want, p->tensor.numel);
        worst_param = fmax(worst_param, error);
        ck_assert_msg(error < 1e-4, "%s after %d AdamW steps differs by %.3e", p->name, STEPS,
                      error);
        free(want);
    }
    printf("parity: %d parameters, worst gradient error %.2e, worst parameter error after %d "
           "steps %.2e\n",
           params.count, worst_grad, STEPS, worst_param);
    H5Fclose(file);
    free(first_grads);
    ag_ctx_free(&ctx);
    ag_params_free(&params);
    snprintf(command, sizeof command, "rm -rf '%s'", dir);
    ck_assert_int_eq(system(command), 0);
}
END_TEST

int main(void) {
    Suite *suite = suite_create("parity");
    TCase *tc = tcase_create("pytorch");
    tcase_add_test(tc, test_dense_lm_matches_pytorch);
    tcase_set_timeout(tc, 300);
    suite_add_tcase(suite, tc);
    SRunner *runner = srunner_create(suite);
    srunner_run_all(runner, CK_NORMAL);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
