/* The recipe key table and everything driven by it: defaults, parsing and
 * range checks, the resolved YAML output, comparison and the Markdown
 * reference (cross-key checks are in recipe_checks.c). Adding a key is one
 * table entry (plus the struct field in recipe.h and a row in
 * docs/recipes.md); adding a section is one line in recipe_sections plus its
 * keys. */
#include "train/recipe_internal.h"

#include <assert.h>
#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/check.h"

/* ---- enum names ------------------------------------------------------------------ */

/* The recipe layer's own enums; every other enum key uses the name table of
 * the module that owns its enum (router_kind_names, ag_activation_names, ...). */
static const char *const arch_names[] = {"transformer_lm", "resnet", NULL};
static const char *const data_format_names[] = {"text", "idx", NULL};
static const char *const split_names[] = {"valid", "test", "train", NULL};
static const char *const recompute_names[] = {"none", "experts", "all", NULL};

#define NAME_COUNT(names) ((int)(sizeof names / sizeof names[0]) - 1)
static_assert(NAME_COUNT(arch_names) == CM_ARCH_COUNT, "arch_names out of sync");
static_assert(NAME_COUNT(data_format_names) == CM_DATA_FORMAT_COUNT, "data_format_names");
static_assert(NAME_COUNT(split_names) == CM_SPLIT_COUNT, "split_names out of sync");
static_assert(NAME_COUNT(recompute_names) == CM_RECOMPUTE_COUNT, "recompute_names out of sync");
/* Enum fields are read and written as int. */
static_assert(sizeof(cm_model_arch) == sizeof(int) && sizeof(cm_data_format) == sizeof(int) &&
                  sizeof(cm_split) == sizeof(int) && sizeof(cm_recompute) == sizeof(int) &&
                  sizeof(ag_activation) == sizeof(int) && sizeof(moe_cnn_routing) == sizeof(int) &&
                  sizeof(router_kind) == sizeof(int) && sizeof(router_gating) == sizeof(int) &&
                  sizeof(router_drop_policy) == sizeof(int) &&
                  sizeof(router_noise) == sizeof(int) && sizeof(router_aux_scope) == sizeof(int) &&
                  sizeof(router_k_mode) == sizeof(int) &&
                  sizeof(router_thor_level) == sizeof(int) &&
                  sizeof(router_rnn_state) == sizeof(int) && sizeof(optim_kind) == sizeof(int) &&
                  sizeof(optim_lr_kind) == sizeof(int) && sizeof(adv_mode) == sizeof(int) &&
                  sizeof(adv_router_objective) == sizeof(int) &&
                  sizeof(upcycle_router) == sizeof(int) && sizeof(upcycle_scaling) == sizeof(int) &&
                  sizeof(upcycle_drop_scope) == sizeof(int),
              "recipe enums must be int-sized");

static const char *check_run_name(const char *value) {
    if (value[0] == '\0') return "it must not be empty";
    if (value[0] == '.') return "it must not start with '.'";
    for (const char *c = value; *c; c++) {
        if (!isalnum((unsigned char)*c) && *c != '.' && *c != '_' && *c != '-')
            return "use only letters, digits, '.', '_' and '-' (it names a directory)";
    }
    return NULL;
}

static const char *check_not_empty(const char *value) {
    return value[0] == '\0' ? "it must not be empty" : NULL;
}

/* "32,64,128": 1 to 4 (CNN_MAX_STAGES) positive widths of at most 65536. */
static const char *check_cnn_widths(const char *value) {
    int count = 0;
    const char *c = value;
    for (;;) {
        if (!isdigit((unsigned char)*c))
            return "expected 1 to 4 comma-separated widths, e.g. 32,64,128";
        long width = 0;
        while (isdigit((unsigned char)*c)) {
            width = width * 10 + (*c++ - '0');
            if (width > 65536) return "a width is above 65536";
        }
        if (width < 1) return "a width is 0";
        if (++count > 4) return "at most 4 stages";
        if (*c == '\0') return NULL;
        if (*c++ != ',') return "expected 1 to 4 comma-separated widths, e.g. 32,64,128";
    }
}

/* ---- the table ----------------------------------------------------------------- */

/* FIELD fails to compile unless `member` has exactly type `type`. */
#define FIELD(type, member) _Generic(((cm_recipe *)0)->member, type : offsetof(cm_recipe, member))
#define KEY_INT(sec, key, member, def, rng, text)                                                  \
    {                                                                                              \
        .section = sec, .name = key, .type = RECIPE_INT, .offset = FIELD(int, member),             \
        .default_text = def, .range = rng, .help = text                                            \
    }
#define KEY_INT64(sec, key, member, def, rng, text)                                                \
    {                                                                                              \
        .section = sec, .name = key, .type = RECIPE_INT64, .offset = FIELD(int64_t, member),       \
        .default_text = def, .range = rng, .help = text                                            \
    }
#define KEY_DOUBLE(sec, key, member, def, rng, text)                                               \
    {                                                                                              \
        .section = sec, .name = key, .type = RECIPE_DOUBLE, .offset = FIELD(double, member),       \
        .default_text = def, .range = rng, .help = text                                            \
    }
#define KEY_BOOL(sec, key, member, def, text)                                                      \
    {                                                                                              \
        .section = sec, .name = key, .type = RECIPE_BOOL, .offset = FIELD(bool, member),           \
        .default_text = def, .range = "", .help = text                                             \
    }
#define KEY_STRING(sec, key, member, def, text, check)                                             \
    {                                                                                              \
        .section = sec, .name = key, .type = RECIPE_STRING, .offset = FIELD(char *, member),       \
        .capacity = sizeof(((cm_recipe *)0)->member), .default_text = def, .range = "",            \
        .help = text, .check_string = check                                                        \
    }
#define KEY_ENUM(sec, key, member, enum_type, names, def, text)                                    \
    {                                                                                              \
        .section = sec, .name = key, .type = RECIPE_ENUM, .offset = FIELD(enum_type, member),      \
        .default_text = def, .range = "", .help = text, .enum_names = names                        \
    }

#define STEPS_RANGE   "[0, 1000000000000]"
#define EXPERTS_RANGE "[1, 65536]"
#define COEF_RANGE    "[0, 1000]"

const recipe_section recipe_sections[] = {
    {"model", "the network"},
    {"moe", "Mixture-of-Experts layers (only with enabled: true)"},
    {"router", "how tokens pick experts (only with moe.enabled: true)"},
    {"data", "the data set and batching"},
    {"optim", "optimizer and gradient clipping"},
    {"schedule", "learning-rate schedule"},
    {"train", "the training loop"},
    {"checkpoint", "HDF5 checkpoints"},
    {"eval", "evaluation"},
    {"parallel", "MPI expert and data parallelism (mpirun -np N)"},
    {"adversarial", "adversarial training and robust evaluation (model.arch resnet)"},
    {"upcycle",
     "how cmoe upcycle builds this MoE model from a dense checkpoint (training ignores it)"},
};
const int recipe_sections_total = (int)(sizeof recipe_sections / sizeof recipe_sections[0]);

