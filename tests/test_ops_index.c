/* Tests for ops_index.c: gather_rows, scatter_add_rows and embedding (repeated
 * indices, rows that receive nothing, the dispatch/combine round trip),
 * reshape (shared data, -1), transpose (every pair of dims), concat and slice
 * (every dim). Forward values are compared with plain loops, backward with
 * hand-computed sums and with finite differences; bad indices and shapes must
 * abort. */
#include <check.h>
#include <math.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>

#include "gradcheck.h"

enum { ARENA_BYTES = 4 << 20 };

static void unflatten(int64_t flat, int ndim, const int *shape, int *coord) {
    for (int d = ndim - 1; d >= 0; d--) {
        coord[d] = (int)(flat % shape[d]);
        flat /= shape[d];
    }
}

static int64_t flatten(int ndim, const int *shape, const int *coord) {
    int64_t flat = 0;
    for (int d = 0; d < ndim; d++) flat = flat * shape[d] + coord[d];
    return flat;
}

static void check_grad(const char *label, gc_forward_fn forward, ag_tensor *const *in, int n,
                       void *user) {
    gc_options options = gc_default_options();
    gc_result r = gc_check(label, forward, in, n, user, &options);
    ck_assert_msg(r.ok, "%s", r.message);
    int64_t expected = 0;
    for (int i = 0; i < n; i++)
        if (in[i]->requires_grad)
            expected += in[i]->numel < options.max_checks_per_input ? in[i]->numel
                                                                    : options.max_checks_per_input;
    ck_assert_int_eq(r.checked, expected);
}

/* ---- gather_rows / scatter_add_rows / embedding -------------------------------- */

typedef struct rows_case {
    const int32_t *index;
    int count;
} rows_case;

static ag_tensor *forward_gather(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    const rows_case *c = user;
    return ag_gather_rows(ctx, in[0], c->index, c->count);
}

static ag_tensor *forward_scatter(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    const rows_case *c = user;
    return ag_scatter_add_rows(ctx, in[0], c->index, c->count);
}

static ag_tensor *forward_scatter_scaled(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    const rows_case *c = user;
    return ag_scatter_add_rows_scaled(ctx, in[0], in[1], c->index, c->count);
}

static ag_tensor *forward_embedding(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    const rows_case *c = user;
    return ag_embedding(ctx, in[0], c->index, c->count);
}

/* Repeated rows (3 three times) and a subset (2, 4, 5 never read). */
static const int32_t gather_index[6] = {3, 0, 3, 6, 3, 1};

START_TEST(test_gather_values) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    enum { N = 7, D = 5, M = 6 };
    ag_tensor *x = gc_tensor_new(2, (int[]){N, D}, -2.0f, 2.0f, 1, true);
    ag_tensor *y = ag_gather_rows(&ctx, x, gather_index, M);
    ck_assert_int_eq(y->ndim, 2);
    ck_assert_int_eq(y->shape[0], M);
    ck_assert_int_eq(y->shape[1], D);
    for (int i = 0; i < M; i++)
        for (int j = 0; j < D; j++)
            ck_assert_float_eq(y->data[i * D + j], x->data[gather_index[i] * D + j]);
    ck_assert_str_eq(ctx.tape_tail->op, "gather_rows");

    /* Backward: contributions of repeated indices add; unread rows stay 0. */
    float dout[M * D];
    for (int k = 0; k < M * D; k++) dout[k] = 0.25f * (float)(k % 7) - 0.5f;
    ck_assert_int_eq(ag_backward_from(&ctx, y, dout), CM_OK);
    for (int r = 0; r < N; r++)
        for (int j = 0; j < D; j++) {
            double want = 0.0;
            for (int i = 0; i < M; i++)
                if (gather_index[i] == r) want += dout[i * D + j];
            ck_assert_double_eq_tol(x->grad[r * D + j], want, 1e-6);
        }
    for (int j = 0; j < D; j++) {
        ck_assert_float_eq(x->grad[2 * D + j], 0.0f);
        ck_assert_float_eq(x->grad[4 * D + j], 0.0f);
        ck_assert_float_eq(x->grad[5 * D + j], 0.0f);
    }
    gc_tensor_free(x);
    ag_ctx_free(&ctx);
}
END_TEST

START_TEST(test_gather_grad) {
    rows_case c = {gather_index, 6};
    ag_tensor *x = gc_tensor_new(2, (int[]){7, 5}, -2.0f, 2.0f, 2, true);
    check_grad("gather_rows [7,5]", forward_gather, &x, 1, &c);
    gc_tensor_free(x);
    /* Rows with trailing dims: x [5,3,2] -> [4,3,2]. */
    const int32_t index3[4] = {4, 4, 0, 2};
    rows_case c3 = {index3, 4};
    ag_tensor *x3 = gc_tensor_new(3, (int[]){5, 3, 2}, -2.0f, 2.0f, 3, true);
    check_grad("gather_rows [5,3,2]", forward_gather, &x3, 1, &c3);
    gc_tensor_free(x3);
}
END_TEST

