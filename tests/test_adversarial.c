/* Tests for the attacks and the TRADES loss of train/adversarial.c, on a
 * linear classifier:
 * - PGD on a linear classifier with known weights: raises the loss above the
 *   clean one and above a random perturbation of the same size; every pixel
 *   stays in the eps-ball and in [0,1]; deterministic given the key and the
 *   element index;
 * - FGSM equals a hand-computed x + eps sign(grad) and one PGD step without
 *   random start;
 * - the attack leaves parameter values and gradients, requires_grad flags,
 *   grad mode, the arena and a caller's pending tape as they were;
 * - the TRADES KL attack raises the KL objective;
 * - the TRADES loss against a direct computation, and its gradient check
 *   w.r.t. both logits and w.r.t. parameters with a fixed x_adv;
 * - configuration and arena errors.
 * The attacks on CNNs and adv_moe_cnn_evaluate are in
 * test_adversarial_cnn.c. */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "gradcheck.h"
#include "train/adversarial.h"

/* after the project headers: it defines the one-letter batch shape N, H, W, D, V */
#include "adv_testutil.h"

enum { ARENA_BYTES = 32 << 20 };

/* ---- a linear classifier: logits = flatten(x) w^T + b ------------------------------ */

typedef struct linear_model {
    ag_params params;
    ag_param *w, *b; /* [V,D], [V] */
} linear_model;

static void linear_setup(linear_model *m, uint64_t seed) {
    ag_params_init(&m->params);
    ag_init init = {AG_INIT_UNIFORM, -1.0f, 1.0f};
    ck_assert_int_eq(
        ag_params_declare(&m->params, "w", AG_GROUP_DENSE, 2, (int[]){V, D}, init, &m->w), CM_OK);
    ck_assert_int_eq(ag_params_declare(&m->params, "b", AG_GROUP_DENSE, 1, (int[]){V}, init, &m->b),
                     CM_OK);
    ck_assert_int_eq(ag_params_finalize(&m->params, seed), CM_OK);
}

static cm_status linear_forward(ag_ctx *ctx, void *model, ag_tensor *x, bool bn_training,
                                adv_model_output *out) {
    (void)bn_training;
    linear_model *m = model;
    *out = (adv_model_output){0};
    ag_tensor *flat = ag_reshape(ctx, x, 2, (int[]){x->shape[0], -1});
    out->logits = ag_linear(ctx, flat, ag_param_tensor(m->w), ag_param_tensor(m->b));
    return ag_ctx_status(ctx);
}

static adv_model linear_binding(linear_model *m) {
    return (adv_model){.forward = linear_forward, .model = m, .params = &m->params};
}

/* logits [N,V] in double */
static void linear_logits(const linear_model *m, const float *x, double *logits) {
    const float *w = m->w->tensor.data, *b = m->b->tensor.data;
    for (int n = 0; n < N; n++)
        for (int v = 0; v < V; v++) {
            double total = b[v];
            for (int d = 0; d < D; d++) total += (double)w[v * D + d] * x[n * D + d];
            logits[n * V + v] = total;
        }
}

static double mean_ce(const double *logits, const int32_t *labels, int rows, int classes) {
    double total = 0.0, p[16];
    for (int n = 0; n < rows; n++) {
        softmax_row(logits + n * classes, classes, p);
        total -= log(p[labels[n]]);
    }
    return total / rows;
}

static const int32_t labels[N] = {0, 3, 1, 2, 3, 0};

/* Clean images in [0,1] with pixels on and near both bounds. */
static ag_tensor *clean_images(uint64_t seed) {
    ag_tensor *x = gc_tensor_new(4, (int[]){N, 1, H, W}, 0.0f, 1.0f, seed, false);
    x->data[0] = 0.0f;
    x->data[1] = 1.0f;
    x->data[2] = 0.03f;
    x->data[3] = 0.98f;
    x->data[D + 4] = 0.0f;
    x->data[2 * D + 5] = 1.0f;
    return x;
}

