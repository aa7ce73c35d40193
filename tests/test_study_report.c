/* The study statistics (mean, sd, Student-t CI), the verdicts of tests and
 * claims, and the report files: NAME.md, NAME.claims.tsv, README.md and the
 * gnuplot PNGs. */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "study/report.h"

/* ---- statistics ---------------------------------------------------------------------------- */

START_TEST(test_summarize_by_hand) {
    const double x[] = {1, 2, 4};
    study_summary s = study_summarize(x, 3);
    const double mean = 7.0 / 3.0;
    const double sd =
        sqrt(((1 - mean) * (1 - mean) + (2 - mean) * (2 - mean) + (4 - mean) * (4 - mean)) / 2.0);
    ck_assert_int_eq(s.n, 3);
    ck_assert_double_eq_tol(s.mean, mean, 1e-12);
    ck_assert_double_eq_tol(s.sd, sd, 1e-12);
    ck_assert_double_eq_tol(s.hi - s.mean, study_t975(2) * sd / sqrt(3.0), 1e-12);
    ck_assert_double_eq_tol(s.mean - s.lo, study_t975(2) * sd / sqrt(3.0), 1e-12);
    /* The same with the textbook's rounded t = 4.303, to its precision. */
    ck_assert_double_eq_tol(s.hi - s.mean, 4.303 * sd / sqrt(3.0), 5e-4);
    /* By hand: squared deviations 16/9 + 1/9 + 25/9 = 14/3, sd = sqrt(7/3);
     * half-width = t975(2) sqrt(7/3) / sqrt(3) = 4.302653 sqrt(7) / 3. */
    ck_assert_double_eq_tol(s.mean, 2.333333, 1e-6);
    ck_assert_double_eq_tol(s.sd, 1.527525, 1e-6);
    ck_assert_double_eq_tol(s.hi - s.mean, 3.794583, 1e-6);
    ck_assert_double_eq_tol(s.lo, 2.333333 - 3.794583, 1e-6);

    /* Non-finite values are left out. */
    const double with_missing[] = {NAN, 1, INFINITY, 2, 4, -INFINITY};
    study_summary t = study_summarize(with_missing, 6);
    ck_assert_int_eq(t.n, 3);
    ck_assert_double_eq_tol(t.mean, s.mean, 1e-12);
    ck_assert_double_eq_tol(t.sd, s.sd, 1e-12);
    ck_assert_double_eq_tol(t.lo, s.lo, 1e-12);
}
END_TEST

START_TEST(test_summarize_few_values) {
    const double one[] = {NAN, 5.0};
    study_summary s = study_summarize(one, 2);
    ck_assert_int_eq(s.n, 1);
    ck_assert_double_eq(s.mean, 5.0);
    ck_assert(isnan(s.sd));
    ck_assert(isinf(s.lo) && s.lo < 0);
    ck_assert(isinf(s.hi) && s.hi > 0);
    s = study_summarize(one, 1);
    ck_assert_int_eq(s.n, 0);
    ck_assert(isnan(s.mean) && isnan(s.sd));
    ck_assert(isinf(s.lo) && isinf(s.hi));
}
END_TEST

START_TEST(test_t975_table) {
    ck_assert_double_eq_tol(study_t975(1), 12.706, 1e-3);
    ck_assert_double_eq_tol(study_t975(2), 4.303, 1e-3);
    ck_assert_double_eq_tol(study_t975(3), 3.182, 1e-3);
    ck_assert_double_eq_tol(study_t975(9), 2.262, 1e-3);
    ck_assert_double_eq_tol(study_t975(10), 2.228, 1e-3);
    ck_assert_double_eq_tol(study_t975(30), 2.042, 1e-3);
    ck_assert_double_eq_tol(study_t975(40), 2.021, 1e-3);
    ck_assert_double_eq_tol(study_t975(120), 1.980, 1e-3);
    ck_assert_double_eq_tol(study_t975(1000), 1.962, 1e-3);
    ck_assert_double_eq_tol(study_t975(1000000), 1.960, 1e-3);
    for (int df = 1; df < 2000; df++)
        ck_assert_msg(study_t975(df + 1) < study_t975(df), "t975 not decreasing at df %d", df);
    ck_assert(isnan(study_t975(0)));
}
END_TEST

