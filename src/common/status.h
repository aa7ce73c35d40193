/* Status codes and the error message that goes with them.
 *
 * Library functions never print and never exit: they return a cm_status and
 * record a human-readable message (with the file:line that raised it) in a
 * per-thread buffer. Only the CLI reads the message, prints it and chooses the
 * exit code (DESIGN.md rule 9). Owns: that buffer. */
#ifndef CMOE_COMMON_STATUS_H
#define CMOE_COMMON_STATUS_H

typedef enum cm_status {
    CM_OK = 0,
    CM_ERR_INVALID,  /* bad argument or configuration value */
    CM_ERR_IO,       /* file missing, unreadable, truncated */
    CM_ERR_FORMAT,   /* a file's contents are malformed */
    CM_ERR_NOMEM,    /* allocation failed, or the step arena is full */
    CM_ERR_MPI,      /* an MPI call failed */
    CM_ERR_HDF5,     /* an HDF5 call failed */
    CM_ERR_NUMERIC,  /* NaN or Inf where a finite value is required */
    CM_ERR_INTERNAL, /* a bug: an invariant did not hold */
} cm_status;

/* Records the message for `code` and returns `code`, so it can be returned
 * directly: `return CM_ERR(CM_ERR_IO, "cannot open %s", path);` */
cm_status cm_error_set(cm_status code, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
#define CM_ERR(code, ...) cm_error_set((code), __FILE__, __LINE__, __VA_ARGS__)

/* Adds context in front of the recorded message ("while loading x: <old>"). */
cm_status cm_error_wrap(cm_status code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Propagates a failure to the caller unchanged. */
#define CM_TRY(expr)                                                                               \
    do {                                                                                           \
        cm_status cm_try_status_ = (expr);                                                         \
        if (cm_try_status_ != CM_OK) return cm_try_status_;                                        \
    } while (0)

const char *cm_error_message(void);  /* "" when nothing was recorded */
const char *cm_error_location(void); /* "file.c:123" of the latest error */
void cm_error_clear(void);
const char *cm_status_name(cm_status code);

#endif