START_TEST(test_pgd_raises_loss) {
    linear_model m;
    linear_setup(&m, 1);
    adv_model model = linear_binding(&m);
    ag_tensor *x = clean_images(2);
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    const float eps = 0.1f;
    adv_attack_config config =
        adv_pgd_config(eps, 0.025f, 10, (cm_rng_key){3, 0, 0, CM_RNG_ATTACK});
    float x_adv[N * D], x_random[N * D];
    ck_assert_int_eq(adv_attack(&ctx, &model, &config, x, labels, 0, x_adv), CM_OK);
    expect_in_ball(x->data, x_adv, N * D, eps);
    random_perturbation(x->data, N * D, eps, 4, x_random);
    double logits[N * V];
    linear_logits(&m, x->data, logits);
    double clean = mean_ce(logits, labels, N, V);
    linear_logits(&m, x_random, logits);
    double random = mean_ce(logits, labels, N, V);
    linear_logits(&m, x_adv, logits);
    double attacked = mean_ce(logits, labels, N, V);
    ck_assert_msg(attacked > clean + 0.1 && attacked > random + 0.1,
                  "CE clean %g, random %g, PGD %g", clean, random, attacked);
    /* For a linear model the worst case in the box is known per image: move
     * each pixel by eps along the sign of the gradient of its CE at the
     * optimum. PGD must come close to the best corner's loss. */
    double best = 0.0;
    for (int n = 0; n < N; n++) {
        /* the worst class margin: max over wrong classes v of the loss with
         * x moved to maximise logit v - logit y */
        double worst = 0.0;
        for (int v = 0; v < V; v++) {
            if (v == labels[n]) continue;
            float moved[D];
            for (int d = 0; d < D; d++) {
                float direction = m.w->tensor.data[v * D + d] - m.w->tensor.data[labels[n] * D + d];
                float target = x->data[n * D + d] + (direction > 0 ? eps : -eps);
                moved[d] = fminf(fmaxf(target, 0.0f), 1.0f);
            }
            double row[V], p[V];
            for (int u = 0; u < V; u++) {
                row[u] = m.b->tensor.data[u];
                for (int d = 0; d < D; d++)
                    row[u] += (double)m.w->tensor.data[u * D + d] * moved[d];
            }
            softmax_row(row, V, p);
            worst = fmax(worst, -log(p[labels[n]]));
        }
        best += worst / N;
    }
    ck_assert_msg(attacked >= 0.9 * best, "PGD %g, best single-class corner %g", attacked, best);
    gc_tensor_free(x);
    ag_ctx_free(&ctx);
    ag_params_free(&m.params);
}
END_TEST

START_TEST(test_fgsm) {
    linear_model m;
    linear_setup(&m, 5);
    adv_model model = linear_binding(&m);
    ag_tensor *x = clean_images(6);
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    const float eps = 0.07f;
    float fgsm[N * D], pgd_step[N * D];
    adv_attack_config config = adv_fgsm_config(eps);
    ck_assert_int_eq(adv_attack(&ctx, &model, &config, x, labels, 0, fgsm), CM_OK);
    /* d mean CE / dx[n] = (1/N) w^T (softmax(logits[n]) - onehot(y[n])) */
    double logits[N * V], p[V];
    linear_logits(&m, x->data, logits);
    for (int n = 0; n < N; n++) {
        softmax_row(logits + n * V, V, p);
        p[labels[n]] -= 1.0;
        for (int d = 0; d < D; d++) {
            double g = 0.0;
            for (int v = 0; v < V; v++) g += p[v] * m.w->tensor.data[v * D + d];
            ck_assert(fabs(g) > 1e-6); /* the sign is well defined */
            float x0 = x->data[n * D + d];
            float want = fminf(fmaxf(x0 + (g > 0 ? eps : -eps), 0.0f), 1.0f);
            ck_assert_msg(fabsf(fgsm[n * D + d] - want) <= 1e-7f, "pixel %d: %g want %g", n * D + d,
                          fgsm[n * D + d], want);
        }
    }
    adv_attack_config one_step = adv_pgd_config(eps, eps, 1, (cm_rng_key){0});
    one_step.start = ADV_START_NONE;
    ck_assert_int_eq(adv_attack(&ctx, &model, &one_step, x, labels, 0, pgd_step), CM_OK);
    ck_assert_mem_eq(fgsm, pgd_step, sizeof fgsm);
    gc_tensor_free(x);
    ag_ctx_free(&ctx);
    ag_params_free(&m.params);
}
END_TEST

