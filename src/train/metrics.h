/* Run metrics: runs/NAME/metrics.jsonl (one JSON object per line) and the
 * gnuplot PNG of the training and validation curves.
 *
 * Lines have a "kind" ("train", "valid", "test", ...) and a "step"; the other
 * keys are numbers or arrays of numbers, written from typed records
 * (metrics_record) by one function that reports write errors. On resume, lines past the resumed
 * step (written by the interrupted run after its last checkpoint) are dropped so the file reads as
 * one uninterrupted run. Owns: the open file. */
#ifndef CMOE_TRAIN_METRICS_H
#define CMOE_TRAIN_METRICS_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "common/status.h"

typedef struct cm_metrics {
    FILE *file; /* NULL: a rank that does not write (writes succeed and do nothing) */
    char path[4096];
} cm_metrics;

/* One metrics line: "kind", "step", then the fields in order. Numbers are
 * written with their printf format ("%.6f"; NULL: "%.6g"); a NaN or infinite
 * number is written as -1 (JSON has no NaN: "not measured"). Array fields
 * borrow their values: they must stay valid until the record is written. */
enum { METRICS_MAX_FIELDS = 32 };
typedef enum metrics_type {
    METRICS_NUMBER,  /* double */
    METRICS_INTEGER, /* int64_t */
    METRICS_NUMBERS, /* const double[count] */
    METRICS_INTEGERS /* const int64_t[count] */
} metrics_type;
typedef struct metrics_field {
    const char *key;
    metrics_type type;
    const char *format;
    double number;
    int64_t integer;
    const double *numbers;
    const int64_t *integers;
    int count;
} metrics_field;
typedef struct metrics_record {
    const char *kind;
    int64_t step;
    int n_fields;
    metrics_field fields[METRICS_MAX_FIELDS];
} metrics_record;

metrics_record metrics_record_start(const char *kind, int64_t step);
/* Appending past METRICS_MAX_FIELDS is a programming error (asserted). */
void metrics_add_number(metrics_record *record, const char *key, double value, const char *format);
void metrics_add_integer(metrics_record *record, const char *key, int64_t value);
void metrics_add_numbers(metrics_record *record, const char *key, const double *values, int count,
                         const char *format);
void metrics_add_integers(metrics_record *record, const char *key, const int64_t *values,
                          int count);
/* The value of a scalar field; false when the record has no such key. */
bool metrics_record_get(const metrics_record *record, const char *key, double *value);
/* The record without its array fields (whose values are only borrowed), to
 * keep after the arrays are gone. */
metrics_record metrics_record_scalars(const metrics_record *record);

/* Opens RUN_DIR/metrics.jsonl: new when resume_step < 0, else kept up to and
 * including resume_step. */
cm_status metrics_open(cm_metrics *metrics, const char *run_dir, int64_t resume_step);
/* Writes one line and flushes it; CM_ERR_IO (naming the file) when the
 * write or the flush fails, e.g. on a full disk. */
cm_status metrics_write_record(cm_metrics *metrics, const metrics_record *record);
/* Writes a record as one JSON object, without a newline (for any stream). */
int metrics_format_record(FILE *out, const metrics_record *record);
void metrics_close(cm_metrics *metrics);
/* True when the file the metrics write to holds a whole `kind` line of
 * `step` (false on a rank that does not write). */
bool metrics_has_line(const cm_metrics *metrics, const char *kind, int64_t step);

/* The number after "key": in a metrics line; false if absent. */
bool metrics_find_number(const char *line, const char *key, double *value);
/* True when the line's "kind" is `kind`. */
bool metrics_is_kind(const char *line, const char *kind);

/* Reads RUN_DIR/metrics.jsonl and renders with gnuplot RUN_DIR/curves.png
 * (bits per byte of training and validation against step; a run without
 * bits per byte, the image classifier: its training loss), for MoE LM runs
 * RUN_DIR/moe-load.png (per layer, a heatmap of each expert's share of the
 * routed tokens over training) and RUN_DIR/moe-k.png (activated experts per
 * token, per layer), and for MoE-CNN runs RUN_DIR/moe-cnn-load.png (per
 * router, a heatmap of each expert's share of the training images, from the
 * "moe_cnn" lines). The plotted data go to curves-*.tsv, moe-routing.tsv,
 * moe-k.tsv and moe-cnn-routing.tsv, the gnuplot scripts to curves.gp,
 * moe-load.gp and moe-cnn-load.gp. gnuplot runs with RUN_DIR as its working
 * directory (fork, chdir, exec; no shell) and the scripts name their files
 * relative to it: no path is interpolated into gnuplot or shell text, and
 * the plot titles show the run directory's last component with every
 * character outside [A-Za-z0-9._+-, ] replaced by '_'. */
cm_status metrics_plot(const char *run_dir);

/* Writes DIR/k-sweep.tsv (k, bpc) and renders DIR/k-sweep.png (script
 * DIR/k-sweep.gp, run as metrics_plot's; `title` sanitized as its titles):
 * bits per byte against the number of experts used at evaluation (the
 * "self-slimmable" curve of SMoE-Dropout). */
cm_status metrics_plot_k_sweep(const char *dir, const int *ks, const double *bpc, int n,
                               const char *title);

#endif
