/* Helpers shared by the ops_*.c files; not part of the public API. */
#ifndef CMOE_AUTOGRAD_OP_WRITE_H
#define CMOE_AUTOGRAD_OP_WRITE_H

#include "autograd/ops.h"
#include "common/check.h"

/* Returns NULL from the op when the context failed or an input is missing. */
#define AG_OP_BEGIN(ctx, ...)                                                                      \
    do {                                                                                           \
        const ag_tensor *ag_op_inputs_[] = {__VA_ARGS__};                                          \
        if (ag_failed(ctx)) return NULL;                                                           \
        for (size_t i_ = 0; i_ < sizeof ag_op_inputs_ / sizeof ag_op_inputs_[0]; i_++)             \
            if (!ag_op_inputs_[i_]) return NULL;                                                   \
    } while (0)

/* Asserts a shape relation, printing the op name and both shapes. */
#define AG_CHECK_SHAPES(cond, op, a, b)                                                            \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            char sa_[64], sb_[64];                                                                 \
            CM_ASSERT(cond, "%s: incompatible shapes %s and %s", op,                               \
                      ag_shape_str(a, sa_, sizeof sa_), ag_shape_str(b, sb_, sizeof sb_));         \
        }                                                                                          \
    } while (0)

#endif
