/* Tests for train/adversarial.c on CNNs:
 * - the AdvMoE KL attack raises the KL objective of the classifier and of the
 *   router logits on the MoE-CNN, and PGD on the dense ResNet; eval-mode batch
 *   norm leaves the running statistics alone, training mode updates them;
 * - adv_moe_cnn_evaluate (SA, RA, router robustness, expert RA, router-only
 *   RA) against direct forwards of moe_cnn_forward on the attacks' images,
 *   with image-level and per-layer routers; eps 0 gives RA = expert RA =
 *   router-only RA = SA and every route kept; a constant router gives
 *   expert RA = RA and router-only RA = SA.
 * The attacks on a linear classifier and the TRADES loss are in
 * test_adversarial.c. */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "gradcheck.h"
#include "train/adversarial.h"

/* after the project headers: it defines the one-letter batch shape N, H, W, D, V */
#include "adv_testutil.h"

enum { ARENA_BYTES = 32 << 20 };

static const int32_t labels[N] = {0, 3, 1, 2, 3, 0};

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

/* counts[r * 2 + e] must be the images of routes[r] that chose e (E = 2). */
static void expect_histogram(const int64_t *counts, int32_t routes[][N], int routers) {
    for (int r = 0; r < routers; r++) {
        int64_t expected[2] = {0, 0};
        for (int n = 0; n < N; n++) expected[routes[r][n]]++;
        ck_assert_int_eq(counts[r * 2], expected[0]);
        ck_assert_int_eq(counts[r * 2 + 1], expected[1]);
    }
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
        /* Images per expert: the clean routes, and the same on the unmoved x_adv. */
        ck_assert_int_eq(c.num_experts, 2);
        expect_histogram(c.clean_per_expert, routes, routers);
        expect_histogram(c.attacked_per_expert, routes, routers);
        /* No attack: SA alone. */
        c = evaluate_counts(f, NULL);
        ck_assert_int_eq(c.clean_correct, clean);
        expect_histogram(c.clean_per_expert, routes, routers);
        for (int i = 0; i < 2 * routers; i++) ck_assert_int_eq(c.attacked_per_expert[i], 0);
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
    /* Images per expert: of the clean routes and of the routes on x_adv. */
    expect_histogram(c.clean_per_expert, clean_routes, 1);
    expect_histogram(c.attacked_per_expert, routes, 1);
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

int main(void) {
    Suite *suite = suite_create("adversarial_cnn");
    TCase *tc = tcase_create("adversarial_cnn");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_advmoe_attack);
    tcase_add_test(tc, test_pgd_dense_cnn);
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
