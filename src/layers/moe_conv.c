/* The channel-group MoE conv, the router networks and the MoE-CNN; see
 * moe_conv.h. */
#include "layers/moe_conv.h"

#include <assert.h>
#include <stdio.h>
#include <string.h>

#include "autograd/ops_cnn_extra.h"
#include "autograd/ops_conv.h"
#include "common/check.h"

const char *const moe_cnn_routing_names[] = {"image", "per_layer", NULL};
static_assert(sizeof moe_cnn_routing_names / sizeof moe_cnn_routing_names[0] ==
                  MOE_CNN_ROUTING_COUNT + 1,
              "moe_cnn_routing_names out of sync with moe_cnn_routing");

/* ---- the MoE conv ----------------------------------------------------------- */

cm_status moe_conv_declare(moe_conv *conv, ag_params *params, const char *name, int in_channels,
                           int expert_width, int num_experts, int kernel, int stride) {
    if (num_experts < 1 || num_experts > MOE_CONV_MAX_EXPERTS || expert_width < 1 ||
        in_channels < 1 || kernel < 1 || stride < 1)
        return CM_ERR(CM_ERR_INVALID,
                      "moe_conv %s: %d experts (need 1..%d) of width %d, %d input channels, "
                      "kernel %d, stride %d",
                      name, num_experts, MOE_CONV_MAX_EXPERTS, expert_width, in_channels, kernel,
                      stride);
    int filters = num_experts * expert_width;
    char full[AG_PARAM_NAME_MAX];
    CM_TRY(cnn_name(full, name, "weight"));
    *conv = (moe_conv){.num_experts = num_experts,
                       .expert_width = expert_width,
                       .in_channels = in_channels,
                       .kernel = kernel,
                       .stride = stride,
                       .padding = kernel / 2};
    return ag_params_declare(params, full, AG_GROUP_DENSE, 4,
                             (int[]){filters, in_channels, kernel, kernel},
                             cnn_kaiming_init(filters, kernel), &conv->weight);
}

/* The release's computation: all E*w filters, channels times the mask, then
 * each image's w chosen channels. */
static ag_tensor *all_groups_conv(ag_ctx *ctx, const moe_conv *conv, ag_tensor *x, ag_tensor *mask,
                                  const int32_t *expert) {
    const int batch = x->shape[0], experts = conv->num_experts, width = conv->expert_width;
    const int filters = experts * width;
    ag_tensor *full =
        ag_conv2d(ctx, x, ag_param_tensor(conv->weight), NULL, conv->stride, conv->padding);
    int32_t *mask_index = ag_alloc_ints(ctx, (int64_t)batch * filters, "moe_conv");
    int32_t *kept = ag_alloc_ints(ctx, (int64_t)batch * width, "moe_conv");
    if (!full || !mask_index || !kept) return NULL;
    for (int n = 0; n < batch; n++) {
        for (int c = 0; c < filters; c++) mask_index[n * filters + c] = n * experts + c / width;
        for (int k = 0; k < width; k++) kept[n * width + k] = expert[n] * width + k;
    }
    ag_tensor *channel_mask =
        ag_reshape(ctx, ag_gather_elements(ctx, mask, mask_index, batch * filters), 2,
                   (int[]){batch, filters});
    return ag_gather_channels(ctx, ag_mul_channels(ctx, full, channel_mask), kept, width);
}

ag_tensor *moe_conv_forward(ag_ctx *ctx, const moe_conv *conv, ag_tensor *x, ag_tensor *mask,
                            const int32_t *expert, bool compute_all_groups) {
    if (!x || ag_failed(ctx)) return NULL;
    const int experts = conv->num_experts, width = conv->expert_width;
    char shape[64];
    CM_ASSERT(x->ndim == 4 && x->shape[1] == conv->in_channels, "moe_conv: x %s, want [N,%d,H,W]",
              ag_shape_str(x, shape, sizeof shape), conv->in_channels);
    if (!mask) {
        CM_ASSERT(experts == 1, "moe_conv: %d experts need a routing mask", experts);
        return ag_conv2d(ctx, x, ag_param_tensor(conv->weight), NULL, conv->stride, conv->padding);
    }
    const int batch = x->shape[0];
    CM_ASSERT(batch > 0 && mask->ndim == 2 && mask->shape[0] == batch && mask->shape[1] == experts,
              "moe_conv: mask %s, want [%d,%d]", ag_shape_str(mask, shape, sizeof shape), batch,
              experts);
    for (int n = 0; n < batch; n++)
        CM_ASSERT(expert[n] >= 0 && expert[n] < experts, "moe_conv: expert[%d] = %d outside [0,%d)",
                  n, expert[n], experts);
    if (compute_all_groups) return all_groups_conv(ctx, conv, x, mask, expert);

    /* out[n,c] = conv_e(x)[n,c] * mask[n, expert[n]]: the mask entry (1 in
     * forward) carries the straight-through gradient to the router. */
    ag_tensor *out = ag_conv2d_grouped(ctx, x, ag_param_tensor(conv->weight), experts, expert,
                                       conv->stride, conv->padding);
    int32_t *chosen = ag_alloc_ints(ctx, (int64_t)batch * width, "moe_conv");
    if (!out || !chosen) return NULL;
    for (int n = 0; n < batch; n++)
        for (int k = 0; k < width; k++) chosen[n * width + k] = n * experts + expert[n];
    ag_tensor *scale = ag_reshape(ctx, ag_gather_elements(ctx, mask, chosen, batch * width), 2,
                                  (int[]){batch, width});
    return ag_mul_channels(ctx, out, scale);
}

