/* Straight-through one-hot routing mask and row argmax; see ops_cnn_extra.h. */
#include "autograd/ops_cnn_extra.h"

#include "autograd/op_write.h"

/* logits [N,E] -> [N,E]; dlogits += dout (straight-through) */
static void onehot_st_backward(ag_ctx *ctx, ag_node *node) {
    (void)ctx;
    ag_tensor *logits = node->in[0];
    const float *dout = node->out->grad;
    for (int64_t i = 0; i < logits->numel; i++) logits->grad[i] += dout[i];
}

ag_tensor *ag_onehot_st(ag_ctx *ctx, ag_tensor *logits, const int32_t *choice) {
    AG_OP_BEGIN(ctx, logits);
    char shape[64];
    CM_ASSERT(logits->ndim == 2, "onehot_st: logits must be [N,E], got %s",
              ag_shape_str(logits, shape, sizeof shape));
    int rows = logits->shape[0], experts = logits->shape[1];
    for (int n = 0; n < rows; n++)
        CM_ASSERT(choice[n] >= 0 && choice[n] < experts,
                  "onehot_st: choice[%d] = %d outside [0,%d)", n, choice[n], experts);
    ag_tensor *out = ag_zeros(ctx, "onehot_st", 2, logits->shape);
    if (!out) return NULL;
    ag_record(ctx, "onehot_st", onehot_st_backward, out, 1, &logits, 0);
    if (ag_failed(ctx)) return NULL;
    for (int n = 0; n < rows; n++) out->data[(int64_t)n * experts + choice[n]] = 1.0f;
    return out;
}

void ag_argmax_rows(const ag_tensor *x, int32_t *index) {
    char shape[64];
    CM_ASSERT(x->ndim == 2 && x->shape[1] > 0, "argmax_rows: x must be [N,E] with E > 0, got %s",
              ag_shape_str(x, shape, sizeof shape));
    int rows = x->shape[0], columns = x->shape[1];
    for (int n = 0; n < rows; n++) {
        const float *row = x->data + (int64_t)n * columns;
        int best = 0;
        for (int e = 1; e < columns; e++)
            if (row[e] > row[best]) best = e;
        index[n] = best;
    }
}
