#include "layers/transformer.h"

#include <math.h>
#include <stdio.h>

#include "common/check.h"

static cm_status declare(ag_params *params, ag_param **out, ag_init init, int ndim,
                         const int *shape, const char *fmt, int layer) {
    char name[AG_PARAM_NAME_MAX];
    snprintf(name, sizeof name, fmt, layer);
    return ag_params_declare(params, name, AG_GROUP_DENSE, ndim, shape, init, out);
}

cm_status lm_declare(lm_model *model, const lm_config *config, ag_params *params) {
    const lm_config *c = config;
    if (c->vocab < 2 || c->d_model < 1 || c->n_layer < 1 || c->n_head < 1 || c->d_ff < 1 ||
        c->max_seq < 1)
        return CM_ERR(CM_ERR_INVALID, "model sizes must be positive (vocab >= 2)");
    if (c->n_layer > LM_MAX_LAYERS)
        return CM_ERR(CM_ERR_INVALID, "model.n_layer = %d exceeds the supported %d", c->n_layer,
                      LM_MAX_LAYERS);
    if (c->d_model % c->n_head != 0)
        return CM_ERR(CM_ERR_INVALID, "model.d_model = %d is not divisible by model.n_head = %d",
                      c->d_model, c->n_head);
    if (!(c->init_std > 0.0f) || !(c->layernorm_eps > 0.0f))
        return CM_ERR(CM_ERR_INVALID, "model.init_std and model.layernorm_eps must be > 0");
    if (!(c->dropout >= 0.0f && c->dropout < 1.0f))
        return CM_ERR(CM_ERR_INVALID, "model.dropout = %g not in [0, 1)", (double)c->dropout);
    model->config = *c;
    const int D = c->d_model, F = c->d_ff, V = c->vocab;
    const ag_init weight = {AG_INIT_NORMAL, 0.0f, c->init_std};
    const float residual_std =
        c->scale_residual_init ? c->init_std / sqrtf(2.0f * (float)c->n_layer) : c->init_std;
    const ag_init residual = {AG_INIT_NORMAL, 0.0f, residual_std};
    const ag_init zero = {AG_INIT_ZERO, 0.0f, 0.0f}, one = {AG_INIT_CONSTANT, 1.0f, 0.0f};
    CM_TRY(declare(params, &model->wte, weight, 2, (int[]){V, D}, "wte", 0));
    CM_TRY(declare(params, &model->wpe, weight, 2, (int[]){c->max_seq, D}, "wpe", 0));
    for (int l = 0; l < c->n_layer; l++) {
        lm_block *b = &model->blocks[l];
        CM_TRY(declare(params, &b->ln1_weight, one, 1, (int[]){D}, "blocks.%d.ln1.weight", l));
        CM_TRY(declare(params, &b->ln1_bias, zero, 1, (int[]){D}, "blocks.%d.ln1.bias", l));
        CM_TRY(declare(params, &b->qkv_weight, weight, 2, (int[]){3 * D, D},
                       "blocks.%d.attn.qkv.weight", l));
        CM_TRY(
            declare(params, &b->qkv_bias, zero, 1, (int[]){3 * D}, "blocks.%d.attn.qkv.bias", l));
        CM_TRY(declare(params, &b->proj_weight, residual, 2, (int[]){D, D},
                       "blocks.%d.attn.proj.weight", l));
        CM_TRY(declare(params, &b->proj_bias, zero, 1, (int[]){D}, "blocks.%d.attn.proj.bias", l));
        CM_TRY(declare(params, &b->ln2_weight, one, 1, (int[]){D}, "blocks.%d.ln2.weight", l));
        CM_TRY(declare(params, &b->ln2_bias, zero, 1, (int[]){D}, "blocks.%d.ln2.bias", l));
        b->is_moe = c->moe_every > 0 && l % c->moe_every == 0;
        if (b->is_moe) {
            moe_config moe = c->moe;
            moe.d_model = D;
            moe.init_std = c->init_std;
            moe.out_std = residual_std;
            char prefix[AG_PARAM_NAME_MAX];
            snprintf(prefix, sizeof prefix, "blocks.%d.moe", l);
            CM_TRY(moe_declare(&b->moe, &moe, l, params, prefix));
            continue;
        }
        CM_TRY(declare(params, &b->fc1_weight, weight, 2, (int[]){F, D}, "blocks.%d.mlp.fc1.weight",
                       l));
        CM_TRY(declare(params, &b->fc1_bias, zero, 1, (int[]){F}, "blocks.%d.mlp.fc1.bias", l));
        CM_TRY(declare(params, &b->fc2_weight, residual, 2, (int[]){D, F},
                       "blocks.%d.mlp.fc2.weight", l));
        CM_TRY(declare(params, &b->fc2_bias, zero, 1, (int[]){D}, "blocks.%d.mlp.fc2.bias", l));
    }
    CM_TRY(declare(params, &model->lnf_weight, one, 1, (int[]){D}, "ln_f.weight", 0));
    CM_TRY(declare(params, &model->lnf_bias, zero, 1, (int[]){D}, "ln_f.bias", 0));
    CM_TRY(declare(params, &model->head_weight, weight, 2, (int[]){V, D}, "head.weight", 0));
    return CM_OK;
}