/* ---- verdicts ------------------------------------------------------------------------------ */

static study_summary interval(double lo, double hi) {
    return (study_summary){.n = 3, .mean = (lo + hi) / 2, .sd = 1, .lo = lo, .hi = hi};
}

START_TEST(test_test_verdicts) {
    study_summary below = interval(-0.3, -0.1), above = interval(0.1, 0.3);
    study_summary across = interval(-0.1, 0.1), small = interval(0.01, 0.02);
    ck_assert_int_eq(study_test_verdict(&below, STUDY_LESS, 0), STUDY_REPRODUCED);
    ck_assert_int_eq(study_test_verdict(&above, STUDY_LESS, 0), STUDY_CONTRADICTED);
    ck_assert_int_eq(study_test_verdict(&across, STUDY_LESS, 0), STUDY_INCONCLUSIVE);
    /* The margin moves the boundary: d < 0.03 holds, d < 0 does not. */
    ck_assert_int_eq(study_test_verdict(&small, STUDY_LESS, 0.03), STUDY_REPRODUCED);
    ck_assert_int_eq(study_test_verdict(&small, STUDY_LESS, 0), STUDY_CONTRADICTED);
    ck_assert_int_eq(study_test_verdict(&small, STUDY_LESS, 0.015), STUDY_INCONCLUSIVE);
    /* GREATER mirrors it: d > -m. */
    ck_assert_int_eq(study_test_verdict(&above, STUDY_GREATER, 0), STUDY_REPRODUCED);
    ck_assert_int_eq(study_test_verdict(&below, STUDY_GREATER, 0), STUDY_CONTRADICTED);
    ck_assert_int_eq(study_test_verdict(&across, STUDY_GREATER, 0), STUDY_INCONCLUSIVE);
    study_summary negative_small = interval(-0.02, -0.01);
    ck_assert_int_eq(study_test_verdict(&negative_small, STUDY_GREATER, 0.03), STUDY_REPRODUCED);
    ck_assert_int_eq(study_test_verdict(&negative_small, STUDY_GREATER, 0), STUDY_CONTRADICTED);
    /* The boundary itself: LESS needs hi < m, GREATER lo > -m. */
    study_summary touching = interval(0, 0.1);
    ck_assert_int_eq(study_test_verdict(&touching, STUDY_LESS, 0), STUDY_CONTRADICTED);
    ck_assert_int_eq(study_test_verdict(&touching, STUDY_GREATER, 0), STUDY_INCONCLUSIVE);
    study_summary touching_below = interval(-0.1, 0);
    ck_assert_int_eq(study_test_verdict(&touching_below, STUDY_LESS, 0), STUDY_INCONCLUSIVE);
    ck_assert_int_eq(study_test_verdict(&touching_below, STUDY_GREATER, 0), STUDY_CONTRADICTED);
    /* One seed or none: an infinite interval decides nothing. */
    const double one[] = {-5};
    study_summary single = study_summarize(one, 1);
    ck_assert_int_eq(study_test_verdict(&single, STUDY_LESS, 0), STUDY_INCONCLUSIVE);
    study_summary none = study_summarize(one, 0);
    ck_assert_int_eq(study_test_verdict(&none, STUDY_GREATER, 0), STUDY_INCONCLUSIVE);
    ck_assert_str_eq(study_verdict_name(STUDY_REPRODUCED), "reproduced");
    ck_assert_str_eq(study_verdict_name(STUDY_CONTRADICTED), "contradicted");
    ck_assert_str_eq(study_verdict_name(STUDY_INCONCLUSIVE), "inconclusive");
}
END_TEST

/* ---- a toy study ------------------------------------------------------------------------- */

enum { DENSE = 0, MOE = 1 };
enum { TEST_BPC = 0, VALID_BPC, K1_BPC, K2_BPC, LOAD, LOAD_0, LOAD_1, ROUTER_TOPK };

