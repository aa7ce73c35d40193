/* Routers: the methods other than the learned top-k (test_routers.c), each
 * on the shared pipeline: SMoE-Dropout's frozen router and scheduled k,
 * THOR's pinned random draws in training and at inference, top-p's
 * selection, variable k and losses, expert choice's selection; gradient
 * checks of top-p's and expert choice's gates and losses with the selection
 * held away from its boundaries. */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "router_testutil.h"

/* ---- SMoE-Dropout --------------------------------------------------------------- */

START_TEST(test_smoe_dropout) {
    const int tokens = 5, experts = 6, d = 4;
    router_config config = make_config(ROUTER_SMOE_DROPOUT, experts, 2);
    config.gating = ROUTER_SOFTMAX_THEN_TOPK; /* ignored: SMoE-Dropout is topK-then-softmax */
    config.bias = true;
    config.aux_loss_coef = 0.01f; /* ignored: frozen router, no aux loss */
    config.z_loss_coef = 0.01f;
    config.k_schedule = (router_k_schedule){ROUTER_K_LINEAR_INCREASE, 1, 6, 100};
    fixture f;
    fixture_init(&f, &config, d);
    ck_assert(f.r.weight->frozen && !weight_of(&f)->requires_grad);
    ck_assert(f.r.bias->frozen && !ag_param_tensor(f.r.bias)->requires_grad);
    ag_tensor *x = gc_tensor_new(2, (int[]){tokens, d}, -1.0f, 1.0f, 6, true);
    const int64_t steps[] = {0, 10, 30, 50, 70, 90, 100, 250};
    int k_first = 0, k_last = 0;
    for (size_t i = 0; i < sizeof steps / sizeof steps[0]; i++) {
        router_call call = {.training = true, .seed = 1, .step = (uint64_t)steps[i]};
        router_output out = route(&f, x, &call);
        int k = router_k_at(&config.k_schedule, steps[i]);
        ck_assert_int_eq(out.stats.k, k);
        ck_assert_int_eq(out.n_slots, tokens * k);
        ck_assert_ptr_null(out.aux_loss);
        for (int t = 0; t < tokens; t++) {
            ck_assert_int_eq(out.offsets[t + 1] - out.offsets[t], k);
            double sum = 0.0;
            for (int s = out.offsets[t]; s < out.offsets[t + 1]; s++) sum += out.gates->data[s];
            ck_assert_double_eq_tol(sum, 1.0, 1e-6);
        }
        if (i == 0) k_first = k;
        k_last = k;
    }
    ck_assert_int_eq(k_first, 1);
    ck_assert_int_eq(k_last, 6);
    /* k_override wins over the schedule; evaluation uses config.k. */
    router_call call = {.training = true, .step = 0, .k_override = 3};
    ck_assert_int_eq(route(&f, x, &call).stats.k, 3);
    call = (router_call){.training = false, .step = 0};
    router_output out = route(&f, x, &call);
    ck_assert_int_eq(out.stats.k, 2);
    /* The gradient reaches x through the gates, never the frozen router. */
    ag_params_zero_grad(&f.params);
    memset(x->grad, 0, (size_t)x->numel * sizeof(float));
    float upstream[10] = {1, -2, 3, 0.5f, -1, 2, 0.25f, -3, 1.5f, 0.7f};
    ck_assert_int_eq(ag_backward_from(&f.ctx, out.gates, upstream), CM_OK);
    double x_grad = 0.0;
    for (int i = 0; i < tokens * d; i++) x_grad += fabs(x->grad[i]);
    ck_assert_double_gt(x_grad, 1e-6);
    for (int i = 0; i < experts * d; i++) ck_assert_float_eq(weight_of(&f)->grad[i], 0.0f);
    for (int e = 0; e < experts; e++) ck_assert_float_eq(ag_param_tensor(f.r.bias)->grad[e], 0.0f);
    gc_tensor_free(x);
    fixture_free(&f);
}
END_TEST

/* ---- THOR ---------------------------------------------------------------------- */

