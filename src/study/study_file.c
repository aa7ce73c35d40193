/* studies/NAME.yaml -> study (study.h). libyaml's document API gives the
 * node tree with the marks every error message points at. */
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <yaml.h>

#include "study/study.h"
#include "train/merge.h"
#include "train/recipe.h"
#include "train/upcycle.h"

enum { MESSAGE_CAP = 1024, MAX_KEYS = 16 };

typedef struct reader {
    yaml_document_t doc;
    const char *path;
    study *out;
} reader;

static cm_status fail_at(const reader *r, const yaml_node_t *node, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static cm_status fail_at(const reader *r, const yaml_node_t *node, const char *fmt, ...) {
    char message[MESSAGE_CAP];
    va_list args;
    va_start(args, fmt);
    vsnprintf(message, sizeof message, fmt, args);
    va_end(args);
    return CM_ERR(CM_ERR_INVALID, "%s:%d:%d: %s", r->path, (int)node->start_mark.line + 1,
                  (int)node->start_mark.column + 1, message);
}

static yaml_node_t *node_at(const reader *r, int index) {
    return yaml_document_get_node((yaml_document_t *)&r->doc, index);
}

static const char *node_kind(const yaml_node_t *node) {
    switch (node->type) {
    case YAML_SCALAR_NODE:
        return "a scalar";
    case YAML_SEQUENCE_NODE:
        return "a list";
    case YAML_MAPPING_NODE:
        return "a mapping";
    default:
        return "nothing";
    }
}

static cm_status expect(const reader *r, const yaml_node_t *node, yaml_node_type_t type,
                        const char *what) {
    if (node->type == type) return CM_OK;
    const char *wanted = type == YAML_SCALAR_NODE     ? "a scalar"
                         : type == YAML_SEQUENCE_NODE ? "a list"
                                                      : "a mapping";
    return fail_at(r, node, "%s must be %s, not %s", what, wanted, node_kind(node));
}

/* The text of a scalar node, copied into buffer (too long: an error). */
static cm_status text_of(const reader *r, const yaml_node_t *node, const char *what, char *buffer,
                         size_t capacity) {
    CM_TRY(expect(r, node, YAML_SCALAR_NODE, what));
    if (node->data.scalar.length >= capacity)
        return fail_at(r, node, "%s is longer than %zu characters", what, capacity - 1);
    memcpy(buffer, node->data.scalar.value, node->data.scalar.length);
    buffer[node->data.scalar.length] = '\0';
    return CM_OK;
}

bool study_parse_number(const char *text, double *value) {
    char *end;
    errno = 0;
    *value = strtod(text, &end);
    return *text && !*end && errno == 0 && isfinite(*value);
}

static cm_status int_of(const reader *r, const yaml_node_t *node, const char *what, int low,
                        int high, int *value) {
    char text[64];
    CM_TRY(text_of(r, node, what, text, sizeof text));
    char *end;
    long parsed = strtol(text, &end, 10);
    if (!*text || *end || parsed < low || parsed > high)
        return fail_at(r, node, "%s must be an integer in [%d, %d], not '%s'", what, low, high,
                       text);
    *value = (int)parsed;
    return CM_OK;
}

/* The mapping's values for `keys` (NULL when absent); an unknown or repeated
 * key is an error at the key. */
static cm_status take_keys(const reader *r, const yaml_node_t *map, const char *what,
                           const char *const *keys, yaml_node_t **values) {
    CM_TRY(expect(r, map, YAML_MAPPING_NODE, what));
    int n_keys = 0;
    while (keys[n_keys]) values[n_keys++] = NULL;
    for (yaml_node_pair_t *pair = map->data.mapping.pairs.start; pair < map->data.mapping.pairs.top;
         pair++) {
        yaml_node_t *key = node_at(r, pair->key);
        char name[64];
        CM_TRY(text_of(r, key, "a key", name, sizeof name));
        int found = -1;
        for (int k = 0; k < n_keys; k++)
            if (strcmp(keys[k], name) == 0) found = k;
        if (found < 0) {
            char known[512] = "";
            for (int k = 0; k < n_keys; k++)
                snprintf(known + strlen(known), sizeof known - strlen(known), "%s%s", k ? ", " : "",
                         keys[k]);
            return fail_at(r, key, "unknown key '%s' in %s (known: %s)", name, what, known);
        }
        if (values[found]) return fail_at(r, key, "duplicate key '%s' in %s", name, what);
        values[found] = node_at(r, pair->value);
    }
    return CM_OK;
}

static cm_status require(const reader *r, const yaml_node_t *map, const yaml_node_t *value,
                         const char *key, const char *what) {
    if (value) return CM_OK;
    return fail_at(r, map, "%s needs the key '%s'", what, key);
}

static yaml_node_t *item(const reader *r, const yaml_node_t *list, int i) {
    return node_at(r, list->data.sequence.items.start[i]);
}

static int list_length(const yaml_node_t *list) {
    return (int)(list->data.sequence.items.top - list->data.sequence.items.start);
}

/* A list of "section.key=value" overrides. */
static cm_status parse_sets(const reader *r, const yaml_node_t *list, const char *what,
                            study_sets *out) {
    out->count = 0;
    if (!list) return CM_OK;
    CM_TRY(expect(r, list, YAML_SEQUENCE_NODE, what));
    if (list_length(list) > STUDY_MAX_SETS)
        return fail_at(r, list, "%s has more than %d overrides", what, STUDY_MAX_SETS);
    for (int i = 0; i < list_length(list); i++) {
        const yaml_node_t *node = item(r, list, i);
        CM_TRY(text_of(r, node, what, out->items[i], STUDY_SET_CAP));
        if (!strchr(out->items[i], '='))
            return fail_at(r, node, "an override is SECTION.KEY=VALUE, not '%s'", out->items[i]);
        out->count++;
    }
    return CM_OK;
}

/* ---- arms, presets, evaluations ------------------------------------------------- */

/* A scalar that is true or false. */
static cm_status bool_of(const reader *r, const yaml_node_t *node, const char *what, bool *value) {
    char text[16];
    CM_TRY(text_of(r, node, what, text, sizeof text));
    if (strcmp(text, "true") != 0 && strcmp(text, "false") != 0)
        return fail_at(r, node, "%s is true or false, not '%s'", what, text);
    *value = strcmp(text, "true") == 0;
    return CM_OK;
}

/* A scalar that is one of names (NULL-terminated): its index. */
static cm_status choice_of(const reader *r, const yaml_node_t *node, const char *what,
                           const char *const *names, int *index) {
    char text[32], known[128] = "";
    CM_TRY(text_of(r, node, what, text, sizeof text));
    for (int i = 0; names[i]; i++) {
        if (strcmp(text, names[i]) == 0) {
            *index = i;
            return CM_OK;
        }
        snprintf(known + strlen(known), sizeof known - strlen(known), "%s%s", i ? " or " : "",
                 names[i]);
    }
    return fail_at(r, node, "%s is %s, not '%s'", what, known, text);
}

/* merge: {groups, grouping, align, weights, mode, calib_windows, seed}: the
 * options of cmoe merge, with its defaults (train/merge.h). */
static cm_status parse_merge(const reader *r, const yaml_node_t *node, study_merge *m) {
    static const char *const keys[] = {"groups", "grouping",      "align", "weights",
                                       "mode",   "calib_windows", "seed",  NULL};
    static const char *const on_off[] = {"off", "on", NULL};
    yaml_node_t *v[7];
    CM_TRY(take_keys(r, node, "merge", keys, v));
    CM_TRY(require(r, node, v[0], "groups", "merge"));
    *m = (study_merge){.calib_windows = 256, .seed = 2333, .align = true};
    int align = 1;
    CM_TRY(int_of(r, v[0], "merge groups", 1, 1 << 20, &m->groups));
    if (v[1]) CM_TRY(choice_of(r, v[1], "merge grouping", merge_grouping_names, &m->grouping));
    if (v[2]) CM_TRY(choice_of(r, v[2], "merge align", on_off, &align));
    if (v[3]) CM_TRY(choice_of(r, v[3], "merge weights", merge_weighting_names, &m->weights));
    if (v[4]) CM_TRY(choice_of(r, v[4], "merge mode", merge_mode_names, &m->mode));
    if (v[5]) CM_TRY(int_of(r, v[5], "merge calib_windows", 1, 1 << 24, &m->calib_windows));
    if (v[6]) CM_TRY(int_of(r, v[6], "merge seed", 0, 1 << 30, &m->seed));
    m->align = align == 1;
    return CM_OK;
}

void study_merge_options(const study *s, int arm, merge_options *out) {
    const study_merge *m = &s->arms[arm].merge_settings;
    *out = (merge_options){.groups = m->groups,
                           .calib_windows = m->calib_windows,
                           .seed = (uint64_t)m->seed,
                           .grouping = (merge_grouping)m->grouping,
                           .align = m->align,
                           .weights = (merge_weighting)m->weights,
                           .mode = (merge_mode)m->mode,
                           .quiet = true};
}

/* from: an earlier arm (not one that trains nothing); upcycle: true or
 * merge: {...} (one of them, each needing from); evaluate_only (needs from). */
static cm_status parse_start(const reader *r, yaml_node_t *const *v, study_arm *arm) {
    yaml_node_t *from = v[0], *upcycle = v[1], *merge = v[2], *evaluate_only = v[3];
    arm->from = -1;
    if (from) {
        char name[STUDY_NAME_CAP];
        CM_TRY(text_of(r, from, "an arm's from", name, sizeof name));
        arm->from = study_find_arm(r->out, name);
        if (arm->from < 0)
            return fail_at(r, from, "from: '%s' is not an arm before this one", name);
        if (r->out->arms[arm->from].evaluate_only)
            return fail_at(
                r, from, "from: '%s' trains nothing (evaluate_only): start from its source", name);
    }
    if (upcycle) CM_TRY(bool_of(r, upcycle, "upcycle", &arm->upcycle));
    if (arm->upcycle && !from)
        return fail_at(r, upcycle, "upcycle: true needs from: ARM (the dense run to upcycle)");
    if (merge && !from) return fail_at(r, merge, "merge: needs from: ARM (the MoE run to merge)");
    if (merge && arm->upcycle)
        return fail_at(r, merge, "an arm either upcycles or merges its source, not both");
    if (merge) CM_TRY(parse_merge(r, merge, &arm->merge_settings));
    arm->merge = merge != NULL;
    if (evaluate_only) CM_TRY(bool_of(r, evaluate_only, "evaluate_only", &arm->evaluate_only));
    if (arm->evaluate_only && !from)
        return fail_at(r, evaluate_only,
                       "evaluate_only: true needs from: ARM (the model to evaluate starts there)");
    return CM_OK;
}

static cm_status parse_arm(const reader *r, const yaml_node_t *node, study_arm *arm) {
    static const char *const keys[] = {"name",    "recipe", "set",           "from",
                                       "upcycle", "merge",  "evaluate_only", NULL};
    yaml_node_t *v[7];
    CM_TRY(take_keys(r, node, "an arm", keys, v));
    CM_TRY(require(r, node, v[0], "name", "an arm"));
    CM_TRY(require(r, node, v[1], "recipe", "an arm"));
    CM_TRY(text_of(r, v[0], "an arm's name", arm->name, sizeof arm->name));
    if (arm->name[0] == '.' || !arm->name[0])
        return fail_at(r, v[0], "an arm's name must not start with '.' (it names a directory)");
    for (const char *c = arm->name; *c; c++)
        if (!strchr("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.", *c))
            return fail_at(r, v[0], "an arm's name takes letters, digits, -, _ and ., not '%s'",
                           arm->name);
    if (study_find_arm(r->out, arm->name) >= 0)
        return fail_at(r, v[0], "a second arm named '%s'", arm->name);
    char relative[STUDY_PATH_CAP / 2];
    CM_TRY(text_of(r, v[1], "an arm's recipe", relative, sizeof relative));
    /* Relative to the study file's directory, as a recipe's base: is to its file. */
    const char *slash = strrchr(r->path, '/');
    const int dir_length = slash ? (int)(slash - r->path) : 0;
    if (dir_length >= STUDY_PATH_CAP / 2)
        return fail_at(r, v[1], "the study file's directory name is too long");
    if (relative[0] == '/' || !slash)
        snprintf(arm->recipe, sizeof arm->recipe, "%s", relative);
    else
        snprintf(arm->recipe, sizeof arm->recipe, "%.*s/%s", dir_length, r->path, relative);
    CM_TRY(parse_start(r, &v[3], arm));
    return parse_sets(r, v[2], "an arm's set", &arm->set);
}

static cm_status parse_arms(const reader *r, const yaml_node_t *list) {
    CM_TRY(expect(r, list, YAML_SEQUENCE_NODE, "arms"));
    if (list_length(list) == 0) return fail_at(r, list, "a study needs at least one arm");
    if (list_length(list) > STUDY_MAX_ARMS)
        return fail_at(r, list, "more than %d arms", STUDY_MAX_ARMS);
    for (int i = 0; i < list_length(list); i++) {
        CM_TRY(parse_arm(r, item(r, list, i), &r->out->arms[i]));
        r->out->n_arms++;
    }
    return CM_OK;
}

/* arm_set: {ARM: [KEY=VALUE...], ...}, flattened into preset->arm_sets. */
static cm_status parse_arm_sets(const reader *r, const yaml_node_t *map, study_preset *preset) {
    preset->arm_sets.count = 0;
    if (!map) return CM_OK;
    CM_TRY(expect(r, map, YAML_MAPPING_NODE, "a preset's arm_set"));
    for (yaml_node_pair_t *pair = map->data.mapping.pairs.start; pair < map->data.mapping.pairs.top;
         pair++) {
        const yaml_node_t *key = node_at(r, pair->key);
        char name[STUDY_NAME_CAP];
        CM_TRY(text_of(r, key, "an arm", name, sizeof name));
        const int arm = study_find_arm(r->out, name);
        if (arm < 0) return fail_at(r, key, "arm_set: no arm named '%s'", name);
        study_sets sets;
        CM_TRY(parse_sets(r, node_at(r, pair->value), "an arm_set list", &sets));
        for (int i = 0; i < sets.count; i++) {
            study_sets *all = &preset->arm_sets;
            if (all->count == STUDY_MAX_SETS)
                return fail_at(r, map, "arm_set has more than %d overrides", STUDY_MAX_SETS);
            memcpy(all->items[all->count], sets.items[i], STUDY_SET_CAP);
            preset->arm_set_arm[all->count++] = arm;
        }
    }
    return CM_OK;
}

static cm_status parse_preset(const reader *r, const yaml_node_t *key, const yaml_node_t *node,
                              study_preset *preset) {
    static const char *const keys[] = {"seeds", "set", "note", "arm_set", NULL};
    yaml_node_t *v[4];
    CM_TRY(text_of(r, key, "a preset's name", preset->name, sizeof preset->name));
    CM_TRY(take_keys(r, node, "a preset", keys, v));
    CM_TRY(require(r, node, v[0], "seeds", "a preset"));
    CM_TRY(int_of(r, v[0], "seeds", 1, STUDY_MAX_SEEDS, &preset->seeds));
    if (v[2]) CM_TRY(text_of(r, v[2], "a preset's note", preset->note, sizeof preset->note));
    CM_TRY(parse_arm_sets(r, v[3], preset));
    return parse_sets(r, v[1], "a preset's set", &preset->set);
}

static cm_status parse_presets(const reader *r, const yaml_node_t *map) {
    CM_TRY(expect(r, map, YAML_MAPPING_NODE, "presets"));
    study *s = r->out;
    for (yaml_node_pair_t *pair = map->data.mapping.pairs.start; pair < map->data.mapping.pairs.top;
         pair++) {
        yaml_node_t *key = node_at(r, pair->key);
        if (s->n_presets == STUDY_MAX_PRESETS)
            return fail_at(r, key, "more than %d presets", STUDY_MAX_PRESETS);
        study_preset *preset = &s->presets[s->n_presets];
        CM_TRY(parse_preset(r, key, node_at(r, pair->value), preset));
        for (int p = 0; p < s->n_presets; p++)
            if (strcmp(s->presets[p].name, preset->name) == 0)
                return fail_at(r, key, "duplicate preset '%s'", preset->name);
        s->n_presets++;
    }
    if (s->n_presets == 0) return fail_at(r, map, "a study needs at least one preset");
    return CM_OK;
}

/* arms: [names] of an evaluation (absent: every arm). */
static cm_status parse_arm_list(const reader *r, const yaml_node_t *list, bool *arms) {
    for (int a = 0; a < STUDY_MAX_ARMS; a++) arms[a] = list == NULL && a < r->out->n_arms;
    if (!list) return CM_OK;
    CM_TRY(expect(r, list, YAML_SEQUENCE_NODE, "an evaluation's arms"));
    for (int i = 0; i < list_length(list); i++) {
        const yaml_node_t *node = item(r, list, i);
        char name[STUDY_NAME_CAP];
        CM_TRY(text_of(r, node, "an arm", name, sizeof name));
        int a = study_find_arm(r->out, name);
        if (a < 0) return fail_at(r, node, "no arm named '%s'", name);
        arms[a] = true;
    }
    return CM_OK;
}

static cm_status parse_evaluation(const reader *r, const yaml_node_t *node, study_evaluation *e) {
    static const char *const keys[] = {"name", "key", "values", "split", "arms", NULL};
    yaml_node_t *v[5];
    CM_TRY(take_keys(r, node, "an evaluation", keys, v));
    for (int k = 0; k < 3; k++) CM_TRY(require(r, node, v[k], keys[k], "an evaluation"));
    CM_TRY(text_of(r, v[0], "an evaluation's name", e->name, sizeof e->name));
    if (strpbrk(e->name, "=.:[ ") || study_find_evaluation(r->out, e->name) >= 0)
        return fail_at(r, v[0], "an evaluation's name must be unique, without = . : [ or spaces");
    CM_TRY(text_of(r, v[1], "an evaluation's key", e->key, sizeof e->key));
    CM_TRY(expect(r, v[2], YAML_SEQUENCE_NODE, "an evaluation's values"));
    if (list_length(v[2]) == 0 || list_length(v[2]) > STUDY_MAX_VALUES)
        return fail_at(r, v[2], "an evaluation takes 1 to %d values", STUDY_MAX_VALUES);
    for (int i = 0; i < list_length(v[2]); i++)
        CM_TRY(
            text_of(r, item(r, v[2], i), "a value", e->values[e->n_values++], sizeof e->values[0]));
    snprintf(e->split, sizeof e->split, "test");
    if (v[3]) CM_TRY(text_of(r, v[3], "split", e->split, sizeof e->split));
    if (strcmp(e->split, "test") && strcmp(e->split, "valid") && strcmp(e->split, "train"))
        return fail_at(r, v[3], "split must be test, valid or train, not '%s'", e->split);
    return parse_arm_list(r, v[4], e->arms);
}

static cm_status parse_evaluations(const reader *r, const yaml_node_t *list) {
    if (!list) return CM_OK;
    CM_TRY(expect(r, list, YAML_SEQUENCE_NODE, "evaluations"));
    if (list_length(list) > STUDY_MAX_EVALS)
        return fail_at(r, list, "more than %d evaluations", STUDY_MAX_EVALS);
    for (int i = 0; i < list_length(list); i++) {
        CM_TRY(parse_evaluation(r, item(r, list, i), &r->out->evaluations[i]));
        r->out->n_evaluations++;
    }
    return CM_OK;
}

/* ---- metrics ------------------------------------------------------------------------ */

/* Splits "SOURCE.FIELD[i]" (the field after the last '.'); checks the source. */
static cm_status parse_metric(const reader *r, const yaml_node_t *node, study_metric *m) {
    CM_TRY(text_of(r, node, "a metric", m->text, sizeof m->text));
    char *dot = strrchr(m->text, '.');
    if (!dot || dot == m->text || !dot[1])
        return fail_at(r, node, "a metric is SOURCE.FIELD, not '%s'", m->text);
    const size_t source_length = (size_t)(dot - m->text);
    memcpy(m->source, m->text, source_length); /* shorter than text: it fits */
    m->source[source_length] = '\0';
    snprintf(m->field, sizeof m->field, "%s", dot + 1);
    m->index = -1;
    char *bracket = strchr(m->field, '[');
    if (bracket) {
        char *end;
        long index = strtol(bracket + 1, &end, 10);
        if (end == bracket + 1 || strcmp(end, "]") != 0 || index < 0 || index > 4096)
            return fail_at(r, node, "an array metric is SOURCE.FIELD[INDEX], not '%s'", m->text);
        m->index = (int)index;
        *bracket = '\0';
    }
    static const char *const sources[] = {"test", "valid", "train", "model"};
    for (int i = 0; i < 4; i++)
        if (strcmp(m->source, sources[i]) == 0) return CM_OK;
    char *equals = strchr(m->source, '=');
    if (equals) {
        char name[STUDY_NAME_CAP * 2];
        snprintf(name, sizeof name, "%.*s", (int)(equals - m->source), m->source);
        int e = study_find_evaluation(r->out, name);
        if (e >= 0)
            for (int v = 0; v < r->out->evaluations[e].n_values; v++)
                if (strcmp(r->out->evaluations[e].values[v], equals + 1) == 0) return CM_OK;
    }
    return fail_at(r, node,
                   "metric '%s': the source '%s' is none of test, valid, train, model or an "
                   "evaluation NAME=VALUE the study declares",
                   m->text, m->source);
}

static cm_status parse_metrics(const reader *r, const yaml_node_t *list) {
    CM_TRY(expect(r, list, YAML_SEQUENCE_NODE, "metrics"));
    if (list_length(list) == 0 || list_length(list) > STUDY_MAX_METRICS)
        return fail_at(r, list, "a study declares 1 to %d metrics", STUDY_MAX_METRICS);
    for (int i = 0; i < list_length(list); i++) {
        const yaml_node_t *node = item(r, list, i);
        CM_TRY(parse_metric(r, node, &r->out->metrics[i]));
        if (study_find_metric(r->out, r->out->metrics[i].text) >= 0)
            return fail_at(r, node, "metric '%s' is listed twice", r->out->metrics[i].text);
        r->out->n_metrics++;
    }
    return CM_OK;
}

/* A metric the study declares; its text names it in errors. */
static cm_status declared_metric(const reader *r, const yaml_node_t *node, const char *text,
                                 int *index) {
    *index = study_find_metric(r->out, text);
    if (*index < 0) return fail_at(r, node, "metric '%s' is not in the study's metrics list", text);
    return CM_OK;
}

/* ---- plots ----------------------------------------------------------------------------- */

static cm_status parse_curve(const reader *r, const yaml_node_t *node) {
    if (!node) return CM_OK;
    static const char *const keys[] = {"kind", "field", NULL};
    yaml_node_t *v[2];
    CM_TRY(take_keys(r, node, "curve", keys, v));
    CM_TRY(require(r, node, v[0], "kind", "curve"));
    CM_TRY(require(r, node, v[1], "field", "curve"));
    CM_TRY(text_of(r, v[0], "curve kind", r->out->curve_kind, sizeof r->out->curve_kind));
    return text_of(r, v[1], "curve field", r->out->curve_field, sizeof r->out->curve_field);
}

static cm_status parse_sweeps(const reader *r, const yaml_node_t *list) {
    if (!list) return CM_OK;
    CM_TRY(expect(r, list, YAML_SEQUENCE_NODE, "sweeps"));
    if (list_length(list) > STUDY_MAX_SWEEPS)
        return fail_at(r, list, "more than %d sweeps", STUDY_MAX_SWEEPS);
    static const char *const keys[] = {"evaluation", "field", NULL};
    for (int i = 0; i < list_length(list); i++) {
        yaml_node_t *v[2], *node = item(r, list, i);
        study_sweep *sweep = &r->out->sweeps[i];
        CM_TRY(take_keys(r, node, "a sweep", keys, v));
        CM_TRY(require(r, node, v[0], "evaluation", "a sweep"));
        CM_TRY(require(r, node, v[1], "field", "a sweep"));
        char name[STUDY_NAME_CAP];
        CM_TRY(text_of(r, v[0], "a sweep's evaluation", name, sizeof name));
        if ((sweep->evaluation = study_find_evaluation(r->out, name)) < 0)
            return fail_at(r, v[0], "no evaluation named '%s'", name);
        CM_TRY(text_of(r, v[1], "a sweep's field", sweep->field, sizeof sweep->field));
        r->out->n_sweeps++;
    }
    return CM_OK;
}

static cm_status parse_layers(const reader *r, const yaml_node_t *node) {
    r->out->layers_metric = -1;
    if (!node) return CM_OK;
    char text[STUDY_NAME_CAP * 2], first[STUDY_NAME_CAP * 2 + 4];
    CM_TRY(text_of(r, node, "layers", text, sizeof text));
    snprintf(first, sizeof first, "%s[0]", text);
    if (study_find_metric(r->out, first) < 0)
        return fail_at(r, node, "layers: the metrics list has no '%s'", first);
    /* The plot reads the per-layer metrics TEXT[i]; remember TEXT[0]. */
    r->out->layers_metric = study_find_metric(r->out, first);
    return CM_OK;
}

/* ---- claims ------------------------------------------------------------------------------ */

/* "ARM:METRIC" -> arm and metric indexes; a metric from an evaluation the
 * arm does not get is an error. */
static cm_status parse_operand(const reader *r, const yaml_node_t *node, int *arm, int *metric) {
    char text[STUDY_NAME_CAP * 4];
    CM_TRY(text_of(r, node, "an operand", text, sizeof text));
    char *colon = strchr(text, ':');
    if (!colon) return fail_at(r, node, "an operand is ARM:METRIC, not '%s'", text);
    *colon = '\0';
    if ((*arm = study_find_arm(r->out, text)) < 0)
        return fail_at(r, node, "no arm named '%s'", text);
    CM_TRY(declared_metric(r, node, colon + 1, metric));
    const study_metric *m = &r->out->metrics[*metric];
    char *equals = strchr(m->source, '=');
    if (equals) {
        char name[STUDY_NAME_CAP * 2];
        snprintf(name, sizeof name, "%.*s", (int)(equals - m->source), m->source);
        if (!r->out->evaluations[study_find_evaluation(r->out, name)].arms[*arm])
            return fail_at(r, node, "arm '%s' does not get the evaluation '%s'", text, name);
    }
    return CM_OK;
}

static cm_status parse_test(const reader *r, const yaml_node_t *node, study_test *t) {
    static const char *const keys[] = {"left", "less", "greater", "margin", NULL};
    yaml_node_t *v[4];
    CM_TRY(take_keys(r, node, "a test", keys, v));
    CM_TRY(require(r, node, v[0], "left", "a test"));
    if (!v[1] == !v[2]) return fail_at(r, node, "a test takes exactly one of less and greater");
    CM_TRY(parse_operand(r, v[0], &t->left_arm, &t->left_metric));
    t->direction = v[1] ? STUDY_LESS : STUDY_GREATER;
    const yaml_node_t *right = v[1] ? v[1] : v[2];
    char text[STUDY_NAME_CAP * 4];
    CM_TRY(text_of(r, right, "a test's right side", text, sizeof text));
    t->right_arm = t->right_metric = -1;
    if (!study_parse_number(text, &t->right_value))
        CM_TRY(parse_operand(r, right, &t->right_arm, &t->right_metric));
    t->margin = 0.0;
    if (v[3]) {
        CM_TRY(text_of(r, v[3], "margin", text, sizeof text));
        if (!study_parse_number(text, &t->margin) || t->margin < 0)
            return fail_at(r, v[3], "margin must be a number >= 0, not '%s'", text);
    }
    return CM_OK;
}

/* monotone: {arm, metrics: [...], direction} -> a test per neighbouring pair. */
static cm_status parse_monotone(const reader *r, const yaml_node_t *node, study_claim *c) {
    static const char *const keys[] = {"arm", "metrics", "direction", NULL};
    yaml_node_t *v[3];
    CM_TRY(take_keys(r, node, "monotone", keys, v));
    for (int k = 0; k < 3; k++) CM_TRY(require(r, node, v[k], keys[k], "monotone"));
    char arm_name[STUDY_NAME_CAP], direction[32];
    CM_TRY(text_of(r, v[0], "monotone arm", arm_name, sizeof arm_name));
    int arm = study_find_arm(r->out, arm_name);
    if (arm < 0) return fail_at(r, v[0], "no arm named '%s'", arm_name);
    CM_TRY(text_of(r, v[2], "direction", direction, sizeof direction));
    bool decreasing = strcmp(direction, "decreasing") == 0;
    if (!decreasing && strcmp(direction, "increasing") != 0)
        return fail_at(r, v[2], "direction is decreasing or increasing, not '%s'", direction);
    CM_TRY(expect(r, v[1], YAML_SEQUENCE_NODE, "monotone metrics"));
    int n = list_length(v[1]);
    if (n < 2 || n - 1 > STUDY_MAX_TESTS)
        return fail_at(r, v[1], "monotone takes 2 to %d metrics", STUDY_MAX_TESTS + 1);
    int previous = -1;
    for (int i = 0; i < n; i++) {
        char text[STUDY_NAME_CAP * 2];
        int metric;
        CM_TRY(text_of(r, item(r, v[1], i), "a metric", text, sizeof text));
        CM_TRY(declared_metric(r, item(r, v[1], i), text, &metric));
        if (i > 0)
            c->tests[c->n_tests++] =
                (study_test){.left_arm = arm,
                             .left_metric = previous,
                             .right_arm = arm,
                             .right_metric = metric,
                             .direction = decreasing ? STUDY_GREATER : STUDY_LESS};
        previous = metric;
    }
    return CM_OK;
}

static cm_status parse_claim(const reader *r, const yaml_node_t *node, study_claim *c) {
    static const char *const keys[] = {"id",       "claim", "paper_figure", "tests", "monotone",
                                       "analysis", NULL};
    yaml_node_t *v[6];
    CM_TRY(take_keys(r, node, "a claim", keys, v));
    for (int k = 0; k < 3; k++) CM_TRY(require(r, node, v[k], keys[k], "a claim"));
    CM_TRY(text_of(r, v[0], "a claim's id", c->id, sizeof c->id));
    CM_TRY(text_of(r, v[1], "a claim's text", c->text, sizeof c->text));
    CM_TRY(text_of(r, v[2], "paper_figure", c->paper_figure, sizeof c->paper_figure));
    if (v[5]) CM_TRY(text_of(r, v[5], "analysis", c->analysis, sizeof c->analysis));
    if (!v[3] == !v[4]) return fail_at(r, node, "a claim takes exactly one of tests and monotone");
    if (v[4]) return parse_monotone(r, v[4], c);
    CM_TRY(expect(r, v[3], YAML_SEQUENCE_NODE, "tests"));
    if (list_length(v[3]) == 0 || list_length(v[3]) > STUDY_MAX_TESTS)
        return fail_at(r, v[3], "a claim takes 1 to %d tests", STUDY_MAX_TESTS);
    for (int i = 0; i < list_length(v[3]); i++)
        CM_TRY(parse_test(r, item(r, v[3], i), &c->tests[c->n_tests++]));
    return CM_OK;
}

static cm_status parse_claims(const reader *r, const yaml_node_t *list) {
    CM_TRY(expect(r, list, YAML_SEQUENCE_NODE, "claims"));
    if (list_length(list) == 0 || list_length(list) > STUDY_MAX_CLAIMS)
        return fail_at(r, list, "a study states 1 to %d claims", STUDY_MAX_CLAIMS);
    for (int i = 0; i < list_length(list); i++) {
        study_claim *c = &r->out->claims[i];
        CM_TRY(parse_claim(r, item(r, list, i), c));
        for (int j = 0; j < i; j++)
            if (strcmp(r->out->claims[j].id, c->id) == 0)
                return fail_at(r, item(r, list, i), "a second claim with id '%s'", c->id);
        r->out->n_claims++;
    }
    return CM_OK;
}

/* ---- recipes ------------------------------------------------------------------------ */

int study_arm_overrides(const study *s, int arm, int preset, const char **sets) {
    const study_preset *p = &s->presets[preset];
    const study_arm *a = &s->arms[arm];
    int n = 0;
    for (int i = 0; i < p->set.count; i++) sets[n++] = p->set.items[i];
    for (int i = 0; i < a->set.count; i++) sets[n++] = a->set.items[i];
    for (int i = 0; i < p->arm_sets.count; i++)
        if (p->arm_set_arm[i] == arm) sets[n++] = p->arm_sets.items[i];
    if (a->merge) sets[n++] = "moe.merged=true";
    return n;
}

/* Loads arm `arm`'s recipe with preset `preset`'s overrides and `extra`. */
static cm_status load_arm_recipe(const reader *r, const yaml_node_t *at, int arm, int preset,
                                 const char *extra, cm_recipe *recipe) {
    const study *s = r->out;
    const char *sets[STUDY_MAX_OVERRIDES + 1];
    int n = study_arm_overrides(s, arm, preset, sets);
    if (extra) sets[n++] = extra;
    if (recipe_load(s->arms[arm].recipe, sets, n, recipe) != CM_OK) {
        char why[2048];
        snprintf(why, sizeof why, "%s", cm_error_message());
        return fail_at(r, at, "arm '%s' with preset '%s': %s", s->arms[arm].name,
                       s->presets[preset].name, why);
    }
    return CM_OK;
}

/* The error of a check of arm `arm`'s start under preset `preset`: "arm A
 * cannot VERB arm S with preset P: WHY". */
static cm_status start_failure(const reader *r, const yaml_node_t *at, int arm, int preset,
                               const char *verb, const char *message) {
    char why[2048];
    snprintf(why, sizeof why, "%s", message);
    const study_arm *a = &r->out->arms[arm];
    return fail_at(r, at, "arm '%s' cannot %s arm '%s' with preset '%s': %s", a->name, verb,
                   r->out->arms[a->from].name, r->out->presets[preset].name, why);
}

/* A merge arm: the source's model must be one cmoe merge takes with the
 * arm's settings, and the arm's model the source's with moe.merged=true
 * (train --init loads the merged checkpoint into it). */
static cm_status check_merge(const reader *r, const yaml_node_t *at, int arm, int preset,
                             const cm_recipe *recipe) {
    const study_arm *a = &r->out->arms[arm];
    cm_recipe source, merged;
    CM_TRY(load_arm_recipe(r, at, a->from, preset, NULL, &source));
    merge_options options;
    study_merge_options(r->out, arm, &options);
    if (merge_check(&source, &options, "its final checkpoint") != CM_OK)
        return start_failure(r, at, arm, preset, "merge", cm_error_message());
    CM_TRY(load_arm_recipe(r, at, a->from, preset, "moe.merged=true", &merged));
    char keys[1024], why[1100];
    if (recipe_model_differences(&merged, recipe, keys, sizeof keys) > 0) {
        snprintf(why, sizeof why, "its model differs from the source's: %s", keys);
        return start_failure(r, at, arm, preset, "merge", why);
    }
    return CM_OK;
}

/* Every arm's recipe must load with each preset's and the arm's overrides,
 * and with each value of each evaluation it gets; an arm that upcycles
 * another's checkpoint must be an MoE that arm's dense model can become,
 * and one that merges another's must be able to: all before any run starts. */
static cm_status check_recipe(const reader *r, const yaml_node_t *at, int arm, int preset,
                              const char *extra) {
    cm_recipe recipe, source;
    CM_TRY(load_arm_recipe(r, at, arm, preset, extra, &recipe));
    const study_arm *a = &r->out->arms[arm];
    if (extra) return CM_OK;
    if (a->merge) return check_merge(r, at, arm, preset, &recipe);
    if (!a->upcycle) return CM_OK;
    CM_TRY(load_arm_recipe(r, at, a->from, preset, NULL, &source));
    upcycle_plan plan;
    if (upcycle_plan_make(&source, &recipe, &plan) != CM_OK)
        return start_failure(r, at, arm, preset, "upcycle", cm_error_message());
    return CM_OK;
}

static cm_status check_recipes(const reader *r, yaml_node_t *const *arm_nodes) {
    const study *s = r->out;
    for (int a = 0; a < s->n_arms; a++) {
        const yaml_node_t *at = item(r, arm_nodes[0], a);
        for (int p = 0; p < s->n_presets; p++) {
            CM_TRY(check_recipe(r, at, a, p, NULL));
            for (int e = 0; e < s->n_evaluations; e++) {
                const study_evaluation *ev = &s->evaluations[e];
                for (int v = 0; ev->arms[a] && v < ev->n_values; v++) {
                    char set[STUDY_SET_CAP];
                    snprintf(set, sizeof set, "%s=%s", ev->key, ev->values[v]);
                    CM_TRY(check_recipe(r, at, a, p, set));
                }
            }
        }
    }
    return CM_OK;
}

static cm_status parse_root(const reader *r, const yaml_node_t *root) {
    static const char *const keys[] = {"name",    "paper",       "summary", "arms",
                                       "presets", "evaluations", "metrics", "curve",
                                       "sweeps",  "layers",      "claims",  NULL};
    yaml_node_t *v[11];
    CM_TRY(take_keys(r, root, "a study", keys, v));
    static const int required[] = {0, 1, 3, 4, 6, 10};
    for (int i = 0; i < 6; i++)
        CM_TRY(require(r, root, v[required[i]], keys[required[i]], "a study"));
    study *s = r->out;
    CM_TRY(text_of(r, v[0], "name", s->name, sizeof s->name));
    CM_TRY(text_of(r, v[1], "paper", s->paper, sizeof s->paper));
    if (v[2]) CM_TRY(text_of(r, v[2], "summary", s->summary, sizeof s->summary));
    CM_TRY(parse_arms(r, v[3]));
    CM_TRY(parse_presets(r, v[4]));
    CM_TRY(parse_evaluations(r, v[5]));
    CM_TRY(parse_metrics(r, v[6]));
    CM_TRY(parse_curve(r, v[7]));
    CM_TRY(parse_sweeps(r, v[8]));
    CM_TRY(parse_layers(r, v[9]));
    CM_TRY(parse_claims(r, v[10]));
    return check_recipes(r, &v[3]);
}

cm_status study_load(const char *path, study *out) {
    *out = (study){.layers_metric = -1};
    snprintf(out->path, sizeof out->path, "%s", path);
    FILE *file = fopen(path, "rb");
    if (!file) return CM_ERR(CM_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    yaml_parser_t parser;
    yaml_parser_initialize(&parser);
    yaml_parser_set_input_file(&parser, file);
    reader r = {.path = path, .out = out};
    cm_status status = CM_OK;
    if (!yaml_parser_load(&parser, &r.doc)) {
        status = CM_ERR(CM_ERR_FORMAT, "%s:%d:%d: %s", path, (int)parser.problem_mark.line + 1,
                        (int)parser.problem_mark.column + 1,
                        parser.problem ? parser.problem : "malformed YAML");
    } else {
        yaml_node_t *root = yaml_document_get_root_node(&r.doc);
        if (!root)
            status = CM_ERR(CM_ERR_FORMAT, "%s: the file is empty", path);
        else
            status = parse_root(&r, root);
        yaml_document_delete(&r.doc);
    }
    yaml_parser_delete(&parser);
    fclose(file);
    return status;
}

/* ---- look-ups --------------------------------------------------------------------------- */

int study_find_arm(const study *s, const char *name) {
    for (int i = 0; i < s->n_arms; i++)
        if (strcmp(s->arms[i].name, name) == 0) return i;
    return -1;
}

int study_find_preset(const study *s, const char *name) {
    for (int i = 0; i < s->n_presets; i++)
        if (strcmp(s->presets[i].name, name) == 0) return i;
    return -1;
}

int study_find_metric(const study *s, const char *text) {
    for (int i = 0; i < s->n_metrics; i++)
        if (strcmp(s->metrics[i].text, text) == 0) return i;
    return -1;
}

int study_find_evaluation(const study *s, const char *name) {
    for (int i = 0; i < s->n_evaluations; i++)
        if (strcmp(s->evaluations[i].name, name) == 0) return i;
    return -1;
}
