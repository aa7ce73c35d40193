/* faultfs: a full disk and a read-only directory for the tests of cmoe's
 * error paths, without root or a real small file system. An LD_PRELOAD
 * library (built with the tests, never linked into cmoe) that wraps the C
 * library's file calls:
 *
 *   FAULTFS_FULL=SUBSTRING:BYTES  files whose path contains SUBSTRING share
 *       a budget of BYTES bytes: a write past it fails with ENOSPC (a partial
 *       write up to the budget first, as a real full disk does);
 *   FAULTFS_READONLY=PREFIX  creating, opening for writing, renaming,
 *       removing or making a directory under PREFIX fails with EROFS.
 *
 * Both the descriptor calls (open, openat, write, pwrite, writev: what
 * HDF5's sec2 driver uses) and stdio (fopen: the stream is wrapped with
 * fopencookie, since glibc's fwrite does not go through an interposable
 * write) are covered. The state is per process; a limit applies to every
 * matching file opened for writing, the first BYTES bytes over all of them.
 * Owns: its table of tracked descriptors. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

enum { MAX_FD = 4096 };

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static bool tracked[MAX_FD];  /* descriptors of files under the budget */
static long long budget = -1; /* bytes left; -1: not read yet */

static const char *full_pattern(char *buffer, size_t size, long long *bytes) {
    const char *spec = getenv("FAULTFS_FULL");
    if (!spec || !*spec) return NULL;
    const char *colon = strrchr(spec, ':');
    if (!colon) return NULL;
    snprintf(buffer, size, "%.*s", (int)(colon - spec), spec);
    *bytes = atoll(colon + 1);
    return buffer;
}

static bool matches_full(const char *path) {
    char pattern[1024];
    long long bytes;
    if (!path || !full_pattern(pattern, sizeof pattern, &bytes)) return false;
    pthread_mutex_lock(&lock);
    if (budget < 0) budget = bytes;
    pthread_mutex_unlock(&lock);
    return strstr(path, pattern) != NULL;
}

static bool under_readonly(const char *path) {
    const char *prefix = getenv("FAULTFS_READONLY");
    return prefix && *prefix && path && strncmp(path, prefix, strlen(prefix)) == 0;
}

static bool writes(int flags) {
    return (flags & (O_WRONLY | O_RDWR | O_CREAT | O_TRUNC | O_APPEND)) != 0;
}

static void track(int fd, const char *path, int flags) {
    if (fd >= 0 && fd < MAX_FD) tracked[fd] = writes(flags) && matches_full(path);
}

/* How many of `count` bytes a write to fd may take (errno ENOSPC when 0). */
static size_t allowed(int fd, size_t count) {
    if (fd < 0 || fd >= MAX_FD || !tracked[fd] || count == 0) return count;
    pthread_mutex_lock(&lock);
    size_t take = budget <= 0 ? 0 : (size_t)budget < count ? (size_t)budget : count;
    budget -= (long long)take;
    pthread_mutex_unlock(&lock);
    if (take == 0) errno = ENOSPC;
    return take;
}

