/* Routers: which experts each token goes to, and with what gate.
 *
 * One interface for every routing method of METHODS.md:
 *   input  x [T,D]: the tokens' features (the MoE layer's input);
 *   output for each token a variable-length list of (expert, gate) slots,
 *          stored token-major as CSR: token t owns slots
 *          [offsets[t], offsets[t+1]); expert[s] in [0,E); gates [S] on the
 *          tape (the gradient reaches the router weights and x through the
 *          gates only; the discrete selection has none);
 *   plus the router's auxiliary loss (already weighted by its recipe
 *   coefficients, on the tape, NULL if the method has none) and routing
 *   statistics for logging.
 * Top-p, expert choice and capacity dropping make the number of slots per
 * token vary (0..E); the MoE layer handles any count, including experts that
 * receive no token or every token.
 *
 * Methods (router_kind): learned top-k (softmax-then-topK or topK-then-softmax,
 * optional logit noise (fixed std, or Shazeer et al.'s learned noisy top-k),
 * Switch load-balancing and z-loss; Switch is k = 1),
 * SMoE-Dropout (frozen random router, topK-then-softmax, k from a schedule),
 * THOR (no router: one random expert per layer per pass in training, per
 * sequence or per token at inference), dynamic top-p (smallest prefix of the
 * sorted probabilities whose mass exceeds p, raw probabilities as gates,
 * entropy and load-balancing losses), expert choice (each expert takes its
 * top-c tokens; not causal, see docs), AdaMoE's null experts (top-k over
 * E true and m null experts, which output zero and cost nothing: they never
 * become slots, so a token uses 0..k true experts), and auxiliary-loss-free
 * balancing (top-k chosen on the probabilities plus a per-expert bias that
 * the trainer nudges once per optimizer step from the global expert loads,
 * router_update_expert_biases; the gates ignore the bias), and RMoE's
 * layerwise recurrent router (a GRU shared by all MoE layers carries a
 * per-token state along the depth; each layer's top-k logits are read from
 * the new state, METHODS.md 9.2; the state crosses layers in
 * router_call.depth).
 *
 * The registry (registry.c) holds one row per method (router_method): its
 * name, what it reads (k, a k schedule), how many forward passes a training
 * step makes, whether it has (frozen) weights, its validation and its route
 * function, each method in its own file. router_declare, router_route and
 * router_effective_k dispatch through the row, and the shared pipeline
 * (router_common.c) names no method.
 *
 * Determinism: every random draw (noise, THOR's choices) is keyed by
 * (seed, step, layer, purpose) and a global index (token, sequence or pass),
 * so the draws are identical on any number of ranks. Capacity dropping and
 * expert choice select among the call's tokens only (this rank's share of
 * the batch, as Megatron does): with them, routing depends on the rank
 * count once an expert overflows (docs/recipes.md, "parallel"). Ties
 * between equal scores go to the lowest expert index.
 * Owns: the router's parameter handles (values live in ag_params). */
#ifndef CMOE_ROUTERS_ROUTER_H
#define CMOE_ROUTERS_ROUTER_H

#include <stdbool.h>
#include <stdint.h>

#include <mpi.h>

#include "autograd/ops.h"
#include "autograd/params.h"
#include "optim/optim.h"
#include "routers/k_schedule.h"

typedef enum router_kind {
    ROUTER_TOPK = 0,
    ROUTER_SMOE_DROPOUT,
    ROUTER_THOR,
    ROUTER_TOP_P,
    ROUTER_EXPERT_CHOICE,
    ROUTER_NULL_EXPERTS,
    ROUTER_BIAS_BALANCE,
    ROUTER_RMOE,
    ROUTER_KIND_COUNT
} router_kind;

typedef enum router_gating {
    ROUTER_SOFTMAX_THEN_TOPK = 0, /* gates = the chosen softmax probabilities (sum < 1) */
    ROUTER_TOPK_THEN_SOFTMAX,     /* gates = softmax over the chosen logits (sum = 1) */
    ROUTER_GATING_COUNT
} router_gating;

typedef enum router_drop_policy {
    ROUTER_DROP_PROBABILITY = 0, /* an over-full expert keeps its highest-gate tokens */
    ROUTER_DROP_POSITION,        /* an over-full expert keeps its first tokens in batch order */
    ROUTER_DROP_POLICY_COUNT
} router_drop_policy;

