/* Parity with PyTorch for the MoE language model: a tiny byte LM with an MoE
 * layer in every block, run by cmoe and by tests/parity/moe_parity.py (an
 * independent float64 reference that reads the same initial weights from a
 * cmoe checkpoint), must agree on the routing, the loss (cross-entropy plus
 * the routers' auxiliary losses), every parameter gradient at each of 3
 * steps, and the parameters after those 3 AdamW steps, to 1e-4 relative.
 *
 * Cases (the three routers of the issue, learned top-2 in both gating
 * conventions):
 *   top2_topk_softmax  learned top-2, gates = softmax over the chosen logits,
 *                      Switch load-balancing loss (moe-top2.yaml);
 *   top2_softmax_topk  learned top-2, gates = the chosen probabilities,
 *                      Switch loss and z-loss;
 *   smoe_dropout       frozen random router, topK-then-softmax, k from the
 *                      linear_increase schedule (k = 1, 2, 3 at steps 0-2);
 *                      the router must get no gradient and no update;
 *   top_p              dynamic top-p, raw-probability gates, balance and
 *                      entropy losses;
 *   top2_learned_noise learned top-2 with Shazeer et al.'s noisy top-k:
 *                      H = x W^T + n softplus(x W_noise^T), top-k and gates
 *                      from H, Switch loss and z-loss on H; the standard
 *                      normal draws n of every step and layer are written by
 *                      this test (noise.bin, from the same keys the router
 *                      uses), so both sides add the same noise.
 *   swiglu_top2        top2_topk_softmax with SwiGLU experts (the top-p
 *                      paper's LLaMA MLP, with cmoe's biases):
 *                      w2 (silu(w1 x + b1) * (w3 x + b3)) + b2.
 * The reference runs once for all cases (importing torch costs ~2 s), from
 * an unchecked fixture; each test then runs cmoe and compares. */
#include <check.h>
#include <hdf5.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "layers/transformer.h"
#include "optim/optim.h"
#include "parity_util.h"
#include "train/checkpoint.h"

#ifndef CMOE_SOURCE_DIR
#define CMOE_SOURCE_DIR "."
#endif

enum { BATCH = 3, SEQ = 8, LAYERS = 2, HEADS = 2, EXPERTS = 4, HIDDEN = 8, STEPS = 3 };
enum { TOKENS = BATCH * SEQ };
enum { SEED = 5 }; /* the training calls' seed, which keys the router noise */

/* AdamW as in tests/test_parity.c (eps 1e-5: see the comment there). */
static const double LR = 1e-2, BETA1 = 0.9, BETA2 = 0.95, EPS = 1e-5, WEIGHT_DECAY = 0.1;
static const double TOLERANCE = 1e-4;
/* A routing decision closer than this to flipping (a gap between two logits
 * or probabilities that must stay ordered, or a cumulative mass minus the
 * top-p threshold) could go either way between float32 and float64 once the
 * parameters have moved by ~1e-5 relative; the cases are chosen so every
 * decision is further away than this, and the test checks that they are. */
static const double MIN_MARGIN = 1e-4;

typedef struct moe_case {
    const char *name;
    router_config router;
    ag_activation activation; /* of the experts */
} moe_case;

/* The auxiliary coefficients are larger than the recipes' (1e-2, 1e-4) so
 * that an error in a loss term shows well above the tolerance in the router
 * gradient; router init_std 0.3 gives logits of std ~1.2 (the router sees
 * LayerNorm output of norm ~4), so routing is decisive, not near-uniform. */
