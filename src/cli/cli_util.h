/* Helpers shared by the checkpoint commands (sample, route): parsing a count,
 * reading a whole input file, and the recipe a checkpoint is used with.
 * Owns: nothing (read_whole_file's buffer goes to the caller). */
#ifndef CMOE_CLI_CLI_UTIL_H
#define CMOE_CLI_CLI_UTIL_H

#include <stdbool.h>
#include <stddef.h>

#include "common/status.h"
#include "train/recipe.h"

/* "cmoe COMMAND: " and fmt with arg (one %s), then " (see cmoe COMMAND
 * --help)", on stderr; returns the usage exit status, 2. */
int cli_usage(const char *command, const char *fmt, const char *arg);

/* Whether arg is one of `options` (NULL-terminated). */
bool cli_is_option(const char *arg, const char *const *options);

/* A command's arguments: options with a value (`with_value`, NULL-
 * terminated), flags, and one positional argument. `option` gets each option
 * with its value, and each other argument starting with '-' with value NULL;
 * it returns -1 when it took it, CLI_UNKNOWN for a flag it does not know, or
 * an exit status (after a usage message: cli_usage). */
enum { CLI_UNKNOWN = -2 };
typedef struct cli_spec {
    const char *command; /* "route": for the messages */
    const char *help;    /* --help and -h print it */
    const char *const *with_value;
    int (*option)(const char *name, const char *value, void *args);
} cli_spec;

/* Parses argv into args (through spec->option) and *positional; returns -1
 * when parsed, else the exit status (0 after --help, 2 for bad usage). */
int cli_parse(const cli_spec *spec, int argc, char **argv, void *args, const char **positional);

/* A decimal integer in [low, high] filling all of `text`. */
bool cli_parse_integer(const char *text, long long low, long long high, long long *out);

/* All the bytes of `path` (malloc'd; *length may be 0). `option` names the
 * file in messages (e.g. "--prompt-file"). */
cm_status cli_read_file(const char *path, const char *option, unsigned char **out, size_t *length);

/* The recipe of recipe_path when given, else the one stored in the
 * checkpoint, with the --set overrides applied. CM_ERR_INVALID, listing the
 * keys, when the result differs from the checkpoint's recipe on a key that
 * defines the model (recipe_model_differences). A checkpoint without a
 * readable recipe: an error without recipe_path, a warning with it. */
cm_status cli_checkpoint_recipe(const char *checkpoint, const char *recipe_path,
                                const char *const *overrides, int n_overrides, cm_recipe *recipe);

#endif
