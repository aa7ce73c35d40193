#include "train/upcycle.h"

#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/rng.h"
#include "layers/transformer.h"
#include "train/checkpoint.h"
#include "train/recipe.h"
#include "train/recipe_moe.h"
#include "train/run.h"

const char *const upcycle_router_names[UPCYCLE_ROUTER_COUNT + 1] = {"groups", "fresh", "zero",
                                                                    NULL};
const char *const upcycle_scaling_names[UPCYCLE_SCALING_COUNT + 1] = {"balanced", "output", "none",
                                                                      NULL};
const char *const upcycle_drop_scope_names[UPCYCLE_DROP_SCOPE_COUNT + 1] = {"expert", "matrix",
                                                                            "layer", NULL};

int upcycle_activation_degree(ag_activation activation) {
    return activation == AG_ACT_SWIGLU ? 3 : 2;
}

/* ---- the plan --------------------------------------------------------------------- */

/* The model keys that must agree for the dense weights to fit and to
 * compute the same function. */
static cm_status check_same_model(const cm_recipe *dense, const cm_recipe *moe) {
    const cm_model_cfg *a = &dense->model, *b = &moe->model;
    const struct {
        const char *key;
        double dense, moe;
    } sizes[] = {
        {"model.vocab_size", a->vocab_size, b->vocab_size},
        {"model.n_layers", a->n_layers, b->n_layers},
        {"model.d_model", a->d_model, b->d_model},
        {"model.n_heads", a->n_heads, b->n_heads},
        {"model.d_ff", a->d_ff, b->d_ff},
        {"model.layernorm_eps", a->layernorm_eps, b->layernorm_eps},
        {"data.seq_len", dense->data.seq_len, moe->data.seq_len},
    };
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
        if (sizes[i].dense != sizes[i].moe)
            return CM_ERR(CM_ERR_INVALID,
                          "%s is %g in the dense checkpoint's recipe but %g in the MoE recipe; "
                          "they must agree",
                          sizes[i].key, sizes[i].dense, sizes[i].moe);
    return CM_OK;
}

/* The kinds of model upcycling takes and makes. */
static cm_status check_kinds(const cm_recipe *dense, const cm_recipe *moe) {
    if (dense->model.arch != CM_ARCH_TRANSFORMER_LM)
        return CM_ERR(CM_ERR_INVALID,
                      "the dense checkpoint is not a language model (model.arch is not "
                      "transformer_lm); cmoe upcycle converts transformer_lm checkpoints");
    if (dense->moe.enabled)
        return CM_ERR(CM_ERR_INVALID,
                      "the checkpoint is not dense: its recipe has moe.enabled true (%d experts)",
                      dense->moe.num_experts);
    if (moe->model.arch != CM_ARCH_TRANSFORMER_LM || !moe->moe.enabled)
        return CM_ERR(CM_ERR_INVALID, "the MoE recipe must be a transformer_lm with moe.enabled: "
                                      "true");
    if (moe->moe.activation != AG_ACT_GELU)
        return CM_ERR(CM_ERR_INVALID,
                      "moe.activation is %s, but the dense MLP the experts are cut from uses "
                      "gelu; set moe.activation: gelu",
                      ag_activation_names[moe->moe.activation]);
    if (moe->router.type != ROUTER_TOPK)
        return CM_ERR(CM_ERR_INVALID,
                      "router.type is %s; cmoe upcycle builds top-k routers (router.type: topk)",
                      router_kind_name(moe->router.type));
    return CM_OK;
}