static const moe_case CASES[] = {
    {"top2_topk_softmax",
     {.kind = ROUTER_TOPK,
      .num_experts = EXPERTS,
      .k = 2,
      .gating = ROUTER_TOPK_THEN_SOFTMAX,
      .init_std = 0.3f,
      .aux_loss_coef = 0.1f},
     AG_ACT_GELU},
    {"top2_softmax_topk",
     {.kind = ROUTER_TOPK,
      .num_experts = EXPERTS,
      .k = 2,
      .gating = ROUTER_SOFTMAX_THEN_TOPK,
      .init_std = 0.3f,
      .aux_loss_coef = 0.1f,
      .z_loss_coef = 0.01f},
     AG_ACT_GELU},
    {"smoe_dropout",
     {.kind = ROUTER_SMOE_DROPOUT,
      .num_experts = EXPERTS,
      .k = 2,
      .gating = ROUTER_TOPK_THEN_SOFTMAX,
      .init_std = 0.3f,
      .k_schedule =
          {.mode = ROUTER_K_LINEAR_INCREASE, .k_min = 1, .k_max = EXPERTS, .total_steps = 4}},
     AG_ACT_GELU},
    {"top_p",
     {.kind = ROUTER_TOP_P,
      .num_experts = EXPERTS,
      .init_std = 0.3f,
      .top_p = 0.5f,
      .aux_loss_coef = 0.1f,
      .entropy_coef = 0.05f},
     AG_ACT_GELU},
    {"top2_learned_noise",
     {.kind = ROUTER_TOPK,
      .num_experts = EXPERTS,
      .k = 2,
      .gating = ROUTER_TOPK_THEN_SOFTMAX,
      .init_std = 0.3f,
      .noise = ROUTER_NOISE_LEARNED,
      .aux_loss_coef = 0.1f,
      .z_loss_coef = 0.01f},
     AG_ACT_GELU},
    {"swiglu_top2",
     {.kind = ROUTER_TOPK,
      .num_experts = EXPERTS,
      .k = 2,
      .gating = ROUTER_TOPK_THEN_SOFTMAX,
      .init_std = 0.3f,
      .aux_loss_coef = 0.1f},
     AG_ACT_SWIGLU},
};
enum { N_CASES = (int)(sizeof CASES / sizeof CASES[0]) };

/* Set by the fixture, read by every test. */
static char work_dir[] = "/tmp/cmoe-parity-moe-XXXXXX";
static bool work_dir_made;
static char setup_error[1024];
static int reference_status = -1;
static char reference_command[2048];

/* ---- the model and the batch (the same in the fixture and in each test) ---- */

static cm_status build_model(const moe_case *c, lm_model *model, ag_params *params) {
    lm_config config = {
        .vocab = 256,
        .d_model = 16,
        .n_layer = LAYERS,
        .n_head = HEADS,
        .d_ff = 24,
        .max_seq = SEQ,
        .dropout = 0.0f,
        .init_std = 0.1f,
        .scale_residual_init = true,
        .layernorm_eps = 1e-5f,
        .moe_every = 1,
        .moe = {.hidden = HIDDEN, .activation = c->activation, .router = c->router}};
    ag_params_init(params);
    CM_TRY(lm_declare(model, &config, params));
    CM_TRY(ag_params_finalize(params, 3));
    optim_apply_decay_policy(params, false, false, false);
    /* Non-trivial LayerNorm parameters and biases (all one or zero at init),
     * so that every gradient is tested with generic values. The biases get
     * less: a bias is the same for every token, and a large common offset
     * would make all tokens pick the same experts. */
    for (int i = 0; i < params->count; i++) {
        ag_param *p = params->items[i];
        if (p->init.kind == AG_INIT_NORMAL) continue;
        float scale = strstr(p->name, "ln") ? 0.1f : 0.02f;
        for (int64_t j = 0; j < p->tensor.numel; j++)
            p->tensor.data[j] +=
                scale * cm_rng_normal((cm_rng_key){9, 0, (uint32_t)i, CM_RNG_TEST}, (uint64_t)j);
    }
    return CM_OK;
}

/* BATCH windows of SEQ+1 random bytes -> inputs and targets [B*T]. */
static void make_batch(int32_t *window, int32_t *inputs, int32_t *targets) {
    for (int i = 0; i < BATCH * (SEQ + 1); i++)
        window[i] = (int32_t)cm_rng_below((cm_rng_key){4, 0, 0, CM_RNG_TEST}, (uint64_t)i, 256);
    for (int b = 0; b < BATCH; b++)
        for (int t = 0; t < SEQ; t++) {
            inputs[b * SEQ + t] = window[b * (SEQ + 1) + t];
            targets[b * SEQ + t] = window[b * (SEQ + 1) + t + 1];
        }
}

