/* Rank-aware logging to stderr/stdout.
 *
 * cm_log_info0 prints on rank 0 only (progress, summaries); warnings and
 * errors print on every rank, prefixed with "[rank r]" when the job has more
 * than one rank. The rank is set once by the parallel module; a single-process
 * run never needs to set it. Owns: the rank and verbosity (the one allowed
 * piece of global state besides read-only tables). */
#ifndef CMOE_COMMON_LOG_H
#define CMOE_COMMON_LOG_H

#include <stdbool.h>

void cm_log_set_rank(int rank, int world_size);
int cm_log_rank(void);
void cm_log_set_quiet(bool quiet); /* silences cm_log_info0 (tests, benchmarks) */

void cm_log_info0(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void cm_log_warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void cm_log_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif
