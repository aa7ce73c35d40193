/* The ResNet-style CNN and its conv + batch-norm units; see cnn.h. */
#include "layers/cnn.h"

#include <math.h>
#include <stdio.h>

#include "autograd/ops_conv.h"
#include "common/check.h"

cnn_config cnn_default_config(void) {
    return (cnn_config){.in_channels = 1,
                        .num_classes = 10,
                        .stem_channels = 32,
                        .n_stages = 3,
                        .widths = {32, 64, 128},
                        .blocks = {1, 1, 1},
                        .ratio = 1.0f,
                        .bn_momentum = 0.1f,
                        .bn_eps = 1e-5f,
                        .fc_init_std = 0.01f};
}

int cnn_stage_width(const cnn_config *config, int stage) {
    /* The product in double plus a hair, so 0.7 * 10 gives 7 as Python's
     * int(0.7 * 10) does although 0.7f is slightly below 0.7. */
    return (int)floor((double)config->ratio * config->widths[stage] + 1e-4);
}

cm_status cnn_config_check(const cnn_config *c) {
    if (c->in_channels < 1 || c->num_classes < 2 || c->stem_channels < 1)
        return CM_ERR(CM_ERR_INVALID,
                      "cnn: in_channels (%d) and stem_channels (%d) must be >= 1 and "
                      "num_classes (%d) >= 2",
                      c->in_channels, c->stem_channels, c->num_classes);
    if (c->n_stages < 0 || c->n_stages > CNN_MAX_STAGES)
        return CM_ERR(CM_ERR_INVALID, "cnn: n_stages = %d not in [0, %d]", c->n_stages,
                      CNN_MAX_STAGES);
    if (!(c->ratio > 0.0f) || !(c->bn_eps > 0.0f) || !(c->fc_init_std > 0.0f) ||
        !(c->bn_momentum >= 0.0f && c->bn_momentum <= 1.0f))
        return CM_ERR(CM_ERR_INVALID,
                      "cnn: ratio (%g), bn_eps (%g) and fc_init_std (%g) must be > 0 and "
                      "bn_momentum (%g) in [0, 1]",
                      (double)c->ratio, (double)c->bn_eps, (double)c->fc_init_std,
                      (double)c->bn_momentum);
    int total = 0;
    for (int s = 0; s < c->n_stages; s++) {
        if (c->blocks[s] < 1 || c->widths[s] < 1)
            return CM_ERR(CM_ERR_INVALID, "cnn: stage %d has %d blocks of width %d (need >= 1)", s,
                          c->blocks[s], c->widths[s]);
        if (cnn_stage_width(c, s) < 1)
            return CM_ERR(CM_ERR_INVALID, "cnn: ratio %g leaves stage %d (width %d) no channels",
                          (double)c->ratio, s, c->widths[s]);
        total += c->blocks[s];
    }
    if (total > CNN_MAX_BLOCKS)
        return CM_ERR(CM_ERR_INVALID, "cnn: %d blocks exceed the supported %d", total,
                      CNN_MAX_BLOCKS);
    return CM_OK;
}

int cnn_plan(const cnn_config *config, cnn_block_plan plan[CNN_MAX_BLOCKS]) {
    int n = 0, channels = config->stem_channels;
    for (int s = 0; s < config->n_stages; s++) {
        int width = cnn_stage_width(config, s);
        for (int b = 0; b < config->blocks[s]; b++) {
            CM_ASSERT(n < CNN_MAX_BLOCKS, "cnn: more than %d blocks", CNN_MAX_BLOCKS);
            int stride = s > 0 && b == 0 ? 2 : 1;
            plan[n++] = (cnn_block_plan){.stage = s,
                                         .index = b,
                                         .in_channels = channels,
                                         .out_channels = width,
                                         .stride = stride,
                                         .projection = stride != 1 || channels != width};
            channels = width;
        }
    }
    return n;
}

int cnn_conv_out_size(int in, int kernel, int stride) {
    return (in + 2 * (kernel / 2) - kernel) / stride + 1;
}

cm_status cnn_name(char *buf, const char *prefix, const char *what) {
    bool prefixed = prefix && prefix[0];
    int length = prefixed ? snprintf(buf, AG_PARAM_NAME_MAX, "%s.%s", prefix, what)
                          : snprintf(buf, AG_PARAM_NAME_MAX, "%s", what);
    if (length < 0 || length >= AG_PARAM_NAME_MAX)
        return CM_ERR(CM_ERR_INVALID, "parameter name '%s%s%s' longer than %d characters",
                      prefixed ? prefix : "", prefixed ? "." : "", what, AG_PARAM_NAME_MAX - 1);
    return CM_OK;
}

