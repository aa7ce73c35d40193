/* Auxiliary-loss-free balancing (METHODS.md 12.4): a zero bias is top-k bit
 * for bit; a common shift changes nothing; the choice is the top-k of
 * p + b while the gates are the unbiased ones (bitwise, with their
 * gradients, when the choice is unchanged); the bias has no gradient and
 * the optimizer leaves it alone; the update rule against a hand
 * computation (sign, balanced loads, several layers); the Switch loss
 * counts the unbiased choice; a checkpoint restores the bias exactly; the
 * sign rule balances a toy with fixed skewed scores; gradient checks with
 * a bias that changes the choice. */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "optim/optim.h"
#include "router_testutil.h"
#include "train/checkpoint.h"

enum { T = 16, E = 5, D = 6 };

static router_config bias_config(router_gating gating) {
    router_config config = make_config(ROUTER_BIAS_BALANCE, E, 2);
    config.gating = gating;
    config.bias = true;
    config.init_std = 0.5f;
    config.aux_loss_coef = 0.05f;
    config.z_loss_coef = 0.01f;
    config.bias_update_rate = 0.001f;
    return config;
}

static float *expert_bias(fixture *f) {
    return ag_param_tensor(f->r.expert_bias)->data;
}

typedef struct routed {
    router_output out;
    float aux;
} routed;

/* Routes x in training, then backward of sum(gates * upstream) + aux. */
static routed route_backward(fixture *f, ag_tensor *x) {
    ag_params_zero_grad(&f->params);
    memset(x->grad, 0, (size_t)x->numel * sizeof(float));
    router_call call = {.training = true, .seed = 1, .step = 2};
    routed result = {.out = route(f, x, &call)};
    ag_tensor *gates = result.out.gates;
    ag_tensor *upstream = ag_empty(&f->ctx, "upstream", 1, (int[]){(int)gates->numel});
    ck_assert_ptr_nonnull(upstream);
    for (int s = 0; s < gates->numel; s++) upstream->data[s] = 0.5f + 0.25f * (float)(s % 5);
    ag_tensor *loss = ag_sum(&f->ctx, ag_mul(&f->ctx, gates, upstream));
    if (result.out.aux_loss) {
        result.aux = result.out.aux_loss->data[0];
        loss = ag_add(&f->ctx, loss, result.out.aux_loss);
    }
    ck_assert_int_eq(ag_backward(&f->ctx, loss), CM_OK);
    return result;
}

/* Two routings with bitwise equal choice, gates, aux loss and gradients. */
static void assert_same(const routed *a, const routed *b, fixture *fa, fixture *fb,
                        const ag_tensor *xa, const ag_tensor *xb) {
    ck_assert_int_eq(a->out.n_slots, b->out.n_slots);
    ck_assert(memcmp(a->out.offsets, b->out.offsets, (T + 1) * sizeof(int32_t)) == 0);
    ck_assert(memcmp(a->out.expert, b->out.expert, a->out.n_slots * sizeof(int32_t)) == 0);
    ck_assert(memcmp(a->out.gates->data, b->out.gates->data, a->out.n_slots * sizeof(float)) == 0);
    ck_assert(memcmp(&a->aux, &b->aux, sizeof(float)) == 0);
    ck_assert(memcmp(weight_of(fa)->grad, weight_of(fb)->grad, E * D * sizeof(float)) == 0);
    ck_assert(memcmp(ag_param_tensor(fa->r.bias)->grad, ag_param_tensor(fb->r.bias)->grad,
                     E * sizeof(float)) == 0);
    ck_assert(memcmp(xa->grad, xb->grad, T * D * sizeof(float)) == 0);
}

/* 12.4.1, 12.4.2, 12.4.3: zero bias = top-k; a common shift, or a bias too
 * small to change the choice, changes nothing. */
