/* Fixtures and references shared by the router tests (test_routers.c,
 * test_routers_methods.c); see router_testutil.h. */
#include "router_testutil.h"

#include <check.h>
#include <math.h>
#include <string.h>

/* ---- fixtures -------------------------------------------------------------- */

router_config make_config(router_kind kind, int experts, int k) {
    return (router_config){.kind = kind,
                           .num_experts = experts,
                           .k = k,
                           .gating = ROUTER_SOFTMAX_THEN_TOPK,
                           .init_std = 0.02f,
                           .noise_std = 1.0f,
                           .top_p = 0.5f,
                           .k_schedule = {ROUTER_K_CONSTANT, k, k, 1},
                           .thor_level = ROUTER_THOR_PER_SEQUENCE,
                           .rnn_hidden = 3};
}

void fixture_init(fixture *f, const router_config *config, int d_model) {
    ag_params_init(&f->params);
    ck_assert_int_eq(router_declare(&f->r, config, 3, d_model, &f->params, "router"), CM_OK);
    ck_assert_int_eq(ag_params_finalize(&f->params, 11), CM_OK);
    ck_assert_int_eq(ag_ctx_init(&f->ctx, ARENA_BYTES), CM_OK);
}

void fixture_free(fixture *f) {
    ag_ctx_free(&f->ctx);
    ag_params_free(&f->params);
}

ag_tensor *weight_of(fixture *f) {
    return ag_param_tensor(f->r.weight);
}

/* x = the identity [T,T] and W[e][t] = logits[t][e], so x W^T = logits [T,E]
 * exactly (d_model must be T). Returns x (free with gc_tensor_free). */
ag_tensor *set_logits(fixture *f, int tokens, const float *logits, bool x_grad) {
    int experts = f->r.config.num_experts;
    ag_tensor *x = gc_tensor_new(2, (int[]){tokens, tokens}, 0.0f, 0.0f, 1, x_grad);
    for (int t = 0; t < tokens; t++) x->data[t * tokens + t] = 1.0f;
    float *w = weight_of(f)->data;
    for (int e = 0; e < experts; e++)
        for (int t = 0; t < tokens; t++) w[e * tokens + t] = logits[t * experts + e];
    return x;
}

router_call eval_call(void) {
    return (router_call){.training = false, .seed = 5, .step = 9, .seq_len = 4};
}

router_output route(fixture *f, ag_tensor *x, const router_call *call) {
    router_output out;
    ag_ctx_reset(&f->ctx);
    ck_assert_int_eq(router_route(&f->ctx, &f->r, x, call, &out), CM_OK);
    ck_assert_int_eq(out.n_tokens, (int)ag_rows(x));
    ck_assert_int_eq(out.offsets[0], 0);
    ck_assert_int_eq(out.offsets[out.n_tokens], out.n_slots);
    ck_assert_int_eq(out.gates->numel, out.n_slots);
    ck_assert_int_eq(out.stats.slots, out.n_slots);
    for (int t = 0; t < out.n_tokens; t++) /* ascending experts within a token */
        for (int s = out.offsets[t] + 1; s < out.offsets[t + 1]; s++)
            ck_assert_int_lt(out.expert[s - 1], out.expert[s]);
    return out;
}

/* Slots of token t must be exactly `experts` (count n, ascending). */
void assert_token_experts(const router_output *out, int t, int n, const int *experts) {
    ck_assert_int_eq(out->offsets[t + 1] - out->offsets[t], n);
    for (int i = 0; i < n; i++) ck_assert_int_eq(out->expert[out->offsets[t] + i], experts[i]);
}
/* ---- direct double-precision references ------------------------------------- */

void ref_softmax(const float *row, int n, double *out) {
    double max = row[0], sum = 0.0;
    for (int i = 1; i < n; i++) max = row[i] > max ? row[i] : max;
    for (int i = 0; i < n; i++) sum += out[i] = exp(row[i] - max);
    for (int i = 0; i < n; i++) out[i] /= sum;
}

double ref_logsumexp(const float *row, int n) {
    double max = row[0], sum = 0.0;
    for (int i = 1; i < n; i++) max = row[i] > max ? row[i] : max;
    for (int i = 0; i < n; i++) sum += exp(row[i] - max);
    return max + log(sum);
}

/* rank of entry i among row[0..n): how many entries beat it (larger, or equal
 * with a lower index). Selected by top-k iff rank < k. */
int ref_rank(const double *row, int n, int i) {
    int rank = 0;
    for (int j = 0; j < n; j++) rank += row[j] > row[i] || (row[j] == row[i] && j < i);
    return rank;
}

/* logits [T,E] in double from the router's current x, W, b. */
void ref_logits(fixture *f, const ag_tensor *x, double *logits) {
    int tokens = (int)ag_rows(x), d = ag_last_dim(x), experts = f->r.config.num_experts;
    const float *w = weight_of(f)->data;
    for (int t = 0; t < tokens; t++)
        for (int e = 0; e < experts; e++) {
            double z = f->r.bias ? ag_param_tensor(f->r.bias)->data[e] : 0.0;
            for (int i = 0; i < d; i++) z += (double)x->data[t * d + i] * w[e * d + i];
            logits[t * experts + e] = z;
        }
}

