/* metrics.jsonl writing, truncation on resume, parsing, and the gnuplot PNG;
 * the progress helpers' formatting. */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "train/metrics.h"
#include "train/progress.h"

static int count_lines(const char *path) {
    FILE *file = fopen(path, "r");
    ck_assert_ptr_nonnull(file);
    int lines = 0;
    for (int c; (c = fgetc(file)) != EOF;) lines += c == '\n';
    fclose(file);
    return lines;
}

START_TEST(test_write_resume_truncates_and_plot) {
    char dir[] = "/tmp/cmoe-metrics-XXXXXX";
    ck_assert_ptr_nonnull(mkdtemp(dir));
    cm_metrics metrics;
    ck_assert_int_eq(metrics_open(&metrics, dir, -1), CM_OK);
    for (int step = 10; step <= 100; step += 10) {
        metrics_record line = metrics_record_start("train", step);
        metrics_add_number(&line, "loss", 3.0 - step / 100.0, "%.4f");
        metrics_add_number(&line, "bpc", (3.0 - step / 100.0) / 0.6931, "%.4f");
        ck_assert_int_eq(metrics_write_record(&metrics, &line), CM_OK);
        if (step % 50 == 0) {
            line = metrics_record_start("valid", step);
            metrics_add_number(&line, "bpc", 4.0 - step / 100.0, "%.4f");
            ck_assert_int_eq(metrics_write_record(&metrics, &line), CM_OK);
        }
    }
    metrics_close(&metrics);
    char path[256];
    snprintf(path, sizeof path, "%s/metrics.jsonl", dir);
    ck_assert_int_eq(count_lines(path), 12);

    /* Resume from step 60: lines for steps 70..100 (and valid@100) go. */
    ck_assert_int_eq(metrics_open(&metrics, dir, 60), CM_OK);
    metrics_record line = metrics_record_start("train", 70);
    metrics_add_number(&line, "loss", 1.0, NULL);
    metrics_add_number(&line, "bpc", 1.4427, NULL);
    ck_assert_int_eq(metrics_write_record(&metrics, &line), CM_OK);
    metrics_close(&metrics);
    ck_assert_int_eq(count_lines(path), 6 + 1 + 1);

    ck_assert_msg(metrics_plot(dir) == CM_OK, "%s", cm_error_message());
    char png[256];
    snprintf(png, sizeof png, "%s/curves.png", dir);
    struct stat info;
    ck_assert_int_eq(stat(png, &info), 0);
    ck_assert_int_gt(info.st_size, 1000);
    FILE *file = fopen(png, "rb");
    unsigned char magic[8];
    ck_assert_int_eq(fread(magic, 1, 8, file), 8);
    fclose(file);
    ck_assert_int_eq(memcmp(magic, "\x89PNG\r\n\x1a\n", 8), 0);
    snprintf(path, sizeof path, "%s/curves-valid.tsv", dir);
    ck_assert_int_eq(count_lines(path), 1);

    char command[300];
    snprintf(command, sizeof command, "rm -rf '%s'", dir);
    ck_assert_int_eq(system(command), 0);
    ck_assert_int_eq(metrics_plot("/tmp/no-such-run-dir"), CM_ERR_IO);
}
END_TEST

START_TEST(test_parsing) {
    const char *line = "{\"kind\": \"valid\", \"step\": 400, \"bpc\": 2.4700, \"lr\": 3e-4}";
    double value = 0;
    ck_assert(metrics_is_kind(line, "valid"));
    ck_assert(!metrics_is_kind(line, "train"));
    ck_assert(metrics_find_number(line, "step", &value));
    ck_assert_double_eq(value, 400);
    ck_assert(metrics_find_number(line, "lr", &value));
    ck_assert_double_eq_tol(value, 3e-4, 1e-12);
    ck_assert(!metrics_find_number(line, "loss", &value));
}
END_TEST

