#include "layers/lm_decode.h"

#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "autograd/activations.h"
#include "autograd/norm_stats.h"

/* The router's arena: one token's scores, candidates and CSR output. */
enum { ROUTER_ARENA_BYTES = 1 << 20 };

struct lm_decoder {
    const lm_model *model;
    lm_decode_options options;
    int length, capacity; /* positions cached; max_seq */
    int32_t *window;      /* [capacity]: the bytes of the cached positions */
    int64_t slides;
    float *keys, *values;     /* [n_layer][capacity][D] each */
    float *x, *h, *qkv, *att; /* [D], [D], [3D], [D] */
    float *scores;            /* [capacity] */
    float *hidden, *up, *y;   /* [max(F, H)], [H], [D] */
    ag_ctx router_ctx;
    bool router_ctx_ready;
    /* RMoE: the token's router state after the last MoE layer [H_r] (the
     * shared GRU fixes one H_r), valid once rnn_started in this step. */
    float *rnn_state;
    bool rnn_started;
};

static const float *weights(ag_param *param) {
    return param->tensor.data;
}

/* out [rows] = W [rows,cols] in + b (b may be NULL) */
static void linear(const float *w, const float *b, const float *in, int rows, int cols,
                   float *out) {
    if (b)
        memcpy(out, b, (size_t)rows * sizeof *out);
    else
        memset(out, 0, (size_t)rows * sizeof *out);
    cblas_sgemv(CblasRowMajor, CblasNoTrans, rows, cols, 1.0f, w, cols, in, 1, 1.0f, out, 1);
}

/* As ag_layernorm, with its row statistics (autograd/norm_stats.h). */
static void layernorm(const float *x, ag_param *gamma, ag_param *beta, int d, float eps,
                      float *out) {
    float mean, rstd;
    ag_norm_row_stats(x, d, eps, &mean, &rstd);
    const float *g = weights(gamma), *b = weights(beta);
    for (int i = 0; i < d; i++) out[i] = (x[i] - mean) * rstd * g[i] + b[i];
}

static bool decodes_causally(const lm_model *model) {
    for (int l = 0; l < model->config.n_layer; l++)
        if (model->blocks[l].is_moe &&
            model->blocks[l].moe.router.config.kind == ROUTER_EXPERT_CHOICE)
            return false;
    return true;
}

static cm_status check_model(const lm_model *model) {
    if (!decodes_causally(model))
        return CM_ERR(CM_ERR_INVALID,
                      "expert_choice routing cannot generate text: each expert picks its tokens "
                      "among the whole batch, so a token's experts depend on later tokens (not "
                      "causal) and decoding one token at a time cannot reproduce the model");
    for (int l = 0; l < model->config.n_layer; l++) {
        const lm_block *b = &model->blocks[l];
        if (b->is_moe && b->moe.local_experts != b->moe.config.router.num_experts)
            return CM_ERR(CM_ERR_INVALID,
                          "decoding needs every expert on this process (layer %d "
                          "holds %d of %d)",
                          l, b->moe.local_experts, b->moe.config.router.num_experts);
    }
    return CM_OK;
}

static int widest_hidden(const lm_model *model) {
    int widest = model->config.d_ff;
    for (int l = 0; l < model->config.n_layer; l++)
        if (model->blocks[l].is_moe && model->blocks[l].moe.config.hidden > widest)
            widest = model->blocks[l].moe.config.hidden;
    return widest;
}

/* The largest router.rnn_hidden among the MoE layers (1 when none). */
static int rnn_hidden(const lm_model *model) {
    int widest = 1;
    for (int l = 0; l < model->config.n_layer; l++)
        if (model->blocks[l].is_moe && model->blocks[l].moe.router.config.rnn_hidden > widest)
            widest = model->blocks[l].moe.router.config.rnn_hidden;
    return widest;
}