static bool write_settings(const char *path, const moe_case *c) {
    FILE *f = fopen(path, "w");
    if (!f) return false;
    const router_config *r = &c->router;
    fprintf(f,
            "{\"router\": \"%s\", \"activation\": \"%s\", \"k\": %d, \"gating\": \"%s\", "
            "\"noise\": \"%s\", "
            "\"aux_coef\": %.17g, "
            "\"z_coef\": %.17g, \"top_p\": %.17g, \"entropy_coef\": %.17g,\n"
            " \"k_schedule\": {\"k_min\": %d, \"k_max\": %d, \"total_steps\": %lld},\n"
            " \"batch\": %d, \"seq\": %d, \"layers\": %d, \"heads\": %d, "
            "\"layernorm_eps\": %.17g,\n"
            " \"lr\": %.17g, \"beta1\": %.17g, \"beta2\": %.17g, \"eps\": %.17g, "
            "\"weight_decay\": %.17g, \"steps\": %d}\n",
            router_kind_name(r->kind), ag_activation_names[c->activation], r->k,
            router_gating_names[r->gating], router_noise_names[r->noise], (double)r->aux_loss_coef,
            (double)r->z_loss_coef, (double)r->top_p, (double)r->entropy_coef, r->k_schedule.k_min,
            r->k_schedule.k_max, (long long)r->k_schedule.total_steps, BATCH, SEQ, LAYERS, HEADS,
            (double)1e-5f, LR, BETA1, BETA2, EPS, WEIGHT_DECAY, STEPS);
    return fclose(f) == 0;
}

/* ---- the fixture: every case's inputs, then one run of the reference ---- */

static void case_path(char *out, size_t size, const moe_case *c, const char *file) {
    snprintf(out, size, "%s/%s%s%s", work_dir, c->name, file ? "/" : "", file ? file : "");
}

/* DIR/CASE/noise.bin: float32 [STEPS, LAYERS, TOKENS, EXPERTS], the standard
 * normal draws of the router noise at each training step and layer: key
 * (SEED, step, layer, CM_RNG_NOISE), element (t, e) at index t E + e (the
 * batch starts at global token 0), as routers/router.h documents. */
static bool write_noise(const moe_case *c) {
    char path[256];
    case_path(path, sizeof path, c, "noise.bin");
    FILE *f = fopen(path, "wb");
    if (!f) return false;
    bool ok = true;
    float draws[TOKENS * EXPERTS];
    for (int step = 0; step < STEPS; step++)
        for (int layer = 0; layer < LAYERS; layer++) {
            cm_rng_key key = {SEED, (uint64_t)step, (uint32_t)layer, CM_RNG_NOISE};
            cm_rng_fill_normal(key, 0, TOKENS * EXPERTS, 0.0f, 1.0f, draws);
            ok = ok && fwrite(draws, sizeof draws, 1, f) == 1;
        }
    return fclose(f) == 0 && ok;
}

/* Writes DIR/CASE/{init.h5, batch.bin, settings.json} (+ noise.bin); on failure fills
 * setup_error (a fixture must not assert: it runs outside the tests). */
