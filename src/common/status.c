#include "common/status.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

enum { MESSAGE_CAPACITY = 2048, LOCATION_CAPACITY = 256 };

static _Thread_local char error_message[MESSAGE_CAPACITY];
static _Thread_local char error_location[LOCATION_CAPACITY];

cm_status cm_error_set(cm_status code, const char *file, int line, const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    vsnprintf(error_message, sizeof error_message, fmt, args);
    va_end(args);
    const char *base = strrchr(file, '/');
    snprintf(error_location, sizeof error_location, "%s:%d", base ? base + 1 : file, line);
    return code;
}

cm_status cm_error_wrap(cm_status code, const char *fmt, ...) {
    char previous[MESSAGE_CAPACITY];
    memcpy(previous, error_message, sizeof previous);
    va_list args;
    va_start(args, fmt);
    int written = vsnprintf(error_message, sizeof error_message, fmt, args);
    va_end(args);
    size_t used = written < 0 ? 0 : (size_t)written;
    if (used + 3 < sizeof error_message) {
        error_message[used] = ':';
        error_message[used + 1] = ' ';
        size_t room = sizeof error_message - used - 2;
        size_t length = strnlen(previous, room - 1);
        memcpy(error_message + used + 2, previous, length);
        error_message[used + 2 + length] = '\0';
    }
    return code;
}

const char *cm_error_message(void) {
    return error_message;
}
const char *cm_error_location(void) {
    return error_location;
}

void cm_error_clear(void) {
    error_message[0] = '\0';
    error_location[0] = '\0';
}

const char *cm_status_name(cm_status code) {
    switch (code) {
    case CM_OK:
        return "ok";
    case CM_ERR_INVALID:
        return "invalid argument";
    case CM_ERR_IO:
        return "I/O error";
    case CM_ERR_FORMAT:
        return "malformed file";
    case CM_ERR_NOMEM:
        return "out of memory";
    case CM_ERR_MPI:
        return "MPI error";
    case CM_ERR_HDF5:
        return "HDF5 error";
    case CM_ERR_NUMERIC:
        return "non-finite value";
    case CM_ERR_INTERNAL:
        return "internal error";
    }
    return "unknown status";
}