/* ---- router networks ---------------------------------------------------------- */

cm_status moe_router_declare(moe_router_net *net, ag_params *params, const char *prefix,
                             int in_channels, int num_experts, const moe_router_config *config,
                             float bn_momentum, float bn_eps, float fc_init_std) {
    if (config->n_convs < 0 || config->n_convs > MOE_ROUTER_MAX_CONVS)
        return CM_ERR(CM_ERR_INVALID, "router %s: n_convs = %d not in [0, %d]", prefix,
                      config->n_convs, MOE_ROUTER_MAX_CONVS);
    char conv_name[AG_PARAM_NAME_MAX], bn_name[AG_PARAM_NAME_MAX], what[AG_PARAM_NAME_MAX];
    net->n_convs = config->n_convs;
    int channels = in_channels;
    for (int i = 0; i < config->n_convs; i++) {
        if (config->widths[i] < 1)
            return CM_ERR(CM_ERR_INVALID, "router %s: conv %d has width %d", prefix, i,
                          config->widths[i]);
        snprintf(what, sizeof what, "convs.%d.conv", i);
        CM_TRY(cnn_name(conv_name, prefix, what));
        snprintf(what, sizeof what, "convs.%d.bn", i);
        CM_TRY(cnn_name(bn_name, prefix, what));
        CM_TRY(cnn_conv_bn_declare(&net->convs[i], params, conv_name, bn_name, channels,
                                   config->widths[i], 3, i == 0 ? 1 : 2, bn_momentum, bn_eps));
        channels = config->widths[i];
    }
    CM_TRY(cnn_name(what, prefix, "fc.weight"));
    CM_TRY(ag_params_declare(params, what, AG_GROUP_DENSE, 2, (int[]){num_experts, channels},
                             (ag_init){AG_INIT_NORMAL, 0.0f, fc_init_std}, &net->fc_weight));
    CM_TRY(cnn_name(what, prefix, "fc.bias"));
    return ag_params_declare(params, what, AG_GROUP_DENSE, 1, (int[]){num_experts},
                             (ag_init){AG_INIT_ZERO, 0.0f, 0.0f}, &net->fc_bias);
}

ag_tensor *moe_router_forward(ag_ctx *ctx, const moe_router_net *net, ag_tensor *x, bool training) {
    ag_tensor *h = x;
    for (int i = 0; i < net->n_convs; i++)
        h = cnn_conv_bn_forward(ctx, &net->convs[i], h, training, true);
    return ag_linear(ctx, ag_global_avgpool(ctx, h), ag_param_tensor(net->fc_weight),
                     ag_param_tensor(net->fc_bias));
}

int64_t moe_router_flops(const moe_router_config *config, int in_channels, int num_experts,
                         int height, int width) {
    int64_t total = 0;
    int channels = in_channels;
    for (int i = 0; i < config->n_convs; i++) {
        int stride = i == 0 ? 1 : 2;
        height = cnn_conv_out_size(height, 3, stride);
        width = cnn_conv_out_size(width, 3, stride);
        total += (int64_t)config->widths[i] * channels * 9 * height * width;
        channels = config->widths[i];
    }
    return total + (int64_t)channels * num_experts;
}

/* ---- the MoE-CNN ----------------------------------------------------------------- */

moe_cnn_config moe_cnn_default_config(void) {
    moe_cnn_config config = {.body = cnn_default_config(),
                             .num_experts = 2,
                             .routing = MOE_CNN_ROUTING_IMAGE,
                             .router = {2, {8, 16}},
                             .layer_router = {1, {8}},
                             .router_init_std = 0.01f};
    config.body.ratio = 0.5f;
    return config;
}

