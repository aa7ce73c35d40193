#include "train/run_common.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

optim_config run_optimizer(const cm_recipe *recipe) {
    const cm_optim_cfg *o = &recipe->optim;
    return (optim_config){
        .kind = o->type,
        .adamw = {o->beta1, o->beta2, o->eps, o->weight_decay},
        .sgd = {o->momentum, o->weight_decay, o->nesterov},
    };
}

optim_lr_schedule run_lr_schedule(const cm_recipe *recipe) {
    const cm_schedule_cfg *s = &recipe->schedule;
    return (optim_lr_schedule){.kind = s->type,
                               .lr = recipe->optim.lr,
                               .min_lr = s->min_lr,
                               .warmup_steps = s->warmup_steps,
                               .total_steps = recipe->train.steps,
                               .step_size = s->step_size,
                               .gamma = s->gamma};
}

cm_status run_make_dirs(const char *path) {
    char partial[4096];
    size_t length = strlen(path);
    if (length >= sizeof partial) return CM_ERR(CM_ERR_INVALID, "path too long: %s", path);
    memcpy(partial, path, length + 1);
    for (size_t i = 1; i <= length; i++) {
        if (partial[i] != '/' && partial[i] != '\0') continue;
        char saved = partial[i];
        partial[i] = '\0';
        if (mkdir(partial, 0777) != 0 && errno != EEXIST)
            return CM_ERR(CM_ERR_IO, "cannot create directory %s: %s", partial, strerror(errno));
        partial[i] = saved;
    }
    return CM_OK;
}

cm_status run_save_checkpoint(const cm_recipe *recipe, const char *dir, const char *recipe_text,
                              const ag_params *params, int64_t step, int64_t optimizer_step,
                              const cm_comm *comm, char *path, size_t size) {
    ckpt_path_for_step(dir, step, path, size);
    ckpt_meta meta = {step, (uint64_t)recipe->train.seed, optimizer_step};
    CM_TRY(ckpt_save_sharded(path, params, &meta, recipe_text, comm));
    bool leader = !comm || comm->world_rank == 0;
    if (leader && recipe->checkpoint.keep_last > 0)
        CM_TRY(ckpt_prune(dir, recipe->checkpoint.keep_last));
    return CM_OK;
}

cm_status run_resume(const cm_recipe *recipe, const char *dir, const char *resume,
                     ag_params *params, const cm_comm *comm, ckpt_meta *meta, bool *found) {
    char path[4096];
    *found = false;
    if (strcmp(resume, "auto") == 0) {
        if (ckpt_find_latest(dir, path, sizeof path) != CM_OK) return CM_OK; /* a fresh run */
    } else {
        snprintf(path, sizeof path, "%s", resume);
    }
    CM_TRY(ckpt_load_sharded(path, params, meta, true, comm));
    if (meta->seed != (uint64_t)recipe->train.seed)
        return CM_ERR(CM_ERR_INVALID,
                      "%s was trained with train.seed %llu but the recipe says %lld; resuming "
                      "with another seed would change the data order (use --set train.seed=%llu)",
                      path, (unsigned long long)meta->seed, (long long)recipe->train.seed,
                      (unsigned long long)meta->seed);
    *found = true;
    return CM_OK;
}
