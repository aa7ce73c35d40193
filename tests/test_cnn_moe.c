/* Tests for the MoE-CNN of layers/cnn.c (layers/moe_conv.c experts):
 * - MoE-CNN: forward against the double-precision reference (cnn_ref.c) with
 *   both routings, argmax routing, gradient check with frozen routes, router
 *   gradients present only with the straight-through path, E = 1 r = 1
 *   equals the dense net, router parameter list, config errors;
 * - FLOPs against hand counts, and the MoE/dense inference ratio.
 * The ops, the dense ResNet and the MoE conv layer are in test_cnn.c. */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "autograd/ops_cnn_extra.h"
#include "autograd/ops_conv.h"
#include "cnn_ref.h"
#include "conv_testutil.h"
#include "gradcheck.h"
#include "layers/cnn.h"
#include "layers/moe_conv.h"

enum { ARENA_BYTES = 64 << 20 };

/* ---- the MoE-CNN ------------------------------------------------------------------- */

/* tiny_config at ratio 0.5 (expert widths 2 and 3, projections in both
 * blocks since the stem stays 4), E = 2, routers of one conv (3 / 2 wide). */
static moe_cnn_config tiny_moe_config(moe_cnn_routing routing) {
    moe_cnn_config c = moe_cnn_default_config();
    c.body = tiny_config();
    c.body.ratio = 0.5f;
    c.num_experts = 2;
    c.routing = routing;
    c.router = (moe_router_config){1, {3}};
    c.layer_router = (moe_router_config){1, {2}};
    return c;
}

typedef struct moe_fixture {
    ag_params params;
    moe_cnn_model model;
} moe_fixture;

static void moe_setup(moe_fixture *f, const moe_cnn_config *config, uint64_t seed) {
    ag_params_init(&f->params);
    ck_assert_int_eq(moe_cnn_declare(&f->model, config, &f->params, NULL), CM_OK);
    ck_assert_int_eq(ag_params_finalize(&f->params, seed), CM_OK);
    randomize_params(&f->params, seed);
}

START_TEST(test_moe_cnn_structure) {
    moe_fixture f;
    moe_cnn_config config = tiny_moe_config(MOE_CNN_ROUTING_IMAGE);
    moe_setup(&f, &config, 70);
    ag_tensor *w = param(&f.params, "stages.0.blocks.0.conv1.weight");
    ck_assert(w->shape[0] == 2 * 2 && w->shape[1] == 4); /* E*w filters on the 4-wide stem */
    w = param(&f.params, "stages.1.blocks.0.conv2.weight");
    ck_assert(w->shape[0] == 2 * 3 && w->shape[1] == 3);
    ck_assert_int_eq(param(&f.params, "stages.1.blocks.0.bn2.weight")->shape[0], 3);
    ck_assert_int_eq(param(&f.params, "fc.weight")->shape[1], 3);
    ck_assert_int_eq(param(&f.params, "router.fc.weight")->shape[0], 2);
    ck_assert(f.model.blocks[0].plan.projection && f.model.blocks[1].plan.projection);
    ck_assert_int_eq(moe_cnn_router_count(&f.model), 1);
    ag_param *router[64];
    int n = moe_cnn_router_params(&f.model, router, 64);
    ck_assert_int_eq(n, 1 + 4 + 2); /* conv, its BN, fc weight and bias */
    for (int i = 0; i < n; i++)
        ck_assert_msg(strncmp(router[i]->name, "router.", 7) == 0, "%s", router[i]->name);
    ck_assert_int_eq(moe_cnn_router_params(&f.model, router, 3), n); /* count beyond capacity */
    ag_params_free(&f.params);

    config = tiny_moe_config(MOE_CNN_ROUTING_PER_LAYER);
    moe_setup(&f, &config, 71);
    ck_assert_int_eq(moe_cnn_router_count(&f.model), 4);
    n = moe_cnn_router_params(&f.model, router, 64);
    ck_assert_int_eq(n, 4 * 7);
    for (int i = 0; i < n; i++) ck_assert(strstr(router[i]->name, ".router.") != NULL);
    ck_assert_int_eq(
        param(&f.params, "stages.1.blocks.0.conv1.router.convs.0.conv.weight")->shape[1],
        2); /* reads conv1's input: block 0's output, width 2 */
    ck_assert_ptr_null(ag_params_find(&f.params, "router.fc.weight"));
    ag_params_free(&f.params);
}
END_TEST

