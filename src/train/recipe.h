/* Recipes: strict YAML -> one plain C struct (cm_recipe) that configures a run.
 *
 * A recipe is a YAML mapping with the top-level keys `name` and `base` and the
 * sections model, moe, router, data, optim, schedule, train, checkpoint,
 * eval, parallel, adversarial and upcycle. Every key is declared once in a table (recipe_keys.c)
 * with its type, default, range and help text. Defaults, parsing, range checks, printing and the
 * reference in docs/recipes.md all come from that table. Anything else fails before a run starts:
 * an unknown section or key, a wrong type, an out-of-range or unknown enum value, a duplicate key,
 * a non-mapping where a mapping belongs, malformed YAML, a missing file, a `base:` cycle, or keys
 * that contradict each other (d_model not divisible by n_heads, router.k
 * above moe.num_experts, ...).
 * The moe and router sections only matter with moe.enabled: true; without it
 * their keys are still parsed and range-checked, but not cross-checked, and
 * the model is dense. recipe_moe.h turns them into the MoE layer's configs.
 *
 * Error messages start with "path:line:col: " (1-based, the position of the
 * offending key or value) or, for a command-line override, "--set a.b=c: ".
 * Status codes: CM_ERR_IO (cannot open or read a file), CM_ERR_FORMAT (YAML
 * syntax, or YAML features recipes do not use: aliases, anchors, tags, several
 * documents), CM_ERR_INVALID (everything about keys and values).
 *
 * Loading order: the `base:` chain (base first, each file's keys override its
 * base), then the --set overrides in order, then the cross-key checks.
 *
 * Owns: nothing after recipe_load returns. cm_recipe is a plain value (fixed
 * arrays, no pointers): copy it, memcmp it, send it over MPI as bytes.
 * Does not: open data files, create directories or check that paths exist. */
#ifndef CMOE_TRAIN_RECIPE_H
#define CMOE_TRAIN_RECIPE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "autograd/ops.h"
#include "common/status.h"
#include "layers/moe_conv.h"
#include "optim/optim.h"
#include "parallel/shadow.h"
#include "routers/router.h"
#include "train/adversarial.h"
#include "train/upcycle.h"

enum {
    CM_RECIPE_NAME_CAP = 64,  /* bytes, including the terminating NUL */
    CM_RECIPE_PATH_CAP = 256, /* bytes, including the terminating NUL */
};

/* Enum fields hold the values of the module that uses them (router_kind,
 * ag_activation, optim_kind, ...), whose name tables give the spellings a
 * recipe uses. The four enums below belong to the recipe layer; their names
 * are in recipe_keys.c. A *_COUNT member guards each list with a static_assert. */
typedef enum cm_model_arch {
    CM_ARCH_TRANSFORMER_LM = 0,
    CM_ARCH_RESNET, /* image classifier, layers/cnn.h and layers/moe_conv.h */
    CM_ARCH_COUNT
} cm_model_arch;
typedef enum cm_data_format {
    CM_DATA_TEXT = 0,
    CM_DATA_IDX, /* gzip IDX images + labels (Fashion-MNIST), data/idx.h */
    CM_DATA_FORMAT_COUNT
} cm_data_format;
typedef enum cm_split {
    CM_SPLIT_VALID = 0,
    CM_SPLIT_TEST,
    CM_SPLIT_TRAIN,
    CM_SPLIT_COUNT
} cm_split;
/* train.recompute: what backward makes again instead of keeping it from
 * forward. */
typedef enum cm_recompute {
    CM_RECOMPUTE_NONE = 0,
    CM_RECOMPUTE_EXPERTS, /* the experts' hidden layers (moe_config.recompute_experts) */
    CM_RECOMPUTE_ALL,     /* also the blocks' halves (lm_config.checkpoint_blocks) */
    CM_RECOMPUTE_COUNT
} cm_recompute;

/* The meaning, default and range of every field are in recipe_keys.c and
 * docs/recipes.md; the comments here are only reminders. */
typedef struct cm_model_cfg {
    cm_model_arch arch;
    int vocab_size; /* 256 for byte-level text */
    int n_layers;
    int d_model;
    int n_heads; /* divides d_model */
    int d_ff;    /* hidden width of the MLP */
    double dropout;
    double init_std;          /* std of the normal init (GPT-2: 0.02) */
    bool scale_residual_init; /* residual projections get init_std / sqrt(2 n_layers) */
    double layernorm_eps;
    /* arch resnet */
    char cnn_widths[CM_RECIPE_NAME_CAP]; /* "32,64,128": dense width of each stage */
    int cnn_blocks;                      /* BasicBlocks per stage */
    int cnn_stem;                        /* stem channels (not scaled by cnn_ratio) */
    double cnn_ratio;                    /* stage width = int(ratio * width) */
} cm_model_cfg;