START_TEST(test_gather_no_grad_records_nothing) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    ag_tensor *x = gc_tensor_new(2, (int[]){7, 5}, -1.0f, 1.0f, 4, false);
    ag_tensor *y = ag_gather_rows(&ctx, x, gather_index, 6);
    ck_assert_ptr_nonnull(y);
    ck_assert(!y->requires_grad);
    ck_assert_int_eq(ctx.tape_length, 0);
    gc_tensor_free(x);
    ag_ctx_free(&ctx);
}
END_TEST

/* Targets 0 and 2 repeat; rows 1, 3, 5 and 6 receive nothing. */
static const int32_t scatter_index[6] = {2, 0, 2, 4, 2, 0};

START_TEST(test_scatter_add_values) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    enum { M = 6, D = 5, N_OUT = 7 };
    ag_tensor *x = gc_tensor_new(2, (int[]){M, D}, -2.0f, 2.0f, 5, true);
    /* Dirty the arena first, so "zero-initialised" cannot pass by luck. */
    ag_mark clean = ag_ctx_mark(&ctx);
    float *junk = ag_alloc_floats(&ctx, 4096, "junk");
    for (int k = 0; k < 4096; k++) junk[k] = 123.0f;
    ag_ctx_release(&ctx, clean);
    ag_tensor *y = ag_scatter_add_rows(&ctx, x, scatter_index, N_OUT);
    ck_assert_int_eq(y->shape[0], N_OUT);
    ck_assert_int_eq(y->shape[1], D);
    for (int r = 0; r < N_OUT; r++)
        for (int j = 0; j < D; j++) {
            double want = 0.0;
            for (int i = 0; i < M; i++)
                if (scatter_index[i] == r) want += x->data[i * D + j];
            ck_assert_double_eq_tol(y->data[r * D + j], want, 1e-6);
        }
    const int empty_rows[4] = {1, 3, 5, 6};
    for (int e = 0; e < 4; e++)
        for (int j = 0; j < D; j++) ck_assert_float_eq(y->data[empty_rows[e] * D + j], 0.0f);

    /* Backward: dx[i] = dout[index[i]] exactly; huge gradients on the rows that
     * received nothing must not leak anywhere. */
    float dout[N_OUT * D];
    for (int k = 0; k < N_OUT * D; k++) dout[k] = 0.5f * (float)(k % 5) - 1.0f;
    for (int e = 0; e < 4; e++)
        for (int j = 0; j < D; j++) dout[empty_rows[e] * D + j] = 1e6f;
    ck_assert_int_eq(ag_backward_from(&ctx, y, dout), CM_OK);
    for (int i = 0; i < M; i++)
        for (int j = 0; j < D; j++)
            ck_assert_float_eq(x->grad[i * D + j], dout[scatter_index[i] * D + j]);
    gc_tensor_free(x);
    ag_ctx_free(&ctx);
}
END_TEST

START_TEST(test_scatter_add_grad) {
    rows_case c = {scatter_index, 7};
    ag_tensor *x = gc_tensor_new(2, (int[]){6, 5}, -2.0f, 2.0f, 6, true);
    check_grad("scatter_add_rows [6,5] -> [7,5]", forward_scatter, &x, 1, &c);
    gc_tensor_free(x);
    ag_tensor *x3 = gc_tensor_new(3, (int[]){6, 3, 2}, -2.0f, 2.0f, 7, true);
    check_grad("scatter_add_rows [6,3,2] -> [7,3,2]", forward_scatter, &x3, 1, &c);
    gc_tensor_free(x3);
}
END_TEST

/* scatter_add_rows_scaled: gradients for x and the scales, and the same
 * values and gradients as mul by the scale column then scatter_add_rows. */
