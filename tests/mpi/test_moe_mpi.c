/* Expert parallelism: the MoE layer sharded over 1, 2 or 4 ranks gives the
 * loss, outputs and every gradient of one process running the whole batch,
 * for the learned top-k (with its load-balancing and z-loss), SMoE-Dropout,
 * THOR and top-p routers, including skewed routing where ranks receive no
 * tokens, with SwiGLU experts and dropout inside the experts (its masks are
 * keyed by global token, so the sharded run draws the same ones), and for
 * top-k and expert choice with a capacity so large that nothing drops. Every
 * rank computes the single-process reference itself and checks its own rows
 * and expert shard against it (tolerance 1e-5 relative: the sums over ranks
 * run in another order).
 *
 * With drops, capacity and expert choice are per rank (docs/recipes.md,
 * "parallel"): each rank's routing equals routing its rows alone, and
 * differs from routing the whole batch. The load-balancing loss in both
 * scopes (router.aux_loss_scope) against hand computations. Run under mpirun
 * with any rank count that divides 4. */
#include <check.h>
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "layers/moe.h"
#include "parallel/comm.h"

enum { T = 12, D = 6, H = 5, E = 4 };

static cm_comm comm;

typedef struct outcome {
    double loss;
    int64_t dropped; /* summed over the ranks */
    float out[T * D], dx[T * D];
    float drouter[E * D];
    float dw1[E * H * D], dw2[E * D * H], db1[E * H], db2[E * D];
    float dw3[E * H * D], db3[E * H]; /* SwiGLU */
    int shadowed;                     /* experts shadowed on this rank's call */
} outcome;

/* The experts' activation and dropout; signed_inputs: x in [-1, 1] instead
 * of [0.2, 1], so the tokens spread over the experts and each rank receives
 * rows for several of its experts from several ranks (the received rows are
 * then reordered, and their global token indices with them). */
typedef struct expert_kind {
    ag_activation activation;
    float dropout;
    bool signed_inputs;
    shadow_mode shadow; /* parallel.shadow_experts of the sharded run */
} expert_kind;

static router_config make_router(router_kind kind) {
    return (router_config){.kind = kind,
                           .num_experts = E,
                           .k = 2,
                           .gating = ROUTER_SOFTMAX_THEN_TOPK,
                           .init_std = 0.5f,
                           .aux_loss_coef = 0.1f,
                           .z_loss_coef = 0.01f,
                           .top_p = 0.6f,
                           .entropy_coef = 0.05f,
                           .k_schedule = {ROUTER_K_LINEAR_INCREASE, 1, 3, 10},
                           .thor_level = ROUTER_THOR_PER_SEQUENCE};
}

/* Runs rows [first, first + count) of the batch through a layer holding the
 * experts of EP rank `rank` of `ranks`; the loss is sum_t w_t . out_t plus the
 * aux loss; fills the local part of `result` (rows and expert shard). */