static bool prepare_case(const moe_case *c, const int32_t *window) {
    char path[256];
    case_path(path, sizeof path, c, NULL);
    if (mkdir(path, 0700) != 0) {
        snprintf(setup_error, sizeof setup_error, "cannot create %s", path);
        return false;
    }
    lm_model model;
    ag_params params;
    cm_status status = build_model(c, &model, &params);
    if (status == CM_OK) {
        case_path(path, sizeof path, c, "init.h5");
        status = ckpt_save(path, &params, &(ckpt_meta){0, 3, 0}, NULL);
    }
    ag_params_free(&params);
    if (status != CM_OK) {
        snprintf(setup_error, sizeof setup_error, "case %s: model or checkpoint failed: %s",
                 c->name, cm_error_message());
        return false;
    }
    case_path(path, sizeof path, c, "batch.bin");
    FILE *batch_file = fopen(path, "wb");
    bool written = batch_file && fwrite(window, sizeof(int32_t), BATCH * (SEQ + 1), batch_file) ==
                                     (size_t)(BATCH * (SEQ + 1));
    if (batch_file) written = fclose(batch_file) == 0 && written;
    if (written && c->router.noise != ROUTER_NOISE_NONE) written = write_noise(c);
    case_path(path, sizeof path, c, "settings.json");
    if (!written || !write_settings(path, c)) {
        snprintf(setup_error, sizeof setup_error, "case %s: cannot write its inputs", c->name);
        return false;
    }
    return true;
}

static void setup_reference(void) {
    if (!mkdtemp(work_dir)) {
        snprintf(setup_error, sizeof setup_error, "mkdtemp(%s) failed", work_dir);
        return;
    }
    work_dir_made = true;
    int32_t window[BATCH * (SEQ + 1)], inputs[TOKENS], targets[TOKENS];
    make_batch(window, inputs, targets);
    int used = snprintf(reference_command, sizeof reference_command,
                        "/usr/bin/python3 %s/tests/parity/moe_parity.py", CMOE_SOURCE_DIR);
    for (int i = 0; i < N_CASES; i++) {
        if (!prepare_case(&CASES[i], window)) return;
        used += snprintf(reference_command + used, sizeof reference_command - (size_t)used,
                         " %s/%s", work_dir, CASES[i].name);
    }
    reference_status = system(reference_command);
}

static void teardown_reference(void) {
    if (!work_dir_made) return;
    if (getenv("CMOE_KEEP_PARITY_DIR")) { /* to inspect the inputs and reference.h5 */
        fprintf(stderr, "test_parity_moe: kept %s\n", work_dir);
        return;
    }
    char command[128];
    snprintf(command, sizeof command, "rm -rf '%s'", work_dir);
    if (system(command) != 0) fprintf(stderr, "test_parity_moe: could not remove %s\n", work_dir);
}

/* ---- comparison helpers ---- */

/* What cmoe produced over the STEPS steps. */
typedef struct cmoe_run {
    double loss[STEPS], aux[STEPS];
    int k[STEPS][LAYERS];
    int32_t counts[STEPS][LAYERS][EXPERTS];
    int64_t slots[STEPS][LAYERS];
    float *grads[STEPS][AG_NUM_GROUPS]; /* copies of the gradient buffers */
    float *initial[AG_NUM_GROUPS];      /* the parameter buffers before training */
} cmoe_run;

static float *copy_floats(const float *values, size_t n) {
    float *copy = malloc(n * sizeof(float));
    ck_assert_ptr_nonnull(copy);
    memcpy(copy, values, n * sizeof(float));
    return copy;
}

/* SMoE-Dropout's router is frozen: no gradient, no update (cmoe's
 * optimizers skip frozen parameters; the reference leaves it out of AdamW). */
static bool must_be_frozen(const moe_case *c, const ag_param *p) {
    return c->router.kind == ROUTER_SMOE_DROPOUT && strstr(p->name, ".moe.router.") != NULL;
}

/* STEPS training steps as trainer.c's train_step does them (loss = CE + the
 * reported auxiliary loss), without clipping. */