START_TEST(test_scatter_add_scaled) {
    rows_case c = {scatter_index, 7};
    ag_tensor *in[2] = {gc_tensor_new(2, (int[]){6, 5}, -2.0f, 2.0f, 31, true),
                        gc_tensor_new(1, (int[]){6}, -1.0f, 1.0f, 32, true)};
    check_grad("scatter_add_rows_scaled [6,5] -> [7,5]", forward_scatter_scaled, in, 2, &c);
    float outputs[2][35], grads[2][36];
    for (int way = 0; way < 2; way++) {
        ag_ctx ctx;
        ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
        memset(in[0]->grad, 0, 30 * sizeof(float));
        memset(in[1]->grad, 0, 6 * sizeof(float));
        ag_tensor *y =
            way == 0 ? ag_scatter_add_rows_scaled(&ctx, in[0], in[1], scatter_index, 7)
                     : ag_scatter_add_rows(
                           &ctx, ag_mul(&ctx, in[0], ag_reshape(&ctx, in[1], 2, (int[]){6, 1})),
                           scatter_index, 7);
        float dout[35];
        for (int i = 0; i < 35; i++) dout[i] = (float)((i * 5) % 9) - 4.0f;
        ck_assert_int_eq(ag_backward_from(&ctx, y, dout), CM_OK);
        memcpy(outputs[way], y->data, sizeof outputs[way]);
        memcpy(grads[way], in[0]->grad, 30 * sizeof(float));
        memcpy(grads[way] + 30, in[1]->grad, 6 * sizeof(float));
        ag_ctx_free(&ctx);
    }
    for (int i = 0; i < 35; i++) ck_assert_float_eq_tol(outputs[0][i], outputs[1][i], 1e-6f);
    for (int i = 0; i < 36; i++) ck_assert_float_eq_tol(grads[0][i], grads[1][i], 1e-5f);
    gc_tensor_free(in[0]);
    gc_tensor_free(in[1]);
}
END_TEST

static const int32_t embedding_ids[9] = {10, 0, 3, 3, 7, 0, 10, 1, 3};

START_TEST(test_embedding_values) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    enum { V = 11, D = 4, N = 9 };
    ag_tensor *table = gc_tensor_new(2, (int[]){V, D}, -1.0f, 1.0f, 8, true);
    ag_tensor *y = ag_embedding(&ctx, table, embedding_ids, N);
    ck_assert_int_eq(y->shape[0], N);
    ck_assert_int_eq(y->shape[1], D);
    for (int i = 0; i < N; i++)
        for (int j = 0; j < D; j++)
            ck_assert_float_eq(y->data[i * D + j], table->data[embedding_ids[i] * D + j]);
    ck_assert_str_eq(ctx.tape_tail->op, "embedding");
    ck_assert_str_eq(y->name, "embedding");
    /* Uniform upstream gradient: each table row gets (number of uses) * 1. */
    float dout[N * D];
    for (int k = 0; k < N * D; k++) dout[k] = 1.0f;
    ck_assert_int_eq(ag_backward_from(&ctx, y, dout), CM_OK);
    for (int v = 0; v < V; v++) {
        int uses = 0;
        for (int i = 0; i < N; i++) uses += embedding_ids[i] == v;
        for (int j = 0; j < D; j++) ck_assert_float_eq(table->grad[v * D + j], (float)uses);
    }
    gc_tensor_free(table);
    ag_ctx_free(&ctx);
}
END_TEST

START_TEST(test_embedding_grad) {
    rows_case c = {embedding_ids, 9};
    ag_tensor *table = gc_tensor_new(2, (int[]){11, 4}, -1.0f, 1.0f, 9, true);
    check_grad("embedding [11,4]", forward_embedding, &table, 1, &c);
    gc_tensor_free(table);
}
END_TEST

/* The MoE round trip: dispatch = gather by a permutation, combine = scatter-add
 * by the same array (the inverse permutation), is the identity. */
enum { PERM_N = 13, PERM_D = 6 };

static ag_tensor *forward_round_trip(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    const int32_t *perm = user;
    ag_tensor *dispatched = ag_gather_rows(ctx, in[0], perm, PERM_N);
    return ag_scatter_add_rows(ctx, dispatched, perm, PERM_N);
}

START_TEST(test_gather_scatter_round_trip) {
    int32_t perm[PERM_N], inverse[PERM_N];
    cm_rng_permutation((cm_rng_key){42, 0, 0, CM_RNG_TEST}, PERM_N, perm);
    int moved = 0;
    for (int i = 0; i < PERM_N; i++) {
        inverse[perm[i]] = i;
        moved += perm[i] != i;
    }
    ck_assert_int_gt(moved, PERM_N / 2); /* a real shuffle, not the identity */
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    ag_tensor *x = gc_tensor_new(2, (int[]){PERM_N, PERM_D}, -3.0f, 3.0f, 10, true);
    ag_tensor *dispatched = ag_gather_rows(&ctx, x, perm, PERM_N);
    ag_tensor *combined = ag_scatter_add_rows(&ctx, dispatched, perm, PERM_N);
    ag_tensor *unpermuted = ag_gather_rows(&ctx, dispatched, inverse, PERM_N);
    for (int k = 0; k < PERM_N * PERM_D; k++) {
        ck_assert_float_eq(combined->data[k], x->data[k]);
        ck_assert_float_eq(unpermuted->data[k], x->data[k]);
    }
    /* The gradient of the identity is the identity, bit for bit. */
    float dout[PERM_N * PERM_D];
    cm_rng_fill_uniform((cm_rng_key){43, 0, 0, CM_RNG_TEST}, 0, PERM_N * PERM_D, -1.0f, 1.0f, dout);
    ck_assert_int_eq(ag_backward_from(&ctx, combined, dout), CM_OK);
    for (int k = 0; k < PERM_N * PERM_D; k++) ck_assert_float_eq(x->grad[k], dout[k]);
    ag_ctx_free(&ctx);
    check_grad("gather+scatter_add round trip", forward_round_trip, &x, 1, perm);
    gc_tensor_free(x);
}
END_TEST

