/* `cmoe study STUDY.yaml`: a paper's ablation, every arm and seed, the report. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/commands.h"
#include "common/status.h"
#include "parallel/comm.h"
#include "study/study.h"
#include "study/study_run.h"

enum { EXIT_USAGE = 2, EXIT_INTERRUPTED = 130 };

static const char study_help[] =
    "usage: cmoe study STUDY.yaml [--preset P] [--only ARM] [--seeds N] [--out DIR]\n"
    "                  [--report DIR] [--report-only] [--dry-run] [--quiet]\n"
    "\n"
    "Reproduces a paper's ablation: trains every arm of the study with every seed\n"
    "(seed-major: all arms at seed 1, then seed 2, ...), evaluates the final models\n"
    "as the study says (e.g. a k sweep), and writes the report: per metric and arm\n"
    "the mean, sd, 95% confidence interval and per-seed values, and per claim the\n"
    "paired difference with its 95% CI and a verdict (reproduced, contradicted,\n"
    "inconclusive). The study file format is in docs/studies.md.\n"
    "\n"
    "  --preset P     smoke (seconds, for tests), small (this machine), full (the\n"
    "                 papers' settings); default small\n"
    "  --only ARM     run only this arm (the report still covers every arm's runs)\n"
    "  --seeds N      N seeds instead of the preset's\n"
    "  --out DIR      run directories DIR/ARM/seed-S (default runs/study-NAME)\n"
    "  --report DIR   where NAME.md, its plots and README.md go (default docs/studies)\n"
    "  --report-only  run nothing: report what the run directories hold\n"
    "  --dry-run      check the study file (every recipe with every preset) and list\n"
    "                 the runs and whether each is done; run and write nothing\n"
    "  --quiet        no progress output from the runs\n"
    "\n"
    "Resumable: run the same command again after a stop. Finished runs are skipped\n"
    "and a started run resumes from its newest checkpoint (the presets set\n"
    "checkpoint.every). Ctrl-C (SIGINT) or SIGTERM saves the current run's\n"
    "checkpoint and exits with status 130. Under mpirun every run uses all ranks.\n";

static int usage(const char *fmt, const char *arg) {
    fprintf(stderr, "cmoe study: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, " (see cmoe study --help)\n");
    return EXIT_USAGE;
}

/* Fills *o and *path; returns -1 when parsed, else the exit status. */
static int parse_args(int argc, char **argv, study_options *o, const char **path) {
    for (int i = 0; i < argc; i++) {
        const bool has_value = i + 1 < argc;
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            fputs(study_help, stdout);
            return 0;
        } else if (strcmp(argv[i], "--preset") == 0 && has_value) {
            o->preset = argv[++i];
        } else if (strcmp(argv[i], "--only") == 0 && has_value) {
            o->only_arm = argv[++i];
        } else if (strcmp(argv[i], "--seeds") == 0 && has_value) {
            char *end;
            long seeds = strtol(argv[++i], &end, 10);
            if (*end || seeds < 1 || seeds > STUDY_MAX_SEEDS)
                return usage("--seeds takes a count from 1 to 16, not '%s'", argv[i]);
            o->seeds = (int)seeds;
        } else if (strcmp(argv[i], "--out") == 0 && has_value) {
            o->out_dir = argv[++i];
        } else if (strcmp(argv[i], "--report") == 0 && has_value) {
            o->report_dir = argv[++i];
        } else if (strcmp(argv[i], "--dry-run") == 0) {
            o->dry_run = true;
        } else if (strcmp(argv[i], "--report-only") == 0) {
            o->report_only = true;
        } else if (strcmp(argv[i], "--quiet") == 0) {
            o->quiet = true;
        } else if (argv[i][0] == '-' || *path) {
            return usage("unexpected argument '%s'", argv[i]);
        } else {
            *path = argv[i];
        }
    }
    if (!*path) return usage("missing STUDY.yaml%s", "");
    return -1;
}

/* "cmoe study ARGS...", as the report quotes it: the command that ran the
 * runs, so without --report-only, and with the preset named even when it was
 * the default (a report made again later reads the same). */
static void command_line(int argc, char **argv, const char *preset, char *out, size_t size) {
    size_t length = (size_t)snprintf(out, size, "cmoe study");
    bool named = false;
    for (int i = 0; i < argc && length < size; i++) {
        named |= strcmp(argv[i], "--preset") == 0;
        if (strcmp(argv[i], "--report-only") != 0)
            length += (size_t)snprintf(out + length, size - length, " %s", argv[i]);
    }
    if (!named && length < size) snprintf(out + length, size - length, " --preset %s", preset);
}

int command_study(int argc, char **argv) {
    study_options options = {.preset = "small"};
    const char *path = NULL;
    int parsed = parse_args(argc, argv, &options, &path);
    if (parsed >= 0) return parsed;
    char command[1024];
    command_line(argc, argv, options.preset, command, sizeof command);
    options.command = command;
    if (comm_start(&argc, &argv) != CM_OK) {
        fprintf(stderr, "cmoe study: %s\n", cm_error_message());
        return EXIT_FAILURE;
    }
    static study s; /* large: not on the stack */
    cm_status status = study_load(path, &s);
    options.stop_requested = cli_catch_stop_signals();
    bool interrupted = false;
    if (status == CM_OK) status = study_run(&s, &options, &interrupted);
    if (status != CM_OK) {
        char reason[2300];
        snprintf(reason, sizeof reason, "cmoe study: %s", cm_error_message());
        int size = 1;
        MPI_Comm_size(MPI_COMM_WORLD, &size);
        if (size > 1) comm_abort(reason);
        fprintf(stderr, "%s\n", reason);
        comm_stop();
        return EXIT_FAILURE;
    }
    comm_stop();
    if (interrupted) printf("[study] stopped; run the same command again to continue\n");
    return interrupted ? EXIT_INTERRUPTED : 0;
}
