/* The files of `cmoe route` (route.c has the command): the routing of a text
 * by a language model's MoE layers, collected batch by batch, and the
 * per-class table of an image classifier's routers.
 * Owns: route_lm_data (its files and counts), until route_lm_close. */
#ifndef CMOE_CLI_ROUTE_OUT_H
#define CMOE_CLI_ROUTE_OUT_H

#include <stddef.h>
#include <stdint.h>

#include "common/status.h"
#include "layers/transformer.h"

enum { ROUTE_MAX_SHOW = 4096 };

typedef struct route_lm_data route_lm_data;

/* Opens DIR/routing.tsv (header written) and the counts for the MoE layers
 * of `model`; `show` bytes go into the picture, `top` bytes per expert into
 * experts.tsv. */
cm_status route_lm_open(const char *dir, const lm_model *model, int show, int top,
                        route_lm_data **out);
/* Adds one forward's routing: its `tokens` bytes are bytes[0, tokens), at
 * text positions first_pos ... (rows of routing.tsv, counts, the picture). */
cm_status route_lm_add(route_lm_data *r, const lm_moe_report *report, const unsigned char *bytes,
                       int64_t first_pos, int tokens);
/* Closes routing.tsv, writes experts.tsv and routing.png (of text[0, n),
 * titled `title`) and prints the experts table. */
cm_status route_lm_finish(route_lm_data *r, const unsigned char *text, size_t n, const char *title);
void route_lm_close(route_lm_data *r);

/* DIR/class-routes.tsv and the printed table from counts
 * [(router * experts + e) * ADV_EVAL_CLASSES + class] over `images` images. */
cm_status route_write_classes(const char *dir, const int64_t *counts, int routers, int experts,
                              int64_t images);

#endif