static void add_metric(study *s, const char *text, const char *source, const char *field,
                       int index) {
    study_metric *m = &s->metrics[s->n_metrics++];
    snprintf(m->text, sizeof m->text, "%s", text);
    snprintf(m->source, sizeof m->source, "%s", source);
    snprintf(m->field, sizeof m->field, "%s", field);
    m->index = index;
}

static study_test less(int left_arm, int left_metric, int right_arm, int right_metric,
                       double margin) {
    return (study_test){.left_arm = left_arm,
                        .left_metric = left_metric,
                        .right_arm = right_arm,
                        .right_metric = right_metric,
                        .direction = STUDY_LESS,
                        .margin = margin};
}

static void add_claim(study *s, const char *id, const char *claim_text, const char *figure,
                      const study_test *tests, int n_tests) {
    study_claim *c = &s->claims[s->n_claims++];
    snprintf(c->id, sizeof c->id, "%s", id);
    snprintf(c->text, sizeof c->text, "%s", claim_text);
    snprintf(c->paper_figure, sizeof c->paper_figure, "%s", figure);
    for (int t = 0; t < n_tests; t++) c->tests[t] = tests[t];
    c->n_tests = n_tests;
}

/* Two arms, the metrics above, a k sweep, a per-layer metric, a curve and
 * three claims: reproduced, contradicted, inconclusive. */
static void toy_study(study *s) {
    memset(s, 0, sizeof *s);
    snprintf(s->name, sizeof s->name, "toy");
    snprintf(s->paper, sizeof s->paper, "Toy et al., MoE everywhere (2024)");
    snprintf(s->summary, sizeof s->summary, "Does the MoE beat the dense model?");
    snprintf(s->arms[DENSE].name, sizeof s->arms[DENSE].name, "dense");
    snprintf(s->arms[MOE].name, sizeof s->arms[MOE].name, "moe");
    s->n_arms = 2;
    snprintf(s->presets[0].name, sizeof s->presets[0].name, "full");
    snprintf(s->presets[0].note, sizeof s->presets[0].note, "the paper's budget");
    snprintf(s->presets[1].name, sizeof s->presets[1].name, "smoke");
    snprintf(s->presets[1].note, sizeof s->presets[1].note, "a few steps, 40 s a seed");
    s->n_presets = 2;
    add_metric(s, "test.bpc", "test", "bpc", -1);
    add_metric(s, "valid.bpc", "valid", "bpc", -1);
    add_metric(s, "k=1.bpc", "k=1", "bpc", -1);
    add_metric(s, "k=2.bpc", "k=2", "bpc", -1);
    add_metric(s, "model.load", "model", "load", -1);
    add_metric(s, "model.load[0]", "model", "load", 0);
    add_metric(s, "model.load[1]", "model", "load", 1);
    add_metric(s, "router=top_k.bpc", "router=top_k", "bpc", -1);
    study_evaluation *e = &s->evaluations[s->n_evaluations++];
    snprintf(e->name, sizeof e->name, "k");
    snprintf(e->key, sizeof e->key, "router.k");
    snprintf(e->values[0], sizeof e->values[0], "1");
    snprintf(e->values[1], sizeof e->values[1], "2");
    snprintf(e->split, sizeof e->split, "test");
    e->n_values = 2;
    e->arms[MOE] = true;
    s->sweeps[s->n_sweeps++] = (study_sweep){.evaluation = 0, .field = "bpc"};
    /* Values that are not numbers; only the first has its metric declared. */
    e = &s->evaluations[s->n_evaluations++];
    snprintf(e->name, sizeof e->name, "router");
    snprintf(e->key, sizeof e->key, "router.name");
    snprintf(e->values[0], sizeof e->values[0], "top_k");
    snprintf(e->values[1], sizeof e->values[1], "thor");
    e->n_values = 2;
    e->arms[DENSE] = e->arms[MOE] = true;
    s->sweeps[s->n_sweeps++] = (study_sweep){.evaluation = 1, .field = "bpc"};
    s->layers_metric = LOAD;
    snprintf(s->curve_kind, sizeof s->curve_kind, "valid");
    snprintf(s->curve_field, sizeof s->curve_field, "bpc");
    const study_test better = less(MOE, TEST_BPC, DENSE, TEST_BPC, 0);
    const study_test worse = less(DENSE, TEST_BPC, MOE, TEST_BPC, 0);
    const study_test valid = less(MOE, VALID_BPC, DENSE, VALID_BPC, 0);
    add_claim(s, "C1", "MoE | lower test bpc", "-0.2 bpc (Table 2)", &better, 1);
    add_claim(s, "C2", "dense lower test bpc", "n/a", &worse, 1);
    add_claim(s, "C3", "MoE lower valid bpc", "Fig. 3", &valid, 1);
}

