/* Shared by the libFuzzer targets in fuzz/: a private temporary directory
 * (made once per process, removed at exit) and writing an input to a file
 * in it, for the readers that take a path.
 *
 * A target must never crash, hang or leak on any input; an error status from
 * the code under test is a pass. fuzz_fail aborts with a message, so a
 * broken invariant counts as a crash. */
#ifndef CMOE_FUZZ_UTIL_H
#define CMOE_FUZZ_UTIL_H

#include <stddef.h>
#include <stdint.h>

/* The directory, e.g. "/tmp/cmoe-fuzz-AbC123"; aborts if it cannot be made. */
const char *fuzz_temp_dir(void);

/* fuzz_temp_dir()/name into path (capacity bytes); aborts if too long. */
void fuzz_temp_path(const char *name, char *path, size_t capacity);

/* Writes bytes to path (truncating), or gzip-compressed when gzip is true. */
void fuzz_write_file(const char *path, const uint8_t *bytes, size_t size, int gzip);

/* Prints "fuzz: " and the message to stderr, then aborts. */
void fuzz_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

#endif
