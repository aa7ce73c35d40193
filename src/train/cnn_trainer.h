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
 * Evaluation on the test split (first train.eval_batches batches), in eval
 * mode (adversarial.h, adv_moe_cnn_evaluate): SA = clean top-1 accuracy, RA =
 * accuracy under PGD (adversarial.eval_steps steps of eval_step_size, uniform
 * random start; the objective is the classifier's CE plus, for an MoE model,
 * adversarial.eval_router_weight times the router CE to y mod E: 0 by
 * default, the release's RA attack uses beta), and for an MoE model the
 * router robustness (per router and the mean), the expert RA (routes frozen
 * to the clean ones), the router-only RA (image-level router only) and the
 * worst-case RA (right under both the RA attack and the router-blind attack
 * of expert RA): cmoe's own definitions, after METHODS.md 4.4. Periodic (train.eval_every)
 * and final results go to metrics.jsonl as {"kind": "test", "step", "sa",
 * "ra", "images", ..., and for MoE "router_robustness" (mean),
 * "router_robustness_per_router": [...], "expert_ra", "router_only_ra",
 * "ra_worst"}, -1
 * standing for "not measured"; the inference multiply-adds per image
 * (moe_cnn_flops total: one expert group per MoE conv plus the routers) are
 * printed and written in a "kind": "model" line.
 *
 * Data parallel under MPI (options->comm with several ranks): every rank
 * holds the whole model (the channel-group experts of the MoE-CNN are slices
 * of dense conv weights and stay replicated; they are not sharded by expert
 * parallelism) and takes its shard_rows share of the global batch
 * (data.batch_size), the same images and augmentations as one process; each
 * rank's loss is its rows' mean times its share of the batch, so the summed
 * gradients are the global batch's. Batch norm in training mode normalises
 * with each rank's own batch statistics (as PyTorch DDP without SyncBN);
 * the running statistics are averaged over the ranks after every update, so
 * every rank holds the same model. Attacks are per image (eval-mode batch
 * norm) with random starts keyed by the global image index. Evaluation
 * splits every test batch over the ranks and sums the counts. Rank 0 prints,
 * writes metrics.jsonl and the checkpoints (which do not depend on the rank
 * count), and every checkpoint is preceded by a check that all ranks hold
 * identical parameters.
 *
 * Every random draw is keyed by (train.seed, step), so a resumed run
 * continues bit for bit (on the same rank count). Owns: everything it
 * allocates, per call. */
#ifndef CMOE_TRAIN_CNN_TRAINER_H
#define CMOE_TRAIN_CNN_TRAINER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "autograd/params.h"
#include "common/status.h"
#include "layers/moe_conv.h"
#include "train/recipe.h"
#include "train/trainer.h"

/* One evaluation; NAN for what was not measured. */
typedef struct cnn_eval_result {
    int64_t images;
    double sa, ra;            /* ra: NAN when adversarial.eval_steps is 0 */
    double ra_worst;          /* worst-case RA (adversarial.h); = ra for a dense model */
    int n_routers;            /* 0: a dense model (the rest is NAN) */
    double router_robustness; /* mean over the routers */
    double router_robustness_per_router[MOE_CNN_MAX_ROUTERS];
    double expert_ra;      /* routes frozen to the clean ones */
    double router_only_ra; /* NAN also for per-layer routing */
} cnn_eval_result;

/* "SA 0.8123, RA 0.5012 (PGD-20, eps 0.1, step 0.0125) over 1024 images" and,
 * for an MoE model, "; router robustness 0.91 (per router ...), expert RA
 * ..., router-only RA ..." into buf. */
void cnn_eval_describe(const cm_recipe *recipe, const cnn_eval_result *eval, char *buf,
                       size_t size);

typedef struct cnn_trainer_result {
    int64_t steps_done;
    bool interrupted;
    double last_train_loss; /* of the global batch */
    cnn_eval_result eval;   /* the last evaluation; images 0 and NANs if none */
    double images_per_second;
    double step_seconds; /* mean wall time of one optimizer step (advmoe: both phases) */
    int64_t flops;       /* inference multiply-adds per image */
    char last_checkpoint[4096];
} cnn_trainer_result;

/* The whole run; every rank of options->comm (NULL: one process) calls it. */
cm_status cnn_trainer_run(const cm_recipe *recipe, const trainer_options *options,
                          cnn_trainer_result *result);

/* Loads `checkpoint` into the model of `recipe` and evaluates it (one
 * process) on the test split (split CM_SPLIT_TRAIN: the training images, not
 * augmented) over max_batches batches (<= 0: all). */
cm_status cnn_trainer_evaluate(const cm_recipe *recipe, const char *checkpoint, cm_split split,
                               int64_t max_batches, cnn_eval_result *eval);

/* ---- the pieces, for tests ---------------------------------------------------- */

typedef struct cnn_run cnn_run;

/* Builds the model (initialised from train.seed), opens the training data
 * and sets up the optimizer; one process. */
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
/* Evaluates the current model on the first max_batches (<= 0: all) batches
 * of the test split (opened on first use). */
cm_status cnn_run_evaluate(cnn_run *run, int64_t max_batches, cnn_eval_result *eval);

#endif
