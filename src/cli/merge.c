/* `cmoe merge`: MC-SMoE's merge step on a trained MoE language model
 * (train/merge.h): an ordinary checkpoint at step 0 that `cmoe eval` and
 * `cmoe train --init` take. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli_util.h"
#include "cli/commands.h"
#include "train/merge.h"
#include "train/recipe.h"

enum { MAX_OVERRIDES = 64, DEFAULT_SEED = 2333 };

static const char merge_help[] =
    "usage: cmoe merge CKPT -o OUT.h5 [--recipe R] [--set SECTION.KEY=VALUE]...\n"
    "                  [--groups G] [--calib-windows N] [--seed S] [--grouping msmoe|random]\n"
    "                  [--align on|off] [--weights frequency|uniform] [--mode merge|prune]\n"
    "                  [--layers all|L,L,...] [--quiet]\n"
    "\n"
    "Merges the experts of the MoE language model of checkpoint CKPT into fewer\n"
    "groups per layer (MC-SMoE's M-SMoE, METHODS.md 10; docs/recipes.md \"Merging\n"
    "experts\") and writes OUT.h5: an ordinary checkpoint at step 0 with fresh\n"
    "optimizer state whose recipe has moe.merged: true, which `cmoe eval --ckpt\n"
    "OUT.h5` evaluates and `cmoe train RECIPE --init OUT.h5` trains (RECIPE with\n"
    "moe.merged: true, e.g. --set moe.merged=true; mpirun works).\n"
    "\n"
    "  1. calibration: N random windows of data.seq_len bytes of the training split\n"
    "     (data.path), the model in evaluation mode at router.k; per MoE layer the\n"
    "     count of every selected expert and the router logits;\n"
    "  2. frequencies f = count / total; similarity of two experts = (cos + 1) / 2 of\n"
    "     their router-logit columns;\n"
    "  3. groups per layer from a global frequency ranking (G on average over the\n"
    "     merged layers); the G most-used experts of a layer are dominant, every\n"
    "     other one joins the dominant expert it is most similar to;\n"
    "  4. with --align on, experts 1..N-1 of each merged layer get their hidden\n"
    "     units permuted to match expert 0 (weight matching, exact assignment);\n"
    "  5. each group becomes one expert: sum f_e W_e / (sum f_e + 1e-7).\n"
    "The router is kept as it is: every expert index of a group points to the\n"
    "group's lowest index, which holds the merged weights (blocks.L.moe.group_of);\n"
    "two choices of one group by a token add their gates. The other members' weight\n"
    "slots stay in the file (a copy of the merged weights) and in memory: merging\n"
    "changes the function, not the parameter count.\n"
    "\n"
    "  -o, --out OUT.h5     the merged checkpoint (required)\n"
    "  --recipe R           build the model from recipe R instead of the checkpoint's\n"
    "                       (its model keys must agree; data.path is read from it)\n"
    "  --set K=V            override a recipe key (repeatable)\n"
    "  --groups G           average groups per merged layer, 1..N (default N / 2);\n"
    "                       G = N merges nothing\n"
    "  --calib-windows N    calibration windows (default 256)\n"
    "  --seed S             seed of the windows and of random groups (default 2333)\n"
    "  --grouping msmoe     dominant experts and router-logit similarity (default);\n"
    "             random    the same group counts, random dominants and members\n"
    "  --align on|off       permutation alignment before merging (default on)\n"
    "  --weights frequency  frequency-weighted merge (default); uniform: plain mean\n"
    "  --mode merge|prune   average each group (default), or keep its dominant\n"
    "                       expert's weights\n"
    "  --layers all|L,...   the MoE blocks to merge, by block index (default all);\n"
    "                       the others keep their N experts\n"
    "  --quiet              no progress line\n"
    "\n"
    "Prints each MoE layer's groups: members (* = dominant) with their frequency.\n"
    "Not done: the compression step (low-rank + sparse, METHODS 10.10) and the\n"
    "knowledge-distillation fine-tuning (train the result with cmoe train --init).\n"
    "One process.\n"
    "Exit status: 0 done, 1 the checkpoint cannot be merged (the message says\n"
    "why), 2 bad usage.\n";

typedef struct merge_args {
    const char *checkpoint, *recipe_path, *out_path, *layers;
    const char *overrides[MAX_OVERRIDES];
    int n_overrides;
    long long groups, windows, seed;
    merge_options options;
} merge_args;

static int usage(const char *fmt, const char *arg) {
    return cli_usage("merge", fmt, arg);
}

static const char *const merge_value_options[] = {
    "-o",     "--out",      "--recipe", "--set",  "--groups",  "--calib-windows",
    "--seed", "--grouping", "--align",  "--mode", "--weights", "--layers",
    NULL};

/* The index of `value` in names (NULL-terminated), or -1. */
static int name_index(const char *value, const char *const *names) {
    for (int i = 0; names[i]; i++)
        if (strcmp(value, names[i]) == 0) return i;
    return -1;
}

