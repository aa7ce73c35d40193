/* Recipe loading: YAML events -> assignments (key, value text, where it came
 * from) -> a cm_recipe. Files are parsed with libyaml's event API so every key
 * and value keeps its line:col. A file's `base:` is loaded first and its
 * assignments come before the file's own, so later ones win; --set overrides
 * come last. Values are typed and range-checked by recipe_keys.c. */
#include "train/recipe_internal.h"

#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <yaml.h>

#include "common/check.h"

enum {
    MAX_BASE_DEPTH = 16,
    MAX_FILE_BYTES = 1 << 20, /* recipes are a few hundred bytes */
    MESSAGE_CAP = 1024,
};

/* One `key: value` from a file or one --set, in the order they apply. */
typedef struct assignment {
    int key_index;
    char *text; /* owned */
    bool plain, is_null;
    const char *origin; /* a file path or "--set a.b=c", owned by the loader */
    int line, column;   /* 1-based position of the value; 0 for --set */
} assignment;

typedef struct assignment_list {
    assignment *items;
    size_t count, capacity;
} assignment_list;

typedef struct loaded_file {
    dev_t device;
    ino_t inode;
    const char *path;
} loaded_file;

typedef struct loader {
    assignment_list assignments;
    char **origins; /* every path and --set text that assignments point to */
    size_t origin_count, origin_capacity;
    loaded_file chain[MAX_BASE_DEPTH]; /* the base: chain being loaded, for cycles */
    int depth;
} loader;

/* ---- errors and small helpers --------------------------------------------------- */

/* "origin:line:col: message", or "origin: message" when line is 0. */
static cm_status fail_at(cm_status code, const char *origin, int line, int column, const char *fmt,
                         ...) __attribute__((format(printf, 5, 6)));
static cm_status fail_at(cm_status code, const char *origin, int line, int column, const char *fmt,
                         ...) {
    char message[MESSAGE_CAP];
    va_list args;
    va_start(args, fmt);
    vsnprintf(message, sizeof message, fmt, args);
    va_end(args);
    if (line > 0) return CM_ERR(code, "%s:%d:%d: %s", origin, line, column, message);
    return CM_ERR(code, "%s: %s", origin, message);
}

static cm_status list_push(assignment_list *list, assignment item) {
    if (list->count == list->capacity) {
        size_t capacity = list->capacity ? 2 * list->capacity : 16;
        assignment *grown = realloc(list->items, capacity * sizeof *grown);
        if (!grown) return CM_ERR(CM_ERR_NOMEM, "out of memory while loading a recipe");
        list->items = grown;
        list->capacity = capacity;
    }
    list->items[list->count++] = item;
    return CM_OK;
}

static void list_free(assignment_list *list) {
    for (size_t i = 0; i < list->count; i++) free(list->items[i].text);
    free(list->items);
    *list = (assignment_list){0};
}

/* Keeps a copy of `text` alive until loader_free; NULL when out of memory. */
static const char *loader_keep(loader *state, const char *text) {
    if (state->origin_count == state->origin_capacity) {
        size_t capacity = state->origin_capacity ? 2 * state->origin_capacity : 8;
        char **grown = realloc(state->origins, capacity * sizeof *grown);
        if (!grown) return NULL;
        state->origins = grown;
        state->origin_capacity = capacity;
    }
    char *copy = strdup(text);
    if (copy) state->origins[state->origin_count++] = copy;
    return copy;
}

static void loader_free(loader *state) {
    list_free(&state->assignments);
    for (size_t i = 0; i < state->origin_count; i++) free(state->origins[i]);
    free(state->origins);
}

/* " (did you mean 'lr'?)" when `word` looks like a typo of one of `names`,
 * else "; valid <what>: a, b, c". */
