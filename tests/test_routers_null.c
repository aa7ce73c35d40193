/* AdaMoE's null experts (METHODS.md 6.1): with m = 0 the router is top-k
 * bit for bit (selection, gates, losses, gradients); a hand-built case with
 * its selection, gates (both conventions), true experts per token and the
 * Switch loss with the null experts' counts pooled; the MoE layer skips the
 * null experts (no slot, zero output, untouched experts unused); gradient
 * checks of the gates and losses with the null experts' weights; the
 * configuration checks. */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "layers/moe.h"
#include "router_testutil.h"

/* ---- m = 0 is top-k ------------------------------------------------------------- */

typedef struct routed {
    router_output out;
    float aux;
} routed;

/* Routes x in training and runs backward from sum(gates * upstream) + aux,
 * the gradients starting at zero. */
static routed route_backward(fixture *f, ag_tensor *x) {
    ag_params_zero_grad(&f->params);
    memset(x->grad, 0, (size_t)x->numel * sizeof(float));
    router_call call = {.training = true, .seed = 1, .step = 2};
    routed result = {.out = route(f, x, &call), .aux = 0.0f};
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

static void assert_same_bits(const void *a, const void *b, size_t bytes, const char *what) {
    ck_assert_msg(memcmp(a, b, bytes) == 0, "%s differs", what);
}

static void check_zero_nulls_are_topk(router_gating gating, float capacity_factor) {
    const int tokens = 12, experts = 5, d = 6, k = 2;
    router_config topk = make_config(ROUTER_TOPK, experts, k);
    topk.gating = gating;
    topk.bias = true;
    topk.init_std = 0.5f;
    topk.aux_loss_coef = 0.05f;
    topk.z_loss_coef = 0.01f;
    topk.capacity_factor = capacity_factor;
    router_config nulls = topk;
    nulls.kind = ROUTER_NULL_EXPERTS;
    nulls.null_experts = 0;
    fixture a, b;
    fixture_init(&a, &topk, d);
    fixture_init(&b, &nulls, d);
    ck_assert_ptr_null(b.r.null_weight);
    assert_same_bits(weight_of(&a)->data, weight_of(&b)->data, experts * d * sizeof(float), "W");
    ag_tensor *xa = gc_tensor_new(2, (int[]){tokens, d}, -1.5f, 1.5f, 21, true);
    ag_tensor *xb = gc_tensor_new(2, (int[]){tokens, d}, -1.5f, 1.5f, 21, true);
    routed ra = route_backward(&a, xa), rb = route_backward(&b, xb);
    ck_assert_int_eq(ra.out.n_slots, rb.out.n_slots);
    ck_assert_int_eq(ra.out.stats.dropped, rb.out.stats.dropped);
    if (capacity_factor > 0) ck_assert_int_gt(ra.out.stats.dropped, 0); /* the limit bites */
    assert_same_bits(ra.out.offsets, rb.out.offsets, (tokens + 1) * sizeof(int32_t), "offsets");
    assert_same_bits(ra.out.expert, rb.out.expert, ra.out.n_slots * sizeof(int32_t), "experts");
    assert_same_bits(ra.out.gates->data, rb.out.gates->data, ra.out.n_slots * sizeof(float),
                     "gates");
    assert_same_bits(&ra.aux, &rb.aux, sizeof(float), "aux loss");
    ck_assert_float_ne(ra.aux, 0.0f);
    assert_same_bits(weight_of(&a)->grad, weight_of(&b)->grad, experts * d * sizeof(float), "dW");
    assert_same_bits(ag_param_tensor(a.r.bias)->grad, ag_param_tensor(b.r.bias)->grad,
                     experts * sizeof(float), "db");
    assert_same_bits(xa->grad, xb->grad, tokens * d * sizeof(float), "dx");
    gc_tensor_free(xa);
    gc_tensor_free(xb);
    fixture_free(&a);
    fixture_free(&b);
}

START_TEST(test_zero_nulls_are_topk) {
    check_zero_nulls_are_topk(ROUTER_SOFTMAX_THEN_TOPK, 0.0f);
    check_zero_nulls_are_topk(ROUTER_TOPK_THEN_SOFTMAX, 0.0f);
    check_zero_nulls_are_topk(ROUTER_TOPK_THEN_SOFTMAX, 1.0f);
}
END_TEST

/* ---- a hand-built case -------------------------------------------------------- */

enum { HAND_T = 4, HAND_E = 3, HAND_M = 2, HAND_C = HAND_E + HAND_M };

/* Columns 0-2 true experts, 3-4 null experts; top-2 of each row:
 * t0 {0, 1}, t1 {0, null 3}, t2 {null 3, null 4}, t3 {2, null 3}. */
static const float hand_logits[HAND_T * HAND_C] = {
    3, 2, 0, -1, -2, 3, 0, -1, 2, -2, -1, 0, -2, 3, 2, 0, 2, 3, 2.5f, -1,
};

/* A null-experts fixture whose logits are hand_logits exactly (x = I). */
static ag_tensor *hand_fixture(fixture *f, router_gating gating, float aux_coef) {
    router_config config = make_config(ROUTER_NULL_EXPERTS, HAND_E, 2);
    config.null_experts = HAND_M;
    config.gating = gating;
    config.aux_loss_coef = aux_coef;
    fixture_init(f, &config, HAND_T);
    ck_assert_ptr_nonnull(f->r.null_weight);
    ck_assert_int_eq(f->r.null_weight->tensor.shape[0], HAND_M);
    ck_assert_int_eq(f->r.null_weight->tensor.shape[1], HAND_T);
    float real[HAND_T * HAND_E];
    for (int t = 0; t < HAND_T; t++)
        for (int e = 0; e < HAND_E; e++) real[t * HAND_E + e] = hand_logits[t * HAND_C + e];
    ag_tensor *x = set_logits(f, HAND_T, real, false);
    float *null_w = f->r.null_weight->tensor.data;
    for (int j = 0; j < HAND_M; j++)
        for (int t = 0; t < HAND_T; t++)
            null_w[j * HAND_T + t] = hand_logits[t * HAND_C + HAND_E + j];
    return x;
}

/* Switch loss coef C sum_i f_i P_i with f = counts / (k T). */
static double hand_switch_loss(const double *counts, double coef) {
    double loss = 0.0;
    for (int i = 0; i < HAND_C; i++) {
        double mean_prob = 0.0, p[HAND_C];
        for (int t = 0; t < HAND_T; t++) {
            ref_softmax(hand_logits + t * HAND_C, HAND_C, p);
            mean_prob += p[i] / HAND_T;
        }
        loss += counts[i] / (2.0 * HAND_T) * mean_prob;
    }
    return coef * HAND_C * loss;
}

START_TEST(test_hand_built) {
    for (int g = 0; g < ROUTER_GATING_COUNT; g++) {
        fixture f;
        ag_tensor *x = hand_fixture(&f, (router_gating)g, 0.1f);
        router_call call = eval_call();
        router_output out = route(&f, x, &call);
        /* Only true experts become slots: 4 of the 8 choices, 1 per token. */
        assert_token_experts(&out, 0, 2, (int[]){0, 1});
        assert_token_experts(&out, 1, 1, (int[]){0});
        assert_token_experts(&out, 2, 0, NULL);
        assert_token_experts(&out, 3, 1, (int[]){2});
        ck_assert_int_eq(out.stats.k, 2);
        ck_assert_int_eq(out.stats.slots, 4);
        ck_assert_int_eq(out.stats.tokens, 4);
        ck_assert_double_eq((double)out.stats.slots / (double)out.stats.tokens, 1.0);
        const int32_t want_load[HAND_E] = {2, 1, 1};
        for (int e = 0; e < HAND_E; e++)
            ck_assert_int_eq(out.stats.tokens_per_expert[e], want_load[e]);
        /* Gates: AdaMoE renormalises over the chosen true experts. */
        double p[HAND_C];
        const int slot_token[4] = {0, 0, 1, 3};
        for (int s = 0; s < 4; s++) {
            int t = slot_token[s], e = out.expert[s];
            ref_softmax(hand_logits + t * HAND_C, HAND_C, p);
            double mass = 0.0; /* of the token's chosen true experts */
            for (int j = out.offsets[t]; j < out.offsets[t + 1]; j++) mass += p[out.expert[j]];
            double want = g == ROUTER_TOPK_THEN_SOFTMAX ? p[e] / mass : p[e];
            ck_assert_double_eq_tol(out.gates->data[s], want, 1e-6);
        }
        if (g == ROUTER_TOPK_THEN_SOFTMAX) ck_assert_float_eq(out.gates->data[2], 1.0f);
        /* Null choices: column 3 three times, column 4 once; pooled to 2, 2. */
        const double pooled[HAND_C] = {2, 1, 1, 2, 2}, raw[HAND_C] = {2, 1, 1, 3, 1};
        ck_assert_ptr_nonnull(out.aux_loss);
        double want = hand_switch_loss(pooled, 0.1);
        ck_assert_double_eq_tol(out.aux_loss->data[0], want, 1e-6 * want);
        ck_assert_double_gt(fabs(hand_switch_loss(raw, 0.1) - want), 1e-3);
        gc_tensor_free(x);
        fixture_free(&f);
    }
}
END_TEST

/* ---- the MoE layer skips null experts ------------------------------------------ */

static double gelu_ref(double v) {
    return 0.5 * v * (1.0 + tanh(sqrt(2.0 / 3.14159265358979323846) * (v + 0.044715 * v * v * v)));
}

START_TEST(test_moe_skips_null_experts) {
    enum { T = 4, D = 4, H = 3, E = 4, M = 4 };
    router_config nulls = make_config(ROUTER_NULL_EXPERTS, E, 2);
    nulls.null_experts = M;
    nulls.gating = ROUTER_TOPK_THEN_SOFTMAX;
    moe_config config = {.d_model = D,
                         .hidden = H,
                         .activation = AG_ACT_GELU,
                         .init_std = 0.5f,
                         .out_std = 0.5f,
                         .router = nulls};
    ag_params params;
    ag_params_init(&params);
    moe_layer moe;
    ck_assert_int_eq(moe_declare(&moe, &config, 0, &params, "moe"), CM_OK);
    ck_assert_int_eq(ag_params_finalize(&params, 7), CM_OK);
    ck_assert_ptr_nonnull(ag_params_find(&params, "moe.router.null_weight"));
    /* x = I, so logits[t][c] = column t of the router weights: t0 takes
     * true 0 and 1, t1 two nulls, t2 true 2 and a null, t3 two nulls;
     * expert 3 gets nothing. */
    const float logits[T][E + M] = {{3, 2, 0, 0, 0, 0, 0, 0},
                                    {0, 0, 0, 0, 3, 2, 0, 0},
                                    {0, 0, 3, 0, 0, 0, 0, 2},
                                    {0, 0, 0, 1, 0, 0, 3, 2}};
    float *w = moe.router.weight->tensor.data, *null_w = moe.router.null_weight->tensor.data;
    for (int t = 0; t < T; t++) {
        for (int e = 0; e < E; e++) w[e * D + t] = logits[t][e];
        for (int j = 0; j < M; j++) null_w[j * D + t] = logits[t][E + j];
    }
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    ag_tensor *x = ag_empty(&ctx, "x", 2, (int[]){T, D});
    for (int i = 0; i < T * D; i++) x->data[i] = (i % (D + 1)) == 0 ? 1.0f : 0.0f;
    ag_params_zero_grad(&params);
    router_call call = {.training = true, .seed = 1, .step = 1};
    moe_result result;
    ck_assert_int_eq(moe_forward(&ctx, &moe, x, &call, &result), CM_OK);
    /* 3 slots of 8 choices: the experts ran on 3 rows. */
    ck_assert_int_eq(result.n_slots, 3);
    ck_assert_int_eq(result.stats.slots, 3);
    ck_assert_int_eq(moe.w1->slice_used[3], 0);
    for (int e = 0; e < 3; e++) ck_assert_int_eq(moe.w1->slice_used[e], 1);
    for (int i = 0; i < D; i++) {
        ck_assert_float_eq(result.out->data[1 * D + i], 0.0f);
        ck_assert_float_eq(result.out->data[3 * D + i], 0.0f);
    }
    /* Token 2's only true expert has gate 1: its output is expert 2's MLP. */
    const float *w1 = moe.w1->tensor.data + 2 * H * D, *b1 = moe.b1->tensor.data + 2 * H;
    const float *w2 = moe.w2->tensor.data + 2 * D * H, *b2 = moe.b2->tensor.data + 2 * D;
    double hidden[H];
    for (int h = 0; h < H; h++) hidden[h] = gelu_ref((double)w1[h * D + 2] + b1[h]);
    for (int i = 0; i < D; i++) {
        double want = b2[i];
        for (int h = 0; h < H; h++) want += (double)w2[i * H + h] * hidden[h];
        ck_assert_double_eq_tol(result.out->data[2 * D + i], want, 1e-5);
    }
    ag_ctx_free(&ctx);
    ag_params_free(&params);
}
END_TEST

/* ---- gradient checks ------------------------------------------------------------ */

/* x [T,C+2] = [L | u], W [E,C+2] = [I_E | v], null_weight [m,C+2] = [I_m | v]
 * shifted to columns E..C: logits L plus a small data-dependent part, with
 * L[t] a permutation of five_levels (C = 5), so the selection has margin. */
static ag_tensor *null_margin_inputs(fixture *f, int tokens, uint64_t seed) {
    const int experts = f->r.config.num_experts, choices = experts + f->r.config.null_experts;
    const int d = choices + 2;
    ag_tensor *x = gc_tensor_new(2, (int[]){tokens, d}, -1.0f, 1.0f, seed, true);
    float *w = weight_of(f)->data, *null_w = f->r.null_weight->tensor.data;
    cm_rng_fill_uniform((cm_rng_key){seed, 1, 0, CM_RNG_TEST}, 0, experts * d, -0.02f, 0.02f, w);
    cm_rng_fill_uniform((cm_rng_key){seed, 2, 0, CM_RNG_TEST}, 0, (choices - experts) * d, -0.02f,
                        0.02f, null_w);
    for (int c = 0; c < choices; c++) {
        float *row = c < experts ? w + c * d : null_w + (c - experts) * d;
        for (int i = 0; i < choices; i++) row[i] = i == c;
    }
    int32_t perm[MAX_E];
    for (int t = 0; t < tokens; t++) {
        cm_rng_permutation((cm_rng_key){seed, 3, (uint32_t)t, CM_RNG_TEST}, choices, perm);
        for (int c = 0; c < choices; c++)
            x->data[t * d + c] = (t % 2 ? 1.5f : 1.0f) * five_levels[perm[c]];
    }
    return x;
}

START_TEST(test_gradcheck) {
    for (int g = 0; g < ROUTER_GATING_COUNT; g++) {
        router_config config = make_config(ROUTER_NULL_EXPERTS, 3, 2);
        config.null_experts = 2;
        config.gating = (router_gating)g;
        config.bias = true;
        config.aux_loss_coef = 0.1f;
        config.z_loss_coef = 0.01f;
        fixture f;
        fixture_init(&f, &config, 7);
        ck_assert_ptr_nonnull(f.r.null_bias);
        ag_tensor *x = null_margin_inputs(&f, 6, 40 + (uint64_t)g);
        /* some tokens keep 2, 1 or 0 true experts */
        router_call call = eval_call();
        router_output out = route(&f, x, &call);
        ck_assert_int_lt(out.n_slots, 12);
        run_gradcheck(g ? "null topk_softmax gates" : "null softmax_topk gates", &f, x, false);
        run_gradcheck(g ? "null topk_softmax losses" : "null softmax_topk losses", &f, x, true);
        gc_tensor_free(x);
        fixture_free(&f);
    }
}
END_TEST

/* ---- configuration ----------------------------------------------------------------- */

START_TEST(test_validation) {
    router_config config = make_config(ROUTER_NULL_EXPERTS, 3, 5);
    config.null_experts = 2;
    fixture f; /* k = 5 = E + m is allowed */
    fixture_init(&f, &config, 4);
    ag_tensor *x = gc_tensor_new(2, (int[]){4, 4}, -1.0f, 1.0f, 3, false);
    router_call call = eval_call();
    ck_assert_int_eq(route(&f, x, &call).n_slots, 4 * 3); /* every true expert */
    call.k_override = 6;
    ag_ctx_reset(&f.ctx);
    router_output out;
    ck_assert_int_eq(router_route(&f.ctx, &f.r, x, &call, &out), CM_ERR_INVALID);
    gc_tensor_free(x);
    fixture_free(&f);

    const struct {
        int k, nulls;
        router_noise noise;
        const char *message;
    } cases[] = {
        {6, 2, ROUTER_NOISE_NONE,
         "router.k = 6 must be in [1, moe.num_experts + router.null_experts = 5]"},
        {2, -1, ROUTER_NOISE_NONE, "router.null_experts = -1 must be >= 0"},
        {2, 2, ROUTER_NOISE_FIXED, "null_experts routes without logit noise"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        config = make_config(ROUTER_NULL_EXPERTS, 3, cases[i].k);
        config.null_experts = cases[i].nulls;
        config.noise = cases[i].noise;
        ag_params params;
        ag_params_init(&params);
        router r;
        ck_assert_int_eq(router_declare(&r, &config, 0, 4, &params, "router"), CM_ERR_INVALID);
        ck_assert_msg(strstr(cm_error_message(), cases[i].message) != NULL,
                      "case %zu: got '%s', want '%s'", i, cm_error_message(), cases[i].message);
        ag_params_free(&params);
    }
    /* Other methods ignore router.null_experts. */
    config = make_config(ROUTER_TOPK, 3, 2);
    config.null_experts = 4;
    ck_assert_int_eq(router_choices(&config), 3);
    config.kind = ROUTER_NULL_EXPERTS;
    ck_assert_int_eq(router_choices(&config), 7);
}
END_TEST

int main(void) {
    Suite *suite = suite_create("routers_null");
    TCase *tc = tcase_create("null_experts");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_zero_nulls_are_topk);
    tcase_add_test(tc, test_hand_built);
    tcase_add_test(tc, test_moe_skips_null_experts);
    tcase_add_test(tc, test_gradcheck);
    tcase_add_test(tc, test_validation);
    suite_add_tcase(suite, tc);
    SRunner *runner = srunner_create(suite);
    srunner_run_all(runner, CK_NORMAL);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