#define REAL(name, type)                                                                           \
    static type real_##name;                                                                       \
    if (!real_##name) real_##name = (type)dlsym(RTLD_NEXT, #name)

static int open_common(int dirfd, const char *path, int flags, mode_t mode, bool at) {
    typedef int (*open_fn)(const char *, int, ...);
    typedef int (*openat_fn)(int, const char *, int, ...);
    REAL(open, open_fn);
    REAL(openat, openat_fn);
    if (writes(flags) && under_readonly(path)) {
        errno = EROFS;
        return -1;
    }
    int fd = at ? real_openat(dirfd, path, flags, mode) : real_open(path, flags, mode);
    track(fd, path, flags);
    return fd;
}

static mode_t mode_argument(int flags, va_list args) {
    return (flags & (O_CREAT | O_TMPFILE)) ? (mode_t)va_arg(args, int) : 0;
}

int open(const char *path, int flags, ...) {
    va_list args;
    va_start(args, flags);
    mode_t mode = mode_argument(flags, args);
    va_end(args);
    return open_common(AT_FDCWD, path, flags, mode, false);
}

int open64(const char *path, int flags, ...) {
    va_list args;
    va_start(args, flags);
    mode_t mode = mode_argument(flags, args);
    va_end(args);
    return open_common(AT_FDCWD, path, flags, mode, false);
}

int openat(int dirfd, const char *path, int flags, ...) {
    va_list args;
    va_start(args, flags);
    mode_t mode = mode_argument(flags, args);
    va_end(args);
    return open_common(dirfd, path, flags, mode, true);
}

int openat64(int dirfd, const char *path, int flags, ...) {
    va_list args;
    va_start(args, flags);
    mode_t mode = mode_argument(flags, args);
    va_end(args);
    return open_common(dirfd, path, flags, mode, true);
}

int creat(const char *path, mode_t mode) {
    return open_common(AT_FDCWD, path, O_CREAT | O_WRONLY | O_TRUNC, mode, false);
}

int close(int fd) {
    typedef int (*close_fn)(int);
    REAL(close, close_fn);
    if (fd >= 0 && fd < MAX_FD) tracked[fd] = false;
    return real_close(fd);
}

/* The new descriptor of dup2/dup3 takes the tracking of the old one. */
int dup2(int old, int new) {
    typedef int (*dup2_fn)(int, int);
    REAL(dup2, dup2_fn);
    int fd = real_dup2(old, new);
    if (fd >= 0 && fd < MAX_FD) tracked[fd] = old >= 0 && old < MAX_FD && tracked[old];
    return fd;
}

int dup3(int old, int new, int flags) {
    typedef int (*dup3_fn)(int, int, int);
    REAL(dup3, dup3_fn);
    int fd = real_dup3(old, new, flags);
    if (fd >= 0 && fd < MAX_FD) tracked[fd] = old >= 0 && old < MAX_FD && tracked[old];
    return fd;
}

ssize_t write(int fd, const void *data, size_t count) {
    typedef ssize_t (*write_fn)(int, const void *, size_t);
    REAL(write, write_fn);
    size_t take = allowed(fd, count);
    return take == 0 && count > 0 ? -1 : real_write(fd, data, take);
}

ssize_t pwrite(int fd, const void *data, size_t count, off_t offset) {
    typedef ssize_t (*pwrite_fn)(int, const void *, size_t, off_t);
    REAL(pwrite, pwrite_fn);
    size_t take = allowed(fd, count);
    return take == 0 && count > 0 ? -1 : real_pwrite(fd, data, take, offset);
}

ssize_t pwrite64(int fd, const void *data, size_t count, off_t offset) {
    return pwrite(fd, data, count, offset);
}

ssize_t writev(int fd, const struct iovec *iov, int n) {
    /* one buffer at a time through write: short writes are allowed */
    ssize_t total = 0;
    for (int i = 0; i < n; i++) {
        ssize_t wrote = write(fd, iov[i].iov_base, iov[i].iov_len);
        if (wrote < 0) return total > 0 ? total : -1;
        total += wrote;
        if ((size_t)wrote < iov[i].iov_len) break;
    }
    return total;
}

/* ---- stdio: a cookie stream over a real descriptor ------------------------------ */

static ssize_t cookie_read(void *cookie, char *buffer, size_t size) {
    return read((int)(intptr_t)cookie, buffer, size);
}

/* All of buffer, or 0 with errno set (stdio then sets the error flag), as
 * glibc's own file streams retry a short write. */
static ssize_t cookie_write(void *cookie, const char *buffer, size_t size) {
    size_t done = 0;
    while (done < size) {
        ssize_t wrote = write((int)(intptr_t)cookie, buffer + done, size - done);
        if (wrote < 0 && errno == EINTR) continue;
        if (wrote <= 0) return 0;
        done += (size_t)wrote;
    }
    return (ssize_t)done;
}

static int cookie_seek(void *cookie, off64_t *offset, int whence) {
    off_t at = lseek((int)(intptr_t)cookie, (off_t)*offset, whence);
    if (at < 0) return -1;
    *offset = at;
    return 0;
}

static int cookie_close(void *cookie) {
    return close((int)(intptr_t)cookie);
}

static int stdio_flags(const char *mode) {
    int flags = strchr(mode, '+') ? O_RDWR : (mode[0] == 'r' ? O_RDONLY : O_WRONLY);
    if (mode[0] == 'w') flags |= O_CREAT | O_TRUNC;
    if (mode[0] == 'a') flags |= O_CREAT | O_APPEND;
    return flags;
}

static FILE *fopen_common(const char *path, const char *mode, bool large) {
    typedef FILE *(*fopen_fn)(const char *, const char *);
    REAL(fopen, fopen_fn);
    REAL(fopen64, fopen_fn);
    const int flags = stdio_flags(mode);
    if (writes(flags) && under_readonly(path)) {
        errno = EROFS;
        return NULL;
    }
    if (!(writes(flags) && matches_full(path)))
        return large ? real_fopen64(path, mode) : real_fopen(path, mode);
    int fd = open_common(AT_FDCWD, path, flags, 0666, false);
    if (fd < 0) return NULL;
    cookie_io_functions_t io = {cookie_read, cookie_write, cookie_seek, cookie_close};
    FILE *stream = fopencookie((void *)(intptr_t)fd, mode, io);
    if (!stream) close(fd);
    return stream;
}

FILE *fopen(const char *path, const char *mode) {
    return fopen_common(path, mode, false);
}

FILE *fopen64(const char *path, const char *mode) {
    return fopen_common(path, mode, true);
}

/* ---- the directory calls of a read-only tree ------------------------------------ */

int mkdir(const char *path, mode_t mode) {
    typedef int (*mkdir_fn)(const char *, mode_t);
    REAL(mkdir, mkdir_fn);
    struct stat info;
    if (under_readonly(path) && stat(path, &info) == 0) {
        errno = EEXIST; /* as a read-only file system says of an existing path */
        return -1;
    }
    if (under_readonly(path)) {
        errno = EROFS;
        return -1;
    }
    return real_mkdir(path, mode);
}

int rename(const char *from, const char *to) {
    typedef int (*rename_fn)(const char *, const char *);
    REAL(rename, rename_fn);
    if (under_readonly(from) || under_readonly(to)) {
        errno = EROFS;
        return -1;
    }
    return real_rename(from, to);
}

int unlink(const char *path) {
    typedef int (*unlink_fn)(const char *);
    REAL(unlink, unlink_fn);
    if (under_readonly(path)) {
        errno = EROFS;
        return -1;
    }
    return real_unlink(path);
}

int remove(const char *path) {
    typedef int (*remove_fn)(const char *);
    REAL(remove, remove_fn);
    if (under_readonly(path)) {
        errno = EROFS;
        return -1;
    }
    return real_remove(path);
}
