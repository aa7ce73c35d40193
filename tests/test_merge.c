/* MC-SMoE's merge (train/merge.h, layers/moe.h's group table), METHODS.md
 * 10.12 items 1-8: permuting an expert's hidden units keeps its output (1e-6,
 * GELU and SwiGLU); the assignment solver is optimal (brute force) and weight
 * matching recovers a known permutation (its inverse; the aligned copy equal
 * bit for bit); merging identical experts returns them, a group of one is
 * untouched; f = 0 contributes nothing, equal f is the uniform mean;
 * similarities are symmetric, 1 on the diagonal, in [0, 1]; the global
 * allocation by hand (ties at the threshold) and its properties, G = N keeps
 * all; after merging the router's choices are the same, the output is
 * sum g_i E_group(i)(x) with same-group gates added, and the router's
 * gradient the same; an identity table is bit for bit no table; on a trained
 * model, frequencies sum to 1 with counts T_cal k, G = N leaves the loss
 * bit for bit, identical experts merged keep it (1e-5). */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/assignment.h"
#include "gradcheck.h"
#include "layers/moe.h"
#include "train/checkpoint.h"
#include "train/merge.h"
#include "train/recipe.h"
#include "train/run.h"

enum { T = 24, D = 8, H = 6, E = 6 };

typedef struct layer_case {
    moe_layer layer;
    ag_params params;
    router_call call;
} layer_case;

static void build_layer(layer_case *c, ag_activation activation, bool merged, int k) {
    moe_config config = {.d_model = D,
                         .hidden = H,
                         .activation = activation,
                         .init_std = 0.5f,
                         .out_std = 0.5f,
                         .merged = merged,
                         .router = {.kind = ROUTER_TOPK,
                                    .num_experts = E,
                                    .k = k,
                                    .gating = ROUTER_SOFTMAX_THEN_TOPK,
                                    .init_std = 0.5f}};
    ag_params_init(&c->params);
    ck_assert_msg(moe_declare(&c->layer, &config, 0, &c->params, "moe") == CM_OK, "%s",
                  cm_error_message());
    ck_assert_int_eq(ag_params_finalize(&c->params, 21), CM_OK);
    ag_param *biases[] = {c->layer.b1, c->layer.b2, c->layer.b3};
    for (int i = 0; i < 3; i++)
        if (biases[i])
            cm_rng_fill_uniform((cm_rng_key){5, 0, (uint32_t)i, CM_RNG_TEST}, 0,
                                biases[i]->tensor.numel, -0.3f, 0.3f, biases[i]->tensor.data);
    c->call = (router_call){.seed = 3, .step = 1, .seq_len = T};
}

static merge_experts experts_of(const layer_case *c) {
    const moe_layer *l = &c->layer;
    return (merge_experts){E,
                           H,
                           D,
                           l->w1->tensor.data,
                           l->b1->tensor.data,
                           l->w2->tensor.data,
                           l->b2->tensor.data,
                           l->w3 ? l->w3->tensor.data : NULL,
                           l->b3 ? l->b3->tensor.data : NULL};
}

/* The layer's output on x into out [T*D]; with `result` its routing too. */
static void forward(layer_case *c, ag_ctx *ctx, ag_tensor *x, float *out, moe_result *result) {
    moe_result local;
    moe_result *r = result ? result : &local;
    ck_assert_msg(moe_forward(ctx, &c->layer, x, &c->call, r) == CM_OK, "%s", cm_error_message());
    memcpy(out, r->out->data, sizeof(float) * T * D);
}

static double max_abs_diff(const float *a, const float *b, int n) {
    double worst = 0.0;
    for (int i = 0; i < n; i++) worst = fmax(worst, fabs((double)a[i] - (double)b[i]));
    return worst;
}

/* ---- 1. permutation invariance --------------------------------------------------- */

