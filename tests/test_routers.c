/* Routers: the registry (a row per router_kind, named as recipes spell it,
 * whose properties are what declaring and routing do; the declaration
 * checks; a new method defined here through the same interface), then the
 * pipeline every method shares and the learned top-k router on it:
 * selection on hand-built logits (against direct double-precision
 * computations), gradient checks of the gates and the auxiliary losses with
 * the selection held away from its boundaries, no gradient through the
 * selection, capacity dropping under both policies, and the loss building
 * blocks. The other methods are in test_routers_methods.c, SMoE-Dropout's k
 * schedule in test_routers_k_schedule.c. */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "router_testutil.h"

/* ---- the registry ----------------------------------------------------------------- */

/* Every router_kind has its row, named as recipes spell it, and the row's
 * properties are what declaring and routing do. */
START_TEST(test_registry_rows) {
    const int tokens = 6, experts = 4, d = 5;
    for (int kind = 0; kind < ROUTER_KIND_COUNT; kind++) {
        const router_method *m = router_method_of((router_kind)kind);
        ck_assert_ptr_nonnull(m);
        ck_assert_int_eq(m->kind, kind);
        ck_assert_ptr_nonnull(router_kind_names[kind]);
        ck_assert_str_eq(m->name, router_kind_names[kind]);
        ck_assert_str_eq(router_kind_name((router_kind)kind), m->name);
        ck_assert_ptr_nonnull(m->route);
        ck_assert_int_ge(m->passes_per_step, 1);
        ck_assert(!m->k_scheduled || m->uses_k);
        ck_assert(!m->frozen_weights || m->has_weights);
        ck_assert(!m->pass_consistency || m->passes_per_step > 1);

        router_config config = make_config((router_kind)kind, experts, 2);
        config.capacity_factor = 2.0f;     /* expert choice needs one */
        config.bias = kind != ROUTER_RMOE; /* RMoE's projections have no bias */
        config.consistency_alpha = 0.75f;
        ck_assert_int_eq(router_passes_per_step(&config), m->passes_per_step);
        ck_assert_float_eq(router_pass_consistency(&config), m->pass_consistency ? 0.75f : 0.0f);
        fixture f;
        fixture_init(&f, &config, d);
        ck_assert_ptr_eq(f.r.method, m);
        /* RMoE declares its own weight [E,H_r] (read on its state) */
        ck_assert_int_eq(f.r.weight != NULL, m->has_weights || kind == ROUTER_RMOE);
        ck_assert_int_eq(f.r.bias != NULL, m->has_weights);
        if (m->has_weights) {
            ck_assert_int_eq(f.r.weight->frozen, m->frozen_weights);
            ck_assert_int_eq(f.r.bias->frozen, m->frozen_weights);
        }
        /* uses_k: config.k (here 2, or a k_override) is the experts per token. */
        ag_tensor *x = gc_tensor_new(2, (int[]){tokens, d}, -1.0f, 1.0f, 8, false);
        router_call call = eval_call();
        router_output out = route(&f, x, &call);
        if (m->uses_k) {
            ck_assert_int_eq(router_effective_k(&f.r, &call), 2);
            ck_assert_int_eq(out.n_slots, tokens * 2);
            call.k_override = 3;
            ck_assert_int_eq(route(&f, x, &call).n_slots, tokens * 3);
        }
        gc_tensor_free(x);
        fixture_free(&f);
    }
    ck_assert_ptr_null(router_kind_names[ROUTER_KIND_COUNT]);
    ck_assert_ptr_null(router_method_of(ROUTER_KIND_COUNT));
    ck_assert_ptr_null(router_method_of((router_kind)-1));
    ck_assert_str_eq(router_kind_name(ROUTER_KIND_COUNT), "?");
    /* THOR is the two-pass method, weighted by consistency_alpha. */
    router_config thor = make_config(ROUTER_THOR, experts, 1);
    thor.consistency_alpha = 0.5f;
    ck_assert_int_eq(router_passes_per_step(&thor), 2);
    ck_assert_float_eq(router_pass_consistency(&thor), 0.5f);
}
END_TEST

/* router_declare's checks: the common ones, then the method's own (its
 * row's validate), with the messages recipes and users see. */
