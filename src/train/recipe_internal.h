/* Internals shared by recipe.c (YAML files, base:, --set, resolution),
 * recipe_keys.c (the key table and everything typed: parsing, range checks,
 * output) and recipe_checks.c (cross-key checks). Not part of the public API. */
#ifndef CMOE_TRAIN_RECIPE_INTERNAL_H
#define CMOE_TRAIN_RECIPE_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>

#include "train/recipe.h"

typedef enum recipe_type {
    RECIPE_INT,    /* int */
    RECIPE_INT64,  /* int64_t */
    RECIPE_DOUBLE, /* double */
    RECIPE_BOOL,   /* bool */
    RECIPE_STRING, /* char[capacity] */
    RECIPE_ENUM,   /* an int-sized C enum whose values index enum_names */
} recipe_type;

typedef struct recipe_key {
    const char *section; /* "" for top-level keys */
    const char *name;
    recipe_type type;
    size_t offset;            /* of the field in cm_recipe */
    size_t capacity;          /* strings: size of the char array */
    const char *default_text; /* parsed like a value from a file */
    const char *range;        /* "[lo, hi]", "(lo, hi]", ...: numbers only */
    const char *help;
    const char *const *enum_names; /* NULL-terminated */
    /* Extra check for strings: returns why the value is bad, or NULL. */
    const char *(*check_string)(const char *value);
} recipe_key;

typedef struct recipe_section {
    const char *name;
    const char *help;
} recipe_section;

extern const recipe_key recipe_keys[];
extern const int recipe_keys_total;
extern const recipe_section recipe_sections[];
extern const int recipe_sections_total;

/* Index into recipe_keys, or -1. */
int recipe_find_key(const char *section, const char *name);
/* Index into recipe_sections, or -1. */
int recipe_find_section(const char *name);

/* "optim.lr", or "name" for a top-level key. */
void recipe_key_path(const recipe_key *key, char *buffer, size_t capacity);

/* A scalar as it came from YAML or --set. `plain`: unquoted; `is_null`: a
 * plain empty, "~" or "null" scalar (no value at all). */
typedef struct recipe_scalar {
    const char *text;
    bool plain;
    bool is_null;
} recipe_scalar;

/* Parses, range-checks and stores one value. On failure returns
 * CM_ERR_INVALID and writes the reason, without a location, to `why`. */
cm_status recipe_key_parse(const recipe_key *key, recipe_scalar value, cm_recipe *recipe, char *why,
                           size_t why_capacity);

enum { RECIPE_MAX_INVOLVED = 6 };

/* Cross-key checks on a complete recipe (recipe_checks.c). On failure returns
 * false, writes the reason to `why` and the indices of the (up to
 * RECIPE_MAX_INVOLVED) keys involved to `involved` (-1 when unused), so the
 * caller can point at whichever of them was set last. */
bool recipe_check_consistency(const cm_recipe *recipe, int involved[RECIPE_MAX_INVOLVED], char *why,
                              size_t why_capacity);

/* The candidate closest to `word` by edit distance, if it is close enough to
 * be a likely typo; NULL otherwise. */
const char *recipe_did_you_mean(const char *word, const char *const *candidates, int n_candidates);

#endif