static int thor_single_expert(fixture *f, ag_tensor *x, const router_call *call) {
    router_output out = route(f, x, call);
    ck_assert_int_eq(out.n_slots, out.n_tokens);
    for (int t = 1; t < out.n_tokens; t++) ck_assert_int_eq(out.expert[t], out.expert[0]);
    return out.expert[0];
}

START_TEST(test_thor_training_draws) {
    const int experts = 4, steps = 2000;
    router_config config = make_config(ROUTER_THOR, experts, 1);
    fixture f, other_layer;
    fixture_init(&f, &config, 3);
    fixture_init(&other_layer, &config, 3);
    other_layer.r.layer = 4;
    ck_assert_ptr_null(f.r.weight);
    ag_tensor *x = gc_tensor_new(2, (int[]){5, 3}, -1.0f, 1.0f, 7, false);
    int differ_pass = 0, differ_layer = 0, histogram[4] = {0};
    for (int step = 0; step < steps; step++) {
        router_call call = {.training = true, .seed = 77, .step = (uint64_t)step, .pass = 0};
        int a = thor_single_expert(&f, x, &call);
        ck_assert_int_eq(thor_single_expert(&f, x, &call), a); /* same key, same draw */
        ck_assert_int_eq(
            a, (int)cm_rng_below((cm_rng_key){77, (uint64_t)step, 3, CM_RNG_ROUTER}, 0, experts));
        differ_layer += thor_single_expert(&other_layer, x, &call) != a;
        call.pass = 1;
        differ_pass += thor_single_expert(&f, x, &call) != a;
        histogram[a]++;
    }
    /* Independent uniform draws differ with probability 3/4; +-0.05 is more
     * than 5 standard deviations at 2000 steps. */
    ck_assert_double_eq_tol(differ_pass / (double)steps, 0.75, 0.05);
    ck_assert_double_eq_tol(differ_layer / (double)steps, 0.75, 0.05);
    for (int e = 0; e < experts; e++)
        ck_assert_double_eq_tol(histogram[e] / (double)steps, 0.25, 0.05);
    /* Gates are constant ones without gradient; no loss; no entropy. */
    router_call call = {.training = true, .seed = 77};
    router_output out = route(&f, x, &call);
    ck_assert(!out.gates->requires_grad);
    for (int s = 0; s < out.n_slots; s++) ck_assert_float_eq(out.gates->data[s], 1.0f);
    ck_assert_ptr_null(out.aux_loss);
    ck_assert(isnan(out.stats.entropy));
    ck_assert_int_eq(out.stats.k, 1);
    ck_assert_int_eq(out.stats.tokens_per_expert[out.expert[0]], 5);
    gc_tensor_free(x);
    fixture_free(&other_layer);
    fixture_free(&f);
}
END_TEST