static void check_permutation_invariance(ag_activation activation) {
    layer_case c;
    build_layer(&c, activation, false, 2);
    ag_tensor *x = gc_tensor_new(2, (int[]){T, D}, -1, 1, 7, false);
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, 1 << 22), CM_OK);
    float before[T * D], after[T * D];
    forward(&c, &ctx, x, before, NULL);
    ag_ctx_reset(&ctx);
    const merge_experts view = experts_of(&c);
    int32_t perm[H];
    for (int e = 0; e < E; e++) {
        cm_rng_permutation((cm_rng_key){9, 0, (uint32_t)e, CM_RNG_TEST}, H, perm);
        ck_assert_int_eq(merge_permute_units(&view, e, perm), CM_OK);
    }
    forward(&c, &ctx, x, after, NULL);
    ck_assert_double_le(max_abs_diff(before, after, T * D), 1e-6);
    ag_ctx_free(&ctx);
    gc_tensor_free(x);
    ag_params_free(&c.params);
}

START_TEST(test_permutation_invariance) {
    check_permutation_invariance(AG_ACT_GELU);
    check_permutation_invariance(AG_ACT_SWIGLU);
}
END_TEST

/* ---- 2. the assignment and weight matching ------------------------------------------- */

/* The best total of score [n,n] over all permutations (n <= 7). */
static double brute_force(const double *score, int n, int32_t *perm, int at) {
    if (at == n) {
        double total = 0.0;
        for (int i = 0; i < n; i++) total += score[i * n + perm[i]];
        return total;
    }
    double best = -INFINITY;
    for (int i = at; i < n; i++) {
        int32_t swap = perm[at];
        perm[at] = perm[i];
        perm[i] = swap;
        best = fmax(best, brute_force(score, n, perm, at + 1));
        perm[i] = perm[at];
        perm[at] = swap;
    }
    return best;
}

START_TEST(test_assignment_is_optimal) {
    for (int n = 1; n <= 7; n++) {
        double score[49];
        for (int i = 0; i < n * n; i++)
            score[i] = cm_rng_uniform((cm_rng_key){4, (uint64_t)n, 0, CM_RNG_TEST}, (uint64_t)i);
        int32_t column_of[7], perm[7] = {0, 1, 2, 3, 4, 5, 6};
        ck_assert_int_eq(cm_assignment_max(score, n, column_of), CM_OK);
        double total = 0.0;
        bool used[7] = {false};
        for (int i = 0; i < n; i++) {
            ck_assert(!used[column_of[i]]);
            used[column_of[i]] = true;
            total += score[i * n + column_of[i]];
        }
        ck_assert_double_eq_tol(total, brute_force(score, n, perm, 0), 1e-12);
    }
    ck_assert_int_eq(cm_assignment_max((double[]){NAN}, 1, (int32_t[1]){0}), CM_ERR_INVALID);
}
END_TEST

static void check_matching_recovers(ag_activation activation) {
    layer_case c;
    build_layer(&c, activation, false, 2);
    const merge_experts x = experts_of(&c);
    /* expert 1 = expert 0 with its units shuffled by sigma */
    const size_t matrix = (size_t)H * D;
    memcpy(x.w1 + matrix, x.w1, sizeof(float) * matrix);
    memcpy(x.w2 + matrix, x.w2, sizeof(float) * matrix);
    memcpy(x.b1 + H, x.b1, sizeof(float) * H);
    if (x.w3) memcpy(x.w3 + matrix, x.w3, sizeof(float) * matrix);
    if (x.b3) memcpy(x.b3 + H, x.b3, sizeof(float) * H);
    int32_t sigma[H], perm[H];
    cm_rng_permutation((cm_rng_key){13, 0, 0, CM_RNG_TEST}, H, sigma);
    ck_assert_int_eq(merge_permute_units(&x, 1, sigma), CM_OK);
    ck_assert_int_eq(merge_match_units(&x, 0, 1, perm), CM_OK);
    for (int a = 0; a < H; a++) ck_assert_int_eq(sigma[perm[a]], a); /* perm = sigma^-1 */
    ck_assert_int_eq(merge_permute_units(&x, 1, perm), CM_OK);
    ck_assert(memcmp(x.w1, x.w1 + matrix, sizeof(float) * matrix) == 0);
    ck_assert(memcmp(x.w2, x.w2 + matrix, sizeof(float) * matrix) == 0);
    ck_assert(memcmp(x.b1, x.b1 + H, sizeof(float) * H) == 0);
    if (x.w3) ck_assert(memcmp(x.w3, x.w3 + matrix, sizeof(float) * matrix) == 0);
    if (x.b3) ck_assert(memcmp(x.b3, x.b3 + H, sizeof(float) * H) == 0);
    ag_params_free(&c.params);
}