cm_status lm_decoder_create(const lm_model *model, const lm_decode_options *options,
                            lm_decoder **out) {
    *out = NULL;
    CM_TRY(check_model(model));
    const lm_config *c = &model->config;
    const size_t D = (size_t)c->d_model, cache = (size_t)c->n_layer * (size_t)c->max_seq * D;
    const size_t hidden = (size_t)widest_hidden(model);
    lm_decoder *d = calloc(1, sizeof *d);
    if (!d) return CM_ERR(CM_ERR_NOMEM, "out of memory for the decoder");
    *d = (lm_decoder){.model = model, .options = *options, .capacity = c->max_seq};
    d->keys = malloc(cache * sizeof(float));
    d->values = malloc(cache * sizeof(float));
    /* one scratch block: x, h [D], qkv [3D], att, y [D], scores [max_seq], hidden, up */
    d->x = malloc((7 * D + (size_t)c->max_seq + 2 * hidden) * sizeof(float));
    d->window = malloc((size_t)c->max_seq * sizeof(int32_t));
    if (!d->keys || !d->values || !d->x || !d->window) {
        lm_decoder_free(d);
        return CM_ERR(CM_ERR_NOMEM, "out of memory for the key/value cache (%zu floats)",
                      2 * cache);
    }
    d->h = d->x + D;
    d->qkv = d->h + D;
    d->att = d->qkv + 3 * D;
    d->y = d->att + D;
    d->scores = d->y + D;
    d->hidden = d->scores + c->max_seq;
    d->up = d->hidden + hidden;
    if (c->moe_every > 0) {
        cm_status status = ag_ctx_init(&d->router_ctx, ROUTER_ARENA_BYTES);
        if (status != CM_OK) {
            lm_decoder_free(d);
            return status;
        }
        d->router_ctx_ready = true;
        ag_set_grad_enabled(&d->router_ctx, false);
        d->rnn_state = malloc((size_t)rnn_hidden(model) * sizeof(float));
        if (!d->rnn_state) {
            lm_decoder_free(d);
            return CM_ERR(CM_ERR_NOMEM, "out of memory for the router state");
        }
    }
    *out = d;
    return CM_OK;
}

void lm_decoder_free(lm_decoder *decoder) {
    if (!decoder) return;
    if (decoder->router_ctx_ready) ag_ctx_free(&decoder->router_ctx);
    free(decoder->keys);
    free(decoder->values);
    free(decoder->x);
    free(decoder->window);
    free(decoder->rnn_state);
    free(decoder);
}

void lm_decoder_reset(lm_decoder *decoder) {
    decoder->length = 0;
}

int lm_decoder_length(const lm_decoder *decoder) {
    return decoder->length;
}

int lm_decoder_capacity(const lm_decoder *decoder) {
    return decoder->capacity;
}

/* d->att [D] = causal attention of the new position t over the layer's
 * cache rows 0..t (k, v of t already appended). */
static void attend(lm_decoder *d, const float *keys, const float *values, int t) {
    const lm_config *c = &d->model->config;
    const int D = c->d_model, head_dim = D / c->n_head, rows = t + 1;
    const float scale = 1.0f / sqrtf((float)head_dim);
    for (int head = 0; head < c->n_head; head++) {
        const int column = head * head_dim;
        /* scores [rows] = scale K_head q_head */
        cblas_sgemv(CblasRowMajor, CblasNoTrans, rows, head_dim, scale, keys + column, D,
                    d->qkv + column, 1, 0.0f, d->scores, 1);
        float top = d->scores[0];
        for (int j = 1; j < rows; j++) top = d->scores[j] > top ? d->scores[j] : top;
        float total = 0.0f;
        for (int j = 0; j < rows; j++) {
            d->scores[j] = expf(d->scores[j] - top);
            total += d->scores[j];
        }
        /* att_head [Dh] = V_head^T p / total */
        cblas_sgemv(CblasRowMajor, CblasTrans, rows, head_dim, 1.0f / total, values + column, D,
                    d->scores, 1, 0.0f, d->att + column, 1);
    }
}