static void name_hint(char *buffer, size_t capacity, const char *word, const char *const *names,
                      int count, const char *what) {
    const char *suggestion = recipe_did_you_mean(word, names, count);
    if (suggestion) {
        snprintf(buffer, capacity, " (did you mean '%s'?)", suggestion);
        return;
    }
    int written = snprintf(buffer, capacity, "; valid %s: ", what);
    size_t used = written > 0 ? (size_t)written : 0;
    for (int i = 0; i < count && used < capacity; i++) {
        written = snprintf(buffer + used, capacity - used, "%s%s", i ? ", " : "", names[i]);
        if (written < 0) break;
        used += (size_t)written;
    }
}

enum { MAX_NAMES = 256 };

/* Names of the keys of `section` ("" for top-level keys), in table order. */
static int section_key_names(const char *section, const char **names) {
    int count = 0;
    for (int i = 0; i < recipe_keys_total && count < MAX_NAMES; i++) {
        if (strcmp(recipe_keys[i].section, section) == 0) names[count++] = recipe_keys[i].name;
    }
    return count;
}

/* "unknown key 'lrr' in section 'optim' (did you mean 'lr'?)" */
static void unknown_key_message(char *buffer, size_t capacity, const char *section,
                                const char *name) {
    const char *names[MAX_NAMES] = {0};
    int count = section_key_names(section, names);
    char hint[MESSAGE_CAP / 2];
    name_hint(hint, sizeof hint, name, names, count, "keys");
    snprintf(buffer, capacity, "unknown key '%s' in section '%s'%s", name, section, hint);
}

/* ---- YAML events ---------------------------------------------------------------- */

typedef struct yaml_reader {
    yaml_parser_t parser;
    yaml_event_t event; /* the current event, valid while has_event */
    bool has_event;
    const char *origin;
    const char *text;
    size_t length;
    int depth; /* open mappings and sequences */
} yaml_reader;

enum { RECIPE_MAX_DEPTH = 16 };

static int mark_line(yaml_mark_t mark) {
    return (int)mark.line + 1;
}
static int mark_column(yaml_mark_t mark) {
    return (int)mark.column + 1;
}

static cm_status yaml_failure(const yaml_reader *reader) {
    const yaml_parser_t *parser = &reader->parser;
    switch (parser->error) {
    case YAML_MEMORY_ERROR:
        return CM_ERR(CM_ERR_NOMEM, "%s: out of memory while parsing YAML", reader->origin);
    case YAML_READER_ERROR: {
        /* Reader errors (bad UTF-8, control characters) carry a byte offset only. */
        int line = 1, column = 1;
        for (size_t i = 0; i < parser->problem_offset && i < reader->length; i++) {
            if (reader->text[i] == '\n') {
                line++;
                column = 1;
            } else {
                column++;
            }
        }
        return fail_at(CM_ERR_FORMAT, reader->origin, line, column, "%s", parser->problem);
    }
    default:
        break;
    }
    const char *problem = parser->problem ? parser->problem : "malformed YAML";
    int line = mark_line(parser->problem_mark), column = mark_column(parser->problem_mark);
    if (parser->context) {
        return fail_at(CM_ERR_FORMAT, reader->origin, line, column, "%s (%s at %d:%d)", problem,
                       parser->context, mark_line(parser->context_mark),
                       mark_column(parser->context_mark));
    }
    return fail_at(CM_ERR_FORMAT, reader->origin, line, column, "%s", problem);
}

