/* cmoe command line: the only place that prints errors and picks exit codes.
 * Exit codes: 0 success, 1 the work failed (message on stderr), 2 bad usage,
 * 130 training stopped by SIGINT/SIGTERM after saving a checkpoint. */
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli_util.h"
#include "cli/commands.h"
#include "common/fs.h"
#include "common/log.h"
#include "parallel/comm.h"
#include "train/checkpoint.h"
#include "train/metrics.h"
#include "train/recipe.h"
#include "train/run.h"

#define CMOE_VERSION "0.1.0"
#define LN2          0.69314718055994530942

enum { EXIT_USAGE = 2, EXIT_INTERRUPTED = 130, MAX_OVERRIDES = 64 };

static const char usage_text[] =
    "usage: cmoe COMMAND [ARGS]\n"
    "\n"
    "commands:\n"
    "  train RECIPE    train a model described by a YAML recipe\n"
    "  eval --ckpt CKPT  evaluate a checkpoint on a data split (its own recipe, or RECIPE)\n"
    "  inspect CKPT    print a checkpoint's step, parameters and recipe\n"
    "  plot RUN_DIR    render RUN_DIR/curves.png from RUN_DIR/metrics.jsonl\n"
    "  bench RECIPE    time training steps (tokens/s, GFLOP/s, peak RSS, allocations)\n"
    "  study STUDY     reproduce a paper's ablation: every arm and seed, the statistics,\n"
    "                  a verdict per claim (studies/*.yaml)\n"
    "  sample CKPT     generate text from a language-model checkpoint (key/value cache)\n"
    "  route CKPT      which experts a model's MoE layers send each byte (or image) to\n"
    "  upcycle CKPT    turn a dense language-model checkpoint into an MoE checkpoint\n"
    "  merge CKPT      merge the experts of an MoE language model into fewer groups\n"
    "                  (MC-SMoE)\n"
    "\n"
    "Run `cmoe COMMAND --help` for the options of each command.\n"
    "Recipes: recipes/lm/*.yaml (language models), recipes/cnn/*.yaml (image\n"
    "classifiers, adversarial training); every key is described in docs/recipes.md.\n";

static const char train_help[] =
    "usage: cmoe train RECIPE [--set SECTION.KEY=VALUE]... [--resume PATH|auto]\n"
    "                  [--init CKPT] [--stop-at STEP] [--quiet] [--inject-failure RANK:STEP]\n"
    "\n"
    "Trains the model of RECIPE and writes, into the run directory (train.out_dir,\n"
    "default runs/NAME): metrics.jsonl, checkpoints ckpt-STEP.h5 and curves.png.\n"
    "model.arch resnet (recipes/cnn/) trains an image classifier with\n"
    "adversarial.mode standard, pgd_at, trades or advmoe and ends with the test\n"
    "standard and robust accuracy (SA, RA) in metrics.jsonl; under mpirun it is data\n"
    "parallel (the whole model on every rank, each rank a share of the batch).\n"
    "\n"
    "  --set K=V       override a recipe key, e.g. --set optim.lr=1e-3 (repeatable)\n"
    "  --resume PATH   continue from a checkpoint file\n"
    "  --resume auto   continue from the newest checkpoint of the run, if any\n"
    "  --init CKPT     start at step 0 from the parameters of CKPT (a checkpoint of\n"
    "                  the same model, e.g. from cmoe upcycle) with fresh optimizer\n"
    "                  state and the recipe's schedule; with --resume auto, only\n"
    "                  when the run has no checkpoint yet\n"
    "  --stop-at STEP  save a checkpoint and stop after step STEP (exit status 130),\n"
    "                  e.g. to fit a job time limit; the schedule still spans\n"
    "                  train.steps, so --resume auto continues the same run\n"
    "  --quiet         no progress output\n"
    "  --inject-failure RANK:STEP\n"
    "                  for tests of the error paths: world rank RANK fails when it\n"
    "                  starts step STEP, and the whole job must end with its message\n"
    "\n"
    "Ctrl-C (SIGINT), SIGTERM or SIGUSR1 saves a checkpoint at the current step and\n"
    "exits with status 130; `--resume auto` then continues exactly where it stopped.\n"
    "During the final evaluation it stops the evaluation (the last step's checkpoint\n"
    "is saved already). Under mpirun send SIGUSR1 to mpirun (kill -USR1 PID): it\n"
    "forwards it to every rank and exits 130 with them. mpirun answers Ctrl-C by\n"
    "terminating the job itself (status 1; a checkpoint only if one is saved in time).\n";

