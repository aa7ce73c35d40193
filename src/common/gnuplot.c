#include "common/gnuplot.h"

#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

enum { PATH_CAPACITY = 4096 };

void gnuplot_sanitize(const char *text, char *out, size_t size) {
    size_t n = 0;
    for (const char *c = text; *c && n + 1 < size; c++) {
        const bool safe = (*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') ||
                          (*c >= '0' && *c <= '9') || strchr("._+- ,", *c);
        out[n++] = safe ? *c : '_';
    }
    out[n] = '\0';
}

cm_status gnuplot_open(const char *dir, const char *name, FILE **file) {
    char path[PATH_CAPACITY];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    *file = fopen(path, "w");
    if (!*file) return CM_ERR(CM_ERR_IO, "%s: cannot write: %s", path, strerror(errno));
    return CM_OK;
}

cm_status gnuplot_run(const char *dir, const char *script, FILE *file, const char *what) {
    if (fclose(file) != 0) return CM_ERR(CM_ERR_IO, "%s/%s: cannot write", dir, script);
    pid_t child = fork();
    if (child < 0) return CM_ERR(CM_ERR_IO, "cannot start gnuplot: %s", strerror(errno));
    if (child == 0) {
        int null = open("/dev/null", O_WRONLY);
        if (null >= 0) {
            dup2(null, STDOUT_FILENO);
            dup2(null, STDERR_FILENO);
        }
        if (chdir(dir) != 0) _exit(126);
        execlp("gnuplot", "gnuplot", script, (char *)NULL);
        _exit(127);
    }
    int status = 0;
    while (waitpid(child, &status, 0) < 0)
        if (errno != EINTR) return CM_ERR(CM_ERR_IO, "waiting for gnuplot: %s", strerror(errno));
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        return CM_ERR(CM_ERR_IO,
                      "gnuplot failed (%s %d) writing %s/%s; is gnuplot-nox installed "
                      "(scripts/install-deps.sh)?",
                      WIFEXITED(status) ? "exit status" : "signal",
                      WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status), dir, what);
    return CM_OK;
}