static cm_status check_router_config(const moe_router_config *config, const char *which) {
    if (config->n_convs < 0 || config->n_convs > MOE_ROUTER_MAX_CONVS)
        return CM_ERR(CM_ERR_INVALID, "moe_cnn: %s.n_convs = %d not in [0, %d]", which,
                      config->n_convs, MOE_ROUTER_MAX_CONVS);
    for (int i = 0; i < config->n_convs; i++)
        if (config->widths[i] < 1)
            return CM_ERR(CM_ERR_INVALID, "moe_cnn: %s.widths[%d] = %d (need >= 1)", which, i,
                          config->widths[i]);
    return CM_OK;
}

cm_status moe_cnn_config_check(const moe_cnn_config *config) {
    CM_TRY(cnn_config_check(&config->body));
    if (config->num_experts < 1 || config->num_experts > MOE_CONV_MAX_EXPERTS)
        return CM_ERR(CM_ERR_INVALID, "moe_cnn: num_experts = %d not in [1, %d]",
                      config->num_experts, MOE_CONV_MAX_EXPERTS);
    if (config->routing < 0 || config->routing >= MOE_CNN_ROUTING_COUNT)
        return CM_ERR(CM_ERR_INVALID, "moe_cnn: unknown routing %d", (int)config->routing);
    if (!(config->router_init_std > 0.0f))
        return CM_ERR(CM_ERR_INVALID, "moe_cnn: router_init_std = %g (need > 0)",
                      (double)config->router_init_std);
    CM_TRY(check_router_config(&config->router, "router"));
    return check_router_config(&config->layer_router, "layer_router");
}

static bool has_image_router(const moe_cnn_config *config) {
    return config->num_experts > 1 && config->routing == MOE_CNN_ROUTING_IMAGE;
}
static bool has_layer_routers(const moe_cnn_config *config) {
    return config->num_experts > 1 && config->routing == MOE_CNN_ROUTING_PER_LAYER;
}

/* PREFIX.stages.S.blocks.B.WHAT */
static cm_status block_name(char *buf, const char *prefix, const cnn_block_plan *plan,
                            const char *what) {
    char local[AG_PARAM_NAME_MAX];
    int length =
        snprintf(local, sizeof local, "stages.%d.blocks.%d.%s", plan->stage, plan->index, what);
    CM_ASSERT(length > 0 && length < AG_PARAM_NAME_MAX, "block name too long");
    return cnn_name(buf, prefix, local);
}

static cm_status declare_router(moe_router_net *net, ag_params *params, const char *name,
                                int in_channels, const moe_router_config *router,
                                const moe_cnn_config *config) {
    return moe_router_declare(net, params, name, in_channels, config->num_experts, router,
                              config->body.bn_momentum, config->body.bn_eps,
                              config->router_init_std);
}

cm_status moe_cnn_declare(moe_cnn_model *model, const moe_cnn_config *config, ag_params *params,
                          const char *prefix) {
    CM_TRY(moe_cnn_config_check(config));
    memset(model, 0, sizeof *model);
    model->config = *config;
    const cnn_config *body = &config->body;
    const int experts = config->num_experts;
    const float momentum = body->bn_momentum, eps = body->bn_eps;
    char name[AG_PARAM_NAME_MAX], bn_name[AG_PARAM_NAME_MAX];
    CM_TRY(cnn_name(name, prefix, "stem.conv"));
    CM_TRY(cnn_name(bn_name, prefix, "stem.bn"));
    CM_TRY(cnn_conv_bn_declare(&model->stem, params, name, bn_name, body->in_channels,
                               body->stem_channels, 3, 1, momentum, eps));
    if (has_image_router(config)) {
        CM_TRY(cnn_name(name, prefix, "router"));
        CM_TRY(declare_router(&model->router, params, name, body->in_channels, &config->router,
                              config));
    }
    cnn_block_plan plan[CNN_MAX_BLOCKS];
    model->n_blocks = cnn_plan(body, plan);
    int features = body->stem_channels;
    for (int i = 0; i < model->n_blocks; i++) {
        moe_cnn_block *block = &model->blocks[i];
        const cnn_block_plan *p = &plan[i];
        const int width = p->out_channels;
        block->plan = *p;
        CM_TRY(block_name(name, prefix, p, "conv1"));
        CM_TRY(moe_conv_declare(&block->conv1, params, name, p->in_channels, width, experts, 3,
                                p->stride));
        CM_TRY(block_name(name, prefix, p, "bn1"));
        CM_TRY(cnn_bn_declare(&block->bn1, params, name, width, momentum, eps));
        CM_TRY(block_name(name, prefix, p, "conv2"));
        CM_TRY(moe_conv_declare(&block->conv2, params, name, width, width, experts, 3, 1));
        CM_TRY(block_name(name, prefix, p, "bn2"));
        CM_TRY(cnn_bn_declare(&block->bn2, params, name, width, momentum, eps));
        if (p->projection) {
            CM_TRY(block_name(name, prefix, p, "shortcut.conv"));
            CM_TRY(block_name(bn_name, prefix, p, "shortcut.bn"));
            CM_TRY(cnn_conv_bn_declare(&block->shortcut, params, name, bn_name, p->in_channels,
                                       width, 1, p->stride, momentum, eps));
        }
        if (has_layer_routers(config)) {
            CM_TRY(block_name(name, prefix, p, "conv1.router"));
            CM_TRY(declare_router(&block->router1, params, name, p->in_channels,
                                  &config->layer_router, config));
            CM_TRY(block_name(name, prefix, p, "conv2.router"));
            CM_TRY(declare_router(&block->router2, params, name, width, &config->layer_router,
                                  config));
        }
        features = width;
    }
    CM_TRY(cnn_name(name, prefix, "fc.weight"));
    CM_TRY(ag_params_declare(params, name, AG_GROUP_DENSE, 2, (int[]){body->num_classes, features},
                             (ag_init){AG_INIT_NORMAL, 0.0f, body->fc_init_std},
                             &model->fc_weight));
    CM_TRY(cnn_name(name, prefix, "fc.bias"));
    return ag_params_declare(params, name, AG_GROUP_DENSE, 1, (int[]){body->num_classes},
                             (ag_init){AG_INIT_ZERO, 0.0f, 0.0f}, &model->fc_bias);
}

