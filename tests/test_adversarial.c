/* Tests for train/adversarial.c:
 * - PGD on a linear classifier with known weights: raises the loss above the
 *   clean one and above a random perturbation of the same size; every pixel
 *   stays in the eps-ball and in [0,1]; deterministic given the key and the
 *   element index;
 * - FGSM equals a hand-computed x + eps sign(grad) and one PGD step without
 *   random start;
 * - the attack leaves parameter values and gradients, requires_grad flags,
 *   grad mode, the arena and a caller's pending tape as they were;
 * - TRADES / AdvMoE KL attack raises the KL objective (classifier, and router
 *   logits on the MoE-CNN); eval-mode batch norm leaves the running
 *   statistics alone, training mode updates them;
 * - the TRADES loss against a direct computation, and its gradient check
 *   w.r.t. both logits and w.r.t. parameters with a fixed x_adv;
 * - configuration and arena errors;
 * - adv_moe_cnn_evaluate (SA, RA, router robustness, expert RA, router-only
 *   RA) against direct forwards of moe_cnn_forward on the attacks' images,
 *   with image-level and per-layer routers; eps 0 gives RA = expert RA =
 *   router-only RA = SA and every route kept; a constant router gives
 *   expert RA = RA and router-only RA = SA. */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "gradcheck.h"
#include "train/adversarial.h"

enum { ARENA_BYTES = 32 << 20 };
enum { N = 6, H = 3, W = 5, D = H * W, V = 4 };

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

static void softmax_row(const double *logits, int classes, double *p) {
    double top = logits[0], sum = 0.0;
    for (int v = 1; v < classes; v++) top = fmax(top, logits[v]);
    for (int v = 0; v < classes; v++) sum += p[v] = exp(logits[v] - top);
    for (int v = 0; v < classes; v++) p[v] /= sum;
}

static double mean_ce(const double *logits, const int32_t *labels, int rows, int classes) {
    double total = 0.0, p[16];
    for (int n = 0; n < rows; n++) {
        softmax_row(logits + n * classes, classes, p);
        total -= log(p[labels[n]]);
    }
    return total / rows;
}