const recipe_key recipe_keys[] = {
    /* top level */
    KEY_STRING(
        "", "name", name, "run",
        "run name, used as a directory name; outputs go to runs/NAME unless train.out_dir is set",
        check_run_name),

    KEY_ENUM("model", "arch", model.arch, cm_model_arch, arch_names, "transformer_lm",
             "transformer_lm: embedding + learned positions, pre-LN blocks, final LN, untied head; "
             "resnet: image classifier (stem, stages of BasicBlocks, pool, linear; MoE convs "
             "with moe.enabled)"),
    KEY_INT("model", "vocab_size", model.vocab_size, "256", "[2, 16777216]",
            "input and output vocabulary size (at least 256 for byte-level text)"),
    KEY_INT("model", "n_layers", model.n_layers, "4", "[1, 1024]", "number of transformer blocks"),
    KEY_INT("model", "d_model", model.d_model, "256", "[1, 65536]", "residual stream width"),
    KEY_INT("model", "n_heads", model.n_heads, "4", "[1, 4096]",
            "attention heads per block; must divide d_model"),
    KEY_INT("model", "d_ff", model.d_ff, "1024", "[1, 1048576]",
            "hidden width of the GELU MLP; MoE experts derive theirs from it (moe.expert_hidden)"),
    KEY_DOUBLE("model", "dropout", model.dropout, "0", "[0, 1)",
               "dropout probability on the embeddings and the residual branches (attention "
               "probabilities are not dropped)"),
    KEY_DOUBLE("model", "init_std", model.init_std, "0.02", "(0, 1]",
               "standard deviation of the normal weight init (biases start at 0)"),
    KEY_BOOL("model", "scale_residual_init", model.scale_residual_init, "true",
             "scale the init of residual output projections by 1/sqrt(2 n_layers) (GPT-2)"),
    KEY_DOUBLE("model", "layernorm_eps", model.layernorm_eps, "1e-5", "(0, 1]",
               "epsilon added to the variance in layer norm"),
    KEY_STRING("model", "cnn_widths", model.cnn_widths, "32,64,128",
               "resnet: dense width of each stage (1 to 4 comma-separated; a stage after the "
               "first halves the resolution)",
               check_cnn_widths),
    KEY_INT("model", "cnn_blocks", model.cnn_blocks, "1", "[1, 8]",
            "resnet: BasicBlocks per stage"),
    KEY_INT("model", "cnn_stem", model.cnn_stem, "32", "[1, 65536]",
            "resnet: channels of the stem conv (not scaled by cnn_ratio)"),
    KEY_DOUBLE("model", "cnn_ratio", model.cnn_ratio, "1", "(0, 16]",
               "resnet: stage width = int(cnn_ratio * width); with MoE the width of each expert "
               "(AdvMoE: E 2, ratio 0.5)"),

    KEY_BOOL("moe", "enabled", moe.enabled, "false",
             "replace the MLP of some blocks by an MoE layer; false: dense model, and the moe "
             "and router sections are ignored"),
    KEY_INT("moe", "num_experts", moe.num_experts, "8", EXPERTS_RANGE, "experts per MoE layer (E)"),
    KEY_INT("moe", "every", moe.every, "1", "[1, 1024]",
            "block i is MoE when i % every == 0: 1 = every block, 2 = blocks 0, 2, 4, ... "
            "(THOR, Dynamic-MoE)"),
    KEY_INT("moe", "expert_hidden", moe.expert_hidden, "0", "[0, 1048576]",
            "hidden width of each expert; 0: model.d_ff / num_experts with split_dense, else "
            "model.d_ff"),
    KEY_BOOL("moe", "split_dense", moe.split_dense, "false",
             "experts are the dense MLP cut into num_experts blocks of d_ff / num_experts "
             "(equal total parameters; SMoE-Dropout); needs d_ff divisible by num_experts"),
    KEY_ENUM("moe", "activation", moe.activation, ag_activation, ag_activation_names, "gelu",
             "activation inside each expert (the dense MLP always uses gelu); swiglu: "
             "silu(W1 x + b1) * (W3 x + b3), a third matrix per expert (LLaMA, top-p paper)"),
    KEY_DOUBLE("moe", "expert_dropout", moe.expert_dropout, "0", "[0, 1)",
               "transformer_lm: dropout probability on each expert's hidden units (between its "
               "two matrices) in training; the SMoE-Dropout release drops there"),
    KEY_ENUM("moe", "cnn_routing", moe.cnn_routing, moe_cnn_routing, moe_cnn_routing_names, "image",
             "resnet: one router reading the image whose choice every MoE conv uses (image, the "
             "AdvMoE release) or one router per MoE conv reading its input (per_layer)"),
    KEY_BOOL("moe", "merged", moe.merged, "false",
             "transformer_lm: each MoE layer has a group table blocks.L.moe.group_of [E] (a "
             "frozen parameter) mapping every expert to its group's expert, as `cmoe merge` "
             "writes it (MC-SMoE); false: no table"),

    KEY_ENUM("router", "type", router.type, router_kind, router_kind_names, "topk",
             "routing method; docs/recipes.md lists the keys each one reads"),
    KEY_INT("router", "k", router.k, "2", EXPERTS_RANGE,
            "topk, bias_balance: experts per token; smoe_dropout: k at evaluation (training "
            "follows k_schedule); at most num_experts; null_experts: the k chosen among "
            "num_experts + null_experts"),
    KEY_ENUM("router", "gating", router.gating, router_gating, router_gating_names, "softmax_topk",
             "topk: gates are the chosen softmax probabilities (softmax_topk) or a softmax over "
             "the chosen logits (topk_softmax, sums to 1)"),
    KEY_BOOL("router", "bias", router.bias, "false", "add a bias to the router's linear layer"),
    KEY_DOUBLE("router", "init_std", router.init_std, "0.02", "(0, 1]",
               "standard deviation of the normal init of the router weight"),
    KEY_ENUM("router", "noise", router.noise, router_noise, router_noise_names, "none",
             "noise on the router logits in training: fixed adds noise_std N(0,1); learned is "
             "Shazeer et al.'s noisy top-k, N(0,1) softplus(x W_noise) with a learned "
             "noise_weight (topk, top_p, expert_choice)"),
    KEY_DOUBLE("router", "noise_std", router.noise_std, "1", "(0, 100]",
               "standard deviation of the logit noise (with noise: fixed)"),
    KEY_DOUBLE(
        "router", "aux_loss_coef", router.aux_loss_coef, "0.01", COEF_RANGE,
        "Switch load-balancing loss coefficient (topk, top_p, null_experts, bias_balance, rmoe); 0 "
        "disables"),
    KEY_ENUM("router", "aux_loss_scope", router.aux_loss_scope, router_aux_scope,
             router_aux_scope_names, "global",
             "tokens the load-balancing statistics cover: global = the whole batch over all "
             "ranks (Megatron's global_aux_loss; the losses do not depend on the rank count), "
             "local = each rank's own tokens, weighted by its share of the batch (Megatron's "
             "default)"),
    KEY_DOUBLE(
        "router", "z_loss_coef", router.z_loss_coef, "0", COEF_RANGE,
        "router z-loss coefficient (topk, null_experts, bias_balance, rmoe); ST-MoE uses 1e-3; 0 "
        "disables"),
    KEY_DOUBLE("router", "top_p", router.top_p, "0.4", "(0, 1]",
               "top_p: each token takes the smallest set of most likely experts whose "
               "probability mass exceeds this"),
    KEY_DOUBLE("router", "entropy_coef", router.entropy_coef, "0.0001", COEF_RANGE,
               "top_p: coefficient of the router-entropy (dynamic) loss; 0 disables"),
    KEY_DOUBLE("router", "capacity_factor", router.capacity_factor, "0", COEF_RANGE,
               "0: dropless; else an expert takes at most capacity_factor times its even share "
               "of the batch's assignments (T k / E), rounded up; expert_choice: each expert "
               "takes ceil(T capacity_factor / E) tokens, needs > 0 (usually 2)"),
    KEY_ENUM("router", "drop_policy", router.drop_policy, router_drop_policy,
             router_drop_policy_names, "probability",
             "an over-full expert keeps its highest-gate tokens (probability) or its first "
             "tokens in batch order (position)"),
    KEY_ENUM("router", "k_schedule", router.k_schedule, router_k_mode, router_k_mode_names,
             "constant",
             "smoe_dropout: k during training, from k_min to k_max over k_span_steps "
             "(constant: k_max throughout)"),
    KEY_INT("router", "k_min", router.k_min, "2", EXPERTS_RANGE,
            "smoe_dropout: k at the start of the schedule"),
    KEY_INT("router", "k_max", router.k_max, "0", "[0, 65536]",
            "smoe_dropout: k at the end of the schedule; 0 means num_experts"),
    KEY_INT64("router", "k_span_steps", router.k_span_steps, "0", STEPS_RANGE,
              "smoe_dropout: steps over which k rises (S); 0 means train.steps"),
    KEY_DOUBLE("router", "thor_alpha", router.thor_alpha, "1", COEF_RANGE,
               "thor: weight of the consistency loss between the two forward passes (released "
               "script: 5; 0: two passes, plain cross-entropy)"),
    KEY_ENUM("router", "thor_level", router.thor_level, router_thor_level, router_thor_level_names,
             "per_sequence",
             "thor at evaluation: one random expert per sequence or per token (training draws "
             "one per batch and pass)"),
    KEY_INT("router", "eval_k", router.eval_k, "0", "[0, 65536]",
            "topk, smoe_dropout, null_experts, bias_balance, rmoe: k used at evaluation; 0 means "
            "router.k"),
    KEY_INT("router", "null_experts", router.null_experts, "0", "[0, 65536]",
            "null_experts: m null experts (output zero, no compute) the router chooses among "
            "with the num_experts true ones; k counts both, so a token uses 0..k true experts"),
    KEY_DOUBLE("router", "bias_update_rate", router.bias_update_rate, "0.001", "[0, 1]",
               "bias_balance: u, the step of each expert's selection bias per optimizer step "
               "(b_i += u sign(mean load - load_i)); DeepSeek-V3 and Megatron use 1e-3"),
    KEY_INT("router", "rnn_hidden", router.rnn_hidden, "64", "[1, 65536]",
            "rmoe: H_r, the input and state size of the GRU shared by the MoE layers (the "
            "release's moe_router_rnn_hidden_size: 256; 64 at d_model 256, METHODS.md 9.3)"),
    KEY_ENUM("router", "rnn_state", router.rnn_state, router_rnn_state, router_rnn_state_names,
             "carry",
             "rmoe: the previous MoE layer's state the GRU receives: carry (with its gradient, "
             "the release), detach (values only) or zero (recurrence off; not off, which YAML 1.1 "
             "readers take for false)"),

    KEY_ENUM("data", "format", data.format, cm_data_format, data_format_names, "text",
             "data set format: text is a byte-level corpus (one token per byte); idx is gzip IDX "
             "images (path, test_path) with labels (labels_path, test_labels_path)"),
    KEY_STRING("data", "path", data.path, "data/kjv/train.txt",
               "training split, relative to the working directory; not empty", check_not_empty),
    KEY_STRING("data", "valid_path", data.valid_path, "data/kjv/valid.txt",
               "validation split; not empty", check_not_empty),
    KEY_STRING("data", "test_path", data.test_path, "data/kjv/test.txt", "test split; not empty",
               check_not_empty),
    KEY_INT("data", "seq_len", data.seq_len, "256", "[1, 1048576]",
            "tokens per training sequence; also the size of the learned position table"),
    KEY_INT("data", "batch_size", data.batch_size, "16", "[1, 1048576]",
            "sequences (images) per micro-batch, summed over data-parallel ranks; a step takes "
            "train.grad_accum micro-batches"),
    KEY_STRING("data", "labels_path", data.labels_path, "data/fmnist/train-labels-idx1-ubyte.gz",
               "idx: labels of the training images (data.path)", check_not_empty),
    KEY_STRING("data", "test_labels_path", data.test_labels_path,
               "data/fmnist/t10k-labels-idx1-ubyte.gz",
               "idx: labels of the test images (data.test_path)", check_not_empty),
    KEY_INT("data", "augment_crop", data.augment_crop, "0", "[0, 16]",
            "idx: random crop of the image zero-padded by this many pixels; 0: none"),
    KEY_BOOL("data", "augment_flip", data.augment_flip, "false",
             "idx: horizontal flip with probability 1/2"),

    KEY_ENUM("optim", "type", optim.type, optim_kind, optim_kind_names, "adamw", "optimizer"),
    KEY_DOUBLE("optim", "lr", optim.lr, "3e-4", "(0, 10]",
               "peak learning rate (the schedule scales it)"),
    KEY_DOUBLE("optim", "beta1", optim.beta1, "0.9", "[0, 1)", "AdamW first-moment decay"),
    KEY_DOUBLE("optim", "beta2", optim.beta2, "0.999", "[0, 1)", "AdamW second-moment decay"),
    KEY_DOUBLE("optim", "eps", optim.eps, "1e-8", "(0, 1]", "AdamW denominator epsilon"),
    KEY_DOUBLE("optim", "weight_decay", optim.weight_decay, "0.01", "[0, 10]",
               "decoupled weight decay (AdamW) or L2 penalty (SGD)"),
    KEY_BOOL("optim", "decay_norms", optim.decay_norms, "false",
             "apply weight decay to layer-norm gains"),
    KEY_BOOL("optim", "decay_biases", optim.decay_biases, "false", "apply weight decay to biases"),
    KEY_BOOL("optim", "decay_embeddings", optim.decay_embeddings, "false",
             "apply weight decay to token and position embeddings"),
    KEY_DOUBLE("optim", "momentum", optim.momentum, "0", "[0, 1)", "SGD momentum"),
    KEY_BOOL("optim", "nesterov", optim.nesterov, "false",
             "SGD Nesterov momentum (needs type sgd and momentum > 0)"),
    KEY_DOUBLE("optim", "grad_clip", optim.grad_clip, "0", "[0, 1000000]",
               "clip the global L2 norm of all gradients to this value; 0 disables"),
    KEY_BOOL("optim", "skip_unused_experts", optim.skip_unused_experts, "true",
             "an expert that received no token in a step (over all micro-batches and ranks) "
             "is not updated: no moment update, no decay, its step count unchanged (PyTorch "
             "skips a parameter without gradient); false updates every expert every step "
             "(Megatron's grouped GEMM)"),

    KEY_ENUM("schedule", "type", schedule.type, optim_lr_kind, optim_lr_kind_names, "constant",
             "constant, cosine (to min_lr at train.steps) or step (times gamma every step_size)"),
    KEY_INT64("schedule", "warmup_steps", schedule.warmup_steps, "0", STEPS_RANGE,
              "linear warmup from 0 to optim.lr over this many steps (any type)"),
    KEY_DOUBLE("schedule", "min_lr", schedule.min_lr, "0", "[0, 10]",
               "cosine: learning rate reached at the last step"),
    KEY_INT64("schedule", "step_size", schedule.step_size, "1000", "[1, 1000000000000]",
              "step: steps between two decays (counted from step 0)"),
    KEY_DOUBLE("schedule", "gamma", schedule.gamma, "0.1", "(0, 1]",
               "step: factor applied at each decay"),

    KEY_INT64("train", "steps", train.steps, "2000", "[1, 1000000000000]", "optimizer steps"),
    KEY_INT64("train", "seed", train.seed, "1234", "[0, 9223372036854775807]",
              "seed of every random draw (init, dropout, data order, routing)"),
    KEY_INT64("train", "log_every", train.log_every, "10", "[1, 1000000000000]",
              "steps between metric lines"),
    KEY_INT64("train", "eval_every", train.eval_every, "200", STEPS_RANGE,
              "steps between evaluations; 0 disables periodic evaluation"),
    KEY_INT("train", "grad_accum", train.grad_accum, "1", "[1, 65536]",
            "micro-batches of data.batch_size sequences per optimizer step (gradient "
            "accumulation): a step trains on grad_accum x batch_size"),
    KEY_INT("train", "eval_batches", train.eval_batches, "20", "[1, 1000000]",
            "batches per evaluation"),
    KEY_INT("train", "arena_mib", train.arena_mib, "512", "[1, 1048576]",
            "size of the per-step activation arena in MiB"),
    KEY_INT("train", "threads", train.threads, "0", "[0, 1024]",
            "BLAS threads per rank; 0 keeps the library default"),
    KEY_ENUM("train", "recompute", train.recompute, cm_recompute, recompute_names, "none",
             "what backward makes again instead of keeping it (less memory, the same results bit "
             "for bit): none; experts, the experts' hidden layers (needs moe.enabled); all, also "
             "every block's attention half and dense MLP half"),
    KEY_STRING("train", "out_dir", train.out_dir, "",
               "run directory (metrics, plots); empty means runs/NAME", NULL),

    KEY_STRING("checkpoint", "dir", checkpoint.dir, "",
               "checkpoint directory; empty means the run directory", NULL),
    KEY_INT64("checkpoint", "every", checkpoint.every, "500", STEPS_RANGE,
              "steps between checkpoints; 0 writes only the final one"),
    KEY_INT("checkpoint", "keep_last", checkpoint.keep_last, "3", "[0, 1000000]",
            "number of most recent checkpoints kept; 0 keeps all"),

    KEY_ENUM("eval", "split", eval.split, cm_split, split_names, "valid",
             "split evaluated during and after training"),
    KEY_INT("parallel", "expert_parallel", parallel.expert_parallel, "0", "[0, 65536]",
            "ranks that share one copy of the experts (EP); 0 means all ranks; the rest of the "
            "world is data parallel (DP = ranks / EP)"),
    KEY_ENUM("parallel", "shadow_experts", parallel.shadow_experts, shadow_mode, shadow_mode_names,
             "off",
             "per MoE layer and step, compute the hot experts' tokens where they are with "
             "copies of the experts' weights, chosen from the global row counts by a cost model "
             "(auto), or whenever it evens out the rows computed (force); exact, the same "
             "decision on every rank (docs/performance.md)"),
    KEY_INT("parallel", "shadow_float_cost", parallel.shadow_float_cost, "80", "[1, 1000000]",
            "shadow_experts auto's cost model: the flops of expert compute that moving one float "
            "between ranks costs (the sgemm rate over the collectives' floats per second); "
            "higher shadows fewer experts (docs/scaling.md has measurements)"),

    KEY_ENUM("adversarial", "mode", adversarial.mode, adv_mode, adv_mode_names, "standard",
             "standard (clean CE), pgd_at (CE on PGD examples), trades (TRADES loss), advmoe "
             "(alternating expert and router steps; needs moe.enabled)"),
    KEY_DOUBLE("adversarial", "eps", adversarial.eps, "0.1", "(0, 1]",
               "L-inf radius of the training and test attacks (pixels in [0, 1])"),
    KEY_DOUBLE("adversarial", "step_size", adversarial.step_size, "0.0833", "(0, 1]",
               "step of the training attack (METHODS.md 4.6: 2.5 eps / steps)"),
    KEY_INT("adversarial", "steps", adversarial.steps, "3", "[1, 1000]",
            "steps of the training attack"),
    KEY_INT("adversarial", "eval_steps", adversarial.eval_steps, "20", "[0, 1000]",
            "PGD steps of the test attack (random start); 0: no robust accuracy"),
    KEY_DOUBLE("adversarial", "eval_step_size", adversarial.eval_step_size, "0.0125", "(0, 1]",
               "step of the test attack (eps / 8)"),
    KEY_DOUBLE("adversarial", "eval_router_weight", adversarial.eval_router_weight, "0", COEF_RANGE,
               "MoE: weight of the routers' CE to y mod E in the test attack's objective; 0 "
               "attacks the classifier only, the AdvMoE release uses beta (6)"),
    KEY_DOUBLE("adversarial", "beta", adversarial.beta, "6", COEF_RANGE,
               "TRADES weight of the KL term (trades, advmoe)"),
    KEY_DOUBLE("adversarial", "router_weight", adversarial.router_weight, "6", COEF_RANGE,
               "advmoe: alpha, weight of the router CE to y mod E (router_objective code)"),
    KEY_ENUM("adversarial", "router_objective", adversarial.router_objective, adv_router_objective,
             adv_router_objective_names, "code",
             "advmoe router step: code = alpha CE(r(x), y mod E) + beta KL of r(x') from r(x) (the "
             "release); paper = the full MoE TRADES loss minimized w.r.t. the routers"),

    KEY_ENUM("upcycle", "router", upcycle.router, upcycle_router, upcycle_router_names, "groups",
             "router of the upcycled MoE: groups = virtual groups (the fresh router's first N/G "
             "rows, each repeated G times; needs router.k a multiple of G), fresh = the random "
             "init untouched, zero = all zero (uniform probabilities; needs k a multiple of G)"),
    KEY_ENUM("upcycle", "scaling", upcycle.scaling, upcycle_scaling, upcycle_scaling_names,
             "balanced",
             "expert weight scaling by A = G (topk_softmax) or N G / k (softmax_topk): balanced = "
             "fc1 and fc2 each by A^(1/2) (He et al.; exact for ReLU, approximate for GELU), "
             "output = fc2 by A (exact), none; with scaling fc2's bias is divided by the uniform "
             "gate sum"),
    KEY_DOUBLE("upcycle", "drop_ratio", upcycle.drop_ratio, "0", "[0, 1]",
               "Drop-Upcycling: fraction r of each expert's hidden units re-drawn from the "
               "statistics of the weights they replace; 0 = plain upcycling"),
    KEY_ENUM("upcycle", "drop_scope", upcycle.drop_scope, upcycle_drop_scope,
             upcycle_drop_scope_names, "expert",
             "which hidden units drop_ratio re-draws: expert = one set per expert shared by fc1 "
             "and fc2 (the paper), matrix = one set per matrix (the released code), layer = one "
             "set per layer shared by its experts"),
};
const int recipe_keys_total = (int)(sizeof recipe_keys / sizeof recipe_keys[0]);