static void set_values(study_results *r, int arm, int metric, double a, double b, double c) {
    r->values[arm][metric][0] = a;
    r->values[arm][metric][1] = b;
    r->values[arm][metric][2] = c;
}

static study_results *toy_results(const study *s) {
    study_results *r = calloc(1, sizeof *r);
    ck_assert_ptr_nonnull(r);
    r->s = s;
    r->preset = "smoke";
    r->n_seeds = 3;
    for (int a = 0; a < STUDY_MAX_ARMS; a++)
        for (int m = 0; m < STUDY_MAX_METRICS; m++)
            for (int seed = 0; seed < STUDY_MAX_SEEDS; seed++) r->values[a][m][seed] = NAN;
    set_values(r, DENSE, TEST_BPC, 2.0, 2.1, 2.2);
    set_values(r, MOE, TEST_BPC, 1.8, 1.85, 1.9);
    set_values(r, DENSE, VALID_BPC, 2.0, 2.1, 2.2);
    set_values(r, MOE, VALID_BPC, 1.9, 2.3, 2.0);
    set_values(r, MOE, K1_BPC, 2.1, 2.0, 2.2);
    set_values(r, MOE, K2_BPC, 1.8, 1.85, 1.9);
    set_values(r, MOE, LOAD_0, 0.4, 0.5, 0.45);
    set_values(r, MOE, LOAD_1, 0.6, 0.5, 0.55);
    set_values(r, DENSE, ROUTER_TOPK, 2.0, NAN, NAN);
    snprintf(r->command, sizeof r->command, "cmoe study studies/toy.yaml --preset smoke");
    snprintf(r->machine, sizeof r->machine, "2 cores, Linux");
    r->wall_seconds = 3725.4;
    return r;
}

START_TEST(test_differences_and_claims) {
    study s;
    toy_study(&s);
    study_results *r = toy_results(&s);
    double d[STUDY_MAX_SEEDS];
    study_test_differences(r, &s.claims[0].tests[0], d);
    ck_assert_double_eq_tol(d[0], -0.2, 1e-12);
    ck_assert_double_eq_tol(d[1], -0.25, 1e-12);
    ck_assert_double_eq_tol(d[2], -0.3, 1e-12);
    /* A number on the right is subtracted from every seed. */
    study_test versus_number = {.left_arm = MOE,
                                .left_metric = TEST_BPC,
                                .right_arm = -1,
                                .right_value = 2.0,
                                .direction = STUDY_LESS};
    study_test_differences(r, &versus_number, d);
    ck_assert_double_eq_tol(d[0], -0.2, 1e-12);
    ck_assert_double_eq_tol(d[2], -0.1, 1e-12);

    ck_assert_int_eq(study_claim_verdict(r, &s.claims[0]), STUDY_REPRODUCED);
    ck_assert_int_eq(study_claim_verdict(r, &s.claims[1]), STUDY_CONTRADICTED);
    ck_assert_int_eq(study_claim_verdict(r, &s.claims[2]), STUDY_INCONCLUSIVE);

    /* Conjunction: reproduced + contradicted -> contradicted; reproduced +
     * inconclusive -> inconclusive; reproduced + reproduced -> reproduced. */
    study_claim both = s.claims[0];
    both.tests[both.n_tests++] = s.claims[1].tests[0];
    ck_assert_int_eq(study_claim_verdict(r, &both), STUDY_CONTRADICTED);
    both.tests[1] = s.claims[2].tests[0];
    ck_assert_int_eq(study_claim_verdict(r, &both), STUDY_INCONCLUSIVE);
    both.tests[1] = versus_number;
    ck_assert_int_eq(study_claim_verdict(r, &both), STUDY_REPRODUCED);

    /* A missing seed makes the test inconclusive, though the other two seeds
     * alone (differences -0.2, -0.1999) have a CI far below 0. */
    set_values(r, DENSE, TEST_BPC, 2.0, 2.1, 2.0);
    set_values(r, MOE, TEST_BPC, 1.8, 1.9, 1.8001);
    ck_assert_int_eq(study_claim_verdict(r, &s.claims[0]), STUDY_REPRODUCED);
    r->values[MOE][TEST_BPC][1] = NAN;
    ck_assert_int_eq(study_claim_verdict(r, &s.claims[0]), STUDY_INCONCLUSIVE);
    study_test_differences(r, &s.claims[0].tests[0], d);
    ck_assert(isnan(d[1]));
    ck_assert_double_eq_tol(d[0], -0.2, 1e-12);
    free(r);
}
END_TEST