/* Moves to the next event, rejecting YAML features recipes do not use. */
static cm_status advance(yaml_reader *reader) {
    if (reader->has_event) yaml_event_delete(&reader->event);
    reader->has_event = false;
    if (!yaml_parser_parse(&reader->parser, &reader->event)) return yaml_failure(reader);
    reader->has_event = true;
    const yaml_event_t *event = &reader->event;
    int line = mark_line(event->start_mark), column = mark_column(event->start_mark);
    const yaml_char_t *anchor = NULL, *tag = NULL;
    switch (event->type) {
    case YAML_ALIAS_EVENT:
        return fail_at(CM_ERR_FORMAT, reader->origin, line, column,
                       "YAML aliases are not supported in recipes (use base: to share settings)");
    case YAML_SCALAR_EVENT:
        anchor = event->data.scalar.anchor;
        tag = event->data.scalar.tag;
        break;
    case YAML_MAPPING_START_EVENT:
        anchor = event->data.mapping_start.anchor;
        tag = event->data.mapping_start.tag;
        reader->depth++;
        break;
    case YAML_SEQUENCE_START_EVENT:
        anchor = event->data.sequence_start.anchor;
        tag = event->data.sequence_start.tag;
        reader->depth++;
        break;
    case YAML_MAPPING_END_EVENT:
    case YAML_SEQUENCE_END_EVENT:
        reader->depth--;
        break;
    default:
        break;
    }
    /* A recipe nests 2 levels (section, key); stop a deep nesting at once,
     * before libyaml's scanner spends time quadratic in the depth on it. */
    if (reader->depth > RECIPE_MAX_DEPTH)
        return fail_at(CM_ERR_FORMAT, reader->origin, line, column,
                       "nesting deeper than %d levels: not a recipe", RECIPE_MAX_DEPTH);
    if (anchor) {
        return fail_at(CM_ERR_FORMAT, reader->origin, line, column,
                       "YAML anchors are not supported in recipes (use base: to share settings)");
    }
    if (tag) {
        return fail_at(CM_ERR_FORMAT, reader->origin, line, column,
                       "YAML tags ('%s') are not supported in recipes", (const char *)tag);
    }
    return CM_OK;
}

static const char *node_kind(const yaml_event_t *event) {
    switch (event->type) {
    case YAML_MAPPING_START_EVENT:
        return "a mapping";
    case YAML_SEQUENCE_START_EVENT:
        return "a sequence";
    case YAML_SCALAR_EVENT:
        return "a single value";
    default:
        return "something else";
    }
}

static bool scalar_is_null(const yaml_event_t *event) {
    if (event->data.scalar.style != YAML_PLAIN_SCALAR_STYLE) return false;
    const char *text = (const char *)event->data.scalar.value;
    return !strcmp(text, "") || !strcmp(text, "~") || !strcmp(text, "null") ||
           !strcmp(text, "Null") || !strcmp(text, "NULL");
}

/* The current event is a key's value: a scalar becomes an assignment. */
static cm_status take_value(yaml_reader *reader, int key_index, assignment_list *out) {
    const yaml_event_t *event = &reader->event;
    int line = mark_line(event->start_mark), column = mark_column(event->start_mark);
    char path[96];
    recipe_key_path(&recipe_keys[key_index], path, sizeof path);
    if (event->type != YAML_SCALAR_EVENT) {
        return fail_at(CM_ERR_INVALID, reader->origin, line, column,
                       "expected a single value for %s, got %s", path, node_kind(event));
    }
    const char *text = (const char *)event->data.scalar.value;
    if (strlen(text) != event->data.scalar.length) {
        return fail_at(CM_ERR_INVALID, reader->origin, line, column,
                       "the value of %s contains a NUL character", path);
    }
    char *copy = strdup(text);
    if (!copy) return CM_ERR(CM_ERR_NOMEM, "out of memory while loading a recipe");
    assignment item = {.key_index = key_index,
                       .text = copy,
                       .plain = event->data.scalar.style == YAML_PLAIN_SCALAR_STYLE,
                       .is_null = scalar_is_null(event),
                       .origin = reader->origin,
                       .line = line,
                       .column = column};
    cm_status status = list_push(out, item);
    if (status != CM_OK) free(copy);
    return status;
}

/* Reads a mapping key into `name` (the current event); keys are scalars. */
static cm_status take_key(yaml_reader *reader, char *name, size_t capacity, int *line,
                          int *column) {
    const yaml_event_t *event = &reader->event;
    *line = mark_line(event->start_mark);
    *column = mark_column(event->start_mark);
    if (event->type != YAML_SCALAR_EVENT) {
        return fail_at(CM_ERR_INVALID, reader->origin, *line, *column,
                       "expected a key name, got %s", node_kind(event));
    }
    snprintf(name, capacity, "%s", (const char *)event->data.scalar.value);
    return CM_OK;
}

