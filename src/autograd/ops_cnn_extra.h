/* Ops for the MoE-CNN's hard top-1 routing (AdvMoE) that the engine lacks:
 * the straight-through one-hot mask, and the row argmax that picks the
 * experts. Conventions of ops.h (NULL on a failed context, CM_ASSERT on bad
 * shapes or indices, backward adds into the input gradient).
 *
 * Shape glossary: N rows (images), E experts. */
#ifndef CMOE_AUTOGRAD_OPS_CNN_EXTRA_H
#define CMOE_AUTOGRAD_OPS_CNN_EXTRA_H

#include <stdint.h>

#include "autograd/ops.h"

/* logits [N,E], choice[N] in [0,E) -> [N,E]: out[n,e] = 1 if e == choice[n]
 * else 0. Straight-through backward: dlogits += dout unchanged (the AdvMoE
 * release's GetMask.backward returns the mask gradient to the scores as is;
 * no softmax, no scaling). The forward ignores the logit values; `choice` is
 * usually their argmax (ag_argmax_rows) but may be forced (frozen routes).
 * It is read in forward only. */
ag_tensor *ag_onehot_st(ag_ctx *ctx, ag_tensor *logits, const int32_t *choice);

/* x [N,E] -> index[n] = the column of row n's maximum, the first one on
 * ties (torch.argmax on finite rows). Not an op: records nothing. */
void ag_argmax_rows(const ag_tensor *x, int32_t *index);

#endif