START_TEST(test_thor_inference) {
    const int experts = 4, seq_len = 4;
    for (int level = 0; level <= 1; level++) {
        router_config config = make_config(ROUTER_THOR, experts, 1);
        config.thor_level = (router_thor_level)level;
        fixture f;
        fixture_init(&f, &config, 2);
        /* The whole batch (400 sequences) and a later part of it, as another
         * data-parallel rank would see it. */
        const int tokens = 1600, offset = 8, part = 24;
        ag_tensor *x = gc_tensor_new(2, (int[]){tokens, 2}, 0.0f, 1.0f, 2, false);
        ag_tensor *x_part = gc_tensor_new(2, (int[]){part, 2}, 0.0f, 1.0f, 2, false);
        router_call call = {.training = false, .seed = 3, .step = 12, .seq_len = seq_len};
        router_output whole = route(&f, x, &call);
        int32_t *experts_whole = malloc(tokens * sizeof(int32_t));
        memcpy(experts_whole, whole.expert, tokens * sizeof(int32_t));
        int histogram[4] = {0}, changes = 0;
        for (int t = 0; t < tokens; t++) {
            histogram[experts_whole[t]]++;
            if (t % seq_len) changes += experts_whole[t] != experts_whole[t - 1];
        }
        for (int e = 0; e < experts; e++)
            ck_assert_double_eq_tol(histogram[e] / (double)tokens, 0.25, 0.08);
        if (level == ROUTER_THOR_PER_SEQUENCE)
            ck_assert_int_eq(changes, 0); /* one expert per sequence */
        else /* per token: about 3/4 of the neighbours inside a sequence differ */
            ck_assert_double_eq_tol(changes / (double)(tokens - tokens / seq_len), 0.75, 0.06);
        call.first_token = offset;
        router_output piece = route(&f, x_part, &call);
        for (int t = 0; t < part; t++) ck_assert_int_eq(piece.expert[t], experts_whole[offset + t]);
        /* Independent of the training draws of the same key: token/sequence 0
         * agrees with pass 0 in about 1/4 of the steps, not always. */
        int agree = 0;
        for (int step = 0; step < 1000; step++) {
            router_call train = {.training = true, .seed = 3, .step = (uint64_t)step};
            router_call infer = {
                .training = false, .seed = 3, .step = (uint64_t)step, .seq_len = seq_len};
            int trained = route(&f, x_part, &train).expert[0];
            agree += route(&f, x_part, &infer).expert[0] == trained;
        }
        ck_assert_double_eq_tol(agree / 1000.0, 0.25, 0.07);
        free(experts_whole);
        gc_tensor_free(x);
        gc_tensor_free(x_part);
        fixture_free(&f);
    }
    /* Per-sequence inference needs the sequence length. */
    router_config config = make_config(ROUTER_THOR, experts, 1);
    fixture f;
    fixture_init(&f, &config, 2);
    ag_tensor *x = gc_tensor_new(2, (int[]){4, 2}, 0.0f, 1.0f, 2, false);
    router_output out;
    router_call call = {.training = false, .seq_len = 0};
    ck_assert_int_eq(router_route(&f.ctx, &f.r, x, &call, &out), CM_ERR_INVALID);
    gc_tensor_free(x);
    fixture_free(&f);
}
END_TEST

/* ---- top-p --------------------------------------------------------------------------- */

/* The reference rule: sort descending (ties: lower index), keep while the
 * mass is <= p plus the first that exceeds it. keep[e] = 1 if kept. */
static int ref_top_p(const double *p, int experts, double threshold, int *keep) {
    int order[MAX_E], n = 0;
    for (int e = 0; e < experts; e++) order[ref_rank(p, experts, e)] = e;
    double mass = 0.0;
    for (int e = 0; e < experts; e++) keep[e] = 0;
    while (n < experts) {
        keep[order[n]] = 1;
        mass += p[order[n++]];
        if (mass > threshold) break;
    }
    return n;
}

START_TEST(test_top_p_selection) {
    const int tokens = 4, experts = 4;
    /* Token 0 is flat: the masses are 0.25, 0.5 (= p, kept), 0.75. */
    const float logits[4 * 4] = {0, 0, 0, 0, 3, 0, 0, 0, 0, 1.0f, 1.2f, -1, 0.2f, 0.1f, 0.3f, 0.0f};
    const int expected_n[4] = {3, 1, 2, 2};
    const int expected[4][3] = {{0, 1, 2}, {0}, {1, 2}, {0, 2}};
    router_config config = make_config(ROUTER_TOP_P, experts, 1);
    config.top_p = 0.5f;
    fixture f;
    fixture_init(&f, &config, tokens);
    ag_tensor *x = set_logits(&f, tokens, logits, false);
    router_call call = eval_call();
    router_output out = route(&f, x, &call);
    for (int t = 0; t < tokens; t++) {
        assert_token_experts(&out, t, expected_n[t], expected[t]);
        double p[4];
        int keep[4];
        ref_softmax(logits + t * experts, experts, p);
        ck_assert_int_eq(ref_top_p(p, experts, 0.5, keep), expected_n[t]);
        double sum = 0.0;
        for (int s = out.offsets[t]; s < out.offsets[t + 1]; s++) { /* raw probabilities */
            ck_assert_double_eq_tol(out.gates->data[s], p[out.expert[s]], 1e-6);
            sum += out.gates->data[s];
        }
        ck_assert_double_gt(sum, 0.5);
    }
    ck_assert_int_eq(out.stats.k, 0);
    ck_assert_int_eq(out.n_slots, 8);
    gc_tensor_free(x);
    fixture_free(&f);
}
END_TEST

