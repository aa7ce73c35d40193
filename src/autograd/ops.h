/* The differentiable ops. Each records a tape node (tape.h) when its output
 * needs a gradient; its backward sits next to it in the same ops_*.c file.
 *
 * Shape glossary (row-major, outermost first, as in PyTorch):
 *   N rows (tokens, flattened leading dims)   M, K  matmul dims
 *   B batch   T sequence   D model dim   H heads   V vocabulary / classes
 *
 * Conventions
 * - Every op returns NULL when the context has failed (arena full) or an
 *   input is NULL, so a forward pass can run to the end and be checked once.
 * - Shape mismatches are bugs: CM_ASSERT with both shapes in the message.
 * - Integer inputs (token ids, targets, indices) are plain int32 arrays and
 *   never take a gradient.
 * - Broadcasting (add/sub/mul): the output has a's shape; b, aligned to the
 *   right, has in each dimension either a's size or 1. b [D] against a [N,D]
 *   is a row broadcast; b [N,1] against a [N,D] scales rows.
 *
 * The CNN ops (conv2d, batchnorm2d, pooling, channel gather) are declared in
 * ops_conv.h; the token exchange of expert parallelism in parallel/dispatch.h.
 */
#ifndef CMOE_AUTOGRAD_OPS_H
#define CMOE_AUTOGRAD_OPS_H

#include <stdbool.h>
#include <stdint.h>

#include "common/rng.h"
#include "autograd/tape.h"
#include "autograd/tensor.h"

/* ---- ops_matmul.c --------------------------------------------------------- */

/* a [M,K] (or [K,M] if trans_a), b [K,N] (or [N,K] if trans_b) -> [M,N] */
ag_tensor *ag_matmul(ag_ctx *ctx, ag_tensor *a, ag_tensor *b, bool trans_a, bool trans_b);
/* a [B,M,K], b [B,K,N] (transposes per batch item as in ag_matmul) -> [B,M,N] */
ag_tensor *ag_bmm(ag_ctx *ctx, ag_tensor *a, ag_tensor *b, bool trans_a, bool trans_b);
/* x [...,IN], w [OUT,IN], bias [OUT] or NULL -> y [...,OUT] = x w^T + bias */
ag_tensor *ag_linear(ag_ctx *ctx, ag_tensor *x, ag_tensor *w, ag_tensor *bias);

/* Kernel: C = alpha op(A) op(B) + beta C, row-major, on cblas_sgemm. */
void ag_sgemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const float *a, int lda,
              const float *b, int ldb, float beta, float *c, int ldc);

/* ---- ops_attention.c ------------------------------------------------------ */

/* qkv [B,T,3D] (q, k, v side by side; head h uses columns h*D/H .. of each)
 * -> [B,T,D]: causal softmax(q k^T / sqrt(D/H)) v per head. */
ag_tensor *ag_causal_attention(ag_ctx *ctx, ag_tensor *qkv, int n_head);

/* ---- ops_elementwise.c ---------------------------------------------------- */

ag_tensor *ag_add(ag_ctx *ctx, ag_tensor *a, ag_tensor *b); /* a + b (b broadcast) */
ag_tensor *ag_sub(ag_ctx *ctx, ag_tensor *a, ag_tensor *b); /* a - b (b broadcast) */
ag_tensor *ag_mul(ag_ctx *ctx, ag_tensor *a, ag_tensor *b); /* a * b (b broadcast) */
ag_tensor *ag_scale(ag_ctx *ctx, ag_tensor *a, float factor);
ag_tensor *ag_gelu(ag_ctx *ctx, ag_tensor *a); /* tanh approximation */
ag_tensor *ag_relu(ag_ctx *ctx, ag_tensor *a);
ag_tensor *ag_silu(ag_ctx *ctx, ag_tensor *a);     /* a * sigmoid(a) */
ag_tensor *ag_softplus(ag_ctx *ctx, ag_tensor *a); /* log(1 + exp(a)) */
/* Inverted dropout: each element kept with probability 1-p and scaled by
 * 1/(1-p); the mask is drawn from `key` at index first_index + element.
 * p == 0 returns `a` itself. */
ag_tensor *ag_dropout(ag_ctx *ctx, ag_tensor *a, float p, cm_rng_key key, uint64_t first_index);

/* ---- ops_reduce.c --------------------------------------------------------- */

ag_tensor *ag_sum(ag_ctx *ctx, ag_tensor *a);         /* -> [1] */
ag_tensor *ag_mean(ag_ctx *ctx, ag_tensor *a);        /* -> [1] */
ag_tensor *ag_softmax(ag_ctx *ctx, ag_tensor *a);     /* over the last dim */
ag_tensor *ag_log_softmax(ag_ctx *ctx, ag_tensor *a); /* over the last dim */
/* logits [N,V], targets[N] in [0,V) or == ignore_index -> [1]: mean over the
 * non-ignored rows of -log softmax(logits)[target] (0 if every row is ignored).
 * The targets are copied, so the caller's array may change before backward. */