/* Appends the router's parameters to out (up to capacity); returns the new count. */
static int collect_router(const moe_router_net *net, ag_param **out, int capacity, int count) {
    for (int i = 0; i <= net->n_convs; i++) {
        ag_param *items[5] = {net->fc_weight, net->fc_bias, NULL, NULL, NULL};
        if (i < net->n_convs) {
            const cnn_conv_bn *unit = &net->convs[i];
            ag_param *conv_items[5] = {unit->weight, unit->bn.weight, unit->bn.bias,
                                       unit->bn.running_mean, unit->bn.running_var};
            memcpy(items, conv_items, sizeof items);
        }
        for (int k = 0; k < 5 && items[k]; k++, count++)
            if (count < capacity) out[count] = items[k];
    }
    return count;
}

int moe_cnn_router_params(const moe_cnn_model *model, ag_param **out, int capacity) {
    int count = 0;
    if (has_image_router(&model->config))
        count = collect_router(&model->router, out, capacity, count);
    if (has_layer_routers(&model->config))
        for (int i = 0; i < model->n_blocks; i++) {
            count = collect_router(&model->blocks[i].router1, out, capacity, count);
            count = collect_router(&model->blocks[i].router2, out, capacity, count);
        }
    return count;
}

int moe_cnn_router_count(const moe_cnn_model *model) {
    if (has_image_router(&model->config)) return 1;
    return has_layer_routers(&model->config) ? 2 * model->n_blocks : 0;
}

/* Runs one router on `input`, picks the experts (argmax or forced), builds
 * the straight-through mask and records them as router out->n_routers. */
static cm_status route(ag_ctx *ctx, const moe_router_net *net, ag_tensor *input,
                       const moe_cnn_forward_args *args, moe_cnn_output *out, ag_tensor **mask,
                       const int32_t **expert) {
    const int r = out->n_routers;
    ag_tensor *logits = moe_router_forward(ctx, net, input, args->training);
    int32_t *choice = logits ? ag_alloc_ints(ctx, logits->shape[0], "moe_cnn_route") : NULL;
    if (!choice)
        return ag_failed(ctx) ? ag_ctx_status(ctx) : CM_ERR(CM_ERR_INTERNAL, "no router logits");
    const int batch = logits->shape[0];
    if (args->forced_experts)
        memcpy(choice, args->forced_experts[r], (size_t)batch * sizeof(int32_t));
    else
        ag_argmax_rows(logits, choice);
    /* A gradient-free alias of the logits makes the mask a constant. */
    ag_tensor *source = args->no_router_gradient
                            ? ag_alias(ctx, "router_logits", logits->data, 2, logits->shape)
                            : logits;
    *mask = ag_onehot_st(ctx, source, choice);
    *expert = choice;
    out->router_logits[r] = logits;
    out->experts[r] = choice;
    out->n_routers = r + 1;
    return ag_ctx_status(ctx);
}

