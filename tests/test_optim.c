/* optim: AdamW and SGD against a double-precision reference loop and
 * hand-derived numbers, frozen and no_decay handling, the decay policy,
 * gradient-norm clipping (with the distributed reducer hook) and
 * learning-rate schedules. */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "optim/optim.h"

/* ---- a small registry with every kind of parameter
 * ------------------------------ */

typedef struct fixture {
    ag_params params;
    ag_param *matrix, *norm, *bias, *embedding, *frozen, *expert_w, *expert_b;
} fixture;

static ag_param *declare(ag_params *params, const char *name, ag_group group, int ndim,
                         const int *shape) {
    ag_param *param = NULL;
    ag_init init = {AG_INIT_UNIFORM, -1.0f, 1.0f};
    ck_assert_int_eq(ag_params_declare(params, name, group, ndim, shape, init, &param), CM_OK);
    return param;
}

static void fixture_init(fixture *f) {
    ag_params_init(&f->params);
    f->matrix = declare(&f->params, "blocks.0.mlp.w", AG_GROUP_DENSE, 2, (int[]){3, 5});
    f->norm = declare(&f->params, "blocks.0.ln.weight", AG_GROUP_DENSE, 1, (int[]){5});
    f->bias = declare(&f->params, "blocks.0.mlp.bias", AG_GROUP_DENSE, 1, (int[]){7});
    f->embedding = declare(&f->params, "tok_emb.weight", AG_GROUP_DENSE, 2, (int[]){4, 3});
    f->frozen = declare(&f->params, "blocks.0.moe.gate", AG_GROUP_DENSE, 2, (int[]){2, 3});
    f->expert_w =
        declare(&f->params, "blocks.0.moe.experts.w1", AG_GROUP_EXPERT, 3, (int[]){2, 3, 5});
    f->expert_b = declare(&f->params, "blocks.0.moe.experts.b1", AG_GROUP_EXPERT, 2, (int[]){2, 5});
    ck_assert_int_eq(ag_params_finalize(&f->params, 7), CM_OK);
    ag_param_set_frozen(f->frozen, true);
    /* no_decay on the norm, the bias and the expert bias; decay elsewhere. */
    optim_apply_decay_policy(&f->params, false, false, true);
}

static float *param_data(fixture *f, ag_param *p) {
    return f->params.buffers[p->group].data + p->offset;
}
static float *param_grad(fixture *f, ag_param *p) {
    return f->params.buffers[p->group].grad + p->offset;
}
static float *param_m(fixture *f, ag_param *p) {
    return f->params.buffers[p->group].m + p->offset;
}
static float *param_v(fixture *f, ag_param *p) {
    return f->params.buffers[p->group].v + p->offset;
}

/* Deterministic gradients that change with the step; frozen parameters get
 * non-zero gradients too, so skipping them is actually tested. */
static void fill_grads(fixture *f, int step) {
    for (int i = 0; i < f->params.count; i++) {
        ag_param *p = f->params.items[i];
        float *grad = param_grad(f, p);
        for (int64_t j = 0; j < p->tensor.numel; j++)
            grad[j] = 0.5f * sinf(1.3f * (float)j + 0.7f * (float)step + 0.37f * (float)i);
    }
}

/* Every float outside the parameter spans (the alignment padding) is still 0.
 */
static void assert_padding_zero(fixture *f) {
    for (int g = 0; g < AG_NUM_GROUPS; g++) {
        ag_param_buffer *buffer = &f->params.buffers[g];
        char *covered = calloc(buffer->numel + 1, 1);
        for (int i = 0; i < f->params.count; i++) {
            ag_param *p = f->params.items[i];
            if ((int)p->group == g) memset(covered + p->offset, 1, (size_t)p->tensor.numel);
        }
        for (size_t j = 0; j < buffer->numel; j++)
            if (!covered[j]) {
                ck_assert_float_eq(buffer->data[j], 0.0f);
                ck_assert_float_eq(buffer->m[j], 0.0f);
                ck_assert_float_eq(buffer->v[j], 0.0f);
            }
        free(covered);
    }
}

/* Double-precision copies of every parameter's value and moments. */
typedef struct reference {
    double *p[16], *m[16], *v[16];
} reference;

