/* Routers: selection on hand-built logits for every method (against direct
 * double-precision computations), gradient checks of the gates and the
 * auxiliary losses with the selection held away from its boundaries, no
 * gradient through the selection, SMoE-Dropout's frozen router and k
 * schedule, THOR's pinned random draws, top-p's variable k, capacity dropping
 * under both policies, and the loss building blocks. */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "gradcheck.h"
#include "routers/router.h"
#include "routers/router_internal.h"

enum { ARENA_BYTES = 16 << 20, MAX_E = 8 };

/* ---- fixtures -------------------------------------------------------------- */

typedef struct fixture {
    ag_params params;
    router r;
    ag_ctx ctx;
} fixture;

static router_config make_config(router_kind kind, int experts, int k) {
    return (router_config){.kind = kind,
                           .num_experts = experts,
                           .k = k,
                           .gating = ROUTER_SOFTMAX_THEN_TOPK,
                           .init_std = 0.02f,
                           .noise_std = 1.0f,
                           .top_p = 0.5f,
                           .k_schedule = {ROUTER_K_CONSTANT, k, k, 1},
                           .thor_level = ROUTER_THOR_PER_SEQUENCE};
}

static void fixture_init(fixture *f, const router_config *config, int d_model) {
    ag_params_init(&f->params);
    ck_assert_int_eq(router_declare(&f->r, config, 3, d_model, &f->params, "router"), CM_OK);
    ck_assert_int_eq(ag_params_finalize(&f->params, 11), CM_OK);
    ck_assert_int_eq(ag_ctx_init(&f->ctx, ARENA_BYTES), CM_OK);
}

static void fixture_free(fixture *f) {
    ag_ctx_free(&f->ctx);
    ag_params_free(&f->params);
}

static ag_tensor *weight_of(fixture *f) {
    return ag_param_tensor(f->r.weight);
}

/* x = the identity [T,T] and W[e][t] = logits[t][e], so x W^T = logits [T,E]
 * exactly (d_model must be T). Returns x (free with gc_tensor_free). */
static ag_tensor *set_logits(fixture *f, int tokens, const float *logits, bool x_grad) {
    int experts = f->r.config.num_experts;
    ag_tensor *x = gc_tensor_new(2, (int[]){tokens, tokens}, 0.0f, 0.0f, 1, x_grad);
    for (int t = 0; t < tokens; t++) x->data[t * tokens + t] = 1.0f;
    float *w = weight_of(f)->data;
    for (int e = 0; e < experts; e++)
        for (int t = 0; t < tokens; t++) w[e * tokens + t] = logits[t * experts + e];
    return x;
}

static router_call eval_call(void) {
    return (router_call){.training = false, .seed = 5, .step = 9, .seq_len = 4};
}

static router_output route(fixture *f, ag_tensor *x, const router_call *call) {
    router_output out;
    ag_ctx_reset(&f->ctx);
    ck_assert_int_eq(router_route(&f->ctx, &f->r, x, call, &out), CM_OK);
    ck_assert_int_eq(out.n_tokens, (int)ag_rows(x));
    ck_assert_int_eq(out.offsets[0], 0);
    ck_assert_int_eq(out.offsets[out.n_tokens], out.n_slots);
    ck_assert_int_eq(out.gates->numel, out.n_slots);
    ck_assert_int_eq(out.stats.slots, out.n_slots);
    for (int t = 0; t < out.n_tokens; t++) /* ascending experts within a token */
        for (int s = out.offsets[t] + 1; s < out.offsets[t + 1]; s++)
            ck_assert_int_lt(out.expert[s - 1], out.expert[s]);
    return out;
}

/* Slots of token t must be exactly `experts` (count n, ascending). */
static void assert_token_experts(const router_output *out, int t, int n, const int *experts) {
    ck_assert_int_eq(out->offsets[t + 1] - out->offsets[t], n);
    for (int i = 0; i < n; i++) ck_assert_int_eq(out->expert[out->offsets[t] + i], experts[i]);
}