START_TEST(test_declare_validation) {
    const struct {
        router_kind kind;
        int k;
        float top_p, capacity_factor;
        router_k_schedule schedule;
        const char *message;
    } cases[] = {
        {ROUTER_TOPK,
         5,
         0.5f,
         0.0f,
         {ROUTER_K_CONSTANT, 1, 1, 1},
         "router.k = 5 must be in [1, moe.num_experts = 4] (topk)"},
        {ROUTER_SMOE_DROPOUT,
         0,
         0.5f,
         0.0f,
         {ROUTER_K_CONSTANT, 1, 1, 1},
         "router.k = 0 must be in [1, moe.num_experts = 4] (smoe_dropout)"},
        {ROUTER_SMOE_DROPOUT,
         2,
         0.5f,
         0.0f,
         {ROUTER_K_LINEAR_INCREASE, 1, 5, 100},
         "router k schedule [1, 5] must satisfy 1 <= k_min <= k_max <= moe.num_experts = 4"},
        {ROUTER_SMOE_DROPOUT,
         2,
         0.5f,
         0.0f,
         {ROUTER_K_LINEAR_INCREASE, 1, 4, 0},
         "k schedule total_steps = 0 must be positive"},
        {ROUTER_TOP_P,
         9,
         1.5f,
         0.0f,
         {ROUTER_K_CONSTANT, 1, 1, 1},
         "router.top_p = 1.5 must be in (0, 1]"},
        {ROUTER_EXPERT_CHOICE,
         9,
         0.5f,
         0.0f,
         {ROUTER_K_CONSTANT, 1, 1, 1},
         "expert choice needs router.capacity_factor > 0"},
        {ROUTER_THOR,
         9,
         0.5f,
         -1.0f,
         {ROUTER_K_CONSTANT, 1, 1, 1},
         "router.capacity_factor = -1 must be >= 0"},
        {(router_kind)ROUTER_KIND_COUNT,
         1,
         0.5f,
         0.0f,
         {ROUTER_K_CONSTANT, 1, 1, 1},
         "unknown router kind 8"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        router_config config = make_config(cases[i].kind, 4, cases[i].k);
        config.top_p = cases[i].top_p;
        config.capacity_factor = cases[i].capacity_factor;
        config.k_schedule = cases[i].schedule;
        ag_params params;
        ag_params_init(&params);
        router r;
        ck_assert_int_eq(router_declare(&r, &config, 0, 3, &params, "router"), CM_ERR_INVALID);
        ck_assert_msg(strstr(cm_error_message(), cases[i].message) != NULL,
                      "case %zu: got '%s', want '%s'", i, cm_error_message(), cases[i].message);
        ag_params_free(&params);
    }
}
END_TEST

/* ---- a new method, defined here as it would be in its own file ---------------------- */

/* What a new method needs: a validate (optional) and a route function over
 * router_internal.h's pipeline (logits, candidate slots, router_finish), and
 * a row. This one sends each token to its highest-logit expert with that
 * expert's probability as the gate: Switch routing without its losses, so
 * it must agree with the registry's topk at k = 1, softmax-then-topK. */

static int example_route_calls;

static cm_status example_validate(const router_config *config) {
    if (config->k != 1)
        return CM_ERR(CM_ERR_INVALID, "example router: router.k = %d, must be 1", config->k);
    return CM_OK;
}

static cm_status example_route(ag_ctx *ctx, const router *r, ag_tensor *x, const router_call *call,
                               router_output *out) {
    example_route_calls++;
    int experts = r->config.num_experts;
    ag_tensor *logits = router_logits(ctx, r, x, call); /* [T,E] */
    ag_tensor *probs = ag_softmax(ctx, logits);
    if (!probs) return ag_ctx_status(ctx);
    int tokens = (int)ag_rows(probs), n = tokens ? tokens : 1;
    int32_t *token = ag_alloc_ints(ctx, n, "example_router");
    int32_t *expert = ag_alloc_ints(ctx, n, "example_router");
    int32_t *flat = ag_alloc_ints(ctx, n, "example_router");
    float *priority = ag_alloc_floats(ctx, n, "example_router");
    if (!token || !expert || !flat || !priority) return ag_ctx_status(ctx);
    for (int t = 0; t < tokens; t++) {
        const float *row = logits->data + (int64_t)t * experts;
        int best = 0; /* ties: the lower expert */
        for (int e = 1; e < experts; e++) best = row[e] > row[best] ? e : best;
        token[t] = t;
        expert[t] = best;
        flat[t] = t * experts + best;
        priority[t] = probs->data[flat[t]]; /* capacity keeps the most probable */
    }
    ag_tensor *gates = ag_gather_elements(ctx, probs, flat, tokens);
    if (!gates) return ag_ctx_status(ctx);
    router_candidates candidates = {.count = tokens,
                                    .token = token,
                                    .expert = expert,
                                    .priority = priority,
                                    .gates = gates,
                                    .capacity_load = (double)tokens}; /* k = 1 per token */
    CM_TRY(router_finish(ctx, r, tokens, 1, &candidates, out));
    out->stats.entropy = router_mean_entropy(probs);
    return ag_ctx_status(ctx);
}

/* Not in the registry (kind ROUTER_KIND_COUNT): declared with router_declare_with. */
static const router_method example_method = {.kind = ROUTER_KIND_COUNT,
                                             .name = "example",
                                             .uses_k = true,
                                             .passes_per_step = 1,
                                             .has_weights = true,
                                             .validate = example_validate,
                                             .route = example_route};

START_TEST(test_new_method_through_the_registry_interface) {
    const int tokens = 9, experts = 4, d = 5;
    router_config config = make_config(ROUTER_TOPK, experts, 2);
    config.init_std = 1.0f;
    config.bias = true;
    config.capacity_factor = 1.0f; /* capacity ceil(9 / 4) = 3: some tokens are dropped */
    ag_params params;
    ag_params_init(&params);
    router example;
    ck_assert_int_eq(router_declare_with(&example, &example_method, &config, 3, d, &params, "ex"),
                     CM_ERR_INVALID); /* the method's validate: k must be 1 */
    ck_assert_str_eq(cm_error_message(), "example router: router.k = 2, must be 1");
    config.k = 1;
    ck_assert_int_eq(router_declare_with(&example, &example_method, &config, 3, d, &params, "ex"),
                     CM_OK);
    ck_assert_ptr_eq(example.method, &example_method);
    ck_assert_ptr_nonnull(example.weight);
    ck_assert_int_eq(ag_params_finalize(&params, 11), CM_OK);
    fixture reference; /* the registry's topk with the same weights */
    fixture_init(&reference, &config, d);
    memcpy(weight_of(&reference)->data, ag_param_tensor(example.weight)->data,
           (size_t)experts * d * sizeof(float));
    memcpy(ag_param_tensor(reference.r.bias)->data, ag_param_tensor(example.bias)->data,
           (size_t)experts * sizeof(float));

    ag_tensor *x = gc_tensor_new(2, (int[]){tokens, d}, -1.0f, 1.0f, 12, false);
    router_call call = eval_call();
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    router_output got;
    ck_assert_int_eq(router_route(&ctx, &example, x, &call, &got), CM_OK);
    ck_assert_int_eq(example_route_calls, 1);
    ck_assert_int_eq(router_effective_k(&example, &call), 1);
    router_output want = route(&reference, x, &call);
    ck_assert_int_gt(want.stats.dropped, 0);
    ck_assert_int_eq(got.n_slots, want.n_slots);
    ck_assert_int_eq(got.stats.dropped, want.stats.dropped);
    for (int t = 0; t <= tokens; t++) ck_assert_int_eq(got.offsets[t], want.offsets[t]);
    for (int s = 0; s < got.n_slots; s++) {
        ck_assert_int_eq(got.expert[s], want.expert[s]);
        ck_assert_float_eq(got.gates->data[s], want.gates->data[s]);
    }
    ck_assert_ptr_null(got.aux_loss);
    ck_assert_double_eq_tol(got.stats.entropy, want.stats.entropy, 1e-12);
    ck_assert_int_eq(got.stats.k, 1);
    /* The gradient reaches the example's weights through its gates, as topk's. */
    float upstream[9] = {0.5f, -1.0f, 2.0f, 0.25f, -0.75f, 1.5f, -2.0f, 1.0f, 0.125f};
    ag_params_zero_grad(&params);
    ag_params_zero_grad(&reference.params);
    ck_assert_int_eq(ag_backward_from(&ctx, got.gates, upstream), CM_OK);
    ck_assert_int_eq(ag_backward_from(&reference.ctx, want.gates, upstream), CM_OK);
    double grad = 0.0;
    for (int i = 0; i < experts * d; i++) {
        float g = ag_param_tensor(example.weight)->grad[i];
        ck_assert_float_eq(g, weight_of(&reference)->grad[i]);
        grad += fabs(g);
    }
    ck_assert_double_gt(grad, 1e-6);
    gc_tensor_free(x);
    ag_ctx_free(&ctx);
    fixture_free(&reference);
    ag_params_free(&params);
}
END_TEST

/* ---- top-k ------------------------------------------------------------------- */

/* E = 5, T = 4, k = 2; token 1 ties three ways, token 2 is flat. */
static const float topk_logits[4 * 5] = {0.1f,  2.0f, -1.0f, 1.5f,  0.3f,  1.0f,  3.0f,
                                         3.0f,  3.0f, 0.0f,  -2.0f, -2.0f, -2.0f, -2.0f,
                                         -2.0f, 0.5f, -0.5f, 4.0f,  0.0f,  3.9f};
static const int topk_expected[4][2] = {{1, 3}, {1, 2}, {0, 1}, {2, 4}};

START_TEST(test_topk_selection_and_gates) {
    const int tokens = 4, experts = 5, k = 2;
    for (int gating = 0; gating < ROUTER_GATING_COUNT; gating++) {
        router_config config = make_config(ROUTER_TOPK, experts, k);
        config.gating = (router_gating)gating;
        fixture f;
        fixture_init(&f, &config, tokens);
        ag_tensor *x = set_logits(&f, tokens, topk_logits, false);
        router_call call = eval_call();
        router_output out = route(&f, x, &call);
        ck_assert_int_eq(out.n_slots, tokens * k);
        ck_assert_ptr_null(out.aux_loss);
        double entropy = 0.0;
        int per_expert[5] = {0};
        for (int t = 0; t < tokens; t++) {
            assert_token_experts(&out, t, k, topk_expected[t]);
            double p[5], chosen_exp = 0.0, gate_sum = 0.0;
            const float *row = topk_logits + t * experts;
            ref_softmax(row, experts, p);
            for (int e = 0; e < experts; e++) {
                entropy -= p[e] * log(p[e]) / tokens;
                ck_assert_int_eq(ref_rank(p, experts, e) < k, /* the reference agrees */
                                 e == topk_expected[t][0] || e == topk_expected[t][1]);
            }
            for (int j = 0; j < k; j++) chosen_exp += exp(row[topk_expected[t][j]]);
            for (int j = 0; j < k; j++) {
                int e = topk_expected[t][j];
                double want = gating == ROUTER_SOFTMAX_THEN_TOPK ? p[e] : exp(row[e]) / chosen_exp;
                ck_assert_double_eq_tol(out.gates->data[t * k + j], want, 1e-6);
                gate_sum += out.gates->data[t * k + j];
                per_expert[e]++;
            }
            if (gating == ROUTER_SOFTMAX_THEN_TOPK)
                ck_assert_double_lt(gate_sum, 1.0 - 1e-3);
            else
                ck_assert_double_eq_tol(gate_sum, 1.0, 1e-6);
        }
        ck_assert_int_eq(out.stats.tokens, tokens);
        ck_assert_int_eq(out.stats.dropped, 0);
        ck_assert_int_eq(out.stats.k, k);
        ck_assert_double_eq_tol(out.stats.entropy, entropy, 1e-6);
        for (int e = 0; e < experts; e++)
            ck_assert_int_eq(out.stats.tokens_per_expert[e], per_expert[e]);
        gc_tensor_free(x);
        fixture_free(&f);
    }
}
END_TEST

/* The aux loss of a top-k router is the Switch loss plus the z-loss. */
START_TEST(test_topk_aux_loss_value) {
    const int tokens = 7, experts = 5, d = 6, k = 2;
    router_config config = make_config(ROUTER_TOPK, experts, k);
    config.init_std = 1.0f;
    config.bias = true;
    config.aux_loss_coef = 0.3f;
    config.z_loss_coef = 0.07f;
    fixture f;
    fixture_init(&f, &config, d);
    ag_param_tensor(f.r.bias)->data[2] = 0.4f;
    ag_tensor *x = gc_tensor_new(2, (int[]){tokens, d}, -1.0f, 1.0f, 3, false);
    router_call call = eval_call();
    router_output out = route(&f, x, &call);
    double logits[7 * 5], mean_p[5] = {0}, z = 0.0;
    int counts[5] = {0};
    ref_logits(&f, x, logits);
    for (int t = 0; t < tokens; t++) {
        float row[5];
        double p[5];
        for (int e = 0; e < experts; e++) row[e] = (float)logits[t * experts + e];
        ref_softmax(row, experts, p);
        double lse = ref_logsumexp(row, experts);
        z += lse * lse / tokens;
        for (int e = 0; e < experts; e++) {
            mean_p[e] += p[e] / tokens;
            counts[e] += ref_rank(p, experts, e) < k;
        }
    }
    double switch_loss = 0.0;
    for (int e = 0; e < experts; e++) {
        ck_assert_int_eq(out.stats.tokens_per_expert[e], counts[e]);
        switch_loss += 0.3 * experts * counts[e] / (double)(k * tokens) * mean_p[e];
    }
    ck_assert_ptr_nonnull(out.aux_loss);
    ck_assert_double_eq_tol(out.aux_loss->data[0], switch_loss + 0.07 * z, 1e-6);
    gc_tensor_free(x);
    fixture_free(&f);
}
END_TEST

START_TEST(test_switch_loss_uniform_and_z_loss) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    /* f = P = 1/E: the loss is exactly the coefficient. */
    for (int experts = 3; experts <= 5; experts++) {
        const int tokens = 60, k = 2;
        ag_tensor *probs = ag_empty(&ctx, "probs", 2, (int[]){tokens, experts});
        for (int i = 0; i < tokens * experts; i++) probs->data[i] = 1.0f / experts;
        int32_t counts[5]; /* 120 slots split evenly */
        for (int e = 0; e < experts; e++) counts[e] = k * tokens / experts;
        ag_tensor *loss =
            router_switch_loss(&ctx, probs, counts, k, 0.01f, ROUTER_AUX_GLOBAL, &(router_call){0});
        ck_assert_double_eq_tol(loss->data[0], 0.01, 1e-6 * 0.01);
        ck_assert_ptr_null(
            router_switch_loss(&ctx, probs, counts, k, 0.0f, ROUTER_AUX_GLOBAL, &(router_call){0}));
    }
    /* The same through the router: token t prefers expert t, so every column
     * of p holds the same values and every expert gets one token. */
    fixture f;
    router_config config = make_config(ROUTER_TOPK, 4, 1);
    config.aux_loss_coef = 0.01f;
    fixture_init(&f, &config, 4);
    float logits[16] = {0};
    for (int t = 0; t < 4; t++) logits[t * 4 + t] = 2.0f;
    ag_tensor *x = set_logits(&f, 4, logits, false);
    router_call call = eval_call();
    router_output out = route(&f, x, &call);
    ck_assert_double_eq_tol(out.aux_loss->data[0], 0.01, 1e-6 * 0.01);
    gc_tensor_free(x);
    fixture_free(&f);

    /* z-loss against coef * mean_t logsumexp(z_t)^2. */
    ag_tensor *z = gc_tensor_new(2, (int[]){5, 7}, -4.0f, 4.0f, 8, false);
    ag_tensor *zloss = router_z_loss(&ctx, z, 0.25f, &(router_call){0});
    double want = 0.0;
    for (int t = 0; t < 5; t++) {
        double lse = ref_logsumexp(z->data + t * 7, 7);
        want += 0.25 * lse * lse / 5;
    }
    ck_assert_double_eq_tol(zloss->data[0], want, 1e-5 * want);
    ck_assert_ptr_null(router_z_loss(&ctx, z, 0.0f, &(router_call){0}));
    /* No rows (a rank's empty share of a short batch): no term, no error. */
    ag_tensor *none = ag_empty(&ctx, "none", 2, (int[]){0, 7});
    ck_assert_ptr_null(router_z_loss(&ctx, none, 0.25f, &(router_call){0}));
    ck_assert_int_eq(ag_ctx_status(&ctx), CM_OK);
    gc_tensor_free(z);
    ag_ctx_free(&ctx);
}
END_TEST

