/* cmoe command line: the only place that prints errors and picks exit codes.
 * Exit codes: 0 success, 1 the work failed (message on stderr), 2 bad usage,
 * 130 training stopped by SIGINT/SIGTERM after saving a checkpoint. */
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/commands.h"
#include "common/log.h"
#include "parallel/comm.h"
#include "train/checkpoint.h"
#include "train/cnn_trainer.h"
#include "train/metrics.h"
#include "train/recipe.h"
#include "train/trainer.h"

#define CMOE_VERSION "0.1.0"
#define LN2          0.69314718055994530942

enum { EXIT_USAGE = 2, EXIT_INTERRUPTED = 130, MAX_OVERRIDES = 64 };

static const char usage_text[] =
    "usage: cmoe COMMAND [ARGS]\n"
    "\n"
    "commands:\n"
    "  train RECIPE    train a model described by a YAML recipe\n"
    "  eval RECIPE     evaluate a checkpoint on a data split\n"
    "  inspect CKPT    print a checkpoint's step, parameters and recipe\n"
    "  plot RUN_DIR    render RUN_DIR/curves.png from RUN_DIR/metrics.jsonl\n"
    "  bench RECIPE    time training steps (tokens/s, GFLOP/s, peak RSS, allocations)\n"
    "\n"
    "Run `cmoe COMMAND --help` for the options of each command.\n"
    "Recipes: recipes/lm/*.yaml (language models), recipes/cnn/*.yaml (image\n"
    "classifiers, adversarial training); every key is described in docs/recipes.md.\n";

static const char train_help[] =
    "usage: cmoe train RECIPE [--set SECTION.KEY=VALUE]... [--resume PATH|auto]\n"
    "                  [--stop-at STEP] [--quiet]\n"
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
    "  --stop-at STEP  save a checkpoint and stop after step STEP (exit status 130),\n"
    "                  e.g. to fit a job time limit; the schedule still spans\n"
    "                  train.steps, so --resume auto continues the same run\n"
    "  --quiet         no progress output\n"
    "\n"
    "Ctrl-C (SIGINT) or SIGTERM saves a checkpoint at the current step and exits\n"
    "with status 130; `--resume auto` then continues exactly where it stopped.\n";

static const char eval_help[] =
    "usage: cmoe eval RECIPE --ckpt PATH [--split valid|test|train] [--max-batches N]\n"
    "                 [--set SECTION.KEY=VALUE]... [--sweep-k [--out DIR]]\n"
    "\n"
    "Loads the weights of checkpoint PATH into the model of RECIPE and prints the\n"
    "mean cross-entropy and bits per byte over the split (default: eval.split of\n"
    "the recipe), over every batch unless --max-batches is given.\n"
    "\n"
    "MoE models: --set router.k=K evaluates with K experts per token (top-k and\n"
    "SMoE-Dropout routers). --sweep-k evaluates k = 1, 2, 4, ..., num_experts and\n"
    "writes the table and plot (k-sweep.tsv, k-sweep.png) into DIR (default: the\n"
    "checkpoint's directory).\n"
    "\n"
    "model.arch resnet: prints the standard accuracy (SA) and the accuracy under\n"
    "PGD (RA; adversarial.eps, eval_steps, eval_step_size) on the test images\n"
    "(--split train: the training images; there is no validation split).\n";

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