ag_init cnn_kaiming_init(int out_channels, int kernel) {
    return (ag_init){AG_INIT_NORMAL, 0.0f,
                     (float)sqrt(2.0 / ((double)out_channels * kernel * kernel))};
}

/* ---- units ------------------------------------------------------------------ */

cm_status cnn_bn_declare(cnn_bn *bn, ag_params *params, const char *name, int channels,
                         float momentum, float eps) {
    char full[AG_PARAM_NAME_MAX];
    const ag_init zero = {AG_INIT_ZERO, 0.0f, 0.0f}, one = {AG_INIT_CONSTANT, 1.0f, 0.0f};
    const int shape[1] = {channels};
    struct {
        const char *what;
        ag_init init;
        ag_param **out;
        bool state;
    } const items[4] = {{"weight", one, &bn->weight, false},
                        {"bias", zero, &bn->bias, false},
                        {"running_mean", zero, &bn->running_mean, true},
                        {"running_var", one, &bn->running_var, true}};
    for (int i = 0; i < 4; i++) {
        CM_TRY(cnn_name(full, name, items[i].what));
        CM_TRY(
            ag_params_declare(params, full, AG_GROUP_DENSE, 1, shape, items[i].init, items[i].out));
        if (items[i].state) ag_param_set_frozen(*items[i].out, true);
    }
    bn->momentum = momentum;
    bn->eps = eps;
    return CM_OK;
}

ag_tensor *cnn_bn_forward(ag_ctx *ctx, const cnn_bn *bn, ag_tensor *x, bool training) {
    return ag_batchnorm2d(ctx, x, ag_param_tensor(bn->weight), ag_param_tensor(bn->bias),
                          ag_param_tensor(bn->running_mean)->data,
                          ag_param_tensor(bn->running_var)->data, training, bn->momentum, bn->eps);
}

cm_status cnn_conv_bn_declare(cnn_conv_bn *unit, ag_params *params, const char *conv_name,
                              const char *bn_name, int in_channels, int out_channels, int kernel,
                              int stride, float momentum, float eps) {
    char full[AG_PARAM_NAME_MAX];
    CM_TRY(cnn_name(full, conv_name, "weight"));
    CM_TRY(ag_params_declare(params, full, AG_GROUP_DENSE, 4,
                             (int[]){out_channels, in_channels, kernel, kernel},
                             cnn_kaiming_init(out_channels, kernel), &unit->weight));
    unit->stride = stride;
    unit->padding = kernel / 2;
    return cnn_bn_declare(&unit->bn, params, bn_name, out_channels, momentum, eps);
}

ag_tensor *cnn_conv_bn_forward(ag_ctx *ctx, const cnn_conv_bn *unit, ag_tensor *x, bool training,
                               bool relu) {
    ag_tensor *h =
        ag_conv2d(ctx, x, ag_param_tensor(unit->weight), NULL, unit->stride, unit->padding);
    h = cnn_bn_forward(ctx, &unit->bn, h, training);
    return relu ? ag_relu(ctx, h) : h;
}

/* ---- the dense network -------------------------------------------------------- */

