/* L-inf adversarial examples for image classifiers, and the TRADES loss
 * (METHODS.md 4.3-4.4).
 *
 * One iterative attack covers PGD, FGSM and the TRADES / AdvMoE training
 * attacks:
 *   start:  x' = x (none) | clip01(x + U(-eps, eps)) (PGD) |
 *           x + std N(0,1), not clipped (TRADES and the AdvMoE release, std 0.001)
 *   steps:  x' <- clip01(clip_[x-eps, x+eps](x' + alpha sign(grad_x' L)))
 *           (sign(0) = 0; the eps clip, then [0,1], as the release)
 * FGSM is one step of size eps from x. The objective L is
 *   CE: CE(f(x'), y) + router_weight sum_r CE(r(x'), y mod E)   (PGD; the
 *       release's RA attack also attacks its router toward y mod E),
 *   KL: KL(P(x) || P(x')) + router_weight sum_r KL(R(x) || R(x'))  (TRADES;
 *       AdvMoE's training attack uses router_weight 1),
 * with P = softmax of the classifier logits, R = softmax of router r's
 * logits, and the clean P(x), R(x) computed once, without gradient. KL(P||Q)
 * = sum P (log P - log Q) is what PyTorch's KLDivLoss(log_softmax(f(x')),
 * softmax(f(x))) computes (METHODS.md writes its arguments in that order).
 * Means over the batch instead of the release's sums change no sign.
 *
 * Gradients are taken with respect to the input only: during the attack
 * every parameter of model->params has requires_grad switched off (so no
 * weight gradient is even computed) and is restored afterwards; parameter
 * values and gradients are untouched. Batch norm runs with its running
 * statistics unless bn_training (the release attacks in eval mode; in
 * training mode each attack forward would update the running statistics, as
 * in PyTorch). Each iteration's tape and activations are freed with
 * ag_ctx_mark / ag_ctx_release, so the arena is left as it was found.
 *
 * The model is a callback, so the same attack drives the dense CNN, the
 * MoE-CNN (with router logits) or a test model. */
#ifndef CMOE_TRAIN_ADVERSARIAL_H
#define CMOE_TRAIN_ADVERSARIAL_H

#include <stdbool.h>
#include <stdint.h>

#include "autograd/ops.h"
#include "autograd/params.h"
#include "layers/cnn.h"
#include "layers/moe_conv.h"

/* Classes of the per-class routing counts (the IDX data sets' ten). */
enum { ADV_MAX_ROUTERS = MOE_CNN_MAX_ROUTERS, ADV_EVAL_CLASSES = 10 };

/* ---- training modes (adversarial.mode and .router_objective; the image
 * classifier task, task_cnn.c, runs them) ------------------------------ */

typedef enum adv_mode {
    ADV_MODE_STANDARD = 0, /* clean cross-entropy */
    ADV_MODE_PGD_AT,       /* Madry: CE on PGD examples, all parameters jointly */
    ADV_MODE_TRADES,       /* TRADES loss, all parameters jointly */
    ADV_MODE_ADVMOE,       /* alternating expert (theta) and router (phi) steps */
    ADV_MODE_COUNT
} adv_mode;
typedef enum adv_router_objective {
    ADV_ROUTER_CODE = 0, /* alpha CE(r(x), y mod E) + beta KL (the release) */
    ADV_ROUTER_PAPER,    /* the full MoE TRADES loss w.r.t. phi */
    ADV_ROUTER_OBJECTIVE_COUNT
} adv_router_objective;
/* The spellings recipes use, in enum order, NULL-terminated. */
extern const char *const adv_mode_names[ADV_MODE_COUNT + 1];
extern const char *const adv_router_objective_names[ADV_ROUTER_OBJECTIVE_COUNT + 1];

/* ---- the attack ----------------------------------------------------------------- */

/* What one forward pass of the attacked model returns. */
typedef struct adv_model_output {
    ag_tensor *logits;                         /* [N,V] */
    int n_routers;                             /* 0 for a dense model */
    ag_tensor *router_logits[ADV_MAX_ROUTERS]; /* [N,E] each */
    const int32_t *experts[ADV_MAX_ROUTERS];   /* [N] expert each router chose (arena) */
} adv_model_output;