/* N, G, R, k from the MoE recipe, checked against the dense width. */
static cm_status plan_sizes(const cm_recipe *moe, upcycle_plan *plan) {
    const int F = moe->model.d_ff, H = recipe_expert_hidden(moe), N = moe->moe.num_experts;
    const int k = moe->router.k;
    if (H > F || F % H != 0)
        return CM_ERR(CM_ERR_INVALID,
                      "the expert width %d (moe.expert_hidden or split_dense) does not divide "
                      "model.d_ff = %d: the granularity G = d_ff / expert width must be a whole "
                      "number",
                      H, F);
    const int G = F / H;
    if (N % G != 0)
        return CM_ERR(CM_ERR_INVALID,
                      "moe.num_experts = %d is not a multiple of the granularity G = %d (d_ff %d "
                      "/ expert width %d): the experts must be whole copies of the dense MLP",
                      N, G, F, H);
    if (moe->upcycle.router != UPCYCLE_ROUTER_FRESH && k % G != 0)
        return CM_ERR(CM_ERR_INVALID,
                      "router.k = %d is not a multiple of the granularity G = %d, which "
                      "upcycle.router %s needs (top-k must take whole groups); use upcycle.router "
                      "fresh or another k",
                      k, G, upcycle_router_names[moe->upcycle.router]);
    *plan = (upcycle_plan){.experts = N,
                           .granularity = G,
                           .copies = N / G,
                           .k = k,
                           .dense_hidden = F,
                           .expert_hidden = H};
    snprintf(plan->label, sizeof plan->label, "E%dG%dT%d", N, G, k);
    return CM_OK;
}

/* A, the per-matrix scales and the drop count (METHODS 5.4, 11). */
static void plan_scales(const cm_recipe *moe, upcycle_plan *plan) {
    const bool softmax_first = moe->router.gating == ROUTER_SOFTMAX_THEN_TOPK;
    const double N = plan->experts, G = plan->granularity, k = plan->k;
    plan->degree = upcycle_activation_degree(moe->moe.activation);
    plan->activation_scale = softmax_first ? N * G / k : G;
    const double A = plan->activation_scale;
    plan->fc1_scale = plan->fc2_scale = plan->fc2_bias_scale = 1.0f;
    if (moe->upcycle.scaling == UPCYCLE_SCALING_BALANCED) {
        plan->fc1_scale = plan->fc2_scale = (float)pow(A, 1.0 / plan->degree);
    } else if (moe->upcycle.scaling == UPCYCLE_SCALING_OUTPUT) {
        plan->fc2_scale = (float)A;
    }
    if (moe->upcycle.scaling != UPCYCLE_SCALING_NONE && softmax_first)
        plan->fc2_bias_scale = (float)(N / k);
    plan->drop_units = (int)floor(moe->upcycle.drop_ratio * plan->expert_hidden + 1e-9);
}

cm_status upcycle_plan_make(const cm_recipe *dense, const cm_recipe *moe, upcycle_plan *plan) {
    CM_TRY(check_kinds(dense, moe));
    CM_TRY(check_same_model(dense, moe));
    CM_TRY(plan_sizes(moe, plan));
    plan_scales(moe, plan);
    return CM_OK;
}

/* ---- the tensors ------------------------------------------------------------------- */

/* Parameter `name` (printf format with the layer) of a registry; NULL if absent. */
static ag_param *find_param(const ag_params *params, const char *format, int layer) {
    char name[AG_PARAM_NAME_MAX];
    snprintf(name, sizeof name, format, layer);
    return ag_params_find(params, name);
}

/* The dense MLP and the MoE layer of one block. */
typedef struct upcycle_block {
    int layer;
    ag_param *fc1_weight, *fc1_bias, *fc2_weight, *fc2_bias; /* dense: [F,D] [F] [D,F] [D] */
    ag_param *w1, *b1, *w2, *b2;                             /* MoE: [N,H,D] [N,H] [N,D,H] [N,D] */
    ag_param *router_weight, *router_bias;                   /* [N,D], [N] or NULL */
} upcycle_block;