/* ---- reshape ---------------------------------------------------------------------- */

typedef struct reshape_case {
    int ndim;
    int shape[4];
} reshape_case;

static ag_tensor *forward_reshape(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    const reshape_case *c = user;
    return ag_reshape(ctx, in[0], c->ndim, c->shape);
}

START_TEST(test_reshape_shares_data) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    ag_tensor *x = gc_tensor_new(3, (int[]){3, 5, 7}, -1.0f, 1.0f, 11, true);
    const struct {
        reshape_case target;
        int want[4];
    } cases[] = {{{2, {-1, 7}}, {15, 7}},
                 {{2, {5, -1}}, {5, 21}},
                 {{4, {3, -1, 7, 1}}, {3, 5, 7, 1}},
                 {{1, {-1}}, {105}},
                 {{3, {7, 5, 3}}, {7, 5, 3}}};
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        ag_tensor *y = ag_reshape(&ctx, x, cases[c].target.ndim, cases[c].target.shape);
        ck_assert_ptr_nonnull(y);
        ck_assert_ptr_eq(y->data, x->data); /* no copy */
        ck_assert_ptr_ne(y->grad, x->grad);
        ck_assert_int_eq(y->ndim, cases[c].target.ndim);
        for (int d = 0; d < y->ndim; d++) ck_assert_int_eq(y->shape[d], cases[c].want[d]);
        ck_assert_int_eq(y->numel, 105);
        ck_assert(y->requires_grad);
    }
    /* Backward from the last view: its own gradient buffer, added into x's. */
    ag_tensor *y = ag_reshape(&ctx, x, 2, (int[]){-1, 3});
    float dout[105];
    for (int k = 0; k < 105; k++) dout[k] = (float)k - 50.0f;
    for (int k = 0; k < 105; k++) x->grad[k] = 1.0f; /* += onto what was there */
    ctx.keep_grads = true;                           /* y's gradient is read below */
    ck_assert_int_eq(ag_backward_from(&ctx, y, dout), CM_OK);
    ck_assert_ptr_nonnull(y->grad);
    ck_assert_ptr_ne(y->grad, x->grad);
    for (int k = 0; k < 105; k++) ck_assert_float_eq(x->grad[k], dout[k] + 1.0f);
    gc_tensor_free(x);
    ag_ctx_free(&ctx);
}
END_TEST

/* reshape of an intermediate (arena) tensor, used twice downstream. */
static ag_tensor *forward_reshape_chain(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    (void)user;
    ag_tensor *scaled = ag_scale(ctx, in[0], 1.5f);
    ag_tensor *flat = ag_reshape(ctx, scaled, 2, (int[]){5, -1});
    return ag_mul(ctx, flat, flat);
}

START_TEST(test_reshape_grad) {
    ag_tensor *x = gc_tensor_new(3, (int[]){3, 5, 7}, -1.0f, 1.0f, 12, true);
    reshape_case to_rows = {2, {-1, 7}}, to_4d = {4, {7, 1, -1, 3}};
    check_grad("reshape [3,5,7] -> [-1,7]", forward_reshape, &x, 1, &to_rows);
    check_grad("reshape [3,5,7] -> [7,1,-1,3]", forward_reshape, &x, 1, &to_4d);
    check_grad("scale -> reshape -> mul(y, y)", forward_reshape_chain, &x, 1, NULL);
    gc_tensor_free(x);
}
END_TEST

/* ---- transpose -------------------------------------------------------------------- */

typedef struct dims_case {
    int dim0, dim1;
} dims_case;

static ag_tensor *forward_transpose(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    const dims_case *c = user;
    return ag_transpose(ctx, in[0], c->dim0, c->dim1);
}

/* Every pair (and the no-op pair d,d) of dims of a tensor of this shape:
 * values against coordinate swapping, then a gradcheck. */
static void check_transpose_all_pairs(int ndim, const int *shape, uint64_t seed) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    ag_tensor *x = gc_tensor_new(ndim, shape, -2.0f, 2.0f, seed, true);
    for (int d0 = 0; d0 < ndim; d0++)
        for (int d1 = d0; d1 < ndim; d1++) {
            ag_ctx_reset(&ctx);
            ag_tensor *y = ag_transpose(&ctx, x, d0, d1);
            int want_shape[4], coord[4];
            memcpy(want_shape, shape, (size_t)ndim * sizeof(int));
            want_shape[d0] = shape[d1];
            want_shape[d1] = shape[d0];
            ck_assert_int_eq(y->ndim, ndim);
            for (int d = 0; d < ndim; d++) ck_assert_int_eq(y->shape[d], want_shape[d]);
            for (int64_t i = 0; i < x->numel; i++) {
                unflatten(i, ndim, shape, coord);
                int swap = coord[d0];
                coord[d0] = coord[d1];
                coord[d1] = swap;
                ck_assert_float_eq(y->data[flatten(ndim, want_shape, coord)], x->data[i]);
            }
            dims_case c = {d0, d1};
            char label[64];
            snprintf(label, sizeof label, "transpose rank %d dims %d,%d", ndim, d0, d1);
            check_grad(label, forward_transpose, &x, 1, &c);
        }
    gc_tensor_free(x);
    ag_ctx_free(&ctx);
}

