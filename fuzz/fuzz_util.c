#include "fuzz_util.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

static char temp_dir[256];

static void remove_temp_dir(void) {
    char command[300];
    snprintf(command, sizeof command, "rm -rf '%s'", temp_dir);
    if (system(command) != 0) fprintf(stderr, "fuzz: could not remove %s\n", temp_dir);
}

void fuzz_fail(const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    fputs("fuzz: ", stderr);
    vfprintf(stderr, fmt, args);
    fputc('\n', stderr);
    va_end(args);
    abort();
}

const char *fuzz_temp_dir(void) {
    if (temp_dir[0]) return temp_dir;
    const char *base = getenv("TMPDIR");
    snprintf(temp_dir, sizeof temp_dir, "%s/cmoe-fuzz-XXXXXX", base && base[0] ? base : "/tmp");
    if (!mkdtemp(temp_dir)) fuzz_fail("cannot create %s", temp_dir);
    atexit(remove_temp_dir);
    return temp_dir;
}

void fuzz_temp_path(const char *name, char *path, size_t capacity) {
    int written = snprintf(path, capacity, "%s/%s", fuzz_temp_dir(), name);
    if (written < 0 || (size_t)written >= capacity) fuzz_fail("path too long: %s", name);
}

void fuzz_write_file(const char *path, const uint8_t *bytes, size_t size, int gzip) {
    if (gzip) {
        gzFile file = gzopen(path, "wb");
        if (!file) fuzz_fail("cannot create %s", path);
        if (size > 0 && gzwrite(file, bytes, (unsigned)size) != (int)size)
            fuzz_fail("cannot write %s", path);
        if (gzclose(file) != Z_OK) fuzz_fail("cannot close %s", path);
        return;
    }
    FILE *file = fopen(path, "wb");
    if (!file) fuzz_fail("cannot create %s", path);
    if (size > 0 && fwrite(bytes, 1, size, file) != size) fuzz_fail("cannot write %s", path);
    if (fclose(file) != 0) fuzz_fail("cannot close %s", path);
}