/* Noise: logits + noise_std N(0,1) keyed by the global token index, only in
 * training, and without gradient. */
START_TEST(test_noisy_logits) {
    const int tokens = 5, experts = 3, d = 4;
    router_config config = make_config(ROUTER_TOPK, experts, 1);
    config.init_std = 1.0f;
    config.noise = ROUTER_NOISE_FIXED;
    config.noise_std = 0.5f;
    fixture f;
    fixture_init(&f, &config, d);
    ag_tensor *x = gc_tensor_new(2, (int[]){tokens, d}, -1.0f, 1.0f, 4, false);
    router_call call = {.training = true, .seed = 17, .step = 4, .first_token = 100};
    ag_tensor *noisy = router_logits(&f.ctx, &f.r, x, &call);
    call.training = false;
    ag_tensor *clean = router_logits(&f.ctx, &f.r, x, &call);
    cm_rng_key key = {17, 4, 3, CM_RNG_NOISE};
    for (int t = 0; t < tokens; t++)
        for (int e = 0; e < experts; e++) {
            int i = t * experts + e;
            double draw = cm_rng_normal(key, (uint64_t)(100 + t) * experts + e);
            ck_assert_double_eq_tol(noisy->data[i] - clean->data[i], 0.5 * draw, 1e-5);
        }
    /* The gradient w.r.t. the weight is the clean one: sum_t x_t per row. */
    ag_params_zero_grad(&f.params);
    ck_assert_int_eq(ag_backward(&f.ctx, ag_sum(&f.ctx, noisy)), CM_OK);
    for (int e = 0; e < experts; e++)
        for (int i = 0; i < d; i++) {
            double want = 0.0;
            for (int t = 0; t < tokens; t++) want += x->data[t * d + i];
            ck_assert_double_eq_tol(weight_of(&f)->grad[e * d + i], want, 1e-5);
        }
    gc_tensor_free(x);
    fixture_free(&f);
}
END_TEST