START_TEST(test_attack_leaves_state) {
    linear_model m;
    linear_setup(&m, 7);
    adv_model model = linear_binding(&m);
    ag_tensor *x = clean_images(8);
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    const ag_param_buffer *buffer = &m.params.buffers[AG_GROUP_DENSE];
    float *values = malloc(buffer->numel * sizeof(float));
    memcpy(values, buffer->data, buffer->numel * sizeof(float));
    /* A caller's pending graph: y = sum(2 w), not yet differentiated. */
    ag_tensor *pending = ag_sum(&ctx, ag_scale(&ctx, ag_param_tensor(m.w), 2.0f));
    const size_t used = ctx.arena.used;
    const int64_t tape_length = ctx.tape_length;
    float x_adv[N * D];
    adv_attack_config configs[3] = {
        adv_pgd_config(0.1f, 0.03f, 4, (cm_rng_key){9, 0, 0, CM_RNG_ATTACK}), adv_fgsm_config(0.1f),
        adv_trades_config(0.1f, 0.05f, 2, 0.0f, (cm_rng_key){9, 1, 0, CM_RNG_ATTACK})};
    for (int k = 0; k < 3; k++) {
        ck_assert_int_eq(adv_attack(&ctx, &model, &configs[k], x, labels, 0, x_adv), CM_OK);
        for (size_t i = 0; i < buffer->numel; i++) {
            ck_assert_float_eq(buffer->grad[i], 0.0f);
            ck_assert_float_eq(buffer->data[i], values[i]);
        }
        ck_assert(m.w->tensor.requires_grad && m.b->tensor.requires_grad);
        ck_assert_uint_eq(ctx.arena.used, used);
        ck_assert_int_eq(ctx.tape_length, tape_length);
        ck_assert(ctx.grad_enabled);
    }
    /* The caller's graph still differentiates: dy/dw = 2, nothing reached b. */
    ck_assert_int_eq(ag_backward(&ctx, pending), CM_OK);
    for (int64_t i = 0; i < m.w->tensor.numel; i++) ck_assert_float_eq(m.w->tensor.grad[i], 2.0f);
    for (int64_t i = 0; i < m.b->tensor.numel; i++) ck_assert_float_eq(m.b->tensor.grad[i], 0.0f);
    /* Each iteration frees its tape and activations: 20 steps peak at the
     * arena use of one. */
    size_t peak[2];
    for (int k = 0; k < 2; k++) {
        ag_ctx fresh;
        ck_assert_int_eq(ag_ctx_init(&fresh, ARENA_BYTES), CM_OK);
        adv_attack_config steps = configs[0];
        steps.steps = k ? 20 : 1;
        ck_assert_int_eq(adv_attack(&fresh, &model, &steps, x, labels, 0, x_adv), CM_OK);
        peak[k] = fresh.arena.high_water;
        ag_ctx_free(&fresh);
    }
    ck_assert_uint_eq(peak[1], peak[0]);
    /* An evaluation caller in no-grad mode gets the same attack back, and
     * stays in no-grad mode. */
    float again[N * D];
    ag_ctx_reset(&ctx);
    ck_assert_int_eq(adv_attack(&ctx, &model, &configs[0], x, labels, 0, x_adv), CM_OK);
    ag_set_grad_enabled(&ctx, false);
    ck_assert_int_eq(adv_attack(&ctx, &model, &configs[0], x, labels, 0, again), CM_OK);
    ck_assert(!ctx.grad_enabled);
    ck_assert_mem_eq(x_adv, again, sizeof again);
    free(values);
    gc_tensor_free(x);
    ag_ctx_free(&ctx);
    ag_params_free(&m.params);
}
END_TEST