START_TEST(test_transpose_4d) {
    check_transpose_all_pairs(4, (int[]){2, 3, 4, 5}, 13);
}
END_TEST

START_TEST(test_transpose_low_rank) {
    check_transpose_all_pairs(3, (int[]){3, 5, 7}, 14);
    check_transpose_all_pairs(2, (int[]){5, 7}, 15);
    check_transpose_all_pairs(1, (int[]){7}, 16);
}
END_TEST

/* The attention layout change [B,T,H,Dh] -> [B,H,T,Dh] and back is exact. */
START_TEST(test_transpose_heads_round_trip) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    ag_tensor *x = gc_tensor_new(4, (int[]){3, 17, 4, 8}, -1.0f, 1.0f, 17, false);
    ag_tensor *heads = ag_transpose(&ctx, x, 1, 2);
    ag_tensor *back = ag_transpose(&ctx, heads, 1, 2);
    ck_assert_int_eq(heads->shape[1], 4);
    ck_assert_int_eq(heads->shape[2], 17);
    for (int64_t k = 0; k < x->numel; k++) ck_assert_float_eq(back->data[k], x->data[k]);
    gc_tensor_free(x);
    ag_ctx_free(&ctx);
}
END_TEST

/* ---- concat ----------------------------------------------------------------------- */

typedef struct concat_case {
    int n, dim;
} concat_case;

static ag_tensor *forward_concat(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    const concat_case *c = user;
    return ag_concat(ctx, in, c->n, c->dim);
}

/* Three inputs of sizes 2, 3, 4 along `dim` and [3,5,7] elsewhere; the second
 * one optionally without a gradient. */
static void check_concat(int dim, bool middle_requires_grad) {
    const int sizes[3] = {2, 3, 4}, base[3] = {3, 5, 7};
    ag_tensor *in[3];
    for (int k = 0; k < 3; k++) {
        int shape[3] = {base[0], base[1], base[2]};
        shape[dim] = sizes[k];
        in[k] = gc_tensor_new(3, shape, -2.0f, 2.0f, 20 + (uint64_t)(10 * dim + k),
                              k != 1 || middle_requires_grad);
    }
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    ag_tensor *y = ag_concat(&ctx, in, 3, dim);
    int want_shape[3] = {base[0], base[1], base[2]};
    want_shape[dim] = 9;
    for (int d = 0; d < 3; d++) ck_assert_int_eq(y->shape[d], want_shape[d]);
    int coord[3];
    for (int64_t i = 0; i < y->numel; i++) {
        unflatten(i, 3, want_shape, coord);
        int k = 0;
        while (coord[dim] >= sizes[k]) coord[dim] -= sizes[k++];
        ck_assert_float_eq(y->data[i], in[k]->data[flatten(3, in[k]->shape, coord)]);
    }
    ag_ctx_free(&ctx);

    concat_case c = {3, dim};
    char label[64];
    snprintf(label, sizeof label, "concat dim %d%s", dim, middle_requires_grad ? "" : " (no dx1)");
    check_grad(label, forward_concat, in, 3, &c);
    if (!middle_requires_grad)
        for (int64_t i = 0; i < in[1]->numel; i++) ck_assert_float_eq(in[1]->grad[i], 0.0f);
    for (int k = 0; k < 3; k++) gc_tensor_free(in[k]);
}

START_TEST(test_concat) {
    for (int dim = 0; dim < 3; dim++) {
        check_concat(dim, true);
        check_concat(dim, false);
    }
}
END_TEST

START_TEST(test_concat_4d_last_dim) {
    ag_tensor *in[2] = {gc_tensor_new(4, (int[]){2, 3, 2, 1}, -1.0f, 1.0f, 40, true),
                        gc_tensor_new(4, (int[]){2, 3, 2, 5}, -1.0f, 1.0f, 41, true)};
    concat_case c = {2, 3};
    check_grad("concat 4-D dim 3", forward_concat, in, 2, &c);
    gc_tensor_free(in[0]);
    gc_tensor_free(in[1]);
}
END_TEST

/* ---- slice ------------------------------------------------------------------------ */

typedef struct slice_case {
    int dim, start, length;
} slice_case;