/* Learned noise (Shazeer et al. 2017): H = x W^T + n softplus(x W_noise^T)
 * in training, n the same keyed standard normal draws as fixed noise; no
 * noise at evaluation. W_noise is PREFIX.noise_weight [E,D], zero at init. */
START_TEST(test_learned_noise_logits) {
    const int tokens = 5, experts = 3, d = 4;
    router_config config = make_config(ROUTER_TOPK, experts, 1);
    config.init_std = 1.0f;
    config.noise = ROUTER_NOISE_LEARNED;
    config.noise_std = 7.0f; /* not read by learned noise */
    fixture f;
    fixture_init(&f, &config, d);
    ck_assert_ptr_nonnull(f.r.noise_weight);
    ck_assert_str_eq(f.r.noise_weight->name, "router.noise_weight");
    ag_tensor *noise_weight = ag_param_tensor(f.r.noise_weight);
    ck_assert_int_eq(noise_weight->shape[0], experts);
    ck_assert_int_eq(noise_weight->shape[1], d);
    for (int i = 0; i < experts * d; i++) ck_assert_float_eq(noise_weight->data[i], 0.0f);
    cm_rng_fill_uniform((cm_rng_key){6, 0, 0, CM_RNG_TEST}, 0, experts * d, -0.8f, 0.8f,
                        noise_weight->data);
    ag_tensor *x = gc_tensor_new(2, (int[]){tokens, d}, -1.0f, 1.0f, 4, false);
    router_call call = {.training = true, .seed = 17, .step = 4, .first_token = 100};
    ag_tensor *noisy = router_logits(&f.ctx, &f.r, x, &call);
    call.training = false;
    ag_tensor *clean = router_logits(&f.ctx, &f.r, x, &call);
    double logits[5 * 3];
    ref_logits(&f, x, logits);
    cm_rng_key key = {17, 4, 3, CM_RNG_NOISE};
    for (int t = 0; t < tokens; t++)
        for (int e = 0; e < experts; e++) {
            int i = t * experts + e;
            double u = 0.0;
            for (int j = 0; j < d; j++)
                u += (double)x->data[t * d + j] * noise_weight->data[e * d + j];
            double draw = cm_rng_normal(key, (uint64_t)(100 + t) * experts + e);
            ck_assert_double_eq_tol(clean->data[i], logits[i], 1e-5);
            ck_assert_double_eq_tol(noisy->data[i], logits[i] + draw * log1p(exp(u)), 1e-5);
        }
    /* Evaluation: no noise, so no gradient reaches W_noise. */
    ag_params_zero_grad(&f.params);
    ck_assert_int_eq(ag_backward(&f.ctx, ag_sum(&f.ctx, clean)), CM_OK);
    for (int i = 0; i < experts * d; i++) ck_assert_float_eq(noise_weight->grad[i], 0.0f);
    gc_tensor_free(x);
    fixture_free(&f);

    /* Learned noise needs a router that trains. */
    router_config frozen = make_config(ROUTER_SMOE_DROPOUT, experts, 1);
    frozen.noise = ROUTER_NOISE_LEARNED;
    ag_params params;
    ag_params_init(&params);
    router r;
    ck_assert_int_eq(router_declare(&r, &frozen, 0, d, &params, "router"), CM_ERR_INVALID);
    ck_assert_str_eq(
        cm_error_message(),
        "router.noise = learned needs a trained router network (smoe_dropout has none)");
    ag_params_free(&params);
}
END_TEST

