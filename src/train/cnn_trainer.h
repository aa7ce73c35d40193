/* Training and evaluation of the image classifier (model.arch resnet): the
 * dense ResNet or the MoE-CNN of layers/moe_conv.h on IDX images, with the
 * adversarial training modes of METHODS.md 4.3 (adversarial.mode):
 *   standard  CE(f(x), y), all parameters;
 *   pgd_at    CE(f(x'), y) with x' from PGD (uniform start, CE objective),
 *             all parameters jointly (Madry);
 *   trades    CE(f(x), y) + beta KL(P(x) || P(x')) with x' from the TRADES
 *             attack (KL objective; an MoE model's attack also pushes its
 *             routers, router weight 1, as AdvMoE's), all parameters jointly:
 *             the "AT" baseline of AdvMoE for an MoE model;
 *   advmoe    per batch an expert step then a router step:
 *             expert step: x'_theta from the AdvMoE attack, the TRADES loss,
 *               only theta (everything except the routers) is updated;
 *             router step: a fresh x'_phi on the updated theta, then
 *               router_objective code:  sum over routers r of
 *                 alpha CE(r(x), y mod E) + beta KL(R(x) || R(x'_phi)),
 *               router_objective paper: the TRADES loss of the whole MoE,
 *             and only phi (moe_cnn_router_params) is updated.
 * The set that is not updated in a step is frozen for that step (so it gets
 * no gradient and its optimizer moments stay untouched, as the release's two
 * optimizers); both sets use the recipe's optimizer and schedule.
 * Attacks run with batch-norm running statistics (eval mode); the loss
 * forwards in training mode (their running-statistics updates are part of
 * the model state: a router step's forwards update them too).
 *
 * Evaluation on the test split (first train.eval_batches batches):
 * SA = clean top-1 accuracy, RA = accuracy under PGD (adversarial.eval_steps
 * steps of eval_step_size, uniform random start, CE of the classifier only),
 * both in eval mode. Periodic (train.eval_every) and final results go to
 * metrics.jsonl as {"kind": "test", "step", "sa", "ra", "images"}; the
 * inference multiply-adds per image (moe_cnn_flops total: one expert group
 * per MoE conv plus the routers) are printed and written in a "kind":
 * "model" line.
 *
 * Every random draw is keyed by (train.seed, step), so a resumed run
 * continues bit for bit. Owns: everything it allocates, per call. */
#ifndef CMOE_TRAIN_CNN_TRAINER_H
#define CMOE_TRAIN_CNN_TRAINER_H

#include <stdbool.h>
#include <stdint.h>

#include "autograd/params.h"
#include "common/status.h"
#include "train/recipe.h"
#include "train/trainer.h"

typedef struct cnn_trainer_result {
    int64_t steps_done;
    bool interrupted;
    double last_train_loss;
    double sa, ra;       /* of the last evaluation; NAN if none */
    int64_t eval_images; /* images of the last evaluation */
    double images_per_second;
    double step_seconds; /* mean wall time of one optimizer step (advmoe: both phases) */
    int64_t flops;       /* inference multiply-adds per image */
    char last_checkpoint[4096];
} cnn_trainer_result;

/* The whole run: options->comm must be NULL or a single-process world (the
 * CNN trainer is not data parallel yet). */
cm_status cnn_trainer_run(const cm_recipe *recipe, const trainer_options *options,
                          cnn_trainer_result *result);

/* Loads `checkpoint` into the model of `recipe` and measures SA and RA on the
 * test split (split CM_SPLIT_TRAIN: the training images, not augmented) over
 * max_batches batches (<= 0: all). */
cm_status cnn_trainer_evaluate(const cm_recipe *recipe, const char *checkpoint, cm_split split,
                               int64_t max_batches, double *sa, double *ra, int64_t *images);

/* ---- the pieces, for tests ---------------------------------------------------- */

typedef struct cnn_run cnn_run;

/* Builds the model (initialised from train.seed), opens the training data
 * and sets up the optimizer. */
cm_status cnn_run_open(const cm_recipe *recipe, cnn_run **out);
void cnn_run_close(cnn_run *run);
ag_params *cnn_run_params(cnn_run *run);
/* Inference multiply-adds per image of the model (moe_cnn_flops total). */
int64_t cnn_run_flops_per_image(const cnn_run *run);
/* The router parameters (phi); 0 for a dense model. */
int cnn_run_router_params(cnn_run *run, ag_param **out, int capacity);
/* One optimizer step at 0-based `step` of adversarial.mode (advmoe: both
 * phases); *loss is the loss of the (expert) step. */
cm_status cnn_run_step(cnn_run *run, int64_t step, double *loss);
/* The two phases of an advmoe step, separately. */
cm_status cnn_run_expert_step(cnn_run *run, int64_t step, double *loss);
cm_status cnn_run_router_step(cnn_run *run, int64_t step, double *loss);

#endif