START_TEST(test_moe_cnn_forward_values) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    enum { N = 4 };
    ag_tensor *x = gc_tensor_new(4, (int[]){N, 3, 7, 7}, 0.0f, 1.0f, 80, false);
    for (int routing = 0; routing < 2; routing++) {
        moe_fixture f;
        moe_cnn_config config = tiny_moe_config((moe_cnn_routing)routing);
        moe_setup(&f, &config, 81 + routing);
        const int routers = moe_cnn_router_count(&f.model);
        int32_t forced_storage[4][N] = {{1, 0, 0, 1}, {0, 1, 1, 0}, {1, 1, 0, 0}, {0, 0, 1, 1}};
        const int32_t *forced[4] = {forced_storage[0], forced_storage[1], forced_storage[2],
                                    forced_storage[3]};
        for (int pass = 0; pass < 4; pass++) {
            bool training = pass % 2 == 0, force = pass >= 2;
            ag_ctx_reset(&ctx);
            moe_cnn_forward_args args = {.training = training,
                                         .forced_experts = force ? forced : NULL};
            moe_cnn_output out;
            ck_assert_int_eq(moe_cnn_forward(&ctx, &f.model, x, &args, &out), CM_OK);
            ck_assert_int_eq(out.n_routers, routers);
            int32_t *experts[4] = {0};
            for (int r = 0; r < routers; r++) {
                experts[r] = out.experts[r];
                int32_t argmax[N];
                ag_argmax_rows(out.router_logits[r], argmax);
                for (int n = 0; n < N; n++)
                    ck_assert_int_eq(experts[r][n], force ? forced[r][n] : argmax[n]);
            }
            double *router_logits[4] = {0};
            double *want = ref_moe(&f.model, x, training, experts, router_logits);
            expect_close("moe_cnn logits", out.logits->data, want, out.logits->numel, 2e-5);
            for (int r = 0; r < routers; r++) {
                expect_close("router logits", out.router_logits[r]->data, router_logits[r], N * 2,
                             2e-5);
                free(router_logits[r]);
            }
            free(want);
        }
        ag_params_free(&f.params);
    }
    gc_tensor_free(x);
    ag_ctx_free(&ctx);
}
END_TEST

typedef struct moe_case {
    const moe_cnn_model *model;
    moe_cnn_forward_args args;
    bool router_sees_copy; /* router_input = a constant copy of x */
    ag_tensor *router_copy;
} moe_case;

static ag_tensor *forward_moe(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    moe_case *c = user;
    moe_cnn_forward_args args = c->args;
    if (c->router_sees_copy) args.router_input = c->router_copy;
    moe_cnn_output out;
    return moe_cnn_forward(ctx, c->model, in[0], &args, &out) == CM_OK ? out.logits : NULL;
}

/* The input and every kind of backbone parameter; the routes are fixed (no
 * argmax can flip under finite differences) and carry no gradient, since the
 * straight-through gradient is not the derivative finite differences see. */