/* ---- gradient checks with the selection held fixed ---------------------------- */

/* The learned-noise router's gates and losses against finite differences,
 * W_noise's gradient included (through the softplus; the draws are
 * constants). The call's step is chosen so that every token's k-th and
 * (k+1)-th noisy logits are 0.1 apart: no perturbation changes the
 * selection. */
START_TEST(test_learned_noise_gradcheck) {
    const int tokens = 7, experts = 5;
    for (int gating = 0; gating < ROUTER_GATING_COUNT; gating++)
        for (int k = 1; k <= 2; k++) {
            router_config config = make_config(ROUTER_TOPK, experts, k);
            config.gating = (router_gating)gating;
            config.bias = true;
            config.noise = ROUTER_NOISE_LEARNED;
            config.aux_loss_coef = 1.0f;
            config.z_loss_coef = 0.5f;
            fixture f;
            fixture_init(&f, &config, experts + 2);
            ag_tensor *x = margin_inputs(&f, tokens, five_levels, (const float[]){1.0f}, 1, 31);
            ag_tensor *noise_weight = ag_param_tensor(f.r.noise_weight);
            cm_rng_fill_uniform((cm_rng_key){7, 0, 0, CM_RNG_TEST}, 0, noise_weight->numel, -0.3f,
                                0.3f, noise_weight->data);
            router_call call = {.training = true, .seed = 3, .first_token = 40};
            bool found = false;
            for (call.step = 0; call.step < 100 && !found; call.step++) {
                ag_ctx_reset(&f.ctx);
                ag_tensor *h = router_logits(&f.ctx, &f.r, x, &call);
                found = true;
                for (int t = 0; t < tokens && found; t++) {
                    double row[5], sorted[5];
                    for (int e = 0; e < experts; e++) row[e] = h->data[t * experts + e];
                    for (int e = 0; e < experts; e++) sorted[ref_rank(row, experts, e)] = row[e];
                    found = sorted[k - 1] - sorted[k] > 0.1;
                }
            }
            ck_assert(found);
            call.step--;
            run_gradcheck_call("learned noise gates", &f, x, false, &call);
            run_gradcheck_call("learned noise aux", &f, x, true, &call);
            /* W_noise does get a gradient (gc_check would pass on zeros). */
            ag_ctx_reset(&f.ctx);
            ag_params_zero_grad(&f.params);
            router_output out;
            ck_assert_int_eq(router_route(&f.ctx, &f.r, x, &call, &out), CM_OK);
            ck_assert_int_eq(
                ag_backward(&f.ctx, ag_add(&f.ctx, ag_sum(&f.ctx, out.gates), out.aux_loss)),
                CM_OK);
            double grad = 0.0;
            for (int i = 0; i < noise_weight->numel; i++) grad += fabs(noise_weight->grad[i]);
            ck_assert_double_gt(grad, 1e-4);
            gc_tensor_free(x);
            fixture_free(&f);
        }
}
END_TEST

