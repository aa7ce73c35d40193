/* HDF5 checkpoints: everything needed to resume a run exactly.
 *
 * Layout (format "cmoe-ckpt", version 2; docs/checkpoint.md):
 *   /                 attributes format, version, step, seed, optimizer_step, recipe
 *   /params/NAME      float32 dataset per parameter, in its declared shape, with
 *                     int attributes frozen, no_decay, expert
 *   /optim/m/NAME     AdamW first moment (or SGD momentum) per trainable parameter;
 *                     for an expert parameter, attribute steps int64 [E]: the
 *                     updates each expert has had (optim.skip_unused_experts)
 *   /optim/v/NAME     AdamW second moment per trainable parameter
 *   /upcycled_from    optional (cmoe upcycle): attributes path, step, seed,
 *                     recipe of the checkpoint this one was made from, and
 *                     method (what was done, one line)
 *   /merged_from      the same, written by cmoe merge
 * Every dataset carries a Fletcher-32 checksum, and the file uses the
 * HDF5 1.10 format with metadata checksums, so truncation and corruption are
 * reported as errors on load. A checkpoint is written to PATH.tmp and renamed
 * to PATH only when complete: a file named ckpt-*.h5 is always whole.
 * Owns: nothing beyond the duration of a call. */
#ifndef CMOE_TRAIN_CHECKPOINT_H
#define CMOE_TRAIN_CHECKPOINT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "autograd/params.h"
#include "common/status.h"
#include "parallel/comm.h"

/* Version 2 added the "steps" attribute of expert moments; version 1 files
 * load (every expert slice then counts optimizer_step updates). */
enum { CKPT_FORMAT_VERSION = 2 };

typedef struct ckpt_meta {
    int64_t step;           /* training steps completed */
    uint64_t seed;          /* run seed: with step, the whole RNG and data state */
    int64_t optimizer_step; /* for AdamW bias correction */
} ckpt_meta;

/* Writes params (values and both moment mirrors) and meta to `path`
 * atomically; `recipe_text` (may be NULL) is stored as provenance. */
cm_status ckpt_save(const char *path, const ag_params *params, const ckpt_meta *meta,
                    const char *recipe_text);

/* Where a checkpoint made from another one (cmoe upcycle, cmoe merge)
 * comes from. */
typedef struct ckpt_origin {
    const char *path;   /* the source checkpoint */
    int64_t step;       /* its step */
    uint64_t seed;      /* its train.seed */
    const char *recipe; /* its recipe text */
    const char *method; /* what was done to it, one line */
    const char *group;  /* the group's name: NULL "upcycled_from", or "merged_from" */
} ckpt_origin;

/* ckpt_save with the origin's group (/upcycled_from or /merged_from). */
cm_status ckpt_save_with_origin(const char *path, const ag_params *params, const ckpt_meta *meta,
                                const char *recipe_text, const ckpt_origin *origin);

/* Reads a checkpoint into an already finalized registry of the same model:
 * every parameter must be present with the same shape, and the file must not
 * hold parameters the model lacks. With load_optimizer false, the moments
 * are left untouched (evaluation). */
cm_status ckpt_load(const char *path, ag_params *params, ckpt_meta *meta, bool load_optimizer);

/* The same under expert parallelism (comm NULL: one process). Collective
 * over the world: expert tensors are gathered from the first EP group to
 * world rank 0, which writes them in their global layout [E, ...] (so the
 * file does not depend on the rank count); every rank learns whether the
 * write succeeded. */
cm_status ckpt_save_sharded(const char *path, const ag_params *params, const ckpt_meta *meta,
                            const char *recipe_text, const cm_comm *comm);
/* Every rank reads the file; expert tensors read this rank's experts (the
 * file's leading dimension must be E = local experts x EP ranks). */
cm_status ckpt_load_sharded(const char *path, ag_params *params, ckpt_meta *meta,
                            bool load_optimizer, const cm_comm *comm);

/* The recipe text stored in a checkpoint (malloc'd; caller frees). */
cm_status ckpt_read_recipe(const char *path, char **recipe_text);

/* Prints the attributes, the origin (if any) and every parameter (shape,
 * count, flags) of a checkpoint, for `cmoe inspect`. */
cm_status ckpt_describe(const char *path, FILE *out);

/* "DIR/ckpt-00001234.h5" */
void ckpt_path_for_step(const char *dir, int64_t step, char *out, size_t size);
/* The complete checkpoint with the highest step in dir; CM_ERR_IO if none. */
cm_status ckpt_find_latest(const char *dir, char *out, size_t size);
/* Deletes all but the newest `keep` complete checkpoints in dir (keep >= 1). */
cm_status ckpt_prune(const char *dir, int keep);
/* Deletes DIR/ckpt-*.h5.tmp: the partial files of saves that a kill cut
 * short. Only for a directory this process holds (cm_lock_dir). */
cm_status ckpt_remove_temporaries(const char *dir);

#endif
