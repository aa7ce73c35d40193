#include "train/metrics.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "common/check.h"

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
    snprintf(metrics->path, sizeof metrics->path, "%s/metrics.jsonl", run_dir);
    if (resume_step >= 0) CM_TRY(truncate_after(metrics->path, resume_step));
    metrics->file = fopen(metrics->path, resume_step >= 0 ? "a" : "w");
    if (!metrics->file)
        return CM_ERR(CM_ERR_IO, "%s: cannot open: %s", metrics->path, strerror(errno));
    return CM_OK;
}

metrics_record metrics_record_start(const char *kind, int64_t step) {
    return (metrics_record){.kind = kind, .step = step};
}

static metrics_field *append(metrics_record *record, const char *key, metrics_type type) {
    CM_ASSERT(record->n_fields < METRICS_MAX_FIELDS, "metrics record '%s' has more than %d fields",
              record->kind, METRICS_MAX_FIELDS);
    metrics_field *field = &record->fields[record->n_fields++];
    *field = (metrics_field){.key = key, .type = type};
    return field;
}

void metrics_add_number(metrics_record *record, const char *key, double value, const char *format) {
    metrics_field *field = append(record, key, METRICS_NUMBER);
    field->number = value;
    field->format = format;
}

void metrics_add_integer(metrics_record *record, const char *key, int64_t value) {
    append(record, key, METRICS_INTEGER)->integer = value;
}

void metrics_add_numbers(metrics_record *record, const char *key, const double *values, int count,
                         const char *format) {
    metrics_field *field = append(record, key, METRICS_NUMBERS);
    field->numbers = values;
    field->count = count;
    field->format = format;
}

void metrics_add_integers(metrics_record *record, const char *key, const int64_t *values,
                          int count) {
    metrics_field *field = append(record, key, METRICS_INTEGERS);
    field->integers = values;
    field->count = count;
}

bool metrics_record_get(const metrics_record *record, const char *key, double *value) {
    for (int i = 0; i < record->n_fields; i++) {
        const metrics_field *field = &record->fields[i];
        if (strcmp(field->key, key) != 0) continue;
        if (field->type == METRICS_NUMBER)
            *value = field->number;
        else if (field->type == METRICS_INTEGER)
            *value = (double)field->integer;
        else
            return false;
        return true;
    }
    return false;
}

metrics_record metrics_record_scalars(const metrics_record *record) {
    metrics_record scalars = metrics_record_start(record->kind, record->step);
    for (int i = 0; i < record->n_fields; i++) {
        const metrics_field *field = &record->fields[i];
        if (field->type == METRICS_NUMBER || field->type == METRICS_INTEGER)
            scalars.fields[scalars.n_fields++] = *field;
    }
    return scalars;
}

static int print_number(FILE *out, double value, const char *format) {
    if (!isfinite(value)) value = -1.0;
    return fprintf(out, format ? format : "%.6g", value);
}

int metrics_format_record(FILE *out, const metrics_record *record) {
    int failed = fprintf(out, "{\"kind\": \"%s\", \"step\": %lld", record->kind,
                         (long long)record->step) < 0;
    for (int i = 0; i < record->n_fields; i++) {
        const metrics_field *field = &record->fields[i];
        failed |= fprintf(out, ", \"%s\": ", field->key) < 0;
        switch (field->type) {
        case METRICS_NUMBER:
            failed |= print_number(out, field->number, field->format) < 0;
            break;
        case METRICS_INTEGER:
            failed |= fprintf(out, "%lld", (long long)field->integer) < 0;
            break;
        case METRICS_NUMBERS:
        case METRICS_INTEGERS:
            failed |= fputc('[', out) == EOF;
            for (int k = 0; k < field->count; k++) {
                if (k > 0) failed |= fputs(", ", out) == EOF;
                if (field->type == METRICS_NUMBERS)
                    failed |= print_number(out, field->numbers[k], field->format) < 0;
                else
                    failed |= fprintf(out, "%lld", (long long)field->integers[k]) < 0;
            }
            failed |= fputc(']', out) == EOF;
            break;
        }
    }
    failed |= fputc('}', out) == EOF;
    return failed ? -1 : 0;
}