static void reference_init(reference *ref, fixture *f) {
    for (int i = 0; i < f->params.count; i++) {
        ag_param *p = f->params.items[i];
        int64_t n = p->tensor.numel;
        ref->p[i] = calloc((size_t)n, sizeof(double));
        ref->m[i] = calloc((size_t)n, sizeof(double));
        ref->v[i] = calloc((size_t)n, sizeof(double));
        for (int64_t j = 0; j < n; j++) ref->p[i][j] = param_data(f, p)[j];
    }
}

static void reference_free(reference *ref, int count) {
    for (int i = 0; i < count; i++) {
        free(ref->p[i]);
        free(ref->m[i]);
        free(ref->v[i]);
    }
}

/* The AdamW paper's update, written the obvious way. */
static void reference_adamw(reference *ref, fixture *f, const optim_adamw_config *c, double lr,
                            int t) {
    for (int i = 0; i < f->params.count; i++) {
        ag_param *p = f->params.items[i];
        if (p->frozen) continue;
        const float *grad = param_grad(f, p);
        for (int64_t j = 0; j < p->tensor.numel; j++) {
            double g = grad[j];
            double *w = &ref->p[i][j], *m = &ref->m[i][j], *v = &ref->v[i][j];
            if (!p->no_decay) *w -= lr * c->weight_decay * *w;
            *m = c->beta1 * *m + (1 - c->beta1) * g;
            *v = c->beta2 * *v + (1 - c->beta2) * g * g;
            double m_hat = *m / (1 - pow(c->beta1, t)), v_hat = *v / (1 - pow(c->beta2, t));
            *w -= lr * m_hat / (sqrt(v_hat) + c->eps);
        }
    }
}

/* torch.optim.SGD with dampening 0, written the obvious way (m = momentum
 * buffer). */
static void reference_sgd(reference *ref, fixture *f, const optim_sgd_config *c, double lr, int t) {
    for (int i = 0; i < f->params.count; i++) {
        ag_param *p = f->params.items[i];
        if (p->frozen) continue;
        const float *grad = param_grad(f, p);
        for (int64_t j = 0; j < p->tensor.numel; j++) {
            double *w = &ref->p[i][j], *buf = &ref->m[i][j];
            double g = grad[j] + (p->no_decay ? 0.0 : c->weight_decay * *w);
            *buf = t == 1 ? g : c->momentum * *buf + g;
            g = c->nesterov ? g + c->momentum * *buf : *buf;
            *w -= lr * g;
        }
    }
}

static void assert_matches_reference(fixture *f, const reference *ref, bool check_v,
                                     const char *label, int step) {
    for (int i = 0; i < f->params.count; i++) {
        ag_param *p = f->params.items[i];
        if (p->frozen) continue;
        for (int64_t j = 0; j < p->tensor.numel; j++) {
            double want[3] = {ref->p[i][j], ref->m[i][j], ref->v[i][j]};
            float got[3] = {param_data(f, p)[j], param_m(f, p)[j], param_v(f, p)[j]};
            for (int k = 0; k < (check_v ? 3 : 2); k++)
                /* float against double over 3 steps: the error seen is below 2e-7 */
                ck_assert_msg(fabs(got[k] - want[k]) <= 2e-6 + 2e-6 * fabs(want[k]),
                              "%s step %d: %s[%lld] %s = %.9g, reference %.9g", label, step,
                              p->name, (long long)j, (const char *[]){"value", "m", "v"}[k],
                              (double)got[k], want[k]);
        }
    }
}

/* Frozen parameters: value, m and v bit-identical to `saved` (3 spans). */
static void save_frozen(fixture *f, float *saved) {
    int64_t n = f->frozen->tensor.numel;
    memcpy(saved, param_data(f, f->frozen), (size_t)n * sizeof(float));
    memcpy(saved + n, param_m(f, f->frozen), (size_t)n * sizeof(float));
    memcpy(saved + 2 * n, param_v(f, f->frozen), (size_t)n * sizeof(float));
}