/* ---- gradient checks with the selection held fixed ---------------------------- */

typedef struct grad_case {
    router *r;
    router_call call;
    bool aux;          /* return the aux loss instead of the gates */
    int32_t first[64]; /* the selection of the first call: experts of every slot */
    int first_slots;   /* -1 before the first call */
} grad_case;

/* Gates (or aux loss); asserts the selection never changes, so a finite
 * difference never straddles a switch of the discrete routing. */
static ag_tensor *forward_route(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    grad_case *c = user;
    router_output out;
    if (router_route(ctx, c->r, in[0], &c->call, &out) != CM_OK) return NULL;
    ck_assert_int_le(out.n_slots, 64);
    if (c->first_slots < 0) {
        c->first_slots = out.n_slots;
        memcpy(c->first, out.expert, (size_t)out.n_slots * sizeof(int32_t));
    }
    ck_assert_int_eq(out.n_slots, c->first_slots);
    for (int s = 0; s < out.n_slots; s++) ck_assert_int_eq(out.expert[s], c->first[s]);
    return c->aux ? out.aux_loss : out.gates;
}

/* x [T,E+2] = [L | u], W [E,E+2] = [I | v], b small: the logits are L plus a
 * small data-dependent part, and every input reaches them. L[t] is a
 * permutation of `levels` scaled by scales[t % n_scales]. */
ag_tensor *margin_inputs(fixture *f, int tokens, const float *levels, const float *scales,
                         int n_scales, uint64_t seed) {
    int experts = f->r.config.num_experts, d = experts + 2;
    ag_tensor *x = gc_tensor_new(2, (int[]){tokens, d}, -1.0f, 1.0f, seed, true);
    float *w = weight_of(f)->data;
    cm_rng_fill_uniform((cm_rng_key){seed, 1, 0, CM_RNG_TEST}, 0, experts * d, -0.02f, 0.02f, w);
    for (int e = 0; e < experts; e++)
        for (int i = 0; i < experts; i++) w[e * d + i] = e == i;
    if (f->r.bias)
        cm_rng_fill_uniform((cm_rng_key){seed, 2, 0, CM_RNG_TEST}, 0, experts, -0.02f, 0.02f,
                            ag_param_tensor(f->r.bias)->data);
    int32_t perm[MAX_E];
    for (int t = 0; t < tokens; t++) {
        cm_rng_permutation((cm_rng_key){seed, 3, (uint32_t)t, CM_RNG_TEST}, experts, perm);
        for (int e = 0; e < experts; e++)
            x->data[t * d + e] = scales[t % n_scales] * levels[perm[e]];
    }
    return x;
}

/* How far the top-p selection of every token is from changing: the smallest
 * of (threshold - mass before the last kept expert), (mass with it -
 * threshold) and the probability gap between the last kept expert and the
 * next one. A gradcheck step must move the probabilities by less. */
double top_p_margin(const double *logits, int tokens, int experts, double threshold) {
    double margin = 1.0;
    for (int t = 0; t < tokens; t++) {
        float row[MAX_E];
        double p[MAX_E], sorted[MAX_E], mass = 0.0;
        for (int e = 0; e < experts; e++) row[e] = (float)logits[t * experts + e];
        ref_softmax(row, experts, p);
        for (int e = 0; e < experts; e++) sorted[ref_rank(p, experts, e)] = p[e];
        int n = 0;
        while (n < experts && mass + sorted[n] <= threshold) mass += sorted[n++];
        if (n == experts) continue; /* everything kept: nothing to flip */
        margin = fmin(margin, threshold - mass);
        margin = fmin(margin, mass + sorted[n] - threshold);
        if (n + 1 < experts) margin = fmin(margin, sorted[n] - sorted[n + 1]);
    }
    return margin;
}

void run_gradcheck(const char *label, fixture *f, ag_tensor *x, bool aux) {
    router_call call = eval_call();
    run_gradcheck_call(label, f, x, aux, &call);
}

void run_gradcheck_call(const char *label, fixture *f, ag_tensor *x, bool aux,
                        const router_call *call) {
    grad_case c = {.r = &f->r, .call = *call, .aux = aux, .first_slots = -1};
    ag_tensor *inputs[6] = {x, weight_of(f)};
    int n = 2;
    if (f->r.bias) inputs[n++] = ag_param_tensor(f->r.bias);
    if (f->r.noise_weight) inputs[n++] = ag_param_tensor(f->r.noise_weight);
    if (f->r.null_weight) inputs[n++] = ag_param_tensor(f->r.null_weight);
    if (f->r.null_bias) inputs[n++] = ag_param_tensor(f->r.null_bias);
    gc_options options = gc_default_options();
    gc_result result = gc_check(label, forward_route, inputs, n, &c, &options);
    ck_assert_msg(result.ok, "%s", result.message);
    int64_t want = x->numel + weight_of(f)->numel;
    if (f->r.noise_weight) want += ag_param_tensor(f->r.noise_weight)->numel;
    if (f->r.null_weight) want += ag_param_tensor(f->r.null_weight)->numel;
    ck_assert_int_ge(result.checked, want);
}

const float five_levels[5] = {-1.4f, -0.7f, 0.0f, 0.7f, 1.4f};