/* --grouping, --align, --weights, --mode; -1 when parsed, else 2. */
static int parse_choice(const char *name, const char *value, merge_options *o) {
    static const char *const on_off[] = {"off", "on", NULL};
    int index;
    if (strcmp(name, "--grouping") == 0 && (index = name_index(value, merge_grouping_names)) >= 0)
        o->grouping = (merge_grouping)index;
    else if (strcmp(name, "--align") == 0 && (index = name_index(value, on_off)) >= 0)
        o->align = index == 1;
    else if (strcmp(name, "--weights") == 0 &&
             (index = name_index(value, merge_weighting_names)) >= 0)
        o->weights = (merge_weighting)index;
    else if (strcmp(name, "--mode") == 0 && (index = name_index(value, merge_mode_names)) >= 0)
        o->mode = (merge_mode)index;
    else
        return usage("unknown value for its option: '%s'", value);
    return -1;
}

/* One option with its value; -1 when parsed, else the exit status. */
static int parse_option(const char *name, const char *value, void *data) {
    merge_args *args = data;
    if (!value) {
        if (strcmp(name, "--quiet") != 0) return CLI_UNKNOWN;
        args->options.quiet = true;
        return -1;
    }
    if (strcmp(name, "-o") == 0 || strcmp(name, "--out") == 0) {
        args->out_path = value;
    } else if (strcmp(name, "--recipe") == 0) {
        args->recipe_path = value;
    } else if (strcmp(name, "--set") == 0) {
        if (args->n_overrides == MAX_OVERRIDES) return usage("too many --set%s", "");
        args->overrides[args->n_overrides++] = value;
    } else if (strcmp(name, "--groups") == 0) {
        if (!cli_parse_integer(value, 1, 1 << 20, &args->groups))
            return usage("--groups takes a count >= 1, not '%s'", value);
    } else if (strcmp(name, "--calib-windows") == 0) {
        if (!cli_parse_integer(value, 1, 1 << 24, &args->windows))
            return usage("--calib-windows takes a count in 1..16777216, not '%s'", value);
    } else if (strcmp(name, "--seed") == 0) {
        if (!cli_parse_integer(value, 0, 1LL << 62, &args->seed))
            return usage("--seed takes an integer >= 0, not '%s'", value);
    } else if (strcmp(name, "--layers") == 0) {
        args->layers = value;
    } else {
        return parse_choice(name, value, &args->options);
    }
    return -1;
}

/* Fills *args; returns -1 when parsed, else the exit status (help: 0). */
static int parse_merge_args(int argc, char **argv, merge_args *args) {
    const cli_spec spec = {"merge", merge_help, merge_value_options, parse_option};
    int status = cli_parse(&spec, argc, argv, args, &args->checkpoint);
    if (status >= 0) return status;
    if (!args->checkpoint || !args->out_path) return usage("needs CKPT and -o OUT.h5%s", "");
    if (strcmp(args->checkpoint, args->out_path) == 0)
        return usage("-o %s would overwrite the checkpoint", args->out_path);
    return -1;
}