/* Noise on the router logits in training (never at evaluation). */
typedef enum router_noise {
    ROUTER_NOISE_NONE = 0,
    ROUTER_NOISE_FIXED,   /* H = x W^T (+ b) + noise_std N(0,1) */
    ROUTER_NOISE_LEARNED, /* Shazeer et al. 2017: H = x W^T (+ b) + N(0,1) softplus(x W_noise^T),
                             W_noise [E,D] learned (PREFIX.noise_weight, init zero) */
    ROUTER_NOISE_COUNT
} router_noise;

/* Which tokens the load-balancing statistics f and P of the Switch loss
 * cover (METHODS.md 0.2). */
typedef enum router_aux_scope {
    ROUTER_AUX_GLOBAL = 0, /* the global batch: counts summed over router_call.group
                              (Megatron's global_aux_loss) */
    ROUTER_AUX_LOCAL,      /* this rank's tokens only (Megatron's default aux_loss) */
    ROUTER_AUX_SCOPE_COUNT
} router_aux_scope;

/* What RMoE's GRU receives as the previous MoE layer's state h_{l-1}
 * (router.rnn_state). */
typedef enum router_rnn_state {
    ROUTER_RNN_CARRY =
        0,             /* the state itself: gradients flow back through the depth (the release) */
    ROUTER_RNN_DETACH, /* its values without their gradient (no cross-layer terms) */
    ROUTER_RNN_ZERO,   /* zero at every layer: recurrence off, same parameters */
    ROUTER_RNN_STATE_COUNT
} router_rnn_state;

typedef enum router_thor_level {
    ROUTER_THOR_PER_TOKEN = 0,    /* inference_level 0 */
    ROUTER_THOR_PER_SEQUENCE = 1, /* inference_level 1, the released default */
    ROUTER_THOR_LEVEL_COUNT
} router_thor_level;

/* The spellings recipes and logs use (router.type, router.gating,
 * router.drop_policy, router.noise, router.aux_loss_scope,
 * router.thor_level, router.rnn_state), in enum order, NULL-terminated. */
extern const char *const router_kind_names[ROUTER_KIND_COUNT + 1];
extern const char *const router_gating_names[ROUTER_GATING_COUNT + 1];
extern const char *const router_drop_policy_names[ROUTER_DROP_POLICY_COUNT + 1];
extern const char *const router_noise_names[ROUTER_NOISE_COUNT + 1];
extern const char *const router_aux_scope_names[ROUTER_AUX_SCOPE_COUNT + 1];
extern const char *const router_thor_level_names[ROUTER_THOR_LEVEL_COUNT + 1];
extern const char *const router_rnn_state_names[ROUTER_RNN_STATE_COUNT + 1];

typedef struct router_config {
    router_kind kind;
    int num_experts; /* E */
    int k;           /* top-k / SMoE-Dropout's k at evaluation when not overridden */
    router_gating gating;
    bool bias;                       /* a bias on the router's linear layer */
    float init_std;                  /* normal init of the router weight */
    router_noise noise;              /* logit noise in training (methods with a router network) */
    float noise_std;                 /* ROUTER_NOISE_FIXED's standard deviation */
    float aux_loss_coef;             /* Switch load-balancing loss coefficient (0: off) */
    router_aux_scope aux_loss_scope; /* tokens the balance statistics cover */
    float z_loss_coef;               /* router z-loss coefficient (0: off) */
    float top_p;                     /* top-p threshold */
    float entropy_coef;              /* top-p: dynamic (entropy) loss coefficient */
    float capacity_factor;           /* 0: dropless; > 0: capacity ceil(T k / E * cf) per expert;
                                        expert choice: tokens per expert = ceil(T cf / E); T is
                                        the call's (this rank's) token count, not the global one */
    router_drop_policy drop_policy;
    router_k_schedule k_schedule; /* SMoE-Dropout: k during training */
    router_thor_level thor_level;
    float consistency_alpha;    /* THOR: weight of the consistency loss between its two passes */
    int null_experts;           /* null experts: m, chosen among E + m, never slots (>= 0) */
    float bias_update_rate;     /* bias balancing: u in b_i += u sign(mean load - load_i) */
    int rnn_hidden;             /* RMoE: H_r, the GRU's input and state size (>= 1) */
    router_rnn_state rnn_state; /* RMoE: what the GRU gets as the previous layer's state */
} router_config;

typedef struct router_method router_method;