static void run_cmoe(const moe_case *c, lm_model *model, ag_params *params, cmoe_run *run) {
    int32_t window[BATCH * (SEQ + 1)], inputs[TOKENS], targets[TOKENS];
    make_batch(window, inputs, targets);
    for (int g = 0; g < AG_NUM_GROUPS; g++)
        run->initial[g] = copy_floats(params->buffers[g].data, params->buffers[g].numel);
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, 16 << 20), CM_OK);
    optim_adamw_config adamw = {BETA1, BETA2, EPS, WEIGHT_DECAY};
    optim_state state = {0};
    for (int step = 0; step < STEPS; step++) {
        ag_ctx_reset(&ctx);
        ag_params_zero_grad(params);
        lm_moe_report report;
        lm_forward_args args = {.ids = inputs,
                                .batch = BATCH,
                                .seq_len = SEQ,
                                .training = true,
                                .seed = SEED,
                                .step = (uint64_t)step,
                                .report = &report};
        ag_tensor *ce = lm_loss(&ctx, lm_forward(&ctx, model, &args), targets);
        ck_assert_int_eq(ag_ctx_status(&ctx), CM_OK);
        ag_tensor *total = report.aux_loss ? ag_add(&ctx, ce, report.aux_loss) : ce;
        ck_assert_int_eq(ag_backward(&ctx, total), CM_OK);
        run->loss[step] = total->data[0];
        run->aux[step] = report.aux_loss ? report.aux_loss->data[0] : 0.0;
        ck_assert_int_eq(report.n_layers, LAYERS);
        for (int l = 0; l < LAYERS; l++) {
            run->k[step][l] = report.stats[l].k;
            run->slots[step][l] = report.stats[l].slots;
            memcpy(run->counts[step][l], report.stats[l].tokens_per_expert,
                   sizeof run->counts[step][l]);
        }
        for (int g = 0; g < AG_NUM_GROUPS; g++)
            run->grads[step][g] = copy_floats(params->buffers[g].grad, params->buffers[g].numel);
        optim_adamw_step(params, &adamw, LR, &state);
        for (int i = 0; i < params->count; i++) {
            ag_param *p = params->items[i];
            if (must_be_frozen(c, p))
                ck_assert_msg(memcmp(p->tensor.data, run->initial[p->group] + p->offset,
                                     (size_t)p->tensor.numel * sizeof(float)) == 0,
                              "%s: AdamW changed the frozen %s at step %d", c->name, p->name, step);
        }
    }
    ag_ctx_free(&ctx);
}

static void free_run(cmoe_run *run) {
    for (int g = 0; g < AG_NUM_GROUPS; g++) {
        free(run->initial[g]);
        for (int step = 0; step < STEPS; step++) free(run->grads[step][g]);
    }
}

/* One step: routing first, so that a selection mismatch reads "routing
 * differs" rather than as a large gradient error, then the loss, then every
 * gradient. Steps are checked in order, so the first failure is at the step
 * where the two first disagree. */
