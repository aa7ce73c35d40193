#include "cli/route_out.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/gnuplot.h"
#include "train/adversarial.h"

enum { BYTES = 256, PATH_CAPACITY = 4096, PICTURE_COLUMNS = 64, NO_EXPERT = -1 };

struct route_lm_data {
    char dir[PATH_CAPACITY];
    FILE *tsv;
    int layers, experts, show, top;
    int block[LM_MAX_LAYERS]; /* the block index of each MoE layer */
    int64_t tokens;           /* bytes routed */
    int64_t *pairs;           /* [layers][experts][BYTES]: kept (byte, expert) pairs */
    int32_t *top1;            /* [layers][show]: the top-1 expert of the first bytes */
};

/* `byte` as routing.tsv's char column writes it: C escapes for the
 * backslash and control or non-ASCII bytes, the printable ones as they are. */
static void escape_byte(unsigned char byte, char out[8]) {
    if (byte == '\\')
        snprintf(out, 8, "\\\\");
    else if (byte == '\n')
        snprintf(out, 8, "\\n");
    else if (byte == '\t')
        snprintf(out, 8, "\\t");
    else if (byte == '\r')
        snprintf(out, 8, "\\r");
    else if (byte < 0x20 || byte >= 0x7f)
        snprintf(out, 8, "\\x%02x", byte);
    else
        snprintf(out, 8, "%c", byte);
}

cm_status route_lm_open(const char *dir, const lm_model *model, int show, int top,
                        route_lm_data **out) {
    route_lm_data *r = calloc(1, sizeof *r);
    if (!r) return CM_ERR(CM_ERR_NOMEM, "out of memory");
    snprintf(r->dir, sizeof r->dir, "%s", dir);
    r->experts = model->config.moe.router.num_experts;
    r->show = show;
    r->top = top;
    for (int l = 0; l < model->config.n_layer; l++)
        if (model->blocks[l].is_moe) r->block[r->layers++] = l;
    r->pairs = calloc((size_t)r->layers * (size_t)r->experts * BYTES, sizeof *r->pairs);
    r->top1 = malloc((size_t)r->layers * (size_t)show * sizeof *r->top1);
    char path[PATH_CAPACITY + 16];
    snprintf(path, sizeof path, "%s/routing.tsv", dir);
    r->tsv = fopen(path, "w");
    *out = r;
    if (!r->pairs || !r->top1) return CM_ERR(CM_ERR_NOMEM, "out of memory");
    if (!r->tsv) return CM_ERR(CM_ERR_IO, "%s: cannot write: %s", path, strerror(errno));
    for (int i = 0; i < r->layers * show; i++) r->top1[i] = NO_EXPERT;
    fputs("pos\tbyte\tchar\tlayer\trank\texpert\tgate\n", r->tsv);
    return CM_OK;
}

/* Token t's slots in MoE layer i: rows, counts and its top-1 expert. */
static void add_token(route_lm_data *r, const lm_moe_report *report, int i, int t,
                      unsigned char byte, int64_t pos) {
    const int32_t *offsets = report->offsets[i], *expert = report->expert[i];
    const float *gates = report->gates[i];
    char text[8];
    escape_byte(byte, text);
    int best = NO_EXPERT;
    for (int s = offsets[t]; s < offsets[t + 1]; s++) {
        const float gate = gates ? gates[s] : 1.0f;
        int rank = 0; /* slots before it by gate, ties in slot order */
        for (int o = offsets[t]; o < offsets[t + 1]; o++) {
            const float other = gates ? gates[o] : 1.0f;
            rank += other > gate || (other == gate && o < s);
        }
        fprintf(r->tsv, "%lld\t%d\t%s\t%d\t%d\t%d\t%.6g\n", (long long)pos, byte, text, r->block[i],
                rank, expert[s], gate);
        r->pairs[((size_t)i * (size_t)r->experts + (size_t)expert[s]) * BYTES + byte]++;
        if (rank == 0) best = expert[s];
    }
    if (pos < r->show) r->top1[(size_t)i * (size_t)r->show + (size_t)pos] = best;
}