START_TEST(test_zero_and_shifted_bias_are_topk) {
    for (int g = 0; g < ROUTER_GATING_COUNT; g++) {
        router_config config = bias_config((router_gating)g);
        router_config plain = config;
        plain.kind = ROUTER_TOPK;
        fixture a, b;
        fixture_init(&a, &plain, D);
        fixture_init(&b, &config, D);
        ck_assert_ptr_null(a.r.expert_bias);
        ag_tensor *xa = gc_tensor_new(2, (int[]){T, D}, -1.5f, 1.5f, 8, true);
        ag_tensor *xb = gc_tensor_new(2, (int[]){T, D}, -1.5f, 1.5f, 8, true);
        routed ra = route_backward(&a, xa);
        ck_assert_float_ne(ra.aux, 0.0f);
        const float shifts[][E] = {{0, 0, 0, 0, 0},
                                   {0.3f, 0.3f, 0.3f, 0.3f, 0.3f},
                                   {-0.2f, -0.2f, -0.2f, -0.2f, -0.2f},
                                   {1e-6f, -1e-6f, 0, 2e-6f, -1e-6f}};
        for (size_t i = 0; i < sizeof shifts / sizeof shifts[0]; i++) {
            memcpy(expert_bias(&b), shifts[i], sizeof shifts[i]);
            routed rb = route_backward(&b, xb);
            assert_same(&ra, &rb, &a, &b, xa, xb);
            /* the bias got no gradient */
            ck_assert(!ag_param_tensor(b.r.expert_bias)->requires_grad);
            for (int e = 0; e < E; e++)
                ck_assert_float_eq(ag_param_tensor(b.r.expert_bias)->grad[e], 0.0f);
        }
        gc_tensor_free(xa);
        gc_tensor_free(xb);
        fixture_free(&a);
        fixture_free(&b);
    }
}
END_TEST

/* 12.4.3 and 12.2.7 with a bias that does change the choice: it is the
 * top-k of p + b, the gates are the unbiased p_i (softmax_topk) or
 * p_i / sum over the chosen p_j (topk_softmax), and the auxiliary losses
 * equal plain top-k's bitwise (the Switch loss counts the unbiased choice). */
START_TEST(test_bias_changes_choice_not_gates) {
    for (int g = 0; g < ROUTER_GATING_COUNT; g++) {
        router_config config = bias_config((router_gating)g);
        router_config plain = config;
        plain.kind = ROUTER_TOPK;
        fixture a, b;
        fixture_init(&a, &plain, D);
        fixture_init(&b, &config, D);
        const float bias[E] = {0.25f, -0.3f, 0.1f, 0.0f, -0.05f};
        memcpy(expert_bias(&b), bias, sizeof bias);
        ag_tensor *x = gc_tensor_new(2, (int[]){T, D}, -1.5f, 1.5f, 8, false);
        router_call call = eval_call();
        router_output plain_out = route(&a, x, &call);
        const float plain_aux = plain_out.aux_loss->data[0];
        int32_t plain_experts[2 * T];
        memcpy(plain_experts, plain_out.expert, sizeof plain_experts);
        router_output out = route(&b, x, &call);
        ck_assert_int_eq(out.n_slots, 2 * T);
        double logits[T * E];
        ref_logits(&b, x, logits);
        int changed = 0;
        for (int t = 0; t < T; t++) {
            float row[E];
            double p[E], biased[E];
            for (int e = 0; e < E; e++) row[e] = (float)logits[t * E + e];
            ref_softmax(row, E, p);
            for (int e = 0; e < E; e++) biased[e] = p[e] + bias[e];
            double chosen_mass = 0.0;
            for (int s = 2 * t; s < 2 * t + 2; s++) {
                ck_assert_int_lt(ref_rank(biased, E, out.expert[s]), 2);
                chosen_mass += p[out.expert[s]];
                changed += out.expert[s] != plain_experts[s];
            }
            for (int s = 2 * t; s < 2 * t + 2; s++) {
                double p_e = p[out.expert[s]];
                double want = g == ROUTER_TOPK_THEN_SOFTMAX ? p_e / chosen_mass : p_e;
                ck_assert_double_eq_tol(out.gates->data[s], want, 1e-6);
            }
        }
        ck_assert_int_gt(changed, 0); /* the bias did move some tokens */
        ck_assert(memcmp(&plain_aux, &out.aux_loss->data[0], sizeof(float)) == 0);
        gc_tensor_free(x);
        fixture_free(&a);
        fixture_free(&b);
    }
}
END_TEST