/* Dropout sites, for distinct RNG streams. */
enum { DROP_EMBEDDING = 0, DROP_ATTENTION = 1, DROP_MLP = 2 };

static ag_tensor *drop(ag_ctx *ctx, ag_tensor *x, const lm_forward_args *args, float p, int layer,
                       int site) {
    if (!args->training || p == 0.0f || !x) return x;
    /* THOR's second pass draws its own masks. */
    uint32_t stream = (uint32_t)((args->pass * (LM_MAX_LAYERS + 1) + layer) * 4 + site);
    cm_rng_key key = {args->seed, args->step, stream, CM_RNG_DROPOUT};
    /* Index by global element so masks do not depend on the rank split. */
    uint64_t per_row = (uint64_t)args->seq_len * (uint64_t)ag_last_dim(x);
    return ag_dropout(ctx, x, p, key, args->first_row * per_row);
}

/* h [B,T,D] -> [B,T,D] through the block's MoE layer; reports to
 * args->report. depth: the routers' state carried across the pass's MoE
 * layers (RMoE), read and replaced by the layer's router. */
static ag_tensor *moe_block(ag_ctx *ctx, const lm_block *b, ag_tensor *h,
                            const lm_forward_args *args, router_depth_state *depth) {
    if (!h) return NULL;
    const int tokens = args->batch * args->seq_len, D = h->shape[2];
    router_call call = {.training = args->training,
                        .seed = args->seed,
                        .step = args->step,
                        .k_override = args->k_override,
                        .pass = args->pass,
                        .micro = args->micro,
                        .seq_len = args->seq_len,
                        .first_token = args->first_row * (uint64_t)args->seq_len,
                        .group = args->group,
                        .global_tokens = args->global_tokens,
                        .depth = depth};
    moe_result result;
    ag_tensor *flat = ag_reshape(ctx, h, 2, (int[]){tokens, D});
    if (moe_forward(ctx, &b->moe, flat, &call, &result) != CM_OK) return NULL;
    lm_moe_report *report = args->report;
    if (report) {
        if (result.aux_loss)
            report->aux_loss =
                report->aux_loss ? ag_add(ctx, report->aux_loss, result.aux_loss) : result.aux_loss;
        report->layer[report->n_layers] = b->moe.layer;
        report->stats[report->n_layers] = result.stats;
        report->offsets[report->n_layers] = result.offsets;
        report->expert[report->n_layers] = result.expert;
        report->gates[report->n_layers] = result.gates;
        report->logits[report->n_layers] = result.logits;
        report->n_layers++;
    }
    return ag_reshape(ctx, result.out, 3, h->shape);
}

/* What a block's half reads besides its input x [B,T,D] (ag_checkpoint
 * keeps a copy until backward). */
typedef struct block_half {
    const lm_model *model;
    int layer;
    lm_forward_args args;
} block_half;

/* x + drop(proj(attention(qkv(ln1(x))))) */
static ag_tensor *attention_half(ag_ctx *ctx, ag_tensor *x, const void *user) {
    const block_half *half = user;
    const lm_config *c = &half->model->config;
    const lm_block *b = &half->model->blocks[half->layer];
    ag_tensor *h = ag_layernorm(ctx, x, ag_param_tensor(b->ln1_weight),
                                ag_param_tensor(b->ln1_bias), c->layernorm_eps);
    h = ag_linear(ctx, h, ag_param_tensor(b->qkv_weight), ag_param_tensor(b->qkv_bias));
    h = ag_causal_attention(ctx, h, c->n_head);
    h = ag_linear(ctx, h, ag_param_tensor(b->proj_weight), ag_param_tensor(b->proj_bias));
    return ag_add(ctx, x, drop(ctx, h, &half->args, c->dropout, half->layer + 1, DROP_ATTENTION));
}

