#include "common/log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static int log_rank = 0;
static int log_world_size = 1;
static bool log_quiet = false;

void cm_log_set_rank(int rank, int world_size) {
    log_rank = rank;
    log_world_size = world_size;
}

int cm_log_rank(void) {
    return log_rank;
}
void cm_log_set_quiet(bool quiet) {
    log_quiet = quiet;
}

/* One write per line: stderr is unbuffered, and under mpirun the pieces of a
 * line written separately interleave with other ranks' output. */
static void log_line(FILE *stream, const char *level, const char *fmt, va_list args) {
    char line[4096];
    size_t length = 0;
    if (log_world_size > 1) length += (size_t)snprintf(line, sizeof line, "[rank %d] ", log_rank);
    if (level) length += (size_t)snprintf(line + length, sizeof line - length, "%s: ", level);
    if (length < sizeof line) vsnprintf(line + length, sizeof line - length, fmt, args);
    length = strlen(line);
    if (length + 1 < sizeof line) {
        line[length++] = '\n';
        line[length] = '\0';
    } else {
        line[sizeof line - 2] = '\n';
    }
    fputs(line, stream);
    fflush(stream);
}

void cm_log_info0(const char *fmt, ...) {
    if (log_rank != 0 || log_quiet) return;
    va_list args;
    va_start(args, fmt);
    vfprintf(stdout, fmt, args);
    va_end(args);
    fputc('\n', stdout);
    fflush(stdout);
}

void cm_log_warn(const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    log_line(stderr, "warning", fmt, args);
    va_end(args);
}

void cm_log_error(const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    log_line(stderr, "error", fmt, args);
    va_end(args);
}