typedef struct cm_moe_cfg {
    bool enabled;      /* false: every block has the dense MLP */
    int num_experts;   /* E */
    int every;         /* block i is MoE when i % every == 0 */
    int expert_hidden; /* 0: d_ff / E with split_dense, else d_ff; see recipe_expert_hidden */
    bool split_dense;  /* experts are the dense MLP cut into E blocks of d_ff / E */
    ag_activation activation;
    double expert_dropout;       /* dropout on the experts' hidden units in training */
    moe_cnn_routing cnn_routing; /* arch resnet */
    bool merged;                 /* MC-SMoE: each layer has a group table (cmoe merge) */
} cm_moe_cfg;

typedef struct cm_router_cfg {
    router_kind type;
    int k; /* experts per token (topk); SMoE-Dropout: k at evaluation */
    router_gating gating;
    bool bias;
    double init_std;
    router_noise noise; /* none, fixed (noise_std), learned (Shazeer et al.) */
    double noise_std;
    double aux_loss_coef;            /* Switch load balancing */
    router_aux_scope aux_loss_scope; /* its statistics: global batch or this rank's */
    double z_loss_coef;              /* ST-MoE z-loss */
    double top_p;
    double entropy_coef;    /* top_p's dynamic loss */
    double capacity_factor; /* 0: dropless; expert_choice needs > 0 */
    router_drop_policy drop_policy;
    router_k_mode k_schedule;     /* SMoE-Dropout's k during training */
    int k_min, k_max;             /* k_max 0: num_experts */
    int64_t k_span_steps;         /* S; 0: train.steps */
    double thor_alpha;            /* weight of THOR's consistency loss */
    router_thor_level thor_level; /* THOR at evaluation */
    int eval_k;                   /* 0: k; else the k used at evaluation */
    int null_experts;             /* null_experts: m */
    double bias_update_rate;      /* bias_balance: u */
    int rnn_hidden;               /* rmoe: H_r */
    router_rnn_state rnn_state;   /* rmoe: carry, detach or off */
} cm_router_cfg;

typedef struct cm_data_cfg {
    cm_data_format format;
    char path[CM_RECIPE_PATH_CAP]; /* training split; paths are relative to the cwd */
    char valid_path[CM_RECIPE_PATH_CAP];
    char test_path[CM_RECIPE_PATH_CAP];
    int seq_len;    /* tokens per sequence; also the size of the learned position table */
    int batch_size; /* sequences per optimizer step, summed over data-parallel ranks */
    /* format idx: path / test_path are image files, these their labels */
    char labels_path[CM_RECIPE_PATH_CAP];
    char test_labels_path[CM_RECIPE_PATH_CAP];
    int augment_crop;  /* random-crop padding in pixels; 0: none */
    bool augment_flip; /* random horizontal flip */
} cm_data_cfg;

typedef struct cm_optim_cfg {
    optim_kind type;
    double lr; /* peak learning rate; the schedule scales it */
    double beta1, beta2, eps;
    double weight_decay; /* decoupled (AdamW) or L2 (SGD) */
    bool decay_norms, decay_biases, decay_embeddings;
    double momentum;          /* SGD only */
    bool nesterov;            /* SGD only, needs momentum > 0 */
    double grad_clip;         /* max global L2 norm of the gradients; 0 disables clipping */
    bool skip_unused_experts; /* experts without tokens in a step are not updated */
} cm_optim_cfg;

typedef struct cm_schedule_cfg {
    optim_lr_kind type;
    int64_t warmup_steps; /* linear from 0 to optim.lr, for every schedule type */
    double min_lr;        /* cosine floor */
    int64_t step_size;    /* step decay period */
    double gamma;         /* step decay factor */
} cm_schedule_cfg;

typedef struct cm_train_cfg {
    int64_t steps;
    int64_t seed;
    int64_t log_every;
    int grad_accum;     /* micro-batches per optimizer step */
    int64_t eval_every; /* 0: no periodic evaluation */
    int eval_batches;
    int arena_mib;                    /* per-step activation arena */
    int threads;                      /* BLAS threads per rank; 0: library default */
    cm_recompute recompute;           /* memory for time; results bit-identical */
    char out_dir[CM_RECIPE_PATH_CAP]; /* "": runs/<name>; see recipe_run_dir */
} cm_train_cfg;

typedef struct cm_checkpoint_cfg {
    char dir[CM_RECIPE_PATH_CAP]; /* "": the run directory; see recipe_checkpoint_dir */
    int64_t every;                /* steps between checkpoints; 0: only the final one */
    int keep_last;                /* 0 keeps all */
} cm_checkpoint_cfg;

typedef struct cm_eval_cfg {
    cm_split split;
} cm_eval_cfg;

typedef struct cm_parallel_cfg {
    int expert_parallel;        /* ranks per expert-parallel group; 0: all ranks */
    shadow_mode shadow_experts; /* dynamic shadowing of hot experts (parallel/shadow.h) */
    int shadow_float_cost;      /* auto's cost of moving one float, in flops */
} cm_parallel_cfg;

