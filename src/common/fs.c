#include "common/fs.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

enum { PATH_CAPACITY = 4096 };

cm_status cm_make_dirs(const char *path) {
    char partial[PATH_CAPACITY];
    size_t length = strlen(path);
    if (length >= sizeof partial) return CM_ERR(CM_ERR_INVALID, "path too long: %s", path);
    memcpy(partial, path, length + 1);
    for (size_t i = 1; i <= length; i++) {
        if (partial[i] != '/' && partial[i] != '\0') continue;
        char saved = partial[i];
        partial[i] = '\0';
        if (mkdir(partial, 0777) != 0 && errno != EEXIST)
            return CM_ERR(CM_ERR_IO, "cannot create directory %s: %s", partial, strerror(errno));
        partial[i] = saved;
    }
    struct stat info;
    if (stat(path, &info) != 0 || !S_ISDIR(info.st_mode))
        return CM_ERR(CM_ERR_IO, "%s: not a directory", path);
    return CM_OK;
}

cm_status cm_lock_dir(const char *dir, int *fd) {
    char path[PATH_CAPACITY + 16];
    snprintf(path, sizeof path, "%s/run.lock", dir);
    *fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (*fd < 0) return CM_ERR(CM_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    if (flock(*fd, LOCK_EX | LOCK_NB) != 0) {
        if (errno != EWOULDBLOCK) { /* a file system without locks (ENOLCK): run unlocked */
            close(*fd);
            *fd = -1;
            return CM_OK;
        }
        char holder[256] = "";
        ssize_t n = pread(*fd, holder, sizeof holder - 1, 0);
        holder[n > 0 ? n : 0] = '\0';
        holder[strcspn(holder, "\n")] = '\0';
        close(*fd);
        *fd = -1;
        return CM_ERR(CM_ERR_INVALID,
                      "%s is in use by another run (%s); wait for it to end or choose another "
                      "train.out_dir",
                      dir, holder[0] ? holder : "holder unknown");
    }
    char host[128] = "unknown", text[384];
    gethostname(host, sizeof host - 1);
    const int length = snprintf(text, sizeof text, "pid %ld on %s since %ld\n", (long)getpid(),
                                host, (long)time(NULL));
    if (ftruncate(*fd, 0) != 0 || pwrite(*fd, text, (size_t)length, 0) != length) {
        cm_unlock_dir(*fd);
        *fd = -1;
        return CM_ERR(CM_ERR_IO, "%s: cannot write: %s", path, strerror(errno));
    }
    return CM_OK;
}

void cm_unlock_dir(int fd) {
    if (fd >= 0) close(fd); /* closing the descriptor releases the lock */
}