static int command_train(int argc, char **argv) {
    const char *recipe_path = NULL, *resume = NULL;
    const char *overrides[MAX_OVERRIDES];
    int n_overrides = 0;
    bool quiet = false;
    long long stop_at = 0;
    for (int i = 0; i < argc; i++) {
        if (is_help(argv[i])) {
            fputs(train_help, stdout);
            return 0;
        } else if (strcmp(argv[i], "--set") == 0 && i + 1 < argc) {
            if (n_overrides == MAX_OVERRIDES) return usage_error("train", "too many --set%s", "");
            overrides[n_overrides++] = argv[++i];
        } else if (strcmp(argv[i], "--resume") == 0 && i + 1 < argc) {
            resume = argv[++i];
        } else if (strcmp(argv[i], "--stop-at") == 0 && i + 1 < argc) {
            char *end;
            stop_at = strtoll(argv[++i], &end, 10);
            if (*end || stop_at < 1)
                return usage_error("train", "--stop-at takes a step >= 1, not '%s'", argv[i]);
        } else if (strcmp(argv[i], "--quiet") == 0) {
            quiet = true;
        } else if (argv[i][0] == '-' || recipe_path) {
            return usage_error("train", "unexpected argument '%s'", argv[i]);
        } else {
            recipe_path = argv[i];
        }
    }
    if (!recipe_path) return usage_error("train", "missing RECIPE%s", "");
    if (comm_start(&argc, &argv) != CM_OK) return fail("train");
    /* Every rank reads the recipe; an error is the same everywhere, so only
     * rank 0 reports it and all ranks exit without hanging. */
    cm_recipe recipe;
    if (recipe_load(recipe_path, overrides, n_overrides, &recipe) != CM_OK) {
        if (cm_log_rank() == 0) fprintf(stderr, "%s\n", cm_error_message());
        comm_stop();
        return EXIT_FAILURE;
    }
    cm_comm comm;
    if (comm_init(&comm, recipe.parallel.expert_parallel) != CM_OK) {
        if (cm_log_rank() == 0) fprintf(stderr, "cmoe train: %s\n", cm_error_message());
        comm_stop();
        return EXIT_FAILURE;
    }
    if (recipe.model.arch == CM_ARCH_RESNET) {
        if (!quiet && comm.world_rank == 0) {
            char run_dir[4096];
            recipe_run_dir(&recipe, run_dir, sizeof run_dir);
            printf("[cmoe] recipe %s -> %s\n", recipe_path, run_dir);
            printf(
                "[cmoe] resnet widths %s x %d blocks, ratio %g, %s, mode %s, batch %d, %lld "
                "steps, data %s\n",
                recipe.model.cnn_widths, recipe.model.cnn_blocks, recipe.model.cnn_ratio,
                recipe.moe.enabled ? "MoE" : "dense",
                (const char *[]){"standard", "pgd_at", "trades", "advmoe"}[recipe.adversarial.mode],
                recipe.data.batch_size, (long long)recipe.train.steps, recipe.data.path);
        }
    } else if (!quiet && comm.world_rank == 0) {
        char run_dir[4096];
        recipe_run_dir(&recipe, run_dir, sizeof run_dir);
        printf("[cmoe] recipe %s -> %s\n", recipe_path, run_dir);
        printf("[cmoe] %d layers, d_model %d, %d heads, d_ff %d, seq_len %d, batch %d, %lld "
               "steps, data %s\n",
               recipe.model.n_layers, recipe.model.d_model, recipe.model.n_heads, recipe.model.d_ff,
               recipe.data.seq_len, recipe.data.batch_size, (long long)recipe.train.steps,
               recipe.data.path);
        if (comm.world_size > 1)
            printf("[cmoe] %d ranks: %d expert-parallel x %d data-parallel\n", comm.world_size,
                   comm.ep_size, comm.dp_size);
    }
    struct sigaction action = {0};
    action.sa_handler = on_stop_signal;
    sigemptyset(&action.sa_mask);
    sigaction(SIGINT, &action, NULL);
    sigaction(SIGTERM, &action, NULL);
    trainer_options options = {resume, &stop_requested, quiet, stop_at, &comm};
    trainer_result result = {0};
    cm_status status;
    if (recipe.model.arch == CM_ARCH_RESNET) {
        cnn_trainer_result cnn_result;
        status = cnn_trainer_run(&recipe, &options, &cnn_result);
        result.interrupted = cnn_result.interrupted;
    } else {
        status = trainer_run(&recipe, &options, &result);
    }
    if (status != CM_OK) {
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

/* Evaluates k = 1, 2, 4, ..., E (and E itself) and writes the table + plot. */
static int eval_sweep(const cm_recipe *recipe, const char *checkpoint, cm_split split,
                      const char *split_name, long long max_batches, const char *out_dir) {
    if (!recipe->moe.enabled) {
        fprintf(stderr, "cmoe eval: --sweep-k needs an MoE recipe (moe.enabled: true)\n");
        return EXIT_USAGE;
    }
    int ks[32], n = 0;
    for (int k = 1; k < recipe->moe.num_experts && n < 31; k *= 2) ks[n++] = k;
    ks[n++] = recipe->moe.num_experts;
    double bpc[32];
    printf("k\tbpc (%s split)\n", split_name);
    for (int i = 0; i < n; i++) {
        double loss;
        int64_t tokens;
        if (trainer_evaluate(recipe, checkpoint, split, max_batches, ks[i], &loss, &tokens, NULL) !=
            CM_OK)
            return fail("eval");
        bpc[i] = loss / LN2;
        printf("%d\t%.4f\n", ks[i], bpc[i]);
        fflush(stdout);
    }
    char dir[4096];
    if (out_dir) {
        snprintf(dir, sizeof dir, "%s", out_dir);
    } else {
        snprintf(dir, sizeof dir, "%s", checkpoint);
        char *slash = strrchr(dir, '/');
        if (slash)
            *slash = '\0';
        else
            snprintf(dir, sizeof dir, ".");
    }
    char title[256];
    snprintf(title, sizeof title, "%s, %s split", recipe->name, split_name);
    if (metrics_plot_k_sweep(dir, ks, bpc, n, title) != CM_OK) return fail("eval");
    printf("wrote %s/k-sweep.tsv and %s/k-sweep.png\n", dir, dir);
    return 0;
}

static int command_eval(int argc, char **argv) {
    const char *recipe_path = NULL, *checkpoint = NULL, *split_name = NULL, *out_dir = NULL;
    const char *overrides[MAX_OVERRIDES];
    int n_overrides = 0;
    long long max_batches = 0;
    bool sweep = false;
    for (int i = 0; i < argc; i++) {
        if (is_help(argv[i])) {
            fputs(eval_help, stdout);
            return 0;
        } else if (strcmp(argv[i], "--ckpt") == 0 && i + 1 < argc) {
            checkpoint = argv[++i];
        } else if (strcmp(argv[i], "--sweep-k") == 0) {
            sweep = true;
        } else if (strcmp(argv[i], "--out") == 0 && i + 1 < argc) {
            out_dir = argv[++i];
        } else if (strcmp(argv[i], "--split") == 0 && i + 1 < argc) {
            split_name = argv[++i];
        } else if (strcmp(argv[i], "--max-batches") == 0 && i + 1 < argc) {
            char *end;
            max_batches = strtoll(argv[++i], &end, 10);
            if (*end || max_batches < 0)
                return usage_error("eval", "--max-batches takes a count >= 0, not '%s'", argv[i]);
        } else if (strcmp(argv[i], "--set") == 0 && i + 1 < argc) {
            if (n_overrides == MAX_OVERRIDES) return usage_error("eval", "too many --set%s", "");
            overrides[n_overrides++] = argv[++i];
        } else if (argv[i][0] == '-' || recipe_path) {
            return usage_error("eval", "unexpected argument '%s'", argv[i]);
        } else {
            recipe_path = argv[i];
        }
    }
    if (!recipe_path || !checkpoint)
        return usage_error("eval", "needs RECIPE and --ckpt PATH%s", "");
    cm_recipe recipe;
    if (recipe_load(recipe_path, overrides, n_overrides, &recipe) != CM_OK) {
        fprintf(stderr, "%s\n", cm_error_message());
        return EXIT_FAILURE;
    }
    static const char *const split_names[CM_SPLIT_COUNT] = {"valid", "test", "train"};
    cm_split split = recipe.eval.split;
    if (split_name) {
        int found = -1;
        for (int s = 0; s < CM_SPLIT_COUNT; s++)
            if (strcmp(split_name, split_names[s]) == 0) found = s;
        if (found < 0)
            return usage_error("eval", "--split must be valid, test or train, not '%s'",
                               split_name);
        split = (cm_split)found;
    }
    if (recipe.model.arch == CM_ARCH_RESNET) {
        if (sweep) return usage_error("eval", "--sweep-k is for the language models%s", "");
        if (split == CM_SPLIT_VALID && split_name)
            return usage_error("eval", "idx data has no validation split; use --split test%s", "");
        cnn_eval_result result;
        if (cnn_trainer_evaluate(&recipe, checkpoint, split, max_batches, &result) != CM_OK)
            return fail("eval");
        char text[2048];
        cnn_eval_describe(&recipe, &result, text, sizeof text);
        printf("%s split: %s\n", split == CM_SPLIT_TRAIN ? "train" : "test", text);
        return 0;
    }
    if (sweep)
        return eval_sweep(&recipe, checkpoint, split, split_names[split], max_batches, out_dir);
    double loss;
    int64_t tokens;
    if (trainer_evaluate(&recipe, checkpoint, split, max_batches, 0, &loss, &tokens, NULL) != CM_OK)
        return fail("eval");
    printf("%s split: loss %.6f nats/byte, bpc %.6f over %lld bytes\n", split_names[split], loss,
           loss / LN2, (long long)tokens);
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
    fprintf(stderr, "cmoe: unknown command '%s'\n\n%s", command, usage_text);
    return EXIT_USAGE;
}