START_TEST(test_attack_deterministic) {
    linear_model m;
    linear_setup(&m, 10);
    adv_model model = linear_binding(&m);
    ag_tensor *x = clean_images(11);
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    const cm_rng_key key = {12, 3, 0, CM_RNG_ATTACK};
    adv_attack_config configs[2] = {adv_pgd_config(0.1f, 0.02f, 3, key),
                                    adv_trades_config(0.1f, 0.02f, 3, 0.0f, key)};
    for (int k = 0; k < 2; k++) {
        float a[N * D], b[N * D], other_key[N * D], other_index[N * D], start[N * D];
        ck_assert_int_eq(adv_attack(&ctx, &model, &configs[k], x, labels, 0, a), CM_OK);
        ck_assert_int_eq(adv_attack(&ctx, &model, &configs[k], x, labels, 0, b), CM_OK);
        ck_assert_mem_eq(a, b, sizeof a);
        adv_attack_config changed = configs[k];
        changed.key.seed++;
        ck_assert_int_eq(adv_attack(&ctx, &model, &changed, x, labels, 0, other_key), CM_OK);
        ck_assert_int_eq(adv_attack(&ctx, &model, &configs[k], x, labels, 1000, other_index),
                         CM_OK);
        ck_assert(memcmp(a, other_key, sizeof a) != 0 && memcmp(a, other_index, sizeof a) != 0);
        /* steps = 0 gives the start point: uniform within eps and clipped
         * (PGD), or x + 0.001 N(0,1) unclipped (TRADES). */
        changed = configs[k];
        changed.steps = 0;
        ck_assert_int_eq(adv_attack(&ctx, &model, &changed, x, labels, 0, start), CM_OK);
        double spread = 0.0;
        for (int i = 0; i < N * D; i++) {
            float delta = start[i] - x->data[i];
            spread += (double)delta * delta;
            if (k == 0) {
                ck_assert(start[i] >= 0.0f && start[i] <= 1.0f && fabsf(delta) <= 0.1f);
            } else {
                ck_assert(fabsf(delta) < 0.006f); /* 0.001 N(0,1): within 6 sigma */
            }
        }
        spread = sqrt(spread / (N * D));
        /* U(-0.1, 0.1) has std 0.058 (less after clipping); TRADES 0.001. */
        if (k == 0)
            ck_assert(spread > 0.03 && spread < 0.07);
        else
            ck_assert(spread > 0.0006 && spread < 0.0014);
    }
    gc_tensor_free(x);
    ag_ctx_free(&ctx);
    ag_params_free(&m.params);
}
END_TEST

START_TEST(test_trades_attack_raises_kl) {
    linear_model m;
    linear_setup(&m, 13);
    adv_model model = linear_binding(&m);
    ag_tensor *x = clean_images(14);
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    const float eps = 0.1f;
    adv_attack_config config =
        adv_trades_config(eps, 0.03f, 5, 0.0f, (cm_rng_key){15, 0, 0, CM_RNG_ATTACK});
    float x_adv[N * D], x_random[N * D];
    /* The KL objective needs no labels. */
    ck_assert_int_eq(adv_attack(&ctx, &model, &config, x, NULL, 0, x_adv), CM_OK);
    expect_in_ball(x->data, x_adv, N * D, eps);
    random_perturbation(x->data, N * D, eps, 16, x_random);
    double clean[N * V], attacked[N * V], random[N * V];
    linear_logits(&m, x->data, clean);
    linear_logits(&m, x_adv, attacked);
    linear_logits(&m, x_random, random);
    double kl_adv = mean_kl(clean, attacked, N, V), kl_random = mean_kl(clean, random, N, V);
    ck_assert_msg(kl_adv > 2.0 * kl_random && kl_adv > 0.01, "KL attacked %g, random %g", kl_adv,
                  kl_random);
    gc_tensor_free(x);
    ag_ctx_free(&ctx);
    ag_params_free(&m.params);
}
END_TEST

/* ---- the TRADES loss ---------------------------------------------------------------- */

typedef struct trades_case {
    float ce_weight, beta;
} trades_case;

static ag_tensor *forward_trades_logits(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    const trades_case *c = user;
    return adv_trades_loss(ctx, in[0], in[1], labels, c->ce_weight, c->beta);
}

START_TEST(test_trades_loss_value_and_gradient) {
    ag_tensor *in[2] = {gc_tensor_new(2, (int[]){N, V}, -2.0f, 2.0f, 20, true),
                        gc_tensor_new(2, (int[]){N, V}, -2.0f, 2.0f, 21, true)};
    trades_case c = {0.7f, 6.0f};
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    ag_tensor *loss = forward_trades_logits(&ctx, in, &c);
    double clean[N * V], adv[N * V];
    for (int i = 0; i < N * V; i++) {
        clean[i] = in[0]->data[i];
        adv[i] = in[1]->data[i];
    }
    double want = 0.7 * mean_ce(clean, labels, N, V) + 6.0 * mean_kl(clean, adv, N, V);
    ck_assert_double_eq_tol(loss->data[0], want, 1e-5 * fabs(want));
    /* KL(P(x) || P(x')), not the reverse: swapping the logits changes it. */
    ck_assert(fabs(mean_kl(clean, adv, N, V) - mean_kl(adv, clean, N, V)) > 1e-3);
    ag_ctx_free(&ctx);
    gc_options options = gc_default_options();
    gc_result r = gc_check("trades logits", forward_trades_logits, in, 2, &c, &options);
    ck_assert_msg(r.ok, "%s", r.message);
    ck_assert_int_eq(r.checked, 2 * N * V);
    gc_tensor_free(in[0]);
    gc_tensor_free(in[1]);
}
END_TEST