/* 12.4.4: no gradient, and AdamW with weight decay leaves the bias alone. */
START_TEST(test_bias_untouched_by_optimizer) {
    router_config config = bias_config(ROUTER_TOPK_THEN_SOFTMAX);
    fixture f;
    fixture_init(&f, &config, D);
    ck_assert(f.r.expert_bias->frozen);
    ck_assert_str_eq(f.r.expert_bias->name, "router.expert_bias");
    const float bias[E] = {0.002f, -0.001f, 0.0f, 0.003f, -0.004f};
    memcpy(expert_bias(&f), bias, sizeof bias);
    ag_tensor *x = gc_tensor_new(2, (int[]){T, D}, -1.5f, 1.5f, 8, true);
    route_backward(&f, x);
    float weight_before = weight_of(&f)->data[0];
    optim_config optimizer = {.kind = OPTIM_ADAMW, .adamw = {0.9, 0.999, 1e-8, 0.5}};
    optim_state state = {0};
    optim_step(&f.params, &optimizer, 0.1, &state);
    ck_assert_float_ne(weight_of(&f)->data[0], weight_before);
    ck_assert(memcmp(expert_bias(&f), bias, sizeof bias) == 0);
    gc_tensor_free(x);
    fixture_free(&f);
}
END_TEST

/* 12.4.4, 12.4.5: b_i += u sign(mean - c_i) per layer, exactly; balanced
 * loads and methods without the update are left alone. */
START_TEST(test_update_rule) {
    ag_params params;
    ag_params_init(&params);
    router layers[3];
    router_config config = bias_config(ROUTER_TOPK_THEN_SOFTMAX);
    config.bias_update_rate = 0.01f;
    ck_assert_int_eq(router_declare(&layers[0], &config, 0, D, &params, "l0.router"), CM_OK);
    ck_assert_int_eq(router_declare(&layers[1], &config, 1, D, &params, "l1.router"), CM_OK);
    router_config plain = config;
    plain.kind = ROUTER_TOPK;
    ck_assert_int_eq(router_declare(&layers[2], &plain, 2, D, &params, "l2.router"), CM_OK);
    ck_assert_int_eq(ag_params_finalize(&params, 3), CM_OK);
    ck_assert(router_updates_per_step(&config) && !router_updates_per_step(&plain));
    const router *routers[3] = {&layers[0], &layers[1], &layers[2]};
    const float u = 0.01f;
    /* layer 0: mean 5 -> -u, +u, 0, +u, 0; layer 1 balanced; layer 2 top-k */
    const int64_t loads[3 * E] = {10, 2, 5, 3, 5, 4, 4, 4, 4, 4, 9, 0, 0, 0, 0};
    int64_t work[3 * E];
    const float want_once[E] = {-u, u, 0, u, 0};
    const float want_twice[E] = {-u - u, u + u, 0, u + u, 0};
    for (int round = 0; round < 2; round++) {
        memcpy(work, loads, sizeof loads);
        ck_assert_int_eq(router_update_expert_biases(routers, 3, work, MPI_COMM_NULL), CM_OK);
        ck_assert(memcmp(work, loads, sizeof loads) == 0); /* alone: nothing summed */
        const float *b0 = ag_param_tensor(layers[0].expert_bias)->data;
        const float *b1 = ag_param_tensor(layers[1].expert_bias)->data;
        ck_assert(memcmp(b0, round == 0 ? want_once : want_twice, sizeof want_once) == 0);
        for (int e = 0; e < E; e++) ck_assert_float_eq(b1[e], 0.0f);
    }
    ag_params_free(&params);
}
END_TEST

/* 12.4.7: a checkpoint holds the bias and restores it exactly. */
START_TEST(test_checkpoint_restores_bias) {
    router_config config = bias_config(ROUTER_SOFTMAX_THEN_TOPK);
    fixture saved, loaded;
    fixture_init(&saved, &config, D);
    fixture_init(&loaded, &config, D);
    const float bias[E] = {0.003f, -0.0071f, 1e-7f, -0.25f, 0.0f};
    memcpy(expert_bias(&saved), bias, sizeof bias);
    char path[128];
    snprintf(path, sizeof path, "/tmp/cmoe-test-bias-%d.h5", (int)getpid());
    ckpt_meta meta = {5, 11, 5}, read_meta;
    ck_assert_int_eq(ckpt_save(path, &saved.params, &meta, "recipe"), CM_OK);
    ck_assert_int_eq(ckpt_load(path, &loaded.params, &read_meta, true), CM_OK);
    ck_assert(memcmp(expert_bias(&loaded), bias, sizeof bias) == 0);
    ck_assert(loaded.r.expert_bias->frozen);
    remove(path);
    fixture_free(&saved);
    fixture_free(&loaded);
}
END_TEST

/* 12.4.8: fixed scores with expert 0 favoured and noise per token and
 * expert; the sign rule brings MaxVio (max / mean load - 1) below 0.2 and
 * keeps it there; the gates stay the unbiased probabilities. */