START_TEST(test_topk_gradcheck) {
    const int tokens = 7, experts = 5;
    for (int gating = 0; gating < ROUTER_GATING_COUNT; gating++)
        for (int k = 1; k <= 3; k += 2) {
            router_config config = make_config(ROUTER_TOPK, experts, k);
            config.gating = (router_gating)gating;
            config.bias = true;
            config.aux_loss_coef = 1.0f; /* large, so the aux gradients dominate atol */
            config.z_loss_coef = 0.5f;
            fixture f;
            fixture_init(&f, &config, experts + 2);
            ag_tensor *x = margin_inputs(&f, tokens, five_levels, (const float[]){1.0f}, 1, 21);
            /* Precondition: the k-th and (k+1)-th logits are 0.3 apart. */
            double logits[7 * 5];
            ref_logits(&f, x, logits);
            for (int t = 0; t < tokens; t++) {
                double sorted[5];
                for (int e = 0; e < experts; e++)
                    sorted[ref_rank(logits + t * experts, experts, e)] = logits[t * experts + e];
                ck_assert_double_gt(sorted[k - 1] - sorted[k], 0.3);
            }
            run_gradcheck("topk gates", &f, x, false);
            run_gradcheck("topk aux", &f, x, true);
            gc_tensor_free(x);
            fixture_free(&f);
        }
}
END_TEST

/* Capacity dropping selects the gathered gates: check that path too (the
 * position policy, so the kept set cannot depend on the perturbed values). */
START_TEST(test_capacity_gradcheck) {
    const int tokens = 7, experts = 5;
    for (int gating = 0; gating < ROUTER_GATING_COUNT; gating++) {
        router_config config = make_config(ROUTER_TOPK, experts, 2);
        config.gating = (router_gating)gating;
        config.capacity_factor = 0.8f; /* capacity ceil(7 * 2 / 5 * 0.8) = 3 */
        config.drop_policy = ROUTER_DROP_POSITION;
        config.aux_loss_coef = 1.0f;
        fixture f;
        fixture_init(&f, &config, experts + 2);
        ag_tensor *x = margin_inputs(&f, tokens, five_levels, (const float[]){1.0f}, 1, 23);
        router_call call = eval_call();
        router_output out = route(&f, x, &call);
        ck_assert_int_gt(out.stats.dropped, 0);
        run_gradcheck("capacity gates", &f, x, false);
        run_gradcheck("capacity aux", &f, x, true);
        gc_tensor_free(x);
        fixture_free(&f);
    }
}
END_TEST

/* ---- no gradient through the selection ------------------------------------------ */

START_TEST(test_no_gradient_through_selection) {
    const int tokens = 4, experts = 5, k = 2;
    /* Expert 4 is last for every token by at least 1. */
    float logits[4 * 5] = {0.1f, 2.0f, -1.0f, 1.5f,  -2.5f, 1.0f, 3.0f,  2.9f, 0.5f, -1.0f,
                           0.0f, 0.4f, 0.9f,  -0.3f, -1.5f, 0.5f, -0.5f, 4.0f, 3.5f, -2.0f};
    for (int gating = 0; gating < ROUTER_GATING_COUNT; gating++) {
        router_config config = make_config(ROUTER_TOPK, experts, k);
        config.gating = (router_gating)gating;
        fixture f;
        fixture_init(&f, &config, tokens);
        ag_tensor *x = set_logits(&f, tokens, logits, true);
        router_call call = eval_call();
        router_output before = route(&f, x, &call);
        int32_t experts_before[8];
        float gates_before[8];
        memcpy(experts_before, before.expert, sizeof experts_before);
        memcpy(gates_before, before.gates->data, sizeof gates_before);
        ag_params_zero_grad(&f.params);
        float upstream[8] = {0.3f, -1.2f, 0.7f, 0.4f, -0.5f, 1.1f, 0.9f, -0.8f};
        ck_assert_int_eq(ag_backward_from(&f.ctx, before.gates, upstream), CM_OK);
        const float *dw = weight_of(&f)->grad;
        double row4 = 0.0, row1 = 0.0;
        for (int t = 0; t < tokens; t++) {
            row4 += fabs(dw[4 * tokens + t]);
            row1 += fabs(dw[1 * tokens + t]);
        }
        ck_assert_double_gt(row1, 1e-3);
        if (gating == ROUTER_TOPK_THEN_SOFTMAX)
            ck_assert_double_eq(row4, 0.0); /* exactly: nothing reaches it */
        else
            ck_assert_double_gt(row4, 1e-4); /* through the full softmax's normaliser */

        /* Raise the unselected logits (still below the k-th by > 0.3). */
        float *w = weight_of(&f)->data;
        for (int t = 0; t < tokens; t++) w[4 * tokens + t] += 0.7f;
        router_output after = route(&f, x, &call);
        ck_assert_int_eq(after.n_slots, tokens * k);
        for (int s = 0; s < tokens * k; s++) {
            ck_assert_int_eq(after.expert[s], experts_before[s]);
            if (gating == ROUTER_TOPK_THEN_SOFTMAX)
                ck_assert_float_eq(after.gates->data[s], gates_before[s]);
            else
                ck_assert_float_ne(after.gates->data[s], gates_before[s]);
        }
        gc_tensor_free(x);
        fixture_free(&f);
    }
}
END_TEST

