/* RMoE, the layerwise recurrent router (METHODS.md 9.6): parameter names,
 * shapes, one shared GRU and the parameter count (9.6.8); every layer's
 * state and gates against a double-precision reference of 9.2, the first
 * layer starting from zero (9.6.3, 9.6.6); zero recurrent weights make
 * carry equal recurrence-off bit for bit (9.6.2), while with real weights
 * a layer's routing depends on the earlier layers' inputs; permuting the
 * tokens permutes the decisions (9.6.4); the gradient check of the whole
 * three-layer stack with the selection held fixed; detach removes exactly
 * the cross-layer terms and the shared GRU's gradient is the sum of the
 * layers' (9.6.5). */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "router_testutil.h"

enum { T = 6, D = 5, H = 3, E = 4, K = 2, LAYERS = 3 };

typedef struct stack {
    ag_params params;
    router r[LAYERS];
    ag_ctx ctx;
} stack;

static router_config rmoe_config(router_rnn_state state) {
    router_config config = make_config(ROUTER_RMOE, E, K);
    config.gating = ROUTER_TOPK_THEN_SOFTMAX;
    config.rnn_hidden = H;
    config.rnn_state = state;
    config.init_std = 0.6f;
    config.aux_loss_coef = 0.05f;
    config.z_loss_coef = 0.01f;
    return config;
}

static void stack_init(stack *s, const router_config *config) {
    ag_params_init(&s->params);
    for (int l = 0; l < LAYERS; l++) {
        char prefix[64];
        snprintf(prefix, sizeof prefix, "blocks.%d.moe.router", l);
        ck_assert_int_eq(router_declare(&s->r[l], config, l, D, &s->params, prefix), CM_OK);
    }
    ck_assert_int_eq(ag_params_finalize(&s->params, 11), CM_OK);
    ck_assert_int_eq(ag_ctx_init(&s->ctx, ARENA_BYTES), CM_OK);
}

static void stack_free(stack *s) {
    ag_ctx_free(&s->ctx);
    ag_params_free(&s->params);
}

static const float *values(ag_param *param) {
    return param->tensor.data;
}

/* Routes x[l] through the layers with one carried state (no arena reset);
 * states[l] = the state after layer l. */
static void route_stack(stack *s, ag_tensor *const *x, const router_call *base, router_output *out,
                        ag_tensor **states) {
    router_depth_state depth = {0};
    router_call call = *base;
    call.depth = &depth;
    for (int l = 0; l < LAYERS; l++) {
        ck_assert_int_eq(router_route(&s->ctx, &s->r[l], x[l], &call, &out[l]), CM_OK);
        ck_assert_ptr_nonnull(depth.h);
        ck_assert_int_eq(depth.h->shape[0], (int)ag_rows(x[l]));
        ck_assert_int_eq(depth.h->shape[1], H);
        if (states) states[l] = depth.h;
    }
}

static void make_inputs(ag_tensor **x, int n, uint64_t seed, bool grad) {
    for (int l = 0; l < LAYERS; l++)
        x[l] = gc_tensor_new(2, (int[]){n, D}, -1.5f, 1.5f, seed + (uint64_t)l, grad);
}

static void free_inputs(ag_tensor **x) {
    for (int l = 0; l < LAYERS; l++) gc_tensor_free(x[l]);
}

/* ---- declaration -------------------------------------------------------------- */

static void assert_shape(const ag_params *params, const char *name, int rows, int cols) {
    ag_param *p = ag_params_find(params, name);
    ck_assert_msg(p != NULL, "%s not declared", name);
    ck_assert_int_eq(p->tensor.shape[0], rows);
    if (cols > 0) ck_assert_int_eq(p->tensor.shape[1], cols);
    ck_assert_int_eq(p->tensor.ndim, cols > 0 ? 2 : 1);
    ck_assert_int_eq(p->group, AG_GROUP_DENSE);
}