static void assert_frozen_unchanged(fixture *f, const float *saved) {
    int64_t n = f->frozen->tensor.numel;
    size_t bytes = (size_t)n * sizeof(float);
    ck_assert_mem_eq(param_data(f, f->frozen), saved, bytes);
    ck_assert_mem_eq(param_m(f, f->frozen), saved + n, bytes);
    ck_assert_mem_eq(param_v(f, f->frozen), saved + 2 * n, bytes);
}

/* ---- AdamW
 * ------------------------------------------------------------------------ */

START_TEST(test_adamw_matches_reference) {
    fixture f;
    fixture_init(&f);
    ck_assert(f.norm->no_decay && f.bias->no_decay && f.expert_b->no_decay);
    ck_assert(!f.matrix->no_decay && !f.embedding->no_decay && !f.expert_w->no_decay);
    reference ref;
    reference_init(&ref, &f);
    float frozen_before[3 * 6];
    save_frozen(&f, frozen_before);
    optim_adamw_config config = {.beta1 = 0.8, .beta2 = 0.95, .eps = 1e-6, .weight_decay = 0.1};
    optim_state state = {0};
    const double lrs[3] = {0.05, 0.04, 0.03};
    for (int t = 1; t <= 3; t++) {
        fill_grads(&f, t);
        optim_adamw_step(&f.params, &config, lrs[t - 1], &state);
        reference_adamw(&ref, &f, &config, lrs[t - 1], t);
        ck_assert_int_eq(state.step, t);
        assert_matches_reference(&f, &ref, true, "adamw", t);
    }
    assert_frozen_unchanged(&f, frozen_before);
    assert_padding_zero(&f);
    reference_free(&ref, f.params.count);
    ag_params_free(&f.params);
}
END_TEST

/* Step 1 by hand: m = (1-b1) g, v = (1-b2) g^2, so the bias-corrected update is
 * lr * g / (|g| + eps) = lr * sign(g) (up to eps), after p *= 1 - lr wd. */
START_TEST(test_adamw_step1_by_hand) {
    ag_params params;
    ag_params_init(&params);
    ag_param *w = declare(&params, "w", AG_GROUP_DENSE, 2, (int[]){1, 2});
    ck_assert_int_eq(ag_params_finalize(&params, 1), CM_OK);
    w->tensor.data[0] = 1.0f, w->tensor.data[1] = -2.0f;
    w->tensor.grad[0] = 0.5f, w->tensor.grad[1] = -0.25f;
    optim_adamw_config config = optim_adamw_defaults();
    config.weight_decay = 0.1;
    optim_state state = {0};
    optim_adamw_step(&params, &config, 0.1, &state);
    /* 1 * 0.99 - 0.1 * 0.5 / 0.5 and -2 * 0.99 + 0.1. */
    ck_assert_float_eq_tol(w->tensor.data[0], 0.89f, 1e-6f);
    ck_assert_float_eq_tol(w->tensor.data[1], -1.88f, 1e-6f);
    float *m = params.buffers[AG_GROUP_DENSE].m, *v = params.buffers[AG_GROUP_DENSE].v;
    ck_assert_float_eq_tol(m[0], 0.05f, 1e-8f);
    ck_assert_float_eq_tol(m[1], -0.025f, 1e-8f);
    ck_assert_float_eq_tol(v[0], 0.00025f, 1e-10f);
    ck_assert_float_eq_tol(v[1], 0.0000625f, 1e-10f);
    /* Step 2 with g = 0: m = 0.9 * 0.05 = 0.045, v = 0.999 * 0.00025; bias
     * corrections 0.19 and 0.001999: update = 0.1 * (0.045 / 0.19) /
     * sqrt(0.00024975 / 0.001999) = 0.0236842.. / 0.353466.. = 0.0670058..,
     * so p = 0.89 * 0.99 - 0.0670058 = 0.8140942. */
    w->tensor.grad[0] = 0.0f, w->tensor.grad[1] = 0.0f;
    optim_adamw_step(&params, &config, 0.1, &state);
    ck_assert_float_eq_tol(w->tensor.data[0], 0.8140942f, 1e-6f);
    ag_params_free(&params);
}
END_TEST

/* With zero gradients, m = v = 0 and the Adam term is 0: a no_decay parameter
 * stays bit-identical and a decayed one is exactly p * (1 - lr wd). */
