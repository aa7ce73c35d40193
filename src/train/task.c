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