/* ---- lookups ------------------------------------------------------------------- */

int recipe_find_key(const char *section, const char *name) {
    for (int i = 0; i < recipe_keys_total; i++) {
        if (strcmp(recipe_keys[i].section, section) == 0 && strcmp(recipe_keys[i].name, name) == 0)
            return i;
    }
    return -1;
}

int recipe_find_section(const char *name) {
    for (int i = 0; i < recipe_sections_total; i++) {
        if (strcmp(recipe_sections[i].name, name) == 0) return i;
    }
    return -1;
}

void recipe_key_path(const recipe_key *key, char *buffer, size_t capacity) {
    if (key->section[0] == '\0')
        snprintf(buffer, capacity, "%s", key->name);
    else
        snprintf(buffer, capacity, "%s.%s", key->section, key->name);
}

/* ---- parsing ------------------------------------------------------------------- */

typedef struct numeric_range {
    double low, high;
    bool low_open, high_open;
} numeric_range;

/* "[lo, hi]" with '(' or ')' for open ends; "inf" is allowed. */
static bool parse_range(const char *text, numeric_range *out) {
    if (text[0] != '[' && text[0] != '(') return false;
    out->low_open = text[0] == '(';
    char *end;
    out->low = strtod(text + 1, &end);
    if (end == text + 1 || *end != ',') return false;
    const char *high_start = end + 1;
    out->high = strtod(high_start, &end);
    if (end == high_start || (*end != ']' && *end != ')') || end[1] != '\0') return false;
    out->high_open = *end == ')';
    return out->low <= out->high;
}