/* Top-p under a capacity: the balance loss counts the assignments before
 * the drop, f_i = routed_i / all routed (here (3, 2, 3, 0) / 8 from the
 * selection of test_top_p_selection), not the kept ones ((1, 1, 1, 0) / 3
 * with capacity ceil(8 / 4 * 0.5) = 1). */
START_TEST(test_top_p_balance_counts_before_drop) {
    const int tokens = 4, experts = 4;
    const float logits[4 * 4] = {0, 0, 0, 0, 3, 0, 0, 0, 0, 1.0f, 1.2f, -1, 0.2f, 0.1f, 0.3f, 0.0f};
    router_config config = make_config(ROUTER_TOP_P, experts, 1);
    config.top_p = 0.5f;
    config.capacity_factor = 0.5f;
    config.aux_loss_coef = 0.3f;
    fixture f;
    fixture_init(&f, &config, tokens);
    ag_tensor *x = set_logits(&f, tokens, logits, false);
    router_call call = eval_call();
    router_output out = route(&f, x, &call);
    const int routed[4] = {3, 2, 3, 0}, kept[4] = {1, 1, 1, 0};
    ck_assert_int_eq(out.stats.dropped, 5);
    double mean_p[4] = {0}, before_drop = 0.0, after_drop = 0.0;
    for (int t = 0; t < tokens; t++) {
        double p[4];
        ref_softmax(logits + t * experts, experts, p);
        for (int e = 0; e < experts; e++) mean_p[e] += p[e] / tokens;
    }
    for (int e = 0; e < experts; e++) {
        ck_assert_int_eq(out.stats.routed_per_expert[e], routed[e]);
        ck_assert_int_eq(out.stats.tokens_per_expert[e], kept[e]);
        before_drop += 0.3 * experts * routed[e] / 8.0 * mean_p[e];
        after_drop += 0.3 * experts * kept[e] / 3.0 * mean_p[e];
    }
    ck_assert_double_eq_tol(out.aux_loss->data[0], before_drop, 1e-6);
    ck_assert_double_gt(fabs(out.aux_loss->data[0] - after_drop), 1e-3);
    gc_tensor_free(x);
    fixture_free(&f);
}
END_TEST

START_TEST(test_top_p_mean_k_and_losses) {
    const int tokens = 301, experts = 8, d = 6;
    const float thresholds[3] = {0.9f, 0.5f, 0.2f};
    double previous_mean_k = experts + 1;
    for (int i = 0; i < 3; i++) {
        router_config config = make_config(ROUTER_TOP_P, experts, 1);
        config.top_p = thresholds[i];
        config.init_std = 0.6f;
        config.aux_loss_coef = 0.01f;
        config.entropy_coef = 0.001f;
        fixture f;
        fixture_init(&f, &config, d);
        ag_tensor *x = gc_tensor_new(2, (int[]){tokens, d}, -1.0f, 1.0f, 9, false);
        router_call call = eval_call();
        router_output out = route(&f, x, &call);
        double *logits = malloc(sizeof(double) * tokens * experts);
        ref_logits(&f, x, logits);
        int counts[MAX_E] = {0}, assignments = 0, compared = 0;
        double mean_p[MAX_E] = {0}, entropy = 0.0;
        for (int t = 0; t < tokens; t++) {
            float row[MAX_E];
            double p[MAX_E];
            int keep[MAX_E];
            for (int e = 0; e < experts; e++) row[e] = (float)logits[t * experts + e];
            ref_softmax(row, experts, p);
            int n = out.offsets[t + 1] - out.offsets[t];
            ck_assert_int_ge(n, 1);
            ck_assert_int_le(n, experts);
            for (int s = out.offsets[t]; s < out.offsets[t + 1]; s++) {
                ck_assert_double_eq_tol(out.gates->data[s], p[out.expert[s]], 1e-5);
                counts[out.expert[s]]++;
            }
            assignments += n;
            for (int e = 0; e < experts; e++) {
                mean_p[e] += p[e] / tokens;
                entropy -= p[e] * log(p[e]) / tokens;
            }
            /* The same set as the reference rule, unless a cumulative mass or
             * an order is within float rounding of flipping. */
            if (top_p_margin(logits + t * experts, 1, experts, thresholds[i]) < 1e-4) continue;
            compared++;
            ck_assert_int_eq(ref_top_p(p, experts, thresholds[i], keep), n);
            for (int s = out.offsets[t]; s < out.offsets[t + 1]; s++)
                ck_assert(keep[out.expert[s]]);
        }
        ck_assert_int_gt(compared, tokens * 9 / 10);
        double mean_k = (double)out.n_slots / tokens;
        ck_assert_double_lt(mean_k, previous_mean_k - 0.3);
        previous_mean_k = mean_k;
        /* Load balance with f normalised by the assignments, plus entropy. */
        double balance = 0.0;
        for (int e = 0; e < experts; e++)
            balance += 0.01 * experts * counts[e] / (double)assignments * mean_p[e];
        ck_assert_double_eq_tol(out.aux_loss->data[0], balance + 0.001 * entropy, 1e-6);
        ck_assert_double_eq_tol(out.stats.entropy, entropy, 1e-5);
        free(logits);
        gc_tensor_free(x);
        fixture_free(&f);
    }
    ck_assert_double_lt(previous_mean_k, 1.6); /* p = 0.2: mostly one expert */
}
END_TEST

