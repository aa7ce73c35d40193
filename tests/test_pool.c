/* The compute pool (common/pool.h) and the sgemm it splits. */
#include <check.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "autograd/op_write.h"
#include "common/pool.h"

enum { MAX_TASKS = 97 };

typedef struct count_job {
    atomic_int runs[MAX_TASKS];
    atomic_int nested_inline; /* nested calls that ran inside a task */
    bool nest;
} count_job;

static void nested_task(void *context, int task) {
    count_job *job = context;
    (void)task;
    if (cm_pool_in_task()) atomic_fetch_add(&job->nested_inline, 1);
}

static void count_task(void *context, int task) {
    count_job *job = context;
    ck_assert(cm_pool_in_task());
    atomic_fetch_add(&job->runs[task], 1);
    if (job->nest) cm_pool_run(3, nested_task, job);
}

START_TEST(every_task_runs_once) {
    const int thread_counts[] = {1, 2, 3, 4};
    const int task_counts[] = {0, 1, 2, 5, MAX_TASKS};
    for (int t = 0; t < 4; t++) {
        cm_pool_set_threads(thread_counts[t]);
        ck_assert_int_eq(cm_pool_threads(), thread_counts[t]);
        for (int c = 0; c < 5; c++) {
            for (int repeat = 0; repeat < 50; repeat++) {
                count_job job = {.nest = repeat % 2 == 1};
                for (int i = 0; i < MAX_TASKS; i++) atomic_init(&job.runs[i], 0);
                atomic_init(&job.nested_inline, 0);
                cm_pool_run(task_counts[c], count_task, &job);
                for (int i = 0; i < MAX_TASKS; i++)
                    ck_assert_int_eq(atomic_load(&job.runs[i]), i < task_counts[c] ? 1 : 0);
                ck_assert_int_eq(atomic_load(&job.nested_inline),
                                 job.nest ? 3 * task_counts[c] : 0);
                ck_assert(!cm_pool_in_task());
            }
        }
    }
    cm_pool_shutdown();
}
END_TEST

START_TEST(split_covers_range) {
    const int64_t sizes[] = {0, 1, 15, 16, 17, 100, 1000, 4097};
    for (int s = 0; s < 8; s++)
        for (int parts = 1; parts <= 5; parts++)
            for (int64_t align = 1; align <= 16; align *= 4) {
                int64_t expected = 0;
                for (int p = 0; p < parts; p++) {
                    int64_t begin, end;
                    cm_pool_split(sizes[s], parts, p, align, &begin, &end);
                    ck_assert_int_eq(begin, expected); /* contiguous, in order */
                    ck_assert_int_le(begin, end);
                    if (end != sizes[s]) ck_assert_int_eq(end % align, 0);
                    expected = end;
                }
                ck_assert_int_eq(expected, sizes[s]);
            }
}
END_TEST

/* ag_sgemm above the split threshold, every transpose and both split
 * directions (m >= n splits rows, m < n columns), at 1 and 3 threads, against
 * double-precision loops. */
START_TEST(split_sgemm_matches_reference) {
    const int shapes[][3] = {{211, 97, 131}, {67, 301, 149}};
    for (int s = 0; s < 2; s++) {
        const int m = shapes[s][0], n = shapes[s][1], k = shapes[s][2];
        float *a = malloc(sizeof(float) * (size_t)m * k),
              *b = malloc(sizeof(float) * (size_t)k * n);
        float *c = malloc(sizeof(float) * (size_t)m * n);
        double *expected = malloc(sizeof(double) * (size_t)m * n);
        for (int i = 0; i < m * k; i++) a[i] = (float)((i * 37 % 101) - 50) / 50.0f;
        for (int i = 0; i < k * n; i++) b[i] = (float)((i * 53 % 97) - 48) / 48.0f;
        for (int trans = 0; trans < 4; trans++) {
            bool ta = trans & 1, tb = trans & 2;
            for (int i = 0; i < m; i++)
                for (int j = 0; j < n; j++) {
                    double sum = 0;
                    for (int p = 0; p < k; p++)
                        sum += (double)(ta ? a[p * m + i] : a[i * k + p]) *
                               (double)(tb ? b[j * k + p] : b[p * n + j]);
                    expected[i * n + j] = 0.5 * sum + 2.0; /* alpha 0.5, beta 2 on c = 1 */
                }
            for (int threads = 1; threads <= 3; threads += 2) {
                cm_pool_set_threads(threads);
                for (int i = 0; i < m * n; i++) c[i] = 1.0f;
                ag_sgemm(ta, tb, m, n, k, 0.5f, a, ta ? m : k, b, tb ? k : n, 2.0f, c, n);
                for (int i = 0; i < m * n; i++)
                    ck_assert_msg(fabs(c[i] - expected[i]) <= 1e-4 * (1.0 + fabs(expected[i])),
                                  "shape %d trans %d threads %d: c[%d] = %g, expected %g", s, trans,
                                  threads, i, c[i], expected[i]);
            }
        }
        free(a);
        free(b);
        free(c);
        free(expected);
    }
    cm_pool_shutdown();
}
END_TEST

int main(void) {
    Suite *suite = suite_create("pool");
    TCase *tc = tcase_create("pool");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, every_task_runs_once);
    tcase_add_test(tc, split_covers_range);
    tcase_add_test(tc, split_sgemm_matches_reference);
    suite_add_tcase(suite, tc);
    SRunner *runner = srunner_create(suite);
    srunner_run_all(runner, CK_NORMAL);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