/* Runs the model on x [N,C,H,W]; batch norm in training mode when
 * bn_training. Fills *out, returns the context status. */
typedef cm_status (*adv_forward_fn)(ag_ctx *ctx, void *model, ag_tensor *x, bool bn_training,
                                    adv_model_output *out);

typedef struct adv_model {
    adv_forward_fn forward;
    void *model;       /* handed to forward */
    ag_params *params; /* switched to requires_grad = false during the attack; may be NULL
                          if the model has no ag_params parameters */
    int num_experts;   /* E, for the router CE target y mod E (0: no routers) */
} adv_model;

typedef enum adv_start {
    ADV_START_NONE = 0, /* x' = x */
    ADV_START_UNIFORM,  /* x' = clip01(x + U(-eps, eps)) */
    ADV_START_NORMAL,   /* x' = x + start_std N(0, 1), not clipped */
} adv_start;

typedef enum adv_objective {
    ADV_OBJECTIVE_CE = 0, /* needs labels */
    ADV_OBJECTIVE_KL,
} adv_objective;

typedef struct adv_attack_config {
    float epsilon;   /* L-inf radius */
    float step_size; /* alpha */
    int steps;
    adv_start start;
    float start_std; /* ADV_START_NORMAL */
    adv_objective objective;
    float router_weight; /* weight of the router terms; 0: classifier only */
    bool bn_training;    /* false: running statistics (the release) */
    cm_rng_key key;      /* random start draws: (key, first_index + element) */
} adv_attack_config;

/* PGD: uniform random start, CE objective, eval-mode batch norm. */
adv_attack_config adv_pgd_config(float epsilon, float step_size, int steps, cm_rng_key key);
/* FGSM: one step of size epsilon from x, CE objective. */
adv_attack_config adv_fgsm_config(float epsilon);
/* TRADES / AdvMoE training attack: start x + 0.001 N(0,1), KL objective;
 * router_weight 1 adds the routers' KL (AdvMoE), 0 is plain TRADES. */
adv_attack_config adv_trades_config(float epsilon, float step_size, int steps, float router_weight,
                                    cm_rng_key key);

/* x [N,C,H,W] clean images (values in [0,1]), labels [N] (CE objective;
 * may be NULL for KL) -> x_adv (caller memory, x->numel floats).
 * first_index: global index of x's first element, so the random start does
 * not depend on how a batch is split over ranks. The context must have room
 * for one forward + backward of the model; the attack frees what it used. */
cm_status adv_attack(ag_ctx *ctx, const adv_model *model, const adv_attack_config *config,
                     const ag_tensor *x, const int32_t *labels, uint64_t first_index, float *x_adv);

/* The TRADES loss: ce_weight CE(logits_clean, targets) + beta KL(P(x) || P(x')),
 * P = softmax, the KL averaged over the batch (PyTorch: CE + beta (1/B)
 * KLDivLoss(log_softmax(f(x')), softmax(f(x)), sum)). Gradients reach both
 * logits. The AdvMoE expert step is ce_weight 1 on the classifier logits; its
 * router step is ce_weight alpha on the router logits with targets y mod E.
 * logits [N,V] each, targets [N] -> [1]. */
ag_tensor *adv_trades_loss(ag_ctx *ctx, ag_tensor *logits_clean, ag_tensor *logits_adv,
                           const int32_t *targets, float ce_weight, float beta);

/* ---- adapters -------------------------------------------------------------- */

/* model = (const cnn_model *). */
cm_status adv_cnn_forward(ag_ctx *ctx, void *model, ag_tensor *x, bool bn_training,
                          adv_model_output *out);

/* model = (adv_moe_cnn *): the MoE-CNN and the options of its forward. */
typedef struct adv_moe_cnn {
    const moe_cnn_model *model;
    moe_cnn_forward_args args; /* `training` is replaced by the attack's bn mode */
    /* Router-only attack: when set, the attacked image goes to the router
     * alone and the experts see this (clean) image. */
    ag_tensor *expert_input;
} adv_moe_cnn;
cm_status adv_moe_cnn_forward(ag_ctx *ctx, void *model, ag_tensor *x, bool bn_training,
                              adv_model_output *out);

