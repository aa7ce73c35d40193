/* `cmoe route`: which experts a trained model sends its inputs to.
 *
 * Language model: the text is cut as `cmoe eval` cuts a split (windows of
 * data.seq_len bytes from byte 0, data.batch_size windows a forward, the
 * same first_row, so THOR's draws and expert choice's batches are eval's),
 * plus a last partial window for the tail, and each MoE layer's routing of
 * every byte is written out (route_out.c: routing.tsv, experts.tsv,
 * routing.png). Image classifier: the evaluation's clean images per router,
 * expert and true class (class-routes.tsv). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli_util.h"
#include "cli/commands.h"
#include "cli/route_out.h"
#include "common/clock.h"
#include "common/fs.h"
#include "train/checkpoint.h"
#include "train/run.h"
#include "train/task_cnn.h"

enum { MAX_OVERRIDES = 64 };

static const char route_help[] =
    "usage: cmoe route CKPT [--text FILE | --prompt TEXT] [--out DIR] [--recipe R]\n"
    "                  [--set SECTION.KEY=VALUE]... [--show N] [--top N] [--max-batches N]\n"
    "\n"
    "Shows which experts the MoE model of checkpoint CKPT sends its inputs to.\n"
    "\n"
    "Language model (--text or --prompt): every byte of the text goes through the\n"
    "model as `cmoe eval` runs a split: windows of data.seq_len bytes from byte 0,\n"
    "data.batch_size windows a forward (the last, partial window of the tail in a\n"
    "forward of its own), the router's evaluation mode (eval k, THOR's inference\n"
    "draws). Writes into DIR:\n"
    "  routing.tsv  a row per (byte, MoE layer, chosen expert): pos, byte (0-255),\n"
    "               char (C-escaped: \\n, \\t, \\\\, \\xHH), layer (block index), rank\n"
    "               (0 = the largest gate: the top-1 expert), expert, gate\n"
    "  experts.tsv  per layer and expert: the (byte, expert) pairs it received, its\n"
    "               share of the layer's pairs, and the N bytes it receives most\n"
    "  routing.png  the first --show bytes of the text, one panel per MoE layer,\n"
    "               each byte on the colour of its top-1 expert (largest gate)\n"
    "and prints the experts table. Bytes of a partial last window see less\n"
    "context than a full window's, as in generation.\n"
    "\n"
    "Image classifier with MoE convs (model.arch resnet, neither option): the\n"
    "test split's clean images per router, expert and true class, written to\n"
    "DIR/class-routes.tsv and printed (--max-batches N: the first N batches; 0,\n"
    "the default, all).\n"
    "\n"
    "  --text FILE      the text to route (its bytes, unchanged)\n"
    "  --prompt TEXT    the same, from the command line\n"
    "  --out DIR        where the files go (made if missing; default: CKPT's\n"
    "                   directory/route)\n"
    "  --recipe R       build the model from recipe R instead of the checkpoint's (its\n"
    "                   model keys must agree: see cmoe eval --help)\n"
    "  --set K=V        override a recipe key (repeatable), e.g. --set router.eval_k=4\n"
    "  --show N         bytes drawn in routing.png, 1..4096 (default 512)\n"
    "  --top N          bytes listed per expert in experts.tsv, 1..256 (default 8)\n"
    "  --max-batches N  image classifier: batches of the test split (default 0: all)\n"
    "\n"
    "One process: under mpirun every rank would write the same files.\n"
    "Exit status: 0 done, 1 the checkpoint, input or model cannot be routed, 2 bad\n"
    "usage.\n";

typedef struct route_args {
    const char *checkpoint, *recipe_path, *text_path, *prompt, *out_dir;
    const char *overrides[MAX_OVERRIDES];
    int n_overrides;
    long long show, top, max_batches;
} route_args;

static int usage(const char *fmt, const char *arg) {
    return cli_usage("route", fmt, arg);
}

static const char *const route_options[] = {
    "--text", "--prompt", "--out", "--recipe", "--set", "--show", "--top", "--max-batches", NULL};

/* One option with its value (cli_spec.option); returns -1 when parsed, else
 * the exit status. */