typedef struct router {
    router_config config;
    const router_method *method; /* set by router_declare: the row of config.kind */
    int layer;
    ag_param *weight;       /* [E,D]; NULL for a method without weights (THOR) */
    ag_param *bias;         /* [E] or NULL */
    ag_param *noise_weight; /* [E,D] with ROUTER_NOISE_LEARNED, else NULL */
    ag_param *null_weight;  /* [m,D] null experts' logits (m > 0), else NULL */
    ag_param *null_bias;    /* [m] with config.bias and m > 0, else NULL */
    ag_param *expert_bias;  /* [E] bias balancing's selection bias: frozen (no gradient, no
                               optimizer state), saved in checkpoints, else NULL */
    /* RMoE: PREFIX.proj_weight [H_r,D] (the release's weight1; this layer's),
     * weight = PREFIX.weight [E,H_r] (weight2), and the GRU shared by every
     * MoE layer of the model, router_gru.{weight_ih,weight_hh} [3H_r,H_r] and
     * router_gru.{bias_ih,bias_hh} [3H_r] (PyTorch GRUCell's names and
     * r, z, n block order); all NULL for the other methods. */
    ag_param *proj_weight;
    ag_param *gru_weight_ih, *gru_weight_hh, *gru_bias_ih, *gru_bias_hh;
} router;

/* The per-token state a depth-recurrent router (RMoE) hands from one MoE
 * layer to the next within one forward pass: h [T,H_r] (arena, on the tape),
 * NULL before the first MoE layer (the state then starts at zero). The
 * owner of the forward pass (lm_forward, the decoder) keeps one per pass;
 * a dense layer in between leaves it unchanged. Tokens are routed on their
 * home rank, so with expert parallelism the state never leaves it. */
typedef struct router_depth_state {
    ag_tensor *h;
} router_depth_state;

/* Per-call context. */
typedef struct router_call {
    bool training;
    uint64_t seed, step;
    int k_override;       /* > 0: use this k (evaluation sweeps, --set router.k) */
    int pass;             /* THOR: index of the forward pass in this step (independent draws) */
    int micro;            /* THOR: the micro-batch of the step (gradient accumulation), ditto */
    int seq_len;          /* tokens per sequence (THOR per-sequence inference) */
    uint64_t first_token; /* global index of token 0 of x (data-parallel rank offset) */
    /* The ranks whose tokens form the global batch (0 or MPI_COMM_NULL: this
     * process alone) and the global token count (0: this call's T). Every
     * per-token mean is divided by global_tokens. With
     * ROUTER_AUX_GLOBAL the expert counts of the balance loss are summed over
     * `group`, so the losses summed over the ranks, and their gradients,
     * equal those of one process running the whole batch (for a dropless
     * method: capacity and expert choice select among this call's tokens
     * only). With ROUTER_AUX_LOCAL each rank's balance loss uses its own
     * counts and tokens, weighted by its share of the global batch. */
    MPI_Comm group;
    int64_t global_tokens;
    /* RMoE: the state carried across this forward pass's MoE layers, read
     * and replaced by each layer (NULL: every layer starts from zero). */
    router_depth_state *depth;
} router_call;

typedef struct router_stats {
    int64_t tokens;             /* T */
    int64_t slots;              /* (token, expert) pairs kept */
    int64_t dropped;            /* pairs removed by the capacity limit */
    int32_t *tokens_per_expert; /* [E], kept pairs per expert (arena) */
    int32_t *routed_per_expert; /* [E], pairs the router chose per expert before the
                                   capacity limit (arena); the balance loss's counts */
    double entropy;             /* mean entropy of the router distribution (nats); NAN: none */
    int k;                      /* k in effect (top-k methods), 0 otherwise */
} router_stats;

typedef struct router_output {
    int n_tokens, n_slots;
    int32_t *offsets;    /* [T+1] (arena) */
    int32_t *expert;     /* [S] (arena) */
    ag_tensor *gates;    /* [S] */
    ag_tensor *aux_loss; /* [1], coefficients applied; NULL if none */
    router_stats stats;
    /* The router logits [T,E] (arena) of the methods that choose top-k
     * over E experts (topk, smoe_dropout, bias_balance, rmoe); NULL for
     * the others. cmoe merge's similarities read them. */
    const float *logits;
} router_output;

/* ---- the registry ---------------------------------------------------------- */

/* One routing method. Adding one: a file with its route (and validate)
 * functions built on router_internal.h, a router_kind value with its name in
 * router_kind_names, and a row in registry.c. */