START_TEST(test_adamw_no_decay) {
    fixture f;
    fixture_init(&f);
    ag_params_zero_grad(&f.params);
    float norm_before[5], matrix_before[15];
    memcpy(norm_before, param_data(&f, f.norm), sizeof norm_before);
    memcpy(matrix_before, param_data(&f, f.matrix), sizeof matrix_before);
    optim_adamw_config config = optim_adamw_defaults();
    config.weight_decay = 0.5;
    optim_state state = {0};
    optim_adamw_step(&f.params, &config, 0.1, &state);
    ck_assert_mem_eq(param_data(&f, f.norm), norm_before, sizeof norm_before);
    for (int j = 0; j < 15; j++)
        ck_assert_float_eq(param_data(&f, f.matrix)[j], matrix_before[j] * 0.95f);
    ag_params_free(&f.params);
}
END_TEST

/* ---- SGD
 * -----------------------------------------------------------------------------
 */

static void check_sgd(bool nesterov, double weight_decay) {
    fixture f;
    fixture_init(&f);
    reference ref;
    reference_init(&ref, &f);
    float frozen_before[3 * 6];
    save_frozen(&f, frozen_before);
    optim_sgd_config config = {.momentum = 0.9, .weight_decay = weight_decay, .nesterov = nesterov};
    optim_state state = {0};
    const double lrs[3] = {0.1, 0.05, 0.02};
    for (int t = 1; t <= 3; t++) {
        fill_grads(&f, t);
        float grad_before[64];
        memcpy(grad_before, param_grad(&f, f.matrix), 15 * sizeof(float));
        optim_sgd_step(&f.params, &config, lrs[t - 1], &state);
        ck_assert_mem_eq(param_grad(&f, f.matrix), grad_before, 15 * sizeof(float));
        reference_sgd(&ref, &f, &config, lrs[t - 1], t);
        assert_matches_reference(&f, &ref, false, nesterov ? "sgd nesterov" : "sgd", t);
    }
    assert_frozen_unchanged(&f, frozen_before);
    assert_padding_zero(&f);
    reference_free(&ref, f.params.count);
    ag_params_free(&f.params);
}

START_TEST(test_sgd_momentum) {
    check_sgd(false, 0.0);
}
END_TEST

START_TEST(test_sgd_momentum_weight_decay) {
    check_sgd(false, 0.1);
}
END_TEST

START_TEST(test_sgd_nesterov_weight_decay) {
    check_sgd(true, 0.1);
}
END_TEST

/* lr 0.1, momentum 0.9, weight decay 0.1, p = (1, -2), g = (0.5, -0.25):
 * d_p = g + 0.1 p = (0.6, -0.45) = buf after step 1.
 * plain:    p = p - 0.1 buf = (0.94, -1.955);
 *   step 2: d_p = (0.5 + 0.094, ...) = 0.594, buf = 0.54 + 0.594 = 1.134,
 *           p = 0.94 - 0.1134 = 0.8266.
 * nesterov: p = p - 0.1 (d_p + 0.9 buf) = (1 - 0.114, -2 + 0.0855). */
START_TEST(test_sgd_by_hand) {
    for (int nesterov = 0; nesterov <= 1; nesterov++) {
        ag_params params;
        ag_params_init(&params);
        ag_param *w = declare(&params, "w", AG_GROUP_DENSE, 2, (int[]){2, 1});
        ck_assert_int_eq(ag_params_finalize(&params, 1), CM_OK);
        w->tensor.data[0] = 1.0f, w->tensor.data[1] = -2.0f;
        w->tensor.grad[0] = 0.5f, w->tensor.grad[1] = -0.25f;
        optim_sgd_config config = {.momentum = 0.9, .weight_decay = 0.1, .nesterov = nesterov};
        optim_state state = {0};
        optim_sgd_step(&params, &config, 0.1, &state);
        float *buf = params.buffers[AG_GROUP_DENSE].m;
        ck_assert_float_eq_tol(buf[0], 0.6f, 1e-7f);
        ck_assert_float_eq_tol(buf[1], -0.45f, 1e-7f);
        if (nesterov) {
            ck_assert_float_eq_tol(w->tensor.data[0], 0.886f, 1e-6f);
            ck_assert_float_eq_tol(w->tensor.data[1], -1.9145f, 1e-6f);
        } else {
            ck_assert_float_eq_tol(w->tensor.data[0], 0.94f, 1e-6f);
            ck_assert_float_eq_tol(w->tensor.data[1], -1.955f, 1e-6f);
            optim_sgd_step(&params, &config, 0.1, &state);
            ck_assert_float_eq_tol(buf[0], 1.134f, 1e-6f);
            ck_assert_float_eq_tol(w->tensor.data[0], 0.8266f, 1e-6f);
        }
        ag_params_free(&params);
    }
}
END_TEST

