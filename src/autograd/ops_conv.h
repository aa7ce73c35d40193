/* CNN ops on NCHW float32 tensors: 2-D convolution, batch normalisation,
 * max / average / global-average pooling, and two channel helpers for a
 * channel-group MoE convolution (AdvMoE). Forward and backward of each op sit
 * side by side in ops_conv.c; the conventions of ops.h hold (NULL on a failed
 * context, CM_ASSERT on shape mismatches, backward adds into input grads).
 *
 * Shape glossary (as in PyTorch):
 *   N batch   C input channels   H, W input height and width
 *   CO output channels   KH, KW kernel height and width   HO, WO output size
 *   K channels kept per sample (gather_channels)
 * Weights are [CO,C,KH,KW]. Output sizes use floor division (PyTorch's
 * ceil_mode = false): HO = (H + 2 padding - KH) / stride + 1, likewise WO.
 * `stride` and `padding` apply to both spatial dimensions. */
#ifndef CMOE_AUTOGRAD_OPS_CONV_H
#define CMOE_AUTOGRAD_OPS_CONV_H

#include <stdbool.h>
#include <stdint.h>

#include "autograd/ops.h"

/* x [N,C,H,W], w [CO,C,KH,KW], bias [CO] or NULL -> [N,CO,HO,WO]; zero padding.
 * im2col + one sgemm per image; a 1x1 kernel with stride 1 and no padding
 * multiplies the image directly. The column buffer ([C*KH*KW, HO*WO] floats)
 * comes from the arena and is kept for backward when a node is recorded. */
ag_tensor *ag_conv2d(ag_ctx *ctx, ag_tensor *x, ag_tensor *w, ag_tensor *bias, int stride,
                     int padding);

/* x [N,C,H,W], w [G*CO,C,KH,KW], group [N] in [0,G) -> [N,CO,HO,WO], no bias:
 * image n through filters [group[n]*CO, (group[n]+1)*CO) only (the
 * channel-group MoE conv). Equal to running ag_conv2d with each group's
 * weight slice on that group's images, without gathering them; dw gets
 * gradient only in the slices the images used. group is copied. */
ag_tensor *ag_conv2d_grouped(ag_ctx *ctx, ag_tensor *x, ag_tensor *w, int groups,
                             const int32_t *group, int stride, int padding);

/* x [N,C,H,W], gamma [C], beta [C] -> [N,C,H,W] (PyTorch BatchNorm2d).
 * training: normalises each channel with its batch mean and biased variance
 * over (N,H,W), then, when running_mean/running_var are not NULL, updates
 * them in place: r = (1 - momentum) r + momentum s, where s is the batch mean
 * and the UNBIASED batch variance (times M / (M - 1), M = N*H*W > 1).
 * The update happens in no-grad mode too (as PyTorch); passing NULL for both
 * skips it (track_running_stats = false).
 * eval: normalises with running_mean / running_var (required) and leaves them
 * unchanged; backward still reaches x (a per-channel scale), gamma and beta,
 * so adversarial attacks can differentiate an eval-mode network.
 * The statistics used are copied, so the caller may update the running
 * buffers before backward. */
ag_tensor *ag_batchnorm2d(ag_ctx *ctx, ag_tensor *x, ag_tensor *gamma, ag_tensor *beta,
                          float *running_mean, float *running_var, bool training, float momentum,
                          float eps);

/* x [N,C,H,W] -> [N,C,HO,WO]: maximum over each kernel x kernel window.
 * Padding positions are never candidates (as -inf padding in PyTorch);
 * padding <= kernel / 2 so every window holds an input element. Ties go to
 * the first maximum in row-major window order, and a NaN wins (PyTorch's CPU
 * rule); backward sends the gradient to that one element. */
ag_tensor *ag_maxpool2d(ag_ctx *ctx, ag_tensor *x, int kernel, int stride, int padding);
/* x [N,C,H,W] -> [N,C,HO,WO]: mean over each window with count_include_pad =
 * true (PyTorch's default): padding counts as zeros, so every window divides
 * by kernel * kernel, also at the borders. padding <= kernel / 2. */
ag_tensor *ag_avgpool2d(ag_ctx *ctx, ag_tensor *x, int kernel, int stride, int padding);
/* x [N,C,H,W] -> [N,C]: mean over H and W. */
ag_tensor *ag_global_avgpool(ag_ctx *ctx, ag_tensor *x);

/* Channel helpers for an MoE convolution whose experts are groups of output
 * channels: compute every expert's filters with one ag_conv2d, then
 *   - ag_gather_channels keeps, per sample, only the chosen group's channels
 *     (a dense [N,K,H,W] for the next layer), or
 *   - ag_mul_channels multiplies each sample's channels by a routing mask or
 *     gate [N,C] (zeros switch channels off; the gradient w.r.t. the mask is
 *     what a straight-through router needs). */

/* x [N,C,H,W], channel_index [N*K] in [0,C) -> [N,K,H,W]:
 * out[n,k] = x[n, channel_index[n*K + k]]. Backward scatter-adds, so a
 * channel chosen twice gets both gradients. The index array is copied
 * (the caller's array may change before backward); entries are checked. */
ag_tensor *ag_gather_channels(ag_ctx *ctx, ag_tensor *x, const int32_t *channel_index, int k);
/* x [N,C,H,W], scale [N,C] -> [N,C,H,W]: x[n,c,:,:] * scale[n,c], with
 * gradients to both (dscale[n,c] = sum over H,W of dout * x). */
ag_tensor *ag_mul_channels(ag_ctx *ctx, ag_tensor *x, ag_tensor *scale);

#endif