cm_status cnn_declare(cnn_model *model, const cnn_config *config, ag_params *params,
                      const char *prefix) {
    CM_TRY(cnn_config_check(config));
    const cnn_config *c = config;
    model->config = *c;
    char conv_name[AG_PARAM_NAME_MAX], bn_name[AG_PARAM_NAME_MAX], what[AG_PARAM_NAME_MAX];
    float momentum = c->bn_momentum, eps = c->bn_eps;
    CM_TRY(cnn_name(conv_name, prefix, "stem.conv"));
    CM_TRY(cnn_name(bn_name, prefix, "stem.bn"));
    CM_TRY(cnn_conv_bn_declare(&model->stem, params, conv_name, bn_name, c->in_channels,
                               c->stem_channels, 3, 1, momentum, eps));
    cnn_block_plan plan[CNN_MAX_BLOCKS];
    model->n_blocks = cnn_plan(c, plan);
    int features = c->stem_channels;
    for (int i = 0; i < model->n_blocks; i++) {
        cnn_block *block = &model->blocks[i];
        const cnn_block_plan *p = &plan[i];
        block->plan = *p;
        const struct {
            cnn_conv_bn *unit;
            const char *conv, *bn;
            int in, kernel, stride;
        } units[3] = {
            {&block->conv1, "conv1", "bn1", p->in_channels, 3, p->stride},
            {&block->conv2, "conv2", "bn2", p->out_channels, 3, 1},
            {&block->shortcut, "shortcut.conv", "shortcut.bn", p->in_channels, 1, p->stride}};
        for (int u = 0; u < (p->projection ? 3 : 2); u++) {
            snprintf(what, sizeof what, "stages.%d.blocks.%d.%s", p->stage, p->index,
                     units[u].conv);
            CM_TRY(cnn_name(conv_name, prefix, what));
            snprintf(what, sizeof what, "stages.%d.blocks.%d.%s", p->stage, p->index, units[u].bn);
            CM_TRY(cnn_name(bn_name, prefix, what));
            CM_TRY(cnn_conv_bn_declare(units[u].unit, params, conv_name, bn_name, units[u].in,
                                       p->out_channels, units[u].kernel, units[u].stride, momentum,
                                       eps));
        }
        features = p->out_channels;
    }
    CM_TRY(cnn_name(what, prefix, "fc.weight"));
    CM_TRY(ag_params_declare(params, what, AG_GROUP_DENSE, 2, (int[]){c->num_classes, features},
                             (ag_init){AG_INIT_NORMAL, 0.0f, c->fc_init_std}, &model->fc_weight));
    CM_TRY(cnn_name(what, prefix, "fc.bias"));
    return ag_params_declare(params, what, AG_GROUP_DENSE, 1, (int[]){c->num_classes},
                             (ag_init){AG_INIT_ZERO, 0.0f, 0.0f}, &model->fc_bias);
}

/* x [N,Win,H,W] -> [N,W,HO,WO] */
static ag_tensor *block_forward(ag_ctx *ctx, const cnn_block *block, ag_tensor *x, bool training) {
    ag_tensor *h = cnn_conv_bn_forward(ctx, &block->conv1, x, training, true);
    h = cnn_conv_bn_forward(ctx, &block->conv2, h, training, false);
    ag_tensor *skip =
        block->plan.projection ? cnn_conv_bn_forward(ctx, &block->shortcut, x, training, false) : x;
    return ag_relu(ctx, ag_add(ctx, h, skip));
}

ag_tensor *cnn_forward(ag_ctx *ctx, const cnn_model *model, ag_tensor *x,
                       const cnn_forward_args *args) {
    if (!x || ag_failed(ctx)) return NULL;
    char shape[64];
    CM_ASSERT(x->ndim == 4 && x->shape[1] == model->config.in_channels,
              "cnn_forward: x %s, want [N,%d,H,W]", ag_shape_str(x, shape, sizeof shape),
              model->config.in_channels);
    ag_tensor *h = cnn_conv_bn_forward(ctx, &model->stem, x, args->training, true);
    for (int i = 0; i < model->n_blocks; i++)
        h = block_forward(ctx, &model->blocks[i], h, args->training);
    return ag_linear(ctx, ag_global_avgpool(ctx, h), ag_param_tensor(model->fc_weight),
                     ag_param_tensor(model->fc_bias));
}

int64_t cnn_flops(const cnn_config *config, int height, int width) {
    const cnn_config *c = config;
    int64_t total = (int64_t)c->stem_channels * c->in_channels * 9 * height * width;
    cnn_block_plan plan[CNN_MAX_BLOCKS];
    int n = cnn_plan(c, plan), features = c->stem_channels;
    for (int i = 0; i < n; i++) {
        const cnn_block_plan *p = &plan[i];
        int ho = cnn_conv_out_size(height, 3, p->stride),
            wo = cnn_conv_out_size(width, 3, p->stride);
        int64_t out_plane = (int64_t)ho * wo;
        total += (int64_t)p->out_channels * p->in_channels * 9 * out_plane;  /* conv1 */
        total += (int64_t)p->out_channels * p->out_channels * 9 * out_plane; /* conv2 */
        if (p->projection) total += (int64_t)p->out_channels * p->in_channels * out_plane;
        height = ho;
        width = wo;
        features = p->out_channels;
    }
    return total + (int64_t)features * c->num_classes;
}