START_TEST(test_top_p_gradcheck) {
    const int tokens = 7, experts = 5;
    router_config config = make_config(ROUTER_TOP_P, experts, 1);
    config.top_p = 0.55f;
    config.aux_loss_coef = 4.0f; /* large: the loss gradients must dominate atol */
    config.entropy_coef = 2.0f;
    fixture f;
    fixture_init(&f, &config, experts + 2);
    const float scales[3] = {0.6f, 0.2f, 1.7f}; /* k = 2, 3, 1 */
    ag_tensor *x = margin_inputs(&f, tokens, five_levels, scales, 3, 31);
    double logits[7 * 5];
    ref_logits(&f, x, logits);
    ck_assert_double_gt(top_p_margin(logits, tokens, experts, 0.55), 0.02);
    run_gradcheck("top_p gates", &f, x, false);
    run_gradcheck("top_p aux", &f, x, true);
    /* Variable k actually happens in this case. */
    router_call call = eval_call();
    router_output out = route(&f, x, &call);
    int min_k = experts, max_k = 0;
    for (int t = 0; t < tokens; t++) {
        int n = out.offsets[t + 1] - out.offsets[t];
        min_k = n < min_k ? n : min_k;
        max_k = n > max_k ? n : max_k;
    }
    ck_assert_int_lt(min_k, max_k);
    gc_tensor_free(x);
    fixture_free(&f);
}
END_TEST

/* ---- expert choice --------------------------------------------------------------------- */

