#include "cli/cli_util.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "train/checkpoint.h"

int cli_usage(const char *command, const char *fmt, const char *arg) {
    fprintf(stderr, "cmoe %s: ", command);
    fprintf(stderr, fmt, arg);
    fprintf(stderr, " (see cmoe %s --help)\n", command);
    return 2;
}

bool cli_is_option(const char *arg, const char *const *options) {
    for (; *options; options++)
        if (strcmp(arg, *options) == 0) return true;
    return false;
}

int cli_parse(const cli_spec *spec, int argc, char **argv, void *args, const char **positional) {
    for (int i = 0; i < argc; i++) {
        const char *arg = argv[i];
        if (strcmp(arg, "--help") == 0 || strcmp(arg, "-h") == 0) {
            fputs(spec->help, stdout);
            return 0;
        }
        int status = CLI_UNKNOWN;
        if (cli_is_option(arg, spec->with_value)) {
            if (i + 1 == argc) return cli_usage(spec->command, "%s needs a value", arg);
            status = spec->option(arg, argv[++i], args);
        } else if (arg[0] == '-') {
            status = spec->option(arg, NULL, args);
        } else if (!*positional) {
            *positional = arg;
            continue;
        }
        if (status == CLI_UNKNOWN) return cli_usage(spec->command, "unexpected argument '%s'", arg);
        if (status >= 0) return status;
    }
    return -1;
}

bool cli_parse_integer(const char *text, long long low, long long high, long long *out) {
    char *end;
    errno = 0;
    long long value = strtoll(text, &end, 10);
    if (end == text || *end || errno || value < low || value > high) return false;
    *out = value;
    return true;
}

cm_status cli_read_file(const char *path, const char *option, unsigned char **out, size_t *length) {
    FILE *file = fopen(path, "rb");
    if (!file) return CM_ERR(CM_ERR_IO, "cannot open %s %s: %s", option, path, strerror(errno));
    size_t capacity = 4096, used = 0;
    unsigned char *bytes = malloc(capacity);
    for (size_t got; bytes && (got = fread(bytes + used, 1, capacity - used, file)) > 0;) {
        used += got;
        unsigned char *larger = used == capacity ? realloc(bytes, capacity *= 2) : bytes;
        if (!larger) free(bytes);
        bytes = larger;
    }
    bool failed = ferror(file);
    fclose(file);
    if (!bytes) return CM_ERR(CM_ERR_NOMEM, "out of memory reading %s %s", option, path);
    if (failed) {
        free(bytes);
        return CM_ERR(CM_ERR_IO, "cannot read %s %s", option, path);
    }
    *out = bytes;
    *length = used;
    return CM_OK;
}

/* The checkpoint's own recipe, without overrides. */
static cm_status stored_recipe(const char *checkpoint, cm_recipe *recipe) {
    char *text;
    CM_TRY(ckpt_read_recipe(checkpoint, &text));
    cm_status status = recipe_load_text(text, checkpoint, NULL, 0, recipe);
    free(text);
    return status;
}

cm_status cli_checkpoint_recipe(const char *checkpoint, const char *recipe_path,
                                const char *const *overrides, int n_overrides, cm_recipe *recipe) {
    cm_recipe stored;
    cm_status status = stored_recipe(checkpoint, &stored);
    if (status != CM_OK && !recipe_path) return status;
    if (status != CM_OK) {
        fprintf(stderr,
                "[cmoe] warning: %s; the model keys of %s are not checked against the "
                "checkpoint\n",
                cm_error_message(), recipe_path);
        return recipe_load(recipe_path, overrides, n_overrides, recipe);
    }
    if (recipe_path)
        CM_TRY(recipe_load(recipe_path, overrides, n_overrides, recipe));
    else {
        char *text;
        CM_TRY(ckpt_read_recipe(checkpoint, &text));
        status = recipe_load_text(text, checkpoint, overrides, n_overrides, recipe);
        free(text);
        CM_TRY(status);
    }
    char keys[2048];
    int differences = recipe_model_differences(&stored, recipe, keys, sizeof keys);
    if (differences == 0) return CM_OK;
    return CM_ERR(CM_ERR_INVALID,
                  "%s was trained with another model: %s differ%s from its recipe (%s). Leave "
                  "out the recipe and these --set to use the checkpoint's",
                  checkpoint, recipe_path ? recipe_path : "--set", differences == 1 ? "s" : "",
                  keys);
}
