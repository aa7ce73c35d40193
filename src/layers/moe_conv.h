/* The MoE-CNN of AdvMoE (METHODS.md 4.2): the ResNet of layers/cnn.h in
 * which every 3x3 conv of the BasicBlocks is a channel-group MoE conv, plus
 * the routers that choose one group per image.
 *
 * MoE conv. E experts of width w = int(ratio * dense width) share one weight
 * [E*w, C, K, K]; expert e owns filters [e*w, (e+1)*w). Each image runs only
 * its chosen expert's filters, so the next layer always receives w channels
 * (its input weights are shared by all experts). The output is the chosen
 * group's conv output times the routing mask entry of that expert, which is
 * 1 in the forward pass; the release's hard top-1 (GetMask) is
 *   mask = onehot(argmax logits)  forward,  dlogits = dmask  backward
 * (ag_onehot_st). No softmax weighting: the chosen channels pass unscaled.
 *
 * Gradient to the router, exactly as the release: it multiplies the FULL conv
 * output [N,E*w,..] by the channel mask and then keeps only the chosen
 * channels, so the dropped channels get no gradient and the mask gradient is
 * d loss / d mask[n,e] = sum over expert e's channels and positions of
 *   dL/dout * conv_out  for the chosen e = expert[n], and 0 for every other e.
 * Only the chosen logit of each image receives a gradient, and the other
 * groups' outputs are not needed for it. (METHODS.md 4.2 says the other
 * logits get sum(dL/dout * out_e) too; the release's index selection makes
 * dL/dout zero there, so they get 0.) cmoe therefore computes only the chosen
 * group per image, in training and at inference: each image's conv runs
 * with its group's slice of the weight (ag_conv2d_grouped), in place.
 * `compute_all_groups` switches to the release's literal computation (full
 * conv, mask, channel gather); it gives the same values and gradients at E
 * times the conv cost and is kept to test that equivalence.
 *
 * Routers (num_experts > 1):
 *   - image-level (default, code-faithful): ONE router network reads the input
 *     image and its choice is used by every MoE conv (a whole-pathway choice);
 *     all MoE convs' mask gradients add up in its logits;
 *   - per-layer (paper-style): each MoE conv has its own router network
 *     reading that conv's input.
 *   A router network is n_convs conv3x3-BN-ReLU units (the first with stride
 *   1, the others stride 2) -> global average pool -> linear to E logits. The
 *   release's image router is a ResNet-20; METHODS.md 4.6 uses the small
 *   plain stack (e.g. widths 8/16) on Fashion-MNIST, which is what this is.
 *
 * Everything else is dense and as cnn.h: the stem (not scaled by ratio), BN
 * after each MoE conv (width w), the projection shortcuts, the classifier.
 * With num_experts == 1 there is no router and the network is cnn.h's with
 * the same parameter names (a dense net of width ratio * width).
 *
 * Parameter names (dense group; the experts are channel groups of one conv,
 * not separate tensors, so they are not sharded by expert parallelism):
 *   cnn.h's names, with stages.S.blocks.B.{conv1,conv2}.weight [E*w,Cin,3,3];
 *   router.convs.I.{conv,bn}.*, router.fc.{weight [E,R],bias [E]} (image-level);
 *   stages.S.blocks.B.{conv1,conv2}.router.convs.I.*, .router.fc.* (per-layer).
 * Init as cnn.h (MoE conv: Kaiming fan_out over all E*w filters, as the
 * release's single nn.Conv2d); router linear N(0, router_init_std), zero bias.
 * Owns: parameter handles only. */
#ifndef CMOE_LAYERS_MOE_CONV_H
#define CMOE_LAYERS_MOE_CONV_H

#include <stdbool.h>
#include <stdint.h>

#include "autograd/ops.h"
#include "autograd/params.h"
#include "layers/cnn.h"

enum { MOE_CONV_MAX_EXPERTS = 64, MOE_ROUTER_MAX_CONVS = 4 };

/* ---- the MoE conv ----------------------------------------------------------- */

typedef struct moe_conv {
    ag_param *weight; /* [E*w, C, K, K] */
    int num_experts, expert_width, in_channels;
    int kernel, stride, padding; /* padding = kernel / 2 */
} moe_conv;

/* Declares NAME.weight. */
cm_status moe_conv_declare(moe_conv *conv, ag_params *params, const char *name, int in_channels,
                           int expert_width, int num_experts, int kernel, int stride);

/* x [N,C,H,W], mask [N,E] (the routing mask, normally from ag_onehot_st;
 * NULL only when E == 1: then this is a plain conv), expert[N] in [0,E) (the
 * chosen group of each image; read in forward only) -> [N,w,HO,WO] =
 * conv(x, filters of expert[n]) * mask[n, expert[n]]. */
ag_tensor *moe_conv_forward(ag_ctx *ctx, const moe_conv *conv, ag_tensor *x, ag_tensor *mask,
                            const int32_t *expert, bool compute_all_groups);

/* ---- router networks ---------------------------------------------------------- */

typedef struct moe_router_config {
    int n_convs; /* 0..MOE_ROUTER_MAX_CONVS (0: pool the input, then linear) */
    int widths[MOE_ROUTER_MAX_CONVS];
} moe_router_config;