/* ---- direct double-precision references ------------------------------------- */

static void ref_softmax(const float *row, int n, double *out) {
    double max = row[0], sum = 0.0;
    for (int i = 1; i < n; i++) max = row[i] > max ? row[i] : max;
    for (int i = 0; i < n; i++) sum += out[i] = exp(row[i] - max);
    for (int i = 0; i < n; i++) out[i] /= sum;
}

static double ref_logsumexp(const float *row, int n) {
    double max = row[0], sum = 0.0;
    for (int i = 1; i < n; i++) max = row[i] > max ? row[i] : max;
    for (int i = 0; i < n; i++) sum += exp(row[i] - max);
    return max + log(sum);
}

/* rank of entry i among row[0..n): how many entries beat it (larger, or equal
 * with a lower index). Selected by top-k iff rank < k. */
static int ref_rank(const double *row, int n, int i) {
    int rank = 0;
    for (int j = 0; j < n; j++) rank += row[j] > row[i] || (row[j] == row[i] && j < i);
    return rank;
}

/* logits [T,E] in double from the router's current x, W, b. */
static void ref_logits(fixture *f, const ag_tensor *x, double *logits) {
    int tokens = (int)ag_rows(x), d = ag_last_dim(x), experts = f->r.config.num_experts;
    const float *w = weight_of(f)->data;
    for (int t = 0; t < tokens; t++)
        for (int e = 0; e < experts; e++) {
            double z = f->r.bias ? ag_param_tensor(f->r.bias)->data[e] : 0.0;
            for (int i = 0; i < d; i++) z += (double)x->data[t * d + i] * w[e * d + i];
            logits[t * experts + e] = z;
        }
}

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
        ag_tensor *loss = router_switch_loss(&ctx, probs, counts, k, 0.01f, &(router_call){0});
        ck_assert_double_eq_tol(loss->data[0], 0.01, 1e-6 * 0.01);
        ck_assert_ptr_null(router_switch_loss(&ctx, probs, counts, k, 0.0f, &(router_call){0}));
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
    config.noisy = true;
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

/* ---- gradient checks with the selection held fixed ---------------------------- */

typedef struct grad_case {
    router *r;
    router_call call;
    bool aux;          /* return the aux loss instead of the gates */
    int32_t first[64]; /* the selection of the first call: experts of every slot */
    int first_slots;   /* -1 before the first call */
} grad_case;

/* Gates (or aux loss); asserts the selection never changes, so a finite
 * difference never straddles a switch of the discrete routing. */
static ag_tensor *forward_route(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    grad_case *c = user;
    router_output out;
    if (router_route(ctx, c->r, in[0], &c->call, &out) != CM_OK) return NULL;
    ck_assert_int_le(out.n_slots, 64);
    if (c->first_slots < 0) {
        c->first_slots = out.n_slots;
        memcpy(c->first, out.expert, (size_t)out.n_slots * sizeof(int32_t));
    }
    ck_assert_int_eq(out.n_slots, c->first_slots);
    for (int s = 0; s < out.n_slots; s++) ck_assert_int_eq(out.expert[s], c->first[s]);
    return c->aux ? out.aux_loss : out.gates;
}

/* x [T,E+2] = [L | u], W [E,E+2] = [I | v], b small: the logits are L plus a
 * small data-dependent part, and every input reaches them. L[t] is a
 * permutation of `levels` scaled by scales[t % n_scales]. */