/* The current event opens a section's mapping; reads it up to its end. */
static cm_status parse_section(yaml_reader *reader, int section_index, int *key_seen_line,
                               assignment_list *out) {
    const char *section = recipe_sections[section_index].name;
    for (;;) {
        CM_TRY(advance(reader));
        if (reader->event.type == YAML_MAPPING_END_EVENT) return CM_OK;
        char name[128];
        int line, column;
        CM_TRY(take_key(reader, name, sizeof name, &line, &column));
        int key_index = recipe_find_key(section, name);
        if (key_index < 0) {
            char message[MESSAGE_CAP];
            unknown_key_message(message, sizeof message, section, name);
            return fail_at(CM_ERR_INVALID, reader->origin, line, column, "%s", message);
        }
        if (key_seen_line[key_index]) {
            return fail_at(CM_ERR_INVALID, reader->origin, line, column,
                           "duplicate key '%s' in section '%s' (first given on line %d)", name,
                           section, key_seen_line[key_index]);
        }
        key_seen_line[key_index] = line;
        CM_TRY(advance(reader));
        CM_TRY(take_value(reader, key_index, out));
    }
}

/* What one file holds: its assignments and its base (if any). */
typedef struct file_contents {
    assignment_list assignments;
    char *base; /* owned; NULL without base: */
    int base_line, base_column;
} file_contents;

static cm_status unknown_top_level(yaml_reader *reader, const char *name, int line, int column) {
    const char *names[MAX_NAMES + 64] = {0};
    int count = 0;
    names[count++] = "base";
    count += section_key_names("", names + count);
    for (int i = 0; i < recipe_sections_total; i++) names[count++] = recipe_sections[i].name;
    /* A mapping value means the user meant a section. */
    bool looks_like_section = reader->event.type == YAML_MAPPING_START_EVENT;
    char hint[MESSAGE_CAP / 2];
    name_hint(hint, sizeof hint, name, names, count, "top-level keys and sections");
    return fail_at(CM_ERR_INVALID, reader->origin, line, column, "unknown %s '%s'%s",
                   looks_like_section ? "section" : "top-level key", name, hint);
}

/* The current event opens the top-level mapping; reads it up to its end. */
static cm_status parse_top_level(yaml_reader *reader, int *key_seen_line, file_contents *out) {
    int section_seen_line[64] = {0};
    CM_ASSERT(recipe_sections_total <= 64, "too many recipe sections");
    for (;;) {
        CM_TRY(advance(reader));
        if (reader->event.type == YAML_MAPPING_END_EVENT) return CM_OK;
        char name[128];
        int line, column;
        CM_TRY(take_key(reader, name, sizeof name, &line, &column));
        CM_TRY(advance(reader));
        const yaml_event_t *value = &reader->event;
        int value_line = mark_line(value->start_mark);
        int value_column = mark_column(value->start_mark);
        int section_index = recipe_find_section(name);
        int key_index = recipe_find_key("", name);
        if (strcmp(name, "base") == 0) {
            if (out->base) {
                return fail_at(CM_ERR_INVALID, reader->origin, line, column,
                               "duplicate key 'base' (first given on line %d)", out->base_line);
            }
            if (value->type != YAML_SCALAR_EVENT || scalar_is_null(value)) {
                return fail_at(CM_ERR_INVALID, reader->origin, value_line, value_column,
                               "base must be the path of another recipe, got %s",
                               value->type == YAML_SCALAR_EVENT ? "nothing" : node_kind(value));
            }
            out->base = strdup((const char *)value->data.scalar.value);
            if (!out->base) return CM_ERR(CM_ERR_NOMEM, "out of memory while loading a recipe");
            out->base_line = value_line;
            out->base_column = value_column;
        } else if (section_index >= 0) {
            if (section_seen_line[section_index]) {
                return fail_at(CM_ERR_INVALID, reader->origin, line, column,
                               "duplicate section '%s' (first given on line %d)", name,
                               section_seen_line[section_index]);
            }
            section_seen_line[section_index] = line;
            if (value->type != YAML_MAPPING_START_EVENT) {
                return fail_at(CM_ERR_INVALID, reader->origin, value_line, value_column,
                               "section '%s' must be a mapping of keys (indented 'key: value' "
                               "lines), got %s",
                               name, node_kind(value));
            }
            CM_TRY(parse_section(reader, section_index, key_seen_line, &out->assignments));
        } else if (key_index >= 0) {
            if (key_seen_line[key_index]) {
                return fail_at(CM_ERR_INVALID, reader->origin, line, column,
                               "duplicate key '%s' (first given on line %d)", name,
                               key_seen_line[key_index]);
            }
            key_seen_line[key_index] = line;
            CM_TRY(take_value(reader, key_index, &out->assignments));
        } else {
            return unknown_top_level(reader, name, line, column);
        }
    }
}