typedef struct trades_model_case {
    linear_model *model;
    ag_tensor *x, *x_adv;
} trades_model_case;

static ag_tensor *forward_trades_params(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    (void)in; /* the parameters are read through the model */
    trades_model_case *c = user;
    adv_model_output clean, adv;
    if (linear_forward(ctx, c->model, c->x, true, &clean) != CM_OK) return NULL;
    if (linear_forward(ctx, c->model, c->x_adv, true, &adv) != CM_OK) return NULL;
    return adv_trades_loss(ctx, clean.logits, adv.logits, labels, 1.0f, 6.0f);
}

START_TEST(test_trades_loss_param_gradcheck) {
    linear_model m;
    linear_setup(&m, 22);
    adv_model model = linear_binding(&m);
    ag_tensor *x = clean_images(23);
    ag_tensor *x_adv = gc_tensor_new(4, x->shape, 0.0f, 1.0f, 24, false);
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    adv_attack_config config =
        adv_trades_config(0.1f, 0.05f, 2, 0.0f, (cm_rng_key){25, 0, 0, CM_RNG_ATTACK});
    ck_assert_int_eq(adv_attack(&ctx, &model, &config, x, NULL, 0, x_adv->data), CM_OK);
    ag_ctx_free(&ctx);
    trades_model_case c = {&m, x, x_adv};
    ag_tensor *in[2] = {ag_param_tensor(m.w), ag_param_tensor(m.b)};
    gc_options options = gc_default_options();
    gc_result r = gc_check("trades params", forward_trades_params, in, 2, &c, &options);
    ck_assert_msg(r.ok, "%s", r.message);
    ck_assert_int_eq(r.checked, V * D + V);
    gc_tensor_free(x_adv);
    gc_tensor_free(x);
    ag_params_free(&m.params);
}
END_TEST

START_TEST(test_attack_errors) {
    linear_model m;
    linear_setup(&m, 50);
    adv_model model = linear_binding(&m);
    ag_tensor *x = clean_images(51);
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    float x_adv[N * D];
    adv_attack_config config =
        adv_pgd_config(0.1f, 0.02f, 2, (cm_rng_key){52, 0, 0, CM_RNG_ATTACK});
    ck_assert_int_eq(adv_attack(&ctx, &model, &config, x, NULL, 0, x_adv), CM_ERR_INVALID);
    adv_attack_config bad = config;
    bad.epsilon = -0.1f;
    ck_assert_int_eq(adv_attack(&ctx, &model, &bad, x, labels, 0, x_adv), CM_ERR_INVALID);
    bad = config;
    bad.router_weight = 1.0f; /* a router CE needs the expert count */
    ck_assert_int_eq(adv_attack(&ctx, &model, &bad, x, labels, 0, x_adv), CM_ERR_INVALID);
    ag_ctx_free(&ctx);
    /* A full arena is an error, and the parameters and grad mode come back. */
    ag_ctx tiny;
    ck_assert_int_eq(ag_ctx_init(&tiny, 1024), CM_OK);
    ck_assert_int_eq(adv_attack(&tiny, &model, &config, x, labels, 0, x_adv), CM_ERR_NOMEM);
    ck_assert(m.w->tensor.requires_grad && m.b->tensor.requires_grad && tiny.grad_enabled);
    ag_ctx_free(&tiny);
    gc_tensor_free(x);
    ag_params_free(&m.params);
}
END_TEST

int main(void) {
    Suite *suite = suite_create("adversarial");
    TCase *tc = tcase_create("adversarial");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_pgd_raises_loss);
    tcase_add_test(tc, test_fgsm);
    tcase_add_test(tc, test_attack_leaves_state);
    tcase_add_test(tc, test_attack_deterministic);
    tcase_add_test(tc, test_trades_attack_raises_kl);
    tcase_add_test(tc, test_trades_loss_value_and_gradient);
    tcase_add_test(tc, test_trades_loss_param_gradcheck);
    tcase_add_test(tc, test_attack_errors);
    suite_add_tcase(suite, tc);
    SRunner *runner = srunner_create(suite);
    srunner_run_all(runner, CK_NORMAL);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
