/* The image classifier (model.arch resnet) as a task of the run loop
 * (train/task.h): the dense ResNet or the MoE-CNN of layers/moe_conv.h on IDX
 * images, with the adversarial training modes of METHODS.md 4.3
 * (adversarial.mode):
 *   standard  CE(f(x), y), all parameters;
 *   pgd_at    CE(f(x'), y) with x' from PGD (uniform start, CE objective),
 *             all parameters jointly (Madry);
 *   trades    CE(f(x), y) + beta KL(P(x) || P(x')) with x' from the TRADES
 *             attack (KL objective; an MoE model's attack also pushes its
 *             routers, router weight 1, as AdvMoE's), all parameters jointly:
 *             the "AT" baseline of AdvMoE for an MoE model;
 *   advmoe    two phases per batch, an expert phase then a router phase:
 *             expert phase: x'_theta from the AdvMoE attack, the TRADES loss,
 *               only theta (everything except the routers) is updated;
 *             router phase: a fresh x'_phi on the updated theta, then
 *               router_objective code:  sum over routers r of
 *                 alpha CE(r(x), y mod E) + beta KL(R(x) || R(x'_phi)),
 *               router_objective paper: the TRADES loss of the whole MoE,
 *             and only phi (moe_cnn_router_params) is updated.
 * The set that is not updated in a phase is frozen for that phase (so it gets
 * no gradient and its optimizer moments stay untouched, as the release's two
 * optimizers); each phase has its own optimizer step count, both use the
 * recipe's optimizer and schedule. Attacks run with batch-norm running
 * statistics (eval mode); the loss forwards in training mode (their
 * running-statistics updates are part of the model state: a router phase's
 * forwards update them too).
 *
 * Evaluation on the test split (periodic and final: the first
 * train.eval_batches batches), in eval mode (adversarial.h,
 * adv_moe_cnn_evaluate): SA = clean top-1 accuracy, RA = accuracy under PGD
 * (adversarial.eval_steps steps of eval_step_size, uniform random start; the
 * objective is the classifier's CE plus, for an MoE model,
 * adversarial.eval_router_weight times the router CE to y mod E: 0 by
 * default, the release's RA attack uses beta), and for an MoE model the
 * router robustness (per router and the mean), the expert RA (routes frozen
 * to the clean ones), the router-only RA (image-level router only) and the
 * worst-case RA (right under both the RA attack and the router-blind attack
 * of expert RA): cmoe's own definitions, after METHODS.md 4.4. They go to
 * metrics.jsonl as {"kind": "test", "step", "sa", "ra", "images", ..., and
 * for MoE "router_robustness" (mean), "router_robustness_per_router": [...],
 * "expert_ra", "router_only_ra", "ra_worst"}, -1 standing for "not
 * measured"; the inference multiply-adds per image (moe_cnn_flops total: one
 * expert group per MoE conv plus the routers) go to the "model" line.
 *
 * Routing diagnostics of an MoE model (is a router robustness of 1 a robust
 * router or a collapsed one?):
 *   training: the images each router sent to each expert in the log window
 *     (train.log_every steps), summed over the ranks (the global batch), one
 *     line per router at each log step: {"kind": "moe_cnn", "step",
 *     "router": r, "phase": 0, "attacked", "images", "max_share",
 *     "collapsed", "images_per_expert": [E counts]}. What is counted is the
 *     routing of phase 0's training-mode forward: the clean images of the
 *     TRADES loss (trades, and advmoe's expert phase; the router phase is
 *     not counted) or of standard; pgd_at has no clean forward and counts
 *     its forward of the attacked images ("attacked": 1). "images" = steps
 *     of the window x data.batch_size; each router's counts sum to it;
 *   evaluation: the "test" line gets "images_per_expert_clean" (the routes
 *     of the clean images) and "images_per_expert_ra" (of the RA attack's
 *     images; with eval_steps > 0), each [R x E] router-major (router r's
 *     counts at r*E .. r*E+E-1, each router's summing to "images"; left out
 *     when 2 R E exceeds TASK_EVAL_COUNTS_MAX), "max_expert_share_clean" and
 *     "max_expert_share_ra" (the largest share of one expert over the
 *     routers) and "collapsed_routers";
 *   a router is collapsed when more than TASK_CNN_COLLAPSED_SHARE of the
 *     images go to one expert: the line says "collapsed": 1, the evaluation
 *     counts it in "collapsed_routers" (clean or attacked) and its printed
 *     summary ends with a WARNING per such router; in training a WARNING is
 *     printed when a router becomes collapsed (a window collapsed after one
 *     that was not).
 *
 * Data parallel under MPI: every rank holds the whole model (the
 * channel-group experts of the MoE-CNN are slices of dense conv weights and
 * stay replicated; they are not sharded by expert parallelism) and takes its
 * shard_rows share of the global batch. Batch norm in training mode
 * normalises with each rank's own batch statistics (as PyTorch DDP without
 * SyncBN); the running statistics are averaged over the ranks after every
 * update, so every rank holds the same model. Attacks are per image
 * (eval-mode batch norm) with random starts keyed by the global image index.
 * Owns: its state, per task. */
#ifndef CMOE_TRAIN_TASK_CNN_H
#define CMOE_TRAIN_TASK_CNN_H

#include "layers/moe_conv.h"
#include "train/task.h"

/* The phases of an advmoe step (other modes have phase 0 only). */
enum { CNN_PHASE_EXPERTS = 0, CNN_PHASE_ROUTERS = 1 };

/* A router that sends more than this share of the images to one expert (in
 * a training window or in evaluation) is reported as collapsed. */
#define TASK_CNN_COLLAPSED_SHARE 0.9

/* For tests: the router parameters (phi) of the task's model (0 for a dense
 * model), and the inference multiply-adds per image (the total, and the
 * report with the backbone and the routers apart; 0 before a data set gave
 * the image size). */
int task_cnn_router_params(void *state, ag_param **out, int capacity);
int64_t task_cnn_flops_per_image(void *state);
moe_cnn_flops_report task_cnn_flops(void *state);
/* After an evaluation: its clean images per router, expert and true class,
 * summed over the ranks, at [(r * experts + e) * ADV_EVAL_CLASSES + class]
 * (train/adversarial.h); *routers = 0 for a dense model. */
const int64_t *task_cnn_class_routes(void *state, int *routers, int *experts);

#endif