/* x += proj(attention(ln1(x))) for layer l at position t. */
static void attention_block(lm_decoder *d, int l, int t) {
    const lm_config *c = &d->model->config;
    const lm_block *b = &d->model->blocks[l];
    const int D = c->d_model;
    layernorm(d->x, b->ln1_weight, b->ln1_bias, D, c->layernorm_eps, d->h);
    linear(weights(b->qkv_weight), weights(b->qkv_bias), d->h, 3 * D, D, d->qkv);
    float *keys = d->keys + (size_t)l * d->capacity * D;
    float *values = d->values + (size_t)l * d->capacity * D;
    memcpy(keys + (size_t)t * D, d->qkv + D, (size_t)D * sizeof(float));
    memcpy(values + (size_t)t * D, d->qkv + 2 * D, (size_t)D * sizeof(float));
    attend(d, keys, values, t);
    linear(weights(b->proj_weight), weights(b->proj_bias), d->att, D, D, d->h);
    for (int i = 0; i < D; i++) d->x[i] += d->h[i];
}

static void activate(ag_activation activation, float *hidden, const float *up, int n) {
    for (int i = 0; i < n; i++) {
        switch (activation) {
        case AG_ACT_RELU:
            hidden[i] = ag_relu_value(hidden[i]);
            break;
        case AG_ACT_SILU:
            hidden[i] = ag_silu_value(hidden[i]);
            break;
        case AG_ACT_SWIGLU:
            hidden[i] = ag_silu_value(hidden[i]) * up[i];
            break;
        default:
            hidden[i] = ag_gelu_value(hidden[i]);
        }
    }
}

/* x += gate * expert_e(h) (moe.h's expert FFN). */
static void add_expert(lm_decoder *d, const moe_layer *moe, int e, float gate) {
    const int D = moe->config.d_model, H = moe->config.hidden;
    const size_t matrix = (size_t)e * H * D;
    linear(weights(moe->w1) + matrix, weights(moe->b1) + (size_t)e * H, d->h, H, D, d->hidden);
    if (moe->config.activation == AG_ACT_SWIGLU)
        linear(weights(moe->w3) + matrix, weights(moe->b3) + (size_t)e * H, d->h, H, D, d->up);
    activate(moe->config.activation, d->hidden, d->up, H);
    linear(weights(moe->w2) + matrix, weights(moe->b2) + (size_t)e * D, d->hidden, D, H, d->y);
    for (int i = 0; i < D; i++) d->x[i] += gate * d->y[i];
}

/* x += moe(h) for the token at position t, routed by the layer's router in
 * evaluation mode as `cmoe eval` routes a window that starts at byte 0. */
static cm_status moe_token(lm_decoder *d, const moe_layer *moe, int t) {
    ag_ctx *ctx = &d->router_ctx;
    ag_ctx_reset(ctx);
    ag_set_grad_enabled(ctx, false);
    ag_tensor *token = ag_alias(ctx, "decode", d->h, 2, (int[]){1, moe->config.d_model});
    if (!token) return ag_ctx_status(ctx);
    router_call call = {.training = false,
                        .seed = d->options.seed,
                        .k_override = d->options.k_override,
                        .seq_len = d->capacity,
                        .first_token = (uint64_t)t};
    /* RMoE: the state the token's previous MoE layer left (none at the first). */
    const int state_size = moe->router.config.rnn_hidden;
    router_depth_state depth = {0};
    if (d->rnn_started)
        depth.h = ag_alias(ctx, "decode_state", d->rnn_state, 2, (int[]){1, state_size});
    call.depth = &depth;
    router_output routed;
    CM_TRY(router_route(ctx, &moe->router, token, &call, &routed));
    if (depth.h && moe->router.proj_weight) {
        memcpy(d->rnn_state, depth.h->data, (size_t)state_size * sizeof(float));
        d->rnn_started = true;
    }
    for (int s = routed.offsets[0]; s < routed.offsets[1]; s++)
        add_expert(d, moe, routed.expert[s], routed.gates->data[s]);
    return CM_OK;
}