START_TEST(test_optim_step_dispatch_and_checks) {
    fixture a, b;
    fixture_init(&a);
    fixture_init(&b);
    fill_grads(&a, 1);
    fill_grads(&b, 1);
    optim_config config = {.kind = OPTIM_SGD, .sgd = {.momentum = 0.5}};
    optim_state state_a = {0}, state_b = {0};
    ck_assert_int_eq(optim_config_check(&config), CM_OK);
    optim_step(&a.params, &config, 0.1, &state_a);
    optim_sgd_step(&b.params, &config.sgd, 0.1, &state_b);
    ck_assert_mem_eq(a.params.buffers[0].data, b.params.buffers[0].data,
                     a.params.buffers[0].numel * sizeof(float));
    config.sgd.nesterov = true, config.sgd.momentum = 0.0;
    ck_assert_int_eq(optim_config_check(&config), CM_ERR_INVALID);
    config = (optim_config){.kind = OPTIM_ADAMW, .adamw = optim_adamw_defaults()};
    ck_assert_int_eq(optim_config_check(&config), CM_OK);
    config.adamw.beta2 = 1.0;
    ck_assert_int_eq(optim_config_check(&config), CM_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(cm_error_message(), "beta2"));
    config.adamw.beta2 = 0.999, config.adamw.eps = 0.0;
    ck_assert_int_eq(optim_config_check(&config), CM_ERR_INVALID);
    ag_params_free(&a.params);
    ag_params_free(&b.params);
}
END_TEST

/* ---- weight-decay policy
 * --------------------------------------------------------------- */

START_TEST(test_decay_policy) {
    ag_params params;
    ag_params_init(&params);
    struct {
        const char *name;
        ag_group group;
        int ndim, shape[3];
        char kind; /* m matrix, n norm, b bias, e embedding */
    } cases[] = {
        {"tok_emb.weight", AG_GROUP_DENSE, 2, {10, 4}, 'e'},
        {"wpe", AG_GROUP_DENSE, 2, {8, 4}, 'e'},
        {"blocks.0.ln1.weight", AG_GROUP_DENSE, 1, {4}, 'n'},
        {"blocks.0.ln1.bias", AG_GROUP_DENSE, 1, {4}, 'b'},
        {"blocks.0.bn.gamma", AG_GROUP_DENSE, 1, {4}, 'n'},
        {"blocks.0.attn.qkv.weight", AG_GROUP_DENSE, 2, {4, 12}, 'm'},
        {"blocks.0.attn.qkv.bias", AG_GROUP_DENSE, 1, {12}, 'b'},
        {"blocks.0.moe.experts.w1", AG_GROUP_EXPERT, 3, {2, 4, 8}, 'm'},
        {"blocks.0.moe.experts.b1", AG_GROUP_EXPERT, 2, {2, 8}, 'b'},
        {"head.b", AG_GROUP_DENSE, 1, {10}, 'b'},
        {"head.beta", AG_GROUP_DENSE, 1, {10}, 'n'},
        {"conv.kernel", AG_GROUP_DENSE, 3, {3, 3, 3}, 'm'},
    };
    const int n = (int)(sizeof cases / sizeof cases[0]);
    for (int i = 0; i < n; i++)
        declare(&params, cases[i].name, cases[i].group, cases[i].ndim, cases[i].shape);
    for (int flags = 0; flags < 8; flags++) {
        bool norms = flags & 1, biases = flags & 2, embeddings = flags & 4;
        optim_apply_decay_policy(&params, norms, biases, embeddings);
        for (int i = 0; i < n; i++) {
            bool decays = cases[i].kind == 'm' || (cases[i].kind == 'n' && norms) ||
                          (cases[i].kind == 'b' && biases) || (cases[i].kind == 'e' && embeddings);
            ck_assert_msg(params.items[i]->no_decay == !decays, "flags %d: %s", flags,
                          cases[i].name);
        }
    }
    ag_params_free(&params);
}
END_TEST

