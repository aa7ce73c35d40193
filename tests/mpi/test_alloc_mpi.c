/* The allocation counter of `cmoe bench` (src/cli/alloc_count.c, linked into
 * this test as into the cmoe executable) puts each counted allocation down
 * to where it comes from: a malloc made by our own code counts as cmoe's, an
 * allocation Open MPI makes inside an MPI call as Open MPI's, and nothing is
 * counted while counting is off. In a sanitizer build the counter is not
 * available and says so (-1). Run under mpirun at any rank count. */
#include <check.h>
#include <mpi.h>
#include <stdlib.h>

#include "cli/commands.h"

static void *volatile sink; /* keeps the compiler from eliding malloc/free */

typedef struct counts {
    long long total, mpi, own, elsewhere;
} counts;

static counts read_counts(void) {
    return (counts){alloc_count_total(), alloc_count_from(ALLOC_MPI), alloc_count_from(ALLOC_OWN),
                    alloc_count_from(ALLOC_ELSEWHERE)};
}

START_TEST(test_unavailable_under_sanitizers) {
    if (alloc_count_available()) return; /* the normal build: the tests below */
    alloc_count_enable(true);
    sink = malloc(64);
    alloc_count_enable(false);
    free(sink);
    counts c = read_counts();
    ck_assert_int_eq(c.total, -1);
    ck_assert_int_eq(c.mpi, -1);
    ck_assert_int_eq(c.own, -1);
}
END_TEST

START_TEST(test_own_malloc_counts_as_cmoes) {
    if (!alloc_count_available()) return; /* sanitizer build: the test above */
    counts before = read_counts();
    sink = malloc(64); /* counting off: not counted */
    free(sink);
    counts off = read_counts();
    ck_assert_int_eq(off.total, before.total);
    alloc_count_enable(true);
    for (int i = 0; i < 3; i++) {
        sink = malloc(64 + (size_t)i);
        free(sink);
    }
    sink = calloc(4, 16);
    free(sink);
    alloc_count_enable(false);
    counts after = read_counts();
    ck_assert_int_eq(after.total - before.total, 4);
    ck_assert_int_eq(after.own - before.own, 4);
    ck_assert_int_eq(after.mpi - before.mpi, 0);
    ck_assert_int_eq(after.elsewhere - before.elsewhere, 0);
}
END_TEST

START_TEST(test_mpi_allocations_count_as_open_mpis) {
    if (!alloc_count_available()) return; /* sanitizer build: the test above */
    counts before = read_counts();
    alloc_count_enable(true);
    MPI_Comm copy; /* a communicator's objects are allocated inside libmpi */
    int duplicated = MPI_Comm_dup(MPI_COMM_WORLD, &copy);
    alloc_count_enable(false); /* before Check's assertions, which allocate */
    ck_assert_int_eq(duplicated, MPI_SUCCESS);
    MPI_Comm_free(&copy);
    counts after = read_counts();
    ck_assert_int_gt(after.mpi - before.mpi, 0);
    ck_assert_int_eq(after.own - before.own, 0);
    ck_assert_int_eq(after.total - before.total,
                     (after.mpi - before.mpi) + (after.elsewhere - before.elsewhere));
}
END_TEST

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    Suite *suite = suite_create("alloc_mpi");
    TCase *tc = tcase_create("allocation sources");
    tcase_add_test(tc, test_unavailable_under_sanitizers);
    tcase_add_test(tc, test_own_malloc_counts_as_cmoes);
    tcase_add_test(tc, test_mpi_allocations_count_as_open_mpis);
    suite_add_tcase(suite, tc);
    SRunner *runner = srunner_create(suite);
    srunner_set_fork_status(runner, CK_NOFORK); /* no fork() under MPI */
    srunner_run_all(runner, rank == 0 ? CK_NORMAL : CK_SILENT);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    MPI_Finalize();
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