cm_status metrics_write_record(cm_metrics *metrics, const metrics_record *record) {
    if (!metrics->file) return CM_OK;
    errno = 0;
    int failed = metrics_format_record(metrics->file, record);
    failed |= fputc('\n', metrics->file) == EOF;
    failed |= fflush(metrics->file) != 0;
    if (failed)
        return CM_ERR(CM_ERR_IO, "%s: cannot write the %s line of step %lld: %s", metrics->path,
                      record->kind, (long long)record->step,
                      errno ? strerror(errno) : "write error");
    return CM_OK;
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

enum { PLOT_MAX_LAYERS = 64, PLOT_MAX_EXPERTS = 256 };

/* The numbers of the "tokens_per_expert": [...] array of a moe line. */
static int parse_loads(const char *line, double *loads, int capacity) {
    const char *at = strstr(line, "\"tokens_per_expert\": [");
    if (!at) return 0;
    at = strchr(at, '[') + 1;
    int n = 0;
    while (n < capacity) {
        char *end;
        double value = strtod(at, &end);
        if (end == at) break;
        loads[n++] = value;
        at = end;
        while (*at == ',' || *at == ' ') at++;
    }
    return n;
}

/* One gnuplot data block per layer (index i): `path` has rows "step expert
 * share" with a blank line after each step (a grid for `with image`);
 * `k_path` has rows "step mean_k". */
static cm_status write_routing_data(FILE *in, const int *layers, int n_layers, const char *path,
                                    const char *k_path, double *last_step) {
    char line[LINE_CAPACITY];
    double loads[PLOT_MAX_EXPERTS];
    FILE *out = fopen(path, "w"), *k_out = fopen(k_path, "w");
    if (!out || !k_out) {
        if (out) fclose(out);
        if (k_out) fclose(k_out);
        return CM_ERR(CM_ERR_IO, "%s: cannot write the routing data: %s", path, strerror(errno));
    }
    for (int i = 0; i < n_layers; i++) {
        rewind(in);
        while (fgets(line, sizeof line, in)) {
            double layer, step, mean_k;
            if (!metrics_is_kind(line, "moe") || !metrics_find_number(line, "layer", &layer) ||
                (int)layer != layers[i] || !metrics_find_number(line, "step", &step) ||
                !metrics_find_number(line, "mean_k", &mean_k))
                continue;
            int n = parse_loads(line, loads, PLOT_MAX_EXPERTS);
            double total = 0;
            for (int e = 0; e < n; e++) total += loads[e];
            for (int e = 0; e < n; e++)
                fprintf(out, "%.0f\t%d\t%.5f\n", step, e, total > 0 ? loads[e] / total : 0);
            fputc('\n', out);
            fprintf(k_out, "%.0f\t%.4f\n", step, mean_k);
            *last_step = step > *last_step ? step : *last_step;
        }
        fputs("\n\n", out);
        fputs("\n\n", k_out);
    }
    int failed = fclose(out) != 0;
    failed |= fclose(k_out) != 0;
    if (failed) return CM_ERR(CM_ERR_IO, "%s: cannot write the routing data", path);
    return CM_OK;
}

/* From the "moe" lines: RUN_DIR/moe-load.png (per MoE layer, a heatmap of
 * the share of routed tokens each expert got, over training) and
 * RUN_DIR/moe-k.png (activated experts per token, per layer, over training).
 * Does nothing for a dense run. */
static cm_status plot_routing(const char *run_dir, FILE *in) {
    int layers[PLOT_MAX_LAYERS], n_layers = 0, n_experts = 0;
    char line[LINE_CAPACITY], path[PATH_CAPACITY];
    double loads[PLOT_MAX_EXPERTS];
    rewind(in);
    while (fgets(line, sizeof line, in)) {
        double layer;
        if (!metrics_is_kind(line, "moe") || !metrics_find_number(line, "layer", &layer)) continue;
        bool known = false;
        for (int i = 0; i < n_layers; i++) known = known || layers[i] == (int)layer;
        if (!known && n_layers < PLOT_MAX_LAYERS) layers[n_layers++] = (int)layer;
        int n = parse_loads(line, loads, PLOT_MAX_EXPERTS);
        n_experts = n > n_experts ? n : n_experts;
    }
    if (n_layers == 0 || n_experts == 0) return CM_OK;

    char k_path[PATH_CAPACITY];
    snprintf(path, sizeof path, "%s/moe-routing.tsv", run_dir);
    snprintf(k_path, sizeof k_path, "%s/moe-k.tsv", run_dir);
    double last_step = 0;
    CM_TRY(write_routing_data(in, layers, n_layers, path, k_path, &last_step));

    FILE *gnuplot = popen("gnuplot >/dev/null 2>&1", "w");
    if (!gnuplot) return CM_ERR(CM_ERR_IO, "cannot start gnuplot: %s", strerror(errno));
    fprintf(gnuplot,
            "set terminal pngcairo size 900,%d font ',9'\n"
            "set output '%s/moe-load.png'\n"
            "set multiplot layout %d,1 title 'cmoe: share of routed tokens per expert'\n"
            "set palette defined (0 'white', 1 '#4477aa', 2 '#cc3311')\n"
            "set cbrange [0:*]\nset ylabel 'expert'\nset yrange [-0.5:%d.5]\n"
            "set xrange [0:%.0f]\n",
            220 * n_layers + 60, run_dir, n_layers, n_experts - 1, last_step * 1.02);
    for (int i = 0; i < n_layers; i++)
        fprintf(gnuplot,
                "set title 'layer %d' offset 0,-0.8\n%s"
                "plot '%s' index %d using 1:2:3 with image notitle\n",
                layers[i], i == n_layers - 1 ? "set xlabel 'step'\n" : "", path, i);
    fprintf(gnuplot,
            "unset multiplot\n"
            "set terminal pngcairo size 900,480 font ',10'\n"
            "set output '%s/moe-k.png'\n"
            "set title 'cmoe: activated experts per token'\nset xlabel 'step'\n"
            "set ylabel 'mean k'\nset autoscale\nset yrange [0:*]\nset grid\nset key top right\n"
            "plot ",
            run_dir);
    for (int i = 0; i < n_layers; i++)
        fprintf(gnuplot, "%s'%s' index %d using 1:2 with lines lw 2 title 'layer %d'",
                i ? ", " : "", k_path, i, layers[i]);
    fprintf(gnuplot, "\n");
    int status = pclose(gnuplot);
    if (status != 0)
        return CM_ERR(CM_ERR_IO, "gnuplot failed (exit status %d) plotting routing in %s", status,
                      run_dir);
    return CM_OK;
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
    cm_status routing = plot_routing(run_dir, in);
    fclose(in);
    CM_TRY(routing);
    fclose(train);
    fclose(valid);
    if (n_train == 0)
        return CM_ERR(CM_ERR_INVALID, "%s: no training steps with a bpc value to plot", path);

    FILE *gnuplot = popen("gnuplot >/dev/null 2>&1", "w");
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
    FILE *gnuplot = popen("gnuplot >/dev/null 2>&1", "w");
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
