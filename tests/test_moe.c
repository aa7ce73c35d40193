/* The MoE layer: gradient checks through every router (input, router
 * weights, expert weights and biases), equivalence with a dense MLP, dispatch
 * with skewed routing, and capacity dropping end to end; SwiGLU experts
 * (gradients, values of LLaMA's MLP) and the experts' dropout (gradients
 * with its mask, masks independent of how tokens are split into calls, p = 0
 * and evaluation unchanged, the fraction dropped and the scaling). */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "gradcheck.h"
#include "layers/moe.h"

enum { T = 7, D = 6, H = 5, E = 4 };

typedef struct moe_case {
    moe_layer layer;
    router_call call;
    ag_params params;
} moe_case;

static router_config base_router(router_kind kind) {
    router_config c = {.kind = kind,
                       .num_experts = E,
                       .k = 2,
                       .gating = ROUTER_SOFTMAX_THEN_TOPK,
                       .init_std = 0.5f,
                       .top_p = 0.6f,
                       .k_schedule = {ROUTER_K_CONSTANT, 2, 2, 100},
                       .thor_level = ROUTER_THOR_PER_SEQUENCE};
    return c;
}

/* The experts' activation and dropout for build(). */
typedef struct expert_kind {
    ag_activation activation;
    float dropout;
} expert_kind;

static void build_experts(moe_case *c, const router_config *router_cfg, uint64_t seed,
                          expert_kind experts) {
    moe_config config = {.d_model = D,
                         .hidden = H,
                         .activation = experts.activation,
                         .expert_dropout = experts.dropout,
                         .init_std = 0.5f,
                         .out_std = 0.5f,
                         .router = *router_cfg};
    ag_params_init(&c->params);
    ck_assert_msg(moe_declare(&c->layer, &config, 0, &c->params, "moe") == CM_OK, "%s",
                  cm_error_message());
    ck_assert_int_eq(ag_params_finalize(&c->params, seed), CM_OK);
    /* Non-zero biases so their gradients are exercised. */
    cm_rng_fill_uniform((cm_rng_key){seed, 0, 1, CM_RNG_TEST}, 0, c->layer.b1->tensor.numel, -0.3f,
                        0.3f, c->layer.b1->tensor.data);
    cm_rng_fill_uniform((cm_rng_key){seed, 0, 2, CM_RNG_TEST}, 0, c->layer.b2->tensor.numel, -0.3f,
                        0.3f, c->layer.b2->tensor.data);
    ck_assert((c->layer.w3 != NULL) == (experts.activation == AG_ACT_SWIGLU));
    if (c->layer.b3)
        cm_rng_fill_uniform((cm_rng_key){seed, 0, 3, CM_RNG_TEST}, 0, c->layer.b3->tensor.numel,
                            -0.3f, 0.3f, c->layer.b3->tensor.data);
    c->call = (router_call){.training = true, .seed = 3, .step = 5, .seq_len = T};
}

static void build(moe_case *c, const router_config *router_cfg, uint64_t seed) {
    build_experts(c, router_cfg, seed, (expert_kind){AG_ACT_GELU, 0.0f});
}

/* The minimum, over tokens, of the distance that decides the selection:
 * k-th minus (k+1)-th logit for top-k; |cumulative probability - p| for top-p. */