START_TEST(test_matching_recovers_permutation) {
    check_matching_recovers(AG_ACT_GELU);
    check_matching_recovers(AG_ACT_SWIGLU);
}
END_TEST

/* ---- 3-4. merging weights -------------------------------------------------------------- */

/* Copies every tensor of expert `from` into expert `to`. */
static void copy_expert(const merge_experts *x, int from, int to) {
    const size_t matrix = (size_t)H * D;
    memcpy(x->w1 + to * matrix, x->w1 + from * matrix, sizeof(float) * matrix);
    memcpy(x->w2 + to * matrix, x->w2 + from * matrix, sizeof(float) * matrix);
    memcpy(x->b1 + to * H, x->b1 + from * H, sizeof(float) * H);
    memcpy(x->b2 + to * D, x->b2 + from * D, sizeof(float) * D);
}

START_TEST(test_merging_identical_experts_and_singletons) {
    layer_case c;
    build_layer(&c, AG_ACT_GELU, false, 2);
    const merge_experts x = experts_of(&c);
    copy_expert(&x, 0, 1);
    copy_expert(&x, 0, 2);
    float *w1 = malloc(sizeof(float) * E * H * D), *b2 = malloc(sizeof(float) * E * D);
    memcpy(w1, x.w1, sizeof(float) * E * H * D);
    memcpy(b2, x.b2, sizeof(float) * E * D);
    const int32_t group_of[E] = {0, 0, 0, 3, 4, 4}, dominant[E] = {1, 1, 1, 3, 5, 5};
    const double freq[E] = {0.03, 0.41, 0.17, 0.2, 0.1, 0.09};
    ck_assert_int_eq(merge_layer_weights(&x, group_of, dominant, freq, MERGE_MODE_MERGE,
                                         MERGE_WEIGHTS_FREQUENCY),
                     CM_OK);
    for (int e = 0; e < 3; e++) /* copies of expert 0: itself (up to the eps) */
        for (int i = 0; i < H * D; i++)
            ck_assert_float_eq_tol(x.w1[e * H * D + i], w1[i], 1e-6f * fabsf(w1[i]) + 1e-12f);
    ck_assert(memcmp(x.w1 + 3 * H * D, w1 + 3 * H * D, sizeof(float) * H * D) == 0);
    ck_assert(memcmp(x.b2 + 3 * D, b2 + 3 * D, sizeof(float) * D) == 0);
    /* prune: the dominant's weights in every member */
    memcpy(x.w1, w1, sizeof(float) * E * H * D);
    ck_assert_int_eq(merge_layer_weights(&x, group_of, dominant, freq, MERGE_MODE_PRUNE,
                                         MERGE_WEIGHTS_FREQUENCY),
                     CM_OK);
    ck_assert(memcmp(x.w1 + 4 * H * D, w1 + 5 * H * D, sizeof(float) * H * D) == 0);
    ck_assert(memcmp(x.w1 + 5 * H * D, w1 + 5 * H * D, sizeof(float) * H * D) == 0);
    free(w1);
    free(b2);
    ag_params_free(&c.params);
}
END_TEST