static void compare_step(const moe_case *c, hid_t file, const cmoe_run *run, ag_params *params,
                         int step, double *worst_grad) {
    double *want_k = parity_read_doubles(file, "routing/k", STEPS);
    double *want_counts = parity_read_doubles(file, "routing/counts", STEPS * LAYERS * EXPERTS);
    double *margins = parity_read_doubles(file, "routing/margin", STEPS * LAYERS);
    double *want_loss = parity_read_doubles(file, "losses", STEPS);
    double *want_aux = parity_read_doubles(file, "aux", STEPS);
    double loss = run->loss[step], aux = run->aux[step];
    for (int l = 0; l < LAYERS; l++) {
        double margin = margins[step * LAYERS + l];
        ck_assert_msg(run->k[step][l] == (int)want_k[step],
                      "%s step %d layer %d: routing differs: cmoe uses k = %d, torch k = %g",
                      c->name, step, l, run->k[step][l], want_k[step]);
        for (int e = 0; e < EXPERTS; e++) {
            double want = want_counts[(step * LAYERS + l) * EXPERTS + e];
            ck_assert_msg(run->counts[step][l][e] == (int32_t)want,
                          "%s step %d layer %d: routing differs: expert %d gets %d tokens in "
                          "cmoe, %g in torch (closest decision %.2e from a tie; loss cmoe %.8f, "
                          "torch %.8f)",
                          c->name, step, l, e, run->counts[step][l][e], want, margin, loss,
                          want_loss[step]);
        }
        /* The same routing, but only by luck if a decision was this close. */
        ck_assert_msg(margin >= MIN_MARGIN,
                      "%s step %d layer %d: a routing decision is %.2e from a tie (needs %g); "
                      "the comparison would be luck, change the case",
                      c->name, step, l, margin, MIN_MARGIN);
    }

    double error = fabs(loss - want_loss[step]) / fabs(want_loss[step]);
    double aux_error = fabs(aux - want_aux[step]) / fmax(fabs(want_aux[step]), 1e-30);
    printf("parity %s: step %d loss cmoe %.8f torch %.8f (relative %.2e), aux cmoe %.6g torch "
           "%.6g\n",
           c->name, step, loss, want_loss[step], error, aux, want_aux[step]);
    fflush(stdout); /* a failing test's process ends without flushing */
    ck_assert_msg(error < TOLERANCE,
                  "%s: loss (cross-entropy + auxiliary) at step %d differs by %.3e: cmoe "
                  "%.8f, torch %.8f",
                  c->name, step, error, loss, want_loss[step]);
    ck_assert_msg(aux_error < TOLERANCE, "%s: auxiliary loss at step %d: cmoe %.8g, torch %.8g",
                  c->name, step, aux, want_aux[step]);

    /* Frozen parameters first: a wrongly trained router changes everything
     * downstream, and this names the cause. */
    for (int pass = 0; pass < 2; pass++)
        for (int i = 0; i < params->count; i++) {
            ag_param *p = params->items[i];
            if (must_be_frozen(c, p) != (pass == 0)) continue;
            const int64_t n = p->tensor.numel;
            char name[192];
            snprintf(name, sizeof name, "grads/step%d/%s", step, p->name);
            double *want = parity_read_doubles(file, name, n);
            const float *got = run->grads[step][p->group] + p->offset;
            if (pass == 0) {
                ck_assert_msg(p->frozen, "%s: %s is not frozen", c->name, p->name);
                for (int64_t j = 0; j < n; j++) {
                    ck_assert_msg(want[j] == 0.0, "%s: torch has a gradient for the frozen %s",
                                  c->name, p->name);
                    ck_assert_msg(got[j] == 0.0f,
                                  "%s: the frozen %s has gradient %g at element %lld, step %d",
                                  c->name, p->name, (double)got[j], (long long)j, step);
                }
            } else {
                ck_assert_msg(!p->frozen, "%s: %s is frozen", c->name, p->name);
                double grad_error = parity_relative_error(got, want, n);
                *worst_grad = fmax(*worst_grad, grad_error);
                ck_assert_msg(grad_error < TOLERANCE,
                              "%s: gradient of %s at step %d differs by %.3e (relative to its max)",
                              c->name, p->name, step, grad_error);
            }
            free(want);
        }
    free(want_k);
    free(want_counts);
    free(margins);
    free(want_loss);
    free(want_aux);
}

/* The routing exercised something: every expert gets tokens at some step
 * and layer, every layer uses at least 2 experts at every step, and top-p
 * gives some tokens more than one expert but not all of them. */
static void check_routing_not_degenerate(const moe_case *c, const cmoe_run *run) {
    int32_t expert_total[EXPERTS] = {0};
    for (int step = 0; step < STEPS; step++)
        for (int l = 0; l < LAYERS; l++) {
            int used = 0;
            for (int e = 0; e < EXPERTS; e++) {
                used += run->counts[step][l][e] > 0;
                expert_total[e] += run->counts[step][l][e];
            }
            ck_assert_msg(used >= 2, "%s step %d layer %d: routing degenerate (%d experts used)",
                          c->name, step, l, used);
            if (c->router.kind == ROUTER_TOP_P)
                ck_assert(run->slots[step][l] > TOKENS &&
                          run->slots[step][l] < (int64_t)EXPERTS * TOKENS);
        }
    for (int e = 0; e < EXPERTS; e++)
        ck_assert_msg(expert_total[e] > 0, "%s: expert %d never used", c->name, e);
}