static double selection_margin(const moe_case *c, const ag_tensor *x) {
    const router_config *r = &c->layer.router.config;
    const float *w = c->layer.router.weight->tensor.data;
    double margin = 1e9;
    if (r->kind == ROUTER_EXPERT_CHOICE) {
        /* Each expert's c-th versus (c+1)-th token probability. */
        double prob[T][E];
        for (int t = 0; t < T; t++) {
            double logit[E], max = -1e30, total = 0;
            for (int e = 0; e < E; e++) {
                logit[e] = 0;
                for (int i = 0; i < D; i++) logit[e] += (double)w[e * D + i] * x->data[t * D + i];
                max = fmax(max, logit[e]);
            }
            for (int e = 0; e < E; e++) total += exp(logit[e] - max);
            for (int e = 0; e < E; e++) prob[t][e] = exp(logit[e] - max) / total;
        }
        int capacity = (int)ceil(T * r->capacity_factor / E);
        for (int e = 0; e < E; e++) {
            double column[T];
            for (int t = 0; t < T; t++) column[t] = prob[t][e];
            for (int i = 0; i < T; i++)
                for (int j = i + 1; j < T; j++)
                    if (column[j] > column[i]) {
                        double tmp = column[i];
                        column[i] = column[j];
                        column[j] = tmp;
                    }
            if (capacity < T) margin = fmin(margin, column[capacity - 1] - column[capacity]);
        }
        /* A softmax probability moves by at most 1/4 of a logit change, so a
         * probability margin m is as safe as a logit margin 4m. */
        return 4.0 * margin;
    }
    for (int t = 0; t < T; t++) {
        double logit[E], sorted[E];
        for (int e = 0; e < E; e++) {
            logit[e] = 0;
            for (int i = 0; i < D; i++) logit[e] += (double)w[e * D + i] * x->data[t * D + i];
            sorted[e] = logit[e];
        }
        for (int i = 0; i < E; i++)
            for (int j = i + 1; j < E; j++)
                if (sorted[j] > sorted[i]) {
                    double tmp = sorted[i];
                    sorted[i] = sorted[j];
                    sorted[j] = tmp;
                }
        if (r->kind == ROUTER_TOP_P) {
            double total = 0, cumulative = 0;
            for (int e = 0; e < E; e++) total += exp(sorted[e] - sorted[0]);
            for (int e = 0; e < E; e++) {
                /* The order decides which experts form the prefix. */
                if (e + 1 < E) margin = fmin(margin, sorted[e] - sorted[e + 1]);
                cumulative += exp(sorted[e] - sorted[0]) / total;
                /* A subset sum of softmax probabilities moves by at most half
                 * the largest logit change. */
                margin = fmin(margin, 2.0 * fabs(cumulative - r->top_p));
            }
        } else {
            margin = fmin(margin, sorted[r->k - 1] - sorted[r->k]);
        }
    }
    return margin;
}

static ag_tensor *forward_moe(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    moe_case *c = user;
    moe_result result;
    if (moe_forward(ctx, &c->layer, in[0], &c->call, &result) != CM_OK) return NULL;
    if (!result.aux_loss) return result.out;
    /* Output and auxiliary loss together, so both are checked. */
    ag_tensor *flat = ag_reshape(ctx, result.out, 1, (int[]){T * D});
    ag_tensor *parts[2] = {flat, result.aux_loss};
    return ag_concat(ctx, parts, 2, 0);
}

/* Gradcheck w.r.t. x, the router weight and all expert tensors (four, six
 * with SwiGLU). With expert dropout the mask is a function of the call's
 * key and the tokens, so every perturbed forward draws the same one. */
static void check_experts(const char *label, router_config router_cfg, expert_kind experts) {
    moe_case c;
    ag_tensor *x = NULL;
    uint64_t seed = 1;
    for (;; seed++) { /* a deterministic search for inputs with a clear margin */
        build_experts(&c, &router_cfg, seed, experts);
        x = gc_tensor_new(2, (int[]){T, D}, -1, 1, 100 + seed, true);
        if (router_cfg.kind == ROUTER_THOR || selection_margin(&c, x) > 0.08) break;
        gc_tensor_free(x);
        ag_params_free(&c.params);
        ck_assert_int_lt(seed, 500);
    }
    ag_tensor *inputs[8] = {
        x,   &c.layer.w1->tensor, &c.layer.b1->tensor, &c.layer.w2->tensor, &c.layer.b2->tensor,
        NULL};
    int n = 5;
    if (c.layer.router.weight) inputs[n++] = &c.layer.router.weight->tensor;
    if (c.layer.w3) {
        inputs[n++] = &c.layer.w3->tensor;
        inputs[n++] = &c.layer.b3->tensor;
    }
    gc_options options = gc_default_options();
    options.eps = 5e-3; /* keeps every perturbed logit inside the margin */
    gc_result r = gc_check(label, forward_moe, inputs, n, &c, &options);
    ck_assert_msg(r.ok, "%s", r.message);
    gc_tensor_free(x);
    ag_params_free(&c.params);
}

