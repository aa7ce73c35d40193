#include "study/report.h"

#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "common/fs.h"
#include "common/gnuplot.h"
#include "train/metrics.h"

enum {
    PATH_CAPACITY = 4096,
    CELL_CAPACITY = 8192,
    TITLE_CAPACITY = 512,
    MAX_PLOTS = STUDY_MAX_SWEEPS + 2,
    MAX_POINTS = STUDY_MAX_METRICS, /* a sweep has at most STUDY_MAX_VALUES */
};

/* ---- statistics ---------------------------------------------------------------------- */

/* The 0.975 quantile of Student's t for df = 1..30. */
static const double t975_small[30] = {12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912,
                                      2.364624,  2.306004, 2.262157, 2.228139, 2.200985, 2.178813,
                                      2.160369,  2.144787, 2.131450, 2.119905, 2.109816, 2.100922,
                                      2.093024,  2.085963, 2.079614, 2.073873, 2.068658, 2.063899,
                                      2.059539,  2.055529, 2.051831, 2.048407, 2.045230, 2.042272};

double study_t975(int df) {
    if (df < 1) return NAN;
    if (df <= 30) return t975_small[df - 1];
    /* Beyond 30 the quantile is close to linear in 1/df: interpolate between
     * df = 30, 40, 60, 120 and infinity (the normal quantile). */
    static const double dfs[] = {30, 40, 60, 120},
                        ts[] = {2.042272, 2.021075, 2.000298, 1.979930, 1.959964};
    const double inverse = 1.0 / df;
    for (int i = 0; i < 4; i++) {
        const double upper = 1.0 / dfs[i], lower = i < 3 ? 1.0 / dfs[i + 1] : 0.0;
        if (inverse >= lower)
            return ts[i + 1] + (ts[i] - ts[i + 1]) * (inverse - lower) / (upper - lower);
    }
    return ts[4];
}

study_summary study_summarize(const double *x, int n) {
    study_summary summary = {.n = 0, .mean = NAN, .sd = NAN, .lo = -INFINITY, .hi = INFINITY};
    double sum = 0;
    for (int i = 0; i < n; i++) {
        if (!isfinite(x[i])) continue;
        sum += x[i];
        summary.n++;
    }
    if (summary.n == 0) return summary;
    summary.mean = sum / summary.n;
    if (summary.n < 2) return summary;
    double squares = 0;
    for (int i = 0; i < n; i++)
        if (isfinite(x[i])) squares += (x[i] - summary.mean) * (x[i] - summary.mean);
    summary.sd = sqrt(squares / (summary.n - 1));
    const double half_width = study_t975(summary.n - 1) * summary.sd / sqrt(summary.n);
    summary.lo = summary.mean - half_width;
    summary.hi = summary.mean + half_width;
    return summary;
}

study_verdict study_test_verdict(const study_summary *difference, study_direction direction,
                                 double margin) {
    const double lo = difference->lo, hi = difference->hi;
    if (difference->n == 0 || isnan(lo) || isnan(hi)) return STUDY_INCONCLUSIVE;
    if (direction == STUDY_LESS) {
        if (hi < margin) return STUDY_REPRODUCED;
        if (lo >= margin) return STUDY_CONTRADICTED;
    } else {
        if (lo > -margin) return STUDY_REPRODUCED;
        if (hi <= -margin) return STUDY_CONTRADICTED;
    }
    return STUDY_INCONCLUSIVE;
}

const char *study_verdict_name(study_verdict verdict) {
    switch (verdict) {
    case STUDY_REPRODUCED:
        return "reproduced";
    case STUDY_CONTRADICTED:
        return "contradicted";
    case STUDY_INCONCLUSIVE:
        return "inconclusive";
    }
    return "unknown";
}

static int seed_count(const study_results *r) {
    if (r->n_seeds < 0) return 0;
    return r->n_seeds < STUDY_MAX_SEEDS ? r->n_seeds : STUDY_MAX_SEEDS;
}

void study_test_differences(const study_results *r, const study_test *test, double *out) {
    for (int seed = 0; seed < seed_count(r); seed++) {
        const double left = r->values[test->left_arm][test->left_metric][seed];
        const double right = test->right_arm < 0
                                 ? test->right_value
                                 : r->values[test->right_arm][test->right_metric][seed];
        out[seed] = isfinite(left) && isfinite(right) ? left - right : NAN;
    }
}

/* A test's summary of differences and verdict: inconclusive when a seed's
 * value is missing. */
