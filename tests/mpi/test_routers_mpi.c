/* Auxiliary-loss-free balancing under MPI (METHODS.md 12.4.6, 12.4.9): the
 * global batch of 8 hand-built tokens is split over the ranks (and, on each
 * rank, over 2 micro-batches); the loads summed by
 * router_update_expert_biases give the bias of a hand computation, two steps
 * in a row (the second step's choice already moved by the first update),
 * identical bit for bit on every rank. Run under mpirun with any rank count
 * that divides 8. */
#include <check.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "parallel/comm.h"
#include "router_testutil.h"

enum { TOKENS = 8, EXPERTS = 4 };

static cm_comm comm;

/* Top-1 without bias: t0-t3 expert 0, t4-t5 expert 1, t6 expert 2, t7
 * expert 3 (loads 4, 2, 1, 1). t2's expert 2 is close behind expert 0:
 * after one update (b = -u, 0, +u, +u with u = 0.1) it moves there. */
static const float logits[TOKENS * EXPERTS] = {
    2.0f, 0, 0, 0, 2.0f, 0,    0.5f, 0,    1.0f, 0, 0.9f, 0, 1.5f, 0.5f, 0, 0,
    0,    2, 0, 0, 0,    1.5f, 0,    0.2f, 0,    0, 2,    0, 0,    0,    0, 2,
};

/* Rows [begin, end) of x [TOKENS, TOKENS] as a tensor of their own. */
static ag_tensor *rows_of(const ag_tensor *x, int begin, int end) {
    ag_tensor *part = gc_tensor_new(2, (int[]){end - begin, TOKENS}, 0.0f, 0.0f, 1, false);
    memcpy(part->data, x->data + begin * TOKENS, (size_t)(end - begin) * TOKENS * sizeof(float));
    return part;
}

/* One training step's routing of this rank's tokens in two micro-batches,
 * then the update over the world. */
static void step(fixture *f, const ag_tensor *x) {
    const int per_rank = TOKENS / comm.world_size, first = comm.world_rank * per_rank;
    const int half = per_rank / 2 > 0 ? per_rank / 2 : per_rank;
    int64_t load[EXPERTS] = {0};
    for (int begin = first; begin < first + per_rank; begin += half) {
        ag_tensor *part = rows_of(x, begin, begin + half);
        router_call call = {.training = true, .seed = 1, .first_token = (uint64_t)begin};
        router_output out = route(f, part, &call);
        for (int e = 0; e < EXPERTS; e++) load[e] += out.stats.tokens_per_expert[e];
        gc_tensor_free(part);
    }
    const router *routers[1] = {&f->r};
    ck_assert_int_eq(router_update_expert_biases(routers, 1, load, comm.world), CM_OK);
    int64_t total = 0; /* the loads came back summed over the ranks */
    for (int e = 0; e < EXPERTS; e++) total += load[e];
    ck_assert_int_eq(total, TOKENS);
}

/* The bias equals `want` bit for bit on this rank, and the same on all. */
static void assert_bias(const fixture *f, const float *want) {
    const float *bias = f->r.expert_bias->tensor.data;
    ck_assert_msg(memcmp(bias, want, EXPERTS * sizeof(float)) == 0,
                  "rank %d: bias %g %g %g %g, want %g %g %g %g", comm.world_rank, bias[0], bias[1],
                  bias[2], bias[3], want[0], want[1], want[2], want[3]);
    float low[EXPERTS], high[EXPERTS];
    MPI_Allreduce(bias, low, EXPERTS, MPI_FLOAT, MPI_MIN, comm.world);
    MPI_Allreduce(bias, high, EXPERTS, MPI_FLOAT, MPI_MAX, comm.world);
    ck_assert(memcmp(low, high, sizeof low) == 0);
}

START_TEST(test_bias_update_over_ranks) {
    router_config config = make_config(ROUTER_BIAS_BALANCE, EXPERTS, 1);
    config.bias_update_rate = 0.1f;
    fixture f;
    fixture_init(&f, &config, TOKENS);
    ag_tensor *x = set_logits(&f, TOKENS, logits, false);
    const float u = 0.1f;
    step(&f, x); /* loads 4, 2, 1, 1; mean 2 */
    const float once[EXPERTS] = {-u, 0.0f, u, u};
    assert_bias(&f, once);
    step(&f, x); /* t2 moved to expert 2: loads 3, 2, 2, 1 */
    const float twice[EXPERTS] = {-u - u, 0.0f, u, u + u};
    assert_bias(&f, twice);
    gc_tensor_free(x);
    fixture_free(&f);
}
END_TEST

int main(int argc, char **argv) {
    if (comm_start(&argc, &argv) != CM_OK) return EXIT_FAILURE;
    int world;
    MPI_Comm_size(MPI_COMM_WORLD, &world);
    if (TOKENS % world != 0 || comm_init(&comm, world) != CM_OK) {
        fprintf(stderr, "test_routers_mpi: %d ranks (needs a divisor of %d)\n", world, TOKENS);
        return EXIT_FAILURE;
    }
    Suite *suite = suite_create("routers_mpi");
    TCase *tc = tcase_create("bias balance");
    tcase_add_test(tc, test_bias_update_over_ranks);
    suite_add_tcase(suite, tc);
    SRunner *runner = srunner_create(suite);
    srunner_set_fork_status(runner, CK_NOFORK); /* no fork() under MPI */
    srunner_run_all(runner, comm.world_rank == 0 ? CK_NORMAL : CK_SILENT);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    int any_failed = failed;
    MPI_Allreduce(MPI_IN_PLACE, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    comm_free(&comm);
    comm_stop();
    return any_failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