static void run(router_config router_cfg, bool skew, expert_kind experts, MPI_Comm group, int rank,
                int ranks, int first, int count, outcome *result) {
    moe_config config = {.d_model = D,
                         .hidden = H,
                         .activation = experts.activation,
                         .expert_dropout = experts.dropout,
                         .init_std = 0.5f,
                         .out_std = 0.5f,
                         .router = router_cfg,
                         .ep_group = group,
                         .ep_rank = rank,
                         .ep_size = ranks,
                         .shadow = experts.shadow};
    ag_params params;
    ag_params_init(&params);
    moe_layer layer;
    ck_assert_msg(moe_declare(&layer, &config, 1, &params, "moe") == CM_OK, "%s",
                  cm_error_message());
    ck_assert_int_eq(ag_params_finalize(&params, 21), CM_OK);
    if (skew && layer.router.weight) { /* every token prefers experts 0 and 1 */
        float *w = layer.router.weight->tensor.data;
        for (int i = 0; i < D; i++) w[0 * D + i] += 4.0f, w[1 * D + i] += 2.0f;
    }
    float x_all[T * D], weights[T * D];
    cm_rng_fill_uniform((cm_rng_key){3, 0, 0, CM_RNG_TEST}, 0, T * D,
                        experts.signed_inputs ? -1.0f : 0.2f, 1.0f, x_all);
    cm_rng_fill_uniform((cm_rng_key){4, 0, 0, CM_RNG_TEST}, 0, T * D, -1.0f, 1.0f, weights);
    float grad[T * D] = {0};
    ag_tensor x = ag_tensor_wrap(x_all + first * D, grad + first * D, 2, (int[]){count, D}, true);
    ag_tensor w = ag_tensor_wrap(weights + first * D, NULL, 2, (int[]){count, D}, false);
    router_call call = {.training = true,
                        .seed = 5,
                        .step = 7,
                        .seq_len = 3,
                        .first_token = (uint64_t)first,
                        .group = ranks > 1 ? comm.world : MPI_COMM_NULL,
                        .global_tokens = T};
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, 8 << 20), CM_OK);
    moe_result moe;
    ck_assert_msg(moe_forward(&ctx, &layer, &x, &call, &moe) == CM_OK, "%s", cm_error_message());
    ag_tensor *loss = ag_sum(&ctx, ag_mul(&ctx, moe.out, &w));
    if (moe.aux_loss) loss = ag_add(&ctx, loss, moe.aux_loss);
    ck_assert_int_eq(ag_backward(&ctx, loss), CM_OK);

    double local_loss = loss->data[0];
    ck_assert_int_eq(comm_sum_doubles(call.group, &local_loss, 1), CM_OK);
    result->loss = local_loss;
    result->dropped = moe.stats.dropped;
    result->shadowed = moe.shadowed_experts;
    ck_assert_int_eq(comm_sum_int64(call.group, &result->dropped, 1), CM_OK);
    memcpy(result->out + first * D, moe.out->data, (size_t)count * D * sizeof(float));
    memcpy(result->dx + first * D, grad + first * D, (size_t)count * D * sizeof(float));
    if (layer.router.weight && !layer.router.weight->frozen) {
        memcpy(result->drouter, layer.router.weight->tensor.grad, E * D * sizeof(float));
        ck_assert_int_eq(comm_sum_floats(call.group, result->drouter, E * D), CM_OK);
    }
    int f = layer.first_expert, n = layer.local_experts;
    memcpy(result->dw1 + f * H * D, layer.w1->tensor.grad, (size_t)n * H * D * sizeof(float));
    memcpy(result->dw2 + f * D * H, layer.w2->tensor.grad, (size_t)n * D * H * sizeof(float));
    memcpy(result->db1 + f * H, layer.b1->tensor.grad, (size_t)n * H * sizeof(float));
    memcpy(result->db2 + f * D, layer.b2->tensor.grad, (size_t)n * D * sizeof(float));
    if (layer.w3) {
        memcpy(result->dw3 + f * H * D, layer.w3->tensor.grad, (size_t)n * H * D * sizeof(float));
        memcpy(result->db3 + f * H, layer.b3->tensor.grad, (size_t)n * H * sizeof(float));
    }
    ag_ctx_free(&ctx);
    ag_params_free(&params);
}