START_TEST(test_expert_choice_selection) {
    const int tokens = 5, experts = 3;
    /* Tokens 1 and 3 are identical (ties go to token 1). */
    const float logits[5 * 3] = {2, 0, 0, 0, 1, 0, 1.5f, 1.4f, 0, 0, 1, 0, -1, -1, -1};
    router_config config = make_config(ROUTER_EXPERT_CHOICE, experts, 1);
    config.capacity_factor = 1.2f; /* c = ceil(5 * 1.2 / 3) = 2, although 1.2f > 1.2 */
    fixture f;
    fixture_init(&f, &config, tokens);
    ag_tensor *x = set_logits(&f, tokens, logits, false);
    router_call call = eval_call();
    router_output out = route(&f, x, &call);
    /* Columns of p: e0 = {.787, .212, .474, .212, .333} -> tokens 0, 2;
     * e1 = {.107, .576, .429, .576, .333} -> 1, 3 (tie, but both fit);
     * e2 = {.107, .212, .097, .212, .333} -> 4, then 1 (tie with 3). */
    const int expected_n[5] = {1, 2, 1, 1, 1};
    const int expected[5][2] = {{0}, {1, 2}, {0}, {1}, {2}};
    double p[5][3];
    for (int t = 0; t < tokens; t++) {
        ref_softmax(logits + t * experts, experts, p[t]);
        assert_token_experts(&out, t, expected_n[t], expected[t]);
        for (int s = out.offsets[t]; s < out.offsets[t + 1]; s++)
            ck_assert_double_eq_tol(out.gates->data[s], p[t][out.expert[s]], 1e-6);
    }
    for (int e = 0; e < experts; e++) {
        ck_assert_int_eq(out.stats.tokens_per_expert[e], 2);
        /* Reference: the chosen tokens are the column's top 2 by rank. */
        double column[5];
        for (int t = 0; t < tokens; t++) column[t] = p[t][e];
        for (int t = 0; t < tokens; t++) {
            bool chosen = false;
            for (int s = out.offsets[t]; s < out.offsets[t + 1]; s++) chosen |= out.expert[s] == e;
            ck_assert_int_eq(chosen, ref_rank(column, tokens, t) < 2);
        }
    }
    ck_assert_int_eq(out.stats.dropped, 0);
    ck_assert_ptr_null(out.aux_loss);
    /* A capacity beyond T is capped: every token gets every expert. */
    f.r.config.capacity_factor = 10.0f;
    out = route(&f, x, &call);
    ck_assert_int_eq(out.n_slots, tokens * experts);
    /* A token can get no expert at all. */
    f.r.config.capacity_factor = 0.5f; /* c = 1 */
    out = route(&f, x, &call);
    ck_assert_int_eq(out.n_slots, experts);
    ck_assert_int_eq(out.offsets[4] - out.offsets[3], 0);
    gc_tensor_free(x);
    fixture_free(&f);
}
END_TEST

START_TEST(test_expert_choice_gradcheck) {
    const int tokens = 7, experts = 5;
    router_config config = make_config(ROUTER_EXPERT_CHOICE, experts, 1);
    config.capacity_factor = 2.0f; /* c = ceil(7 * 2 / 5) = 3 */
    config.bias = true;
    fixture f;
    fixture_init(&f, &config, experts + 2);
    const float scales[3] = {1.0f, 0.6f, 1.7f};
    ag_tensor *x = margin_inputs(&f, tokens, five_levels, scales, 3, 41);
    /* Precondition: in every column the 3rd and 4th probabilities are apart. */
    double logits[7 * 5], p[7 * 5];
    ref_logits(&f, x, logits);
    for (int t = 0; t < tokens; t++) {
        float row[5];
        for (int e = 0; e < experts; e++) row[e] = (float)logits[t * experts + e];
        ref_softmax(row, experts, p + t * experts);
    }
    for (int e = 0; e < experts; e++) {
        double column[7], sorted[7];
        for (int t = 0; t < tokens; t++) column[t] = p[t * experts + e];
        for (int t = 0; t < tokens; t++) sorted[ref_rank(column, tokens, t)] = column[t];
        ck_assert_double_gt(sorted[2] - sorted[3], 0.01);
    }
    run_gradcheck("expert_choice gates", &f, x, false);
    gc_tensor_free(x);
    fixture_free(&f);
}
END_TEST

int main(void) {
    Suite *suite = suite_create("routers_methods");
    TCase *tc = tcase_create("methods");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_smoe_dropout);
    tcase_add_test(tc, test_thor_training_draws);
    tcase_add_test(tc, test_thor_inference);
    tcase_add_test(tc, test_top_p_selection);
    tcase_add_test(tc, test_top_p_balance_counts_before_drop);
    tcase_add_test(tc, test_top_p_mean_k_and_losses);
    tcase_add_test(tc, test_top_p_gradcheck);
    tcase_add_test(tc, test_expert_choice_selection);
    tcase_add_test(tc, test_expert_choice_gradcheck);
    suite_add_tcase(suite, tc);
    SRunner *runner = srunner_create(suite);
    srunner_run_all(runner, CK_NORMAL);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