cm_status route_lm_add(route_lm_data *r, const lm_moe_report *report, const unsigned char *bytes,
                       int64_t first_pos, int tokens) {
    if (report->n_layers != r->layers)
        return CM_ERR(CM_ERR_INTERNAL, "route: %d MoE layers reported, %d expected",
                      report->n_layers, r->layers);
    for (int t = 0; t < tokens; t++)
        for (int i = 0; i < r->layers; i++) add_token(r, report, i, t, bytes[t], first_pos + t);
    r->tokens += tokens;
    return ferror(r->tsv) ? CM_ERR(CM_ERR_IO, "%s/routing.tsv: cannot write", r->dir) : CM_OK;
}

/* "\"e\":512 \" \":300 ..." (JSON-style quoted bytes): the `top` bytes with
 * the most pairs of one expert's counts[BYTES], ties to the smaller byte. */
static void top_bytes(const int64_t *counts, int top, char *out, size_t size) {
    bool taken[BYTES] = {false};
    size_t used = 0;
    out[0] = '\0';
    for (int k = 0; k < top; k++) {
        int best = -1;
        for (int b = 0; b < BYTES; b++)
            if (!taken[b] && counts[b] > 0 && (best < 0 || counts[b] > counts[best])) best = b;
        if (best < 0) break;
        taken[best] = true;
        char text[8];
        escape_byte((unsigned char)best, text);
        int wrote = snprintf(out + used, size - used, "%s\"%s%s\":%lld", k ? " " : "",
                             best == '"' ? "\\" : "", text, (long long)counts[best]);
        if (wrote < 0 || (size_t)wrote >= size - used) break;
        used += (size_t)wrote;
    }
}

/* experts.tsv and the printed table. */
static cm_status write_experts(const route_lm_data *r) {
    char path[PATH_CAPACITY + 16], top[2048];
    snprintf(path, sizeof path, "%s/experts.tsv", r->dir);
    FILE *file = fopen(path, "w");
    if (!file) return CM_ERR(CM_ERR_IO, "%s: cannot write: %s", path, strerror(errno));
    fputs("layer\texpert\tpairs\tshare\ttop_bytes\n", file);
    for (int i = 0; i < r->layers; i++) {
        const int64_t *layer = r->pairs + (size_t)i * (size_t)r->experts * BYTES;
        int64_t total = 0;
        for (int b = 0; b < r->experts * BYTES; b++) total += layer[b];
        printf("layer %d: %lld bytes, %.3f experts per byte\n", r->block[i], (long long)r->tokens,
               r->tokens ? (double)total / (double)r->tokens : 0.0);
        for (int e = 0; e < r->experts; e++) {
            const int64_t *counts = layer + (size_t)e * BYTES;
            int64_t pairs = 0;
            for (int b = 0; b < BYTES; b++) pairs += counts[b];
            const double share = total ? (double)pairs / (double)total : 0.0;
            top_bytes(counts, r->top, top, sizeof top);
            fprintf(file, "%d\t%d\t%lld\t%.6f\t%s\n", r->block[i], e, (long long)pairs, share, top);
            printf("  expert %3d %6.2f%%  %s\n", e, 100.0 * share, top);
        }
    }
    return fclose(file) == 0 ? CM_OK : CM_ERR(CM_ERR_IO, "%s: cannot write", path);
}

/* A colour per expert: a fixed list of distinct ones, then hues around the
 * wheel. */