/* x += mlp(ln2(x)) or moe(ln2(x)) for layer l at position t. */
static cm_status feed_forward_block(lm_decoder *d, int l, int t) {
    const lm_config *c = &d->model->config;
    const lm_block *b = &d->model->blocks[l];
    const int D = c->d_model, F = c->d_ff;
    layernorm(d->x, b->ln2_weight, b->ln2_bias, D, c->layernorm_eps, d->h);
    if (b->is_moe) return moe_token(d, &b->moe, t);
    linear(weights(b->fc1_weight), weights(b->fc1_bias), d->h, F, D, d->hidden);
    activate(AG_ACT_GELU, d->hidden, NULL, F);
    linear(weights(b->fc2_weight), weights(b->fc2_bias), d->hidden, D, F, d->y);
    for (int i = 0; i < D; i++) d->x[i] += d->y[i];
    return CM_OK;
}

cm_status lm_decoder_step(lm_decoder *decoder, int32_t byte, float *logits) {
    lm_decoder *d = decoder;
    const lm_model *model = d->model;
    const lm_config *c = &model->config;
    const int D = c->d_model, t = d->length;
    if (t >= d->capacity)
        return CM_ERR(CM_ERR_INVALID, "the key/value cache is full (%d positions)", d->capacity);
    if (byte < 0 || byte >= c->vocab)
        return CM_ERR(CM_ERR_INVALID, "token %d is not in [0, %d)", (int)byte, c->vocab);
    const float *token = weights(model->wte) + (size_t)byte * D;
    const float *position = weights(model->wpe) + (size_t)t * D;
    for (int i = 0; i < D; i++) d->x[i] = token[i] + position[i];
    d->rnn_started = false;
    for (int l = 0; l < c->n_layer; l++) {
        attention_block(d, l, t);
        CM_TRY(feed_forward_block(d, l, t));
    }
    d->window[t] = byte;
    d->length = t + 1;
    if (!logits) return CM_OK;
    layernorm(d->x, model->lnf_weight, model->lnf_bias, D, c->layernorm_eps, d->h);
    linear(weights(model->head_weight), NULL, d->h, c->vocab, D, logits);
    return CM_OK;
}

cm_status lm_decoder_push(lm_decoder *decoder, int32_t byte, float *logits) {
    lm_decoder *d = decoder;
    if (d->length == d->capacity) {
        const int keep = d->capacity / 2;
        memmove(d->window, d->window + d->capacity - keep, (size_t)keep * sizeof *d->window);
        d->length = 0;
        d->slides++;
        /* step writes window[t] = the same byte again */
        for (int t = 0; t < keep; t++) CM_TRY(lm_decoder_step(d, d->window[t], NULL));
    }
    return lm_decoder_step(d, byte, logits);
}

int64_t lm_decoder_slides(const lm_decoder *decoder) {
    return decoder->slides;
}

static int descending(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x < y) - (x > y);
}

int lm_sample_logits(const float *logits, int vocab, float temperature, int top_k, float uniform,
                     float *scratch) {
    float cutoff = -INFINITY;
    if (top_k > 0 && top_k < vocab) {
        memcpy(scratch, logits, (size_t)vocab * sizeof *scratch);
        qsort(scratch, (size_t)vocab, sizeof *scratch, descending);
        cutoff = scratch[top_k - 1];
    }
    float top = logits[0];
    for (int v = 1; v < vocab; v++) top = logits[v] > top ? logits[v] : top;
    double total = 0.0;
    for (int v = 0; v < vocab; v++) {
        scratch[v] = logits[v] >= cutoff ? expf((logits[v] - top) / temperature) : 0.0f;
        total += scratch[v];
    }
    const double target = (double)uniform * total;
    double cumulative = 0.0;
    int last = 0;
    for (int v = 0; v < vocab; v++) {
        if (scratch[v] == 0.0f) continue;
        cumulative += scratch[v];
        last = v;
        if (cumulative > target) return v;
    }
    return last; /* rounding left the target at the very top */
}