static cm_status find_block(const ag_params *dense, const ag_params *moe, int layer,
                            upcycle_block *b) {
    *b = (upcycle_block){
        .layer = layer,
        .fc1_weight = find_param(dense, "blocks.%d.mlp.fc1.weight", layer),
        .fc1_bias = find_param(dense, "blocks.%d.mlp.fc1.bias", layer),
        .fc2_weight = find_param(dense, "blocks.%d.mlp.fc2.weight", layer),
        .fc2_bias = find_param(dense, "blocks.%d.mlp.fc2.bias", layer),
        .w1 = find_param(moe, "blocks.%d.moe.experts.w1", layer),
        .b1 = find_param(moe, "blocks.%d.moe.experts.b1", layer),
        .w2 = find_param(moe, "blocks.%d.moe.experts.w2", layer),
        .b2 = find_param(moe, "blocks.%d.moe.experts.b2", layer),
        .router_weight = find_param(moe, "blocks.%d.moe.router.weight", layer),
        .router_bias = find_param(moe, "blocks.%d.moe.router.bias", layer),
    };
    if (!b->fc1_weight || !b->fc1_bias || !b->fc2_weight || !b->fc2_bias)
        return CM_ERR(CM_ERR_FORMAT, "the dense model has no MLP in block %d", layer);
    if (!b->w1 || !b->b1 || !b->w2 || !b->b2 || !b->router_weight)
        return CM_ERR(CM_ERR_INTERNAL, "block %d of the MoE model has no experts or router", layer);
    return CM_OK;
}

/* Expert e = shard e mod G of the dense MLP. */
static void copy_shards(const upcycle_block *b, const upcycle_plan *plan, int D) {
    const int H = plan->expert_hidden, F = plan->dense_hidden;
    for (int e = 0; e < plan->experts; e++) {
        const int first = (e % plan->granularity) * H; /* the shard's first dense unit */
        float *w1 = b->w1->tensor.data + (size_t)e * H * D, *b1 = b->b1->tensor.data + e * H;
        float *w2 = b->w2->tensor.data + (size_t)e * D * H, *b2 = b->b2->tensor.data + e * D;
        memcpy(w1, b->fc1_weight->tensor.data + (size_t)first * D, sizeof(float) * H * D);
        memcpy(b1, b->fc1_bias->tensor.data + first, sizeof(float) * H);
        for (int d = 0; d < D; d++)
            memcpy(w2 + (size_t)d * H, b->fc2_weight->tensor.data + (size_t)d * F + first,
                   sizeof(float) * H);
        memcpy(b2, b->fc2_bias->tensor.data, sizeof(float) * D);
    }
}

static void scale_floats(float *data, int64_t count, float scale) {
    if (scale == 1.0f) return;
    for (int64_t i = 0; i < count; i++) data[i] *= scale;
}

/* The hidden-unit entries of one matrix of one expert: unit u's entries are
 * base[u unit_stride + j entry_stride], j < per_unit. */
typedef struct unit_view {
    float *base;
    int64_t unit_stride, entry_stride;
    int per_unit;
} unit_view;

/* Replaces the entries of `units` [n] by draws from N(mu, sigma^2), mu and
 * sigma (unbiased; 0 for a single entry) those of the entries replaced. */
static void redraw_units(const unit_view *v, const int32_t *units, int n, cm_rng_key key) {
    const int64_t count = (int64_t)n * v->per_unit;
    double sum = 0.0, squares = 0.0;
    for (int i = 0; i < n; i++)
        for (int j = 0; j < v->per_unit; j++)
            sum += v->base[units[i] * v->unit_stride + j * v->entry_stride];
    const double mean = sum / (double)count;
    for (int i = 0; i < n; i++)
        for (int j = 0; j < v->per_unit; j++) {
            double d = v->base[units[i] * v->unit_stride + j * v->entry_stride] - mean;
            squares += d * d;
        }
    const double std = count > 1 ? sqrt(squares / (double)(count - 1)) : 0.0;
    for (int i = 0; i < n; i++)
        for (int j = 0; j < v->per_unit; j++)
            v->base[units[i] * v->unit_stride + j * v->entry_stride] =
                (float)(mean + std * cm_rng_normal(key, (uint64_t)(i * v->per_unit + j)));
}