static study_verdict test_outcome(const study_results *r, const study_test *test,
                                  study_summary *summary) {
    double differences[STUDY_MAX_SEEDS];
    study_test_differences(r, test, differences);
    *summary = study_summarize(differences, seed_count(r));
    if (summary->n == 0 || summary->n < seed_count(r)) return STUDY_INCONCLUSIVE;
    return study_test_verdict(summary, test->direction, test->margin);
}

study_verdict study_claim_verdict(const study_results *r, const study_claim *claim) {
    if (claim->n_tests == 0) return STUDY_INCONCLUSIVE; /* nothing was tested */
    bool all_reproduced = true;
    for (int t = 0; t < claim->n_tests; t++) {
        study_summary summary;
        const study_verdict verdict = test_outcome(r, &claim->tests[t], &summary);
        if (verdict == STUDY_CONTRADICTED) return STUDY_CONTRADICTED;
        all_reproduced = all_reproduced && verdict == STUDY_REPRODUCED;
    }
    return all_reproduced ? STUDY_REPRODUCED : STUDY_INCONCLUSIVE;
}

/* ---- text ------------------------------------------------------------------------------ */

/* A bounded string being built (silently truncated at its capacity). */
typedef struct text_buffer {
    char data[CELL_CAPACITY];
    size_t length;
} text_buffer;