ag_tensor *ag_cross_entropy(ag_ctx *ctx, ag_tensor *logits, const int32_t *targets,
                            int32_t ignore_index);
/* logp [N,V], logq [N,V] (log-probabilities) -> [1]: mean over rows of
 * KL(p||q) = sum_v p (logp - logq), with 0 log 0 taken as 0; gradients reach
 * both inputs. */
ag_tensor *ag_kl_div(ag_ctx *ctx, ag_tensor *logp, ag_tensor *logq);
/* p [N,V] (probabilities) -> [1]: mean over rows of -sum_v p log p; p is
 * clamped at 1e-12 inside the log only. */
ag_tensor *ag_entropy(ag_ctx *ctx, ag_tensor *p);

/* ---- ops_norm.c ----------------------------------------------------------- */

/* x [...,D], gamma [D], beta [D] -> [...,D] */
ag_tensor *ag_layernorm(ag_ctx *ctx, ag_tensor *x, ag_tensor *gamma, ag_tensor *beta, float eps);

/* ---- ops_index.c ---------------------------------------------------------- */

/* Index arrays are not copied: they must stay valid and unchanged until
 * backward has run (allocate them from the arena). Rows may have trailing
 * dims: x [N,...] gathers whole [...] blocks. */

/* table [V,D], ids[n] in [0,V) -> [n,D] */
ag_tensor *ag_embedding(ag_ctx *ctx, ag_tensor *table, const int32_t *ids, int n);
/* x [N,D], index[m] in [0,N) -> [m,D]: out[i] = x[index[i]] */
ag_tensor *ag_gather_rows(ag_ctx *ctx, ag_tensor *x, const int32_t *index, int m);
/* x [M,D], index[M] in [0,n_out) -> [n_out,D]: out[index[i]] += x[i] */
ag_tensor *ag_scatter_add_rows(ag_ctx *ctx, ag_tensor *x, const int32_t *index, int n_out);
/* out[index[s]] += scale[s] x[s]: scatter_add_rows of x scaled row by row,
 * without keeping the scaled rows (the MoE combine: expert outputs times
 * their gates). x [S,*], scale with S elements -> [n_out,*]. */
ag_tensor *ag_scatter_add_rows_scaled(ag_ctx *ctx, ag_tensor *x, ag_tensor *scale,
                                      const int32_t *index, int n_out);
/* Same data, new shape (same numel; one size may be -1 and is inferred); no
 * copy of the data. The output has its own gradient, added into x's. */
ag_tensor *ag_reshape(ag_ctx *ctx, ag_tensor *x, int ndim, const int *shape);
/* Swaps two dimensions (copies). */
ag_tensor *ag_transpose(ag_ctx *ctx, ag_tensor *x, int dim0, int dim1);
/* Joins n tensors along `dim`; all other sizes equal. */
ag_tensor *ag_concat(ag_ctx *ctx, ag_tensor *const *xs, int n, int dim);
/* x[..., start:start+length, ...] along `dim` (copies). */
ag_tensor *ag_slice(ag_ctx *ctx, ag_tensor *x, int dim, int start, int length);

/* ---- ops_rnn.c ------------------------------------------------------------ */

/* One GRU step after its two projections (PyTorch's GRUCell; gate order
 * r, z, n in blocks of H columns): gi = x W_ih^T + b_ih [N,3H],
 * gh = h W_hh^T + b_hh [N,3H], h [N,H] -> h' [N,H] with
 *   r = sigmoid(gi_r + gh_r),  z = sigmoid(gi_z + gh_z),
 *   n = tanh(gi_n + r * gh_n),  h' = (1 - z) * n + z * h.
 * Gradients reach all three inputs (libm exp and tanh, not the fast forms). */
ag_tensor *ag_gru_cell(ag_ctx *ctx, ag_tensor *gi, ag_tensor *gh, ag_tensor *h);

/* ---- ops_moe.c ------------------------------------------------------------ */

/* x [*] (any shape, read flat), index[s] in [0,numel) -> [s]: out[i] = x[index[i]] */
ag_tensor *ag_gather_elements(ag_ctx *ctx, ag_tensor *x, const int32_t *index, int s);
/* x [S], offsets[n_segments+1] (ascending, offsets[0] = 0, offsets[n] = S) -> [S]:
 * softmax within each segment [offsets[i], offsets[i+1]); empty segments allowed. */
ag_tensor *ag_segment_softmax(ag_ctx *ctx, ag_tensor *x, const int32_t *offsets, int n_segments);
/* x [N,D] -> [D]: sum over the rows. */
ag_tensor *ag_sum_rows(ag_ctx *ctx, ag_tensor *x);
/* Per-group linear over contiguous row ranges (the experts of an MoE layer):
 * x [S,IN], w [E,OUT,IN], bias [E,OUT] or NULL, offsets[E+1] (ascending,
 * offsets[0] = 0, offsets[E] = S) -> [S,OUT]; rows [offsets[e], offsets[e+1])
 * use w[e] and bias[e]. One sgemm per non-empty group; empty groups cost
 * nothing and get no weight gradient. */
