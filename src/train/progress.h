/* Progress display for long work (rank 0 only).
 *
 * On a terminal: one line redrawn in place, with a bar, the caller's metrics,
 * throughput and ETA; messages printed with progress_print go above it. Not
 * on a terminal (logs, CI): the same information as plain lines, printed
 * whenever the caller asks, never redrawn. Owns: nothing but its counters. */
#ifndef CMOE_TRAIN_PROGRESS_H
#define CMOE_TRAIN_PROGRESS_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "common/clock.h"

typedef struct cm_progress {
    FILE *stream;
    bool tty;
    bool enabled; /* false on ranks other than 0 */
    int64_t first_step, total_steps;
    double start_time;
    bool line_drawn;
} cm_progress;

/* Steps run from first_step (exclusive) to total_steps (inclusive). */
void progress_init(cm_progress *progress, FILE *stream, int64_t first_step, int64_t total_steps,
                   bool enabled);
/* step done; `metrics` is a short text such as "loss 1.71  bpc 2.47"; rate
 * is work per second (e.g. tokens/s) and `unit` its name. On a terminal the
 * line is redrawn; otherwise a line is printed only when `log_line`. */
void progress_update(cm_progress *progress, int64_t step, const char *metrics, double rate,
                     const char *unit, bool log_line);
/* A message that must stay on screen (eval results, checkpoint saved). */
void progress_print(cm_progress *progress, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
void progress_finish(cm_progress *progress);

/* "2:05" or "1:02:05" */
void format_duration(double seconds, char *out, size_t size);

#endif
