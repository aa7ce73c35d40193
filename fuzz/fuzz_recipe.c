/* libFuzzer target: the recipe loader (train/recipe.h) on YAML text.
 *
 * Input: a recipe. Leading lines "#set KEY=VALUE" (YAML comments, so the
 * text stays a recipe) also become up to 8 --set overrides. The text is
 * loaded twice: from memory (recipe_load_text, labelled as a file in the
 * target's temporary directory) and from that file (recipe_load). The
 * directory holds copies of recipes/ and tests/data/recipes/, so `base:
 * dense.yaml` follows a real chain and `base: cycle_a.yaml` a cycle.
 *
 * Oracles, besides no crash/hang/leak: both loads agree, and a loaded recipe
 * printed with recipe_format loads back to the same struct (recipe.h's
 * promise, which checkpoints rely on). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_util.h"
#include "train/recipe.h"

enum { MAX_OVERRIDES = 8 };

/* Copies every *.yaml of source/dir into the temporary directory. */
static void copy_recipes(const char *dir) {
    char command[1024];
    snprintf(command, sizeof command, "cp %s/%s/*.yaml '%s'/", CMOE_SOURCE_DIR, dir,
             fuzz_temp_dir());
    if (system(command) != 0) fuzz_fail("cannot copy the recipes in %s", dir);
}

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    copy_recipes("recipes/lm");
    copy_recipes("recipes/cnn");
    copy_recipes("tests/data/recipes");
    return 0;
}

/* Splits "#set " lines off the front of text (a NUL-terminated copy) into
 * overrides, which point into `lines` (a second copy, cut at the newlines). */
static int take_overrides(char *lines, const char **overrides) {
    int count = 0;
    char *cursor = lines;
    while (count < MAX_OVERRIDES && strncmp(cursor, "#set ", 5) == 0) {
        char *end = strchr(cursor, '\n');
        if (end) *end = '\0';
        overrides[count++] = cursor + 5;
        if (!end) break;
        cursor = end + 1;
    }
    return count;
}

/* recipe_format's text of `recipe` must load back to the same struct. */
static void check_round_trip(const cm_recipe *recipe) {
    size_t length = recipe_format(recipe, NULL, 0);
    char *text = malloc(length + 1);
    if (!text) fuzz_fail("out of memory");
    if (recipe_format(recipe, text, length + 1) != length) fuzz_fail("recipe_format length");
    cm_recipe reloaded;
    cm_status status = recipe_load_text(text, "formatted.yaml", NULL, 0, &reloaded);
    if (status != CM_OK)
        fuzz_fail("the formatted recipe does not load: %s\n%s", cm_error_message(), text);
    char key[128] = "";
    if (memcmp(recipe, &reloaded, sizeof *recipe) != 0) {
        recipe_first_difference(recipe, &reloaded, key, sizeof key);
        fuzz_fail("the formatted recipe loads differently (first at %s):\n%s", key, text);
    }
    free(text);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *text = malloc(size + 1), *lines = malloc(size + 1);
    if (!text || !lines) fuzz_fail("out of memory");
    memcpy(text, data, size);
    text[size] = '\0';
    memcpy(lines, text, size + 1);
    const char *overrides[MAX_OVERRIDES];
    int n_overrides = take_overrides(lines, overrides);

    char path[512];
    fuzz_temp_path("input.yaml", path, sizeof path);
    /* Written first: a `base: input.yaml` of the text load reads this file. */
    fuzz_write_file(path, data, size, 0);
    cm_recipe from_text, from_file;
    cm_status text_status = recipe_load_text(text, path, overrides, n_overrides, &from_text);
    if (text_status == CM_OK) check_round_trip(&from_text);

    /* The file holds the bytes as given (NULs included, which the text load
     * stops at), so only a NUL-free input must load the same both ways. */
    cm_status file_status = recipe_load(path, overrides, n_overrides, &from_file);
    if (file_status == CM_OK) check_round_trip(&from_file);
    if (!memchr(data, '\0', size)) {
        if (file_status != text_status)
            fuzz_fail("recipe_load says %s, recipe_load_text %s", cm_status_name(file_status),
                      cm_status_name(text_status));
        if (file_status == CM_OK && memcmp(&from_text, &from_file, sizeof from_text) != 0)
            fuzz_fail("recipe_load and recipe_load_text give different recipes");
    }
    cm_error_clear();
    free(text);
    free(lines);
    return 0;
}