static ag_tensor *margin_inputs(fixture *f, int tokens, const float *levels, const float *scales,
                                int n_scales, uint64_t seed) {
    int experts = f->r.config.num_experts, d = experts + 2;
    ag_tensor *x = gc_tensor_new(2, (int[]){tokens, d}, -1.0f, 1.0f, seed, true);
    float *w = weight_of(f)->data;
    cm_rng_fill_uniform((cm_rng_key){seed, 1, 0, CM_RNG_TEST}, 0, experts * d, -0.02f, 0.02f, w);
    for (int e = 0; e < experts; e++)
        for (int i = 0; i < experts; i++) w[e * d + i] = e == i;
    if (f->r.bias)
        cm_rng_fill_uniform((cm_rng_key){seed, 2, 0, CM_RNG_TEST}, 0, experts, -0.02f, 0.02f,
                            ag_param_tensor(f->r.bias)->data);
    int32_t perm[MAX_E];
    for (int t = 0; t < tokens; t++) {
        cm_rng_permutation((cm_rng_key){seed, 3, (uint32_t)t, CM_RNG_TEST}, experts, perm);
        for (int e = 0; e < experts; e++)
            x->data[t * d + e] = scales[t % n_scales] * levels[perm[e]];
    }
    return x;
}

/* How far the top-p selection of every token is from changing: the smallest
 * of (threshold - mass before the last kept expert), (mass with it -
 * threshold) and the probability gap between the last kept expert and the
 * next one. A gradcheck step must move the probabilities by less. */
static double top_p_margin(const double *logits, int tokens, int experts, double threshold) {
    double margin = 1.0;
    for (int t = 0; t < tokens; t++) {
        float row[MAX_E];
        double p[MAX_E], sorted[MAX_E], mass = 0.0;
        for (int e = 0; e < experts; e++) row[e] = (float)logits[t * experts + e];
        ref_softmax(row, experts, p);
        for (int e = 0; e < experts; e++) sorted[ref_rank(p, experts, e)] = p[e];
        int n = 0;
        while (n < experts && mass + sorted[n] <= threshold) mass += sorted[n++];
        if (n == experts) continue; /* everything kept: nothing to flip */
        margin = fmin(margin, threshold - mass);
        margin = fmin(margin, mass + sorted[n] - threshold);
        if (n + 1 < experts) margin = fmin(margin, sorted[n] - sorted[n + 1]);
    }
    return margin;
}

static void run_gradcheck(const char *label, fixture *f, ag_tensor *x, bool aux) {
    grad_case c = {.r = &f->r, .call = eval_call(), .aux = aux, .first_slots = -1};
    ag_tensor *inputs[3] = {x, weight_of(f), f->r.bias ? ag_param_tensor(f->r.bias) : NULL};
    gc_options options = gc_default_options();
    gc_result result = gc_check(label, forward_route, inputs, f->r.bias ? 3 : 2, &c, &options);
    ck_assert_msg(result.ok, "%s", result.message);
    ck_assert_int_ge(result.checked, x->numel + weight_of(f)->numel);
}

static const float five_levels[5] = {-1.4f, -0.7f, 0.0f, 0.7f, 1.4f};

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
        /* Switch loss with f from the kept counts: f = (2/4, 0). */
        double mean_p0 = 0.0;
        for (int t = 0; t < 4; t++) mean_p0 += 1.0 / (1.0 + exp(-logits[2 * t])) / 4;
        ck_assert_double_eq_tol(out.aux_loss->data[0], 0.1 * 2 * 0.5 * mean_p0, 1e-7);
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
    TCase *tc = tcase_create("routers");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_topk_selection_and_gates);
    tcase_add_test(tc, test_topk_aux_loss_value);
    tcase_add_test(tc, test_switch_loss_uniform_and_z_loss);
    tcase_add_test(tc, test_noisy_logits);
    tcase_add_test(tc, test_topk_gradcheck);
    tcase_add_test(tc, test_top_p_gradcheck);
    tcase_add_test(tc, test_expert_choice_gradcheck);
    tcase_add_test(tc, test_capacity_gradcheck);
    tcase_add_test(tc, test_no_gradient_through_selection);
    tcase_add_test(tc, test_smoe_dropout);
    tcase_add_test(tc, test_thor_training_draws);
    tcase_add_test(tc, test_thor_inference);
    tcase_add_test(tc, test_top_p_selection);
    tcase_add_test(tc, test_top_p_mean_k_and_losses);
    tcase_add_test(tc, test_expert_choice_selection);
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