START_TEST(test_moe_cnn_gradcheck) {
    const int32_t route_a[2] = {1, 0}, route_b[2] = {0, 1};
    const int32_t *forced[4] = {route_a, route_b, route_b, route_a};
    for (int variant = 0; variant < 3; variant++) {
        moe_fixture f;
        moe_cnn_config config =
            tiny_moe_config(variant == 1 ? MOE_CNN_ROUTING_PER_LAYER : MOE_CNN_ROUTING_IMAGE);
        moe_setup(&f, &config, 90 + variant);
        avoid_relu_kinks(&f.params);
        ag_tensor *x = gc_tensor_new(4, (int[]){2, 3, 7, 7}, 0.0f, 1.0f, 95, true);
        moe_case c = {
            .model = &f.model,
            .args = {.training = true, .forced_experts = forced, .no_router_gradient = true}};
        if (variant == 2) {
            /* Image routing by the argmax with the straight-through path on:
             * the router reads a constant copy of x, so x's gradient is the
             * experts' alone and no route depends on a checked input. */
            c.args = (moe_cnn_forward_args){.training = true};
            c.router_sees_copy = true;
            c.router_copy = gc_tensor_new(4, x->shape, 0.0f, 1.0f, 95, false);
        }
        ag_tensor *in[] = {x,
                           param(&f.params, "stem.conv.weight"),
                           param(&f.params, "stages.0.blocks.0.conv1.weight"),
                           param(&f.params, "stages.0.blocks.0.bn1.weight"),
                           param(&f.params, "stages.0.blocks.0.shortcut.conv.weight"),
                           param(&f.params, "stages.1.blocks.0.conv2.weight"),
                           param(&f.params, "stages.1.blocks.0.bn2.bias"),
                           param(&f.params, "fc.weight")};
        expect_gradcheck(variant == 0   ? "moe_cnn image"
                         : variant == 1 ? "moe_cnn per-layer"
                                        : "moe_cnn argmax",
                         forward_moe, in, 8, &c, 500);
        gc_tensor_free(c.router_copy);
        gc_tensor_free(x);
        ag_params_free(&f.params);
    }
}
END_TEST

/* Gradients of the parameters and the input after one backward of a fixed
 * weighted sum of the logits. */
static float *moe_gradients(moe_fixture *f, ag_tensor *x, const moe_cnn_forward_args *args,
                            float **logits, float **router_logit_grad) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    ctx.keep_grads = true; /* the router logits' gradient is read after backward */
    ag_params_zero_grad(&f->params);
    memset(x->grad, 0, (size_t)x->numel * sizeof(float));
    moe_cnn_output out;
    ck_assert_int_eq(moe_cnn_forward(&ctx, &f->model, x, args, &out), CM_OK);
    int64_t n = out.logits->numel;
    float *dout = malloc((size_t)n * sizeof(float));
    cm_rng_fill_uniform((cm_rng_key){7, 7, 0, CM_RNG_TEST}, 0, n, -1.0f, 1.0f, dout);
    ck_assert_int_eq(ag_backward_from(&ctx, out.logits, dout), CM_OK);
    *logits = malloc((size_t)n * sizeof(float));
    memcpy(*logits, out.logits->data, (size_t)n * sizeof(float));
    if (router_logit_grad) {
        ag_tensor *r = out.router_logits[0];
        *router_logit_grad = calloc((size_t)r->numel, sizeof(float));
        if (r->grad) memcpy(*router_logit_grad, r->grad, (size_t)r->numel * sizeof(float));
    }
    const ag_param_buffer *buffer = &f->params.buffers[AG_GROUP_DENSE];
    float *grads = malloc((buffer->numel + (size_t)x->numel) * sizeof(float));
    memcpy(grads, buffer->grad, buffer->numel * sizeof(float));
    memcpy(grads + buffer->numel, x->grad, (size_t)x->numel * sizeof(float));
    free(dout);
    ag_ctx_free(&ctx);
    return grads;
}