static void check_case(const moe_case *c) {
    ck_assert_msg(setup_error[0] == '\0', "fixture: %s", setup_error);
    ck_assert_msg(reference_status == 0,
                  "the PyTorch reference failed (status %d; it needs python3-torch and "
                  "python3-h5py: run scripts/install-deps.sh): %s",
                  reference_status, reference_command);
    lm_model model;
    ag_params params;
    ck_assert_int_eq(build_model(c, &model, &params), CM_OK);
    cmoe_run run;
    memset(&run, 0, sizeof run);
    run_cmoe(c, &model, &params, &run);

    char path[256];
    case_path(path, sizeof path, c, "reference.h5");
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    hid_t file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    ck_assert_msg(file >= 0, "cannot open %s", path);
    double worst_grad = 0.0, worst_param = 0.0;
    for (int step = 0; step < STEPS; step++)
        compare_step(c, file, &run, &params, step, &worst_grad);
    ck_assert_double_gt(fabs(run.loss[0] - run.loss[STEPS - 1]), 1e-3); /* it trained */

    int frozen = 0;
    for (int i = 0; i < params.count; i++) {
        ag_param *p = params.items[i];
        const int64_t n = p->tensor.numel;
        char name[192];
        snprintf(name, sizeof name, "params_after/%s", p->name);
        double *want = parity_read_doubles(file, name, n);
        double error = parity_relative_error(p->tensor.data, want, n);
        worst_param = fmax(worst_param, error);
        ck_assert_msg(error < TOLERANCE, "%s: %s after %d AdamW steps differs by %.3e", c->name,
                      p->name, STEPS, error);
        free(want);
        if (must_be_frozen(c, p)) {
            frozen++;
            ck_assert_msg(memcmp(p->tensor.data, run.initial[p->group] + p->offset,
                                 (size_t)n * sizeof(float)) == 0,
                          "%s: the frozen %s changed during training", c->name, p->name);
        }
    }
    ck_assert_int_eq(frozen, c->router.kind == ROUTER_SMOE_DROPOUT ? LAYERS : 0);
    /* Learned noise: each layer's W_noise exists and gets a gradient (the
     * comparison above would also pass on zeros). */
    int noise_weights = 0;
    for (int i = 0; i < params.count; i++) {
        ag_param *p = params.items[i];
        if (!strstr(p->name, ".router.noise_weight")) continue;
        noise_weights++;
        double grad = 0.0;
        for (int64_t j = 0; j < p->tensor.numel; j++)
            grad += fabs(run.grads[0][p->group][p->offset + j]);
        ck_assert_msg(grad > 1e-6, "%s: %s gets no gradient", c->name, p->name);
    }
    ck_assert_int_eq(noise_weights, c->router.noise == ROUTER_NOISE_LEARNED ? LAYERS : 0);
    check_routing_not_degenerate(c, &run);
    printf("parity %s: %d parameters, worst gradient error %.2e over %d steps, worst parameter "
           "error after them %.2e, slots per layer at step 0: %lld, %lld\n",
           c->name, params.count, worst_grad, STEPS, worst_param, (long long)run.slots[0][0],
           (long long)run.slots[0][1]);
    H5Fclose(file);
    free_run(&run);
    ag_params_free(&params);
}

START_TEST(test_moe_lm_matches_pytorch) {
    check_case(&CASES[_i]);
}
END_TEST

int main(void) {
    Suite *suite = suite_create("parity_moe");
    TCase *tc = tcase_create("pytorch");
    /* Unchecked: runs once, before the tests, in the runner process. */
    tcase_add_unchecked_fixture(tc, setup_reference, teardown_reference);
    tcase_add_loop_test(tc, test_moe_lm_matches_pytorch, 0, N_CASES);
    tcase_set_timeout(tc, 300);
    suite_add_tcase(suite, tc);
    SRunner *runner = srunner_create(suite);
    srunner_run_all(runner, CK_NORMAL);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
