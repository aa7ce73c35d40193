/* `cmoe upcycle`: a dense language-model checkpoint into an MoE checkpoint
 * at step 0 (train/upcycle.h), which `cmoe train MOE.yaml --init OUT`
 * continues. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli_util.h"
#include "cli/commands.h"
#include "train/recipe.h"
#include "train/upcycle.h"

enum { MAX_OVERRIDES = 64 };

static const char upcycle_help[] =
    "usage: cmoe upcycle DENSE.h5 --recipe MOE.yaml -o OUT.h5 [--set SECTION.KEY=VALUE]...\n"
    "\n"
    "Turns the dense language model of checkpoint DENSE.h5 into the MoE model of\n"
    "MOE.yaml and writes it to OUT.h5: an ordinary checkpoint at step 0 with fresh\n"
    "optimizer state (every expert, whatever the rank count), which\n"
    "`cmoe train MOE.yaml --init OUT.h5` trains on (mpirun works). Everything but\n"
    "the MLPs of the MoE blocks (moe.every) is copied. Each expert is one of G\n"
    "shards of the dense MLP, G = model.d_ff / expert width (moe.expert_hidden or\n"
    "split_dense), the G shards repeated N / G times (N = moe.num_experts): with\n"
    "router.k = 2 and expert_hidden = d_ff that is E{N}G1T2, full copies.\n"
    "\n"
    "The recipe's upcycle section says how (docs/recipes.md, \"Upcycling\"):\n"
    "  upcycle.router      groups (virtual groups: the G shards of a copy get equal\n"
    "                      router rows; needs router.k a multiple of G), fresh\n"
    "                      (the recipe's random router) or zero\n"
    "  upcycle.scaling     balanced (fc1 and fc2 each by sqrt(A), He et al.), output\n"
    "                      (fc2 by A: exact) or none; A = G for router.gating\n"
    "                      topk_softmax, N G / k for softmax_topk\n"
    "  upcycle.drop_ratio  Drop-Upcycling: re-draw this fraction of each expert's\n"
    "                      hidden units (0: plain upcycling)\n"
    "  upcycle.drop_scope  expert, matrix or layer: which units share an index set\n"
    "e.g. --set upcycle.scaling=none. The dense checkpoint's model sizes\n"
    "(vocab_size, n_layers, d_model, n_heads, d_ff, layernorm_eps) and data.seq_len\n"
    "must be the recipe's; moe.activation must be gelu and router.type topk.\n"
    "OUT.h5 records the dense checkpoint's path, step, seed and recipe\n"
    "(/upcycled_from; `cmoe inspect OUT.h5` shows it).\n"
    "\n"
    "Exit status: 0 done, 1 the checkpoint and recipe cannot be upcycled (the\n"
    "message says why), 2 bad usage.\n";

typedef struct upcycle_args {
    const char *checkpoint, *recipe_path, *out_path;
    const char *overrides[MAX_OVERRIDES];
    int n_overrides;
} upcycle_args;

static int usage(const char *fmt, const char *arg) {
    return cli_usage("upcycle", fmt, arg);
}

/* Fills *args; returns -1 when parsed, else the exit status (help: 0). */
static const char *const upcycle_options[] = {"--recipe", "-o", "--out", "--set", NULL};

/* One option with its value (cli_spec.option); returns -1 when parsed, else
 * the exit status. */
static int parse_option(const char *name, const char *value, void *data) {
    upcycle_args *args = data;
    if (!value) return CLI_UNKNOWN; /* upcycle has no flags */
    if (strcmp(name, "--recipe") == 0) {
        args->recipe_path = value;
    } else if (strcmp(name, "--set") == 0) {
        if (args->n_overrides == MAX_OVERRIDES) return usage("too many --set%s", "");
        args->overrides[args->n_overrides++] = value;
    } else { /* -o, --out */
        args->out_path = value;
    }
    return -1;
}

static int parse_upcycle_args(int argc, char **argv, upcycle_args *args) {
    const cli_spec spec = {"upcycle", upcycle_help, upcycle_options, parse_option};
    int status = cli_parse(&spec, argc, argv, args, &args->checkpoint);
    if (status >= 0) return status;
    if (!args->checkpoint || !args->recipe_path || !args->out_path)
        return usage("needs DENSE.h5, --recipe MOE.yaml and -o OUT.h5%s", "");
    if (strcmp(args->checkpoint, args->out_path) == 0)
        return usage("-o %s would overwrite the dense checkpoint", args->out_path);
    return -1;
}

int command_upcycle(int argc, char **argv) {
    upcycle_args args = {0};
    int parsed = parse_upcycle_args(argc, argv, &args);
    if (parsed >= 0) return parsed;
    cm_recipe recipe;
    if (recipe_load(args.recipe_path, args.overrides, args.n_overrides, &recipe) != CM_OK) {
        fprintf(stderr, "cmoe upcycle: %s\n", cm_error_message());
        return EXIT_FAILURE;
    }
    upcycle_plan plan;
    if (upcycle_checkpoint(args.checkpoint, &recipe, args.out_path, &plan) != CM_OK) {
        fprintf(stderr, "cmoe upcycle: %s\n", cm_error_message());
        return EXIT_FAILURE;
    }
    printf("[cmoe] upcycled %s -> %s: %s, router %s, scaling %s (A = %g: fc1 x %g, fc2 x %g, "
           "fc2 bias x %g), drop_ratio %g (%d of %d units per expert)\n",
           args.checkpoint, args.out_path, plan.label, upcycle_router_names[recipe.upcycle.router],
           upcycle_scaling_names[recipe.upcycle.scaling], plan.activation_scale,
           (double)plan.fc1_scale, (double)plan.fc2_scale, (double)plan.fc2_bias_scale,
           recipe.upcycle.drop_ratio, plan.drop_units, plan.expert_hidden);
    return 0;
}