START_TEST(test_toy_convergence) {
    enum { TOKENS = 256, EXPERTS = 4 };
    router_config config = make_config(ROUTER_BIAS_BALANCE, EXPERTS, 1);
    config.bias_update_rate = 0.01f;
    fixture f;
    fixture_init(&f, &config, TOKENS);
    static float logits[TOKENS * EXPERTS];
    cm_rng_fill_uniform((cm_rng_key){4, 0, 0, CM_RNG_TEST}, 0, TOKENS * EXPERTS, -1.0f, 1.0f,
                        logits);
    for (int t = 0; t < TOKENS; t++) logits[t * EXPERTS] += 1.0f;
    ag_tensor *x = set_logits(&f, TOKENS, logits, false);
    const router *routers[1] = {&f.r};
    router_call call = eval_call();
    double first = 0.0, worst_late = 0.0;
    for (int step = 0; step < 300; step++) {
        router_output out = route(&f, x, &call);
        int64_t load[EXPERTS], max_load = 0;
        for (int e = 0; e < EXPERTS; e++) {
            load[e] = out.stats.tokens_per_expert[e];
            max_load = load[e] > max_load ? load[e] : max_load;
        }
        double max_violation = (double)max_load / (TOKENS / (double)EXPERTS) - 1.0;
        if (step == 0) first = max_violation;
        if (step >= 200) worst_late = fmax(worst_late, max_violation);
        for (int t = 0; t < TOKENS; t += 37) { /* gates: unbiased probabilities */
            double p[EXPERTS];
            ref_softmax(logits + t * EXPERTS, EXPERTS, p);
            ck_assert_double_eq_tol(out.gates->data[t], p[out.expert[t]], 1e-6);
        }
        ck_assert_int_eq(router_update_expert_biases(routers, 1, load, 0), CM_OK);
    }
    ck_assert_double_gt(first, 0.8);
    ck_assert_double_lt(worst_late, 0.2);
    ck_assert_float_lt(expert_bias(&f)[0], -0.1f); /* the favoured expert was pushed down */
    gc_tensor_free(x);
    fixture_free(&f);
}
END_TEST

/* Gradients of the gates and losses with a bias that changes the choice
 * (held away from its boundaries by margin_inputs' logit levels). */
START_TEST(test_gradcheck) {
    for (int g = 0; g < ROUTER_GATING_COUNT; g++) {
        router_config config = bias_config((router_gating)g);
        fixture f;
        fixture_init(&f, &config, E + 2);
        const float scales[2] = {1.0f, 1.5f};
        ag_tensor *x = margin_inputs(&f, 6, five_levels, scales, 2, 50 + (uint64_t)g);
        const float bias[E] = {0.06f, -0.05f, 0.02f, 0.0f, -0.03f};
        memcpy(expert_bias(&f), bias, sizeof bias);
        run_gradcheck(g ? "bias topk_softmax gates" : "bias softmax_topk gates", &f, x, false);
        run_gradcheck(g ? "bias topk_softmax losses" : "bias softmax_topk losses", &f, x, true);
        gc_tensor_free(x);
        fixture_free(&f);
    }
}
END_TEST

START_TEST(test_validation) {
    router_config config = bias_config(ROUTER_SOFTMAX_THEN_TOPK);
    config.bias_update_rate = -0.5f;
    ag_params params;
    ag_params_init(&params);
    router r;
    ck_assert_int_eq(router_declare(&r, &config, 0, D, &params, "router"), CM_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(cm_error_message(), "router.bias_update_rate = -0.5"));
    ag_params_free(&params);
}
END_TEST

int main(void) {
    Suite *suite = suite_create("routers_bias");
    TCase *tc = tcase_create("bias_balance");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_zero_and_shifted_bias_are_topk);
    tcase_add_test(tc, test_bias_changes_choice_not_gates);
    tcase_add_test(tc, test_bias_untouched_by_optimizer);
    tcase_add_test(tc, test_update_rule);
    tcase_add_test(tc, test_checkpoint_restores_bias);
    tcase_add_test(tc, test_toy_convergence);
    tcase_add_test(tc, test_gradcheck);
    tcase_add_test(tc, test_validation);
    suite_add_tcase(suite, tc);
    SRunner *runner = srunner_create(suite);
    srunner_run_all(runner, CK_NORMAL);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