START_TEST(test_moe_cnn_router_gradient) {
    enum { N = 4 };
    for (int routing = 0; routing < 2; routing++) {
        moe_fixture f;
        moe_cnn_config config = tiny_moe_config((moe_cnn_routing)routing);
        moe_setup(&f, &config, 100 + routing);
        ag_tensor *x = gc_tensor_new(4, (int[]){N, 3, 7, 7}, 0.0f, 1.0f, 102, true);
        const size_t n_grads = f.params.buffers[AG_GROUP_DENSE].numel + (size_t)x->numel;
        float *logits[3], *dlogits[3], *grads[3];
        /* grouped with straight-through, all groups with it, grouped without */
        for (int k = 0; k < 3; k++) {
            moe_cnn_forward_args args = {
                .training = true, .compute_all_groups = k == 1, .no_router_gradient = k == 2};
            grads[k] = moe_gradients(&f, x, &args, &logits[k], &dlogits[k]);
        }
        for (int64_t i = 0; i < N * 5; i++)
            ck_assert_float_eq_tol(logits[0][i], logits[1][i], 1e-6f);
        for (size_t i = 0; i < n_grads; i++)
            ck_assert_msg(fabsf(grads[0][i] - grads[1][i]) <= 1e-5f * (1.0f + fabsf(grads[1][i])),
                          "gradient %zu: grouped %g, all groups %g", i, grads[0][i], grads[1][i]);
        ag_param *router[64];
        int n_router = moe_cnn_router_params(&f.model, router, 64);
        for (int i = 0; i < n_router; i++) {
            if (router[i]->frozen) continue;
            double with = 0.0, without = 0.0;
            for (int64_t j = 0; j < router[i]->tensor.numel; j++) {
                with += fabs(grads[0][router[i]->offset + j]);
                without += fabs(grads[2][router[i]->offset + j]);
            }
            ck_assert_msg(with > 1e-6, "%s gets no straight-through gradient", router[i]->name);
            ck_assert_msg(without == 0.0, "%s has a gradient without the straight-through path",
                          router[i]->name);
        }
        if (routing == MOE_CNN_ROUTING_IMAGE) {
            /* Only the chosen logit of each image receives a gradient. */
            ag_ctx ctx;
            ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
            moe_cnn_output out;
            moe_cnn_forward_args args = {.training = true};
            ck_assert_int_eq(moe_cnn_forward(&ctx, &f.model, x, &args, &out), CM_OK);
            for (int n = 0; n < N; n++) {
                int chosen = out.experts[0][n];
                ck_assert_float_eq(dlogits[0][n * 2 + 1 - chosen], 0.0f);
                ck_assert(fabsf(dlogits[0][n * 2 + chosen]) > 1e-7f);
            }
            ag_ctx_free(&ctx);
        }
        for (int k = 0; k < 3; k++) {
            free(logits[k]);
            free(dlogits[k]);
            free(grads[k]);
        }
        gc_tensor_free(x);
        ag_params_free(&f.params);
    }
}
END_TEST

START_TEST(test_moe_cnn_single_expert_is_dense) {
    dense_fixture d;
    cnn_config body = tiny_config();
    dense_setup(&d, &body, 110);
    moe_fixture m;
    moe_cnn_config config = tiny_moe_config(MOE_CNN_ROUTING_IMAGE);
    config.body = body;
    config.num_experts = 1;
    moe_setup(&m, &config, 111);
    /* Same names, same shapes; copy the dense values over. */
    ck_assert_int_eq(m.params.count, d.params.count);
    for (int i = 0; i < m.params.count; i++) {
        ag_tensor *mine = ag_param_tensor(m.params.items[i]);
        ag_tensor *theirs = param(&d.params, m.params.items[i]->name);
        ck_assert(ag_same_shape(mine, theirs));
        memcpy(mine->data, theirs->data, (size_t)mine->numel * sizeof(float));
    }
    ck_assert_int_eq(moe_cnn_router_count(&m.model), 0);
    ag_tensor *x = gc_tensor_new(4, (int[]){3, 3, 7, 7}, 0.0f, 1.0f, 112, true);
    float *logits,
        *grads = moe_gradients(&m, x, &(moe_cnn_forward_args){.training = true}, &logits, NULL);
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    memset(x->grad, 0, (size_t)x->numel * sizeof(float));
    ag_tensor *y = cnn_forward(&ctx, &d.model, x, &(cnn_forward_args){true});
    float dout[3 * 5];
    cm_rng_fill_uniform((cm_rng_key){7, 7, 0, CM_RNG_TEST}, 0, 15, -1.0f, 1.0f, dout);
    ck_assert_int_eq(ag_backward_from(&ctx, y, dout), CM_OK);
    for (int i = 0; i < 15; i++) ck_assert_float_eq(y->data[i], logits[i]);
    for (int i = 0; i < m.params.count; i++) {
        const ag_param *p = m.params.items[i];
        const ag_tensor *theirs = param(&d.params, p->name);
        for (int64_t j = 0; j < theirs->numel; j++)
            ck_assert_float_eq(grads[p->offset + j], theirs->grad[j]);
    }
    const size_t x_offset = m.params.buffers[AG_GROUP_DENSE].numel;
    for (int64_t j = 0; j < x->numel; j++) ck_assert_float_eq(grads[x_offset + j], x->grad[j]);
    free(logits);
    free(grads);
    gc_tensor_free(x);
    ag_ctx_free(&ctx);
    ag_params_free(&m.params);
    ag_params_free(&d.params);
}
END_TEST