/* Adversarial training and robust evaluation of the resnet (METHODS.md 4). */
typedef struct cm_adversarial_cfg {
    adv_mode mode;
    double eps;       /* L-inf radius, train and test */
    double step_size; /* training attack */
    int steps;        /* training attack */
    int eval_steps;   /* PGD at test time (RA) */
    double eval_step_size;
    double eval_router_weight; /* RA attack: weight of the routers' CE to y mod E */
    double beta;               /* TRADES KL weight */
    double router_weight;      /* AdvMoE alpha */
    adv_router_objective router_objective;
} cm_adversarial_cfg;

/* How `cmoe upcycle` turns a dense checkpoint into this recipe's MoE model
 * (train/upcycle.h); training ignores the section. */
typedef struct cm_upcycle_cfg {
    upcycle_router router;
    upcycle_scaling scaling;
    double drop_ratio; /* Drop-Upcycling's r; 0: plain upcycling */
    upcycle_drop_scope drop_scope;
} cm_upcycle_cfg;

typedef struct cm_recipe {
    char name[CM_RECIPE_NAME_CAP]; /* letters, digits, '.', '_', '-' (a directory name) */
    cm_model_cfg model;
    cm_moe_cfg moe;
    cm_router_cfg router;
    cm_data_cfg data;
    cm_optim_cfg optim;
    cm_schedule_cfg schedule;
    cm_train_cfg train;
    cm_checkpoint_cfg checkpoint;
    cm_eval_cfg eval;
    cm_parallel_cfg parallel;
    cm_adversarial_cfg adversarial;
    cm_upcycle_cfg upcycle;
} cm_recipe;

/* Every key at its default. The struct is zeroed first (padding and string
 * tails included), so two recipes with equal values are equal under memcmp. */
void recipe_defaults(cm_recipe *out);

/* Loads `path` (NULL: defaults only) with its base chain, applies the
 * overrides ("section.key=value", or "key=value" for top-level keys) and checks
 * the result. `out` is written only on success. */
cm_status recipe_load(const char *path, const char *const *overrides, int n_overrides,
                      cm_recipe *out);

/* Same, from YAML text in memory (e.g. the recipe stored in a checkpoint).
 * `label` names the text in error messages and anchors relative `base:` paths. */
cm_status recipe_load_text(const char *text, const char *label, const char *const *overrides,
                           int n_overrides, cm_recipe *out);

/* The resolved recipe as YAML: every key, defaults included, in table order;
 * loading it back gives an identical struct. snprintf semantics: writes at most
 * `capacity` bytes (NUL included) and returns the full length, so
 * `recipe_format(r, NULL, 0) + 1` is the size to allocate. This text is the
 * provenance checkpoints store. */
size_t recipe_format(const cm_recipe *recipe, char *buffer, size_t capacity);

/* recipe_format's text, malloc'd (the caller frees); NULL when out of memory. */
char *recipe_format_text(const cm_recipe *recipe);

/* Writes recipe_format's text to `out` (CM_ERR_IO if writing fails). */
cm_status recipe_print(const cm_recipe *recipe, FILE *out);

/* One value as recipe text ("3e-4" prints as "0.0003", enums by name, strings
 * quoted), e.g. recipe_get(r, "optim.type", buf, sizeof buf) -> "adamw". */
cm_status recipe_get(const cm_recipe *recipe, const char *dotted_key, char *buffer,
                     size_t capacity);

/* True when some key differs; then writes "section.key" of the first such key
 * (table order) to key_path (may be NULL). For resume checks: "the checkpoint
 * has model.d_model 256, the recipe says 512". */
bool recipe_first_difference(const cm_recipe *a, const cm_recipe *b, char *key_path,
                             size_t capacity);

/* The keys that define the model (its parameters, or its function at
 * inference: model.*, moe.* and router.type, gating, bias, null_experts, rnn_hidden; not the
 * routing knobs an evaluation may vary, such as router.k, eval_k, top_p, capacity_factor,
 * thor_level, nor training-only keys such as dropout) on which `given` differs from `stored`: their
 * count, and "model.n_heads 8 (not 4), ..." in out (given's value, then stored's;
 * snprintf-truncated). */
int recipe_model_differences(const cm_recipe *stored, const cm_recipe *given, char *out,
                             size_t capacity);

/* train.out_dir, or "runs/<name>" when it is empty. */
cm_status recipe_run_dir(const cm_recipe *recipe, char *buffer, size_t capacity);
/* checkpoint.dir, or the run directory when it is empty. */
cm_status recipe_checkpoint_dir(const cm_recipe *recipe, char *buffer, size_t capacity);

/* Read-only view of the key table, for documentation and tools. */
typedef struct cm_recipe_key_info {
    const char *section;           /* "" for top-level keys */
    const char *key;               /* "lr" */
    const char *type;              /* "integer", "number", "bool", "string" or "enum" */
    const char *range;             /* "(0, 10]" for numbers, "" otherwise */
    const char *help;              /* one line, the meaning */
    const char *const *enum_names; /* NULL-terminated valid values; NULL unless an enum */
} cm_recipe_key_info;

int recipe_key_count(void);
cm_recipe_key_info recipe_key_info(int index);

/* The key reference as Markdown tables, one per section (what docs/recipes.md
 * holds; a test checks every row is there). */
cm_status recipe_write_reference(FILE *out);

#endif