static const char eval_help[] =
    "usage: cmoe eval [RECIPE] --ckpt PATH [--split valid|test|train] [--max-batches N]\n"
    "                 [--set SECTION.KEY=VALUE]... [--sweep-k [--out DIR]]\n"
    "\n"
    "Loads checkpoint PATH into the model of the recipe stored in it (or of RECIPE)\n"
    "and prints the mean cross-entropy and bits per byte over the split (default:\n"
    "eval.split of the recipe), over every batch unless --max-batches is given.\n"
    "RECIPE and --set may change the data, the evaluation and the routing knobs\n"
    "(router.k, eval_k, top_p, capacity_factor, thor_level), not the model: a\n"
    "difference from the checkpoint's recipe in model.*, moe.* or router.type,\n"
    "gating or bias is an error that lists the keys.\n"
    "\n"
    "MoE models: --set router.k=K evaluates with K experts per token (top-k and\n"
    "SMoE-Dropout routers). --sweep-k evaluates k = 1, 2, 4, ..., num_experts and\n"
    "writes the table and plot (k-sweep.tsv, k-sweep.png) into DIR (default: the\n"
    "checkpoint's directory).\n"
    "\n"
    "model.arch resnet: prints the standard accuracy (SA) and the accuracy under\n"
    "PGD (RA; adversarial.eps, eval_steps, eval_step_size) on the test images\n"
    "(--split train: the training images; there is no validation split), and for\n"
    "an MoE-CNN the router robustness, expert RA, router-only RA and worst-case RA.\n";

static const char inspect_help[] =
    "usage: cmoe inspect CKPT\n"
    "\n"
    "Prints a checkpoint's step and seed, every parameter with its shape and flags,\n"
    "and the recipe it was trained with. The HDF5 layout is in docs/checkpoint.md.\n";

static const char plot_help[] =
    "usage: cmoe plot RUN_DIR\n"
    "\n"
    "Renders RUN_DIR/curves.png (training and validation bits per byte against step)\n"
    "from RUN_DIR/metrics.jsonl with gnuplot.\n";

static int fail(const char *command) {
    fprintf(stderr, "cmoe %s: %s\n", command, cm_error_message());
    return EXIT_FAILURE;
}

static int usage_error(const char *command, const char *fmt, const char *arg) {
    fprintf(stderr, "cmoe %s: ", command);
    fprintf(stderr, fmt, arg);
    fprintf(stderr, " (see cmoe %s --help)\n", command);
    return EXIT_USAGE;
}

static bool is_help(const char *arg) {
    return strcmp(arg, "--help") == 0 || strcmp(arg, "-h") == 0;
}

/* ---- train ------------------------------------------------------------------ */

static volatile sig_atomic_t stop_requested = 0;

