/* The autograd context: step arena + tape, and reverse-mode backward.
 *
 * Ops run eagerly. An op whose output needs a gradient appends a node
 * (backward function + saved context) to the tape, so the tape is already a
 * topological order and backward is a reverse walk over it.
 *
 * The gradient rule: every backward function ADDS (+=) into the gradient of
 * each input that requires one. The backward driver allocates a zeroed
 * gradient for an arena tensor the first time something flows into it, so a
 * tensor used by several consumers needs no special case, and nodes whose
 * output received no gradient are skipped.
 *
 * Errors: ops never crash on a full arena. The first failure is recorded in
 * ctx->status (message via cm_error_message, naming the op), every later op
 * returns NULL at once, and the caller checks ag_ctx_status after forward.
 * Code that reads t->data directly must check for NULL first.
 *
 * Owns: the arena and the tape (both per step). */
#ifndef CMOE_AUTOGRAD_TAPE_H
#define CMOE_AUTOGRAD_TAPE_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "autograd/arena.h"
#include "autograd/tensor.h"
#include "common/status.h"

typedef struct ag_ctx ag_ctx;
typedef struct ag_node ag_node;
typedef void (*ag_backward_fn)(ag_ctx *ctx, ag_node *node);

struct ag_node {
    const char *op;
    ag_backward_fn backward;
    ag_tensor *out;
    ag_tensor **in; /* n_in inputs; those with requires_grad have grad != NULL in backward */
    int n_in;
    void *saved; /* op-specific context, from the arena */
    ag_node *prev;
};

typedef struct ag_grad_block ag_grad_block;

struct ag_ctx {
    ag_arena arena;
    ag_node *tape_tail;
    int64_t tape_length;
    bool grad_enabled;
    cm_status status; /* sticky: the first failure inside an op */
    /* Backward frees the gradient of an op's output once that op's backward
     * has run (nothing reads it afterwards) and reuses the block for later
     * gradients, so a step holds the live gradients, not all of them.
     * keep_grads: every gradient stays readable after backward (for tests
     * and dumps that inspect intermediate gradients). */
    ag_grad_block *grad_free; /* freed gradient blocks, reused best-fit */
    bool keep_grads;
};

typedef struct ag_mark {
    size_t arena_used;
    ag_node *tape_tail;
    int64_t tape_length;
} ag_mark;

cm_status ag_ctx_init(ag_ctx *ctx, size_t arena_bytes);
void ag_ctx_free(ag_ctx *ctx);
/* Starts a new step: empties the tape, frees the arena, clears the status. */
void ag_ctx_reset(ag_ctx *ctx);
static inline cm_status ag_ctx_status(const ag_ctx *ctx) {
    return ctx->status;
}
static inline bool ag_failed(const ag_ctx *ctx) {
    return ctx->status != CM_OK;
}

/* Nested scopes inside a step (e.g. one PGD iteration): release frees what
 * was allocated and recorded after the mark. */
ag_mark ag_ctx_mark(const ag_ctx *ctx);
void ag_ctx_release(ag_ctx *ctx, ag_mark mark);

/* Scratch inside one op: everything allocated after the mark is freed by
 * the release (nothing recorded in between may outlive it). Backward
 * releases each op's backward allocations this way. */
static inline size_t ag_scratch_mark(const ag_ctx *ctx) {
    return ctx->arena.used;
}
static inline void ag_scratch_release(ag_ctx *ctx, size_t mark) {
    ctx->arena.used = mark;
}

/* No-grad mode (evaluation): ops record nothing. Returns the previous mode. */
bool ag_set_grad_enabled(ag_ctx *ctx, bool enabled);

/* Arena allocation on behalf of `op`; on overflow records the error (op name,
 * bytes needed and available) and returns NULL. */
void *ag_alloc(ag_ctx *ctx, size_t bytes, const char *op);
float *ag_alloc_floats(ag_ctx *ctx, int64_t count, const char *op);
int32_t *ag_alloc_ints(ag_ctx *ctx, int64_t count, const char *op);

/* A new arena tensor (data uninitialised / zeroed). requires_grad is false. */
ag_tensor *ag_empty(ag_ctx *ctx, const char *op, int ndim, const int *shape);
ag_tensor *ag_zeros(ag_ctx *ctx, const char *op, int ndim, const int *shape);
/* A tensor struct whose data aliases `data` (used by views such as reshape). */
ag_tensor *ag_alias(ag_ctx *ctx, const char *op, float *data, int ndim, const int *shape);

/* For op implementations: if grad mode is on and any input requires a
 * gradient, marks `out` as requiring one and appends a node with
 * `saved_bytes` of zeroed context; returns NULL when no node is needed or on
 * failure (check ag_failed). */
ag_node *ag_record(ag_ctx *ctx, const char *op, ag_backward_fn backward, ag_tensor *out, int n_in,
                   ag_tensor *const *in, size_t saved_bytes);
static inline bool ag_wants_grad(const ag_tensor *t) {
    return t->requires_grad && t->grad;
}

/* Gradients of op outputs (intermediates) are released during backward
 * unless ctx->keep_grads; leaf tensors (parameters, inputs) keep theirs. */
/* Backward from a scalar `loss` (seeded with 1), or from any tensor `out`
 * seeded with the upstream gradient `dout` (same numel). Consumes the tape. */
cm_status ag_backward(ag_ctx *ctx, ag_tensor *loss);
cm_status ag_backward_from(ag_ctx *ctx, ag_tensor *out, const float *dout);

/* Activation checkpointing (train.recompute: all): out = fn(ctx, x, user)
 * for a region whose output has x's shape (a transformer sub-block). Forward
 * runs fn without recording and keeps only out: everything fn allocated is
 * freed at once. Backward runs fn again, recording, on a tape of its own,
 * and backpropagates out's gradient through it into x and the parameters,
 * in the order of the uncheckpointed tape, so gradients are bit-identical.
 * fn must compute the same values every time (counter-based randomness),
 * leave nothing behind that outlives it, and read only x, *user (copied:
 * user_bytes of it are kept until backward) and parameters. Without grad
 * mode, or when x needs no gradient (nothing to hang the region's node on),
 * it is just fn, recorded as usual. With keep_grads the gradients inside a
 * region are not kept (they live in its backward's scratch). */
typedef ag_tensor *(*ag_region_fn)(ag_ctx *ctx, ag_tensor *x, const void *user);
ag_tensor *ag_checkpoint(ag_ctx *ctx, ag_region_fn fn, ag_tensor *x, const void *user,
                         size_t user_bytes);

/* One line per node, newest first: op, output shape, output-gradient L2 norm. */
void ag_tape_dump(const ag_ctx *ctx, FILE *stream);

#endif