static void check_router(const char *label, router_config router_cfg) {
    check_experts(label, router_cfg, (expert_kind){AG_ACT_GELU, 0.0f});
}

START_TEST(test_grad_topk_softmax_then_topk) {
    router_config r = base_router(ROUTER_TOPK);
    r.aux_loss_coef = 0.1f;
    r.z_loss_coef = 0.01f;
    check_router("moe topk softmax->topk", r);
}
END_TEST

START_TEST(test_grad_topk_topk_then_softmax) {
    router_config r = base_router(ROUTER_TOPK);
    r.gating = ROUTER_TOPK_THEN_SOFTMAX;
    r.aux_loss_coef = 0.1f;
    check_router("moe topk topk->softmax", r);
}
END_TEST

START_TEST(test_grad_switch_top1) {
    router_config r = base_router(ROUTER_TOPK);
    r.k = 1;
    r.aux_loss_coef = 0.1f;
    check_router("moe switch", r);
}
END_TEST

START_TEST(test_grad_smoe_dropout) {
    router_config r = base_router(ROUTER_SMOE_DROPOUT);
    r.k_schedule = (router_k_schedule){ROUTER_K_LINEAR_INCREASE, 1, 3, 10};
    check_router("moe smoe-dropout", r); /* frozen router: not among the checked inputs' grads */
}
END_TEST

START_TEST(test_grad_top_p) {
    router_config r = base_router(ROUTER_TOP_P);
    r.aux_loss_coef = 0.1f;
    r.entropy_coef = 0.05f;
    check_router("moe top-p", r);
}
END_TEST

START_TEST(test_grad_thor) {
    check_router("moe thor", base_router(ROUTER_THOR));
}
END_TEST

START_TEST(test_grad_expert_choice) {
    router_config r = base_router(ROUTER_EXPERT_CHOICE);
    r.capacity_factor = 1.0f;
    check_router("moe expert choice", r);
}
END_TEST

/* The dense MLP of the same weights: x W1^T + b1 -> gelu -> W2^T + b2. */
static ag_tensor *dense_mlp(ag_ctx *ctx, ag_tensor *x, const moe_layer *layer, int expert) {
    ag_tensor w1 =
        ag_tensor_wrap(layer->w1->tensor.data + expert * H * D, NULL, 2, (int[]){H, D}, false);
    ag_tensor b1 = ag_tensor_wrap(layer->b1->tensor.data + expert * H, NULL, 1, (int[]){H}, false);
    ag_tensor w2 =
        ag_tensor_wrap(layer->w2->tensor.data + expert * D * H, NULL, 2, (int[]){D, H}, false);
    ag_tensor b2 = ag_tensor_wrap(layer->b2->tensor.data + expert * D, NULL, 1, (int[]){D}, false);
    return ag_linear(ctx, ag_gelu(ctx, ag_linear(ctx, x, &w1, &b1)), &w2, &b2);
}

START_TEST(test_one_expert_equals_dense_mlp) {
    router_config r = base_router(ROUTER_TOPK);
    r.num_experts = 1;
    r.k = 1;
    moe_case c;
    build(&c, &r, 9);
    ag_tensor *x = gc_tensor_new(2, (int[]){T, D}, -1, 1, 10, false);
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, 1 << 20), CM_OK);
    moe_result result;
    ck_assert_int_eq(moe_forward(&ctx, &c.layer, x, &c.call, &result), CM_OK);
    ag_tensor *dense = dense_mlp(&ctx, x, &c.layer, 0);
    for (int i = 0; i < T * D; i++)
        ck_assert_float_eq_tol(result.out->data[i], dense->data[i], 1e-6f);
    ag_ctx_free(&ctx);
    gc_tensor_free(x);
    ag_params_free(&c.params);
}
END_TEST