/* Parses one YAML document: a mapping of top-level keys and sections. */
static cm_status parse_document(yaml_reader *reader, file_contents *out) {
    CM_TRY(advance(reader)); /* stream start */
    CM_TRY(advance(reader));
    if (reader->event.type == YAML_STREAM_END_EVENT) return CM_OK; /* empty file */
    CM_TRY(advance(reader));                                       /* past document start */
    const yaml_event_t *event = &reader->event;
    int line = mark_line(event->start_mark), column = mark_column(event->start_mark);
    if (event->type == YAML_MAPPING_START_EVENT) {
        int *key_seen_line = calloc((size_t)recipe_keys_total, sizeof *key_seen_line);
        if (!key_seen_line) return CM_ERR(CM_ERR_NOMEM, "out of memory while loading a recipe");
        cm_status status = parse_top_level(reader, key_seen_line, out);
        free(key_seen_line);
        CM_TRY(status);
    } else if (!(event->type == YAML_SCALAR_EVENT && scalar_is_null(event))) {
        return fail_at(CM_ERR_INVALID, reader->origin, line, column,
                       "a recipe must be a mapping of keys and sections, got %s", node_kind(event));
    }
    CM_TRY(advance(reader)); /* document end */
    CM_TRY(advance(reader));
    if (reader->event.type != YAML_STREAM_END_EVENT) {
        return fail_at(CM_ERR_FORMAT, reader->origin, mark_line(reader->event.start_mark),
                       mark_column(reader->event.start_mark),
                       "a recipe file holds a single YAML document");
    }
    return CM_OK;
}

/* Runs libyaml over the whole text once, so a syntax error anywhere is
 * reported as such, before the walk below can trip over what precedes it. */
static cm_status check_syntax(yaml_reader *reader) {
    do {
        CM_TRY(advance(reader));
    } while (reader->event.type != YAML_STREAM_END_EVENT);
    return CM_OK;
}

static cm_status parse_text(const char *text, size_t length, const char *origin,
                            file_contents *out) {
    cm_status status = CM_OK;
    for (int pass = 0; pass < 2 && status == CM_OK; pass++) {
        yaml_reader reader = {.origin = origin, .text = text, .length = length};
        if (!yaml_parser_initialize(&reader.parser))
            return CM_ERR(CM_ERR_NOMEM, "%s: cannot initialise the YAML parser", origin);
        yaml_parser_set_input_string(&reader.parser, (const unsigned char *)text, length);
        status = pass == 0 ? check_syntax(&reader) : parse_document(&reader, out);
        if (reader.has_event) yaml_event_delete(&reader.event);
        yaml_parser_delete(&reader.parser);
    }
    return status;
}

/* ---- files and base: ------------------------------------------------------------ */

