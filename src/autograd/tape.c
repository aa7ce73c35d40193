#include "autograd/tape.h"

#include <math.h>
#include <string.h>

#include "common/check.h"

/* A gradient buffer from ensure_grad sits after this header (one cache
 * line, so the buffer stays 64-byte aligned). */
struct ag_grad_block {
    uint64_t magic; /* GRAD_MAGIC: the block came from grad_alloc */
    size_t bytes;   /* capacity of the buffer after the header */
    ag_grad_block *next;
    unsigned char pad[AG_ARENA_ALIGN - 24];
};
_Static_assert(sizeof(ag_grad_block) == AG_ARENA_ALIGN, "gradient header is one cache line");
#define GRAD_MAGIC 0x6772616462756621ULL

cm_status ag_ctx_init(ag_ctx *ctx, size_t arena_bytes) {
    memset(ctx, 0, sizeof *ctx);
    ctx->grad_enabled = true;
    return ag_arena_init(&ctx->arena, arena_bytes);
}

void ag_ctx_free(ag_ctx *ctx) {
    ag_arena_free(&ctx->arena);
}

void ag_ctx_reset(ag_ctx *ctx) {
    ag_arena_reset(&ctx->arena);
    ctx->grad_free = NULL;
    ctx->tape_tail = NULL;
    ctx->tape_length = 0;
    ctx->status = CM_OK;
}

ag_mark ag_ctx_mark(const ag_ctx *ctx) {
    return (ag_mark){ctx->arena.used, ctx->tape_tail, ctx->tape_length};
}

void ag_ctx_release(ag_ctx *ctx, ag_mark mark) {
    CM_ASSERT(mark.arena_used <= ctx->arena.used, "releasing a mark taken after a reset");
    ctx->arena.used = mark.arena_used;
    /* freed gradient blocks above the mark are gone with the rest */
    const unsigned char *limit = ctx->arena.base + mark.arena_used;
    for (ag_grad_block **link = &ctx->grad_free; *link;) {
        if ((const unsigned char *)*link >= limit)
            *link = (*link)->next;
        else
            link = &(*link)->next;
    }
    ctx->tape_tail = mark.tape_tail;
    ctx->tape_length = mark.tape_length;
}

bool ag_set_grad_enabled(ag_ctx *ctx, bool enabled) {
    bool previous = ctx->grad_enabled;
    ctx->grad_enabled = enabled;
    return previous;
}

void *ag_alloc(ag_ctx *ctx, size_t bytes, const char *op) {
    if (ctx->status != CM_OK) return NULL;
    void *block = ag_arena_alloc(&ctx->arena, bytes);
    if (!block) {
        ctx->status = CM_ERR(CM_ERR_NOMEM,
                             "step arena full in op '%s': needs %zu more bytes, %zu of %zu MiB in "
                             "use; raise the arena size (train.arena_mib)",
                             op, bytes, ctx->arena.used >> 20, ctx->arena.capacity >> 20);
    }
    return block;
}

float *ag_alloc_floats(ag_ctx *ctx, int64_t count, const char *op) {
    return ag_alloc(ctx, (size_t)count * sizeof(float), op);
}

int32_t *ag_alloc_ints(ag_ctx *ctx, int64_t count, const char *op) {
    return ag_alloc(ctx, (size_t)count * sizeof(int32_t), op);
}

ag_tensor *ag_alias(ag_ctx *ctx, const char *op, float *data, int ndim, const int *shape) {
    ag_tensor *t = ag_alloc(ctx, sizeof *t, op);
    if (!t) return NULL;
    memset(t, 0, sizeof *t);
    ag_tensor_set_shape(t, ndim, shape);
    t->data = data;
    t->name = op;
    return t;
}

ag_tensor *ag_empty(ag_ctx *ctx, const char *op, int ndim, const int *shape) {
    ag_tensor *t = ag_alias(ctx, op, NULL, ndim, shape);
    if (!t) return NULL;
    t->data = ag_alloc_floats(ctx, t->numel, op);
    return t->data || t->numel == 0 ? t : NULL;
}

ag_tensor *ag_zeros(ag_ctx *ctx, const char *op, int ndim, const int *shape) {
    ag_tensor *t = ag_empty(ctx, op, ndim, shape);
    if (t) memset(t->data, 0, (size_t)t->numel * sizeof(float));
    return t;
}