/* ---- the report files -------------------------------------------------------------------- */

static char *read_text(const char *dir, const char *name) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *file = fopen(path, "rb");
    ck_assert_msg(file != NULL, "%s is missing", path);
    fseek(file, 0, SEEK_END);
    const long size = ftell(file);
    rewind(file);
    char *data = calloc((size_t)size + 1, 1);
    ck_assert_ptr_nonnull(data);
    ck_assert_int_eq(fread(data, 1, (size_t)size, file), size);
    fclose(file);
    return data;
}

static int count_lines(const char *data) {
    int lines = 0;
    for (const char *c = data; *c; c++) lines += *c == '\n';
    return lines;
}

static void write_text(const char *dir, const char *name, const char *data) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *file = fopen(path, "w");
    ck_assert_ptr_nonnull(file);
    ck_assert_int_ge(fputs(data, file), 0);
    ck_assert_int_eq(fclose(file), 0);
}

static void assert_png(const char *dir, const char *name) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    struct stat info;
    ck_assert_msg(stat(path, &info) == 0, "%s is missing", path);
    ck_assert_int_gt(info.st_size, 1000);
    char *data = read_text(dir, name);
    ck_assert_int_eq(memcmp(data, "\x89PNG", 4), 0);
    free(data);
}

/* Two seeds of the dense arm with validation curves; the moe arm's run
 * directories are absent or empty. */
static void fake_runs(const char *dir, study_results *r) {
    static const char *const runs[2] = {"{\"kind\": \"train\", \"step\": 10, \"bpc\": 9.0}\n"
                                        "{\"kind\": \"valid\", \"step\": 10, \"bpc\": 2.5}\n"
                                        "{\"kind\": \"valid\", \"step\": 20, \"bpc\": 2.2}\n",
                                        "{\"kind\": \"valid\", \"step\": 10, \"bpc\": 2.7}\n"
                                        "{\"kind\": \"valid\", \"step\": 20, \"bpc\": 2.4}\n"
                                        "{\"kind\": \"valid\", \"step\": 30, \"bpc\": 2.0}\n"};
    for (int seed = 0; seed < 2; seed++) {
        snprintf(r->run_dir[DENSE][seed], sizeof r->run_dir[0][0], "%s/run-dense-%d", dir,
                 seed + 1);
        ck_assert_int_eq(mkdir(r->run_dir[DENSE][seed], 0777), 0);
        write_text(r->run_dir[DENSE][seed], "metrics.jsonl", runs[seed]);
    }
    snprintf(r->run_dir[MOE][0], sizeof r->run_dir[0][0], "%s/no-such-run", dir);
}

static void remove_tree(const char *dir) {
    char command[1200];
    snprintf(command, sizeof command, "rm -rf '%s'", dir);
    ck_assert_int_eq(system(command), 0);
}