static cm_status read_file(FILE *file, const char *path, char **text, size_t *length) {
    char *buffer = malloc(MAX_FILE_BYTES + 1);
    if (!buffer) return CM_ERR(CM_ERR_NOMEM, "out of memory while reading %s", path);
    size_t used = fread(buffer, 1, MAX_FILE_BYTES + 1, file);
    if (ferror(file)) {
        int error = errno;
        free(buffer);
        return fail_at(CM_ERR_IO, path, 0, 0, "cannot read: %s", strerror(error));
    }
    if (used > MAX_FILE_BYTES) {
        free(buffer);
        return fail_at(CM_ERR_IO, path, 0, 0, "file is larger than %d bytes; not a recipe?",
                       MAX_FILE_BYTES);
    }
    buffer[used] = '\0';
    *text = buffer;
    *length = used;
    return CM_OK;
}

/* dir(including)/relative, or `relative` itself when absolute or when the
 * including path has no directory. */
static cm_status resolve_base_path(const char *including, const char *relative, char *buffer,
                                   size_t capacity) {
    const char *slash = strrchr(including, '/');
    int written;
    if (relative[0] == '/' || !slash)
        written = snprintf(buffer, capacity, "%s", relative);
    else
        written =
            snprintf(buffer, capacity, "%.*s/%s", (int)(slash - including), including, relative);
    if (written < 0 || (size_t)written >= capacity)
        return CM_ERR(CM_ERR_INVALID, "base path '%s' is too long", relative);
    return CM_OK;
}

static cm_status load_contents(loader *state, const char *origin, file_contents *contents);

/* Loads `path` (and its base chain), appending to state->assignments.
 * `includer` is NULL for the top-level file, else where the base: was read. */
static cm_status load_file(loader *state, const char *path, const assignment *includer) {
    FILE *file = fopen(path, "rb");
    if (!file) {
        int error = errno;
        if (includer) {
            return fail_at(CM_ERR_IO, includer->origin, includer->line, includer->column,
                           "cannot open base '%s': %s", path, strerror(error));
        }
        return fail_at(CM_ERR_IO, path, 0, 0, "cannot open: %s", strerror(error));
    }
    struct stat info;
    if (fstat(fileno(file), &info) != 0 || S_ISDIR(info.st_mode)) {
        fclose(file);
        return fail_at(CM_ERR_IO, path, 0, 0, "cannot open: not a regular file");
    }
    for (int i = 0; i < state->depth; i++) {
        if (state->chain[i].device != info.st_dev || state->chain[i].inode != info.st_ino) continue;
        fclose(file);
        char cycle[MESSAGE_CAP / 2] = "";
        size_t used = 0;
        for (int j = i; j < state->depth && used < sizeof cycle; j++) {
            int written =
                snprintf(cycle + used, sizeof cycle - used, "%s -> ", state->chain[j].path);
            if (written > 0) used += (size_t)written;
        }
        return fail_at(CM_ERR_INVALID, includer->origin, includer->line, includer->column,
                       "base cycle: %s%s", cycle, path);
    }
    if (state->depth == MAX_BASE_DEPTH) {
        fclose(file);
        return fail_at(CM_ERR_INVALID, includer->origin, includer->line, includer->column,
                       "base chain deeper than %d files", MAX_BASE_DEPTH);
    }
    char *text = NULL;
    size_t length = 0;
    cm_status status = read_file(file, path, &text, &length);
    fclose(file);
    CM_TRY(status);
    const char *origin = loader_keep(state, path);
    if (!origin) {
        free(text);
        return CM_ERR(CM_ERR_NOMEM, "out of memory while loading a recipe");
    }
    state->chain[state->depth++] = (loaded_file){info.st_dev, info.st_ino, origin};
    file_contents contents = {0};
    status = parse_text(text, length, origin, &contents);
    free(text);
    if (status == CM_OK) status = load_contents(state, origin, &contents);
    state->depth--;
    list_free(&contents.assignments);
    free(contents.base);
    return status;
}