static void text_add(text_buffer *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void text_add(text_buffer *t, const char *fmt, ...) {
    if (t->length + 1 >= sizeof t->data) return;
    va_list args;
    va_start(args, fmt);
    const int written = vsnprintf(t->data + t->length, sizeof t->data - t->length, fmt, args);
    va_end(args);
    if (written > 0) t->length += (size_t)written;
    if (t->length >= sizeof t->data) t->length = sizeof t->data - 1;
}

/* 4 decimals; 4 significant digits for very large or small magnitudes
 * (FLOPs, learning rates); "–" for a missing value. */
static void text_number(text_buffer *t, double x) {
    if (isnan(x))
        text_add(t, "–");
    else if (isinf(x))
        text_add(t, x > 0 ? "∞" : "−∞");
    else if (x != 0 && (fabs(x) >= 1e5 || fabs(x) < 1e-3))
        text_add(t, "%.4g", x);
    else
        text_add(t, "%.4f", x);
}

/* "[lo, hi]" */
static void text_interval(text_buffer *t, double lo, double hi) {
    text_add(t, "[");
    text_number(t, lo);
    text_add(t, ", ");
    text_number(t, hi);
    text_add(t, "]");
}

static void text_operand(text_buffer *t, const study *s, int arm, int metric, double number) {
    if (arm < 0)
        text_number(t, number);
    else
        text_add(t, "%s:%s", s->arms[arm].name, s->metrics[metric].text);
}

/* Per test "L − R = mean [lo, hi]", joined by "; ". */
static void claim_ours(const study_results *r, const study_claim *claim, text_buffer *t) {
    for (int i = 0; i < claim->n_tests; i++) {
        const study_test *test = &claim->tests[i];
        study_summary d;
        test_outcome(r, test, &d);
        if (i > 0) text_add(t, "; ");
        text_operand(t, r->s, test->left_arm, test->left_metric, 0);
        text_add(t, " − ");
        text_operand(t, r->s, test->right_arm, test->right_metric, test->right_value);
        text_add(t, " = ");
        text_number(t, d.mean);
        text_add(t, " ");
        text_interval(t, d.lo, d.hi);
        if (test->margin != 0) {
            text_add(t, " ± ");
            text_number(t, test->margin);
        }
        if (d.n < seed_count(r)) text_add(t, " (%d of %d seeds)", d.n, seed_count(r));
    }
}

/* A markdown table cell: '|' escaped, line breaks and tabs as spaces. */
static void write_cell(FILE *out, const char *cell) {
    for (const char *c = cell; *c; c++) {
        if (*c == '|')
            fputs("\\|", out);
        else
            fputc(*c == '\n' || *c == '\r' || *c == '\t' ? ' ' : *c, out);
    }
}

/* `before`, then the cell. */
static void write_cell_after(FILE *out, const char *before, const char *cell) {
    fputs(before, out);
    write_cell(out, cell);
}

/* A TSV field: tabs and line breaks as spaces. */
static void write_field(FILE *out, const char *field, const char *after) {
    for (const char *c = field; *c; c++)
        fputc(*c == '\n' || *c == '\r' || *c == '\t' ? ' ' : *c, out);
    fputs(after, out);
}

/* ---- files ----------------------------------------------------------------------------- */

static cm_status finish_file(FILE *file, const char *dir, const char *name) {
    errno = 0;
    int failed = ferror(file);
    failed |= fclose(file) != 0;
    if (failed)
        return CM_ERR(CM_ERR_IO, "%s/%s: cannot write: %s", dir, name,
                      errno ? strerror(errno) : "write error");
    return CM_OK;
}

static cm_status join_path(char *out, const char *dir, const char *name) {
    if (snprintf(out, PATH_CAPACITY, "%s/%s", dir, name) >= PATH_CAPACITY)
        return CM_ERR(CM_ERR_INVALID, "%s/%s: path too long", dir, name);
    return CM_OK;
}

/* ---- plots ----------------------------------------------------------------------------- */

/* The PNGs written into REPORT_DIR/NAME, for the report's Plots section. */
typedef struct plot_list {
    char png[MAX_PLOTS][STUDY_NAME_CAP * 2];
    int count;
} plot_list;

/* One colour per arm, the same in every plot. */
static const char *const arm_colors[STUDY_MAX_ARMS] = {"#4477aa", "#cc3311", "#228833", "#ccbb44",
                                                       "#66ccee", "#aa3377", "#555555", "#ee7733",
                                                       "#0077bb", "#009988", "#ee3377", "#999933"};

static void script_header(FILE *gp, const char *png, const char *title, const char *xlabel,
                          const char *ylabel) {
    char safe_title[TITLE_CAPACITY], safe_x[TITLE_CAPACITY], safe_y[TITLE_CAPACITY];
    gnuplot_sanitize(title, safe_title, sizeof safe_title);
    gnuplot_sanitize(xlabel, safe_x, sizeof safe_x);
    gnuplot_sanitize(ylabel, safe_y, sizeof safe_y);
    fprintf(gp,
            "set terminal pngcairo size 900,560 font ',10' noenhanced\n"
            "set output '%s'\n"
            "set title 'cmoe study %s'\n"
            "set xlabel '%s'\nset ylabel '%s'\n"
            "set grid\nset key outside right top\n",
            png, safe_title, safe_x, safe_y);
}

/* Runs STEM.gp in dir and records STEM.png. */
static cm_status run_plot(const char *dir, const char *stem, FILE *gp, plot_list *plots) {
    char script[STUDY_NAME_CAP * 2], png[STUDY_NAME_CAP * 2];
    snprintf(script, sizeof script, "%s.gp", stem);
    snprintf(png, sizeof png, "%s.png", stem);
    CM_TRY(gnuplot_run(dir, script, gp, png));
    snprintf(plots->png[plots->count++], sizeof plots->png[0], "%s", png);
    return CM_OK;
}

/* ---- learning curves: mean and sd over seeds, per step ---- */

typedef struct curve_point {
    double step, value;
} curve_point;

typedef struct curve {
    curve_point *points;
    int count, capacity;
} curve;

static cm_status curve_add(curve *c, double step, double value) {
    if (c->count == c->capacity) {
        const int capacity = c->capacity ? 2 * c->capacity : 256;
        curve_point *grown = realloc(c->points, (size_t)capacity * sizeof *grown);
        if (!grown) return CM_ERR(CM_ERR_NOMEM, "no memory for %d curve points", capacity);
        c->points = grown;
        c->capacity = capacity;
    }
    c->points[c->count++] = (curve_point){step, value};
    return CM_OK;
}

/* Appends the (step, value) of run_dir/metrics.jsonl's curve lines; a run
 * without the file adds nothing. */
static cm_status read_run_curve(const study *s, const char *run_dir, curve *c) {
    char path[PATH_CAPACITY];
    if (!run_dir[0]) return CM_OK;
    CM_TRY(join_path(path, run_dir, "metrics.jsonl"));
    FILE *in = fopen(path, "r");
    if (!in) return CM_OK;
    char *line = NULL;
    size_t capacity = 0;
    cm_status status = CM_OK;
    while (status == CM_OK && getline(&line, &capacity, in) >= 0) {
        double step, value;
        if (metrics_is_kind(line, s->curve_kind) && metrics_find_number(line, "step", &step) &&
            metrics_find_number(line, s->curve_field, &value) && isfinite(value))
            status = curve_add(c, step, value);
    }
    if (status == CM_OK && ferror(in)) status = CM_ERR(CM_ERR_IO, "%s: cannot read", path);
    free(line);
    fclose(in);
    return status;
}

static int compare_steps(const void *a, const void *b) {
    const double x = ((const curve_point *)a)->step, y = ((const curve_point *)b)->step;
    return (x > y) - (x < y);
}

/* One gnuplot data block "step mean mean-sd mean+sd" (a single seed: no band). */
static cm_status write_curve_block(FILE *out, curve *c) {
    qsort(c->points, (size_t)c->count, sizeof *c->points, compare_steps);
    double *values = malloc((size_t)c->count * sizeof *values);
    if (!values) return CM_ERR(CM_ERR_NOMEM, "no memory for %d curve points", c->count);
    for (int i = 0; i < c->count; i++) values[i] = c->points[i].value;
    for (int start = 0, end; start < c->count; start = end) {
        for (end = start + 1; end < c->count && c->points[end].step == c->points[start].step;)
            end++;
        const study_summary at = study_summarize(values + start, end - start);
        const double spread = isfinite(at.sd) ? at.sd : 0;
        fprintf(out, "%.0f\t%.6g\t%.6g\t%.6g\n", c->points[start].step, at.mean, at.mean - spread,
                at.mean + spread);
    }
    fputs("\n\n", out);
    free(values);
    return CM_OK;
}

/* Writes curves.tsv (a block per arm with a curve); arms[] gets those arms. */
static cm_status write_curves_data(const study_results *r, const char *dir, int *arms,
                                   int *n_arms) {
    FILE *data;
    CM_TRY(gnuplot_open(dir, "curves.tsv", &data));
    curve c = {0};
    cm_status status = CM_OK;
    *n_arms = 0;
    for (int a = 0; a < r->s->n_arms && status == CM_OK; a++) {
        c.count = 0;
        for (int seed = 0; seed < seed_count(r) && status == CM_OK; seed++)
            status = read_run_curve(r->s, r->run_dir[a][seed], &c);
        if (status == CM_OK && c.count > 0) {
            status = write_curve_block(data, &c);
            arms[(*n_arms)++] = a;
        }
    }
    free(c.points);
    const cm_status closed = finish_file(data, dir, "curves.tsv");
    return status != CM_OK ? status : closed;
}

/* curves.png: per arm the mean learning curve with a band of +- one sd over seeds. */
static cm_status plot_curves(const study_results *r, const char *dir, plot_list *plots) {
    const study *s = r->s;
    int arms[STUDY_MAX_ARMS], n_arms;
    if (!s->curve_kind[0] || !s->curve_field[0]) return CM_OK;
    CM_TRY(write_curves_data(r, dir, arms, &n_arms));
    if (n_arms == 0) return CM_OK;
    FILE *gp;
    char title[TITLE_CAPACITY], label[TITLE_CAPACITY];
    snprintf(title, sizeof title, "%s, %s %s, mean +- sd over seeds", s->name, s->curve_kind,
             s->curve_field);
    snprintf(label, sizeof label, "%s %s", s->curve_kind, s->curve_field);
    CM_TRY(gnuplot_open(dir, "curves.gp", &gp));
    script_header(gp, "curves.png", title, "step", label);
    fputs("set style fill transparent solid 0.2 noborder\nplot ", gp);
    for (int i = 0; i < n_arms; i++) {
        char name[STUDY_NAME_CAP];
        gnuplot_sanitize(s->arms[arms[i]].name, name, sizeof name);
        const char *color = arm_colors[arms[i] % STUDY_MAX_ARMS];
        fprintf(gp,
                "%s'curves.tsv' index %d using 1:3:4 with filledcurves lc rgb '%s' notitle, "
                "'curves.tsv' index %d using 1:2 with lines lw 2 lc rgb '%s' title '%s'",
                i ? ", \\\n     " : "", i, color, i, color, name);
    }
    fputc('\n', gp);
    return run_plot(dir, "curves", gp, plots);
}

/* ---- sweeps and layers: a metric's mean and 95% CI per point, per arm ---- */

typedef struct series {
    char stem[STUDY_NAME_CAP + 16]; /* STEM.tsv, STEM.gp, STEM.png */
    char title[TITLE_CAPACITY], xlabel[TITLE_CAPACITY], ylabel[TITLE_CAPACITY];
    int n_points;
    double x[MAX_POINTS];
    int metric[MAX_POINTS];
    const char *labels[MAX_POINTS]; /* xtics; NULL: numeric x */
    const bool *arms;               /* the arms plotted; NULL: all */
} series;

/* Rows "x mean half-width" of arm a's points with a value; true when any. */
static bool write_series_block(FILE *out, const study_results *r, const series *sp, int a) {
    int rows = 0;
    for (int j = 0; j < sp->n_points; j++) {
        const study_summary at = study_summarize(r->values[a][sp->metric[j]], seed_count(r));
        if (at.n == 0) continue;
        const double half_width = at.n >= 2 ? (at.hi - at.lo) / 2 : 0;
        fprintf(out, "%.6g\t%.6g\t%.6g\n", sp->x[j], at.mean, half_width);
        rows++;
    }
    if (rows > 0) fputs("\n\n", out);
    return rows > 0;
}

static void write_xtics(FILE *gp, const series *sp) {
    if (!sp->labels[0]) return;
    fputs("set xtics (", gp);
    for (int j = 0; j < sp->n_points; j++) {
        char label[STUDY_NAME_CAP];
        gnuplot_sanitize(sp->labels[j], label, sizeof label);
        fprintf(gp, "%s'%s' %g", j ? ", " : "", label, sp->x[j]);
    }
    fputs(")\n", gp);
}

static cm_status plot_series(const study_results *r, const char *dir, const series *sp,
                             plot_list *plots) {
    char data_name[sizeof sp->stem + 8], script[sizeof sp->stem + 8];
    int arms[STUDY_MAX_ARMS], n_arms = 0;
    FILE *data, *gp;
    if (sp->n_points == 0) return CM_OK;
    snprintf(data_name, sizeof data_name, "%s.tsv", sp->stem);
    snprintf(script, sizeof script, "%s.gp", sp->stem);
    CM_TRY(gnuplot_open(dir, data_name, &data));
    for (int a = 0; a < r->s->n_arms; a++)
        if ((!sp->arms || sp->arms[a]) && write_series_block(data, r, sp, a)) arms[n_arms++] = a;
    CM_TRY(finish_file(data, dir, data_name));
    if (n_arms == 0) return CM_OK;
    char png[sizeof sp->stem + 8];
    snprintf(png, sizeof png, "%s.png", sp->stem);
    CM_TRY(gnuplot_open(dir, script, &gp));
    script_header(gp, png, sp->title, sp->xlabel, sp->ylabel);
    write_xtics(gp, sp);
    fputs("set offsets graph 0.05, graph 0.05, 0, 0\nplot ", gp);
    for (int i = 0; i < n_arms; i++) {
        char name[STUDY_NAME_CAP];
        gnuplot_sanitize(r->s->arms[arms[i]].name, name, sizeof name);
        fprintf(gp, "%s'%s' index %d using 1:2:3 with yerrorlines lw 2 pt 7 lc rgb '%s' title '%s'",
                i ? ", \\\n     " : "", data_name, i, arm_colors[arms[i] % STUDY_MAX_ARMS], name);
    }
    fputc('\n', gp);
    return run_plot(dir, sp->stem, gp, plots);
}

/* text with every character outside [A-Za-z0-9_-] replaced by '_' (a file name). */
static void file_stem(const char *text, char *out, size_t size) {
    size_t n = 0;
    for (const char *c = text; *c && n + 1 < size; c++)
        out[n++] = strchr("_-", *c) || (*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') ||
                           (*c >= '0' && *c <= '9')
                       ? *c
                       : '_';
    out[n] = '\0';
}

/* sweep-EVAL.png: the metric EVAL=VALUE.FIELD against VALUE. */
static cm_status plot_sweep(const study_results *r, const char *dir, const study_sweep *sweep,
                            plot_list *plots) {
    const study *s = r->s;
    if (sweep->evaluation < 0 || sweep->evaluation >= s->n_evaluations) return CM_OK;
    const study_evaluation *e = &s->evaluations[sweep->evaluation];
    series sp = {.arms = e->arms};
    bool numeric = true;
    for (int v = 0; v < e->n_values; v++)
        numeric = numeric && study_parse_number(e->values[v], &sp.x[0]);
    for (int v = 0; v < e->n_values && sp.n_points < MAX_POINTS; v++) {
        char metric[STUDY_NAME_CAP * 4];
        snprintf(metric, sizeof metric, "%s=%s.%s", e->name, e->values[v], sweep->field);
        const int m = study_find_metric(s, metric);
        if (m < 0) continue;
        sp.metric[sp.n_points] = m;
        if (!numeric || !study_parse_number(e->values[v], &sp.x[sp.n_points])) {
            sp.x[sp.n_points] = v;
            sp.labels[sp.n_points] = e->values[v];
        }
        sp.n_points++;
    }
    char stem[STUDY_NAME_CAP];
    file_stem(e->name, stem, sizeof stem);
    snprintf(sp.stem, sizeof sp.stem, "sweep-%s", stem);
    snprintf(sp.title, sizeof sp.title, "%s, %s, mean and 95 percent CI over seeds", s->name,
             e->name);
    snprintf(sp.xlabel, sizeof sp.xlabel, "%s", e->key);
    snprintf(sp.ylabel, sizeof sp.ylabel, "%s %s", e->split, sweep->field);
    return plot_series(r, dir, &sp, plots);
}

/* layers.png: the metrics SOURCE.FIELD[i] against i. */
static cm_status plot_layers(const study_results *r, const char *dir, plot_list *plots) {
    const study *s = r->s;
    if (s->layers_metric < 0 || s->layers_metric >= s->n_metrics) return CM_OK;
    const char *array = s->metrics[s->layers_metric].text;
    series sp = {.stem = "layers"};
    for (int layer = 0; layer < MAX_POINTS; layer++) {
        char metric[STUDY_NAME_CAP * 4];
        snprintf(metric, sizeof metric, "%s[%d]", array, layer);
        const int m = study_find_metric(s, metric);
        if (m < 0) break;
        sp.metric[sp.n_points] = m;
        sp.x[sp.n_points++] = layer;
    }
    snprintf(sp.title, sizeof sp.title, "%s, %s per layer, mean and 95 percent CI over seeds",
             s->name, array);
    snprintf(sp.xlabel, sizeof sp.xlabel, "layer");
    snprintf(sp.ylabel, sizeof sp.ylabel, "%s", array);
    return plot_series(r, dir, &sp, plots);
}

static cm_status plot_all(const study_results *r, const char *dir, plot_list *plots) {
    CM_TRY(plot_curves(r, dir, plots));
    for (int i = 0; i < r->s->n_sweeps && i < STUDY_MAX_SWEEPS; i++)
        CM_TRY(plot_sweep(r, dir, &r->s->sweeps[i], plots));
    return plot_layers(r, dir, plots);
}

/* ---- REPORT_DIR/NAME.md ------------------------------------------------------------------ */

static void write_how_it_was_run(FILE *out, const study_results *r) {
    const long total = r->wall_seconds > 0 ? (long)(r->wall_seconds + 0.5) : 0;
    fprintf(out, "## How it was run\n\n```\n%s\n```\n\n", r->command);
    fprintf(out, "Preset `%s`, %d seed%s, wall time %ld:%02ld:%02ld", r->preset ? r->preset : "–",
            r->n_seeds, r->n_seeds == 1 ? "" : "s", total / 3600, total / 60 % 60, total % 60);
    fprintf(out, r->machine[0] ? " on %s.\n\n" : ".\n\n", r->machine);
    for (int i = 0; r->preset && i < r->s->n_presets; i++)
        if (strcmp(r->s->presets[i].name, r->preset) == 0 && r->s->presets[i].note[0])
            fprintf(out, "Preset note: %s\n\n", r->s->presets[i].note);
}

/* Each claim's analysis from the study file (what was checked about our
 * number), so it survives every regeneration of the report. */
static void write_analyses(FILE *out, const study *s) {
    bool any = false;
    for (int c = 0; c < s->n_claims; c++) any |= s->claims[c].analysis[0] != '\0';
    if (!any) return;
    fputs("### Analysis\n\n", out);
    for (int c = 0; c < s->n_claims; c++)
        if (s->claims[c].analysis[0])
            fprintf(out, "- **%s**: %s\n", s->claims[c].id, s->claims[c].analysis);
    fputc('\n', out);
}

static void write_claims_table(FILE *out, const study_results *r) {
    fputs("## Claims\n\n"
          "A claim is reproduced when the 95% confidence interval of every test's paired "
          "difference (over seeds) lies on its side of the margin.\n\n"
          "| claim | text | paper's figure | ours | verdict |\n"
          "| --- | --- | --- | --- | --- |\n",
          out);
    for (int c = 0; c < r->s->n_claims; c++) {
        const study_claim *claim = &r->s->claims[c];
        text_buffer ours = {0};
        claim_ours(r, claim, &ours);
        write_cell_after(out, "| ", claim->id);
        write_cell_after(out, " | ", claim->text);
        write_cell_after(out, " | ", claim->paper_figure);
        write_cell_after(out, " | ", ours.data);
        fprintf(out, " | **%s** |\n", study_verdict_name(study_claim_verdict(r, claim)));
    }
    fputc('\n', out);
    write_analyses(out, r->s);
}

/* The row of arm a for metric m: "| arm | n | mean ± sd | [lo, hi] | v1, v2, – |". */
static void write_metric_row(FILE *out, const study_results *r, int a, int m,
                             const study_summary *at) {
    text_buffer mean = {0}, interval = {0}, seeds = {0};
    text_number(&mean, at->mean);
    if (at->n >= 2) {
        text_add(&mean, " ± ");
        text_number(&mean, at->sd);
        text_interval(&interval, at->lo, at->hi);
    } else {
        text_add(&interval, "–");
    }
    for (int seed = 0; seed < seed_count(r); seed++) {
        if (seed > 0) text_add(&seeds, ", ");
        text_number(&seeds, r->values[a][m][seed]);
    }
    write_cell_after(out, "| ", r->s->arms[a].name);
    fprintf(out, " | %d | %s | %s | %s |\n", at->n, mean.data, interval.data, seeds.data);
}

static void write_metrics(FILE *out, const study_results *r) {
    fputs("## Metrics\n\nMean ± sample sd over seeds, the 95% confidence interval of the mean "
          "(Student's t) and the value of each seed.\n\n",
          out);
    for (int m = 0; m < r->s->n_metrics; m++) {
        fprintf(out, "### %s\n\n", r->s->metrics[m].text);
        int rows = 0;
        for (int a = 0; a < r->s->n_arms; a++) {
            const study_summary at = study_summarize(r->values[a][m], seed_count(r));
            if (at.n == 0) continue;
            if (rows++ == 0)
                fputs("| arm | n | mean ± sd | 95% CI | per seed |\n| --- | --- | --- | --- | --- "
                      "|\n",
                      out);
            write_metric_row(out, r, a, m, &at);
        }
        fputs(rows ? "\n" : "No values.\n\n", out);
    }
}

static void write_plots(FILE *out, const study *s, const plot_list *plots) {
    if (plots->count == 0) return;
    fputs("## Plots\n\n", out);
    for (int i = 0; i < plots->count; i++)
        fprintf(out, "![%s](%s/%s)\n\n", plots->png[i], s->name, plots->png[i]);
}

static cm_status write_markdown(const study_results *r, const char *report_dir,
                                const plot_list *plots) {
    const study *s = r->s;
    char name[STUDY_NAME_CAP + 8];
    snprintf(name, sizeof name, "%s.md", s->name);
    FILE *out;
    CM_TRY(gnuplot_open(report_dir, name, &out));
    fprintf(out, "# Study %s\n\n", s->name);
    if (s->paper[0]) fprintf(out, "Paper: %s\n\n", s->paper);
    if (s->summary[0]) fprintf(out, "%s\n\n", s->summary);
    write_how_it_was_run(out, r);
    write_claims_table(out, r);
    write_metrics(out, r);
    write_plots(out, s, plots);
    return finish_file(out, report_dir, name);
}

/* ---- REPORT_DIR/NAME.claims.tsv and README.md -------------------------------------------- */

static const char claims_header[] = "study\tclaim\ttext\tpaper_figure\tours\tverdict\tlink\n";
enum { CLAIMS_COLUMNS = 7 };

static cm_status write_claims_tsv(const study_results *r, const char *report_dir) {
    const study *s = r->s;
    char name[STUDY_NAME_CAP + 16], link[STUDY_NAME_CAP + 8];
    snprintf(name, sizeof name, "%s.claims.tsv", s->name);
    snprintf(link, sizeof link, "%s.md", s->name);
    FILE *out;
    CM_TRY(gnuplot_open(report_dir, name, &out));
    fputs(claims_header, out);
    for (int c = 0; c < s->n_claims; c++) {
        const study_claim *claim = &s->claims[c];
        text_buffer ours = {0};
        claim_ours(r, claim, &ours);
        write_field(out, s->name, "\t");
        write_field(out, claim->id, "\t");
        write_field(out, claim->text, "\t");
        write_field(out, claim->paper_figure, "\t");
        write_field(out, ours.data, "\t");
        write_field(out, study_verdict_name(study_claim_verdict(r, claim)), "\t");
        write_field(out, link, "\n");
    }
    return finish_file(out, report_dir, name);
}

static int compare_names(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static void free_names(char **names, int count) {
    for (int i = 0; i < count; i++) free(names[i]);
    free(names);
}

/* Appends a copy of name to the list; false when out of memory. */
static bool add_name(char ***names, int *count, int *capacity, const char *name) {
    if (*count == *capacity) {
        const int grown_capacity = *capacity ? 2 * *capacity : 16;
        char **grown = realloc(*names, (size_t)grown_capacity * sizeof *grown);
        if (!grown) return false;
        *names = grown;
        *capacity = grown_capacity;
    }
    if (!((*names)[*count] = strdup(name))) return false;
    (*count)++;
    return true;
}

/* The *.claims.tsv file names of dir, sorted. */
static cm_status list_claims_files(const char *dir, char ***names, int *count) {
    static const char suffix[] = ".claims.tsv";
    const size_t suffix_length = sizeof suffix - 1;
    DIR *listing = opendir(dir);
    if (!listing) return CM_ERR(CM_ERR_IO, "%s: cannot list: %s", dir, strerror(errno));
    int capacity = 0;
    bool ok = true;
    *names = NULL;
    *count = 0;
    for (struct dirent *entry; ok && (entry = readdir(listing));) {
        const size_t length = strlen(entry->d_name);
        if (length > suffix_length && !strcmp(entry->d_name + length - suffix_length, suffix))
            ok = add_name(names, count, &capacity, entry->d_name);
    }
    closedir(listing);
    if (!ok) {
        free_names(*names, *count);
        return CM_ERR(CM_ERR_NOMEM, "%s: no memory for the list of claims files", dir);
    }
    qsort(*names, (size_t)*count, sizeof **names, compare_names);
    return CM_OK;
}

/* One README row from a claims.tsv line (lines with too few columns are skipped). */
static void write_readme_row(FILE *out, char *line) {
    char *columns[CLAIMS_COLUMNS];
    int n = 0;
    line[strcspn(line, "\r\n")] = '\0';
    for (char *field = line; field && n < CLAIMS_COLUMNS; n++) {
        columns[n] = field;
        char *tab = strchr(field, '\t');
        if (tab) *tab++ = '\0';
        field = tab;
    }
    if (n < CLAIMS_COLUMNS) return;
    write_cell_after(out, "| ", columns[0]);
    write_cell_after(out, " | ", columns[1]);
    write_cell_after(out, ": ", columns[2]);
    write_cell_after(out, " | ", columns[3]);
    write_cell_after(out, " | ", columns[4]);
    write_cell_after(out, " | **", columns[5]);
    write_cell_after(out, "** | [", columns[0]);
    write_cell_after(out, "](", columns[6]);
    fputs(") |\n", out);
}

/* Appends the claims rows of report_dir/name (its header line skipped). */
static cm_status append_claims_file(FILE *out, const char *report_dir, const char *name) {
    char path[PATH_CAPACITY];
    CM_TRY(join_path(path, report_dir, name));
    FILE *in = fopen(path, "r");
    if (!in) return CM_ERR(CM_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    char *line = NULL;
    size_t capacity = 0;
    for (bool header = true; getline(&line, &capacity, in) >= 0; header = false)
        if (!header) write_readme_row(out, line);
    const bool failed = ferror(in);
    free(line);
    fclose(in);
    return failed ? CM_ERR(CM_ERR_IO, "%s: cannot read", path) : CM_OK;
}

/* README.md from every *.claims.tsv, written to README.md.tmp and renamed. */
static cm_status write_readme(const char *report_dir) {
    char **names = NULL, temporary[PATH_CAPACITY], path[PATH_CAPACITY];
    int count = 0;
    CM_TRY(join_path(temporary, report_dir, "README.md.tmp"));
    CM_TRY(join_path(path, report_dir, "README.md"));
    CM_TRY(list_claims_files(report_dir, &names, &count));
    FILE *out;
    cm_status status = gnuplot_open(report_dir, "README.md.tmp", &out);
    if (status == CM_OK) {
        fputs("# Studies\n\nEvery claim of every study, as `cmoe study` last reported it.\n\n"
              "| study | claim | paper's figure | ours | verdict | link |\n"
              "| --- | --- | --- | --- | --- | --- |\n",
              out);
        for (int i = 0; i < count && status == CM_OK; i++)
            status = append_claims_file(out, report_dir, names[i]);
        const cm_status closed = finish_file(out, report_dir, "README.md.tmp");
        if (status == CM_OK) status = closed;
    }
    free_names(names, count);
    if (status == CM_OK && rename(temporary, path) != 0)
        status = CM_ERR(CM_ERR_IO, "%s: cannot write: %s", path, strerror(errno));
    return status;
}

/* A study name is used as a file name: no '/', not "." or "..". */
static cm_status check_name(const char *name) {
    if (!name[0] || strchr(name, '/') || !strcmp(name, ".") || !strcmp(name, ".."))
        return CM_ERR(CM_ERR_INVALID, "study name '%s' cannot name a report file", name);
    return CM_OK;
}

cm_status study_report(const study_results *r, const char *report_dir) {
    char plot_dir[PATH_CAPACITY];
    plot_list plots = {.count = 0};
    CM_TRY(check_name(r->s->name));
    CM_TRY(join_path(plot_dir, report_dir, r->s->name));
    CM_TRY(cm_make_dirs(plot_dir));
    CM_TRY(plot_all(r, plot_dir, &plots));
    CM_TRY(write_markdown(r, report_dir, &plots));
    CM_TRY(write_claims_tsv(r, report_dir));
    return write_readme(report_dir);
}