/* ---- clipping
 * ---------------------------------------------------------------------------
 */

static double test_grad_norm(fixture *f, double expert_weight) {
    double sum = 0;
    for (int i = 0; i < f->params.count; i++) {
        ag_param *p = f->params.items[i];
        if (p->frozen) continue;
        double w = p->group == AG_GROUP_EXPERT ? expert_weight : 1.0;
        for (int64_t j = 0; j < p->tensor.numel; j++)
            sum += w * (double)param_grad(f, p)[j] * param_grad(f, p)[j];
    }
    return sqrt(sum);
}

START_TEST(test_clip_scales_to_max_norm) {
    fixture f;
    fixture_init(&f);
    fill_grads(&f, 2);
    double norm = test_grad_norm(&f, 1.0);
    ck_assert_double_eq_tol(optim_grad_norm(&f.params), norm, 1e-12 * norm);
    float frozen_grad[6], before[AG_NUM_GROUPS][128];
    memcpy(frozen_grad, param_grad(&f, f.frozen), sizeof frozen_grad);
    for (int g = 0; g < AG_NUM_GROUPS; g++)
        memcpy(before[g], f.params.buffers[g].grad, f.params.buffers[g].numel * sizeof(float));
    double max_norm = norm / 3.0, reported = 0;
    ck_assert_int_eq(optim_clip_grad_norm(&f.params, max_norm, &reported), CM_OK);
    ck_assert_double_eq_tol(reported, norm, 1e-12 * norm);
    ck_assert_double_eq_tol(test_grad_norm(&f, 1.0), max_norm, 1e-6 * max_norm);
    ck_assert_mem_eq(param_grad(&f, f.frozen), frozen_grad, sizeof frozen_grad);
    for (int i = 0; i < f.params.count; i++) {
        ag_param *p = f.params.items[i];
        if (p->frozen) continue;
        for (int64_t j = 0; j < p->tensor.numel; j++)
            ck_assert_float_eq_tol(param_grad(&f, p)[j],
                                   before[p->group][p->offset + (size_t)j] / 3.0f, 1e-7f);
    }
    ag_params_free(&f.params);
}
END_TEST

START_TEST(test_clip_leaves_small_grads) {
    fixture f;
    fixture_init(&f);
    fill_grads(&f, 3);
    double norm = test_grad_norm(&f, 1.0), reported = 0;
    float before[AG_NUM_GROUPS][128];
    for (int g = 0; g < AG_NUM_GROUPS; g++)
        memcpy(before[g], f.params.buffers[g].grad, f.params.buffers[g].numel * sizeof(float));
    ck_assert_int_eq(optim_clip_grad_norm(&f.params, norm * 1.01, &reported), CM_OK);
    ck_assert_double_eq_tol(reported, norm, 1e-12 * norm);
    for (int g = 0; g < AG_NUM_GROUPS; g++)
        ck_assert_mem_eq(f.params.buffers[g].grad, before[g],
                         f.params.buffers[g].numel * sizeof(float));
    ck_assert_int_eq(optim_clip_grad_norm(&f.params, 0.0, NULL), CM_ERR_INVALID);
    ag_params_free(&f.params);
}
END_TEST

/* Stands in for an MPI reduction over two ranks that hold different experts
 * with (here) equal gradients: the expert sum counts twice, dense once. */
static cm_status two_rank_reducer(double group_sq[AG_NUM_GROUPS], void *user) {
    (*(int *)user)++;
    group_sq[AG_GROUP_EXPERT] *= 2.0;
    return CM_OK;
}

static cm_status failing_reducer(double group_sq[AG_NUM_GROUPS], void *user) {
    (void)group_sq, (void)user;
    return CM_ERR(CM_ERR_MPI, "reduction failed");
}

