#include "train/metrics.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "common/check.h"
#include "common/gnuplot.h"

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

/* Rewrites `path` keeping only the whole lines whose step is <= last_step.
 * A last line without its newline (the write that stopped the run, e.g. on a
 * full disk) is dropped: appending after it would join two records. Lines of
 * any length (getline): a fixed buffer would split a long line, and the parts
 * without a step would be kept. */
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
    char *line = NULL;
    size_t capacity = 0;
    ssize_t length;
    while ((length = getline(&line, &capacity, in)) > 0) {
        double step;
        if (line[length - 1] != '\n') break; /* cut short: the last line */
        if (metrics_find_number(line, "step", &step) && step > (double)last_step) continue;
        fputs(line, out);
    }
    free(line);
    fclose(in);
    if (fclose(out) != 0 || rename(temporary, path) != 0)
        return CM_ERR(CM_ERR_IO, "%s: cannot rewrite: %s", path, strerror(errno));
    return CM_OK;
}

bool metrics_has_line(const cm_metrics *metrics, const char *kind, int64_t step) {
    FILE *in = metrics->file ? fopen(metrics->path, "r") : NULL;
    if (!in) return false;
    char *line = NULL;
    size_t capacity = 0;
    ssize_t length;
    bool found = false;
    while (!found && (length = getline(&line, &capacity, in)) > 0) {
        double at;
        found = line[length - 1] == '\n' && metrics_is_kind(line, kind) &&
                metrics_find_number(line, "step", &at) && at == (double)step;
    }
    free(line);
    fclose(in);
    return found;
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

/* ---- plots ---------------------------------------------------------------------------
 *
 * Every plot is a gnuplot script written into the run directory beside its
 * data (NAME.gp, rerunnable with `cd RUN_DIR && gnuplot NAME.gp`) and run by
 * gnuplot in a child process whose working directory is the run directory.
 * The scripts name their files relative to it, so no directory path is ever
 * interpolated into gnuplot (or shell) text; the titles show only a sanitized
 * run name. */

/* The last component of `dir`, sanitized. */
static void run_name(const char *dir, char *out, size_t size) {
    char copy[PATH_CAPACITY];
    snprintf(copy, sizeof copy, "%s", dir);
    size_t length = strlen(copy);
    while (length > 1 && copy[length - 1] == '/') copy[--length] = '\0';
    const char *slash = strrchr(copy, '/');
    gnuplot_sanitize(slash && slash[1] ? slash + 1 : copy, out, size);
}

/* Copies (step, value of `key`) of every `kind` line into a TSV; returns the count. */
static int extract(FILE *in, const char *kind, const char *key, FILE *out) {
    rewind(in);
    char line[LINE_CAPACITY];
    int count = 0;
    while (fgets(line, sizeof line, in)) {
        double step, value;
        if (!metrics_is_kind(line, kind)) continue;
        if (!metrics_find_number(line, "step", &step) || !metrics_find_number(line, key, &value))
            continue;
        fprintf(out, "%.0f\t%.6f\n", step, value);
        count++;
    }
    return count;
}

enum { PLOT_MAX_LAYERS = 64, PLOT_MAX_EXPERTS = 256 };

/* The routing lines one heatmap plot reads: the LM's "moe" lines (one per
 * MoE layer) or the MoE-CNN's "moe_cnn" lines (one per router). */
typedef struct routing_lines {
    const char *kind;  /* "moe", "moe_cnn" */
    const char *id;    /* the key telling the panels apart: "layer", "router" */
    const char *loads; /* the array of counts per expert */
    const char *what;  /* "layer", "router": panel titles */
} routing_lines;

static const routing_lines lm_routing = {"moe", "layer", "tokens_per_expert", "layer"};
static const routing_lines cnn_routing = {"moe_cnn", "router", "images_per_expert", "router"};

/* The numbers of the "KEY": [...] array of a line. */
static int parse_loads(const char *line, const char *key, double *loads, int capacity) {
    char pattern[128];
    snprintf(pattern, sizeof pattern, "\"%s\": [", key);
    const char *at = strstr(line, pattern);
    if (!at) return 0;
    at += strlen(pattern);
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

/* The panels (ids, in order of appearance) and the most experts of a line. */
static void find_panels(FILE *in, const routing_lines *src, int *ids, int *n_ids, int *n_experts) {
    char line[LINE_CAPACITY];
    double loads[PLOT_MAX_EXPERTS];
    *n_ids = *n_experts = 0;
    rewind(in);
    while (fgets(line, sizeof line, in)) {
        double id;
        if (!metrics_is_kind(line, src->kind) || !metrics_find_number(line, src->id, &id)) continue;
        bool known = false;
        for (int i = 0; i < *n_ids; i++) known = known || ids[i] == (int)id;
        if (!known && *n_ids < PLOT_MAX_LAYERS) ids[(*n_ids)++] = (int)id;
        int n = parse_loads(line, src->loads, loads, PLOT_MAX_EXPERTS);
        *n_experts = n > *n_experts ? n : *n_experts;
    }
}

/* One gnuplot data block per panel (index i): `out` gets rows "step expert
 * share" with a blank line after each step (a grid for `with image`);
 * `k_out` (the LM: may be NULL) rows "step mean_k". */
static void write_routing_data(FILE *in, const routing_lines *src, const int *ids, int n_ids,
                               FILE *out, FILE *k_out, double *last_step) {
    char line[LINE_CAPACITY];
    double loads[PLOT_MAX_EXPERTS];
    for (int i = 0; i < n_ids; i++) {
        rewind(in);
        while (fgets(line, sizeof line, in)) {
            double id, step, mean_k = 0;
            if (!metrics_is_kind(line, src->kind) || !metrics_find_number(line, src->id, &id) ||
                (int)id != ids[i] || !metrics_find_number(line, "step", &step) ||
                (k_out && !metrics_find_number(line, "mean_k", &mean_k)))
                continue;
            int n = parse_loads(line, src->loads, loads, PLOT_MAX_EXPERTS);
            double total = 0;
            for (int e = 0; e < n; e++) total += loads[e];
            for (int e = 0; e < n; e++)
                fprintf(out, "%.0f\t%d\t%.5f\n", step, e, total > 0 ? loads[e] / total : 0);
            fputc('\n', out);
            if (k_out) fprintf(k_out, "%.0f\t%.4f\n", step, mean_k);
            *last_step = step > *last_step ? step : *last_step;
        }
        fputs("\n\n", out);
        if (k_out) fputs("\n\n", k_out);
    }
}

/* The heatmap panels of `src` into `gp` (one per id, stacked), PNG `png`,
 * data `data` (names relative to the run directory). */
static void write_heatmaps(FILE *gp, const routing_lines *src, const int *ids, int n_ids,
                           int n_experts, double last_step, const char *png, const char *data,
                           const char *title) {
    fprintf(gp,
            "set terminal pngcairo size 900,%d font ',9'\n"
            "set output '%s'\n"
            "set multiplot layout %d,1 title '%s'\n"
            "set palette defined (0 'white', 1 '#4477aa', 2 '#cc3311')\n"
            "set cbrange [0:*]\nset ylabel 'expert'\nset yrange [-0.5:%d.5]\n"
            "set xrange [0:%.0f]\n",
            220 * n_ids + 60, png, n_ids, title, n_experts - 1, last_step * 1.02);
    for (int i = 0; i < n_ids; i++)
        fprintf(gp,
                "set title '%s %d' offset 0,-0.8\n%s"
                "plot '%s' index %d using 1:2:3 with image notitle\n",
                src->what, ids[i], i == n_ids - 1 ? "set xlabel 'step'\n" : "", data, i);
    fprintf(gp, "unset multiplot\n");
}

/* From the LM's "moe" lines: RUN_DIR/moe-load.png (per MoE layer, a heatmap
 * of the share of routed tokens each expert got, over training) and
 * RUN_DIR/moe-k.png (activated experts per token, per layer, over
 * training). Does nothing for a run without them. */
static cm_status plot_routing(const char *run_dir, FILE *in) {
    int layers[PLOT_MAX_LAYERS], n_layers, n_experts;
    find_panels(in, &lm_routing, layers, &n_layers, &n_experts);
    if (n_layers == 0 || n_experts == 0) return CM_OK;
    FILE *data, *k_data, *gp;
    double last_step = 0;
    CM_TRY(gnuplot_open(run_dir, "moe-routing.tsv", &data));
    cm_status status = gnuplot_open(run_dir, "moe-k.tsv", &k_data);
    if (status != CM_OK) {
        fclose(data);
        return status;
    }
    write_routing_data(in, &lm_routing, layers, n_layers, data, k_data, &last_step);
    int failed = fclose(data) != 0;
    failed |= fclose(k_data) != 0;
    if (failed) return CM_ERR(CM_ERR_IO, "%s: cannot write the routing data", run_dir);

    CM_TRY(gnuplot_open(run_dir, "moe-load.gp", &gp));
    write_heatmaps(gp, &lm_routing, layers, n_layers, n_experts, last_step, "moe-load.png",
                   "moe-routing.tsv", "cmoe: share of routed tokens per expert");
    fprintf(gp,
            "set terminal pngcairo size 900,480 font ',10'\n"
            "set output 'moe-k.png'\n"
            "set title 'cmoe: activated experts per token'\nset xlabel 'step'\n"
            "set ylabel 'mean k'\nset autoscale\nset yrange [0:*]\nset grid\nset key top right\n"
            "plot ");
    for (int i = 0; i < n_layers; i++)
        fprintf(gp, "%s'moe-k.tsv' index %d using 1:2 with lines lw 2 title 'layer %d'",
                i ? ", " : "", i, layers[i]);
    fprintf(gp, "\n");
    return gnuplot_run(run_dir, "moe-load.gp", gp, "moe-load.png");
}

/* From the MoE-CNN's "moe_cnn" lines: RUN_DIR/moe-cnn-load.png, per router
 * a heatmap of the share of the training images (of each log window) each
 * expert got, over training. Does nothing for a run without them. */
static cm_status plot_cnn_routing(const char *run_dir, FILE *in) {
    int routers[PLOT_MAX_LAYERS], n_routers, n_experts;
    find_panels(in, &cnn_routing, routers, &n_routers, &n_experts);
    if (n_routers == 0 || n_experts == 0) return CM_OK;
    FILE *data, *gp;
    double last_step = 0;
    CM_TRY(gnuplot_open(run_dir, "moe-cnn-routing.tsv", &data));
    write_routing_data(in, &cnn_routing, routers, n_routers, data, NULL, &last_step);
    if (fclose(data) != 0) return CM_ERR(CM_ERR_IO, "%s: cannot write the routing data", run_dir);
    CM_TRY(gnuplot_open(run_dir, "moe-cnn-load.gp", &gp));
    write_heatmaps(gp, &cnn_routing, routers, n_routers, n_experts, last_step, "moe-cnn-load.png",
                   "moe-cnn-routing.tsv", "cmoe: share of training images per expert");
    return gnuplot_run(run_dir, "moe-cnn-load.gp", gp, "moe-cnn-load.png");
}

cm_status metrics_plot(const char *run_dir) {
    char path[PATH_CAPACITY], name[256];
    snprintf(path, sizeof path, "%s/metrics.jsonl", run_dir);
    FILE *in = fopen(path, "r");
    if (!in) return CM_ERR(CM_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    FILE *train = NULL, *valid = NULL;
    cm_status status = gnuplot_open(run_dir, "curves-train.tsv", &train);
    if (status == CM_OK) status = gnuplot_open(run_dir, "curves-valid.tsv", &valid);
    if (status != CM_OK) {
        fclose(in);
        if (train) fclose(train);
        return status;
    }
    /* Bits per byte (the LM); a run without them (the image classifier):
     * the training loss. */
    const char *key = "bpc", *label = "bits per byte";
    int n_train = extract(in, "train", key, train), n_valid = 0;
    if (n_train == 0) {
        key = "loss";
        label = "training loss";
        n_train = extract(in, "train", key, train);
    } else {
        n_valid = extract(in, "valid", key, valid);
    }
    status = plot_routing(run_dir, in);
    if (status == CM_OK) status = plot_cnn_routing(run_dir, in);
    fclose(in);
    int failed = fclose(train) != 0;
    failed |= fclose(valid) != 0;
    CM_TRY(status);
    if (failed) return CM_ERR(CM_ERR_IO, "%s: cannot write the curve data", run_dir);
    if (n_train == 0)
        return CM_ERR(CM_ERR_INVALID, "%s: no training steps with a bpc or loss value to plot",
                      path);

    FILE *gp;
    CM_TRY(gnuplot_open(run_dir, "curves.gp", &gp));
    run_name(run_dir, name, sizeof name);
    fprintf(gp,
            "set terminal pngcairo size 900,560 font ',10'\n"
            "set output 'curves.png'\n"
            "set title 'cmoe: %s'\n"
            "set xlabel 'step'\nset ylabel '%s'\n"
            "set grid\nset key top right\n",
            name, label);
    fprintf(gp, "plot 'curves-train.tsv' using 1:2 with lines lw 1 lc rgb '#4477aa' title 'train'");
    if (n_valid > 0)
        fprintf(gp, ", 'curves-valid.tsv' using 1:2 with linespoints pt 7 ps 0.6 lw 2 "
                    "lc rgb '#cc3311' title 'validation'");
    fprintf(gp, "\n");
    return gnuplot_run(run_dir, "curves.gp", gp, "curves.png");
}

cm_status metrics_plot_k_sweep(const char *dir, const int *ks, const double *bpc, int n,
                               const char *title) {
    FILE *tsv, *gp;
    CM_TRY(gnuplot_open(dir, "k-sweep.tsv", &tsv));
    fprintf(tsv, "# k\tbpc\n");
    for (int i = 0; i < n; i++) fprintf(tsv, "%d\t%.6f\n", ks[i], bpc[i]);
    if (fclose(tsv) != 0) return CM_ERR(CM_ERR_IO, "%s/k-sweep.tsv: cannot write", dir);
    char safe[512];
    gnuplot_sanitize(title, safe, sizeof safe);
    CM_TRY(gnuplot_open(dir, "k-sweep.gp", &gp));
    fprintf(gp,
            "set terminal pngcairo size 720,480 font ',10'\n"
            "set output 'k-sweep.png'\n"
            "set title 'cmoe: %s'\n"
            "set xlabel 'experts per token at evaluation (k)'\nset ylabel 'bits per byte'\n"
            "set logscale x 2\nset grid\nset key off\n"
            "plot 'k-sweep.tsv' using 1:2 with linespoints pt 7 lw 2 lc rgb '#4477aa'\n",
            safe);
    return gnuplot_run(dir, "k-sweep.gp", gp, "k-sweep.png");
}