START_TEST(test_frequency_weighting) {
    layer_case c;
    build_layer(&c, AG_ACT_GELU, false, 2);
    const merge_experts x = experts_of(&c);
    float *w1 = malloc(sizeof(float) * E * H * D);
    memcpy(w1, x.w1, sizeof(float) * E * H * D);
    const int32_t group_of[E] = {0, 0, 2, 2, 4, 5}, dominant[E] = {0, 0, 2, 2, 4, 5};
    /* f = 0 contributes nothing: group {0, 1} is expert 0; equal f: the mean */
    const double freq[E] = {0.4, 0.0, 0.15, 0.15, 0.2, 0.1};
    ck_assert_int_eq(merge_layer_weights(&x, group_of, dominant, freq, MERGE_MODE_MERGE,
                                         MERGE_WEIGHTS_FREQUENCY),
                     CM_OK);
    for (int i = 0; i < H * D; i++) {
        ck_assert_float_eq_tol(x.w1[i], w1[i], 1e-6f * fabsf(w1[i]) + 1e-12f);
        ck_assert_float_eq_tol(x.w1[H * D + i], w1[i], 1e-6f * fabsf(w1[i]) + 1e-12f);
        const float mean = (float)(((double)w1[2 * H * D + i] + w1[3 * H * D + i]) / 2.0);
        ck_assert_float_eq_tol(x.w1[2 * H * D + i], mean, 1e-6f * fabsf(mean) + 1e-12f);
    }
    memcpy(x.w1, w1, sizeof(float) * E * H * D);
    ck_assert_int_eq(
        merge_layer_weights(&x, group_of, dominant, freq, MERGE_MODE_MERGE, MERGE_WEIGHTS_UNIFORM),
        CM_OK);
    for (int i = 0; i < H * D; i++) /* uniform: exactly the mean */
        ck_assert_float_eq(x.w1[i], (float)(((double)w1[i] + w1[H * D + i]) / 2.0));
    free(w1);
    ag_params_free(&c.params);
}
END_TEST

/* ---- 6. similarity ------------------------------------------------------------------- */

START_TEST(test_similarity) {
    enum { TOKENS = 50, N = 5 };
    float logits[TOKENS * N];
    cm_rng_fill_normal((cm_rng_key){17, 0, 0, CM_RNG_TEST}, 0, TOKENS * N, 0.0f, 1.0f, logits);
    for (int t = 0; t < TOKENS; t++) {
        logits[t * N + 3] = 2.0f * logits[t * N + 0]; /* same direction: 1 */
        logits[t * N + 4] = -logits[t * N + 1];       /* opposite: 0 */
    }
    double gram[N * N] = {0}, similarity[N * N];
    merge_gram_add(gram, logits, TOKENS / 2, N); /* two calls add up */
    merge_gram_add(gram, logits + TOKENS / 2 * N, TOKENS - TOKENS / 2, N);
    merge_similarity(gram, N, similarity);
    for (int i = 0; i < N; i++) {
        ck_assert_double_eq(similarity[i * N + i], 1.0);
        for (int j = 0; j < N; j++) {
            ck_assert_double_eq(similarity[i * N + j], similarity[j * N + i]);
            ck_assert(similarity[i * N + j] >= 0.0 && similarity[i * N + j] <= 1.0);
        }
    }
    ck_assert_double_eq_tol(similarity[0 * N + 3], 1.0, 1e-12);
    ck_assert_double_eq_tol(similarity[1 * N + 4], 0.0, 1e-12);
    ck_assert(similarity[0 * N + 1] > 0.0 && similarity[0 * N + 1] < 1.0);
}
END_TEST

/* ---- 7. the global allocation and the groups -------------------------------------------- */

START_TEST(test_allocation_by_hand) {
    /* adjusted: {1, .3, .2, .1} and {1, .25, .25, .25}; G_tot 4, sorted
     * 1 1 .3 .25 .25 .25 .2 .1: threshold .25, strictly above: 2 and 1 */
    const double freq[8] = {0.4, 0.3, 0.2, 0.1, 0.25, 0.25, 0.25, 0.25};
    const bool merged[2] = {true, true};
    int groups[2];
    ck_assert_int_eq(merge_allocate(freq, merged, 2, 4, 2, groups), CM_OK);
    ck_assert_int_eq(groups[0], 2);
    ck_assert_int_eq(groups[1], 1);
    ck_assert_int_eq(merge_allocate(freq, merged, 2, 4, 4, groups), CM_OK);
    ck_assert(groups[0] == 4 && groups[1] == 4); /* G = N: nothing merged */
    ck_assert_int_eq(merge_allocate(freq, merged, 2, 4, 0, groups), CM_ERR_INVALID);
    ck_assert_int_eq(merge_allocate(freq, merged, 2, 4, 5, groups), CM_ERR_INVALID);
    /* ties at the threshold (0): 1 group each although G_tot = 6 */
    const double peaked[8] = {1, 0, 0, 0, 0, 1, 0, 0};
    ck_assert_int_eq(merge_allocate(peaked, merged, 2, 4, 3, groups), CM_OK);
    ck_assert(groups[0] == 1 && groups[1] == 1);
}
END_TEST