/* ---- capacity dropping -------------------------------------------------------------- */

/* k = 1, E = 2, T = 4, capacity ceil(4 / 2 * 1) = 2; every token wants
 * expert 0 with p = .599, .900, .802, .802 (tokens 2 and 3 tie). */
START_TEST(test_capacity_k1) {
    const float logits[4 * 2] = {0.4f, 0, 2.2f, 0, 1.4f, 0, 1.4f, 0};
    for (int policy = 0; policy < ROUTER_DROP_POLICY_COUNT; policy++) {
        router_config config = make_config(ROUTER_TOPK, 2, 1);
        config.capacity_factor = 1.0f;
        config.drop_policy = (router_drop_policy)policy;
        config.aux_loss_coef = 0.1f;
        fixture f;
        fixture_init(&f, &config, 4);
        ag_tensor *x = set_logits(&f, 4, logits, false);
        router_call call = eval_call();
        router_output out = route(&f, x, &call);
        /* probability: the two highest (token 1, then 2 over 3 by index);
         * position: the first two. */
        const bool kept[2][4] = {{false, true, true, false}, {true, true, false, false}};
        ck_assert_int_eq(out.n_slots, 2);
        ck_assert_int_eq(out.stats.dropped, 2);
        ck_assert_int_eq(out.stats.tokens_per_expert[0], 2);
        ck_assert_int_eq(out.stats.tokens_per_expert[1], 0);
        /* The Switch loss counts the router's choices before the drop
         * (Switch, GShard, Megatron): f = (4/4, 0), not the kept (2/4, 0). */
        ck_assert_int_eq(out.stats.routed_per_expert[0], 4);
        ck_assert_int_eq(out.stats.routed_per_expert[1], 0);
        double mean_p0 = 0.0;
        for (int t = 0; t < 4; t++) mean_p0 += 1.0 / (1.0 + exp(-logits[2 * t])) / 4;
        double before_drop = 0.1 * 2 * (4.0 / 4) * mean_p0,
               after_drop = 0.1 * 2 * (2.0 / 4) * mean_p0;
        ck_assert_double_eq_tol(out.aux_loss->data[0], before_drop, 1e-7);
        ck_assert_double_gt(fabs(out.aux_loss->data[0] - after_drop), 1e-2);
        for (int t = 0; t < 4; t++) {
            ck_assert_int_eq(out.offsets[t + 1] - out.offsets[t], kept[policy][t]);
            if (!kept[policy][t]) continue;
            double p[2];
            ref_softmax(logits + 2 * t, 2, p);
            ck_assert_int_eq(out.expert[out.offsets[t]], 0);
            ck_assert_double_eq_tol(out.gates->data[out.offsets[t]], p[0], 1e-6);
        }
        gc_tensor_free(x);
        fixture_free(&f);
    }
}
END_TEST

/* k = 2, E = 3, T = 4, topK-then-softmax, capacity ceil(4 * 2 / 3 * 0.75) = 2.
 * Expert 0 is in every token's top 2 (gates .731, .731, .881, .378); experts
 * 1 and 2 get two tokens each. A dropped slot leaves the token's other slot
 * with its gate unchanged. */