static ag_tensor *forward_slice(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    const slice_case *c = user;
    return ag_slice(ctx, in[0], c->dim, c->start, c->length);
}

static void check_slice(int ndim, const int *shape, slice_case c, uint64_t seed) {
    ag_tensor *x = gc_tensor_new(ndim, shape, -2.0f, 2.0f, seed, true);
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    ag_tensor *y = ag_slice(&ctx, x, c.dim, c.start, c.length);
    int want_shape[4], coord[4];
    memcpy(want_shape, shape, (size_t)ndim * sizeof(int));
    want_shape[c.dim] = c.length;
    for (int d = 0; d < ndim; d++) ck_assert_int_eq(y->shape[d], want_shape[d]);
    for (int64_t i = 0; i < y->numel; i++) {
        unflatten(i, ndim, want_shape, coord);
        coord[c.dim] += c.start;
        ck_assert_float_eq(y->data[i], x->data[flatten(ndim, shape, coord)]);
    }
    /* Backward: the window gets dout, everything outside it stays 0. */
    float *dout = malloc((size_t)y->numel * sizeof(float));
    for (int64_t i = 0; i < y->numel; i++) dout[i] = (float)(i % 11) + 1.0f;
    ck_assert_int_eq(ag_backward_from(&ctx, y, dout), CM_OK);
    for (int64_t i = 0; i < x->numel; i++) {
        unflatten(i, ndim, shape, coord);
        bool inside = coord[c.dim] >= c.start && coord[c.dim] < c.start + c.length;
        coord[c.dim] -= c.start;
        ck_assert_float_eq(x->grad[i], (inside ? dout[flatten(ndim, want_shape, coord)] : 0.0f));
    }
    free(dout);
    ag_ctx_free(&ctx);
    char label[64];
    snprintf(label, sizeof label, "slice rank %d dim %d [%d,+%d)", ndim, c.dim, c.start, c.length);
    check_grad(label, forward_slice, &x, 1, &c);
    gc_tensor_free(x);
}

START_TEST(test_slice) {
    const int shape3[3] = {3, 5, 7}, shape4[4] = {2, 3, 4, 5};
    check_slice(3, shape3, (slice_case){0, 1, 2}, 50);
    check_slice(3, shape3, (slice_case){1, 1, 3}, 51);
    check_slice(3, shape3, (slice_case){2, 2, 4}, 52);
    check_slice(3, shape3, (slice_case){2, 0, 7}, 53); /* the whole dim */
    check_slice(3, shape3, (slice_case){1, 4, 1}, 54); /* the last element */
    for (int dim = 0; dim < 4; dim++)
        check_slice(4, shape4, (slice_case){dim, 1, shape4[dim] - 1}, 55 + (uint64_t)dim);
}
END_TEST

/* concat of the slices of a tensor gives the tensor back. */
START_TEST(test_slice_concat_round_trip) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    ag_tensor *x = gc_tensor_new(3, (int[]){3, 5, 7}, -1.0f, 1.0f, 60, false);
    ag_tensor *parts[3] = {ag_slice(&ctx, x, 1, 0, 1), ag_slice(&ctx, x, 1, 1, 3),
                           ag_slice(&ctx, x, 1, 4, 1)};
    ag_tensor *joined = ag_concat(&ctx, parts, 3, 1);
    ck_assert(ag_same_shape(joined, x));
    for (int64_t k = 0; k < x->numel; k++) ck_assert_float_eq(joined->data[k], x->data[k]);
    ag_tensor *empty = ag_slice(&ctx, x, 2, 3, 0);
    ck_assert_ptr_nonnull(empty);
    ck_assert_int_eq(empty->numel, 0);
    gc_tensor_free(x);
    ag_ctx_free(&ctx);
}
END_TEST

/* ---- gradients accumulate ------------------------------------------------------ */

/* x [4,6,5] reaches the output through every op of this file, so each
 * backward must ADD into x->grad (an "=" anywhere loses the other paths). */
static ag_tensor *forward_shared_input(ag_ctx *ctx, ag_tensor *const *in, void *user) {
    (void)user;
    static const int32_t index[4] = {3, 1, 1, 0};
    ag_tensor *x = in[0];
    ag_tensor *heads = ag_reshape(ctx, ag_transpose(ctx, x, 0, 1), 2, (int[]){4, -1});
    ag_tensor *swapped = ag_transpose(ctx, ag_transpose(ctx, x, 1, 2), 1, 2);
    ag_tensor *window = ag_slice(ctx, x, 1, 1, 3);
    ag_tensor *gathered = ag_gather_rows(ctx, x, index, 4);
    ag_tensor *scattered = ag_scatter_add_rows(ctx, x, index, 4);
    ag_tensor *flat = ag_reshape(ctx, ag_embedding(ctx, x, index, 4), 2, (int[]){4, -1});
    ag_tensor *parts[5] = {x, swapped, window, gathered, scattered};
    ag_tensor *joined = ag_concat(ctx, parts, 5, 1);
    ag_tensor *rows = ag_reshape(ctx, joined, 2, (int[]){4, -1});
    ag_tensor *all[3] = {rows, flat, heads};
    return ag_concat(ctx, all, 3, 1);
}