ag_node *ag_record(ag_ctx *ctx, const char *op, ag_backward_fn backward, ag_tensor *out, int n_in,
                   ag_tensor *const *in, size_t saved_bytes) {
    if (ctx->status != CM_OK || !ctx->grad_enabled) return NULL;
    bool any = false;
    for (int i = 0; i < n_in; i++) any = any || in[i]->requires_grad;
    if (!any) return NULL;
    ag_node *node = ag_alloc(ctx, sizeof *node, op);
    ag_tensor **inputs = ag_alloc(ctx, (size_t)n_in * sizeof *inputs, op);
    void *saved = saved_bytes ? ag_alloc(ctx, saved_bytes, op) : NULL;
    if (!node || !inputs || (saved_bytes && !saved)) return NULL;
    memcpy(inputs, in, (size_t)n_in * sizeof *inputs);
    if (saved) memset(saved, 0, saved_bytes);
    *node = (ag_node){op, backward, out, inputs, n_in, saved, ctx->tape_tail};
    ctx->tape_tail = node;
    ctx->tape_length++;
    out->requires_grad = true;
    return node;
}

/* The smallest freed block that holds `bytes` and wastes at most half of
 * itself, else a new one from the arena. */
static float *grad_alloc(ag_ctx *ctx, size_t bytes, const char *op) {
    ag_grad_block **best = NULL;
    for (ag_grad_block **link = &ctx->grad_free; *link; link = &(*link)->next) {
        size_t size = (*link)->bytes;
        if (size >= bytes && size / 2 <= bytes && (!best || size < (*best)->bytes)) best = link;
    }
    ag_grad_block *block;
    if (best) {
        block = *best;
        *best = block->next;
    } else {
        block = ag_alloc(ctx, sizeof *block + bytes, op);
        if (!block) return NULL;
        block->magic = GRAD_MAGIC;
        block->bytes = bytes;
    }
    block->next = NULL;
    return (float *)(block + 1);
}

static void grad_release(ag_ctx *ctx, ag_tensor *t) {
    ag_grad_block *block = (ag_grad_block *)t->grad - 1;
    CM_ASSERT(block->magic == GRAD_MAGIC, "releasing a gradient of '%s' that backward did not make",
              t->name ? t->name : "?");
    block->next = ctx->grad_free;
    ctx->grad_free = block;
    t->grad = NULL;
}

/* Gives `t` a zeroed gradient buffer if it has none. */
static cm_status ensure_grad(ag_ctx *ctx, ag_tensor *t, const char *op) {
    if (t->grad) return CM_OK;
    t->grad = grad_alloc(ctx, (size_t)t->numel * sizeof(float), op);
    if (!t->grad) return ctx->status;
    if (t->numel) memset(t->grad, 0, (size_t)t->numel * sizeof(float));
    return CM_OK;
}

cm_status ag_backward_from(ag_ctx *ctx, ag_tensor *out, const float *dout) {
    if (ctx->status != CM_OK) return ctx->status;
    if (!out) return CM_ERR(CM_ERR_INVALID, "backward called on a NULL tensor");
    if (!out->requires_grad) {
        return CM_ERR(CM_ERR_INVALID,
                      "backward from '%s', which does not depend on any tensor that requires a "
                      "gradient (or was computed in no-grad mode)",
                      out->name ? out->name : "?");
    }
    CM_TRY(ensure_grad(ctx, out, "backward"));
    for (int64_t i = 0; i < out->numel; i++) out->grad[i] += dout[i];
    for (ag_node *node = ctx->tape_tail; node; node = node->prev) {
        if (!node->out->grad) continue; /* nothing downstream used this output */
        for (int i = 0; i < node->n_in; i++)
            if (node->in[i]->requires_grad) CM_TRY(ensure_grad(ctx, node->in[i], node->op));
        /* What the op's backward allocates is scratch: free it after. */
        size_t scratch = ag_scratch_mark(ctx);
        node->backward(ctx, node);
        if (ctx->status != CM_OK) break;
        ag_scratch_release(ctx, scratch);
        /* Every consumer of this output came later on the tape and has run. */
        if (!ctx->keep_grads) grad_release(ctx, node->out);
    }
    ctx->tape_tail = NULL;
    ctx->tape_length = 0;
    return ctx->status;
}