/* x + drop(fc2(gelu(fc1(ln2(x))))): a dense block's second half */
static ag_tensor *mlp_half(ag_ctx *ctx, ag_tensor *x, const void *user) {
    const block_half *half = user;
    const lm_config *c = &half->model->config;
    const lm_block *b = &half->model->blocks[half->layer];
    ag_tensor *h = ag_layernorm(ctx, x, ag_param_tensor(b->ln2_weight),
                                ag_param_tensor(b->ln2_bias), c->layernorm_eps);
    h = ag_gelu(ctx,
                ag_linear(ctx, h, ag_param_tensor(b->fc1_weight), ag_param_tensor(b->fc1_bias)));
    h = ag_linear(ctx, h, ag_param_tensor(b->fc2_weight), ag_param_tensor(b->fc2_bias));
    return ag_add(ctx, x, drop(ctx, h, &half->args, c->dropout, half->layer + 1, DROP_MLP));
}

/* A half, as a checkpoint region with config.checkpoint_blocks. */
static ag_tensor *run_half(ag_ctx *ctx, ag_region_fn fn, ag_tensor *x, const block_half *half) {
    if (half->model->config.checkpoint_blocks) return ag_checkpoint(ctx, fn, x, half, sizeof *half);
    return fn(ctx, x, half);
}

ag_tensor *lm_forward(ag_ctx *ctx, const lm_model *model, const lm_forward_args *args) {
    if (args->report) *args->report = (lm_moe_report){0};
    const lm_config *c = &model->config;
    const int B = args->batch, T = args->seq_len, D = c->d_model;
    CM_ASSERT(T >= 1 && T <= c->max_seq, "sequence length %d not in [1, %d]", T, c->max_seq);
    const int bt_d[3] = {B, T, D};

    ag_tensor *tokens = ag_embedding(ctx, ag_param_tensor(model->wte), args->ids, B * T);
    ag_tensor *positions = ag_param_tensor(model->wpe);
    if (T < c->max_seq) positions = ag_slice(ctx, positions, 0, 0, T);
    ag_tensor *x = ag_add(ctx, ag_reshape(ctx, tokens, 3, bt_d), positions); /* [B,T,D] */
    x = drop(ctx, x, args, c->dropout, 0, DROP_EMBEDDING);

    /* One state per pass, empty until the first MoE layer; dense layers
     * leave it as it is (METHODS.md 15.6). */
    router_depth_state depth = {0};
    for (int l = 0; l < c->n_layer; l++) {
        const lm_block *b = &model->blocks[l];
        const block_half half = {model, l, *args};
        x = run_half(ctx, attention_half, x, &half);
        if (!b->is_moe) {
            x = run_half(ctx, mlp_half, x, &half);
            continue;
        }
        ag_tensor *h = ag_layernorm(ctx, x, ag_param_tensor(b->ln2_weight),
                                    ag_param_tensor(b->ln2_bias), c->layernorm_eps);
        h = moe_block(ctx, b, h, args, &depth);
        x = ag_add(ctx, x, drop(ctx, h, args, c->dropout, l + 1, DROP_MLP));
    }
    x = ag_layernorm(ctx, x, ag_param_tensor(model->lnf_weight), ag_param_tensor(model->lnf_bias),
                     c->layernorm_eps);
    ag_tensor *logits = ag_linear(ctx, x, ag_param_tensor(model->head_weight), NULL);
    return ag_reshape(ctx, logits, 2, (int[]){B * T, c->vocab});
}

ag_tensor *lm_loss(ag_ctx *ctx, ag_tensor *logits, const int32_t *targets) {
    return ag_cross_entropy(ctx, logits, targets, -1);
}

ag_tensor *lm_thor_consistency(ag_ctx *ctx, ag_tensor *logits1, ag_tensor *logits2) {
    ag_tensor *log_p1 = ag_log_softmax(ctx, logits1), *log_p2 = ag_log_softmax(ctx, logits2);
    return ag_scale(
        ctx, ag_add(ctx, ag_kl_div(ctx, log_p1, log_p2), ag_kl_div(ctx, log_p2, log_p1)), 0.5f);
}