ag_tensor *ag_grouped_linear(ag_ctx *ctx, ag_tensor *x, ag_tensor *w, ag_tensor *bias,
                             const int32_t *offsets);

/* The experts' activations, moe.activation: the pointwise ones (ag_gelu,
 * ag_relu, ag_silu) and SwiGLU, silu(gate) * up (LLaMA's MLP), which is not
 * pointwise: it needs the gate and the up projection, so only the expert op
 * ag_grouped_linear_hidden takes it. ag_activation_names: the spellings
 * recipes use, in enum order, NULL-terminated. */
typedef enum ag_activation {
    AG_ACT_GELU = 0,
    AG_ACT_RELU,
    AG_ACT_SILU,
    AG_ACT_SWIGLU,
    AG_ACT_COUNT
} ag_activation;
extern const char *const ag_activation_names[AG_ACT_COUNT + 1];
/* ag_grouped_linear(act(h), w, bias, offsets) as one op that keeps only h:
 * act(h) [S,IN] is made in scratch for the forward product and made again
 * in backward, so neither it nor its gradient is ever stored (the experts'
 * largest tensors). h [S,IN] -> [S,OUT]. A pointwise activation only
 * (AG_ACT_SWIGLU: ag_grouped_linear_hidden). */
ag_tensor *ag_grouped_linear_act(ag_ctx *ctx, ag_tensor *h, ag_activation activation, ag_tensor *w,
                                 ag_tensor *bias, const int32_t *offsets);
/* The experts' hidden layer in general, for ag_grouped_linear_hidden:
 *   a = act(h)                        pointwise activations;
 *   a = silu(h) * up                  AG_ACT_SWIGLU: h the gate projection,
 *                                     up [S,IN] the up projection;
 *   a = keep ? a * keep_scale : 0     with a dropout mask keep [S*IN]
 *                                     (1 = kept; inverted dropout:
 *                                     keep_scale = 1/(1-p)); NULL: none.
 * keep must stay valid and unchanged until backward (from the arena). */
typedef struct ag_hidden_layer {
    ag_activation activation;
    ag_tensor *up;       /* AG_ACT_SWIGLU only, else NULL */
    const uint8_t *keep; /* NULL: no dropout */
    float keep_scale;
} ag_hidden_layer;
/* ag_grouped_linear(a, w, bias, offsets) with a as above, keeping only h
 * (and up): a is made again in backward, like ag_grouped_linear_act (which
 * is this op with a pointwise activation and no mask). h [S,IN] -> [S,OUT]. */
ag_tensor *ag_grouped_linear_hidden(ag_ctx *ctx, ag_tensor *h, const ag_hidden_layer *hidden,
                                    ag_tensor *w, ag_tensor *bias, const int32_t *offsets);

/* Fills keep [rows, H] (1 = kept) for rows [first_row, first_row + rows) of
 * ag_grouped_ffn's x; called again in backward, so it must be a pure
 * function of its arguments (a counter-based draw). */
typedef void (*ag_mask_fn)(const void *context, int64_t first_row, int rows, uint8_t *keep);
/* The experts' whole FFN for ag_grouped_ffn, per expert e:
 *   h = x w1_e^T + b1_e, up = x w3_e^T + b3_e (AG_ACT_SWIGLU only),
 *   a as ag_hidden_layer with the mask from keep_fn, y = a w2_e^T + b2_e.
 * The biases may be NULL; keep_fn NULL: no dropout. keep_context must stay
 * valid and unchanged until backward (from the arena). */
typedef struct ag_expert_ffn {
    ag_tensor *w1, *b1; /* [E,H,IN], [E,H] */
    ag_tensor *w3, *b3; /* [E,H,IN], [E,H]: swiglu's up projection, else NULL */
    ag_tensor *w2, *b2; /* [E,OUT,H], [E,OUT] */
    ag_activation activation;
    ag_mask_fn keep_fn;
    const void *keep_context;
    float keep_scale; /* 1/(1-p) */
} ag_expert_ffn;
/* ag_grouped_linear_hidden over h = ag_grouped_linear(x, w1, b1) (and up)
 * as one op that stores nothing per row but x: h, up, the mask and a are
 * made one expert at a time in scratch, in forward and again in backward
 * (train.recompute: experts). The sgemms and loops are those of the
 * composition, in the same order, so outputs and gradients are
 * bit-identical to it. x [S,IN] -> [S,OUT]. */
ag_tensor *ag_grouped_ffn(ag_ctx *ctx, ag_tensor *x, const ag_expert_ffn *ffn,
                          const int32_t *offsets);

#endif