START_TEST(test_config_errors) {
    cnn_config c = tiny_config();
    c.ratio = 0.1f; /* int(0.1 * 4) = 0 channels */
    ck_assert_int_eq(cnn_config_check(&c), CM_ERR_INVALID);
    c = tiny_config();
    c.n_stages = CNN_MAX_STAGES + 1;
    ck_assert_int_eq(cnn_config_check(&c), CM_ERR_INVALID);
    c = tiny_config();
    c.blocks[1] = 0;
    ck_assert_int_eq(cnn_config_check(&c), CM_ERR_INVALID);
    c = tiny_config();
    c.num_classes = 1;
    ck_assert_int_eq(cnn_config_check(&c), CM_ERR_INVALID);
    ck_assert_int_eq(cnn_config_check(&(cnn_config){0}), CM_ERR_INVALID);
    /* int(ratio * width) as Python computes it, despite 0.7f < 0.7. */
    c.ratio = 0.7f;
    c.widths[0] = 10;
    ck_assert_int_eq(cnn_stage_width(&c, 0), 7);
    c.ratio = 0.5f;
    c.widths[0] = 7;
    ck_assert_int_eq(cnn_stage_width(&c, 0), 3);

    moe_cnn_config m = tiny_moe_config(MOE_CNN_ROUTING_IMAGE);
    ck_assert_int_eq(moe_cnn_config_check(&m), CM_OK);
    m.num_experts = 0;
    ck_assert_int_eq(moe_cnn_config_check(&m), CM_ERR_INVALID);
    m.num_experts = MOE_CONV_MAX_EXPERTS + 1;
    ck_assert_int_eq(moe_cnn_config_check(&m), CM_ERR_INVALID);
    m = tiny_moe_config(MOE_CNN_ROUTING_IMAGE);
    m.router.n_convs = MOE_ROUTER_MAX_CONVS + 1;
    ck_assert_int_eq(moe_cnn_config_check(&m), CM_ERR_INVALID);
    m = tiny_moe_config(MOE_CNN_ROUTING_IMAGE);
    m.layer_router.widths[0] = 0;
    ck_assert_int_eq(moe_cnn_config_check(&m), CM_ERR_INVALID);
    m = tiny_moe_config((moe_cnn_routing)7);
    ck_assert_int_eq(moe_cnn_config_check(&m), CM_ERR_INVALID);

    /* router_input only makes sense with one image-level router. */
    moe_fixture f;
    m = tiny_moe_config(MOE_CNN_ROUTING_PER_LAYER);
    moe_setup(&f, &m, 120);
    ag_tensor *x = gc_tensor_new(4, (int[]){2, 3, 7, 7}, 0.0f, 1.0f, 121, false);
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    moe_cnn_output out;
    moe_cnn_forward_args args = {.router_input = x};
    ck_assert_int_eq(moe_cnn_forward(&ctx, &f.model, x, &args, &out), CM_ERR_INVALID);
    /* A full arena is reported, not a crash. */
    ag_ctx tiny;
    ck_assert_int_eq(ag_ctx_init(&tiny, 4096), CM_OK);
    args.router_input = NULL;
    ck_assert_int_eq(moe_cnn_forward(&tiny, &f.model, x, &args, &out), CM_ERR_NOMEM);
    ag_ctx_free(&tiny);
    ag_ctx_free(&ctx);
    gc_tensor_free(x);
    ag_params_free(&f.params);
}
END_TEST

/* ---- FLOPs ---------------------------------------------------------------------------- */