struct router_method {
    router_kind kind;
    const char *name;      /* router_kind_names[kind] */
    bool uses_k;           /* reads config.k (experts per token), checked in [1, E] */
    bool k_scheduled;      /* in training, k follows config.k_schedule (router_effective_k) */
    int passes_per_step;   /* forward passes of the model per training step */
    bool pass_consistency; /* the passes are tied by a consistency loss weighted by
                              config.consistency_alpha (THOR) */
    bool has_weights;      /* declares PREFIX.weight [E,D] (+ PREFIX.bias [E]); RMoE
                              declares its own (method->declare) */
    bool frozen_weights;   /* ... and never trains them */
    bool null_experts;     /* chooses among E + config.null_experts (router_choices) */
    /* The method's own checks of the configuration, after the common ones
     * (num_experts >= 1, k in [1, E] when uses_k; capacity_factor >= 0
     * comes after). NULL: none. */
    cm_status (*validate)(const router_config *config);
    /* Declares the method's own tensors after the common ones (PREFIX is the
     * router's); NULL: none. */
    cm_status (*declare)(router *r, int d_model, ag_params *params, const char *prefix);
    /* Once per optimizer step, with load[E] = the tokens kept per expert in
     * that step's training passes, summed over the ranks and micro-batches
     * (router_update_expert_biases). NULL: the method keeps no such state. */
    void (*update)(const router *r, const int64_t *load);
    /* Fills `out` completely; returns the context status. */
    cm_status (*route)(ag_ctx *ctx, const router *r, ag_tensor *x, const router_call *call,
                       router_output *out);
};

/* The registry's row of `kind`; NULL when kind is not a router_kind. */
const router_method *router_method_of(router_kind kind);

/* router_kind_names[kind] ("topk", "smoe_dropout", ...); "?" out of range. */
const char *router_kind_name(router_kind kind);

/* What the trainer asks of a method: forward passes per training step (THOR
 * 2, others 1), and the weight of the consistency loss between those passes
 * (THOR: config.consistency_alpha, others 0). config.kind must be valid. */
int router_passes_per_step(const router_config *config);
float router_pass_consistency(const router_config *config);
/* Whether the method takes a k (evaluation k sweeps, router.eval_k). */
bool router_uses_k(const router_config *config);
/* The experts a token chooses its k among: E, plus the null experts of a
 * method that has them. k and k overrides are checked against this. */
int router_choices(const router_config *config);
/* Whether the method keeps state updated once per optimizer step from the
 * step's expert loads (bias balancing). */
bool router_updates_per_step(const router_config *config);

/* ---- declaring and routing ---------------------------------------------------- */

/* Validates the configuration (clear CM_ERR_INVALID for k > E, p out of
 * (0,1], an unknown kind, learned noise on a method without trained router
 * weights, ...) and declares the router's parameters as PREFIX.weight [E,D]
 * (+ PREFIX.bias [E]) in the dense group when the method has weights;
 * frozen when the method says so (SMoE-Dropout); with learned noise also
 * PREFIX.noise_weight [E,D] (init zero, as Shazeer et al.). */
cm_status router_declare(router *r, const router_config *config, int layer, int d_model,
                         ag_params *params, const char *prefix);
/* The same with a given method instead of the registry's row of
 * config->kind (a method under test, not yet in the registry). */
cm_status router_declare_with(router *r, const router_method *method, const router_config *config,
                              int layer, int d_model, ag_params *params, const char *prefix);

/* Routes x [T,D] with the router's method. Returns the context status
 * (CM_OK, or the arena error). */
cm_status router_route(ag_ctx *ctx, const router *r, ag_tensor *x, const router_call *call,
                       router_output *out);

/* The k a top-k method uses for this call: k_override if set; a k-scheduled
 * method (SMoE-Dropout) in training: its schedule at call->step; otherwise
 * config.k. */
int router_effective_k(const router *r, const router_call *call);

/* The once-per-optimizer-step update of n routers (bias balancing):
 * loads [n][E] holds each router's kept (token, expert) pairs per expert
 * over this rank's training passes of the step (every micro-batch); they
 * are summed over `group` (0 or MPI_COMM_NULL: this process alone) in
 * place, then each router whose method has an update applies it. Every
 * rank of the group ends with the same state. Collective. */
cm_status router_update_expert_biases(const router *const *routers, int n, int64_t *loads,
                                      MPI_Comm group);

#endif