static void expert_colour(int e, char out[8]) {
    static const char *const fixed[] = {"4e79a7", "f28e2b", "59a14f", "e15759", "b07aa1", "edc948",
                                        "76b7b2", "ff9da7", "9c755f", "bab0ac", "1f77b4", "8c564b",
                                        "17becf", "bcbd22", "7f7f7f", "d62728"};
    const int n = (int)(sizeof fixed / sizeof fixed[0]);
    if (e < n) {
        snprintf(out, 8, "#%s", fixed[e]);
        return;
    }
    /* HSV at saturation 0.7, value 0.85, hues 137.5 degrees apart */
    const double h = fmod(137.5 * e, 360.0) / 60.0, c = 0.85 * 0.7, m = 0.85 - c;
    const double x = c * (1.0 - fabs(fmod(h, 2.0) - 1.0));
    static const int order[6][3] = {{0, 1, 2}, {1, 0, 2}, {2, 0, 1},
                                    {2, 1, 0}, {1, 2, 0}, {0, 2, 1}};
    const double value[3] = {c, x, 0.0}; /* largest, middle, smallest channel */
    const int *o = order[(int)h % 6];
    snprintf(out, 8, "#%02x%02x%02x", (int)(255 * (value[o[0]] + m)),
             (int)(255 * (value[o[1]] + m)), (int)(255 * (value[o[2]] + m)));
}

/* The picture's grid: a byte per cell, PICTURE_COLUMNS a row, a newline
 * ending its row; (column, row) of each of the first `count` bytes. */
static int layout(const unsigned char *text, int count, int *column, int *row) {
    int x = 0, y = 0;
    for (int i = 0; i < count; i++) {
        if (x == PICTURE_COLUMNS) {
            x = 0;
            y++;
        }
        column[i] = x;
        row[i] = y;
        if (text[i] == '\n') {
            x = 0;
            y++;
        } else {
            x++;
        }
    }
    return count > 0 && x == 0 ? y : y + 1;
}

/* The cells file: one block (index) per layer of "column row expert". */
static cm_status write_cells(const route_lm_data *r, int count, const int *column, const int *row) {
    char path[PATH_CAPACITY + 24];
    snprintf(path, sizeof path, "%s/routing-cells.dat", r->dir);
    FILE *file = fopen(path, "w");
    if (!file) return CM_ERR(CM_ERR_IO, "%s: cannot write: %s", path, strerror(errno));
    for (int i = 0; i < r->layers; i++) {
        fprintf(file, "# layer %d: column row top1_expert (-1: none)\n", r->block[i]);
        for (int p = 0; p < count; p++)
            fprintf(file, "%d %d %d\n", column[p], row[p], r->top1[(size_t)i * r->show + p]);
        fputs("\n\n", file);
    }
    return fclose(file) == 0 ? CM_OK : CM_ERR(CM_ERR_IO, "%s: cannot write", path);
}

/* The byte's label: printable ASCII but the space, in a single-quoted
 * gnuplot string ('' stands for '); nothing for the others. */
static bool label_text(unsigned char byte, char out[4]) {
    if (byte <= ' ' || byte >= 0x7f) return false;
    if (byte == '\'')
        snprintf(out, 4, "''");
    else
        snprintf(out, 4, "%c", byte);
    return true;
}

static void write_script_head(FILE *gp, const route_lm_data *r, int rows, const char *title) {
    /* rows of 16 px, as many as the text or the key (a row an expert) needs */
    const int key_rows = (r->experts < 32 ? r->experts : 32) + 2;
    const int lines = rows > key_rows ? rows : key_rows, panel = 40 + 16 * lines;
    char safe[256], colour[8];
    gnuplot_sanitize(title, safe, sizeof safe);
    fprintf(gp,
            "set terminal pngcairo size 1000,%d font ',9'\n"
            "set output 'routing.png'\n"
            "set multiplot layout %d,1 title '%s: the top-1 expert of each byte'\n"
            "set xrange [-0.5:%d.5]\nset yrange [%d.5:-0.5]\n"
            "unset xtics\nunset ytics\nunset border\n"
            "set lmargin 1\nset rmargin 14\nset key outside right top font ',8'\n"
            "set style fill solid 0.8 noborder\n",
            panel * r->layers + 30, r->layers, safe, PICTURE_COLUMNS - 1, lines - 1);
    for (int e = 0; e < r->experts; e++) {
        expert_colour(e, colour);
        fprintf(gp, "set linetype %d lc rgb '%s'\n", e + 1, colour);
    }
    fprintf(gp, "set linetype %d lc rgb '#dddddd'\n", r->experts + 1);
}