START_TEST(test_duration_format) {
    char text[32];
    format_duration(125.4, text, sizeof text);
    ck_assert_str_eq(text, "2:05");
    format_duration(3725, text, sizeof text);
    ck_assert_str_eq(text, "1:02:05");
    format_duration(-3, text, sizeof text);
    ck_assert_str_eq(text, "0:00");
}
END_TEST

START_TEST(test_plain_progress_lines) {
    char *buffer = NULL;
    size_t size = 0;
    FILE *stream = open_memstream(&buffer, &size);
    cm_progress progress;
    progress_init(&progress, stream, 0, 200, true);
    ck_assert(!progress.tty);
    progress_update(&progress, 50, "loss 1.23", 41000, "tok/s", false); /* not a log step */
    progress_update(&progress, 100, "loss 1.11", 41000, "tok/s", true);
    progress_print(&progress, "saved %s", "ckpt");
    progress_finish(&progress);
    fclose(stream);
    ck_assert_msg(strstr(buffer, "step 100/200  loss 1.11  41.0k tok/s  ETA") != NULL, "%s",
                  buffer);
    ck_assert_ptr_null(strstr(buffer, "loss 1.23"));
    ck_assert_ptr_nonnull(strstr(buffer, "saved ckpt\n"));
    free(buffer);
}
END_TEST

static void assert_png(const char *dir, const char *name) {
    char path[300];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *file = fopen(path, "rb");
    ck_assert_msg(file != NULL, "%s missing", path);
    unsigned char magic[8];
    ck_assert_int_eq(fread(magic, 1, 8, file), 8);
    fclose(file);
    ck_assert_int_eq(memcmp(magic, "\x89PNG\r\n\x1a\n", 8), 0);
}

/* A record is one JSON object in field order with the given formats; NaN
 * is written as -1; arrays of any length (no fixed line capacity); a write
 * that fails (a full disk: /dev/full) is an error naming the file. */
START_TEST(test_records) {
    char buffer[65536];
    FILE *memory = fmemopen(buffer, sizeof buffer, "w");
    ck_assert_ptr_nonnull(memory);
    enum { E = 300 }; /* a line longer than the old 1023-byte buffer */
    int64_t loads[E];
    for (int e = 0; e < E; e++) loads[e] = 1000 + e;
    const double ratios[2] = {0.25, NAN};
    metrics_record line = metrics_record_start("moe", 7);
    metrics_add_number(&line, "loss", 1.0 / 3.0, "%.6f");
    metrics_add_number(&line, "grad_norm", NAN, "%.6g");
    metrics_add_integer(&line, "layer", 2);
    metrics_add_numbers(&line, "ratios", ratios, 2, "%.2f");
    metrics_add_integers(&line, "tokens_per_expert", loads, E);
    ck_assert_int_eq(metrics_format_record(memory, &line), 0);
    fclose(memory);
    const char *expected = "{\"kind\": \"moe\", \"step\": 7, \"loss\": 0.333333, "
                           "\"grad_norm\": -1, \"layer\": 2, \"ratios\": [0.25, -1.00], "
                           "\"tokens_per_expert\": [1000, 1001,";
    ck_assert_msg(strncmp(buffer, expected, strlen(expected)) == 0, "%.300s", buffer);
    ck_assert_ptr_nonnull(strstr(buffer, "1298, 1299]}"));
    double value;
    ck_assert(metrics_record_get(&line, "layer", &value) && value == 2.0);
    ck_assert(!metrics_record_get(&line, "tokens_per_expert", &value));
    metrics_record scalars = metrics_record_scalars(&line);
    ck_assert_int_eq(scalars.n_fields, 3);

    cm_metrics full = {.file = fopen("/dev/full", "w")};
    snprintf(full.path, sizeof full.path, "/dev/full");
    ck_assert_ptr_nonnull(full.file);
    ck_assert_int_eq(metrics_write_record(&full, &line), CM_ERR_IO);
    ck_assert_msg(strstr(cm_error_message(), "/dev/full: cannot write the moe line of step 7"),
                  "%s", cm_error_message());
    metrics_close(&full);
}
END_TEST