static bool in_range(double value, const numeric_range *range) {
    bool above_low = range->low_open ? value > range->low : value >= range->low;
    bool below_high = range->high_open ? value < range->high : value <= range->high;
    return above_low && below_high;
}

static cm_status reject(char *why, size_t why_capacity, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static cm_status reject(char *why, size_t why_capacity, const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    vsnprintf(why, why_capacity, fmt, args);
    va_end(args);
    return CM_ERR_INVALID;
}

typedef enum number_parse { NUMBER_OK, NUMBER_MALFORMED, NUMBER_TOO_LARGE } number_parse;

/* Decimal integers only: no "1e3", no hex, no underscores. */
static number_parse parse_integer_text(const char *text, long long *out) {
    const char *digits = text + (text[0] == '+' || text[0] == '-');
    if (*digits == '\0') return NUMBER_MALFORMED;
    for (const char *c = digits; *c; c++) {
        if (!isdigit((unsigned char)*c)) return NUMBER_MALFORMED;
    }
    errno = 0;
    *out = strtoll(text, NULL, 10);
    return errno == ERANGE ? NUMBER_TOO_LARGE : NUMBER_OK;
}

/* Decimal numbers with an optional exponent; no hex, inf or nan. */
static number_parse parse_real_text(const char *text, double *out) {
    bool has_digit = false;
    for (const char *c = text; *c; c++) {
        if (isdigit((unsigned char)*c))
            has_digit = true;
        else if (!strchr("+-.eE", *c))
            return NUMBER_MALFORMED;
    }
    if (!has_digit) return NUMBER_MALFORMED;
    char *end;
    *out = strtod(text, &end);
    if (*end != '\0') return NUMBER_MALFORMED;
    return isfinite(*out) ? NUMBER_OK : NUMBER_TOO_LARGE;
}

static void append_names(char *buffer, size_t capacity, const char *const *names) {
    size_t used = strlen(buffer);
    for (int i = 0; names[i] && used < capacity; i++) {
        int written = snprintf(buffer + used, capacity - used, "%s%s", i ? ", " : "", names[i]);
        if (written < 0) break;
        used += (size_t)written;
    }
}

static const char *type_phrase(recipe_type type) {
    switch (type) {
    case RECIPE_INT:
    case RECIPE_INT64:
        return "an integer";
    case RECIPE_DOUBLE:
        return "a number";
    case RECIPE_BOOL:
        return "true or false";
    case RECIPE_STRING:
        return "a string";
    case RECIPE_ENUM:
        return "a name";
    }
    return "a value";
}

/* One value of each type into `field`; `path` names the key in messages. */
typedef struct parse_target {
    const recipe_key *key;
    const char *text, *path;
    void *field;
    const numeric_range *range;
    char *why;
    size_t why_capacity;
} parse_target;

static cm_status parse_integer_value(const parse_target *p) {
    const recipe_key *key = p->key;
    long long parsed = 0;
    number_parse result = parse_integer_text(p->text, &parsed);
    if (result == NUMBER_MALFORMED)
        return reject(p->why, p->why_capacity, "expected an integer for %s, got '%.80s'", p->path,
                      p->text);
    bool fits = key->type == RECIPE_INT64 || (parsed >= INT_MIN && parsed <= INT_MAX);
    if (result == NUMBER_TOO_LARGE || !fits || !in_range((double)parsed, p->range))
        return reject(p->why, p->why_capacity, "%s = %.80s is out of range %s", p->path, p->text,
                      key->range);
    if (key->type == RECIPE_INT) {
        int narrow = (int)parsed;
        memcpy(p->field, &narrow, sizeof narrow);
    } else {
        int64_t wide = parsed;
        memcpy(p->field, &wide, sizeof wide);
    }
    return CM_OK;
}

static cm_status parse_double_value(const parse_target *p) {
    double parsed = 0;
    number_parse result = parse_real_text(p->text, &parsed);
    if (result == NUMBER_MALFORMED)
        return reject(p->why, p->why_capacity, "expected a number for %s, got '%.80s'", p->path,
                      p->text);
    if (result == NUMBER_TOO_LARGE || !in_range(parsed, p->range))
        return reject(p->why, p->why_capacity, "%s = %.80s is out of range %s", p->path, p->text,
                      p->key->range);
    memcpy(p->field, &parsed, sizeof parsed);
    return CM_OK;
}

static cm_status parse_bool_value(const parse_target *p) {
    const char *text = p->text;
    bool parsed;
    if (!strcmp(text, "true") || !strcmp(text, "True") || !strcmp(text, "TRUE"))
        parsed = true;
    else if (!strcmp(text, "false") || !strcmp(text, "False") || !strcmp(text, "FALSE"))
        parsed = false;
    else
        return reject(p->why, p->why_capacity, "expected true or false for %s, got '%.80s'",
                      p->path, text);
    memcpy(p->field, &parsed, sizeof parsed);
    return CM_OK;
}

static cm_status parse_string_value(const parse_target *p) {
    const recipe_key *key = p->key;
    size_t length = strlen(p->text);
    if (length >= key->capacity)
        return reject(p->why, p->why_capacity, "%s is too long (%zu bytes, at most %zu)", p->path,
                      length, key->capacity - 1);
    const char *problem = key->check_string ? key->check_string(p->text) : NULL;
    if (problem)
        return reject(p->why, p->why_capacity, "bad %s '%.80s': %s", p->path, p->text, problem);
    /* Zero the tail too, so equal recipes stay equal under memcmp. */
    memset(p->field, 0, key->capacity);
    memcpy(p->field, p->text, length);
    return CM_OK;
}

static cm_status parse_enum_value(const parse_target *p) {
    const char *const *names = p->key->enum_names;
    for (int i = 0; names[i]; i++) {
        if (strcmp(p->text, names[i]) == 0) {
            memcpy(p->field, &i, sizeof i);
            return CM_OK;
        }
    }
    int n_names = 0;
    while (names[n_names]) n_names++;
    const char *suggestion = recipe_did_you_mean(p->text, names, n_names);
    char *why = p->why;
    const size_t capacity = p->why_capacity;
    reject(why, capacity, "unknown value '%.80s' for %s", p->text, p->path);
    if (suggestion) {
        size_t used = strlen(why);
        snprintf(why + used, capacity - used, " (did you mean '%s'?)", suggestion);
    }
    size_t used = strlen(why);
    snprintf(why + used, capacity - used, "; valid values: ");
    append_names(why, capacity, names);
    return CM_ERR_INVALID;
}

cm_status recipe_key_parse(const recipe_key *key, recipe_scalar value, cm_recipe *recipe, char *why,
                           size_t why_capacity) {
    char path[96];
    recipe_key_path(key, path, sizeof path);
    if (value.is_null) {
        return reject(why, why_capacity, "missing value for %s%s", path,
                      key->type == RECIPE_STRING ? " (write \"\" for an empty string)" : "");
    }
    bool numeric = key->type == RECIPE_INT || key->type == RECIPE_INT64 ||
                   key->type == RECIPE_DOUBLE || key->type == RECIPE_BOOL;
    if (numeric && !value.plain) {
        return reject(why, why_capacity,
                      "expected %s for %s, got the quoted string '%.80s' (drop the quotes)",
                      type_phrase(key->type), path, value.text);
    }
    numeric_range range = {0};
    if (key->type == RECIPE_INT || key->type == RECIPE_INT64 || key->type == RECIPE_DOUBLE) {
        CM_ASSERT(parse_range(key->range, &range), "bad range '%s' for %s", key->range, path);
    }
    parse_target target = {key,    value.text, path,        (char *)recipe + key->offset,
                           &range, why,        why_capacity};
    switch (key->type) {
    case RECIPE_INT:
    case RECIPE_INT64:
        return parse_integer_value(&target);
    case RECIPE_DOUBLE:
        return parse_double_value(&target);
    case RECIPE_BOOL:
        return parse_bool_value(&target);
    case RECIPE_STRING:
        return parse_string_value(&target);
    case RECIPE_ENUM:
        return parse_enum_value(&target);
    }
    return reject(why, why_capacity, "%s has an unknown type", path);
}

void recipe_defaults(cm_recipe *out) {
    memset(out, 0, sizeof *out);
    for (int i = 0; i < recipe_keys_total; i++) {
        char why[256];
        recipe_scalar value = {.text = recipe_keys[i].default_text, .plain = true};
        cm_status status = recipe_key_parse(&recipe_keys[i], value, out, why, sizeof why);
        CM_ASSERT(status == CM_OK, "bad default in the recipe key table: %s", why);
    }
}

/* ---- formatting and comparison ------------------------------------------------- */

/* The shortest %g text that reads back as exactly `value`. */
static size_t format_double(double value, char *buffer, size_t capacity) {
    char text[40];
    for (int precision = 1; precision <= 17; precision++) {
        snprintf(text, sizeof text, "%.*g", precision, value);
        if (strtod(text, NULL) == value) break;
    }
    return (size_t)snprintf(buffer, capacity, "%s", text);
}

/* A YAML double-quoted scalar. */
static size_t format_quoted(const char *text, char *buffer, size_t capacity) {
    size_t length = 0;
#define EMIT(c)                                                                                    \
    do {                                                                                           \
        if (length + 1 < capacity) buffer[length] = (c);                                           \
        length++;                                                                                  \
    } while (0)
    EMIT('"');
    for (const unsigned char *c = (const unsigned char *)text; *c; c++) {
        if (*c == '"' || *c == '\\') {
            EMIT('\\');
            EMIT((char)*c);
        } else if (*c < 0x20 || *c == 0x7f) {
            static const char hex[] = "0123456789abcdef";
            EMIT('\\');
            EMIT('x');
            EMIT(hex[*c >> 4]);
            EMIT(hex[*c & 15]);
        } else {
            EMIT((char)*c);
        }
    }
    EMIT('"');
#undef EMIT
    if (capacity > 0) buffer[length < capacity ? length : capacity - 1] = '\0';
    return length;
}

/* The field's value as recipe text; snprintf semantics. */
static size_t key_format(const recipe_key *key, const cm_recipe *recipe, char *buffer,
                         size_t capacity) {
    const char *field = (const char *)recipe + key->offset;
    switch (key->type) {
    case RECIPE_INT: {
        int value;
        memcpy(&value, field, sizeof value);
        return (size_t)snprintf(buffer, capacity, "%d", value);
    }
    case RECIPE_INT64: {
        int64_t value;
        memcpy(&value, field, sizeof value);
        return (size_t)snprintf(buffer, capacity, "%lld", (long long)value);
    }
    case RECIPE_DOUBLE: {
        double value;
        memcpy(&value, field, sizeof value);
        return format_double(value, buffer, capacity);
    }
    case RECIPE_BOOL: {
        bool value;
        memcpy(&value, field, sizeof value);
        return (size_t)snprintf(buffer, capacity, "%s", value ? "true" : "false");
    }
    case RECIPE_STRING:
        return format_quoted(field, buffer, capacity);
    case RECIPE_ENUM: {
        int value, n_names = 0;
        memcpy(&value, field, sizeof value);
        while (key->enum_names[n_names]) n_names++;
        CM_ASSERT(value >= 0 && value < n_names, "%s.%s holds %d, not a valid enum value",
                  key->section, key->name, value);
        return (size_t)snprintf(buffer, capacity, "%s", key->enum_names[value]);
    }
    }
    return (size_t)snprintf(buffer, capacity, "?");
}

static bool key_equal(const recipe_key *key, const cm_recipe *a, const cm_recipe *b) {
    const char *field_a = (const char *)a + key->offset;
    const char *field_b = (const char *)b + key->offset;
    switch (key->type) {
    case RECIPE_INT:
    case RECIPE_ENUM:
        return memcmp(field_a, field_b, sizeof(int)) == 0;
    case RECIPE_INT64:
        return memcmp(field_a, field_b, sizeof(int64_t)) == 0;
    case RECIPE_DOUBLE: {
        double value_a, value_b;
        memcpy(&value_a, field_a, sizeof value_a);
        memcpy(&value_b, field_b, sizeof value_b);
        return value_a == value_b;
    }
    case RECIPE_BOOL:
        return *(const bool *)field_a == *(const bool *)field_b;
    case RECIPE_STRING:
        return strncmp(field_a, field_b, key->capacity) == 0;
    }
    return false;
}

/* ---- output --------------------------------------------------------------------- */

typedef struct text_sink {
    char *buffer;
    size_t capacity, length;
} text_sink;

static void sink_append(text_sink *sink, const char *text) {
    size_t add = strlen(text);
    if (sink->length < sink->capacity) {
        size_t room = sink->capacity - sink->length - 1;
        size_t copy = add < room ? add : room;
        memcpy(sink->buffer + sink->length, text, copy);
        sink->buffer[sink->length + copy] = '\0';
    }
    sink->length += add;
}

static void format_keys(text_sink *sink, const cm_recipe *recipe, const char *section) {
    for (int i = 0; i < recipe_keys_total; i++) {
        const recipe_key *key = &recipe_keys[i];
        if (strcmp(key->section, section) != 0) continue;
        char value[CM_RECIPE_PATH_CAP * 4 + 3];
        key_format(key, recipe, value, sizeof value);
        sink_append(sink, section[0] ? "  " : "");
        sink_append(sink, key->name);
        sink_append(sink, ": ");
        sink_append(sink, value);
        sink_append(sink, "\n");
    }
}

size_t recipe_format(const cm_recipe *recipe, char *buffer, size_t capacity) {
    text_sink sink = {.buffer = buffer, .capacity = buffer ? capacity : 0};
    if (sink.capacity > 0) buffer[0] = '\0';
    format_keys(&sink, recipe, "");
    for (int s = 0; s < recipe_sections_total; s++) {
        sink_append(&sink, recipe_sections[s].name);
        sink_append(&sink, ":\n");
        format_keys(&sink, recipe, recipe_sections[s].name);
    }
    return sink.length;
}

char *recipe_format_text(const cm_recipe *recipe) {
    size_t length = recipe_format(recipe, NULL, 0);
    char *text = malloc(length + 1);
    if (text) recipe_format(recipe, text, length + 1);
    return text;
}

cm_status recipe_print(const cm_recipe *recipe, FILE *out) {
    size_t length = recipe_format(recipe, NULL, 0);
    char *text = malloc(length + 1);
    if (!text) return CM_ERR(CM_ERR_NOMEM, "out of memory while printing a recipe");
    recipe_format(recipe, text, length + 1);
    bool ok = fwrite(text, 1, length, out) == length && fflush(out) == 0;
    free(text);
    if (!ok) return CM_ERR(CM_ERR_IO, "cannot write the recipe: %s", strerror(errno));
    return CM_OK;
}

cm_status recipe_get(const cm_recipe *recipe, const char *dotted_key, char *buffer,
                     size_t capacity) {
    const char *dot = strchr(dotted_key, '.');
    char section[64] = "";
    const char *name = dotted_key;
    if (dot) {
        snprintf(section, sizeof section, "%.*s", (int)(dot - dotted_key), dotted_key);
        name = dot + 1;
    }
    int key_index = recipe_find_key(section, name);
    if (key_index < 0) return CM_ERR(CM_ERR_INVALID, "unknown recipe key '%s'", dotted_key);
    size_t length = key_format(&recipe_keys[key_index], recipe, buffer, capacity);
    if (length >= capacity)
        return CM_ERR(CM_ERR_INVALID, "value of %s does not fit in %zu bytes", dotted_key,
                      capacity);
    return CM_OK;
}

bool recipe_first_difference(const cm_recipe *a, const cm_recipe *b, char *key_path,
                             size_t capacity) {
    for (int i = 0; i < recipe_keys_total; i++) {
        if (key_equal(&recipe_keys[i], a, b)) continue;
        if (key_path && capacity > 0) recipe_key_path(&recipe_keys[i], key_path, capacity);
        return true;
    }
    if (key_path && capacity > 0) key_path[0] = '\0';
    return false;
}

/* The keys that fix the model's parameters or its function at inference;
 * routing knobs an evaluation may vary (router.k, eval_k, top_p,
 * capacity_factor, thor_level) and training-only keys are not among them. */
static const char *const model_defining_keys[] = {
    "model.arch",       "model.vocab_size", "model.n_layers",      "model.d_model",
    "model.n_heads",    "model.d_ff",       "model.layernorm_eps", "model.cnn_widths",
    "model.cnn_blocks", "model.cnn_stem",   "model.cnn_ratio",     "moe.enabled",
    "moe.num_experts",  "moe.every",        "moe.expert_hidden",   "moe.split_dense",
    "moe.activation",   "moe.cnn_routing",  "moe.merged",          "router.type",
    "router.gating",    "router.bias",      "router.null_experts", "router.rnn_hidden"};

int recipe_model_differences(const cm_recipe *stored, const cm_recipe *given, char *out,
                             size_t capacity) {
    int count = 0;
    size_t used = 0;
    if (capacity > 0) out[0] = '\0';
    for (size_t i = 0; i < sizeof model_defining_keys / sizeof model_defining_keys[0]; i++) {
        char a[256], b[256];
        if (recipe_get(stored, model_defining_keys[i], a, sizeof a) != CM_OK ||
            recipe_get(given, model_defining_keys[i], b, sizeof b) != CM_OK)
            continue; /* a value too long to print: not a model key's */
        if (strcmp(a, b) == 0) continue;
        int wrote = used < capacity ? snprintf(out + used, capacity - used, "%s%s %s (not %s)",
                                               count ? ", " : "", model_defining_keys[i], b, a)
                                    : 0;
        if (wrote > 0) used += (size_t)wrote < capacity - used ? (size_t)wrote : capacity - used;
        count++;
    }
    return count;
}

cm_status recipe_run_dir(const cm_recipe *recipe, char *buffer, size_t capacity) {
    int written = recipe->train.out_dir[0] ? snprintf(buffer, capacity, "%s", recipe->train.out_dir)
                                           : snprintf(buffer, capacity, "runs/%s", recipe->name);
    if (written < 0 || (size_t)written >= capacity)
        return CM_ERR(CM_ERR_INVALID, "run directory does not fit in %zu bytes", capacity);
    return CM_OK;
}

cm_status recipe_checkpoint_dir(const cm_recipe *recipe, char *buffer, size_t capacity) {
    if (!recipe->checkpoint.dir[0]) return recipe_run_dir(recipe, buffer, capacity);
    int written = snprintf(buffer, capacity, "%s", recipe->checkpoint.dir);
    if (written < 0 || (size_t)written >= capacity)
        return CM_ERR(CM_ERR_INVALID, "checkpoint directory does not fit in %zu bytes", capacity);
    return CM_OK;
}

/* ---- did you mean -------------------------------------------------------------- */

/* Optimal string alignment distance (edits plus adjacent transpositions). */
static int edit_distance(const char *a, const char *b) {
    enum { MAX_LENGTH = 63 };
    size_t length_a = strlen(a), length_b = strlen(b);
    if (length_a > MAX_LENGTH || length_b > MAX_LENGTH) return INT_MAX;
    int table[MAX_LENGTH + 1][MAX_LENGTH + 1];
    for (size_t i = 0; i <= length_a; i++) table[i][0] = (int)i;
    for (size_t j = 0; j <= length_b; j++) table[0][j] = (int)j;
    for (size_t i = 1; i <= length_a; i++) {
        for (size_t j = 1; j <= length_b; j++) {
            int cost = a[i - 1] != b[j - 1];
            int best = table[i - 1][j - 1] + cost;
            if (table[i - 1][j] + 1 < best) best = table[i - 1][j] + 1;
            if (table[i][j - 1] + 1 < best) best = table[i][j - 1] + 1;
            if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] &&
                table[i - 2][j - 2] + 1 < best)
                best = table[i - 2][j - 2] + 1;
            table[i][j] = best;
        }
    }
    return table[length_a][length_b];
}

