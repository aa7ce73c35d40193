#include "train/task.h"

#include "common/check.h"

/* One row per model.arch value; a new model is one new task file and a row. */
static const task_vtable *const tasks[CM_ARCH_COUNT] = {
    [CM_ARCH_TRANSFORMER_LM] = &task_lm,
    [CM_ARCH_RESNET] = &task_cnn,
};

const task_vtable *task_for(cm_model_arch arch) {
    CM_ASSERT(arch >= 0 && arch < CM_ARCH_COUNT && tasks[arch], "model.arch holds %d, not a task",
              (int)arch);
    return tasks[arch];
}

cm_status task_eval_stopped(const task_eval_request *request, MPI_Comm world, bool *stopped) {
    *stopped = false;
    if (!request->stop) return CM_OK;
    int64_t any = *request->stop != 0;
    CM_TRY(comm_sum_int64(world, &any, 1));
    *stopped = any > 0;
    return CM_OK;
}