enum { DROP_FC1 = 0, DROP_FC2 = 1 };

/* The key of expert e's unit set for matrix `matrix` (set) or of the draws
 * replacing matrix `part` (0 w1, 1 b1, 2 w2) of expert e. */
static cm_rng_key drop_key(const cm_recipe *recipe, int layer, uint64_t stream) {
    return (cm_rng_key){(uint64_t)recipe->train.seed, stream, (uint32_t)layer, CM_RNG_UPCYCLE};
}

static uint64_t set_stream(upcycle_drop_scope scope, int expert, int matrix) {
    const uint64_t expert_tag = scope == UPCYCLE_DROP_LAYER ? 0 : (uint64_t)expert + 1;
    const uint64_t matrix_tag = scope == UPCYCLE_DROP_MATRIX ? (uint64_t)matrix + 1 : 0;
    return 2 * (expert_tag * 4 + matrix_tag);
}

/* Drop-Upcycling of one block's experts (METHODS 11.2 without the
 * permutation; train/upcycle.h). perm: scratch [H]. */
static void drop_block(const upcycle_block *b, const upcycle_plan *plan, const cm_recipe *recipe,
                       int D, int32_t *units[2]) {
    const int H = plan->expert_hidden, n = plan->drop_units;
    const upcycle_drop_scope scope = recipe->upcycle.drop_scope;
    for (int e = 0; e < plan->experts; e++) {
        for (int m = 0; m < 2; m++)
            cm_rng_permutation(drop_key(recipe, b->layer, set_stream(scope, e, m)), H, units[m]);
        const unit_view views[3] = {
            {b->w1->tensor.data + (size_t)e * H * D, D, 1, D},
            {b->b1->tensor.data + (size_t)e * H, 1, 0, 1},
            {b->w2->tensor.data + (size_t)e * D * H, 1, H, D},
        };
        const int32_t *sets[3] = {units[DROP_FC1], units[DROP_FC1], units[DROP_FC2]};
        for (int part = 0; part < 3; part++) {
            const uint64_t stream = 2 * (((uint64_t)e + 1) * 4 + (uint64_t)part) + 1;
            redraw_units(&views[part], sets[part], n, drop_key(recipe, b->layer, stream));
        }
    }
}

/* Router rows [w_0 x G, w_1 x G, ..., w_{R-1} x G] from the fresh rows
 * w_0..w_{R-1} (METHODS 5.3); `scratch` holds [N * width] floats. */
static void group_rows(float *rows, int experts, int granularity, int width, float *scratch) {
    memcpy(scratch, rows, sizeof(float) * (size_t)experts * width);
    for (int e = 0; e < experts; e++)
        memcpy(rows + (size_t)e * width, scratch + (size_t)(e / granularity) * width,
               sizeof(float) * width);
}

static cm_status init_router(const upcycle_block *b, const upcycle_plan *plan,
                             upcycle_router mode) {
    ag_param *parts[2] = {b->router_weight, b->router_bias};
    for (int i = 0; i < 2; i++) {
        if (!parts[i]) continue;
        ag_tensor *t = &parts[i]->tensor;
        if (mode == UPCYCLE_ROUTER_ZERO) {
            memset(t->data, 0, sizeof(float) * (size_t)t->numel);
        } else if (mode == UPCYCLE_ROUTER_GROUPS) {
            float *scratch = malloc(sizeof(float) * (size_t)t->numel);
            if (!scratch) return CM_ERR(CM_ERR_NOMEM, "out of memory");
            group_rows(t->data, plan->experts, plan->granularity, (int)(t->numel / plan->experts),
                       scratch);
            free(scratch);
        }
    }
    return CM_OK;
}