const char *recipe_did_you_mean(const char *word, const char *const *candidates, int n_candidates) {
    const char *best = NULL;
    int best_distance = INT_MAX;
    for (int i = 0; i < n_candidates; i++) {
        int distance = edit_distance(word, candidates[i]);
        if (distance < best_distance) {
            best_distance = distance;
            best = candidates[i];
        }
    }
    if (!best) return NULL;
    /* Close enough to be a typo: about one edit per three characters. */
    size_t longer = strlen(word) > strlen(best) ? strlen(word) : strlen(best);
    return (size_t)best_distance * 3 <= longer ? best : NULL;
}

/* ---- key info and the Markdown reference --------------------------------------- */

static const char *type_name(recipe_type type) {
    switch (type) {
    case RECIPE_INT:
    case RECIPE_INT64:
        return "integer";
    case RECIPE_DOUBLE:
        return "number";
    case RECIPE_BOOL:
        return "bool";
    case RECIPE_STRING:
        return "string";
    case RECIPE_ENUM:
        return "enum";
    }
    return "?";
}

int recipe_key_count(void) {
    return recipe_keys_total;
}

cm_recipe_key_info recipe_key_info(int index) {
    CM_ASSERT(index >= 0 && index < recipe_keys_total, "key index %d out of range", index);
    const recipe_key *key = &recipe_keys[index];
    return (cm_recipe_key_info){.section = key->section,
                                .key = key->name,
                                .type = type_name(key->type),
                                .range = key->range,
                                .help = key->help,
                                .enum_names = key->enum_names};
}