START_TEST(test_routing_plots) {
    char dir[] = "/tmp/cmoe-metrics-XXXXXX";
    ck_assert_ptr_nonnull(mkdtemp(dir));
    cm_metrics metrics;
    ck_assert_int_eq(metrics_open(&metrics, dir, -1), CM_OK);
    for (int step = 10; step <= 50; step += 10) {
        metrics_record line = metrics_record_start("train", step);
        metrics_add_number(&line, "bpc", 3.0, "%.1f");
        ck_assert_int_eq(metrics_write_record(&metrics, &line), CM_OK);
        for (int layer = 0; layer < 4; layer += 2) {
            const int64_t loads[4] = {step, 10, 20, 60 - step};
            line = metrics_record_start("moe", step);
            metrics_add_integer(&line, "layer", layer);
            metrics_add_number(&line, "mean_k", 2.0 - step / 100.0, "%.2f");
            metrics_add_integers(&line, "tokens_per_expert", loads, 4);
            ck_assert_int_eq(metrics_write_record(&metrics, &line), CM_OK);
        }
    }
    metrics_close(&metrics);
    ck_assert_msg(metrics_plot(dir) == CM_OK, "%s", cm_error_message());
    assert_png(dir, "moe-load.png");
    assert_png(dir, "moe-k.png");
    /* The data behind them: layer blocks, shares summing to 1 per step. */
    char path[300], line[256];
    snprintf(path, sizeof path, "%s/moe-routing.tsv", dir);
    FILE *file = fopen(path, "r");
    double share_sum = 0;
    int rows = 0;
    while (fgets(line, sizeof line, file)) {
        double step, expert, share;
        if (sscanf(line, "%lf %lf %lf", &step, &expert, &share) != 3) continue;
        rows++;
        if (step == 30) share_sum += share;
    }
    fclose(file);
    ck_assert_int_eq(rows, 2 * 5 * 4);
    ck_assert_double_eq_tol(share_sum, 2.0, 1e-4); /* two layers */
    char command[300];
    snprintf(command, sizeof command, "rm -rf '%s'", dir);
    ck_assert_int_eq(system(command), 0);
}
END_TEST

/* The MoE-CNN's "moe_cnn" lines (one per router and log step) render
 * moe-cnn-load.png; its data has a block per router whose shares sum to 1
 * at every step. A CNN run has no bits per byte: curves.png plots its loss. */
START_TEST(test_cnn_routing_plot) {
    char dir[] = "/tmp/cmoe-metrics-XXXXXX";
    ck_assert_ptr_nonnull(mkdtemp(dir));
    cm_metrics metrics;
    ck_assert_int_eq(metrics_open(&metrics, dir, -1), CM_OK);
    for (int step = 20; step <= 100; step += 20) {
        metrics_record line = metrics_record_start("train", step);
        metrics_add_number(&line, "loss", 2.0 - step / 100.0, "%.3f");
        ck_assert_int_eq(metrics_write_record(&metrics, &line), CM_OK);
        for (int router = 0; router < 3; router++) {
            const int64_t images[2] = {step + router, 2560 - step - router};
            line = metrics_record_start("moe_cnn", step);
            metrics_add_integer(&line, "router", router);
            metrics_add_integer(&line, "images", 2560);
            metrics_add_integers(&line, "images_per_expert", images, 2);
            ck_assert_int_eq(metrics_write_record(&metrics, &line), CM_OK);
        }
    }
    metrics_close(&metrics);
    ck_assert_msg(metrics_plot(dir) == CM_OK, "%s", cm_error_message());
    assert_png(dir, "moe-cnn-load.png");
    assert_png(dir, "curves.png");
    char path[300], line[256];
    snprintf(path, sizeof path, "%s/moe-cnn-routing.tsv", dir);
    FILE *file = fopen(path, "r");
    ck_assert_ptr_nonnull(file);
    double share_sum = 0, first = -1;
    int rows = 0;
    while (fgets(line, sizeof line, file)) {
        double step, expert, share;
        if (sscanf(line, "%lf %lf %lf", &step, &expert, &share) != 3) continue;
        if (rows++ == 0) first = share;
        if (step == 60) share_sum += share;
    }
    fclose(file);
    ck_assert_int_eq(rows, 3 * 5 * 2);
    ck_assert_double_eq_tol(share_sum, 3.0, 1e-4); /* three routers */
    ck_assert_double_eq_tol(first, 20.0 / 2560, 1e-5);
    snprintf(path, sizeof path, "%s/moe-load.png", dir); /* no LM routing lines */
    ck_assert_int_ne(access(path, F_OK), 0);
    char command[300];
    snprintf(command, sizeof command, "rm -rf '%s'", dir);
    ck_assert_int_eq(system(command), 0);
}
END_TEST