START_TEST(test_declare_names_shapes_and_sharing) {
    router_config config = rmoe_config(ROUTER_RNN_CARRY);
    stack s;
    stack_init(&s, &config);
    for (int l = 0; l < LAYERS; l++) {
        char name[96];
        snprintf(name, sizeof name, "blocks.%d.moe.router.proj_weight", l);
        assert_shape(&s.params, name, H, D);
        snprintf(name, sizeof name, "blocks.%d.moe.router.weight", l);
        assert_shape(&s.params, name, E, H);
        snprintf(name, sizeof name, "blocks.%d.moe.router.bias", l);
        ck_assert_ptr_null(ag_params_find(&s.params, name));
        ck_assert_ptr_eq(s.r[l].gru_weight_ih, s.r[0].gru_weight_ih);
        ck_assert_ptr_eq(s.r[l].gru_bias_hh, s.r[0].gru_bias_hh);
        ck_assert_ptr_null(s.r[l].bias);
    }
    assert_shape(&s.params, "router_gru.weight_ih", 3 * H, H);
    assert_shape(&s.params, "router_gru.weight_hh", 3 * H, H);
    assert_shape(&s.params, "router_gru.bias_ih", 3 * H, 0);
    assert_shape(&s.params, "router_gru.bias_hh", 3 * H, 0);
    /* 9.6.8: L (H D + E H) + 3 (2 H^2 + 2 H) */
    ck_assert_int_eq(ag_params_count(&s.params, AG_GROUP_DENSE),
                     LAYERS * (H * D + E * H) + 3 * (2 * H * H + 2 * H));
    /* the GRU's biases are drawn like its weights (not zero) */
    ck_assert_float_ne(values(s.r[0].gru_bias_ih)[0], 0.0f);
    stack_free(&s);

    /* a second router with another H_r cannot share the GRU */
    ag_params params;
    ag_params_init(&params);
    router a, b;
    ck_assert_int_eq(router_declare(&a, &config, 0, D, &params, "a"), CM_OK);
    config.rnn_hidden = H + 1;
    ck_assert_int_eq(router_declare(&b, &config, 1, D, &params, "b"), CM_ERR_INVALID);
    ag_params_free(&params);
}
END_TEST

START_TEST(test_validation) {
    const char *const messages[3] = {"router.rnn_hidden = 0 must be >= 1",
                                     "rmoe's projections have no bias", "not available with rmoe"};
    for (int i = 0; i < 3; i++) {
        router_config config = rmoe_config(ROUTER_RNN_CARRY);
        if (i == 0) config.rnn_hidden = 0;
        if (i == 1) config.bias = true;
        if (i == 2) config.noise = ROUTER_NOISE_LEARNED;
        ag_params params;
        ag_params_init(&params);
        router r;
        ck_assert_int_eq(router_declare(&r, &config, 0, D, &params, "r"), CM_ERR_INVALID);
        ck_assert_msg(strstr(cm_error_message(), messages[i]), "case %d: %s", i,
                      cm_error_message());
        ag_params_free(&params);
    }
}
END_TEST

/* ---- values --------------------------------------------------------------------- */

static double sigmoid(double v) {
    return 1.0 / (1.0 + exp(-v));
}

/* METHODS.md 9.2 in double for one layer: u [T,D], h_prev [T,H] -> h [T,H],
 * logits [T,E]. */
static void reference_layer(const router *r, const float *u, const double *h_prev, double *h,
                            double *logits) {
    const float *w1 = values(r->proj_weight), *w2 = values(r->weight);
    const float *wih = values(r->gru_weight_ih), *whh = values(r->gru_weight_hh);
    const float *bih = values(r->gru_bias_ih), *bhh = values(r->gru_bias_hh);
    for (int t = 0; t < T; t++) {
        double x[H], gi[3 * H], gh[3 * H];
        for (int j = 0; j < H; j++) {
            x[j] = 0.0;
            for (int d = 0; d < D; d++) x[j] += (double)w1[j * D + d] * u[t * D + d];
        }
        for (int g = 0; g < 3 * H; g++) {
            gi[g] = bih[g];
            gh[g] = bhh[g];
            for (int j = 0; j < H; j++) {
                gi[g] += (double)wih[g * H + j] * x[j];
                gh[g] += (double)whh[g * H + j] * h_prev[t * H + j];
            }
        }
        for (int j = 0; j < H; j++) {
            double rr = sigmoid(gi[j] + gh[j]), z = sigmoid(gi[H + j] + gh[H + j]);
            double n = tanh(gi[2 * H + j] + rr * gh[2 * H + j]);
            h[t * H + j] = (1.0 - z) * n + z * h_prev[t * H + j];
        }
        for (int e = 0; e < E; e++) {
            logits[t * E + e] = 0.0;
            for (int j = 0; j < H; j++) logits[t * E + e] += (double)w2[e * H + j] * h[t * H + j];
        }
    }
}