/* The groups' invariants for one layer. */
static void check_groups(const double *freq, const int32_t *dominant, const int32_t *group_of,
                         int n, int groups) {
    int top = 0, count = 0;
    for (int e = 0; e < n; e++) {
        if (freq[e] > freq[top]) top = e;
        ck_assert(group_of[e] <= e && group_of[group_of[e]] == group_of[e]);
        ck_assert(group_of[dominant[e]] == group_of[e]);
        count += group_of[e] == e;
    }
    ck_assert_int_eq(count, groups);
    ck_assert_int_eq(dominant[top], top); /* the most-used expert is dominant */
}

START_TEST(test_allocation_properties) {
    enum { L = 3, N = 8 };
    const bool merged[L] = {true, false, true};
    for (int trial = 0; trial < 20; trial++) {
        double freq[L * N];
        for (int l = 0; l < L; l++) {
            int64_t counts[N];
            for (int e = 0; e < N; e++)
                counts[e] = (int64_t)cm_rng_below((cm_rng_key){23, (uint64_t)trial, 0, CM_RNG_TEST},
                                                  (uint64_t)(l * N + e), 100);
            merge_frequencies(counts, N, freq + l * N);
        }
        const int g_avg = 1 + trial % (N - 1);
        int groups[L], total = 0;
        ck_assert_int_eq(merge_allocate(freq, merged, L, N, g_avg, groups), CM_OK);
        for (int l = 0; l < L; l++) {
            ck_assert(groups[l] >= 1 && groups[l] <= N);
            total += groups[l];
            int32_t dominant[N], group_of[N];
            ck_assert_int_eq(merge_group_msmoe(freq + l * N, (double[N * N]){0}, N, groups[l],
                                               dominant, group_of),
                             CM_OK);
            check_groups(freq + l * N, dominant, group_of, N, groups[l]);
        }
        ck_assert_int_eq(groups[1], N); /* unmerged */
        ck_assert_int_le(total, g_avg * 2 + N);
    }
}
END_TEST

START_TEST(test_random_groups) {
    for (int groups = 1; groups <= 8; groups++) {
        int32_t dominant[8], group_of[8];
        ck_assert_int_eq(
            merge_group_random((cm_rng_key){3, 0, 1, CM_RNG_MERGE}, 8, groups, dominant, group_of),
            CM_OK);
        int count = 0;
        for (int e = 0; e < 8; e++) {
            ck_assert(group_of[e] <= e && group_of[group_of[e]] == group_of[e]);
            ck_assert(group_of[dominant[e]] == group_of[e] && dominant[dominant[e]] == dominant[e]);
            count += group_of[e] == e;
        }
        ck_assert_int_eq(count, groups);
    }
}
END_TEST

/* ---- 8. the router and the merged layer ----------------------------------------------- */

/* sum over the output of out * weights: a loss whose gradient is not uniform. */
static ag_tensor *weighted_sum(ag_ctx *ctx, ag_tensor *out) {
    ag_tensor *weights = ag_empty(ctx, "weights", 2, (int[]){T, D});
    cm_rng_fill_uniform((cm_rng_key){29, 0, 0, CM_RNG_TEST}, 0, T * D, -1.0f, 1.0f, weights->data);
    return ag_sum(ctx, ag_mul(ctx, out, weights));
}