/* A run directory whose name holds quotes (and a newline) plots: gnuplot
 * reads relative file names in the directory, and the scripts hold neither
 * the path nor the raw name (an interpolated path would end gnuplot's
 * string there and run the rest as commands). */
START_TEST(test_plot_quoted_directory) {
    char parent[] = "/tmp/cmoe-metrics-XXXXXX";
    ck_assert_ptr_nonnull(mkdtemp(parent));
    char dir[300];
    snprintf(dir, sizeof dir, "%s/it's \"odd\"\nset output 'x", parent);
    ck_assert_int_eq(mkdir(dir, 0700), 0);
    cm_metrics metrics;
    ck_assert_int_eq(metrics_open(&metrics, dir, -1), CM_OK);
    for (int step = 10; step <= 30; step += 10) {
        metrics_record line = metrics_record_start("train", step);
        metrics_add_number(&line, "bpc", 3.0 - step / 100.0, "%.3f");
        ck_assert_int_eq(metrics_write_record(&metrics, &line), CM_OK);
        const int64_t images[2] = {step, 100 - step};
        line = metrics_record_start("moe_cnn", step);
        metrics_add_integer(&line, "router", 0);
        metrics_add_integers(&line, "images_per_expert", images, 2);
        ck_assert_int_eq(metrics_write_record(&metrics, &line), CM_OK);
    }
    metrics_close(&metrics);
    ck_assert_msg(metrics_plot(dir) == CM_OK, "%s", cm_error_message());
    assert_png(dir, "curves.png");
    assert_png(dir, "moe-cnn-load.png");
    const int ks[2] = {1, 2};
    const double bpc[2] = {2.0, 1.9};
    ck_assert_msg(metrics_plot_k_sweep(dir, ks, bpc, 2, "it's a 'title'") == CM_OK, "%s",
                  cm_error_message());
    assert_png(dir, "k-sweep.png");
    const char *scripts[3] = {"curves.gp", "moe-cnn-load.gp", "k-sweep.gp"};
    for (int i = 0; i < 3; i++) {
        char path[400], text[4096];
        snprintf(path, sizeof path, "%s/%s", dir, scripts[i]);
        FILE *file = fopen(path, "r");
        ck_assert_ptr_nonnull(file);
        size_t n = fread(text, 1, sizeof text - 1, file);
        text[n] = '\0';
        fclose(file);
        ck_assert_msg(!strstr(text, parent) && !strstr(text, "it's") && !strstr(text, "\"odd"),
                      "%s: %s", scripts[i], text);
    }
    char command[400];
    snprintf(command, sizeof command, "rm -rf '%s'", parent);
    ck_assert_int_eq(system(command), 0);
}
END_TEST

int main(void) {
    Suite *suite = suite_create("metrics");
    TCase *tc = tcase_create("metrics");
    tcase_add_test(tc, test_write_resume_truncates_and_plot);
    tcase_add_test(tc, test_parsing);
    tcase_add_test(tc, test_duration_format);
    tcase_add_test(tc, test_plain_progress_lines);
    tcase_add_test(tc, test_routing_plots);
    tcase_add_test(tc, test_records);
    tcase_add_test(tc, test_cnn_routing_plot);
    tcase_add_test(tc, test_plot_quoted_directory);
    suite_add_tcase(suite, tc);
    SRunner *runner = srunner_create(suite);
    srunner_run_all(runner, CK_NORMAL);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