static int parse_option(const char *name, const char *value, void *data) {
    route_args *args = data;
    if (!value) return CLI_UNKNOWN; /* route has no flags */
    if (strcmp(name, "--text") == 0) {
        args->text_path = value;
    } else if (strcmp(name, "--prompt") == 0) {
        if (value[0] == '\0') return usage("--prompt is empty%s: give some text to route", "");
        args->prompt = value;
    } else if (strcmp(name, "--out") == 0) {
        args->out_dir = value;
    } else if (strcmp(name, "--recipe") == 0) {
        args->recipe_path = value;
    } else if (strcmp(name, "--set") == 0) {
        if (args->n_overrides == MAX_OVERRIDES) return usage("too many --set%s", "");
        args->overrides[args->n_overrides++] = value;
    } else if (strcmp(name, "--show") == 0) {
        if (!cli_parse_integer(value, 1, ROUTE_MAX_SHOW, &args->show))
            return usage("--show takes a count in 1..4096, not '%s'", value);
    } else if (strcmp(name, "--top") == 0) {
        if (!cli_parse_integer(value, 1, 256, &args->top))
            return usage("--top takes a count in 1..256, not '%s'", value);
    } else if (!cli_parse_integer(value, 0, 1LL << 40, &args->max_batches)) {
        return usage("--max-batches takes a count >= 0, not '%s'", value);
    }
    return -1;
}

/* Fills *args; returns -1 when parsed, else the exit status (help: 0). */
static int parse_route_args(int argc, char **argv, route_args *args) {
    *args = (route_args){.show = 512, .top = 8};
    const cli_spec spec = {"route", route_help, route_options, parse_option};
    int status = cli_parse(&spec, argc, argv, args, &args->checkpoint);
    if (status >= 0) return status;
    if (!args->checkpoint) return usage("missing CKPT%s", "");
    if (args->prompt && args->text_path) return usage("give --text or --prompt, not both%s", "");
    return -1;
}

/* ---- the language model --------------------------------------------------------- */

/* One forward of `rows` windows of `seq_len` bytes starting at window
 * `first` (bytes first * full_len ...), its routing added to *r. */
static cm_status route_batch(ag_ctx *ctx, const lm_model *model, const cm_recipe *recipe,
                             const unsigned char *text, int64_t first, int rows, int seq_len,
                             route_lm_data *r) {
    const int64_t full_len = recipe->data.seq_len, tokens = (int64_t)rows * seq_len;
    ag_ctx_reset(ctx);
    int32_t *ids = ag_alloc_ints(ctx, tokens, "route");
    if (!ids) return ag_ctx_status(ctx);
    const unsigned char *bytes = text + first * full_len;
    for (int64_t i = 0; i < tokens; i++) ids[i] = bytes[i];
    lm_moe_report report;
    lm_forward_args args = {.ids = ids,
                            .batch = rows,
                            .seq_len = seq_len,
                            .seed = (uint64_t)recipe->train.seed,
                            .first_row = (uint64_t)first,
                            .k_override = recipe->router.eval_k,
                            .report = &report,
                            .global_tokens = tokens};
    if (!lm_forward(ctx, model, &args)) return ag_ctx_status(ctx);
    return route_lm_add(r, &report, bytes, first * full_len, (int)tokens);
}

/* Every byte of text[0, n) through the model, as described at the top. */
static cm_status route_lm_text(ag_ctx *ctx, const lm_model *model, const cm_recipe *recipe,
                               const unsigned char *text, size_t n, route_lm_data *r) {
    const int T = recipe->data.seq_len, B = recipe->data.batch_size;
    const int64_t windows = (int64_t)n / T, tail = (int64_t)n - windows * T;
    bool previous = ag_set_grad_enabled(ctx, false);
    cm_status status = CM_OK;
    for (int64_t first = 0; first < windows && status == CM_OK; first += B) {
        const int rows = (int)(windows - first < B ? windows - first : B);
        status = route_batch(ctx, model, recipe, text, first, rows, T, r);
    }
    if (status == CM_OK && tail > 0)
        status = route_batch(ctx, model, recipe, text, windows, 1, (int)tail, r);
    ag_set_grad_enabled(ctx, previous);
    ag_ctx_reset(ctx);
    return status;
}

/* The text of --text or --prompt (malloc'd). */
static cm_status read_text(const route_args *args, unsigned char **out, size_t *length) {
    if (args->prompt) {
        *length = strlen(args->prompt);
        *out = (unsigned char *)strdup(args->prompt);
        return *out ? CM_OK : CM_ERR(CM_ERR_NOMEM, "out of memory");
    }
    CM_TRY(cli_read_file(args->text_path, "--text", out, length));
    if (*length > 0) return CM_OK;
    free(*out);
    return CM_ERR(CM_ERR_INVALID, "--text %s is empty: give some text to route", args->text_path);
}

