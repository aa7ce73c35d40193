/* Pieces every trainer (LM and CNN) shares: optimizer and LR schedule from a
 * recipe, run directories, checkpoint save (with pruning) and resume.
 * Owns: nothing. */
#ifndef CMOE_TRAIN_RUN_COMMON_H
#define CMOE_TRAIN_RUN_COMMON_H

#include <stddef.h>
#include <stdint.h>

#include "autograd/params.h"
#include "optim/optim.h"
#include "parallel/comm.h"
#include "train/checkpoint.h"
#include "train/recipe.h"

/* optim.* and schedule.* of a recipe; the schedule spans train.steps. */
optim_config run_optimizer(const cm_recipe *recipe);
optim_lr_schedule run_lr_schedule(const cm_recipe *recipe);

/* mkdir -p */
cm_status run_make_dirs(const char *path);

/* Saves checkpoint.dir/ckpt-STEP.h5 (collective under MPI) and, on world
 * rank 0, keeps the newest checkpoint.keep_last; the path goes to `path`. */
cm_status run_save_checkpoint(const cm_recipe *recipe, const char *dir, const char *recipe_text,
                              const ag_params *params, int64_t step, int64_t optimizer_step,
                              const cm_comm *comm, char *path, size_t size);

/* Loads `resume` (a path, or "auto": the newest checkpoint in dir; none =
 * a fresh run, *found false) into params and moments. A checkpoint of
 * another train.seed is refused (the data order would change). */
cm_status run_resume(const cm_recipe *recipe, const char *dir, const char *resume,
                     ag_params *params, const cm_comm *comm, ckpt_meta *meta, bool *found);

#endif
