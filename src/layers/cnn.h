/* The ResNet-style CNN for images (NCHW), and the conv + batch-norm units it
 * is built from (also used by the MoE-CNN and its routers, layers/moe_conv.h).
 *
 *   x [N,C,H,W] -> stem: conv3x3 (stem_channels, stride 1) -> BN -> ReLU
 *     -> stage s = 0..S-1: blocks[s] BasicBlocks of width int(ratio * widths[s]);
 *        the first block of stage s > 0 has stride 2, every other one stride 1
 *     -> global average pool [N,W] -> linear -> logits [N,V]
 *   BasicBlock(x) = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)):
 *     conv1, conv2 3x3 with padding 1 and no bias (conv1 carries the stride);
 *     shortcut = x when the stride is 1 and the widths agree, else a 1x1 conv
 *     (same stride, no bias) + BN, as the AdvMoE release's CIFAR ResNet.
 * The stem is not scaled by `ratio` (as the release, where only the stage
 * widths are), so a ratio < 1 network keeps the stem and gets a projection
 * shortcut in its first block.
 *
 * Batch-norm running statistics are model state, not trained values. They are
 * declared as parameters of the dense group named PREFIX.running_mean and
 * PREFIX.running_var and marked frozen: the optimizers, clipping and weight
 * decay skip them, they get no gradient and no optimizer moments, but they
 * live in the flat buffer, so checkpoints store and restore them by name and
 * an eval run after a resume uses the trained statistics. ag_batchnorm2d
 * updates them in place in training mode (PyTorch's rule, momentum 0.1).
 * Under data parallelism every rank updates its own copy from its part of the
 * batch; the trainer should average or broadcast them before saving or
 * evaluating (PyTorch DDP broadcasts rank 0's buffers).
 *
 * Parameter names (PREFIX. prepended when a prefix is given):
 *   stem.conv.weight [S0,C,3,3], stem.bn.{weight,bias,running_mean,running_var} [S0],
 *   stages.S.blocks.B.{conv1,conv2}.weight [W,Win,3,3], .{bn1,bn2}.* [W],
 *   stages.S.blocks.B.shortcut.conv.weight [W,Win,1,1], .shortcut.bn.* [W],
 *   fc.weight [V,W], fc.bias [V].
 * Init (the release's initialize_weights): conv weights Kaiming normal with
 * fan_out and the ReLU gain, std sqrt(2 / (CO*KH*KW)); linear N(0, fc_init_std)
 * with zero bias; BN weight 1, bias 0, running mean 0, running var 1.
 * Owns: parameter handles only; parameters live in the ag_params registry. */
#ifndef CMOE_LAYERS_CNN_H
#define CMOE_LAYERS_CNN_H

#include <stdbool.h>
#include <stdint.h>

#include "autograd/ops.h"
#include "autograd/params.h"

enum { CNN_MAX_STAGES = 4, CNN_MAX_BLOCKS = 32 };

typedef struct cnn_config {
    int in_channels; /* C: 1 for Fashion-MNIST */
    int num_classes; /* V */
    int stem_channels;
    int n_stages; /* 0..CNN_MAX_STAGES; 0: stem -> pool -> linear */
    int widths[CNN_MAX_STAGES];
    int blocks[CNN_MAX_STAGES]; /* BasicBlocks per stage, >= 1 */
    float ratio;                /* stage width = int(ratio * widths[s]), >= 1 */
    float bn_momentum;          /* PyTorch's 0.1 */
    float bn_eps;               /* PyTorch's 1e-5 */
    float fc_init_std;          /* 0.01 */
} cnn_config;

/* A small Fashion-MNIST ResNet: stem 32, stages 32/64/128 with one block each,
 * ratio 1, 10 classes, 1 input channel (METHODS.md 4.6). */
cnn_config cnn_default_config(void);
/* Checks sizes and ranges; a clear CM_ERR_INVALID naming the field. */
cm_status cnn_config_check(const cnn_config *config);
/* int(ratio * widths[stage]), as Python's int() of the product. */
int cnn_stage_width(const cnn_config *config, int stage);