START_TEST(test_flops) {
    /* 1 input channel, 8x8, stem 4, stage widths 4 and 8, one block each,
     * 10 classes. Multiply-adds by hand (CO * CI * K * K * HO * WO):
     *   stem 4*1*9*64 = 2304
     *   block 0 (4 -> 4, 8x8, identity): 4*4*9*64 + 4*4*9*64 = 18432
     *   block 1 (4 -> 8, stride 2, 4x4): 8*4*9*16 + 8*8*9*16 + 8*4*16 = 14336
     *   fc 8*10 = 80                                        total 35152 */
    cnn_config dense = cnn_default_config();
    dense.stem_channels = 4;
    dense.n_stages = 2;
    dense.widths[0] = 4;
    dense.widths[1] = 8;
    dense.blocks[0] = dense.blocks[1] = 1;
    ck_assert_int_eq(cnn_flops(&dense, 8, 8), 35152);

    /* E = 2, ratio 0.5: widths 2 and 4, stem 4 (projection in block 0):
     *   stem 2304
     *   block 0 (4 -> 2): 2*4*9*64 + 2*2*9*64 + 2*4*64 = 4608 + 2304 + 512
     *   block 1 (2 -> 4, stride 2): 4*2*9*16 + 4*4*9*16 + 4*2*16 = 1152 + 2304 + 128
     *   fc 4*10 = 40                               backbone 13352
     * every group: stem + 2*(4608+2304) + 512 + 2*(1152+2304) + 128 + 40 = 23720
     * image router, one conv of 2: 2*1*9*64 + 2*2 = 1156 -> inference 14508
     * per-layer routers (one conv of 2 each, on each MoE conv's input):
     *   4 ch 8x8: 2*4*9*64 + 4 = 4612;  2 ch 8x8: 2*2*9*64 + 4 = 2308 (twice);
     *   4 ch at 4x4: 2*4*9*16 + 4 = 1156                    router 10384 */
    moe_cnn_config moe = moe_cnn_default_config();
    moe.body = dense;
    moe.body.ratio = 0.5f;
    moe.num_experts = 2;
    moe.router = (moe_router_config){1, {2}};
    moe.layer_router = (moe_router_config){1, {2}};
    moe_cnn_flops_report r = moe_cnn_flops(&moe, 8, 8);
    ck_assert_int_eq(r.backbone, 13352);
    ck_assert_int_eq(r.all_groups, 23720);
    ck_assert_int_eq(r.router, 1156);
    ck_assert_int_eq(r.total, 14508);
    double share = (double)r.total / 35152.0;
    ck_assert_msg(share >= 0.25 && share <= 0.5, "MoE inference at %.3f of dense", share);
    moe.routing = MOE_CNN_ROUTING_PER_LAYER;
    r = moe_cnn_flops(&moe, 8, 8);
    ck_assert_int_eq(r.backbone, 13352);
    ck_assert_int_eq(r.router, 10384);

    /* E = 1 is the dense count at the same ratio, with no router. */
    moe.num_experts = 1;
    moe.body.ratio = 1.0f;
    r = moe_cnn_flops(&moe, 8, 8);
    ck_assert_int_eq(r.backbone, 35152);
    ck_assert_int_eq(r.all_groups, 35152);
    ck_assert_int_eq(r.router, 0);

    /* The Fashion-MNIST defaults keep the paper's claim (25-50% of dense). */
    moe_cnn_config fashion = moe_cnn_default_config();
    cnn_config fashion_dense = cnn_default_config();
    share =
        (double)moe_cnn_flops(&fashion, 28, 28).total / (double)cnn_flops(&fashion_dense, 28, 28);
    ck_assert_msg(share >= 0.25 && share <= 0.5, "default MoE at %.3f of dense", share);
}
END_TEST

int main(void) {
    Suite *suite = suite_create("cnn_moe");
    TCase *moe = tcase_create("moe");
    tcase_set_timeout(moe, 60);
    tcase_add_test(moe, test_moe_cnn_structure);
    tcase_add_test(moe, test_moe_cnn_forward_values);
    tcase_add_test(moe, test_moe_cnn_gradcheck);
    tcase_add_test(moe, test_moe_cnn_router_gradient);
    tcase_add_test(moe, test_moe_cnn_single_expert_is_dense);
    tcase_add_test(moe, test_config_errors);
    tcase_add_test(moe, test_flops);
    suite_add_tcase(suite, moe);
    SRunner *runner = srunner_create(suite);
    srunner_run_all(runner, CK_NORMAL);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