/* Loads the base of a parsed file, then appends the file's own assignments
 * (moving their text into the loader's list). */
static cm_status load_contents(loader *state, const char *origin, file_contents *contents) {
    /* An empty file (nothing, comments, `~`, `---`) would silently train the
     * defaults: most likely the wrong file. */
    if (!contents->base && contents->assignments.count == 0)
        return CM_ERR(CM_ERR_INVALID,
                      "%s: the recipe is empty (no keys); a recipe names at least one key, e.g. "
                      "`name: NAME` to train the defaults",
                      origin);
    if (contents->base) {
        char base_path[4096];
        assignment includer = {
            .origin = origin, .line = contents->base_line, .column = contents->base_column};
        cm_status status = resolve_base_path(origin, contents->base, base_path, sizeof base_path);
        if (status != CM_OK) {
            return fail_at(status, origin, includer.line, includer.column, "%s",
                           cm_error_message());
        }
        CM_TRY(load_file(state, base_path, &includer));
    }
    for (size_t i = 0; i < contents->assignments.count; i++) {
        CM_TRY(list_push(&state->assignments, contents->assignments.items[i]));
        contents->assignments.items[i].text = NULL; /* now owned by state */
    }
    return CM_OK;
}

/* ---- --set overrides ------------------------------------------------------------ */

static cm_status parse_override(loader *state, const char *override_text) {
    char origin_text[MESSAGE_CAP / 2];
    snprintf(origin_text, sizeof origin_text, "--set %s", override_text);
    const char *origin = loader_keep(state, origin_text);
    if (!origin) return CM_ERR(CM_ERR_NOMEM, "out of memory while loading a recipe");
    const char *equals = strchr(override_text, '=');
    if (!equals) return fail_at(CM_ERR_INVALID, origin, 0, 0, "expected section.key=value");
    char path[128];
    size_t path_length = (size_t)(equals - override_text);
    if (path_length >= sizeof path)
        return fail_at(CM_ERR_INVALID, origin, 0, 0, "key path is too long");
    memcpy(path, override_text, path_length);
    path[path_length] = '\0';
    char *dot = strchr(path, '.');
    const char *section = "", *name = path;
    if (dot) {
        *dot = '\0';
        section = path;
        name = dot + 1;
    }
    if (!dot && strcmp(name, "base") == 0) {
        return fail_at(CM_ERR_INVALID, origin, 0, 0,
                       "base cannot be overridden; load the other recipe instead");
    }
    if (!dot && recipe_find_section(name) >= 0) {
        return fail_at(CM_ERR_INVALID, origin, 0, 0, "'%s' is a section; use --set %s.KEY=VALUE",
                       name, name);
    }
    if (dot && recipe_find_section(section) < 0) {
        const char *names[64] = {0};
        int count = 0;
        for (int i = 0; i < recipe_sections_total && count < 64; i++)
            names[count++] = recipe_sections[i].name;
        char hint[MESSAGE_CAP / 2];
        name_hint(hint, sizeof hint, section, names, count, "sections");
        return fail_at(CM_ERR_INVALID, origin, 0, 0, "unknown section '%s'%s", section, hint);
    }
    int key_index = recipe_find_key(section, name);
    if (key_index < 0) {
        char message[MESSAGE_CAP];
        if (dot) {
            unknown_key_message(message, sizeof message, section, name);
        } else {
            const char *names[MAX_NAMES] = {0};
            int count = section_key_names("", names);
            char hint[MESSAGE_CAP / 2];
            name_hint(hint, sizeof hint, name, names, count, "top-level keys");
            snprintf(message, sizeof message, "unknown top-level key '%s'%s", name, hint);
        }
        return fail_at(CM_ERR_INVALID, origin, 0, 0, "%s", message);
    }
    char *text = strdup(equals + 1);
    if (!text) return CM_ERR(CM_ERR_NOMEM, "out of memory while loading a recipe");
    /* The shell already removed any quotes, so the text is the value as-is;
     * an empty value is an empty string, not a missing one. */
    assignment item = {.key_index = key_index, .text = text, .plain = true, .origin = origin};
    cm_status status = list_push(&state->assignments, item);
    if (status != CM_OK) free(text);
    return status;
}

