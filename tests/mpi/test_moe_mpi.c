/* Expert parallelism: the MoE layer sharded over 1, 2 or 4 ranks gives the
 * loss, outputs and every gradient of one process running the whole batch,
 * for the learned top-k (with its load-balancing and z-loss), SMoE-Dropout,
 * THOR and top-p routers, including skewed routing where ranks receive no
 * tokens, and with SwiGLU experts and dropout inside the experts (its masks
 * are keyed by global token, so the sharded run draws the same ones). Every rank computes the
 * single-process reference itself and checks its own rows and expert shard against it (tolerance
 * 1e-5 relative: the sums over ranks run in another order). Run under mpirun with any rank count
 * that divides 4. */
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
    float out[T * D], dx[T * D];
    float drouter[E * D];
    float dw1[E * H * D], dw2[E * D * H], db1[E * H], db2[E * D];
    float dw3[E * H * D], db3[E * H]; /* SwiGLU */
} outcome;

/* The experts' activation and dropout; signed_inputs: x in [-1, 1] instead
 * of [0.2, 1], so the tokens spread over the experts and each rank receives
 * rows for several of its experts from several ranks (the received rows are
 * then reordered, and their global token indices with them). */
typedef struct expert_kind {
    ag_activation activation;
    float dropout;
    bool signed_inputs;
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
                         .ep_size = ranks};
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
    ck_assert_msg(max_diff <= 1e-5 * fmax(max_ref, 1e-3),
                  "rank %d of %d: %s differs by %.3g (max %.3g)", comm.world_rank, comm.world_size,
                  what, max_diff, max_ref);
}

static void check_experts(router_kind kind, bool skew, expert_kind experts) {
    router_config router_cfg = make_router(kind);
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
}

static void check(router_kind kind, bool skew) {
    check_experts(kind, skew, (expert_kind){AG_ACT_GELU, 0.0f, false});
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
    check_experts(ROUTER_TOPK, false, (expert_kind){AG_ACT_GELU, 0.4f, true});
    check_experts(ROUTER_TOPK, false, (expert_kind){AG_ACT_GELU, 0.4f, false});
}
END_TEST
START_TEST(test_top_p_swiglu_expert_dropout) {
    check_experts(ROUTER_TOP_P, false, (expert_kind){AG_ACT_SWIGLU, 0.4f, true});
    check_experts(ROUTER_TOPK, true, (expert_kind){AG_ACT_SWIGLU, 0.0f, false});
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
    tcase_add_test(tc, test_topk_expert_dropout);
    tcase_add_test(tc, test_top_p_swiglu_expert_dropout);
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