START_TEST(test_shared_input_grad) {
    ag_tensor *x = gc_tensor_new(3, (int[]){4, 6, 5}, -1.0f, 1.0f, 80, true);
    check_grad("every op on one input", forward_shared_input, &x, 1, NULL);
    gc_tensor_free(x);
}
END_TEST

/* Runs backward twice with the same upstream gradient, once from input
 * gradients of 0 and once from 0.5: the second must be 0.5 + the first. */
static void check_accumulates(const char *label, gc_forward_fn forward, ag_tensor *const *in, int n,
                              void *user) {
    enum { MAX_INPUTS = 3 };
    ck_assert_int_le(n, MAX_INPUTS);
    float *first[MAX_INPUTS] = {0};
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    for (int pass = 0; pass < 2; pass++) {
        ag_ctx_reset(&ctx);
        for (int i = 0; i < n; i++)
            for (int64_t j = 0; j < in[i]->numel; j++) in[i]->grad[j] = pass ? 0.5f : 0.0f;
        ag_tensor *y = forward(&ctx, in, user);
        ck_assert_ptr_nonnull(y);
        float *dout = malloc((size_t)y->numel * sizeof(float));
        cm_rng_fill_uniform((cm_rng_key){90, 0, 0, CM_RNG_TEST}, 0, y->numel, -1.0f, 1.0f, dout);
        ck_assert_int_eq(ag_backward_from(&ctx, y, dout), CM_OK);
        free(dout);
        for (int i = 0; i < n; i++) {
            if (!in[i]->requires_grad) continue;
            if (!pass) {
                first[i] = malloc((size_t)in[i]->numel * sizeof(float));
                memcpy(first[i], in[i]->grad, (size_t)in[i]->numel * sizeof(float));
                continue;
            }
            for (int64_t j = 0; j < in[i]->numel; j++)
                ck_assert_msg(fabsf(in[i]->grad[j] - (0.5f + first[i][j])) < 1e-5f,
                              "%s: input %d element %lld: %g after starting at 0.5, %g from 0",
                              label, i, (long long)j, (double)in[i]->grad[j], (double)first[i][j]);
        }
    }
    for (int i = 0; i < n; i++) free(first[i]);
    ag_ctx_free(&ctx);
}

START_TEST(test_backward_accumulates) {
    ag_tensor *rows = gc_tensor_new(2, (int[]){7, 5}, -1.0f, 1.0f, 91, true);
    ag_tensor *scatter_in = gc_tensor_new(2, (int[]){6, 5}, -1.0f, 1.0f, 92, true);
    ag_tensor *x4 = gc_tensor_new(4, (int[]){2, 3, 4, 5}, -1.0f, 1.0f, 93, true);
    ag_tensor *x3 = gc_tensor_new(3, (int[]){3, 5, 7}, -1.0f, 1.0f, 94, true);
    rows_case gather = {gather_index, 6}, scatter = {scatter_index, 7}, embed = {gather_index, 6};
    check_accumulates("gather_rows", forward_gather, &rows, 1, &gather);
    check_accumulates("embedding", forward_embedding, &rows, 1, &embed);
    check_accumulates("scatter_add_rows", forward_scatter, &scatter_in, 1, &scatter);
    check_accumulates("reshape", forward_reshape, &x3, 1, &(reshape_case){2, {-1, 7}});
    check_accumulates("transpose 1,2", forward_transpose, &x4, 1, &(dims_case){1, 2});
    check_accumulates("transpose 2,3", forward_transpose, &x4, 1, &(dims_case){2, 3});
    check_accumulates("slice", forward_slice, &x3, 1, &(slice_case){1, 1, 3});
    ag_tensor *parts[3] = {x3, gc_tensor_new(3, (int[]){3, 2, 7}, -1.0f, 1.0f, 95, true), x3};
    /* x3 twice: both windows must add into the same gradient. */
    check_accumulates("concat", forward_concat, parts, 3, &(concat_case){3, 1});
    gc_tensor_free(parts[1]);
    gc_tensor_free(rows);
    gc_tensor_free(scatter_in);
    gc_tensor_free(x4);
    gc_tensor_free(x3);
}
END_TEST

/* ---- misuse is a bug: CM_ASSERT aborts ----------------------------------------- */

static ag_ctx death_ctx;
static ag_tensor *death_x;

static void death_setup(void) {
    ck_assert_int_eq(ag_ctx_init(&death_ctx, ARENA_BYTES), CM_OK);
    death_x = gc_tensor_new(2, (int[]){4, 3}, -1.0f, 1.0f, 70, true);
}