/* ---- resolution ----------------------------------------------------------------- */

static cm_status resolve(loader *state, cm_recipe *out) {
    cm_recipe recipe;
    recipe_defaults(&recipe);
    /* last_set[k]: index of the assignment that set key k last, or -1. */
    int *last_set = malloc((size_t)recipe_keys_total * sizeof *last_set);
    if (!last_set) return CM_ERR(CM_ERR_NOMEM, "out of memory while loading a recipe");
    for (int k = 0; k < recipe_keys_total; k++) last_set[k] = -1;
    cm_status status = CM_OK;
    char why[MESSAGE_CAP];
    for (size_t i = 0; i < state->assignments.count && status == CM_OK; i++) {
        const assignment *item = &state->assignments.items[i];
        recipe_scalar value = {.text = item->text, .plain = item->plain, .is_null = item->is_null};
        status = recipe_key_parse(&recipe_keys[item->key_index], value, &recipe, why, sizeof why);
        if (status != CM_OK)
            status = fail_at(status, item->origin, item->line, item->column, "%s", why);
        last_set[item->key_index] = (int)i;
    }
    int involved[RECIPE_MAX_INVOLVED];
    if (status == CM_OK && !recipe_check_consistency(&recipe, involved, why, sizeof why)) {
        /* Point at whichever involved key was set last: that is the edit that broke it. */
        int culprit = -1;
        for (int j = 0; j < RECIPE_MAX_INVOLVED; j++) {
            if (involved[j] >= 0 && last_set[involved[j]] > culprit)
                culprit = last_set[involved[j]];
        }
        if (culprit >= 0) {
            const assignment *item = &state->assignments.items[culprit];
            status = fail_at(CM_ERR_INVALID, item->origin, item->line, item->column, "%s", why);
        } else {
            status = CM_ERR(CM_ERR_INVALID, "recipe defaults: %s", why);
        }
    }
    free(last_set);
    if (status == CM_OK) *out = recipe;
    return status;
}

static cm_status load_overrides_and_resolve(loader *state, const char *const *overrides,
                                            int n_overrides, cm_recipe *out) {
    for (int i = 0; i < n_overrides; i++) CM_TRY(parse_override(state, overrides[i]));
    return resolve(state, out);
}

cm_status recipe_load(const char *path, const char *const *overrides, int n_overrides,
                      cm_recipe *out) {
    CM_ASSERT(out && (n_overrides == 0 || overrides), "recipe_load: bad arguments");
    loader state = {0};
    cm_status status = path ? load_file(&state, path, NULL) : CM_OK;
    if (status == CM_OK) status = load_overrides_and_resolve(&state, overrides, n_overrides, out);
    loader_free(&state);
    return status;
}

cm_status recipe_load_text(const char *text, const char *label, const char *const *overrides,
                           int n_overrides, cm_recipe *out) {
    CM_ASSERT(text && label && out && (n_overrides == 0 || overrides),
              "recipe_load_text: bad arguments");
    loader state = {0};
    cm_status status = CM_OK;
    const char *origin = loader_keep(&state, label);
    if (!origin) status = CM_ERR(CM_ERR_NOMEM, "out of memory while loading a recipe");
    file_contents contents = {0};
    if (status == CM_OK) status = parse_text(text, strlen(text), origin, &contents);
    if (status == CM_OK) status = load_contents(&state, origin, &contents);
    list_free(&contents.assignments);
    free(contents.base);
    if (status == CM_OK) status = load_overrides_and_resolve(&state, overrides, n_overrides, out);
    loader_free(&state);
    return status;
}