/* One MoE block: experts from the dense MLP, then drop, scale, router. */
static cm_status upcycle_block_params(const upcycle_block *b, const upcycle_plan *plan,
                                      const cm_recipe *recipe) {
    const int D = recipe->model.d_model, H = plan->expert_hidden, N = plan->experts;
    if (b->w1->tensor.numel != (int64_t)N * H * D ||
        b->fc1_weight->tensor.numel != (int64_t)plan->dense_hidden * D)
        return CM_ERR(CM_ERR_INTERNAL, "block %d: unexpected expert or MLP shapes", b->layer);
    copy_shards(b, plan, D);
    if (plan->drop_units > 0) {
        int32_t *units[2] = {malloc(sizeof(int32_t) * H), malloc(sizeof(int32_t) * H)};
        if (units[0] && units[1]) drop_block(b, plan, recipe, D, units);
        free(units[0]);
        free(units[1]);
        if (!units[0] || !units[1]) return CM_ERR(CM_ERR_NOMEM, "out of memory");
    }
    scale_floats(b->w1->tensor.data, b->w1->tensor.numel, plan->fc1_scale);
    scale_floats(b->b1->tensor.data, b->b1->tensor.numel, plan->fc1_scale);
    scale_floats(b->w2->tensor.data, b->w2->tensor.numel, plan->fc2_scale);
    scale_floats(b->b2->tensor.data, b->b2->tensor.numel, plan->fc2_bias_scale);
    return init_router(b, plan, recipe->upcycle.router);
}

/* Marks `param` of `params` as filled. */
static void mark(const ag_params *params, const ag_param *param, bool *filled) {
    for (int i = 0; i < params->count; i++)
        if (params->items[i] == param) filled[i] = true;
}

/* Copies every MoE parameter the dense model has under the same name. */
static cm_status copy_shared(const ag_params *dense, ag_params *moe, bool *filled) {
    for (int i = 0; i < moe->count; i++) {
        ag_param *to = moe->items[i];
        const ag_param *from = ag_params_find(dense, to->name);
        if (!from) continue;
        if (from->tensor.numel != to->tensor.numel)
            return CM_ERR(CM_ERR_INVALID,
                          "%s has %lld values in the dense model but %lld in the "
                          "MoE model",
                          to->name, (long long)from->tensor.numel, (long long)to->tensor.numel);
        memcpy(to->tensor.data, from->tensor.data, sizeof(float) * (size_t)to->tensor.numel);
        filled[i] = true;
    }
    return CM_OK;
}

static cm_status upcycle_all(const ag_params *dense, ag_params *moe, const cm_recipe *recipe,
                             const upcycle_plan *plan, bool *filled) {
    CM_TRY(copy_shared(dense, moe, filled));
    for (int l = 0; l < recipe->model.n_layers; l++) {
        if (!recipe_layer_is_moe(recipe, l)) continue;
        upcycle_block b;
        CM_TRY(find_block(dense, moe, l, &b));
        CM_TRY(upcycle_block_params(&b, plan, recipe));
        const ag_param *done[] = {b.w1,
                                  b.w2,
                                  b.b1,
                                  b.b2,
                                  b.router_weight,
                                  b.router_bias,
                                  find_param(moe, "blocks.%d.moe.router.noise_weight", l)};
        for (size_t i = 0; i < sizeof done / sizeof done[0]; i++)
            if (done[i]) mark(moe, done[i], filled);
    }
    for (int i = 0; i < moe->count; i++)
        if (!filled[i])
            return CM_ERR(CM_ERR_INTERNAL, "upcycling has no source for the MoE parameter %s",
                          moe->items[i]->name);
    return CM_OK;
}

cm_status upcycle_params(const ag_params *dense, ag_params *moe, const cm_recipe *moe_recipe,
                         const upcycle_plan *plan) {
    if (!dense->finalized || !moe->finalized)
        return CM_ERR(CM_ERR_INTERNAL, "upcycle_params needs finalized registries");
    bool *filled = calloc((size_t)moe->count + 1, sizeof *filled);
    if (!filled) return CM_ERR(CM_ERR_NOMEM, "out of memory");
    cm_status status = upcycle_all(dense, moe, moe_recipe, plan, filled);
    free(filled);
    return status;
}