/* Each token's slots are the top-k of the reference logits, with gates
 * softmax over the chosen logits (topk_softmax). */
static void assert_routing(const router_output *out, const double *logits) {
    for (int t = 0; t < T; t++) {
        ck_assert_int_eq(out->offsets[t + 1] - out->offsets[t], K);
        double total = 0.0;
        for (int s = out->offsets[t]; s < out->offsets[t + 1]; s++)
            total += exp(logits[t * E + out->expert[s]]);
        for (int s = out->offsets[t]; s < out->offsets[t + 1]; s++) {
            ck_assert_int_lt(ref_rank(logits + t * E, E, out->expert[s]), K);
            ck_assert_double_eq_tol(out->gates->data[s],
                                    exp(logits[t * E + out->expert[s]]) / total, 1e-6);
        }
    }
}

START_TEST(test_states_and_gates_match_reference) {
    for (int mode = 0; mode < ROUTER_RNN_STATE_COUNT; mode++) {
        router_config config = rmoe_config((router_rnn_state)mode);
        stack s;
        stack_init(&s, &config);
        ag_tensor *x[LAYERS], *states[LAYERS];
        make_inputs(x, T, 40, false);
        router_output out[LAYERS];
        router_call call = eval_call();
        ag_ctx_reset(&s.ctx);
        route_stack(&s, x, &call, out, states);
        double h_prev[T * H] = {0}, h[T * H], logits[T * E];
        for (int l = 0; l < LAYERS; l++) {
            reference_layer(&s.r[l], x[l]->data, h_prev, h, logits);
            for (int i = 0; i < T * H; i++) ck_assert_double_eq_tol(states[l]->data[i], h[i], 1e-6);
            assert_routing(&out[l], logits);
            /* off: every layer starts again from zero */
            if (mode != ROUTER_RNN_ZERO) memcpy(h_prev, h, sizeof h);
        }
        free_inputs(x);
        stack_free(&s);
    }
}
END_TEST

/* Routes x through `s` in the given mode; copies of each layer's output. */
static void route_mode(stack *s, ag_tensor *const *x, router_rnn_state mode, int32_t *experts,
                       float *gates) {
    for (int l = 0; l < LAYERS; l++) s->r[l].config.rnn_state = mode;
    router_output out[LAYERS];
    router_call call = eval_call();
    ag_ctx_reset(&s->ctx);
    route_stack(s, x, &call, out, NULL);
    for (int l = 0; l < LAYERS; l++) {
        ck_assert_int_eq(out[l].n_slots, T * K);
        memcpy(experts + l * T * K, out[l].expert, T * K * sizeof(int32_t));
        memcpy(gates + l * T * K, out[l].gates->data, T * K * sizeof(float));
    }
}

/* 9.6.2 and the depth dependence: with W_hh = b_hh = 0 the state does not
 * reach the next layer's new state except through z h, so zero them and
 * also see that carry with real weights differs from off. */
