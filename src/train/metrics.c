#include "train/metrics.h"

#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

enum { LINE_CAPACITY = 8192, PATH_CAPACITY = 4096 };

bool metrics_find_number(const char *line, const char *key, double *value) {
    char pattern[128];
    snprintf(pattern, sizeof pattern, "\"%s\":", key);
    const char *at = strstr(line, pattern);
    if (!at) return false;
    char *end;
    double parsed = strtod(at + strlen(pattern), &end);
    if (end == at + strlen(pattern)) return false;
    *value = parsed;
    return true;
}

bool metrics_is_kind(const char *line, const char *kind) {
    char pattern[128];
    snprintf(pattern, sizeof pattern, "\"kind\": \"%s\"", kind);
    if (strstr(line, pattern)) return true;
    snprintf(pattern, sizeof pattern, "\"kind\":\"%s\"", kind);
    return strstr(line, pattern) != NULL;
}

/* Rewrites `path` keeping only lines whose step is <= last_step. */
static cm_status truncate_after(const char *path, int64_t last_step) {
    FILE *in = fopen(path, "r");
    if (!in) return CM_OK; /* nothing to keep */
    char temporary[PATH_CAPACITY + 8];
    snprintf(temporary, sizeof temporary, "%s.tmp", path);
    FILE *out = fopen(temporary, "w");
    if (!out) {
        fclose(in);
        return CM_ERR(CM_ERR_IO, "%s: cannot write: %s", temporary, strerror(errno));
    }
    char line[LINE_CAPACITY];
    while (fgets(line, sizeof line, in)) {
        double step;
        if (metrics_find_number(line, "step", &step) && step > (double)last_step) continue;
        fputs(line, out);
    }
    fclose(in);
    if (fclose(out) != 0 || rename(temporary, path) != 0)
        return CM_ERR(CM_ERR_IO, "%s: cannot rewrite: %s", path, strerror(errno));
    return CM_OK;
}

cm_status metrics_open(cm_metrics *metrics, const char *run_dir, int64_t resume_step) {
    char path[PATH_CAPACITY];
    snprintf(path, sizeof path, "%s/metrics.jsonl", run_dir);
    if (resume_step >= 0) CM_TRY(truncate_after(path, resume_step));
    metrics->file = fopen(path, resume_step >= 0 ? "a" : "w");
    if (!metrics->file) return CM_ERR(CM_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    return CM_OK;
}

void metrics_write(cm_metrics *metrics, const char *fmt, ...) {
    if (!metrics->file) return;
    va_list args;
    va_start(args, fmt);
    vfprintf(metrics->file, fmt, args);
    va_end(args);
    fputc('\n', metrics->file);
    fflush(metrics->file);
}

void metrics_close(cm_metrics *metrics) {
    if (metrics->file) fclose(metrics->file);
    metrics->file = NULL;
}

/* Copies (step, bpc) of every `kind` line into a TSV; returns the count. */
static int extract(FILE *in, const char *kind, FILE *out) {
    rewind(in);
    char line[LINE_CAPACITY];
    int count = 0;
    while (fgets(line, sizeof line, in)) {
        double step, bpc;
        if (!metrics_is_kind(line, kind)) continue;
        if (!metrics_find_number(line, "step", &step) || !metrics_find_number(line, "bpc", &bpc))
            continue;
        fprintf(out, "%.0f\t%.6f\n", step, bpc);
        count++;
    }
    return count;
}

cm_status metrics_plot(const char *run_dir) {
    char path[PATH_CAPACITY], train_path[PATH_CAPACITY], valid_path[PATH_CAPACITY],
        png_path[PATH_CAPACITY];
    snprintf(path, sizeof path, "%s/metrics.jsonl", run_dir);
    snprintf(train_path, sizeof train_path, "%s/curves-train.tsv", run_dir);
    snprintf(valid_path, sizeof valid_path, "%s/curves-valid.tsv", run_dir);
    snprintf(png_path, sizeof png_path, "%s/curves.png", run_dir);
    FILE *in = fopen(path, "r");
    if (!in) return CM_ERR(CM_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    FILE *train = fopen(train_path, "w"), *valid = fopen(valid_path, "w");
    if (!train || !valid) {
        fclose(in);
        if (train) fclose(train);
        if (valid) fclose(valid);
        return CM_ERR(CM_ERR_IO, "%s: cannot write the curve data", run_dir);
    }
    int n_train = extract(in, "train", train), n_valid = extract(in, "valid", valid);
    fclose(in);
    fclose(train);
    fclose(valid);
    if (n_train == 0)
        return CM_ERR(CM_ERR_INVALID, "%s: no training steps with a bpc value to plot", path);

    FILE *gnuplot = popen("gnuplot 2>&1", "w");
    if (!gnuplot) return CM_ERR(CM_ERR_IO, "cannot start gnuplot: %s", strerror(errno));
    fprintf(gnuplot,
            "set terminal pngcairo size 900,560 font ',10'\n"
            "set output '%s'\n"
            "set title 'cmoe: %s'\n"
            "set xlabel 'step'\nset ylabel 'bits per byte'\n"
            "set grid\nset key top right\n",
            png_path, run_dir);
    fprintf(gnuplot, "plot '%s' using 1:2 with lines lw 1 lc rgb '#4477aa' title 'train'",
            train_path);
    if (n_valid > 0)
        fprintf(gnuplot,
                ", '%s' using 1:2 with linespoints pt 7 ps 0.6 lw 2 lc rgb '#cc3311' "
                "title 'validation'",
                valid_path);
    fprintf(gnuplot, "\n");
    int status = pclose(gnuplot);
    if (status != 0)
        return CM_ERR(CM_ERR_IO,
                      "gnuplot failed (exit status %d) writing %s; is gnuplot-nox "
                      "installed (scripts/install-deps.sh)?",
                      status, png_path);
    return CM_OK;
}

cm_status metrics_plot_k_sweep(const char *dir, const int *ks, const double *bpc, int n,
                               const char *title) {
    char tsv_path[PATH_CAPACITY], png_path[PATH_CAPACITY];
    snprintf(tsv_path, sizeof tsv_path, "%s/k-sweep.tsv", dir);
    snprintf(png_path, sizeof png_path, "%s/k-sweep.png", dir);
    FILE *tsv = fopen(tsv_path, "w");
    if (!tsv) return CM_ERR(CM_ERR_IO, "%s: cannot write: %s", tsv_path, strerror(errno));
    fprintf(tsv, "# k\tbpc\n");
    for (int i = 0; i < n; i++) fprintf(tsv, "%d\t%.6f\n", ks[i], bpc[i]);
    if (fclose(tsv) != 0) return CM_ERR(CM_ERR_IO, "%s: cannot write", tsv_path);
    FILE *gnuplot = popen("gnuplot 2>&1", "w");
    if (!gnuplot) return CM_ERR(CM_ERR_IO, "cannot start gnuplot: %s", strerror(errno));
    fprintf(gnuplot,
            "set terminal pngcairo size 720,480 font ',10'\n"
            "set output '%s'\n"
            "set title 'cmoe: %s'\n"
            "set xlabel 'experts per token at evaluation (k)'\nset ylabel 'bits per byte'\n"
            "set logscale x 2\nset grid\nset key off\n"
            "plot '%s' using 1:2 with linespoints pt 7 lw 2 lc rgb '#4477aa'\n",
            png_path, title, tsv_path);
    int status = pclose(gnuplot);
    if (status != 0)
        return CM_ERR(CM_ERR_IO, "gnuplot failed (exit status %d) writing %s", status, png_path);
    return CM_OK;
}