START_TEST(test_clip_reducer_hook) {
    fixture f;
    fixture_init(&f);
    fill_grads(&f, 4);
    int calls = 0;
    optim_norm_reducer reducer = {two_rank_reducer, &calls};
    double local[AG_NUM_GROUPS], norm = 0;
    optim_grad_sq_norm_local(&f.params, local);
    ck_assert_double_eq_tol(sqrt(local[0] + local[1]), test_grad_norm(&f, 1.0), 1e-12);
    ck_assert_int_eq(optim_grad_norm_reduced(&f.params, &reducer, &norm), CM_OK);
    double want = test_grad_norm(&f, 2.0);
    ck_assert_double_eq_tol(norm, want, 1e-12 * want);
    ck_assert_int_eq(optim_clip_grad_norm_reduced(&f.params, want / 2, &reducer, NULL), CM_OK);
    ck_assert_int_eq(calls, 2);
    ck_assert_double_eq_tol(test_grad_norm(&f, 2.0), want / 2, 1e-6 * want);

    float before[AG_NUM_GROUPS][128];
    for (int g = 0; g < AG_NUM_GROUPS; g++)
        memcpy(before[g], f.params.buffers[g].grad, f.params.buffers[g].numel * sizeof(float));
    optim_norm_reducer failing = {failing_reducer, NULL};
    ck_assert_int_eq(optim_clip_grad_norm_reduced(&f.params, 1e-3, &failing, NULL), CM_ERR_MPI);
    param_grad(&f, f.matrix)[2] = NAN;
    before[f.matrix->group][f.matrix->offset + 2] = NAN;
    ck_assert_int_eq(optim_clip_grad_norm(&f.params, 1e-3, &norm), CM_ERR_NUMERIC);
    ck_assert(isnan(norm));
    for (int g = 0; g < AG_NUM_GROUPS; g++)
        ck_assert_mem_eq(f.params.buffers[g].grad, before[g],
                         f.params.buffers[g].numel * sizeof(float));
    ag_params_free(&f.params);
}
END_TEST

/* ---- learning-rate schedules
 * -------------------------------------------------------------- */

START_TEST(test_lr_constant_warmup) {
    optim_lr_schedule s = {.kind = OPTIM_LR_CONSTANT, .lr = 1e-3, .warmup_steps = 10};
    ck_assert_int_eq(optim_lr_schedule_check(&s), CM_OK);
    ck_assert_double_eq_tol(optim_lr_at(&s, 0), 1e-4, 1e-15);
    ck_assert_double_eq_tol(optim_lr_at(&s, 4), 5e-4, 1e-15);
    ck_assert_double_eq_tol(optim_lr_at(&s, 9), 1e-3, 1e-15);
    ck_assert_double_eq_tol(optim_lr_at(&s, 10), 1e-3, 1e-15);
    ck_assert_double_eq_tol(optim_lr_at(&s, 100000), 1e-3, 1e-15);
    s.warmup_steps = 0;
    ck_assert_double_eq_tol(optim_lr_at(&s, 0), 1e-3, 1e-15);
}
END_TEST