/* mean over rows of KL(softmax(a) || softmax(b)) */
static double mean_kl(const double *a, const double *b, int rows, int classes) {
    double total = 0.0, p[16], q[16];
    for (int n = 0; n < rows; n++) {
        softmax_row(a + n * classes, classes, p);
        softmax_row(b + n * classes, classes, q);
        for (int v = 0; v < classes; v++) total += p[v] * (log(p[v]) - log(q[v]));
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

static void expect_in_ball(const float *x, const float *x_adv, int64_t n, float eps) {
    for (int64_t i = 0; i < n; i++) {
        ck_assert_msg(x_adv[i] >= 0.0f && x_adv[i] <= 1.0f, "pixel %lld = %g outside [0,1]",
                      (long long)i, x_adv[i]);
        ck_assert_msg(fabsf(x_adv[i] - x[i]) <= eps * (1.0f + 1e-6f),
                      "pixel %lld moved %g > eps %g", (long long)i, x_adv[i] - x[i], eps);
    }
}

/* x + eps * (random sign), clipped to [0,1]: a perturbation of the same size. */
static void random_perturbation(const float *x, int64_t n, float eps, uint64_t seed, float *out) {
    cm_rng_fill_uniform((cm_rng_key){seed, 0, 0, CM_RNG_TEST}, 0, n, -1.0f, 1.0f, out);
    for (int64_t i = 0; i < n; i++)
        out[i] = fminf(fmaxf(x[i] + (out[i] >= 0.0f ? eps : -eps), 0.0f), 1.0f);
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

/* ---- CNNs: the MoE-CNN (image routing) and the dense ResNet ------------------------- */

static cnn_config small_body(void) {
    cnn_config c = cnn_default_config();
    c.num_classes = V;
    c.stem_channels = 4;
    c.n_stages = 2;
    c.widths[0] = 4;
    c.widths[1] = 6;
    c.blocks[0] = c.blocks[1] = 1;
    return c;
}

/* Classifier and router heads at a scale where the logits differ. */
static void widen_heads(ag_params *params) {
    for (int i = 0; i < params->count; i++) {
        ag_param *p = params->items[i];
        if (strstr(p->name, "fc.weight"))
            cm_rng_fill_uniform((cm_rng_key){30, (uint64_t)i, 0, CM_RNG_TEST}, 0, p->tensor.numel,
                                -1.0f, 1.0f, p->tensor.data);
    }
}

/* Forward in no-grad eval mode -> logits and router logits in double. */
static void moe_logits(ag_ctx *ctx, const moe_cnn_model *model, const float *images, double *logits,
                       double *router, int32_t *experts) {
    ag_ctx_reset(ctx);
    bool previous = ag_set_grad_enabled(ctx, false);
    ag_tensor *x = ag_alias(ctx, "x", (float *)images, 4, (int[]){N, 1, 7, 7});
    moe_cnn_output out;
    ck_assert_int_eq(moe_cnn_forward(ctx, model, x, &(moe_cnn_forward_args){0}, &out), CM_OK);
    for (int i = 0; i < N * V; i++) logits[i] = out.logits->data[i];
    for (int i = 0; i < N * 2; i++) router[i] = out.router_logits[0]->data[i];
    memcpy(experts, out.experts[0], N * sizeof(int32_t));
    ag_set_grad_enabled(ctx, previous);
}

START_TEST(test_advmoe_attack) {
    moe_cnn_config config = moe_cnn_default_config();
    config.body = small_body();
    config.body.ratio = 0.5f;
    config.router = (moe_router_config){1, {3}};
    ag_params params;
    ag_params_init(&params);
    moe_cnn_model net;
    ck_assert_int_eq(moe_cnn_declare(&net, &config, &params, NULL), CM_OK);
    ck_assert_int_eq(ag_params_finalize(&params, 31), CM_OK);
    widen_heads(&params);
    adv_moe_cnn binding = {.model = &net};
    adv_model model = {adv_moe_cnn_forward, &binding, &params, 2};
    ag_tensor *x = gc_tensor_new(4, (int[]){N, 1, 7, 7}, 0.0f, 1.0f, 32, false);
    const int64_t numel = x->numel;
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    const ag_param_buffer *buffer = &params.buffers[AG_GROUP_DENSE];
    float *values = malloc(buffer->numel * sizeof(float));
    memcpy(values, buffer->data, buffer->numel * sizeof(float));
    const float eps = 0.1f;
    float *x_adv = malloc((size_t)numel * sizeof(float)), *x_random = malloc((size_t)numel * 4);

    /* AdvMoE's training attack: KL on the classifier and on the router,
     * in eval mode; running statistics and every parameter stay put. */
    adv_attack_config advmoe =
        adv_trades_config(eps, 0.03f, 5, 1.0f, (cm_rng_key){33, 0, 0, CM_RNG_ATTACK});
    ck_assert_int_eq(adv_attack(&ctx, &model, &advmoe, x, NULL, 0, x_adv), CM_OK);
    expect_in_ball(x->data, x_adv, numel, eps);
    for (size_t i = 0; i < buffer->numel; i++) {
        ck_assert_float_eq(buffer->data[i], values[i]);
        ck_assert_float_eq(buffer->grad[i], 0.0f);
    }
    random_perturbation(x->data, numel, eps, 34, x_random);
    double clean[N * V], clean_router[N * 2], adv[N * V], adv_router[N * 2];
    double rnd[N * V], rnd_router[N * 2];
    int32_t clean_experts[N], adv_experts[N], rnd_experts[N];
    moe_logits(&ctx, &net, x->data, clean, clean_router, clean_experts);
    moe_logits(&ctx, &net, x_adv, adv, adv_router, adv_experts);
    moe_logits(&ctx, &net, x_random, rnd, rnd_router, rnd_experts);
    double objective_adv = mean_kl(clean, adv, N, V) + mean_kl(clean_router, adv_router, N, 2);
    double objective_rnd = mean_kl(clean, rnd, N, V) + mean_kl(clean_router, rnd_router, N, 2);
    ck_assert_msg(objective_adv > objective_rnd && objective_adv > 1e-4,
                  "AdvMoE objective attacked %g, random %g", objective_adv, objective_rnd);
    /* The router term matters: without it the attack lands elsewhere. */
    float *classifier_only = malloc((size_t)numel * sizeof(float));
    adv_attack_config trades = advmoe;
    trades.router_weight = 0.0f;
    ck_assert_int_eq(adv_attack(&ctx, &model, &trades, x, NULL, 0, classifier_only), CM_OK);
    ck_assert(memcmp(classifier_only, x_adv, (size_t)numel * sizeof(float)) != 0);
    double router_kl_with_term = mean_kl(clean_router, adv_router, N, 2);
    moe_logits(&ctx, &net, classifier_only, adv, adv_router, adv_experts);
    ck_assert_msg(router_kl_with_term > mean_kl(clean_router, adv_router, N, 2),
                  "router KL with the router term %g, without %g", router_kl_with_term,
                  mean_kl(clean_router, adv_router, N, 2));

    /* PGD with the release's RA objective (CE + router CE toward y mod E),
     * frozen routes and the router-only attack all run and stay in the ball. */
    adv_attack_config pgd = adv_pgd_config(eps, 0.025f, 4, (cm_rng_key){35, 0, 0, CM_RNG_ATTACK});
    pgd.router_weight = 6.0f;
    ck_assert_int_eq(adv_attack(&ctx, &model, &pgd, x, labels, 0, x_adv), CM_OK);
    expect_in_ball(x->data, x_adv, numel, eps);
    const int32_t *frozen[1] = {clean_experts};
    binding.args.forced_experts = frozen;
    ck_assert_int_eq(adv_attack(&ctx, &model, &pgd, x, labels, 0, x_adv), CM_OK);
    expect_in_ball(x->data, x_adv, numel, eps);
    binding.args.forced_experts = NULL;
    binding.expert_input = x;
    ck_assert_int_eq(adv_attack(&ctx, &model, &pgd, x, labels, 0, x_adv), CM_OK);
    expect_in_ball(x->data, x_adv, numel, eps);
    binding.expert_input = NULL;
    for (size_t i = 0; i < buffer->numel; i++) ck_assert_float_eq(buffer->data[i], values[i]);

    /* Batch norm in training mode during the attack updates the running
     * statistics (PyTorch's behaviour; the release avoids it with eval). */
    advmoe.bn_training = true;
    ck_assert_int_eq(adv_attack(&ctx, &model, &advmoe, x, NULL, 0, x_adv), CM_OK);
    float *running_mean = ag_params_find(&params, "stem.bn.running_mean")->tensor.data;
    ck_assert(running_mean[0] != 0.0f);
    free(classifier_only);
    free(values);
    free(x_adv);
    free(x_random);
    gc_tensor_free(x);
    ag_ctx_free(&ctx);
    ag_params_free(&params);
}
END_TEST

START_TEST(test_pgd_dense_cnn) {
    cnn_config config = small_body();
    ag_params params;
    ag_params_init(&params);
    cnn_model net;
    ck_assert_int_eq(cnn_declare(&net, &config, &params, NULL), CM_OK);
    ck_assert_int_eq(ag_params_finalize(&params, 40), CM_OK);
    ag_tensor *x = gc_tensor_new(4, (int[]){N, 1, 7, 7}, 0.0f, 1.0f, 41, false);
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    /* A few steps of plain SGD on the batch, so the model has something to
     * lose (and its running statistics are those of the data). */
    for (int step = 0; step < 40; step++) {
        ag_ctx_reset(&ctx);
        ag_params_zero_grad(&params);
        ag_tensor *logits = cnn_forward(&ctx, &net, x, &(cnn_forward_args){true});
        ck_assert_int_eq(ag_backward(&ctx, ag_cross_entropy(&ctx, logits, labels, -1)), CM_OK);
        for (int i = 0; i < params.count; i++) {
            ag_tensor *t = ag_param_tensor(params.items[i]);
            if (params.items[i]->frozen) continue;
            for (int64_t j = 0; j < t->numel; j++) t->data[j] -= 0.2f * t->grad[j];
        }
    }
    ag_params_zero_grad(&params);
    adv_model model = {adv_cnn_forward, &net, &params, 0};
    const float eps = 0.1f;
    float x_adv[N * 49], x_random[N * 49];
    adv_attack_config pgd = adv_pgd_config(eps, 0.025f, 5, (cm_rng_key){42, 0, 0, CM_RNG_ATTACK});
    ck_assert_int_eq(adv_attack(&ctx, &model, &pgd, x, labels, 0, x_adv), CM_OK);
    expect_in_ball(x->data, x_adv, x->numel, eps);
    random_perturbation(x->data, x->numel, eps, 43, x_random);
    double loss[3];
    const float *images[3] = {x->data, x_random, x_adv};
    for (int k = 0; k < 3; k++) {
        ag_ctx_reset(&ctx);
        ag_tensor *input = ag_alias(&ctx, "x", (float *)images[k], 4, x->shape);
        ag_tensor *logits = cnn_forward(&ctx, &net, input, &(cnn_forward_args){false});
        loss[k] = ag_cross_entropy(&ctx, logits, labels, -1)->data[0];
    }
    ck_assert_msg(loss[2] > loss[0] + 0.5 && loss[2] > loss[1] + 0.5,
                  "CE clean %g, random %g, PGD %g", loss[0], loss[1], loss[2]);
    for (size_t i = 0; i < params.buffers[AG_GROUP_DENSE].numel; i++)
        ck_assert_float_eq(params.buffers[AG_GROUP_DENSE].grad[i], 0.0f);
    gc_tensor_free(x);
    ag_ctx_free(&ctx);
    ag_params_free(&params);
}
END_TEST

/* ---- robust evaluation -------------------------------------------------------------- */

typedef struct moe_fixture {
    ag_params params;
    moe_cnn_model net;
    adv_moe_cnn binding;
    adv_model model;
    ag_tensor *x;
    float x_adv[N * 49], other[N * 49];
    ag_ctx ctx;
} moe_fixture;

static moe_fixture *moe_fixture_new(moe_cnn_routing routing, uint64_t seed) {
    moe_fixture *f = calloc(1, sizeof *f);
    moe_cnn_config config = moe_cnn_default_config();
    config.body = small_body();
    config.body.ratio = 0.5f;
    config.routing = routing;
    config.router = (moe_router_config){1, {3}};
    ag_params_init(&f->params);
    ck_assert_int_eq(moe_cnn_declare(&f->net, &config, &f->params, NULL), CM_OK);
    ck_assert_int_eq(ag_params_finalize(&f->params, seed), CM_OK);
    widen_heads(&f->params); /* the routers' heads too: routes depend on the image */
    f->binding = (adv_moe_cnn){.model = &f->net};
    f->model = (adv_model){adv_moe_cnn_forward, &f->binding, &f->params, 2};
    f->x = gc_tensor_new(4, (int[]){N, 1, 7, 7}, 0.0f, 1.0f, seed + 1, false);
    ck_assert_int_eq(ag_ctx_init(&f->ctx, ARENA_BYTES), CM_OK);
    return f;
}

static void moe_fixture_free(moe_fixture *f) {
    gc_tensor_free(f->x);
    ag_ctx_free(&f->ctx);
    ag_params_free(&f->params);
    free(f);
}

/* Shifts the image router's bias so that its logit margins straddle 0 over
 * the batch (half the images to each expert): routes an attack can move. */
static void center_router(moe_fixture *f) {
    ag_ctx_reset(&f->ctx);
    bool previous = ag_set_grad_enabled(&f->ctx, false);
    moe_cnn_output out;
    ck_assert_int_eq(moe_cnn_forward(&f->ctx, &f->net, f->x, &(moe_cnn_forward_args){0}, &out),
                     CM_OK);
    ag_set_grad_enabled(&f->ctx, previous);
    double margin[N];
    for (int n = 0; n < N; n++)
        margin[n] = out.router_logits[0]->data[2 * n] - out.router_logits[0]->data[2 * n + 1];
    for (int i = 1; i < N; i++) /* insertion sort */
        for (int k = i; k > 0 && margin[k - 1] > margin[k]; k--) {
            double t = margin[k];
            margin[k] = margin[k - 1];
            margin[k - 1] = t;
        }
    ag_params_find(&f->params, "router.fc.bias")->tensor.data[0] -=
        (float)(0.5 * (margin[N / 2 - 1] + margin[N / 2]));
}

/* Correct predictions of one no-grad eval forward, the experts reading
 * `images` and the image router `router_images` (NULL: images), routes
 * forced or not; the routes go to routes[r][n]. */
static uint8_t direct_right[N]; /* per image, of the last direct_correct */

static int64_t direct_correct(moe_fixture *f, const float *images, const float *router_images,
                              const int32_t *const *forced, int32_t routes[][N]) {
    ag_ctx *ctx = &f->ctx;
    ag_ctx_reset(ctx);
    bool previous = ag_set_grad_enabled(ctx, false);
    const int shape[4] = {N, 1, 7, 7};
    moe_cnn_forward_args args = {.forced_experts = forced};
    if (router_images) args.router_input = ag_alias(ctx, "r", (float *)router_images, 4, shape);
    moe_cnn_output out;
    ag_tensor *x = ag_alias(ctx, "x", (float *)images, 4, shape);
    ck_assert_int_eq(moe_cnn_forward(ctx, &f->net, x, &args, &out), CM_OK);
    int64_t correct = 0;
    for (int n = 0; n < N; n++) {
        int best = 0;
        for (int v = 1; v < V; v++)
            if (out.logits->data[n * V + v] > out.logits->data[n * V + best]) best = v;
        direct_right[n] = best == labels[n];
        correct += direct_right[n];
    }
    for (int r = 0; r < out.n_routers; r++) memcpy(routes[r], out.experts[r], sizeof routes[r]);
    ag_set_grad_enabled(ctx, previous);
    return correct;
}

static adv_eval_counts evaluate_counts(moe_fixture *f, const adv_attack_config *attack) {
    adv_eval_counts counts = {0};
    ag_ctx_reset(&f->ctx);
    const size_t used = f->ctx.arena.used;
    ck_assert_int_eq(
        adv_moe_cnn_evaluate(&f->ctx, &f->model, attack, f->x, labels, 0, f->x_adv, &counts),
        CM_OK);
    ck_assert_uint_eq(f->ctx.arena.used, used);
    ck_assert(!f->binding.args.forced_experts && !f->binding.args.no_router_gradient &&
              !f->binding.expert_input);
    ck_assert_int_eq(counts.images, N);
    return counts;
}

START_TEST(test_evaluate_eps_zero) {
    for (int routing = 0; routing < 2; routing++) {
        moe_fixture *f = moe_fixture_new((moe_cnn_routing)routing, 60);
        int32_t routes[8][N];
        int64_t clean = direct_correct(f, f->x->data, NULL, NULL, routes);
        adv_attack_config none = adv_pgd_config(0.0f, 0.05f, 3, (cm_rng_key){61, 0, 0, 0});
        none.router_weight = 6.0f;
        adv_eval_counts c = evaluate_counts(f, &none);
        const int routers = routing == MOE_CNN_ROUTING_IMAGE ? 1 : 4;
        ck_assert_int_eq(c.n_routers, routers);
        ck_assert_int_eq(c.clean_correct, clean);
        ck_assert_int_eq(c.robust_correct, clean);
        ck_assert_int_eq(c.expert_correct, clean);
        ck_assert_int_eq(c.worst_correct, clean);
        ck_assert_int_eq(c.router_only_correct, routing == MOE_CNN_ROUTING_IMAGE ? clean : 0);
        for (int r = 0; r < routers; r++) ck_assert_int_eq(c.routes_kept[r], N);
        ck_assert(memcmp(f->x_adv, f->x->data, sizeof f->x_adv) == 0);
        /* No attack: SA alone. */
        c = evaluate_counts(f, NULL);
        ck_assert_int_eq(c.clean_correct, clean);
        ck_assert_int_eq(
            c.robust_correct + c.expert_correct + c.router_only_correct + c.worst_correct, 0);
        moe_fixture_free(f);
    }
}
END_TEST

START_TEST(test_evaluate_dissection) {
    moe_fixture *f = moe_fixture_new(MOE_CNN_ROUTING_IMAGE, 62);
    center_router(f);
    adv_attack_config attack = adv_pgd_config(0.3f, 0.1f, 4, (cm_rng_key){63, 0, 0, 0});
    attack.router_weight = 6.0f; /* the release's RA objective */
    int32_t clean_routes[1][N], routes[1][N];
    int64_t clean = direct_correct(f, f->x->data, NULL, NULL, clean_routes);
    adv_eval_counts c = evaluate_counts(f, &attack);
    expect_in_ball(f->x->data, f->x_adv, N * 49, 0.3f);
    ck_assert_int_eq(c.clean_correct, clean);
    /* RA and the routes kept, on the returned x_adv. */
    ck_assert_int_eq(c.robust_correct, direct_correct(f, f->x_adv, NULL, NULL, routes));
    uint8_t ra_right[N];
    memcpy(ra_right, direct_right, sizeof ra_right);
    int64_t kept = 0;
    for (int n = 0; n < N; n++) kept += routes[0][n] == clean_routes[0][n];
    ck_assert_int_eq(c.routes_kept[0], kept);
    ck_assert_msg(kept < N, "the attack should move some routes at eps 0.3");
    /* Expert RA: the attack with the clean routes forced, no router path or
     * router term. */
    const int32_t *forced[1] = {clean_routes[0]};
    adv_attack_config frozen = attack;
    frozen.router_weight = 0.0f;
    f->binding.args.forced_experts = forced;
    f->binding.args.no_router_gradient = true;
    ck_assert_int_eq(adv_attack(&f->ctx, &f->model, &frozen, f->x, labels, 0, f->other), CM_OK);
    f->binding.args = (moe_cnn_forward_args){0};
    ck_assert_int_eq(c.expert_correct, direct_correct(f, f->other, NULL, forced, routes));
    /* Worst-case RA: the router-blind attack's images through the free model,
     * counted where the RA attack failed too. */
    direct_correct(f, f->other, NULL, NULL, routes);
    int64_t worst = 0;
    for (int n = 0; n < N; n++) worst += ra_right[n] && direct_right[n];
    ck_assert_int_eq(c.worst_correct, worst);
    ck_assert_int_le(c.worst_correct, c.robust_correct);
    /* Router-only RA: the router reads the attacked image, the experts x. */
    f->binding.expert_input = f->x;
    ck_assert_int_eq(adv_attack(&f->ctx, &f->model, &attack, f->x, labels, 0, f->other), CM_OK);
    f->binding.expert_input = NULL;
    ck_assert_int_eq(c.router_only_correct, direct_correct(f, f->x->data, f->other, NULL, routes));
    moe_fixture_free(f);
}
END_TEST

START_TEST(test_evaluate_constant_router) {
    moe_fixture *f = moe_fixture_new(MOE_CNN_ROUTING_IMAGE, 64);
    /* Logits = bias [2, 0] whatever the image: every route is expert 0. */
    ag_param *weight = ag_params_find(&f->params, "router.fc.weight");
    ag_param *bias = ag_params_find(&f->params, "router.fc.bias");
    memset(weight->tensor.data, 0, (size_t)weight->tensor.numel * sizeof(float));
    bias->tensor.data[0] = 2.0f;
    bias->tensor.data[1] = 0.0f;
    adv_attack_config attack = adv_pgd_config(0.3f, 0.1f, 4, (cm_rng_key){65, 0, 0, 0});
    int32_t routes[1][N];
    int64_t clean = direct_correct(f, f->x->data, NULL, NULL, routes);
    adv_eval_counts c = evaluate_counts(f, &attack);
    ck_assert_int_eq(c.routes_kept[0], N);
    ck_assert_int_eq(c.router_only_correct, clean);
    /* No gradient reaches the image through a constant router, so the frozen
     * attack is the RA attack. */
    ck_assert_int_eq(c.expert_correct, c.robust_correct);
    ck_assert_int_eq(c.worst_correct, c.robust_correct);
    ck_assert_int_lt(c.robust_correct, clean); /* the attack does something */
    moe_fixture_free(f);
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
    tcase_add_test(tc, test_advmoe_attack);
    tcase_add_test(tc, test_pgd_dense_cnn);
    tcase_add_test(tc, test_attack_errors);
    tcase_add_test(tc, test_evaluate_eps_zero);
    tcase_add_test(tc, test_evaluate_dissection);
    tcase_add_test(tc, test_evaluate_constant_router);
    suite_add_tcase(suite, tc);
    SRunner *runner = srunner_create(suite);
    srunner_run_all(runner, CK_NORMAL);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