START_TEST(test_identical_experts_with_renormalised_gates_equal_one_mlp) {
    router_config r = base_router(ROUTER_TOPK);
    r.gating = ROUTER_TOPK_THEN_SOFTMAX;
    r.k = 3;
    moe_case c;
    build(&c, &r, 11);
    for (int e = 1; e < E; e++) { /* every expert a copy of expert 0 */
        memcpy(c.layer.w1->tensor.data + e * H * D, c.layer.w1->tensor.data, H * D * sizeof(float));
        memcpy(c.layer.b1->tensor.data + e * H, c.layer.b1->tensor.data, H * sizeof(float));
        memcpy(c.layer.w2->tensor.data + e * D * H, c.layer.w2->tensor.data, D * H * sizeof(float));
        memcpy(c.layer.b2->tensor.data + e * D, c.layer.b2->tensor.data, D * sizeof(float));
    }
    ag_tensor *x = gc_tensor_new(2, (int[]){T, D}, -1, 1, 12, false);
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, 1 << 20), CM_OK);
    moe_result result;
    ck_assert_int_eq(moe_forward(&ctx, &c.layer, x, &c.call, &result), CM_OK);
    ck_assert_int_eq(result.n_slots, 3 * T);
    ag_tensor *dense = dense_mlp(&ctx, x, &c.layer, 0);
    for (int i = 0; i < T * D; i++)
        ck_assert_float_eq_tol(result.out->data[i], dense->data[i], 1e-5f);
    ag_ctx_free(&ctx);
    gc_tensor_free(x);
    ag_params_free(&c.params);
}
END_TEST

/* Every token to one expert (a router row far above the others): the other
 * experts get zero rows and the output is that expert's MLP times its gate. */
START_TEST(test_all_tokens_to_one_expert) {
    router_config r = base_router(ROUTER_TOPK);
    r.k = 1;
    moe_case c;
    build(&c, &r, 13);
    float *w = c.layer.router.weight->tensor.data;
    memset(w, 0, E * D * sizeof(float));
    ag_tensor *x = gc_tensor_new(2, (int[]){T, D}, 0.5f, 1.0f, 14, false); /* positive */
    for (int i = 0; i < D; i++) w[2 * D + i] = 3.0f;                       /* expert 2 wins */
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, 1 << 20), CM_OK);
    moe_result result;
    ck_assert_int_eq(moe_forward(&ctx, &c.layer, x, &c.call, &result), CM_OK);
    ck_assert_int_eq(result.stats.tokens_per_expert[2], T);
    ck_assert_int_eq(result.stats.tokens_per_expert[0] + result.stats.tokens_per_expert[1] +
                         result.stats.tokens_per_expert[3],
                     0);
    ag_tensor *dense = dense_mlp(&ctx, x, &c.layer, 2);
    for (int t = 0; t < T; t++) {
        double logit = 0;
        for (int i = 0; i < D; i++) logit += 3.0 * x->data[t * D + i];
        double gate = 1.0 / (1.0 + 3.0 * exp(-logit)); /* softmax prob of expert 2 */
        for (int i = 0; i < D; i++)
            ck_assert_double_eq_tol(result.out->data[t * D + i], gate * dense->data[t * D + i],
                                    1e-5);
    }
    ag_ctx_free(&ctx);
    gc_tensor_free(x);
    ag_params_free(&c.params);
}
END_TEST

START_TEST(test_grad_swiglu) {
    router_config r = base_router(ROUTER_TOPK);
    r.aux_loss_coef = 0.1f;
    check_experts("moe swiglu", r, (expert_kind){AG_ACT_SWIGLU, 0.0f});
}
END_TEST