START_TEST(test_capacity_k2_keeps_other_slots) {
    const float logits[4 * 3] = {2, 1, 0, 2, 0, 1, 3, 1, 0, 1.5f, 0, 2};
    const int second[4] = {1, 2, 1, 2};
    for (int policy = 0; policy < ROUTER_DROP_POLICY_COUNT; policy++) {
        router_config config = make_config(ROUTER_TOPK, 3, 2);
        config.gating = ROUTER_TOPK_THEN_SOFTMAX;
        config.capacity_factor = 0.75f;
        config.drop_policy = (router_drop_policy)policy;
        config.aux_loss_coef = 0.2f;
        fixture f;
        fixture_init(&f, &config, 4);
        ag_tensor *x = set_logits(&f, 4, logits, false);
        router_call call = eval_call();
        router_output out = route(&f, x, &call);
        /* Expert 0 keeps tokens {2, 0} (probability; 0 over 1 on the tie)
         * or {0, 1} (position). */
        const bool keeps_0[2][4] = {{true, false, true, false}, {true, true, false, false}};
        ck_assert_int_eq(out.stats.dropped, 2);
        ck_assert_int_eq(out.n_slots, 6);
        const int want_counts[3] = {2, 2, 2};
        for (int e = 0; e < 3; e++)
            ck_assert_int_eq(out.stats.tokens_per_expert[e], want_counts[e]);
        for (int t = 0; t < 4; t++) {
            const float *row = logits + 3 * t;
            double denominator = exp(row[0]) + exp(row[second[t]]);
            int s = out.offsets[t];
            if (keeps_0[policy][t]) {
                assert_token_experts(&out, t, 2, (const int[]){0, second[t]});
                ck_assert_double_eq_tol(out.gates->data[s], exp(row[0]) / denominator, 1e-6);
                s++;
            } else {
                assert_token_experts(&out, t, 1, (const int[]){second[t]});
            }
            ck_assert_double_eq_tol(out.gates->data[s], exp(row[second[t]]) / denominator, 1e-6);
        }
        /* Balance loss from the choices before the drop, f = (4, 2, 2) / 8;
         * the kept counts (2, 2, 2) / 6 would give another value. */
        double mean_p[3] = {0}, before_drop = 0.0, after_drop = 0.0;
        for (int t = 0; t < 4; t++) {
            double p[3];
            ref_softmax(logits + 3 * t, 3, p);
            for (int e = 0; e < 3; e++) mean_p[e] += p[e] / 4;
        }
        const int routed[3] = {4, 2, 2};
        for (int e = 0; e < 3; e++) {
            ck_assert_int_eq(out.stats.routed_per_expert[e], routed[e]);
            before_drop += 0.2 * 3 * routed[e] / 8.0 * mean_p[e];
            after_drop += 0.2 * 3 * want_counts[e] / 8.0 * mean_p[e];
        }
        ck_assert_double_eq_tol(out.aux_loss->data[0], before_drop, 1e-6);
        ck_assert_double_gt(fabs(out.aux_loss->data[0] - after_drop), 1e-2);
        gc_tensor_free(x);
        fixture_free(&f);
    }
}
END_TEST

START_TEST(test_sort_and_ceil_helpers) {
    const float score[7] = {0.5f, 0.9f, 0.5f, -1.0f, 0.9f, 2.0f, 0.5f};
    int32_t index[7], scratch[7];
    for (int i = 0; i < 7; i++) index[i] = i;
    router_sort_desc(index, 7, score, 1, scratch);
    const int32_t want[7] = {5, 1, 4, 0, 2, 6, 3};
    for (int i = 0; i < 7; i++) ck_assert_int_eq(index[i], want[i]);
    ck_assert_int_eq(router_ceil_count(2.0), 2);
    ck_assert_int_eq(router_ceil_count(10.0 * 1.1f), 11); /* 11.0000002: rounding */
    ck_assert_int_eq(router_ceil_count(2.01), 3);
    ck_assert_int_eq(router_ceil_count(0.3), 1);
}
END_TEST

/* A full arena is a returned error (the sticky context status), never a
 * crash, at whatever point of a method it happens. */
START_TEST(test_arena_full_is_an_error) {
    const int tokens = 7, experts = 5, d = 6;
    for (int kind = 0; kind < ROUTER_KIND_COUNT; kind++) {
        router_config config = make_config((router_kind)kind, experts, 2);
        config.capacity_factor = kind == ROUTER_EXPERT_CHOICE ? 2.0f : 0.5f; /* drops */
        config.aux_loss_coef = 0.1f;
        config.z_loss_coef = 0.1f;
        config.entropy_coef = 0.1f;
        config.init_std = 1.0f;
        fixture f;
        fixture_init(&f, &config, d);
        ag_tensor *x = gc_tensor_new(2, (int[]){tokens, d}, -1.0f, 1.0f, 5, true);
        router_call call = {.training = true, .seed = 1, .step = 2};
        int failures = 0;
        bool succeeded = false;
        for (size_t bytes = 64; !succeeded; bytes += 64) {
            ag_ctx small;
            ck_assert_int_eq(ag_ctx_init(&small, bytes), CM_OK);
            router_output out;
            cm_status status = router_route(&small, &f.r, x, &call, &out);
            ck_assert(status == CM_OK || status == CM_ERR_NOMEM);
            ck_assert_int_eq(status, ag_ctx_status(&small));
            succeeded = status == CM_OK;
            failures += !succeeded;
            ag_ctx_free(&small);
        }
        ck_assert_int_gt(failures, 3);
        gc_tensor_free(x);
        fixture_free(&f);
    }
}
END_TEST

int main(void) {
    Suite *suite = suite_create("routers");
    TCase *registry = tcase_create("registry");
    tcase_set_timeout(registry, 60);
    tcase_add_test(registry, test_registry_rows);
    tcase_add_test(registry, test_declare_validation);
    tcase_add_test(registry, test_new_method_through_the_registry_interface);
    suite_add_tcase(suite, registry);
    TCase *tc = tcase_create("routers");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_topk_selection_and_gates);
    tcase_add_test(tc, test_topk_aux_loss_value);
    tcase_add_test(tc, test_switch_loss_uniform_and_z_loss);
    tcase_add_test(tc, test_noisy_logits);
    tcase_add_test(tc, test_learned_noise_logits);
    tcase_add_test(tc, test_learned_noise_gradcheck);
    tcase_add_test(tc, test_topk_gradcheck);
    tcase_add_test(tc, test_capacity_gradcheck);
    tcase_add_test(tc, test_no_gradient_through_selection);
    tcase_add_test(tc, test_capacity_k1);
    tcase_add_test(tc, test_capacity_k2_keeps_other_slots);
    tcase_add_test(tc, test_sort_and_ceil_helpers);
    tcase_add_test(tc, test_arena_full_is_an_error);
    suite_add_tcase(suite, tc);
    SRunner *runner = srunner_create(suite);
    srunner_run_all(runner, CK_NORMAL);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
