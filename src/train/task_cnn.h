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

#include "train/task.h"

/* The phases of an advmoe step (other modes have phase 0 only). */
enum { CNN_PHASE_EXPERTS = 0, CNN_PHASE_ROUTERS = 1 };

/* For tests: the router parameters (phi) of the task's model (0 for a dense
 * model), and the inference multiply-adds per image. */
int task_cnn_router_params(void *state, ag_param **out, int capacity);
int64_t task_cnn_flops_per_image(void *state);

#endif