cm_status moe_cnn_forward(ag_ctx *ctx, const moe_cnn_model *model, ag_tensor *x,
                          const moe_cnn_forward_args *args, moe_cnn_output *out) {
    memset(out, 0, sizeof *out);
    if (ag_failed(ctx)) return ag_ctx_status(ctx);
    if (!x) return CM_ERR(CM_ERR_INVALID, "moe_cnn_forward: no input");
    const moe_cnn_config *config = &model->config;
    char shape[64];
    CM_ASSERT(x->ndim == 4 && x->shape[1] == config->body.in_channels,
              "moe_cnn_forward: x %s, want [N,%d,H,W]", ag_shape_str(x, shape, sizeof shape),
              config->body.in_channels);
    if (args->router_input && !has_image_router(config))
        return CM_ERR(CM_ERR_INVALID,
                      "moe_cnn_forward: router_input needs image-level routing with E > 1");
    const bool training = args->training, all = args->compute_all_groups;
    const bool per_layer = has_layer_routers(config);
    ag_tensor *mask = NULL;
    const int32_t *expert = NULL;
    if (has_image_router(config)) {
        ag_tensor *router_input = args->router_input ? args->router_input : x;
        CM_ASSERT(router_input->shape[0] == x->shape[0],
                  "moe_cnn_forward: router_input has %d "
                  "images, x %d",
                  router_input->shape[0], x->shape[0]);
        CM_TRY(route(ctx, &model->router, router_input, args, out, &mask, &expert));
    }
    ag_tensor *h = cnn_conv_bn_forward(ctx, &model->stem, x, training, true);
    for (int i = 0; i < model->n_blocks; i++) {
        const moe_cnn_block *block = &model->blocks[i];
        if (per_layer) CM_TRY(route(ctx, &block->router1, h, args, out, &mask, &expert));
        ag_tensor *a = moe_conv_forward(ctx, &block->conv1, h, mask, expert, all);
        a = ag_relu(ctx, cnn_bn_forward(ctx, &block->bn1, a, training));
        if (per_layer) CM_TRY(route(ctx, &block->router2, a, args, out, &mask, &expert));
        a = moe_conv_forward(ctx, &block->conv2, a, mask, expert, all);
        a = cnn_bn_forward(ctx, &block->bn2, a, training);
        ag_tensor *skip = block->plan.projection
                              ? cnn_conv_bn_forward(ctx, &block->shortcut, h, training, false)
                              : h;
        h = ag_relu(ctx, ag_add(ctx, a, skip));
    }
    out->logits = ag_linear(ctx, ag_global_avgpool(ctx, h), ag_param_tensor(model->fc_weight),
                            ag_param_tensor(model->fc_bias));
    if (!out->logits && !ag_failed(ctx))
        return CM_ERR(CM_ERR_INTERNAL, "moe_cnn_forward: no logits");
    return ag_ctx_status(ctx);
}

moe_cnn_flops_report moe_cnn_flops(const moe_cnn_config *config, int height, int width) {
    const cnn_config *body = &config->body;
    const int experts = config->num_experts;
    moe_cnn_flops_report report = {0};
    int64_t stem = (int64_t)body->stem_channels * body->in_channels * 9 * height * width;
    report.backbone = report.all_groups = stem;
    if (has_image_router(config))
        report.router +=
            moe_router_flops(&config->router, body->in_channels, experts, height, width);
    cnn_block_plan plan[CNN_MAX_BLOCKS];
    int n = cnn_plan(body, plan), features = body->stem_channels;
    for (int i = 0; i < n; i++) {
        const cnn_block_plan *p = &plan[i];
        int ho = cnn_conv_out_size(height, 3, p->stride),
            wo = cnn_conv_out_size(width, 3, p->stride);
        int64_t out_plane = (int64_t)ho * wo, w = p->out_channels;
        int64_t convs = w * p->in_channels * 9 * out_plane + w * w * 9 * out_plane; /* one group */
        int64_t shortcut = p->projection ? w * p->in_channels * out_plane : 0;
        report.backbone += convs + shortcut;
        report.all_groups += experts * convs + shortcut;
        if (has_layer_routers(config))
            report.router +=
                moe_router_flops(&config->layer_router, p->in_channels, experts, height, width) +
                moe_router_flops(&config->layer_router, p->out_channels, experts, ho, wo);
        height = ho;
        width = wo;
        features = p->out_channels;
    }
    int64_t classifier = (int64_t)features * body->num_classes;
    report.backbone += classifier;
    report.all_groups += classifier;
    report.total = report.backbone + report.router;
    return report;
}