/* routing.gp (then run: routing.png) over the first bytes of the text. */
static cm_status write_picture(const route_lm_data *r, const unsigned char *text, size_t n,
                               const char *title) {
    const int count = (int)(n < (size_t)r->show ? n : (size_t)r->show);
    int *column = malloc((size_t)count * sizeof *column),
        *row = malloc((size_t)count * sizeof *row);
    if (!column || !row) {
        free(column);
        free(row);
        return CM_ERR(CM_ERR_NOMEM, "out of memory");
    }
    const int rows = layout(text, count, column, row);
    cm_status status = write_cells(r, count, column, row);
    FILE *gp = NULL;
    if (status == CM_OK) status = gnuplot_open(r->dir, "routing.gp", &gp);
    if (status == CM_OK) {
        write_script_head(gp, r, rows, title);
        for (int i = 0; i < r->layers; i++) {
            fprintf(gp, "unset label\nset title 'layer %d'\n", r->block[i]);
            for (int p = 0; p < count; p++) {
                char label[4];
                if (label_text(text[p], label))
                    fprintf(gp, "set label '%s' at %d,%d center front noenhanced\n", label,
                            column[p], row[p]);
            }
            fprintf(gp,
                    "plot 'routing-cells.dat' index %d using 1:2:(0.5):(0.5):"
                    "($3 < 0 ? %d : $3 + 1) with boxxyerror lc variable notitle",
                    i, r->experts + 1);
            for (int e = 0; e < r->experts && e < 32; e++)
                fprintf(gp, ", keyentry with boxes lt %d title 'expert %d'", e + 1, e);
            fputs("\n", gp);
        }
        fputs("unset multiplot\n", gp);
        status = gnuplot_run(r->dir, "routing.gp", gp, "routing.png");
    }
    free(column);
    free(row);
    return status;
}

cm_status route_lm_finish(route_lm_data *r, const unsigned char *text, size_t n,
                          const char *title) {
    FILE *tsv = r->tsv;
    r->tsv = NULL;
    if (fclose(tsv) != 0) return CM_ERR(CM_ERR_IO, "%s/routing.tsv: cannot write", r->dir);
    CM_TRY(write_experts(r));
    return write_picture(r, text, n, title);
}

void route_lm_close(route_lm_data *r) {
    if (!r) return;
    if (r->tsv) fclose(r->tsv);
    free(r->pairs);
    free(r->top1);
    free(r);
}

cm_status route_write_classes(const char *dir, const int64_t *counts, int routers, int experts,
                              int64_t images) {
    char path[PATH_CAPACITY + 24];
    snprintf(path, sizeof path, "%s/class-routes.tsv", dir);
    FILE *file = fopen(path, "w");
    if (!file) return CM_ERR(CM_ERR_IO, "%s: cannot write: %s", path, strerror(errno));
    fputs("router\texpert", file);
    for (int c = 0; c < ADV_EVAL_CLASSES; c++) fprintf(file, "\tclass_%d", c);
    fputs("\timages\n", file);
    for (int r = 0; r < routers; r++) {
        printf("router %d: test images per expert (rows) and true class (columns), %lld images\n"
               "  expert",
               r, (long long)images);
        for (int c = 0; c < ADV_EVAL_CLASSES; c++) printf(" %6d", c);
        printf("  %7s\n", "images");
        for (int e = 0; e < experts; e++) {
            const int64_t *row =
                counts + ((size_t)r * (size_t)experts + (size_t)e) * ADV_EVAL_CLASSES;
            int64_t total = 0;
            fprintf(file, "%d\t%d", r, e);
            printf("  %6d", e);
            for (int c = 0; c < ADV_EVAL_CLASSES; c++) {
                fprintf(file, "\t%lld", (long long)row[c]);
                printf(" %6lld", (long long)row[c]);
                total += row[c];
            }
            fprintf(file, "\t%lld\n", (long long)total);
            printf("  %7lld\n", (long long)total);
        }
    }
    return fclose(file) == 0 ? CM_OK : CM_ERR(CM_ERR_IO, "%s: cannot write", path);
}