static void death_teardown(void) {
    gc_tensor_free(death_x);
    ag_ctx_free(&death_ctx);
}

START_TEST(test_gather_index_out_of_range) {
    const int32_t index[3] = {0, 4, 1};
    ag_gather_rows(&death_ctx, death_x, index, 3);
}
END_TEST

START_TEST(test_gather_negative_index) {
    const int32_t index[2] = {-1, 0};
    ag_gather_rows(&death_ctx, death_x, index, 2);
}
END_TEST

START_TEST(test_embedding_id_out_of_range) {
    const int32_t ids[2] = {3, 4};
    ag_embedding(&death_ctx, death_x, ids, 2);
}
END_TEST

START_TEST(test_scatter_index_out_of_range) {
    const int32_t index[4] = {0, 1, 2, 5};
    ag_scatter_add_rows(&death_ctx, death_x, index, 5);
}
END_TEST

START_TEST(test_reshape_wrong_numel) {
    ag_reshape(&death_ctx, death_x, 2, (int[]){5, 3});
}
END_TEST

START_TEST(test_reshape_uninferable) {
    ag_reshape(&death_ctx, death_x, 2, (int[]){5, -1});
}
END_TEST

START_TEST(test_reshape_two_inferred) {
    ag_reshape(&death_ctx, death_x, 2, (int[]){-1, -1});
}
END_TEST

START_TEST(test_transpose_bad_dim) {
    ag_transpose(&death_ctx, death_x, 0, 2);
}
END_TEST

START_TEST(test_concat_mismatch) {
    ag_tensor *other = gc_tensor_new(2, (int[]){4, 2}, -1.0f, 1.0f, 71, true);
    ag_tensor *xs[2] = {death_x, other};
    ag_concat(&death_ctx, xs, 2, 0); /* dim 1 differs: 3 vs 2 */
    gc_tensor_free(other);
}
END_TEST

START_TEST(test_slice_out_of_bounds) {
    ag_slice(&death_ctx, death_x, 0, 2, 3);
}
END_TEST

int main(void) {
    Suite *suite = suite_create("ops_index");
    TCase *rows = tcase_create("rows");
    tcase_add_test(rows, test_gather_values);
    tcase_add_test(rows, test_gather_grad);
    tcase_add_test(rows, test_gather_no_grad_records_nothing);
    tcase_add_test(rows, test_scatter_add_values);
    tcase_add_test(rows, test_scatter_add_grad);
    tcase_add_test(rows, test_scatter_add_scaled);
    tcase_add_test(rows, test_embedding_values);
    tcase_add_test(rows, test_embedding_grad);
    tcase_add_test(rows, test_gather_scatter_round_trip);
    suite_add_tcase(suite, rows);

    TCase *shape = tcase_create("shape");
    tcase_add_test(shape, test_reshape_shares_data);
    tcase_add_test(shape, test_reshape_grad);
    tcase_add_test(shape, test_transpose_4d);
    tcase_add_test(shape, test_transpose_low_rank);
    tcase_add_test(shape, test_transpose_heads_round_trip);
    tcase_add_test(shape, test_concat);
    tcase_add_test(shape, test_concat_4d_last_dim);
    tcase_add_test(shape, test_slice);
    tcase_add_test(shape, test_slice_concat_round_trip);
    tcase_add_test(shape, test_shared_input_grad);
    tcase_add_test(shape, test_backward_accumulates);
    suite_add_tcase(suite, shape);

    /* Aborting tests need Check's fork mode (the default). */
    TCase *misuse = tcase_create("misuse");
    tcase_add_checked_fixture(misuse, death_setup, death_teardown);
    tcase_add_test_raise_signal(misuse, test_gather_index_out_of_range, SIGABRT);
    tcase_add_test_raise_signal(misuse, test_gather_negative_index, SIGABRT);
    tcase_add_test_raise_signal(misuse, test_embedding_id_out_of_range, SIGABRT);
    tcase_add_test_raise_signal(misuse, test_scatter_index_out_of_range, SIGABRT);
    tcase_add_test_raise_signal(misuse, test_reshape_wrong_numel, SIGABRT);
    tcase_add_test_raise_signal(misuse, test_reshape_uninferable, SIGABRT);
    tcase_add_test_raise_signal(misuse, test_reshape_two_inferred, SIGABRT);
    tcase_add_test_raise_signal(misuse, test_transpose_bad_dim, SIGABRT);
    tcase_add_test_raise_signal(misuse, test_concat_mismatch, SIGABRT);
    tcase_add_test_raise_signal(misuse, test_slice_out_of_bounds, SIGABRT);
    suite_add_tcase(suite, misuse);

    SRunner *runner = srunner_create(suite);
    srunner_run_all(runner, CK_NORMAL);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