static bool write_section_reference(FILE *out, const char *section, const cm_recipe *defaults) {
    bool ok = fprintf(out, "| key | type | default | range | meaning |\n"
                           "| --- | --- | --- | --- | --- |\n") > 0;
    for (int i = 0; i < recipe_keys_total && ok; i++) {
        const recipe_key *key = &recipe_keys[i];
        if (strcmp(key->section, section) != 0) continue;
        char path[96], value[CM_RECIPE_PATH_CAP * 4 + 3], range[256] = "";
        recipe_key_path(key, path, sizeof path);
        key_format(key, defaults, value, sizeof value);
        if (key->type == RECIPE_ENUM)
            append_names(range, sizeof range, key->enum_names);
        else
            snprintf(range, sizeof range, "%s", key->range[0] ? key->range : "-");
        ok = fprintf(out, "| `%s` | %s | `%s` | %s | %s |\n", path, type_name(key->type), value,
                     range, key->help) > 0;
    }
    return ok;
}

cm_status recipe_write_reference(FILE *out) {
    cm_recipe defaults;
    recipe_defaults(&defaults);
    bool ok = fprintf(out, "### Top level\n\n") > 0 && write_section_reference(out, "", &defaults);
    for (int s = 0; s < recipe_sections_total && ok; s++) {
        ok = fprintf(out, "\n### `%s`: %s\n\n", recipe_sections[s].name, recipe_sections[s].help) >
                 0 &&
             write_section_reference(out, recipe_sections[s].name, &defaults);
    }
    if (!ok || fflush(out) != 0)
        return CM_ERR(CM_ERR_IO, "cannot write the recipe reference: %s", strerror(errno));
    return CM_OK;
}
