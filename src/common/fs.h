/* Directories: create a path, and hold a directory for a run's life.
 * Owns: nothing (the lock is the caller's file descriptor). */
#ifndef CMOE_COMMON_FS_H
#define CMOE_COMMON_FS_H

#include "common/status.h"

/* mkdir -p: creates path and its missing parents. */
cm_status cm_make_dirs(const char *path);

/* Takes the advisory lock DIR/run.lock (flock, exclusive, without waiting)
 * and writes this process's pid, host and start time into it; *fd holds the
 * lock until cm_unlock_dir. The kernel drops the lock when the process dies,
 * so a killed run leaves no stale lock. A lock another process holds is
 * CM_ERR_INVALID naming the holder. On a file system without locks (flock
 * fails otherwise) the run goes on unlocked: *fd = -1 and CM_OK. */
cm_status cm_lock_dir(const char *dir, int *fd);
void cm_unlock_dir(int fd); /* fd < 0: nothing */

#endif