/* ---- robust evaluation of the (MoE-)CNN (METHODS.md 4.4) ---------------------
 *
 * Per test image x (label y), in eval mode (running statistics):
 *   SA              argmax f(x) = y;
 *   RA              argmax f(x_adv) = y, x_adv from `attack` (PGD: uniform
 *                   start; CE of the classifier plus attack->router_weight
 *                   times the routers' CE to y mod E, the release's RA
 *                   objective when that weight is beta);
 * and for an MoE model (routers present) three measures that are cmoe's own,
 * label-free definitions (METHODS.md 4.4 recommends them; the paper's own
 * measures were not retrievable):
 *   router robustness  per router, the fraction of images whose chosen expert
 *                   on the RA attack's x_adv equals the one on x;
 *   expert RA       accuracy with every route frozen to the clean routes of x
 *                   while the experts see x_adv; the attack runs under the
 *                   same freeze (forced_experts, no straight-through path to
 *                   the routers, whose choice cannot change the prediction,
 *                   and no router term);
 *   worst-case RA   the fraction of images the model (routes free) predicts
 *                   right on the RA attack's x_adv AND on the expert-RA
 *                   attack's image: that attack cannot follow the
 *                   straight-through gradient into the router, which can
 *                   mask the experts' gradient in the RA attack (a model
 *                   whose routes never move can show RA near SA while its
 *                   experts fall to the router-blind attack); for a dense
 *                   model it is RA;
 *   router-only RA  accuracy when only the router reads x_adv and the experts
 *                   see x; the attack (the RA objective) attacks the router's
 *                   input in that setting, so its gradient reaches x_adv only
 *                   through the straight-through mask. Defined for the
 *                   image-level router only: per-layer routers read the
 *                   features of the experts' own input.
 * All three attacks share the random start (attack->key, first_index). */
typedef struct adv_eval_counts {
    int64_t images;
    int64_t clean_correct;                /* SA */
    int64_t robust_correct;               /* RA */
    int64_t worst_correct;                /* worst-case RA */
    int64_t expert_correct;               /* expert RA (MoE) */
    int64_t router_only_correct;          /* router-only RA (image-level router) */
    int n_routers;                        /* of the model; 0: dense */
    int64_t routes_kept[ADV_MAX_ROUTERS]; /* router robustness counts, per router */
    /* Images per expert, per router, at [r * num_experts + e]: the expert
     * router r chose on the clean image (clean_per_expert) and on the RA
     * attack's image (attacked_per_expert; with an attack only). Each
     * router's row sums to `images` (attacked: when an attack ran). */
    int num_experts; /* E of the model (set by adv_moe_cnn_evaluate) */
    int64_t clean_per_expert[ADV_MAX_ROUTERS * MOE_CONV_MAX_EXPERTS];
    int64_t attacked_per_expert[ADV_MAX_ROUTERS * MOE_CONV_MAX_EXPERTS];
    /* The clean images per expert and true class, per router, at
     * [(r * num_experts + e) * ADV_EVAL_CLASSES + class] (labels outside
     * 0..ADV_EVAL_CLASSES-1 are not counted). */
    int64_t clean_per_expert_class[ADV_MAX_ROUTERS * MOE_CONV_MAX_EXPERTS * ADV_EVAL_CLASSES];
} adv_eval_counts;

/* Adds one batch to *counts: x [N,C,H,W] in [0,1], labels [N]. model must be
 * an adv_moe_cnn binding (forward adv_moe_cnn_forward; its args and
 * expert_input are set during the call and restored). attack NULL: SA only.
 * x_adv (caller memory, x->numel floats) receives the RA attack's images.
 * The arena is left as it was found. */
cm_status adv_moe_cnn_evaluate(ag_ctx *ctx, const adv_model *model, const adv_attack_config *attack,
                               const ag_tensor *x, const int32_t *labels, uint64_t first_index,
                               float *x_adv, adv_eval_counts *counts);

#endif