START_TEST(test_recurrence_matters_and_reduces) {
    router_config config = rmoe_config(ROUTER_RNN_CARRY);
    stack s;
    stack_init(&s, &config);
    ag_tensor *x[LAYERS];
    make_inputs(x, T, 50, false);
    int32_t carry_e[LAYERS * T * K], off_e[LAYERS * T * K];
    float carry_g[LAYERS * T * K], off_g[LAYERS * T * K];
    route_mode(&s, x, ROUTER_RNN_CARRY, carry_e, carry_g);
    route_mode(&s, x, ROUTER_RNN_ZERO, off_e, off_g);
    /* layer 0 sees h = 0 either way; the later layers see the history */
    ck_assert(!memcmp(carry_g, off_g, T * K * sizeof(float)));
    ck_assert(memcmp(carry_g + T * K, off_g + T * K, 2 * T * K * sizeof(float)) != 0);
    /* changing layer 0's input changes layer 2's routing under carry only */
    int32_t moved_e[LAYERS * T * K];
    float moved_g[LAYERS * T * K];
    for (int i = 0; i < T * D; i++) x[0]->data[i] *= -1.0f;
    route_mode(&s, x, ROUTER_RNN_CARRY, moved_e, moved_g);
    ck_assert(memcmp(moved_g + 2 * T * K, carry_g + 2 * T * K, T * K * sizeof(float)) != 0);
    route_mode(&s, x, ROUTER_RNN_ZERO, moved_e, moved_g);
    ck_assert(!memcmp(moved_g + 2 * T * K, off_g + 2 * T * K, T * K * sizeof(float)));

    /* 9.6.2: no recurrent weights and biases, and z = 0 (b_iz very negative
     * with W_iz = 0): h_l does not depend on h_{l-1}, carry = off bitwise */
    float *whh = ag_param_tensor(s.r[0].gru_weight_hh)->data;
    float *bhh = ag_param_tensor(s.r[0].gru_bias_hh)->data;
    float *wih = ag_param_tensor(s.r[0].gru_weight_ih)->data;
    float *bih = ag_param_tensor(s.r[0].gru_bias_ih)->data;
    memset(whh, 0, 3 * H * H * sizeof(float));
    memset(bhh, 0, 3 * H * sizeof(float));
    memset(wih + H * H, 0, H * H * sizeof(float));
    for (int j = 0; j < H; j++) bih[H + j] = -200.0f;
    route_mode(&s, x, ROUTER_RNN_CARRY, carry_e, carry_g);
    route_mode(&s, x, ROUTER_RNN_ZERO, off_e, off_g);
    ck_assert(!memcmp(carry_e, off_e, sizeof carry_e));
    ck_assert(!memcmp(carry_g, off_g, sizeof carry_g));
    free_inputs(x);
    stack_free(&s);
}
END_TEST

/* 9.6.4: permuting the tokens permutes every layer's decisions, gates and
 * states. */
START_TEST(test_token_permutation) {
    router_config config = rmoe_config(ROUTER_RNN_CARRY);
    stack s;
    stack_init(&s, &config);
    ag_tensor *x[LAYERS], *px[LAYERS], *states[LAYERS], *pstates[LAYERS];
    make_inputs(x, T, 60, false);
    make_inputs(px, T, 60, false);
    const int perm[T] = {3, 0, 5, 1, 4, 2}; /* px row i = x row perm[i] */
    for (int l = 0; l < LAYERS; l++)
        for (int i = 0; i < T; i++)
            memcpy(px[l]->data + i * D, x[l]->data + perm[i] * D, D * sizeof(float));
    router_output out[LAYERS], pout[LAYERS];
    router_call call = eval_call();
    ag_ctx_reset(&s.ctx);
    route_stack(&s, x, &call, out, states);
    route_stack(&s, px, &call, pout, pstates);
    for (int l = 0; l < LAYERS; l++)
        for (int i = 0; i < T; i++) {
            const int t = perm[i];
            ck_assert_int_eq(pout[l].offsets[i + 1] - pout[l].offsets[i], K);
            for (int j = 0; j < K; j++) {
                ck_assert_int_eq(pout[l].expert[pout[l].offsets[i] + j],
                                 out[l].expert[out[l].offsets[t] + j]);
                ck_assert_float_eq_tol(pout[l].gates->data[pout[l].offsets[i] + j],
                                       out[l].gates->data[out[l].offsets[t] + j], 1e-6f);
            }
            for (int j = 0; j < H; j++)
                ck_assert_float_eq_tol(pstates[l]->data[i * H + j], states[l]->data[t * H + j],
                                       1e-6f);
        }
    free_inputs(x);
    free_inputs(px);
    stack_free(&s);
}
END_TEST