/* Output and router-weight gradient of a layer on x. */
static moe_result run_with_grad(layer_case *c, ag_ctx *ctx, ag_tensor *x, float *out,
                                float *router_grad) {
    ag_params_zero_grad(&c->params);
    moe_result result;
    forward(c, ctx, x, out, &result);
    ck_assert_int_eq(ag_backward(ctx, weighted_sum(ctx, result.out)), CM_OK);
    memcpy(router_grad, c->layer.router.weight->tensor.grad, sizeof(float) * E * D);
    return result;
}

START_TEST(test_merged_layer_sums_same_group_gates) {
    const int32_t table[E] = {0, 0, 2, 2, 2, 5};
    layer_case plain, merged;
    build_layer(&plain, AG_ACT_RELU, false, 3);
    build_layer(&merged, AG_ACT_RELU, true, 3);
    /* the reference: no table, each member holds its group expert's weights */
    const merge_experts x = experts_of(&plain);
    for (int e = 0; e < E; e++) copy_expert(&x, table[e], e);
    for (int e = 0; e < E; e++) merged.layer.group_of->tensor.data[e] = (float)table[e];
    ag_tensor *input = gc_tensor_new(2, (int[]){T, D}, -1, 1, 31, false);
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, 1 << 22), CM_OK);
    float out_plain[T * D], out_merged[T * D], grad_plain[E * D], grad_merged[E * D];
    moe_result a = run_with_grad(&plain, &ctx, input, out_plain, grad_plain);
    moe_result b = run_with_grad(&merged, &ctx, input, out_merged, grad_merged);
    ck_assert_double_le(max_abs_diff(out_plain, out_merged, T * D), 1e-6);
    ck_assert_double_le(max_abs_diff(grad_plain, grad_merged, E * D), 1e-5);
    int merged_tokens = 0;
    for (int t = 0; t < T; t++) { /* the same choices, through the table, gates added */
        double expected[E] = {0}, got[E] = {0};
        for (int s = a.offsets[t]; s < a.offsets[t + 1]; s++)
            expected[table[a.expert[s]]] += a.gates[s];
        for (int s = b.offsets[t]; s < b.offsets[t + 1]; s++) {
            ck_assert_int_eq(table[b.expert[s]], b.expert[s]);
            ck_assert_double_eq(got[b.expert[s]], 0.0); /* one slot per group */
            got[b.expert[s]] = b.gates[s];
        }
        for (int e = 0; e < E; e++) ck_assert_double_eq_tol(got[e], expected[e], 1e-6);
        merged_tokens += b.offsets[t + 1] - b.offsets[t] < a.offsets[t + 1] - a.offsets[t];
    }
    ck_assert_int_gt(merged_tokens, 0); /* the case is exercised */
    ck_assert_int_eq(b.stats.tokens_per_expert[1] + b.stats.tokens_per_expert[3], 0);
    ag_ctx_free(&ctx);
    gc_tensor_free(input);
    ag_params_free(&plain.params);
    ag_params_free(&merged.params);
}
END_TEST

START_TEST(test_identity_table_is_no_table) {
    layer_case plain, table;
    build_layer(&plain, AG_ACT_GELU, false, 2);
    build_layer(&table, AG_ACT_GELU, true, 2);
    for (int e = 0; e < E; e++) ck_assert_float_eq(table.layer.group_of->tensor.data[e], (float)e);
    ag_tensor *input = gc_tensor_new(2, (int[]){T, D}, -1, 1, 37, false);
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, 1 << 22), CM_OK);
    float out_plain[T * D], out_table[T * D], grad_plain[E * D], grad_table[E * D];
    run_with_grad(&plain, &ctx, input, out_plain, grad_plain);
    run_with_grad(&table, &ctx, input, out_table, grad_table);
    ck_assert(memcmp(out_plain, out_table, sizeof out_plain) == 0);
    ck_assert(memcmp(grad_plain, grad_table, sizeof grad_plain) == 0);
    /* a table that is not a group table is refused */
    table.layer.group_of->tensor.data[1] = 3.0f;
    moe_result result;
    ck_assert_int_eq(moe_forward(&ctx, &table.layer, input, &table.call, &result), CM_ERR_FORMAT);
    ag_ctx_free(&ctx);
    gc_tensor_free(input);
    ag_params_free(&plain.params);
    ag_params_free(&table.params);
}
END_TEST

