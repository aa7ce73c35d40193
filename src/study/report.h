/* A study's statistics and report.
 *
 * Statistics over seeds: mean, sample standard deviation (n - 1), and the
 * two-sided 95% confidence interval of the mean from Student's t with n - 1
 * degrees of freedom (none with n < 2: the interval is infinite). A claim's
 * test compares left - right per seed (paired by seed; a number on the right
 * is subtracted from every seed) and gives a verdict from the CI of the mean
 * difference d against the margin m:
 *   LESS    (claims d < m):  hi < m -> reproduced, lo >= m -> contradicted
 *   GREATER (claims d > -m): lo > -m -> reproduced, hi <= -m -> contradicted
 * else inconclusive. A claim is reproduced when all its tests are, contradicted
 * when any is, else inconclusive; a test with a missing value is inconclusive.
 *
 * The report: REPORT_DIR/NAME.md (per metric and arm: mean +- sd, the 95% CI
 * and the per-seed values; per claim each test's paired difference, its CI
 * and verdict), the plots REPORT_DIR/NAME/{curves,sweep-*,layers}.png (gnuplot
 * scripts and data beside them), REPORT_DIR/NAME.claims.tsv (one row per
 * claim, machine-readable), and REPORT_DIR/README.md rebuilt from every
 * *.claims.tsv of REPORT_DIR: one table of every claim of every study. */
#ifndef CMOE_STUDY_REPORT_H
#define CMOE_STUDY_REPORT_H

#include "common/status.h"
#include "study/study.h"

typedef struct study_summary {
    int n;           /* finite values */
    double mean, sd; /* NAN when n == 0; sd NAN when n < 2 */
    double lo, hi;   /* 95% CI of the mean; -INF/+INF when n < 2 */
} study_summary;

typedef enum study_verdict {
    STUDY_REPRODUCED = 0,
    STUDY_CONTRADICTED,
    STUDY_INCONCLUSIVE
} study_verdict;

/* The 0.975 quantile of Student's t with df >= 1 degrees of freedom. */
double study_t975(int df);
/* Summary of the finite values among x[0..n). */
study_summary study_summarize(const double *x, int n);
study_verdict study_test_verdict(const study_summary *difference, study_direction direction,
                                 double margin);
const char *study_verdict_name(study_verdict verdict); /* "reproduced", ... */

/* Everything the report needs: values[arm][metric][seed] (NAN: missing or
 * the arm was not run), run_dir[arm][seed] (for the learning curves; "" when
 * absent) and how the study was run. */
typedef struct study_results {
    const study *s;
    const char *preset;
    int n_seeds;
    double values[STUDY_MAX_ARMS][STUDY_MAX_METRICS][STUDY_MAX_SEEDS];
    char run_dir[STUDY_MAX_ARMS][STUDY_MAX_SEEDS][STUDY_PATH_CAP];
    char command[STUDY_TEXT_CAP]; /* the command line that ran it */
    char machine[STUDY_TEXT_CAP]; /* e.g. "2 cores, Linux 6.1, OpenBLAS ..." */
    double wall_seconds;          /* of the runs (summed over invocations) */
} study_results;

/* The per-seed differences of a test: out[s] = left - right (NAN if either is missing). */
void study_test_differences(const study_results *r, const study_test *test, double *out);
study_verdict study_claim_verdict(const study_results *r, const study_claim *claim);

/* Writes the report files described above into report_dir (created if needed). */
cm_status study_report(const study_results *r, const char *report_dir);

#endif