START_TEST(test_grad_expert_dropout) {
    router_config r = base_router(ROUTER_TOPK);
    r.aux_loss_coef = 0.1f;
    check_experts("moe gelu, expert dropout", r, (expert_kind){AG_ACT_GELU, 0.3f});
    check_experts("moe swiglu, expert dropout", base_router(ROUTER_TOP_P),
                  (expert_kind){AG_ACT_SWIGLU, 0.3f});
}
END_TEST

/* One expert, top-1: the layer is LLaMA's MLP with biases,
 * W2 (silu(W1 x + b1) * (W3 x + b3)) + b2, computed here in double. */
START_TEST(test_swiglu_one_expert_is_llama_mlp) {
    router_config r = base_router(ROUTER_TOPK);
    r.num_experts = 1;
    r.k = 1;
    moe_case c;
    build_experts(&c, &r, 9, (expert_kind){AG_ACT_SWIGLU, 0.0f});
    ag_tensor *x = gc_tensor_new(2, (int[]){T, D}, -1, 1, 10, false);
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, 1 << 20), CM_OK);
    moe_result result;
    ck_assert_int_eq(moe_forward(&ctx, &c.layer, x, &c.call, &result), CM_OK);
    const float *w1 = c.layer.w1->tensor.data, *b1 = c.layer.b1->tensor.data;
    const float *w3 = c.layer.w3->tensor.data, *b3 = c.layer.b3->tensor.data;
    const float *w2 = c.layer.w2->tensor.data, *b2 = c.layer.b2->tensor.data;
    for (int t = 0; t < T; t++) {
        double hidden[H];
        for (int j = 0; j < H; j++) {
            double gate = b1[j], up = b3[j];
            for (int i = 0; i < D; i++) {
                gate += (double)w1[j * D + i] * x->data[t * D + i];
                up += (double)w3[j * D + i] * x->data[t * D + i];
            }
            hidden[j] = gate / (1.0 + exp(-gate)) * up;
        }
        for (int o = 0; o < D; o++) {
            double want = b2[o];
            for (int j = 0; j < H; j++) want += (double)w2[o * H + j] * hidden[j];
            ck_assert_double_eq_tol(result.out->data[t * D + o], want, 1e-5);
        }
    }
    ag_ctx_free(&ctx);
    gc_tensor_free(x);
    ag_params_free(&c.params);
}
END_TEST

/* out [rows,D] of a call on rows [first, first + rows) of x, as the tokens
 * first_token + first, ... */
static void forward_rows(moe_case *c, const ag_tensor *x, int first, int rows, uint64_t first_token,
                         float *out) {
    ag_tensor part = ag_tensor_wrap(x->data + first * D, NULL, 2, (int[]){rows, D}, false);
    router_call call = c->call;
    call.first_token = first_token + (uint64_t)first;
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, 1 << 20), CM_OK);
    moe_result result;
    ck_assert_int_eq(moe_forward(&ctx, &c->layer, &part, &call, &result), CM_OK);
    memcpy(out, result.out->data, (size_t)rows * D * sizeof(float));
    ag_ctx_free(&ctx);
}

static double max_difference(const float *a, const float *b, int n) {
    double worst = 0.0;
    for (int i = 0; i < n; i++) worst = fmax(worst, fabs((double)a[i] - b[i]));
    return worst;
}

/* The rank-independence property: the same tokens, run as one call or split
 * into two calls (as two ranks would hold them, with their first_token),
 * get the same masks, so the same outputs; another step or THOR pass draws
 * other masks. */