static void close_enough(const char *what, const float *got, const float *want, int n) {
    double max_diff = 0, max_ref = 0;
    for (int i = 0; i < n; i++) {
        max_diff = fmax(max_diff, fabs((double)got[i] - want[i]));
        max_ref = fmax(max_ref, fabs((double)want[i]));
    }
    /* Every rank fails at the same check, so no rank leaves the test while
     * the others wait in a collective (a hang instead of a failure). */
    int here_ok = max_diff <= 1e-5 * fmax(max_ref, 1e-3), all_ok = here_ok;
    MPI_Allreduce(MPI_IN_PLACE, &all_ok, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    ck_assert_msg(all_ok, "rank %d of %d: %s differs by %.3g (max %.3g)%s", comm.world_rank,
                  comm.world_size, what, max_diff, max_ref,
                  here_ok ? " here, but too much on another rank" : "");
}

/* Returns how many experts the sharded run shadowed. */
static int check_config(router_config router_cfg, bool skew, expert_kind experts) {
    static outcome reference, parallel;
    memset(&reference, 0, sizeof reference);
    memset(&parallel, 0, sizeof parallel);
    run(router_cfg, skew, experts, MPI_COMM_NULL, 0, 1, 0, T, &reference);
    int ranks = comm.world_size, rank = comm.world_rank;
    int first = rank * T / ranks, count = (rank + 1) * T / ranks - first;
    run(router_cfg, skew, experts, comm.ep, comm.ep_rank, comm.ep_size, first, count, &parallel);
    ck_assert_msg(fabs(parallel.loss - reference.loss) <= 1e-5 * fmax(fabs(reference.loss), 1e-3),
                  "rank %d: loss %.9g vs %.9g", rank, parallel.loss, reference.loss);
    close_enough("output rows", parallel.out + first * D, reference.out + first * D, count * D);
    close_enough("input gradient", parallel.dx + first * D, reference.dx + first * D, count * D);
    close_enough("router gradient", parallel.drouter, reference.drouter, E * D);
    int f = comm.ep_rank * (E / comm.ep_size), n = E / comm.ep_size;
    /* Expert gradients are summed over the data-parallel replicas. */
    ck_assert_int_eq(comm_sum_floats(comm.dp, parallel.dw1 + f * H * D, n * H * D), CM_OK);
    ck_assert_int_eq(comm_sum_floats(comm.dp, parallel.dw2 + f * D * H, n * D * H), CM_OK);
    ck_assert_int_eq(comm_sum_floats(comm.dp, parallel.db1 + f * H, n * H), CM_OK);
    ck_assert_int_eq(comm_sum_floats(comm.dp, parallel.db2 + f * D, n * D), CM_OK);
    close_enough("w1 gradient", parallel.dw1 + f * H * D, reference.dw1 + f * H * D, n * H * D);
    close_enough("w2 gradient", parallel.dw2 + f * D * H, reference.dw2 + f * D * H, n * D * H);
    close_enough("b1 gradient", parallel.db1 + f * H, reference.db1 + f * H, n * H);
    close_enough("b2 gradient", parallel.db2 + f * D, reference.db2 + f * D, n * D);
    ck_assert_int_eq(comm_sum_floats(comm.dp, parallel.dw3 + f * H * D, n * H * D), CM_OK);
    ck_assert_int_eq(comm_sum_floats(comm.dp, parallel.db3 + f * H, n * H), CM_OK);
    close_enough("w3 gradient", parallel.dw3 + f * H * D, reference.dw3 + f * H * D, n * H * D);
    close_enough("b3 gradient", parallel.db3 + f * H, reference.db3 + f * H, n * H);
    ck_assert_int_eq(parallel.dropped, 0); /* every case here is dropless */
    ck_assert_int_eq(reference.dropped, 0);
    ck_assert_int_eq(reference.shadowed, 0); /* one rank: nothing to even out */
    return parallel.shadowed;
}

static int check_experts(router_kind kind, bool skew, expert_kind experts) {
    return check_config(make_router(kind), skew, experts);
}

static void check(router_kind kind, bool skew) {
    check_experts(kind, skew, (expert_kind){AG_ACT_GELU, 0.0f, false, SHADOW_OFF});
}

START_TEST(test_topk) {
    check(ROUTER_TOPK, false);
}
END_TEST
START_TEST(test_topk_skewed) {
    check(ROUTER_TOPK, true);
}
END_TEST
START_TEST(test_smoe_dropout) {
    check(ROUTER_SMOE_DROPOUT, false);
}
END_TEST
START_TEST(test_thor) {
    check(ROUTER_THOR, false);
}
END_TEST
START_TEST(test_top_p) {
    check(ROUTER_TOP_P, false);
}
END_TEST
START_TEST(test_top_p_skewed) {
    check(ROUTER_TOP_P, true);
}
END_TEST
START_TEST(test_topk_expert_dropout) {
    check_experts(ROUTER_TOPK, false, (expert_kind){AG_ACT_GELU, 0.4f, true, SHADOW_OFF});
    check_experts(ROUTER_TOPK, false, (expert_kind){AG_ACT_GELU, 0.4f, false, SHADOW_OFF});
}
END_TEST
START_TEST(test_top_p_swiglu_expert_dropout) {
    check_experts(ROUTER_TOP_P, false, (expert_kind){AG_ACT_SWIGLU, 0.4f, true, SHADOW_OFF});
    check_experts(ROUTER_TOPK, true, (expert_kind){AG_ACT_SWIGLU, 0.0f, false, SHADOW_OFF});
}
END_TEST

/* Shadowing (parallel/shadow.h) changes where the rows are computed, not
 * what: forced (communication counted free), skewed routing shadows the hot
 * experts 0 and 1 whenever there are two EP ranks, and the sharded run still
 * equals one process, for GELU, SwiGLU, expert dropout (the shadowed rows'
 * masks are keyed by global token too) and top-p; the same decision on every
 * rank (the decision is checked alone in tests/test_shadow.c). */
static void check_shadowed(router_kind kind, bool skew, expert_kind experts, bool expect_some) {
    int shadowed = check_experts(kind, skew, experts);
    int least = shadowed, most = shadowed;
    if (comm.ep_size > 1) { /* each EP group decides from its own counts */
        MPI_Allreduce(MPI_IN_PLACE, &least, 1, MPI_INT, MPI_MIN, comm.ep);
        MPI_Allreduce(MPI_IN_PLACE, &most, 1, MPI_INT, MPI_MAX, comm.ep);
    }
    ck_assert_msg(least == most, "ranks shadowed between %d and %d experts", least, most);
    if (comm.ep_size == 1) ck_assert_int_eq(shadowed, 0);
    if (comm.ep_size > 1 && expect_some)
        ck_assert_msg(shadowed > 0, "%d EP ranks: skewed routing shadowed nothing", comm.ep_size);
}

START_TEST(test_shadow_forced_skewed) {
    check_shadowed(ROUTER_TOPK, true, (expert_kind){AG_ACT_GELU, 0.0f, false, SHADOW_FORCE}, true);
    check_shadowed(ROUTER_TOPK, true, (expert_kind){AG_ACT_SWIGLU, 0.4f, false, SHADOW_FORCE},
                   true);
    check_shadowed(ROUTER_TOP_P, true, (expert_kind){AG_ACT_GELU, 0.4f, false, SHADOW_FORCE}, true);
}
END_TEST

/* Spread routing: whatever the decision, the result is the one process's. */
START_TEST(test_shadow_auto_spread) {
    check_shadowed(ROUTER_TOPK, false, (expert_kind){AG_ACT_GELU, 0.0f, true, SHADOW_AUTO}, false);
    check_shadowed(ROUTER_TOPK, false, (expert_kind){AG_ACT_GELU, 0.4f, true, SHADOW_FORCE}, false);
    check_shadowed(ROUTER_THOR, false, (expert_kind){AG_ACT_SWIGLU, 0.0f, true, SHADOW_AUTO},
                   false);
}
END_TEST

/* Capacity so large that nothing drops on any rank count: the capacity is
 * per rank, but then it changes nothing, and the layer equals one process.
 * Top-k: capacity_factor E / k gives C = T_rank >= any expert's count;
 * expert choice: capacity_factor E makes every expert take every token. */
START_TEST(test_capacity_without_drops) {
    router_config topk = make_router(ROUTER_TOPK);
    topk.capacity_factor = (float)E / topk.k;
    check_config(topk, true, (expert_kind){AG_ACT_GELU, 0.0f, false, SHADOW_OFF});
    router_config expert_choice = make_router(ROUTER_EXPERT_CHOICE);
    expert_choice.capacity_factor = (float)E;
    check_config(expert_choice, false, (expert_kind){AG_ACT_GELU, 0.0f, false, SHADOW_OFF});
}
END_TEST

/* ---- the router alone: per-rank capacity and the balance loss's scope ------ */

/* A declared router with the weights every rank and the reference share (the
 * same seed; skew: every token prefers experts 0 and 1). */
typedef struct router_fixture {
    ag_params params;
    router r;
    ag_ctx ctx;
    float x[T * D];
} router_fixture;

static void router_fixture_init(router_fixture *f, router_config config, bool skew) {
    ag_params_init(&f->params);
    ck_assert_msg(router_declare(&f->r, &config, 1, D, &f->params, "router") == CM_OK, "%s",
                  cm_error_message());
    ck_assert_int_eq(ag_params_finalize(&f->params, 21), CM_OK);
    float *w = f->r.weight->tensor.data;
    if (skew)
        for (int i = 0; i < D; i++) w[0 * D + i] += 1.0f, w[1 * D + i] += 0.5f;
    cm_rng_fill_uniform((cm_rng_key){3, 0, 0, CM_RNG_TEST}, 0, T * D, 0.2f, 1.0f, f->x);
    ck_assert_int_eq(ag_ctx_init(&f->ctx, 8 << 20), CM_OK);
}

static void router_fixture_free(router_fixture *f) {
    ag_ctx_free(&f->ctx);
    ag_params_free(&f->params);
}

/* Routes rows [first, first + count) of the batch (an evaluation call: no
 * noise); group MPI_COMM_NULL with global_tokens 0 is "these rows alone". */
static router_output route_rows(router_fixture *f, int first, int count, MPI_Comm group,
                                int64_t global_tokens) {
    ag_tensor x = ag_tensor_wrap(f->x + first * D, NULL, 2, (int[]){count, D}, false);
    router_call call = {.seed = 5,
                        .step = 7,
                        .seq_len = 3,
                        .first_token = (uint64_t)first,
                        .group = group,
                        .global_tokens = global_tokens};
    router_output out;
    ck_assert_msg(router_route(&f->ctx, &f->r, &x, &call, &out) == CM_OK, "%s", cm_error_message());
    return out;
}

/* Whether token t of `a` and token u of `b` have the same slots: experts
 * and gates (bitwise: the same arithmetic on the same rows). */
static bool same_token_routing(const router_output *a, int t, const router_output *b, int u) {
    int n = a->offsets[t + 1] - a->offsets[t];
    if (n != b->offsets[u + 1] - b->offsets[u]) return false;
    for (int j = 0; j < n; j++) {
        int sa = a->offsets[t] + j, sb = b->offsets[u] + j;
        if (a->expert[sa] != b->expert[sb] || a->gates->data[sa] != b->gates->data[sb])
            return false;
    }
    return true;
}

/* With drops, each rank chooses among its own tokens: its routing equals its
 * rows routed alone (capacity from the rank's T, expert choice's top-c over
 * the rank's tokens), and on more than one rank it differs from routing the
 * whole batch on at least one slot. The cases drop (or, for expert choice,
 * take a different number of tokens per expert) by construction: position
 * policy with skewed logits keeps the first tokens of the batch for expert
 * 0 in one process, but some of every rank's tokens per rank. */
START_TEST(test_capacity_is_per_rank) {
    const int ranks = comm.world_size, rank = comm.world_rank;
    const int first = rank * T / ranks, count = (rank + 1) * T / ranks - first;
    for (int c = 0; c < 3; c++) {
        router_config config = make_router(c < 2 ? ROUTER_TOPK : ROUTER_EXPERT_CHOICE);
        config.capacity_factor = 1.0f;
        config.drop_policy = c == 0 ? ROUTER_DROP_POSITION : ROUTER_DROP_PROBABILITY;
        router_fixture whole_f, alone_f, rank_f;
        router_fixture_init(&whole_f, config, true);
        router_fixture_init(&alone_f, config, true);
        router_fixture_init(&rank_f, config, true);
        router_output whole = route_rows(&whole_f, 0, T, MPI_COMM_NULL, 0);
        router_output alone = route_rows(&alone_f, first, count, MPI_COMM_NULL, 0);
        router_output mine = route_rows(&rank_f, first, count, comm.world, T);
        if (c < 2) { /* top-k drops, in one process and on every rank */
            ck_assert_int_gt(whole.stats.dropped, 0);
            ck_assert_int_gt(mine.stats.dropped, 0);
        }
        ck_assert_int_eq(mine.n_slots, alone.n_slots);
        ck_assert_int_eq(mine.stats.dropped, alone.stats.dropped);
        int differs = 0;
        for (int t = 0; t < count; t++) {
            ck_assert_msg(same_token_routing(&mine, t, &alone, t),
                          "case %d rank %d of %d: token %d is not routed as its rows alone", c,
                          rank, ranks, first + t);
            differs += !same_token_routing(&mine, t, &whole, first + t);
        }
        MPI_Allreduce(MPI_IN_PLACE, &differs, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
        if (ranks > 1)
            ck_assert_msg(differs > 0, "case %d: %d ranks route exactly as one process", c, ranks);
        else
            ck_assert_int_eq(differs, 0);
        router_fixture_free(&whole_f);
        router_fixture_free(&alone_f);
        router_fixture_free(&rank_f);
    }
}
END_TEST

/* The balance loss by hand, in double, for top-2 on rows [first, first +
 * count): global = coef E sum_i f_i (1/T) sum_{t in rows} p_ti with f from
 * the whole batch's counts / (k T); local = (count / T) coef E sum_i
 * f_ri P_ri with f_ri = counts in the rows / (k count) and P_ri their mean
 * probability. */
static double hand_switch_loss(const router_fixture *f, router_aux_scope scope, int first,
                               int count, double coef, int k) {
    const float *w = f->r.weight->tensor.data;
    double probs[T][E];
    int chosen[T][E];
    for (int t = 0; t < T; t++) {
        double z[E], max = -INFINITY, sum = 0.0;
        for (int e = 0; e < E; e++) {
            z[e] = 0.0;
            for (int i = 0; i < D; i++) z[e] += (double)f->x[t * D + i] * w[e * D + i];
            max = fmax(max, z[e]);
        }
        for (int e = 0; e < E; e++) sum += probs[t][e] = exp(z[e] - max);
        for (int e = 0; e < E; e++) probs[t][e] /= sum;
        for (int e = 0; e < E; e++) { /* rank of e: the number of experts beating it */
            int beaten_by = 0;
            for (int j = 0; j < E; j++) beaten_by += z[j] > z[e] || (z[j] == z[e] && j < e);
            chosen[t][e] = beaten_by < k;
        }
    }
    int from = scope == ROUTER_AUX_GLOBAL ? 0 : first;
    int to = scope == ROUTER_AUX_GLOBAL ? T : first + count;
    double loss = 0.0;
    for (int e = 0; e < E; e++) {
        double assigned = 0.0, p_rows = 0.0;
        for (int t = from; t < to; t++) assigned += chosen[t][e];
        for (int t = first; t < first + count; t++) p_rows += probs[t][e];
        double f_e = assigned / ((double)k * (to - from));
        if (scope == ROUTER_AUX_GLOBAL)
            loss += coef * E * f_e * p_rows / T;
        else
            loss += (double)count / T * coef * E * f_e * p_rows / count;
    }
    return loss;
}

START_TEST(test_aux_loss_scopes) {
    const int ranks = comm.world_size, rank = comm.world_rank;
    const int first = rank * T / ranks, count = (rank + 1) * T / ranks - first;
    double totals[ROUTER_AUX_SCOPE_COUNT], whole_loss = 0.0;
    for (int scope = 0; scope < ROUTER_AUX_SCOPE_COUNT; scope++) {
        router_config config = make_router(ROUTER_TOPK);
        config.z_loss_coef = 0.0f; /* the balance loss alone */
        config.aux_loss_scope = (router_aux_scope)scope;
        router_fixture f;
        router_fixture_init(&f, config, false);
        router_output out = route_rows(&f, first, count, comm.world, T);
        ck_assert_ptr_nonnull(out.aux_loss);
        double got = out.aux_loss->data[0];
        double want = hand_switch_loss(&f, (router_aux_scope)scope, first, count,
                                       (double)config.aux_loss_coef, config.k);
        ck_assert_msg(fabs(got - want) <= 1e-5 * fabs(want),
                      "%s scope, rank %d of %d: balance loss %.9g, by hand %.9g",
                      router_aux_scope_names[scope], rank, ranks, got, want);
        totals[scope] = got;
        ck_assert_int_eq(comm_sum_doubles(comm.world, &totals[scope], 1), CM_OK);
        /* One process on the whole batch, for comparison. */
        router_output whole = route_rows(&f, 0, T, MPI_COMM_NULL, 0);
        whole_loss = whole.aux_loss->data[0];
        router_fixture_free(&f);
    }
    /* global: the ranks' parts add up to one process's loss; local depends
     * on the split, and on one rank it is global. */
    ck_assert_double_eq_tol(totals[ROUTER_AUX_GLOBAL], whole_loss, 1e-6 * whole_loss);
    if (ranks == 1)
        ck_assert_double_eq_tol(totals[ROUTER_AUX_LOCAL], totals[ROUTER_AUX_GLOBAL],
                                1e-7 * whole_loss);
    else
        ck_assert_msg(fabs(totals[ROUTER_AUX_LOCAL] - totals[ROUTER_AUX_GLOBAL]) >
                          1e-4 * whole_loss,
                      "%d ranks: local %.9g and global %.9g should differ", ranks,
                      totals[ROUTER_AUX_LOCAL], totals[ROUTER_AUX_GLOBAL]);
}
END_TEST

int main(int argc, char **argv) {
    if (comm_start(&argc, &argv) != CM_OK) return EXIT_FAILURE;
    /* EP = world for 1 and 2 ranks; EP 2 x DP 2 for 4 ranks. */
    int world;
    MPI_Comm_size(MPI_COMM_WORLD, &world);
    if (comm_init(&comm, world == 4 ? 2 : world) != CM_OK) {
        fprintf(stderr, "%s\n", cm_error_message());
        return EXIT_FAILURE;
    }
    Suite *suite = suite_create("moe_mpi");
    TCase *tc = tcase_create("expert parallel");
    tcase_add_test(tc, test_topk);
    tcase_add_test(tc, test_topk_skewed);
    tcase_add_test(tc, test_smoe_dropout);
    tcase_add_test(tc, test_thor);
    tcase_add_test(tc, test_top_p);
    tcase_add_test(tc, test_top_p_skewed);
    tcase_add_test(tc, test_capacity_without_drops);
    tcase_add_test(tc, test_capacity_is_per_rank);
    tcase_add_test(tc, test_aux_loss_scopes);
    tcase_add_test(tc, test_topk_expert_dropout);
    tcase_add_test(tc, test_top_p_swiglu_expert_dropout);
    tcase_add_test(tc, test_shadow_forced_skewed);
    tcase_add_test(tc, test_shadow_auto_spread);
    suite_add_tcase(suite, tc);
    SRunner *runner = srunner_create(suite);
    srunner_set_fork_status(runner, CK_NOFORK); /* no fork() under MPI */
    srunner_run_all(runner, comm.world_rank == 0 ? CK_NORMAL : CK_SILENT);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    /* Any rank's failure fails the job. */
    int any_failed = failed;
    MPI_Allreduce(MPI_IN_PLACE, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    comm_free(&comm);
    comm_stop();
    return any_failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