/* Model, weights, the routing of the text, then the files. */
static cm_status route_language_model(const route_args *args, const cm_recipe *recipe,
                                      const char *out_dir) {
    if (!args->prompt && !args->text_path)
        return CM_ERR(CM_ERR_INVALID, "a language model needs --text FILE or --prompt TEXT");
    if (!recipe->moe.enabled)
        return CM_ERR(CM_ERR_INVALID, "the model of %s is dense (moe.enabled false): no routing",
                      args->checkpoint);
    unsigned char *text;
    size_t n;
    CM_TRY(read_text(args, &text, &n));
    run_session *session = NULL;
    route_lm_data *data = NULL;
    ag_ctx ctx = {0};
    bool ctx_ready = false;
    const double start = cm_now();
    cm_status status = run_session_open(recipe, NULL, false, &session);
    if (status == CM_OK)
        status =
            ckpt_load_sharded(args->checkpoint, run_session_params(session), NULL, false, NULL);
    if (status == CM_OK) status = ag_ctx_init(&ctx, (size_t)recipe->train.arena_mib << 20);
    ctx_ready = status == CM_OK;
    const lm_model *model = session ? task_lm_model(run_session_task_state(session)) : NULL;
    if (status == CM_OK)
        status = route_lm_open(out_dir, model, (int)args->show, (int)args->top, &data);
    if (status == CM_OK) status = route_lm_text(&ctx, model, recipe, text, n, data);
    if (status == CM_OK) status = route_lm_finish(data, text, n, recipe->name);
    if (status == CM_OK)
        fprintf(stderr,
                "[cmoe] routed %zu bytes in %.2f s; wrote %s/routing.tsv, experts.tsv "
                "and routing.png\n",
                n, cm_now() - start, out_dir);
    route_lm_close(data);
    if (ctx_ready) ag_ctx_free(&ctx);
    if (session) run_session_close(session);
    free(text);
    return status;
}

/* ---- the image classifier -------------------------------------------------------- */

static cm_status route_image_model(const route_args *args, cm_recipe *recipe, const char *out_dir) {
    if (args->prompt || args->text_path)
        return CM_ERR(CM_ERR_INVALID,
                      "the model of %s is an image classifier: it routes the "
                      "test split's images, not --text or --prompt",
                      args->checkpoint);
    if (!recipe->moe.enabled || recipe->moe.num_experts < 2)
        return CM_ERR(CM_ERR_INVALID, "the model of %s is dense: no routing", args->checkpoint);
    recipe->adversarial.eval_steps = 0; /* the clean images' routes only */
    run_session *session;
    CM_TRY(run_session_open(recipe, NULL, false, &session));
    cm_status status =
        ckpt_load_sharded(args->checkpoint, run_session_params(session), NULL, false, NULL);
    task_eval eval;
    const task_eval_request request = {CM_SPLIT_TEST, (int64_t)args->max_batches, 0, NULL};
    if (status == CM_OK) status = run_session_evaluate(session, &request, 0, &eval);
    int routers = 0, experts = 0;
    const int64_t *counts =
        status == CM_OK ? task_cnn_class_routes(run_session_task_state(session), &routers, &experts)
                        : NULL;
    if (status == CM_OK)
        status = route_write_classes(out_dir, counts, routers, experts, eval.items);
    run_session_close(session);
    return status;
}

static int fail(void) {
    fflush(stdout);
    fprintf(stderr, "cmoe route: %s\n", cm_error_message());
    return EXIT_FAILURE;
}

int command_route(int argc, char **argv) {
    route_args args;
    int parsed = parse_route_args(argc, argv, &args);
    if (parsed >= 0) return parsed;
    cm_recipe recipe;
    if (cli_checkpoint_recipe(args.checkpoint, args.recipe_path, args.overrides, args.n_overrides,
                              &recipe) != CM_OK)
        return fail();
    char out_dir[4096];
    if (args.out_dir) {
        snprintf(out_dir, sizeof out_dir, "%s", args.out_dir);
    } else {
        const char *slash = strrchr(args.checkpoint, '/');
        int dir_length = slash ? (int)(slash - args.checkpoint) : 1;
        snprintf(out_dir, sizeof out_dir, "%.*s/route", dir_length, slash ? args.checkpoint : ".");
    }
    if (cm_make_dirs(out_dir) != CM_OK) return fail();
    cm_status status = recipe.model.arch == CM_ARCH_TRANSFORMER_LM
                           ? route_language_model(&args, &recipe, out_dir)
                           : route_image_model(&args, &recipe, out_dir);
    return status == CM_OK ? 0 : fail();
}