static void on_stop_signal(int signal_number) {
    (void)signal_number;
    stop_requested = 1;
    /* A second signal ends the process at once. */
    signal(SIGINT, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
}

volatile sig_atomic_t *cli_catch_stop_signals(void) {
    struct sigaction action = {0};
    action.sa_handler = on_stop_signal;
    sigemptyset(&action.sa_mask);
    sigaction(SIGINT, &action, NULL);
    sigaction(SIGTERM, &action, NULL);
    /* mpirun forwards SIGUSR1 to every rank (it answers SIGINT by killing
     * the job): `kill -USR1 MPIRUN_PID` stops a multi-rank run cleanly. */
    sigaction(SIGUSR1, &action, NULL);
    return &stop_requested;
}

typedef struct train_args {
    const char *recipe_path, *resume, *init;
    const char *overrides[MAX_OVERRIDES];
    int n_overrides;
    bool quiet;
    long long stop_at;
    int fail_rank;
    long long fail_step;
} train_args;

/* Fills *args; returns -1 when parsed, else the exit status (help: 0). */
static int parse_train_args(int argc, char **argv, train_args *args) {
    for (int i = 0; i < argc; i++) {
        if (is_help(argv[i])) {
            fputs(train_help, stdout);
            return 0;
        } else if (strcmp(argv[i], "--set") == 0 && i + 1 < argc) {
            if (args->n_overrides == MAX_OVERRIDES)
                return usage_error("train", "too many --set%s", "");
            args->overrides[args->n_overrides++] = argv[++i];
        } else if (strcmp(argv[i], "--resume") == 0 && i + 1 < argc) {
            args->resume = argv[++i];
        } else if (strcmp(argv[i], "--init") == 0 && i + 1 < argc) {
            args->init = argv[++i];
        } else if (strcmp(argv[i], "--stop-at") == 0 && i + 1 < argc) {
            char *end;
            args->stop_at = strtoll(argv[++i], &end, 10);
            if (*end || args->stop_at < 1)
                return usage_error("train", "--stop-at takes a step >= 1, not '%s'", argv[i]);
        } else if (strcmp(argv[i], "--inject-failure") == 0 && i + 1 < argc) {
            char tail;
            if (sscanf(argv[++i], "%d:%lld%c", &args->fail_rank, &args->fail_step, &tail) != 2 ||
                args->fail_rank < 0 || args->fail_step < 1)
                return usage_error("train", "--inject-failure takes RANK:STEP, not '%s'", argv[i]);
        } else if (strcmp(argv[i], "--quiet") == 0) {
            args->quiet = true;
        } else if (argv[i][0] == '-' || args->recipe_path) {
            return usage_error("train", "unexpected argument '%s'", argv[i]);
        } else {
            args->recipe_path = argv[i];
        }
    }
    if (!args->recipe_path) return usage_error("train", "missing RECIPE%s", "");
    if (args->init && args->resume && strcmp(args->resume, "auto") != 0)
        return usage_error("train", "--init with --resume %s: a resumed run keeps its own weights",
                           args->resume);
    return -1;
}

/* Every rank reads the recipe; an error is the same everywhere, so only rank
 * 0 reports it and all ranks exit without hanging. */
static bool load_recipe_everywhere(const train_args *args, cm_recipe *recipe, cm_comm *comm) {
    if (recipe_load(args->recipe_path, args->overrides, args->n_overrides, recipe) != CM_OK) {
        if (cm_log_rank() == 0) fprintf(stderr, "%s\n", cm_error_message());
        return false;
    }
    if (comm_init(comm, recipe->parallel.expert_parallel) != CM_OK) {
        if (cm_log_rank() == 0) fprintf(stderr, "cmoe train: %s\n", cm_error_message());
        return false;
    }
    return true;
}

static int command_train(int argc, char **argv) {
    train_args args = {0};
    int parsed = parse_train_args(argc, argv, &args);
    if (parsed >= 0) return parsed;
    if (comm_start(&argc, &argv) != CM_OK) return fail("train");
    cm_recipe recipe;
    cm_comm comm;
    if (!load_recipe_everywhere(&args, &recipe, &comm)) {
        comm_stop();
        return EXIT_FAILURE;
    }
    if (!args.quiet && comm.world_rank == 0) {
        char run_dir[4096];
        recipe_run_dir(&recipe, run_dir, sizeof run_dir);
        printf("[cmoe] recipe %s -> %s\n", args.recipe_path, run_dir);
    }
    run_options options = {.resume = args.resume,
                           .init = args.init,
                           .stop_requested = cli_catch_stop_signals(),
                           .quiet = args.quiet,
                           .stop_at_step = args.stop_at,
                           .comm = &comm,
                           .fail_rank = args.fail_rank,
                           .fail_step = args.fail_step};
    run_result result;
    if (run_train(&recipe, &options, &result) != CM_OK) {
        /* The failure may be this rank's alone: end the whole job now. */
        char reason[2300];
        snprintf(reason, sizeof reason, "cmoe train: %s", cm_error_message());
        if (comm.world_size > 1) comm_abort(reason);
        fprintf(stderr, "%s\n", reason);
        comm_free(&comm);
        comm_stop();
        return EXIT_FAILURE;
    }
    comm_free(&comm);
    comm_stop();
    return result.interrupted ? EXIT_INTERRUPTED : 0;
}

/* ---- eval ------------------------------------------------------------------- */

/* The directory of `path` ("." for a bare file name). */
static void directory_of(const char *path, char *dir, size_t size) {
    snprintf(dir, size, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash)
        *slash = '\0';
    else
        snprintf(dir, size, ".");
}

/* Evaluates k = 1, 2, 4, ..., E (and E itself) with the model loaded once,
 * and writes the table and plot into out_dir. */
static cm_status eval_sweep(run_session *session, const cm_recipe *recipe,
                            task_eval_request request, const char *split_name,
                            const char *out_dir) {
    const task_vtable *task = run_session_task(session);
    if (!task->takes_k || !task->takes_k(run_session_task_state(session)))
        return CM_ERR(CM_ERR_INVALID, "--sweep-k needs a model whose routers take a k (an MoE "
                                      "language model with a top-k or SMoE-Dropout router)");
    CM_TRY(cm_make_dirs(out_dir)); /* before the sweep, not after it */
    int ks[32], n = 0;
    for (int k = 1; k < recipe->moe.num_experts && n < 31; k *= 2) ks[n++] = k;
    ks[n++] = recipe->moe.num_experts;
    double bpc[32];
    printf("k\tbpc (%s split)\n", split_name);
    for (int i = 0; i < n; i++) {
        task_eval eval;
        request.k_override = ks[i];
        CM_TRY(run_session_evaluate(session, &request, 0, &eval));
        bpc[i] = eval.headline / LN2;
        printf("%d\t%.4f\n", ks[i], bpc[i]);
        fflush(stdout);
    }
    char title[256];
    snprintf(title, sizeof title, "%s, %s split", recipe->name, split_name);
    CM_TRY(metrics_plot_k_sweep(out_dir, ks, bpc, n, title));
    printf("wrote %s/k-sweep.tsv and %s/k-sweep.png\n", out_dir, out_dir);
    return CM_OK;
}

typedef struct eval_args {
    const char *recipe_path, *checkpoint, *split_name, *out_dir;
    const char *overrides[MAX_OVERRIDES];
    int n_overrides;
    long long max_batches;
    bool sweep;
} eval_args;

/* Fills *args; returns -1 when parsed, else the exit status (help: 0). */
static int parse_eval_args(int argc, char **argv, eval_args *args) {
    for (int i = 0; i < argc; i++) {
        if (is_help(argv[i])) {
            fputs(eval_help, stdout);
            return 0;
        } else if (strcmp(argv[i], "--ckpt") == 0 && i + 1 < argc) {
            args->checkpoint = argv[++i];
        } else if (strcmp(argv[i], "--sweep-k") == 0) {
            args->sweep = true;
        } else if (strcmp(argv[i], "--out") == 0 && i + 1 < argc) {
            args->out_dir = argv[++i];
        } else if (strcmp(argv[i], "--split") == 0 && i + 1 < argc) {
            args->split_name = argv[++i];
        } else if (strcmp(argv[i], "--max-batches") == 0 && i + 1 < argc) {
            char *end;
            args->max_batches = strtoll(argv[++i], &end, 10);
            if (*end || args->max_batches < 0)
                return usage_error("eval", "--max-batches takes a count >= 0, not '%s'", argv[i]);
        } else if (strcmp(argv[i], "--set") == 0 && i + 1 < argc) {
            if (args->n_overrides == MAX_OVERRIDES)
                return usage_error("eval", "too many --set%s", "");
            args->overrides[args->n_overrides++] = argv[++i];
        } else if (argv[i][0] == '-' || args->recipe_path) {
            return usage_error("eval", "unexpected argument '%s'", argv[i]);
        } else {
            args->recipe_path = argv[i];
        }
    }
    if (!args->checkpoint) return usage_error("eval", "needs --ckpt PATH%s", "");
    return -1;
}

static int command_eval(int argc, char **argv) {
    eval_args args = {0};
    int parsed = parse_eval_args(argc, argv, &args);
    if (parsed >= 0) return parsed;
    cm_recipe recipe;
    if (cli_checkpoint_recipe(args.checkpoint, args.recipe_path, args.overrides, args.n_overrides,
                              &recipe) != CM_OK)
        return fail("eval");
    static const char *const split_names[CM_SPLIT_COUNT] = {"valid", "test", "train"};
    task_eval_request request = {recipe.eval.split, (int64_t)args.max_batches, 0, NULL};
    if (args.split_name) {
        int found = -1;
        for (int s = 0; s < CM_SPLIT_COUNT; s++)
            if (strcmp(args.split_name, split_names[s]) == 0) found = s;
        if (found < 0)
            return usage_error("eval", "--split must be valid, test or train, not '%s'",
                               args.split_name);
        request.split = (cm_split)found;
    }
    char out_dir[4096];
    directory_of(args.checkpoint, out_dir, sizeof out_dir);
    if (args.out_dir) snprintf(out_dir, sizeof out_dir, "%s", args.out_dir);
    run_session *session;
    if (run_session_open(&recipe, NULL, false, &session) != CM_OK) return fail("eval");
    cm_status status =
        ckpt_load_sharded(args.checkpoint, run_session_params(session), NULL, false, NULL);
    task_eval eval;
    if (status == CM_OK && args.sweep)
        status = eval_sweep(session, &recipe, request, split_names[request.split], out_dir);
    else if (status == CM_OK)
        status = run_session_evaluate(session, &request, 0, &eval);
    run_session_close(session);
    if (status != CM_OK) return fail("eval");
    if (!args.sweep) printf("%s split: %s\n", split_names[request.split], eval.text);
    return 0;
}

/* ---- inspect, plot ------------------------------------------------------------ */

static int command_inspect(int argc, char **argv) {
    if (argc != 1 || is_help(argv[0])) {
        fputs(inspect_help, argc == 1 ? stdout : stderr);
        return argc == 1 ? 0 : EXIT_USAGE;
    }
    return ckpt_describe(argv[0], stdout) == CM_OK ? 0 : fail("inspect");
}

static int command_plot(int argc, char **argv) {
    if (argc != 1 || is_help(argv[0])) {
        fputs(plot_help, argc == 1 ? stdout : stderr);
        return argc == 1 ? 0 : EXIT_USAGE;
    }
    if (metrics_plot(argv[0]) != CM_OK) return fail("plot");
    printf("wrote %s/curves.png\n", argv[0]);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fputs(usage_text, stderr);
        return EXIT_USAGE;
    }
    const char *command = argv[1];
    if (is_help(command)) {
        fputs(usage_text, stdout);
        return 0;
    }
    if (strcmp(command, "--version") == 0) {
        printf("cmoe %s\n", CMOE_VERSION);
        return 0;
    }
    if (strcmp(command, "train") == 0) return command_train(argc - 2, argv + 2);
    if (strcmp(command, "eval") == 0) return command_eval(argc - 2, argv + 2);
    if (strcmp(command, "inspect") == 0) return command_inspect(argc - 2, argv + 2);
    if (strcmp(command, "plot") == 0) return command_plot(argc - 2, argv + 2);
    if (strcmp(command, "bench") == 0) return command_bench(argc - 2, argv + 2);
    if (strcmp(command, "study") == 0) return command_study(argc - 2, argv + 2);
    if (strcmp(command, "sample") == 0) return command_sample(argc - 2, argv + 2);
    if (strcmp(command, "route") == 0) return command_route(argc - 2, argv + 2);
    if (strcmp(command, "upcycle") == 0) return command_upcycle(argc - 2, argv + 2);
    if (strcmp(command, "merge") == 0) return command_merge(argc - 2, argv + 2);
    fprintf(stderr, "cmoe: unknown command '%s'\n\n%s", command, usage_text);
    return EXIT_USAGE;
}
