/* The byte-level transformer language model (GPT-2 style, pre-LN).
 *
 *   ids [B,T] -> wte[ids] + wpe[0:T] -> dropout
 *             -> n_layer x { x += drop(proj(attn(ln1(x))));  x += drop(mlp(ln2(x))) }
 *             -> ln_f -> head (untied, no bias) -> logits [B*T, V]
 *
 * Parameter names (the checkpoint keys): wte [V,D], wpe [T_max,D],
 * blocks.L.{ln1,ln2}.{weight,bias} [D], blocks.L.attn.qkv.{weight [3D,D],bias [3D]},
 * blocks.L.attn.proj.{weight [D,D],bias [D]}, blocks.L.mlp.fc1.{weight [F,D],bias [F]},
 * blocks.L.mlp.fc2.{weight [D,F],bias [D]}, ln_f.{weight,bias} [D], head.weight [V,D].
 * Init: normal(0, init_std) weights, zero biases, unit LayerNorm gains; with
 * scale_residual_init the two residual projections (attn.proj, mlp.fc2) use
 * std init_std/sqrt(2 n_layer) (GPT-2).
 * Attention probabilities are not dropped out (only embeddings and residual
 * branches are). With config.moe_every > 0, MoE layers (layers/moe.h) replace
 * the MLP of layers l % moe_every == 0, named blocks.L.moe.*.
 * Owns: nothing but parameter handles; parameters live in the ag_params
 * registry passed to lm_declare. */
#ifndef CMOE_LAYERS_TRANSFORMER_H
#define CMOE_LAYERS_TRANSFORMER_H

#include <stdint.h>

#include "autograd/ops.h"
#include "autograd/params.h"
#include "layers/moe.h"

typedef struct lm_config {
    int vocab;   /* 256 for bytes */
    int d_model; /* D */
    int n_layer;
    int n_head;               /* D % n_head == 0 */
    int d_ff;                 /* F, MLP hidden width */
    int max_seq;              /* T_max, number of learned positions */
    float dropout;            /* embedding and residual dropout probability */
    float init_std;           /* std of the normal init of every weight matrix (GPT-2: 0.02) */
    bool scale_residual_init; /* residual projections use init_std / sqrt(2 n_layer) */
    float layernorm_eps;
    /* train.recompute: all. Each block's attention half (ln1 .. residual
     * add) and, in a dense block, its MLP half run as ag_checkpoint regions:
     * backward makes their activations again. An MoE half is not one (its
     * router reports, carries state and draws outside the block): its
     * experts recompute with moe.recompute_experts. */
    bool checkpoint_blocks;
    /* MoE: when moe_every > 0, the MLP of every layer l with l % moe_every == 0
     * is an MoE layer (moe.d_model, init_std and out_std are filled in by
     * lm_declare). */
    int moe_every;
    moe_config moe;
} lm_config;

typedef struct lm_block {
    ag_param *ln1_weight, *ln1_bias, *qkv_weight, *qkv_bias, *proj_weight, *proj_bias;
    ag_param *ln2_weight, *ln2_bias, *fc1_weight, *fc1_bias, *fc2_weight, *fc2_bias;
    bool is_moe; /* then `moe` replaces fc1/fc2 */
    moe_layer moe;
} lm_block;

enum { LM_MAX_LAYERS = 64 };

typedef struct lm_model {
    lm_config config;
    ag_param *wte, *wpe, *lnf_weight, *lnf_bias, *head_weight;
    lm_block blocks[LM_MAX_LAYERS];
} lm_model;

/* Checks the configuration (a clear error for bad sizes) and declares every
 * parameter; call ag_params_finalize afterwards. */
cm_status lm_declare(lm_model *model, const lm_config *config, ag_params *params);

/* Per-forward inputs. Dropout is applied when training and dropout > 0,
 * with masks keyed by (seed, step) and the global position of each element,
 * so the masks do not depend on how the batch is split across ranks. */
/* What the MoE layers of one forward pass report. */
typedef struct lm_moe_report {
    ag_tensor *aux_loss; /* sum over layers of the weighted router losses, or NULL */
    int n_layers;        /* MoE layers in the model */
    int layer[LM_MAX_LAYERS];
    router_stats stats[LM_MAX_LAYERS];
    /* Each MoE layer's routing of the B*T tokens (row-major over batch and
     * position): moe_result's offsets, expert and gates (arena). */
    const int32_t *offsets[LM_MAX_LAYERS], *expert[LM_MAX_LAYERS];
    const float *gates[LM_MAX_LAYERS];
    const float *logits[LM_MAX_LAYERS]; /* [B*T,E] router logits (moe_result.logits) or NULL */
} lm_moe_report;

typedef struct lm_forward_args {
    const int32_t *ids; /* [B*T] */
    int batch, seq_len;
    bool training;
    uint64_t seed, step;
    uint64_t first_row;    /* global index of this batch's first sequence */
    int k_override;        /* > 0: routers use this k (evaluation sweeps) */
    int pass;              /* THOR: forward pass index within the step */
    int micro;             /* micro-batch within the step (gradient accumulation) */
    lm_moe_report *report; /* may be NULL */
    /* Data parallelism: the ranks sharing the global batch (0: this process
     * alone) and its token count (0: this call's); see router_call. */
    MPI_Comm group;
    int64_t global_tokens;
} lm_forward_args;

/* -> logits [B*T, V]; NULL if the context failed (see ag_ctx_status). */
ag_tensor *lm_forward(ag_ctx *ctx, const lm_model *model, const lm_forward_args *args);

/* Mean cross-entropy of logits [B*T,V] against targets [B*T] (nats). */
ag_tensor *lm_loss(ag_ctx *ctx, ag_tensor *logits, const int32_t *targets);

/* THOR's consistency regularizer between two forward passes' logits [N,V]:
 * 0.5 (KL(P1||P2) + KL(P2||P1)), averaged over the N positions; gradients
 * reach both passes (METHODS.md 2.2). */
ag_tensor *lm_thor_consistency(ag_ctx *ctx, ag_tensor *logits1, ag_tensor *logits2);

#endif
