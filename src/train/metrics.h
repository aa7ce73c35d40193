/* Run metrics: runs/NAME/metrics.jsonl (one JSON object per line) and the
 * gnuplot PNG of the training and validation curves.
 *
 * Lines have a "kind" ("train", "valid", "test", ...) and a "step"; the other
 * keys are numbers. On resume, lines past the resumed step (written by the
 * interrupted run after its last checkpoint) are dropped so the file reads as
 * one uninterrupted run. Owns: the open file. */
#ifndef CMOE_TRAIN_METRICS_H
#define CMOE_TRAIN_METRICS_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "common/status.h"

typedef struct cm_metrics {
    FILE *file;
} cm_metrics;

/* Opens RUN_DIR/metrics.jsonl: new when resume_step < 0, else kept up to and
 * including resume_step. */
cm_status metrics_open(cm_metrics *metrics, const char *run_dir, int64_t resume_step);
/* Writes one line: fmt must produce a JSON object; flushed at once. */
void metrics_write(cm_metrics *metrics, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void metrics_close(cm_metrics *metrics);

/* The number after "key": in a metrics line; false if absent. */
bool metrics_find_number(const char *line, const char *key, double *value);
/* True when the line's "kind" is `kind`. */
bool metrics_is_kind(const char *line, const char *kind);

/* Reads RUN_DIR/metrics.jsonl and renders with gnuplot RUN_DIR/curves.png
 * (bits per byte of training and validation against step), and for MoE runs
 * RUN_DIR/moe-load.png (per layer, a heatmap of each expert's share of the
 * routed tokens over training) and RUN_DIR/moe-k.png (activated experts per
 * token, per layer); the plotted data go to curves-*.tsv and moe-routing.tsv. */
cm_status metrics_plot(const char *run_dir);

/* Writes DIR/k-sweep.tsv (k, bpc) and renders DIR/k-sweep.png: bits per byte
 * against the number of experts used at evaluation (the "self-slimmable"
 * curve of SMoE-Dropout). */
cm_status metrics_plot_k_sweep(const char *dir, const int *ks, const double *bpc, int n,
                               const char *title);

#endif