/* ---- 3, 5, 7 on a trained model -------------------------------------------------------- */

static char dir[] = "/tmp/cmoe-merge-XXXXXX";

/* The tiny MoE recipe over the synthetic corpus. */
static cm_recipe tiny_recipe(void) {
    char text[2048], corpus[300];
    snprintf(corpus, sizeof corpus, "%s/corpus.txt", dir);
    snprintf(text, sizeof text,
             "name: tiny\nmodel: {n_layers: 2, d_model: 32, n_heads: 2, d_ff: 64}\n"
             "moe: {enabled: true, num_experts: 8, expert_hidden: 16}\n"
             "router: {type: topk, k: 2, gating: topk_softmax}\n"
             "data: {path: '%s', valid_path: '%s', test_path: '%s', seq_len: 16, batch_size: 4}\n"
             "optim: {lr: 1.0e-2}\n"
             "train: {steps: 20, eval_every: 0, eval_batches: 4, arena_mib: 32, threads: 1}\n",
             corpus, corpus, corpus);
    cm_recipe recipe;
    ck_assert_msg(recipe_load_text(text, "tiny", NULL, 0, &recipe) == CM_OK, "%s",
                  cm_error_message());
    return recipe;
}

/* Trains the tiny model 20 steps and saves it to DIR/NAME; with `identical`
 * every expert of a layer is then made a copy of its expert 0. */
static void save_trained(const char *name, bool identical, char *path, size_t size) {
    cm_recipe recipe = tiny_recipe();
    run_session *session;
    ck_assert_int_eq(run_session_open(&recipe, NULL, true, &session), CM_OK);
    for (int64_t step = 0; step < 20; step++) {
        run_step_result done;
        ck_assert_msg(run_session_step(session, step, &done) == CM_OK, "%s", cm_error_message());
    }
    ag_params *params = run_session_params(session);
    for (int l = 0; identical && l < 2; l++) {
        const char *names[] = {"w1", "b1", "w2", "b2"};
        for (int i = 0; i < 4; i++) {
            char full[AG_PARAM_NAME_MAX];
            snprintf(full, sizeof full, "blocks.%d.moe.experts.%s", l, names[i]);
            ag_tensor *t = &ag_params_find(params, full)->tensor;
            const int64_t each = t->numel / 8;
            for (int e = 1; e < 8; e++)
                memcpy(t->data + e * each, t->data, sizeof(float) * (size_t)each);
        }
    }
    snprintf(path, size, "%s/%s", dir, name);
    char *text = recipe_format_text(&recipe);
    ck_assert_int_eq(ckpt_save(path, params, &(ckpt_meta){20, 1234, 20}, text), CM_OK);
    free(text);
    run_session_close(session);
}

/* Mean validation loss (4 batches) of a checkpoint with its own recipe. */
static double checkpoint_loss(const char *path) {
    char *text;
    ck_assert_int_eq(ckpt_read_recipe(path, &text), CM_OK);
    cm_recipe recipe;
    ck_assert_int_eq(recipe_load_text(text, path, NULL, 0, &recipe), CM_OK);
    free(text);
    task_eval_request request = {CM_SPLIT_VALID, 4, 0, NULL};
    task_eval eval;
    ck_assert_msg(run_evaluate(&recipe, path, &request, NULL, NULL, &eval) == CM_OK, "%s",
                  cm_error_message());
    return eval.headline;
}

static merge_result merged(const char *source, int groups, const char *out) {
    cm_recipe recipe = tiny_recipe();
    merge_options options = {
        .groups = groups, .calib_windows = 24, .seed = 5, .align = true, .quiet = true};
    merge_result result;
    ck_assert_msg(merge_checkpoint(source, &recipe, &options, out, &result) == CM_OK, "%s",
                  cm_error_message());
    return result;
}