/* --layers "all" or "0,2,...": -1 when parsed, else 2. */
static int parse_layers(const char *text, bool *merge_layer) {
    if (!text || strcmp(text, "all") == 0) return -1;
    char copy[256];
    if (snprintf(copy, sizeof copy, "%s", text) >= (int)sizeof copy)
        return usage("--layers '%s' is too long", text);
    int named = 0;
    for (char *save = NULL, *item = strtok_r(copy, ",", &save); item;
         item = strtok_r(NULL, ",", &save), named++) {
        long long block;
        if (!cli_parse_integer(item, 0, LM_MAX_LAYERS - 1, &block))
            return usage("--layers takes all or block indices like 0,2, not '%s'", text);
        merge_layer[block] = true;
    }
    return named > 0 ? -1 : usage("--layers takes all or block indices like 0,2, not '%s'", text);
}

/* One layer's groups: "  block L: G groups of N" and a line per group. */
static void print_layer(const merge_result *r, int i) {
    const int N = r->experts;
    const int32_t *group_of = r->group_of + (size_t)i * N, *dominant = r->dominant + (size_t)i * N;
    const double *freq = r->freq + (size_t)i * N;
    printf("block %d: %d groups of %d experts%s\n", r->block[i], r->groups[i], N,
           r->merged[i] ? "" : " (not merged)");
    for (int leader = 0; leader < N; leader++) {
        if (group_of[leader] != leader) continue;
        int size = 0;
        double total = 0.0;
        printf("  group %d:", leader);
        for (int e = 0; e < N; e++) {
            if (group_of[e] != leader) continue;
            printf(" %d%s (%.4f)", e, dominant[e] == e && r->merged[i] ? "*" : "", freq[e]);
            size++;
            total += freq[e];
        }
        printf("  size %d, frequency %.4f\n", size, total);
    }
}

static void print_summary(const merge_args *args, const merge_result *r) {
    int groups = 0;
    for (int i = 0; i < r->layers; i++) groups += r->groups[i];
    printf("[cmoe] merged %s -> %s: %d MoE layers, %d groups of %d experts (--groups %d on "
           "average), %lld calibration tokens (%lld selections, k %d), grouping %s, align %s, "
           "weights %s, mode %s\n",
           args->checkpoint, args->out_path, r->layers, groups, r->layers * r->experts,
           args->options.groups, (long long)r->tokens, (long long)r->tokens * r->k, r->k,
           merge_grouping_names[args->options.grouping], args->options.align ? "on" : "off",
           merge_weighting_names[args->options.weights], merge_mode_names[args->options.mode]);
    for (int i = 0; i < r->layers; i++) print_layer(r, i);
}

int command_merge(int argc, char **argv) {
    merge_args args = {.windows = 256, .seed = DEFAULT_SEED, .options = {.align = true}};
    int parsed = parse_merge_args(argc, argv, &args);
    if (parsed < 0) parsed = parse_layers(args.layers, args.options.merge_layer);
    if (parsed >= 0) return parsed;
    cm_recipe recipe;
    if (cli_checkpoint_recipe(args.checkpoint, args.recipe_path, args.overrides, args.n_overrides,
                              &recipe) != CM_OK) {
        fprintf(stderr, "cmoe merge: %s\n", cm_error_message());
        return EXIT_FAILURE;
    }
    const int half = recipe.moe.num_experts / 2;
    args.options.groups = args.groups > 0 ? (int)args.groups : (half > 0 ? half : 1);
    args.options.calib_windows = (int)args.windows;
    args.options.seed = (uint64_t)args.seed;
    merge_result result;
    if (merge_checkpoint(args.checkpoint, &recipe, &args.options, args.out_path, &result) !=
        CM_OK) {
        fprintf(stderr, "cmoe merge: %s\n", cm_error_message());
        return EXIT_FAILURE;
    }
    print_summary(&args, &result);
    merge_result_free(&result);
    return 0;
}