START_TEST(test_lr_cosine) {
    const double lr = 1e-3, min_lr = 1e-4;
    optim_lr_schedule s = {.kind = OPTIM_LR_COSINE,
                           .lr = lr,
                           .min_lr = min_lr,
                           .warmup_steps = 10,
                           .total_steps = 110};
    ck_assert_int_eq(optim_lr_schedule_check(&s), CM_OK);
    ck_assert_double_eq_tol(optim_lr_at(&s, 0), lr / 10, 1e-15);            /* warmup start */
    ck_assert_double_eq_tol(optim_lr_at(&s, 9), lr, 1e-15);                 /* warmup end */
    ck_assert_double_eq_tol(optim_lr_at(&s, 10), lr, 1e-15);                /* cosine start */
    ck_assert_double_eq_tol(optim_lr_at(&s, 60), (lr + min_lr) / 2, 1e-15); /* midpoint */
    /* A quarter of the way: min + (lr - min) (1 + cos(pi/4)) / 2. */
    ck_assert_double_eq_tol(optim_lr_at(&s, 35), min_lr + (lr - min_lr) * 0.8535533905932737,
                            1e-15);
    ck_assert_double_eq_tol(optim_lr_at(&s, 110), min_lr, 1e-15);
    ck_assert_double_eq_tol(optim_lr_at(&s, 5000), min_lr, 1e-15);
    for (int64_t step = 11; step <= 110; step++)
        ck_assert(optim_lr_at(&s, step) < optim_lr_at(&s, step - 1));
    /* SMoE-Dropout's schedule: no warmup, cosine to 0. */
    optim_lr_schedule smoe = {.kind = OPTIM_LR_COSINE, .lr = 2.5e-4, .total_steps = 400000};
    ck_assert_double_eq_tol(optim_lr_at(&smoe, 0), 2.5e-4, 1e-18);
    ck_assert_double_eq_tol(optim_lr_at(&smoe, 200000), 1.25e-4, 1e-18);
    ck_assert_double_eq_tol(optim_lr_at(&smoe, 400000), 0.0, 1e-18);
    s.total_steps = 10;
    ck_assert_int_eq(optim_lr_schedule_check(&s), CM_ERR_INVALID);
    s.total_steps = 110, s.min_lr = 2e-3;
    ck_assert_int_eq(optim_lr_schedule_check(&s), CM_ERR_INVALID);
}
END_TEST

START_TEST(test_lr_step_decay) {
    optim_lr_schedule s = {.kind = OPTIM_LR_STEP, .lr = 0.1, .step_size = 30, .gamma = 0.1};
    ck_assert_int_eq(optim_lr_schedule_check(&s), CM_OK);
    ck_assert_double_eq_tol(optim_lr_at(&s, 0), 0.1, 1e-15);
    ck_assert_double_eq_tol(optim_lr_at(&s, 29), 0.1, 1e-15);
    ck_assert_double_eq_tol(optim_lr_at(&s, 30), 0.01, 1e-15);
    ck_assert_double_eq_tol(optim_lr_at(&s, 59), 0.01, 1e-15);
    ck_assert_double_eq_tol(optim_lr_at(&s, 60), 0.001, 1e-15);
    s.warmup_steps = 5;
    ck_assert_double_eq_tol(optim_lr_at(&s, 0), 0.02, 1e-15);
    ck_assert_double_eq_tol(optim_lr_at(&s, 4), 0.1, 1e-15);
    ck_assert_double_eq_tol(optim_lr_at(&s, 30), 0.01, 1e-15);
    s.step_size = 0;
    ck_assert_int_eq(optim_lr_schedule_check(&s), CM_ERR_INVALID);
    s.step_size = 30, s.gamma = 0.0;
    ck_assert_int_eq(optim_lr_schedule_check(&s), CM_ERR_INVALID);
}
END_TEST

int main(void) {
    Suite *suite = suite_create("optim");
    TCase *optimizers = tcase_create("optimizers");
    tcase_add_test(optimizers, test_adamw_matches_reference);
    tcase_add_test(optimizers, test_adamw_step1_by_hand);
    tcase_add_test(optimizers, test_adamw_no_decay);
    tcase_add_test(optimizers, test_sgd_momentum);
    tcase_add_test(optimizers, test_sgd_momentum_weight_decay);
    tcase_add_test(optimizers, test_sgd_nesterov_weight_decay);
    tcase_add_test(optimizers, test_sgd_by_hand);
    tcase_add_test(optimizers, test_optim_step_dispatch_and_checks);
    tcase_add_test(optimizers, test_decay_policy);
    suite_add_tcase(suite, optimizers);
    TCase *clipping = tcase_create("clipping");
    tcase_add_test(clipping, test_clip_scales_to_max_norm);
    tcase_add_test(clipping, test_clip_leaves_small_grads);
    tcase_add_test(clipping, test_clip_reducer_hook);
    suite_add_tcase(suite, clipping);
    TCase *schedules = tcase_create("schedules");
    tcase_add_test(schedules, test_lr_constant_warmup);
    tcase_add_test(schedules, test_lr_cosine);
    tcase_add_test(schedules, test_lr_step_decay);
    suite_add_tcase(suite, schedules);
    SRunner *runner = srunner_create(suite);
    srunner_run_all(runner, CK_NORMAL);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