typedef struct moe_router_net {
    int n_convs;
    cnn_conv_bn convs[MOE_ROUTER_MAX_CONVS];
    ag_param *fc_weight, *fc_bias; /* [E,R], [E] */
} moe_router_net;

/* Declares PREFIX.convs.I.{conv,bn}.* and PREFIX.fc.{weight,bias}. */
cm_status moe_router_declare(moe_router_net *net, ag_params *params, const char *prefix,
                             int in_channels, int num_experts, const moe_router_config *config,
                             float bn_momentum, float bn_eps, float fc_init_std);
/* x [N,C,H,W] -> logits [N,E]. */
ag_tensor *moe_router_forward(ag_ctx *ctx, const moe_router_net *net, ag_tensor *x, bool training);
/* Multiply-adds of one router evaluation on a C x H x W input. */
int64_t moe_router_flops(const moe_router_config *config, int in_channels, int num_experts,
                         int height, int width);

/* ---- the MoE-CNN ----------------------------------------------------------------- */

typedef enum moe_cnn_routing {
    MOE_CNN_ROUTING_IMAGE = 0,     /* one router on the image, shared (release) */
    MOE_CNN_ROUTING_PER_LAYER = 1, /* one router per MoE conv, on its input (paper) */
    MOE_CNN_ROUTING_COUNT
} moe_cnn_routing;
/* The spellings recipes use (moe.cnn_routing), in enum order, NULL-terminated. */
extern const char *const moe_cnn_routing_names[MOE_CNN_ROUTING_COUNT + 1];

typedef struct moe_cnn_config {
    cnn_config body; /* topology; body.ratio sets the expert width w */
    int num_experts; /* E in [1, MOE_CONV_MAX_EXPERTS]; 1: dense, no router */
    moe_cnn_routing routing;
    moe_router_config router;       /* the image-level router network */
    moe_router_config layer_router; /* each per-layer router network */
    float router_init_std;          /* router linear init std (0.01) */
} moe_cnn_config;

/* E = 2, ratio 0.5 on cnn_default_config(), image-level router 8/16,
 * per-layer routers one conv of 8 (METHODS.md 4.6). */
moe_cnn_config moe_cnn_default_config(void);
cm_status moe_cnn_config_check(const moe_cnn_config *config);

enum { MOE_CNN_MAX_ROUTERS = 2 * CNN_MAX_BLOCKS };

typedef struct moe_cnn_block {
    cnn_block_plan plan;
    moe_conv conv1, conv2;
    cnn_bn bn1, bn2;
    cnn_conv_bn shortcut;            /* when plan.projection */
    moe_router_net router1, router2; /* per-layer routing only */
} moe_cnn_block;

typedef struct moe_cnn_model {
    moe_cnn_config config;
    cnn_conv_bn stem;
    int n_blocks;
    moe_cnn_block blocks[CNN_MAX_BLOCKS];
    ag_param *fc_weight, *fc_bias;
    moe_router_net router; /* image-level routing only */
} moe_cnn_model;

cm_status moe_cnn_declare(moe_cnn_model *model, const moe_cnn_config *config, ag_params *params,
                          const char *prefix);

/* The router parameters (phi of AdvMoE; everything else is theta): fills
 * out[0..n) up to `capacity` and returns n (the total, even if larger). */
int moe_cnn_router_params(const moe_cnn_model *model, ag_param **out, int capacity);

/* Routers of the model: 0 (E == 1), 1 (image-level) or 2 per block
 * (per-layer: block i's conv1 is router 2i, its conv2 router 2i+1). */
int moe_cnn_router_count(const moe_cnn_model *model);

typedef struct moe_cnn_forward_args {
    bool training;           /* batch norm mode, as cnn_forward_args */
    bool compute_all_groups; /* the release's literal computation (see top) */
    /* The mask is a constant: no straight-through gradient reaches the
     * routers (for gradient checks and analysis; training leaves it false). */
    bool no_router_gradient;
    /* Image-level routing: the image the router reads instead of x (the
     * "router-only" attack: router sees x_adv, experts see x). NULL: x. */
    ag_tensor *router_input;
    /* NULL, or per router an [N] array of expert choices used instead of the
     * argmax (routes frozen to the clean ones); the routers still run. */
    const int32_t *const *forced_experts;
} moe_cnn_forward_args;

typedef struct moe_cnn_output {
    ag_tensor *logits; /* [N,V] */
    int n_routers;
    ag_tensor *router_logits[MOE_CNN_MAX_ROUTERS]; /* [N,E] each */
    int32_t *experts[MOE_CNN_MAX_ROUTERS];         /* [N] chosen expert each, arena */
} moe_cnn_output;

/* x [N,C,H,W] -> out; returns the context status. */
cm_status moe_cnn_forward(ag_ctx *ctx, const moe_cnn_model *model, ag_tensor *x,
                          const moe_cnn_forward_args *args, moe_cnn_output *out);

/* Multiply-adds per image (convs + linear layers, as cnn_flops). */
typedef struct moe_cnn_flops_report {
    int64_t backbone;   /* inference: one group of each MoE conv runs */
    int64_t router;     /* the router network(s) */
    int64_t total;      /* backbone + router: the inference cost */
    int64_t all_groups; /* backbone with every group computed (the release's way) */
} moe_cnn_flops_report;
moe_cnn_flops_report moe_cnn_flops(const moe_cnn_config *config, int height, int width);

#endif