/* ---- gradients ------------------------------------------------------------------- */

typedef struct stack_check {
    stack *s;
    int32_t baseline[LAYERS * T * K];
    bool have_baseline;
    int flips;
} stack_check;

/* inputs: x[0..2] then the routers' tensors; output: every layer's gates
 * and the summed auxiliary losses, concatenated. */
static ag_tensor *forward_stack(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    stack_check *check = user;
    router_depth_state depth = {0};
    router_call call = {.training = true, .seed = 1, .step = 2, .depth = &depth};
    ag_tensor *parts[LAYERS + 1];
    ag_tensor *aux = NULL;
    for (int l = 0; l < LAYERS; l++) {
        router_output out;
        ck_assert_int_eq(router_route(ctx, &check->s->r[l], in[l], &call, &out), CM_OK);
        if (!check->have_baseline)
            memcpy(check->baseline + l * T * K, out.expert, T * K * sizeof(int32_t));
        else
            check->flips +=
                memcmp(check->baseline + l * T * K, out.expert, T * K * sizeof(int32_t)) != 0;
        parts[l] = out.gates;
        aux = router_add_losses(ctx, aux, out.aux_loss);
    }
    check->have_baseline = true;
    parts[LAYERS] = aux;
    return ag_concat(ctx, parts, LAYERS + 1, 0);
}

/* The smallest gap, over layers and tokens, between the k-th and (k+1)-th
 * reference logits of x through the carried stack. */
static double selection_margin(stack *s, ag_tensor *const *x) {
    double h_prev[T * H] = {0}, h[T * H], logits[T * E], margin = INFINITY;
    for (int l = 0; l < LAYERS; l++) {
        reference_layer(&s->r[l], x[l]->data, h_prev, h, logits);
        for (int t = 0; t < T; t++) {
            double kth = INFINITY, next = -INFINITY;
            for (int e = 0; e < E; e++) {
                if (ref_rank(logits + t * E, E, e) == K - 1) kth = logits[t * E + e];
                if (ref_rank(logits + t * E, E, e) == K) next = logits[t * E + e];
            }
            margin = fmin(margin, kth - next);
        }
        memcpy(h_prev, h, sizeof h);
    }
    return margin;
}

START_TEST(test_stack_gradcheck) {
    router_config config = rmoe_config(ROUTER_RNN_CARRY);
    config.init_std = 1.0f;
    stack s;
    stack_init(&s, &config);
    ag_tensor *x[LAYERS];
    /* inputs whose selection is far from a tie: the perturbations of the
     * check (eps 2e-3 on an input) cannot change it */
    uint64_t seed = 70;
    for (make_inputs(x, T, seed, true); selection_margin(&s, x) < 0.1; seed += LAYERS) {
        ck_assert_msg(seed < 70 + 300, "no inputs with a margin");
        free_inputs(x);
        make_inputs(x, T, seed + LAYERS, true);
    }
    ag_tensor *in[3 * LAYERS + 4];
    for (int l = 0; l < LAYERS; l++) {
        in[l] = x[l];
        in[LAYERS + l] = ag_param_tensor(s.r[l].proj_weight);
        in[2 * LAYERS + l] = ag_param_tensor(s.r[l].weight);
    }
    in[3 * LAYERS] = ag_param_tensor(s.r[0].gru_weight_ih);
    in[3 * LAYERS + 1] = ag_param_tensor(s.r[0].gru_weight_hh);
    in[3 * LAYERS + 2] = ag_param_tensor(s.r[0].gru_bias_ih);
    in[3 * LAYERS + 3] = ag_param_tensor(s.r[0].gru_bias_hh);
    stack_check check = {.s = &s};
    gc_options options = gc_default_options();
    options.eps = 2e-3;
    gc_result r = gc_check("rmoe stack", forward_stack, in, 3 * LAYERS + 4, &check, &options);
    ck_assert_msg(r.ok, "%s", r.message);
    ck_assert_msg(check.flips == 0, "the selection changed in %d forwards", check.flips);
    free_inputs(x);
    stack_free(&s);
}
END_TEST