START_TEST(test_report_files) {
    char dir[] = "/tmp/cmoe-study-report-XXXXXX";
    ck_assert_ptr_nonnull(mkdtemp(dir));
    char report_dir[256];
    snprintf(report_dir, sizeof report_dir, "%s/reports/nested", dir);
    study s;
    toy_study(&s);
    study_results *r = toy_results(&s);
    fake_runs(dir, r);
    /* Another study's claims, reported earlier. */
    char reports[256];
    snprintf(reports, sizeof reports, "%s/reports", dir);
    ck_assert_int_eq(mkdir(reports, 0777), 0);
    ck_assert_int_eq(mkdir(report_dir, 0777), 0);
    write_text(report_dir, "earlier.claims.tsv",
               "study\tclaim\ttext\tpaper_figure\tours\tverdict\tlink\n"
               "earlier\tE1\tan older claim\t1.0\t0.5 [0.1, 0.9]\treproduced\tearlier.md\n");

    ck_assert_msg(study_report(r, report_dir) == CM_OK, "%s", cm_error_message());

    char *md = read_text(report_dir, "toy.md");
    ck_assert_ptr_nonnull(strstr(md, "# Study toy"));
    ck_assert_ptr_nonnull(strstr(md, "Toy et al., MoE everywhere (2024)"));
    ck_assert_ptr_nonnull(strstr(md, "cmoe study studies/toy.yaml --preset smoke"));
    ck_assert_ptr_nonnull(strstr(md, "3 seeds, wall time 1:02:05 on 2 cores, Linux."));
    ck_assert_ptr_nonnull(strstr(md, "Preset note: a few steps, 40 s a seed\n")); /* its preset's */
    ck_assert_ptr_null(strstr(md, "the paper's budget"));
    ck_assert_ptr_nonnull(strstr(md, "**reproduced**"));
    ck_assert_ptr_nonnull(strstr(md, "**contradicted**"));
    ck_assert_ptr_nonnull(strstr(md, "**inconclusive**"));
    /* C1: moe - dense = -0.25, sd 0.05, half-width 4.302653 * 0.05 / sqrt 3 = 0.1242. */
    ck_assert_ptr_nonnull(strstr(md, "| C1 | MoE \\| lower test bpc | -0.2 bpc (Table 2) | "
                                     "moe:test.bpc − dense:test.bpc = -0.2500 [-0.3742, -0.1258] | "
                                     "**reproduced** |"));
    /* dense test.bpc: 2.0, 2.1, 2.2: mean 2.1, sd 0.1, CI 2.1 -+ 0.2484. */
    ck_assert_ptr_nonnull(strstr(md, "### test.bpc\n"));
    ck_assert_ptr_nonnull(
        strstr(md, "| dense | 3 | 2.1000 ± 0.1000 | [1.8516, 2.3484] | 2.0000, 2.1000, 2.2000 |"));
    ck_assert_ptr_nonnull(strstr(md, "![curves.png](toy/curves.png)"));
    ck_assert_ptr_nonnull(strstr(md, "![sweep-k.png](toy/sweep-k.png)"));
    ck_assert_ptr_nonnull(strstr(md, "![layers.png](toy/layers.png)"));
    /* The arm without k=1 values has no row in that table. */
    const char *k1 = strstr(md, "### k=1.bpc\n");
    ck_assert_ptr_nonnull(k1);
    ck_assert_ptr_null(strstr(k1, "| dense | 3"));
    free(md);

    char *tsv = read_text(report_dir, "toy.claims.tsv");
    ck_assert_int_eq(count_lines(tsv), 1 + 3);
    ck_assert_ptr_nonnull(strstr(tsv, "study\tclaim\ttext\tpaper_figure\tours\tverdict\tlink\n"));
    ck_assert_ptr_nonnull(strstr(tsv, "toy\tC2\tdense lower test bpc\tn/a\t"));
    ck_assert_ptr_nonnull(strstr(tsv, "\tcontradicted\ttoy.md\n"));
    free(tsv);

    char *readme = read_text(report_dir, "README.md");
    ck_assert_ptr_nonnull(strstr(readme, "Every claim of every study"));
    const char *earlier = strstr(readme, "| earlier | E1: an older claim | 1.0 | 0.5 [0.1, 0.9] | "
                                         "**reproduced** | [earlier](earlier.md) |");
    const char *toy = strstr(readme, "| toy | C1: MoE \\| lower test bpc | -0.2 bpc (Table 2) |");
    ck_assert_ptr_nonnull(earlier);
    ck_assert_ptr_nonnull(toy);
    ck_assert(earlier < toy); /* sorted by file name */
    ck_assert_ptr_nonnull(strstr(readme, "**inconclusive** | [toy](toy.md) |"));
    ck_assert_int_eq(count_lines(readme), 6 + 1 + 3);
    free(readme);

    char plot_dir[300];
    snprintf(plot_dir, sizeof plot_dir, "%s/toy", report_dir);
    assert_png(plot_dir, "curves.png");
    assert_png(plot_dir, "sweep-k.png");
    assert_png(plot_dir, "layers.png");
    assert_png(plot_dir, "sweep-router.png");
    /* The router sweep: labels for x, one point (one seed: no error bar). */
    char *script = read_text(plot_dir, "sweep-router.gp");
    ck_assert_ptr_nonnull(strstr(script, "set xtics ('top_k' 0)\n"));
    ck_assert_ptr_nonnull(strstr(script, "title 'dense'"));
    ck_assert_ptr_null(strstr(script, "title 'moe'"));
    free(script);
    char *sweep = read_text(plot_dir, "sweep-router.tsv");
    ck_assert_str_eq(sweep, "0\t2\t0\n\n\n");
    free(sweep);
    sweep = read_text(plot_dir, "sweep-k.tsv");
    ck_assert_str_eq(sweep, "1\t2.1\t0.248414\n2\t1.85\t0.124207\n\n\n");
    free(sweep);
    /* Step 10: seeds 2.5 and 2.7 -> mean 2.6, sd 0.141421; step 30: one seed. */
    char *curves = read_text(plot_dir, "curves.tsv");
    ck_assert_ptr_nonnull(strstr(curves, "10\t2.6\t2.45858\t2.74142\n"));
    ck_assert_ptr_nonnull(strstr(curves, "30\t2\t2\t2\n"));
    ck_assert_int_eq(count_lines(curves), 3 + 2);
    free(curves);
    free(r);
    remove_tree(dir);
}
END_TEST