START_TEST(test_expert_dropout_masks_do_not_depend_on_the_split) {
    for (int a = 0; a < 2; a++) {
        router_config r = base_router(ROUTER_TOPK);
        moe_case c;
        build_experts(&c, &r, 21, (expert_kind){a ? AG_ACT_SWIGLU : AG_ACT_GELU, 0.5f});
        ag_tensor *x = gc_tensor_new(2, (int[]){T, D}, -1, 1, 22, false);
        float whole[T * D], split[T * D], other[T * D], eval[T * D];
        forward_rows(&c, x, 0, T, 40, whole);
        forward_rows(&c, x, 0, 3, 40, split);
        forward_rows(&c, x, 3, T - 3, 40, split + 3 * D);
        ck_assert_msg(max_difference(whole, split, T * D) <= 1e-6, "%s: split calls differ by %g",
                      ag_activation_names[c.layer.config.activation],
                      max_difference(whole, split, T * D));
        /* the dropout is on, and keyed by the global token, step and pass */
        c.call.training = false;
        forward_rows(&c, x, 0, T, 40, eval);
        ck_assert_double_gt(max_difference(whole, eval, T * D), 1e-2);
        c.call.training = true;
        forward_rows(&c, x, 0, T, 41, other);
        ck_assert_double_gt(max_difference(whole, other, T * D), 1e-2);
        c.call.step++;
        forward_rows(&c, x, 0, T, 40, other);
        ck_assert_double_gt(max_difference(whole, other, T * D), 1e-2);
        c.call.step--;
        c.call.pass = 1;
        forward_rows(&c, x, 0, T, 40, other);
        ck_assert_double_gt(max_difference(whole, other, T * D), 1e-2);
        gc_tensor_free(x);
        ag_params_free(&c.params);
    }
}
END_TEST

/* p = 0 is today's layer bit for bit (the plain ops on the one expert's
 * rows, gate 1), and so is p > 0 at evaluation: dropout is for training. */
START_TEST(test_expert_dropout_zero_and_evaluation_unchanged) {
    router_config r = base_router(ROUTER_TOPK);
    r.num_experts = 1;
    r.k = 1;
    ag_tensor *x = gc_tensor_new(2, (int[]){T, D}, -1, 1, 31, false);
    float outputs[3][T * D];
    const expert_kind kinds[3] = {{AG_ACT_GELU, 0.0f}, {AG_ACT_GELU, 0.4f}, {AG_ACT_GELU, 0.4f}};
    for (int i = 0; i < 3; i++) {
        moe_case c;
        build_experts(&c, &r, 32, kinds[i]);
        c.call.training = i != 1;
        forward_rows(&c, x, 0, T, 0, outputs[i]);
        if (i == 0) {
            ag_ctx ctx;
            ck_assert_int_eq(ag_ctx_init(&ctx, 1 << 20), CM_OK);
            const int32_t all_rows[2] = {0, T};
            ag_tensor *h = ag_grouped_linear(&ctx, x, ag_param_tensor(c.layer.w1),
                                             ag_param_tensor(c.layer.b1), all_rows);
            ag_tensor *y = ag_grouped_linear_act(&ctx, h, AG_ACT_GELU, ag_param_tensor(c.layer.w2),
                                                 ag_param_tensor(c.layer.b2), all_rows);
            ck_assert_int_eq(memcmp(outputs[0], y->data, sizeof outputs[0]), 0);
            ag_ctx_free(&ctx);
        }
        ag_params_free(&c.params);
    }
    ck_assert_int_eq(memcmp(outputs[0], outputs[1], sizeof outputs[0]), 0);
    ck_assert_double_gt(max_difference(outputs[0], outputs[2], T * D), 1e-2); /* training */
    gc_tensor_free(x);
}
END_TEST

/* A large layer whose second matrix is the identity shows the hidden units:
 * about a fraction p of them are zero in training, and the others are the
 * evaluation values times 1/(1-p). */
