#include "common/check.h"
#include "common/log.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

static cm_abort_hook abort_hook = NULL;

void cm_set_abort_hook(cm_abort_hook hook) {
    abort_hook = hook;
}

void cm_assert_fail(const char *expr, const char *file, int line, const char *fmt, ...) {
    char message[1024];
    va_list args;
    va_start(args, fmt);
    vsnprintf(message, sizeof message, fmt, args);
    va_end(args);
    fflush(stdout);
    cm_log_error("check failed at %s:%d: %s: %s", file, line, expr, message);
    if (abort_hook) abort_hook();
    abort();
}