START_TEST(test_report_errors) {
    char dir[] = "/tmp/cmoe-study-report-XXXXXX";
    ck_assert_ptr_nonnull(mkdtemp(dir));
    study s;
    toy_study(&s);
    study_results *r = toy_results(&s);
    fake_runs(dir, r);
    /* A report directory that is a file. */
    write_text(dir, "file", "x\n");
    char bad[300];
    snprintf(bad, sizeof bad, "%s/file", dir);
    ck_assert_int_eq(study_report(r, bad), CM_ERR_IO);
    ck_assert_ptr_nonnull(strstr(cm_error_message(), bad));
    /* Without gnuplot the plot fails and says so. */
    char *path = getenv("PATH") ? strdup(getenv("PATH")) : NULL;
    ck_assert_int_eq(setenv("PATH", "/nonexistent", 1), 0);
    const cm_status status = study_report(r, dir);
    if (path) ck_assert_int_eq(setenv("PATH", path, 1), 0);
    free(path);
    ck_assert_int_eq(status, CM_ERR_IO);
    ck_assert_ptr_nonnull(strstr(cm_error_message(), "gnuplot"));
    /* A name that is not a file name. */
    snprintf(s.name, sizeof s.name, "../escape");
    ck_assert_int_eq(study_report(r, dir), CM_ERR_INVALID);
    free(r);
    remove_tree(dir);
}
END_TEST

int main(void) {
    Suite *suite = suite_create("study_report");
    TCase *tc = tcase_create("study_report");
    tcase_add_test(tc, test_summarize_by_hand);
    tcase_add_test(tc, test_summarize_few_values);
    tcase_add_test(tc, test_t975_table);
    tcase_add_test(tc, test_test_verdicts);
    tcase_add_test(tc, test_differences_and_claims);
    tcase_add_test(tc, test_report_files);
    tcase_add_test(tc, test_report_errors);
    suite_add_tcase(suite, tc);
    SRunner *runner = srunner_create(suite);
    srunner_run_all(runner, CK_NORMAL);
    const int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