START_TEST(test_trained_model) {
    char source[400], out[400];
    save_trained("source.h5", false, source, sizeof source);
    snprintf(out, sizeof out, "%s/all.h5", dir);
    merge_result r = merged(source, 8, out);
    ck_assert_int_eq(r.layers, 2);
    ck_assert_int_eq(r.tokens, 24 * 16);
    for (int l = 0; l < r.layers; l++) {
        int64_t count = 0;
        double total = 0.0;
        for (int e = 0; e < 8; e++) {
            count += r.counts[l * 8 + e];
            total += r.freq[l * 8 + e];
        }
        ck_assert_int_eq(count, r.tokens * 2); /* T_cal k */
        ck_assert_double_eq_tol(total, 1.0, 1e-12);
        ck_assert_int_eq(r.groups[l], 8);
    }
    merge_result_free(&r);
    const double loss = checkpoint_loss(source);
    ck_assert_double_eq(checkpoint_loss(out), loss); /* G = N: bit for bit */
    r = merged(source, 4, out);
    ck_assert_int_le(r.groups[0] + r.groups[1], 8);
    merge_result_free(&r);
    const double merged_loss = checkpoint_loss(out);
    ck_assert(isfinite(merged_loss) && merged_loss != loss);
    printf("trained model: loss %.6f, merged 8 -> 4 on average %.6f\n", loss, merged_loss);
}
END_TEST

START_TEST(test_identical_experts_keep_the_loss) {
    char source[400], out[400];
    save_trained("identical.h5", true, source, sizeof source);
    snprintf(out, sizeof out, "%s/identical-merged.h5", dir);
    merge_result r = merged(source, 2, out);
    merge_result_free(&r);
    const double loss = checkpoint_loss(source), merged_loss = checkpoint_loss(out);
    printf("identical experts: loss %.9f, merged %.9f\n", loss, merged_loss);
    ck_assert_double_eq_tol(merged_loss, loss, 1e-5);
}
END_TEST

static void write_corpus(void) {
    const char *words[] = {"and", "the", "lord", "said", "unto", "moses", "behold", "of"};
    char path[300];
    FILE *file = NULL;
    if (mkdtemp(dir)) {
        snprintf(path, sizeof path, "%s/corpus.txt", dir);
        file = fopen(path, "w");
    }
    if (!file) {
        perror("test_merge: cannot write the corpus");
        exit(EXIT_FAILURE);
    }
    for (int i = 0; i < 4000; i++)
        fprintf(file, "%s%s", words[cm_rng_below((cm_rng_key){7, 0, 0, CM_RNG_TEST}, i, 8)],
                i % 9 == 8 ? ".\n" : " ");
    fclose(file);
}

int main(void) {
    write_corpus();
    Suite *suite = suite_create("merge");
    TCase *tc = tcase_create("merge");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, test_permutation_invariance);
    tcase_add_test(tc, test_assignment_is_optimal);
    tcase_add_test(tc, test_matching_recovers_permutation);
    tcase_add_test(tc, test_merging_identical_experts_and_singletons);
    tcase_add_test(tc, test_frequency_weighting);
    tcase_add_test(tc, test_similarity);
    tcase_add_test(tc, test_allocation_by_hand);
    tcase_add_test(tc, test_allocation_properties);
    tcase_add_test(tc, test_random_groups);
    tcase_add_test(tc, test_merged_layer_sums_same_group_gates);
    tcase_add_test(tc, test_identity_table_is_no_table);
    tcase_add_test(tc, test_trained_model);
    tcase_add_test(tc, test_identical_experts_keep_the_loss);
    suite_add_tcase(suite, tc);
    SRunner *runner = srunner_create(suite);
    srunner_run_all(runner, CK_NORMAL);
    const int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    char command[300];
    snprintf(command, sizeof command, "rm -rf '%s'", dir);
    if (system(command) != 0) fprintf(stderr, "test_merge: cannot remove %s\n", dir);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
