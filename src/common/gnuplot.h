/* Plots with gnuplot, safely: every plot is a script written into a
 * directory beside its data (NAME.gp, rerunnable with `cd DIR && gnuplot
 * NAME.gp`) and run by gnuplot in a child process whose working directory is
 * that directory (fork, chdir, exec: no shell). Scripts name their files
 * relative to it, so no path is interpolated into gnuplot or shell text;
 * titles go through gnuplot_sanitize. Owns: nothing. */
#ifndef CMOE_COMMON_GNUPLOT_H
#define CMOE_COMMON_GNUPLOT_H

#include <stddef.h>
#include <stdio.h>

#include "common/status.h"

/* `text` with every character but [A-Za-z0-9._+-,] and spaces replaced by
 * '_', safe inside a single-quoted gnuplot string. */
void gnuplot_sanitize(const char *text, char *out, size_t size);
/* Opens DIR/NAME for writing (CM_ERR_IO naming the path). */
cm_status gnuplot_open(const char *dir, const char *name, FILE **file);
/* Closes the script DIR/SCRIPT (opened with gnuplot_open) and runs `gnuplot
 * SCRIPT` in DIR; `what` names the output in the error message. */
cm_status gnuplot_run(const char *dir, const char *script, FILE *file, const char *what);

#endif