/* ---- the checkpoint ------------------------------------------------------------------ */

/* The dense recipe stored in the checkpoint. */
static cm_status read_dense_recipe(const char *path, cm_recipe *dense) {
    char *text = NULL;
    CM_TRY(ckpt_read_recipe(path, &text));
    cm_status status = recipe_load_text(text, path, NULL, 0, dense);
    free(text);
    if (status != CM_OK)
        return cm_error_wrap(status, "%s: the recipe stored in the checkpoint", path);
    return CM_OK;
}

static void describe_plan(const cm_recipe *moe, const upcycle_plan *plan, char *out, size_t size) {
    snprintf(out, size,
             "%s, moe.every %d, gating %s, router %s, scaling %s (A %g, fc1 x%g, fc2 x%g, fc2 "
             "bias x%g), drop_ratio %g (%d of %d units, scope %s)",
             plan->label, moe->moe.every, router_gating_names[moe->router.gating],
             upcycle_router_names[moe->upcycle.router], upcycle_scaling_names[moe->upcycle.scaling],
             plan->activation_scale, (double)plan->fc1_scale, (double)plan->fc2_scale,
             (double)plan->fc2_bias_scale, moe->upcycle.drop_ratio, plan->drop_units,
             plan->expert_hidden, upcycle_drop_scope_names[moe->upcycle.drop_scope]);
}

/* Upcycles the loaded dense session into a fresh MoE session and saves it. */
static cm_status convert(const char *dense_path, run_session *dense, const ckpt_meta *dense_meta,
                         const cm_recipe *dense_recipe, const cm_recipe *moe_recipe,
                         const upcycle_plan *plan, const char *out_path) {
    run_session *moe;
    CM_TRY(run_session_open(moe_recipe, NULL, false, &moe));
    cm_status status =
        upcycle_params(run_session_params(dense), run_session_params(moe), moe_recipe, plan);
    char *moe_text = recipe_format_text(moe_recipe), *dense_text = recipe_format_text(dense_recipe);
    char method[512];
    describe_plan(moe_recipe, plan, method, sizeof method);
    if (status == CM_OK && (!moe_text || !dense_text))
        status = CM_ERR(CM_ERR_NOMEM, "out of memory");
    if (status == CM_OK) {
        const ckpt_meta meta = {0, (uint64_t)moe_recipe->train.seed, 0};
        const ckpt_origin origin = {dense_path, dense_meta->step, dense_meta->seed,
                                    dense_text, method,           "upcycled_from"};
        status = ckpt_save_with_origin(out_path, run_session_params(moe), &meta, moe_text, &origin);
    }
    free(moe_text);
    free(dense_text);
    run_session_close(moe);
    return status;
}

cm_status upcycle_checkpoint(const char *dense_path, const cm_recipe *moe_recipe,
                             const char *out_path, upcycle_plan *plan_out) {
    cm_recipe dense_recipe;
    CM_TRY(read_dense_recipe(dense_path, &dense_recipe));
    upcycle_plan plan;
    cm_status status = upcycle_plan_make(&dense_recipe, moe_recipe, &plan);
    if (status != CM_OK) return cm_error_wrap(status, "cannot upcycle %s", dense_path);
    run_session *dense;
    CM_TRY(run_session_open(&dense_recipe, NULL, false, &dense));
    ckpt_meta dense_meta = {0};
    status = ckpt_load(dense_path, run_session_params(dense), &dense_meta, false);
    if (status == CM_OK)
        status =
            convert(dense_path, dense, &dense_meta, &dense_recipe, moe_recipe, &plan, out_path);
    run_session_close(dense);
    if (status == CM_OK && plan_out) *plan_out = plan;
    return status;
}