START_TEST(test_expert_dropout_fraction_and_scale) {
    enum { TOKENS = 512, WIDTH = 64 };
    const float p = 0.3f;
    router_config r = base_router(ROUTER_TOPK);
    r.num_experts = 1;
    r.k = 1;
    moe_config config = {.d_model = WIDTH,
                         .hidden = WIDTH,
                         .activation = AG_ACT_GELU,
                         .expert_dropout = p,
                         .init_std = 0.05f, /* h of std ~0.25: GELU(h) is never 0 */
                         .out_std = 0.5f,
                         .router = r};
    ag_params params;
    ag_params_init(&params);
    moe_layer layer;
    ck_assert_int_eq(moe_declare(&layer, &config, 2, &params, "moe"), CM_OK);
    ck_assert_int_eq(ag_params_finalize(&params, 5), CM_OK);
    float *w2 = layer.w2->tensor.data;
    memset(w2, 0, WIDTH * WIDTH * sizeof(float));
    for (int i = 0; i < WIDTH; i++) w2[i * WIDTH + i] = 1.0f;
    ag_tensor *x = gc_tensor_new(2, (int[]){TOKENS, WIDTH}, -1, 1, 6, false);
    float *outputs[2];
    for (int training = 0; training < 2; training++) {
        router_call call = {.training = training, .seed = 8, .step = 3, .seq_len = 16};
        ag_ctx ctx;
        ck_assert_int_eq(ag_ctx_init(&ctx, 16 << 20), CM_OK);
        moe_result result;
        ck_assert_int_eq(moe_forward(&ctx, &layer, x, &call, &result), CM_OK);
        outputs[training] = malloc(TOKENS * WIDTH * sizeof(float));
        memcpy(outputs[training], result.out->data, TOKENS * WIDTH * sizeof(float));
        ag_ctx_free(&ctx);
    }
    int dropped = 0;
    for (int i = 0; i < TOKENS * WIDTH; i++) {
        float unit = outputs[0][i], trained = outputs[1][i];
        ck_assert_msg(unit != 0.0f, "unit %d is 0 at evaluation (%g in training)", i, trained);
        if (trained == 0.0f)
            dropped++;
        else
            ck_assert_msg(fabsf(trained - unit / (1.0f - p)) <= 1e-5f * fabsf(unit) + 1e-7f,
                          "unit %d: %g in training, %g at evaluation", i, trained, unit);
    }
    /* 32768 units: the standard deviation of the fraction is 0.0025 */
    double fraction = (double)dropped / (TOKENS * WIDTH);
    ck_assert_msg(fabs(fraction - p) < 0.01, "dropped %.4f of the units, p = %g", fraction, p);
    free(outputs[0]);
    free(outputs[1]);
    gc_tensor_free(x);
    ag_params_free(&params);
}
END_TEST

int main(void) {
    Suite *suite = suite_create("moe");
    TCase *tc = tcase_create("moe layer");
    tcase_add_test(tc, test_grad_topk_softmax_then_topk);
    tcase_add_test(tc, test_grad_topk_topk_then_softmax);
    tcase_add_test(tc, test_grad_switch_top1);
    tcase_add_test(tc, test_grad_smoe_dropout);
    tcase_add_test(tc, test_grad_top_p);
    tcase_add_test(tc, test_grad_thor);
    tcase_add_test(tc, test_grad_expert_choice);
    tcase_add_test(tc, test_one_expert_equals_dense_mlp);
    tcase_add_test(tc, test_identical_experts_with_renormalised_gates_equal_one_mlp);
    tcase_add_test(tc, test_all_tokens_to_one_expert);
    tcase_add_test(tc, test_grad_swiglu);
    tcase_add_test(tc, test_grad_expert_dropout);
    tcase_add_test(tc, test_swiglu_one_expert_is_llama_mlp);
    tcase_add_test(tc, test_expert_dropout_masks_do_not_depend_on_the_split);
    tcase_add_test(tc, test_expert_dropout_zero_and_evaluation_unchanged);
    tcase_add_test(tc, test_expert_dropout_fraction_and_scale);
    tcase_set_timeout(tc, 120);
    suite_add_tcase(suite, tc);
    SRunner *runner = srunner_create(suite);
    srunner_run_all(runner, CK_NORMAL);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