cm_status ag_backward(ag_ctx *ctx, ag_tensor *loss) {
    if (ctx->status != CM_OK) return ctx->status;
    if (loss && loss->numel != 1)
        return CM_ERR(CM_ERR_INVALID, "backward needs a scalar loss, got %lld elements",
                      (long long)loss->numel);
    const float one = 1.0f;
    return ag_backward_from(ctx, loss, &one);
}

void ag_tape_dump(const ag_ctx *ctx, FILE *stream) {
    char shape[64];
    int64_t index = ctx->tape_length;
    for (const ag_node *node = ctx->tape_tail; node; node = node->prev) {
        double norm = 0.0;
        if (node->out->grad)
            for (int64_t i = 0; i < node->out->numel; i++)
                norm += (double)node->out->grad[i] * node->out->grad[i];
        fprintf(stream, "node %5lld  %-20s out %-20s |grad| %s%.6g\n", (long long)--index, node->op,
                ag_shape_str(node->out, shape, sizeof shape), node->out->grad ? "" : "(none) ",
                sqrt(norm));
    }
}

/* ---- checkpoint ----------------------------------------------------------------- */

typedef struct checkpoint_saved {
    ag_region_fn fn;
    void *user; /* a copy, in the arena */
} checkpoint_saved;

/* Drops from the free list the gradient blocks at or past arena offset
 * `mark`: the caller is about to release that part of the arena. */
static void forget_grad_blocks_after(ag_ctx *ctx, size_t mark) {
    const unsigned char *limit = ctx->arena.base + mark;
    for (ag_grad_block **link = &ctx->grad_free; *link;) {
        if ((const unsigned char *)*link >= limit)
            *link = (*link)->next;
        else
            link = &(*link)->next;
    }
}

/* fn again on a tape of its own, then backward through it; what it
 * allocated is scratch (the driver releases it after this returns). */
static void checkpoint_backward(ag_ctx *ctx, ag_node *node) {
    const checkpoint_saved *saved = node->saved;
    ag_node *outer_tail = ctx->tape_tail;
    const int64_t outer_length = ctx->tape_length;
    const size_t mark = ag_scratch_mark(ctx);
    ctx->tape_tail = NULL;
    ctx->tape_length = 0;
    ag_tensor *out = saved->fn(ctx, node->in[0], saved->user);
    if (out && ctx->status == CM_OK) {
        CM_ASSERT(out->numel == node->out->numel, "checkpoint: the region's output changed size");
        ag_backward_from(ctx, out, node->out->grad);
    } else if (ctx->status == CM_OK) {
        ctx->status = CM_ERR(CM_ERR_INTERNAL, "checkpoint: the region failed in backward");
    }
    ctx->tape_tail = outer_tail;
    ctx->tape_length = outer_length;
    forget_grad_blocks_after(ctx, mark);
}

ag_tensor *ag_checkpoint(ag_ctx *ctx, ag_region_fn fn, ag_tensor *x, const void *user,
                         size_t user_bytes) {
    if (ctx->status != CM_OK || !x) return NULL;
    if (!ctx->grad_enabled || !x->requires_grad) return fn(ctx, x, user); /* as it is */
    ag_tensor *out = ag_empty(ctx, "checkpoint", x->ndim, x->shape);
    if (!out) return NULL;
    ag_node *node =
        ag_record(ctx, "checkpoint", checkpoint_backward, out, 1, &x, sizeof(checkpoint_saved));
    void *copy = ag_alloc(ctx, user_bytes ? user_bytes : 1, "checkpoint");
    if (!node || !copy) return NULL;
    memcpy(copy, user, user_bytes);
    *(checkpoint_saved *)node->saved = (checkpoint_saved){fn, copy};
    const size_t mark = ag_scratch_mark(ctx);
    ctx->grad_enabled = false;
    ag_tensor *region_out = fn(ctx, x, copy);
    ctx->grad_enabled = true;
    if (!region_out) return NULL;
    CM_ASSERT(region_out->numel == x->numel, "checkpoint: the region's output is not x's shape");
    memcpy(out->data, region_out->data, (size_t)out->numel * sizeof(float));
    ag_scratch_release(ctx, mark);
    return out;
}