/* Backward of sum(w * gates of layer `only`) (-1: of every layer). */
static void backward_layer(stack *s, ag_tensor *const *x, int only) {
    ag_params_zero_grad(&s->params);
    ag_ctx_reset(&s->ctx);
    router_output out[LAYERS];
    router_call call = {.training = true, .seed = 1, .step = 2};
    route_stack(s, x, &call, out, NULL);
    ag_tensor *loss = NULL;
    for (int l = 0; l < LAYERS; l++) {
        if (only >= 0 && l != only) continue;
        ag_tensor *w = ag_empty(&s->ctx, "upstream", 1, (int[]){T * K});
        for (int i = 0; i < T * K; i++) w->data[i] = 0.3f + 0.1f * (float)((i + l) % 7);
        ag_tensor *part = ag_sum(&s->ctx, ag_mul(&s->ctx, out[l].gates, w));
        loss = loss ? ag_add(&s->ctx, loss, part) : part;
    }
    ck_assert_int_eq(ag_backward(&s->ctx, loss), CM_OK);
}

static double grad_norm(ag_param *p) {
    double total = 0.0;
    for (int64_t i = 0; i < p->tensor.numel; i++) total += fabs(p->tensor.grad[i]);
    return total;
}

/* 9.6.5: layer 2's gates reach layer 0's projection through the carried
 * state, and not with detach or off; the shared GRU's gradient for all
 * layers is the sum of each layer's. */
START_TEST(test_detach_and_shared_gradient) {
    for (int mode = 0; mode < ROUTER_RNN_STATE_COUNT; mode++) {
        router_config config = rmoe_config((router_rnn_state)mode);
        config.aux_loss_coef = config.z_loss_coef = 0.0f;
        stack s;
        stack_init(&s, &config);
        ag_tensor *x[LAYERS];
        make_inputs(x, T, 80, false);
        backward_layer(&s, x, 2);
        const bool carry = mode == ROUTER_RNN_CARRY;
        ck_assert_int_eq(grad_norm(s.r[0].proj_weight) > 0.0, carry);
        ck_assert_int_eq(grad_norm(s.r[1].proj_weight) > 0.0, carry);
        ck_assert(grad_norm(s.r[2].proj_weight) > 0.0);
        ck_assert(grad_norm(s.r[0].weight) == 0.0);

        const int n = 3 * H * H;
        float sum[3 * H * H] = {0}, all[3 * H * H];
        for (int l = 0; l < LAYERS; l++) {
            backward_layer(&s, x, l);
            for (int i = 0; i < n; i++) sum[i] += s.r[0].gru_weight_ih->tensor.grad[i];
        }
        backward_layer(&s, x, -1);
        memcpy(all, s.r[0].gru_weight_ih->tensor.grad, sizeof all);
        for (int i = 0; i < n; i++)
            ck_assert_float_eq_tol(all[i], sum[i], 1e-5f * (1.0f + fabsf(sum[i])));
        free_inputs(x);
        stack_free(&s);
    }
}
END_TEST

int main(void) {
    Suite *suite = suite_create("routers_rmoe");
    TCase *tc = tcase_create("rmoe");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_declare_names_shapes_and_sharing);
    tcase_add_test(tc, test_validation);
    tcase_add_test(tc, test_states_and_gates_match_reference);
    tcase_add_test(tc, test_recurrence_matters_and_reduces);
    tcase_add_test(tc, test_token_permutation);
    tcase_add_test(tc, test_stack_gradcheck);
    tcase_add_test(tc, test_detach_and_shared_gradient);
    suite_add_tcase(suite, tc);
    SRunner *runner = srunner_create(suite);
    srunner_run_all(runner, CK_NORMAL);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