/* Where each BasicBlock sits and what it maps, in forward order. */
typedef struct cnn_block_plan {
    int stage, index; /* index within the stage */
    int in_channels, out_channels, stride;
    bool projection; /* 1x1 conv + BN shortcut (else identity) */
} cnn_block_plan;
/* Fills plan[0..n) and returns n (the total block count). */
int cnn_plan(const cnn_config *config, cnn_block_plan plan[CNN_MAX_BLOCKS]);
/* Output size of a conv or pool with padding kernel / 2 (floor mode). */
int cnn_conv_out_size(int in, int kernel, int stride);

/* ---- units ------------------------------------------------------------------ */

typedef struct cnn_bn {
    ag_param *weight, *bias;              /* [C], trained */
    ag_param *running_mean, *running_var; /* [C], frozen state */
    float momentum, eps;
} cnn_bn;

/* A bias-free conv with padding kernel / 2, followed by batch norm. */
typedef struct cnn_conv_bn {
    ag_param *weight; /* [CO,C,K,K] */
    cnn_bn bn;
    int stride, padding;
} cnn_conv_bn;

/* Declares NAME.weight, NAME.bias, NAME.running_mean, NAME.running_var. */
cm_status cnn_bn_declare(cnn_bn *bn, ag_params *params, const char *name, int channels,
                         float momentum, float eps);
/* x [N,C,H,W] -> [N,C,H,W]: batch statistics (and the running-statistics
 * update) when training, the running statistics otherwise. */
ag_tensor *cnn_bn_forward(ag_ctx *ctx, const cnn_bn *bn, ag_tensor *x, bool training);

/* Declares CONV_NAME.weight (Kaiming, fan_out) and the BN under BN_NAME. */
cm_status cnn_conv_bn_declare(cnn_conv_bn *unit, ag_params *params, const char *conv_name,
                              const char *bn_name, int in_channels, int out_channels, int kernel,
                              int stride, float momentum, float eps);
/* x [N,C,H,W] -> [N,CO,HO,WO]: bn(conv(x)), then ReLU when `relu`. */
ag_tensor *cnn_conv_bn_forward(ag_ctx *ctx, const cnn_conv_bn *unit, ag_tensor *x, bool training,
                               bool relu);

/* N(0, std^2) for a conv weight [CO,...,K,K]: Kaiming normal, fan_out mode,
 * ReLU gain: std = sqrt(2 / (CO K K)). */
ag_init cnn_kaiming_init(int out_channels, int kernel);
/* "PREFIX.what" into buf [AG_PARAM_NAME_MAX], or "what" when prefix is NULL
 * or empty; CM_ERR_INVALID when the name does not fit. */
cm_status cnn_name(char *buf, const char *prefix, const char *what);

/* ---- the dense network -------------------------------------------------------- */

typedef struct cnn_block {
    cnn_block_plan plan;
    cnn_conv_bn conv1, conv2;
    cnn_conv_bn shortcut; /* used when plan.projection */
} cnn_block;

typedef struct cnn_model {
    cnn_config config;
    cnn_conv_bn stem;
    int n_blocks;
    cnn_block blocks[CNN_MAX_BLOCKS];
    ag_param *fc_weight, *fc_bias; /* [V,W], [V] */
} cnn_model;

/* Checks the config and declares every parameter under `prefix` (NULL or ""
 * for none); call ag_params_finalize afterwards. */
cm_status cnn_declare(cnn_model *model, const cnn_config *config, ag_params *params,
                      const char *prefix);

typedef struct cnn_forward_args {
    /* Batch norm: batch statistics and running-statistic updates when true,
     * running statistics (no update) when false (evaluation, and the attacks
     * of the release, which run in eval mode). */
    bool training;
} cnn_forward_args;

/* x [N,C,H,W] -> logits [N,V]; NULL if the context failed. */
ag_tensor *cnn_forward(ag_ctx *ctx, const cnn_model *model, ag_tensor *x,
                       const cnn_forward_args *args);

/* Multiply-adds of one image's inference through the convs and the linear
 * layer (batch norm, ReLU, the residual adds and pooling are not counted,
 * as in the usual FLOP tables), for an input of height x width. */
int64_t cnn_flops(const cnn_config *config, int height, int width);

#endif
