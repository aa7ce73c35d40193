/* The moe and router recipe sections: the MoE recipes in recipes/lm/ (each
 * loads, changes only name, moe, router and the arena relative to
 * dense.yaml), the defaults, every moe/router cross-key error with its exact
 * file:line:col or --set message (and which key it blames), and the
 * recipe_moe.h helpers that turn a recipe into router_config / moe_config.
 * The print -> load round trip and the docs check over these keys are in
 * test_recipe.c. */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "layers/moe.h"
#include "optim/optim.h"
#include "routers/router.h"
#include "train/recipe.h"
#include "train/recipe_moe.h"

/* The repository root, from this file's path (absolute in CMake builds). */
static void source_path(char *buffer, size_t capacity, const char *relative) {
    const char *file = __FILE__;
    const char *suffix = strstr(file, "tests/test_recipe_moe.c");
    ck_assert_msg(suffix != NULL, "cannot locate the source tree from %s", file);
    snprintf(buffer, capacity, "%.*s%s", (int)(suffix - file), file, relative);
}

static cm_recipe load_ok(const char *path, const char *const *overrides, int n_overrides) {
    cm_recipe recipe;
    cm_status status = recipe_load(path, overrides, n_overrides, &recipe);
    ck_assert_msg(status == CM_OK, "loading %s failed: %s", path ? path : "(defaults)",
                  cm_error_message());
    return recipe;
}

static cm_recipe load_lm(const char *file, const char *const *overrides, int n_overrides) {
    char relative[128], path[1024];
    snprintf(relative, sizeof relative, "recipes/lm/%s", file);
    source_path(path, sizeof path, relative);
    return load_ok(path, overrides, n_overrides);
}

/* `text` (labelled inline.yaml) plus `overrides` must fail with `expected`. */
static void expect_error(const char *text, const char *const *overrides, int n_overrides,
                         const char *expected) {
    cm_recipe recipe;
    cm_status status = recipe_load_text(text, "inline.yaml", overrides, n_overrides, &recipe);
    ck_assert_msg(status == CM_ERR_INVALID, "[%s]: expected invalid, got '%s' (%s)", text,
                  cm_status_name(status), cm_error_message());
    ck_assert_msg(strcmp(cm_error_message(), expected) == 0,
                  "[%s]:\n  expected: %s\n  got:      %s", text, expected, cm_error_message());
}

/* ---- the recipes ------------------------------------------------------------------ */

/* Everything but name, moe, router and train.arena_mib equals dense.yaml. */
static void assert_dense_elsewhere(const cm_recipe *recipe, const cm_recipe *dense, int arena_mib) {
    ck_assert(memcmp(&recipe->model, &dense->model, sizeof dense->model) == 0);
    ck_assert(memcmp(&recipe->data, &dense->data, sizeof dense->data) == 0);
    ck_assert(memcmp(&recipe->optim, &dense->optim, sizeof dense->optim) == 0);
    ck_assert(memcmp(&recipe->schedule, &dense->schedule, sizeof dense->schedule) == 0);
    ck_assert(memcmp(&recipe->checkpoint, &dense->checkpoint, sizeof dense->checkpoint) == 0);
    ck_assert(memcmp(&recipe->eval, &dense->eval, sizeof dense->eval) == 0);
    cm_train_cfg train = recipe->train;
    ck_assert_int_eq(train.arena_mib, arena_mib);
    train.arena_mib = dense->train.arena_mib;
    ck_assert(memcmp(&train, &dense->train, sizeof train) == 0);
    ck_assert(recipe->moe.enabled);
}

/* null-experts.yaml and bias-balance.yaml: moe-top2.yaml's model, another router. */
START_TEST(test_routing_recipes) {
    cm_recipe top2 = load_lm("moe-top2.yaml", NULL, 0);
    cm_recipe nulls = load_lm("null-experts.yaml", NULL, 0);
    cm_recipe bias = load_lm("bias-balance.yaml", NULL, 0);
    ck_assert_str_eq(nulls.name, "null-experts");
    ck_assert_str_eq(bias.name, "bias-balance");
    for (int i = 0; i < 2; i++) {
        const cm_recipe *r = i ? &bias : &nulls;
        ck_assert(memcmp(&r->model, &top2.model, sizeof top2.model) == 0);
        ck_assert(memcmp(&r->moe, &top2.moe, sizeof top2.moe) == 0);
        ck_assert(memcmp(&r->data, &top2.data, sizeof top2.data) == 0);
        ck_assert(memcmp(&r->optim, &top2.optim, sizeof top2.optim) == 0);
        ck_assert_int_eq(r->router.gating, ROUTER_TOPK_THEN_SOFTMAX);
        ck_assert_double_eq(r->router.capacity_factor, 0.0);
    }
    ck_assert_int_eq(nulls.router.type, ROUTER_NULL_EXPERTS);
    ck_assert_int_eq(nulls.router.k, 3);
    ck_assert_int_eq(nulls.router.null_experts, 4);
    ck_assert_double_eq(nulls.router.aux_loss_coef, 1e-2);
    /* 2 true experts per token under balance: 3 x 8 / 12 */
    ck_assert_int_eq(nulls.router.k * nulls.moe.num_experts,
                     top2.router.k * (nulls.moe.num_experts + nulls.router.null_experts));
    ck_assert_int_eq(bias.router.type, ROUTER_BIAS_BALANCE);
    ck_assert_int_eq(bias.router.k, 2);
    ck_assert_double_eq(bias.router.bias_update_rate, 1e-3);
    ck_assert_double_eq(bias.router.aux_loss_coef, 0.0);
}
END_TEST

START_TEST(test_lm_recipes) {
    cm_recipe dense = load_lm("dense.yaml", NULL, 0);
    ck_assert(!dense.moe.enabled);
    ck_assert(!recipe_layer_is_moe(&dense, 0));
    router_config config;

    cm_recipe top2 = load_lm("moe-top2.yaml", NULL, 0);
    ck_assert_str_eq(top2.name, "moe-top2");
    assert_dense_elsewhere(&top2, &dense, 1280);
    ck_assert_int_eq(top2.moe.num_experts, 8);
    ck_assert_int_eq(top2.moe.every, 1);
    ck_assert(top2.moe.split_dense);
    ck_assert_int_eq(recipe_expert_hidden(&top2), 128); /* 1024 / 8: dense's parameters */
    ck_assert_int_eq(top2.router.type, ROUTER_TOPK);
    ck_assert_int_eq(top2.router.k, 2);
    ck_assert_int_eq(top2.router.gating, ROUTER_TOPK_THEN_SOFTMAX);
    ck_assert_double_eq(top2.router.aux_loss_coef, 1e-2);
    ck_assert_double_eq(top2.router.capacity_factor, 0.0);
    for (int layer = 0; layer < 4; layer++) ck_assert(recipe_layer_is_moe(&top2, layer));

    cm_recipe switch_top1 = load_lm("switch.yaml", NULL, 0);
    ck_assert_str_eq(switch_top1.name, "switch");
    assert_dense_elsewhere(&switch_top1, &dense, 1024);
    ck_assert_int_eq(switch_top1.router.type, ROUTER_TOPK);
    ck_assert_int_eq(switch_top1.router.k, 1);
    ck_assert_int_eq(switch_top1.router.gating, ROUTER_SOFTMAX_THEN_TOPK); /* gate = p_i */
    ck_assert_double_eq(switch_top1.router.aux_loss_coef, 1e-2);
    ck_assert_int_eq(recipe_expert_hidden(&switch_top1), 1024);
    ck_assert(recipe_layer_is_moe(&switch_top1, 0) && !recipe_layer_is_moe(&switch_top1, 1) &&
              recipe_layer_is_moe(&switch_top1, 2) && !recipe_layer_is_moe(&switch_top1, 3));

    cm_recipe smoe = load_lm("smoe-dropout.yaml", NULL, 0);
    ck_assert_str_eq(smoe.name, "smoe-dropout");
    assert_dense_elsewhere(&smoe, &dense, 3072);
    ck_assert_int_eq(smoe.router.type, ROUTER_SMOE_DROPOUT);
    ck_assert_int_eq(smoe.router.gating, ROUTER_TOPK_THEN_SOFTMAX);
    ck_assert_double_eq(smoe.router.aux_loss_coef, 0.0);
    ck_assert_int_eq(recipe_expert_hidden(&smoe), 128);
    recipe_router_config(&smoe, &config);
    ck_assert_int_eq(config.kind, ROUTER_SMOE_DROPOUT);
    ck_assert_int_eq(config.k, 2); /* sparse evaluation */
    ck_assert_int_eq(config.k_schedule.mode, ROUTER_K_LINEAR_INCREASE);
    ck_assert_int_eq(config.k_schedule.k_min, 2);
    ck_assert_int_eq(config.k_schedule.k_max, 8);
    ck_assert_int_eq(config.k_schedule.total_steps, 2000); /* k_span_steps 0: train.steps */
    ck_assert_int_eq(router_k_at(&config.k_schedule, 0), 2);
    ck_assert_int_eq(router_k_at(&config.k_schedule, 1000), 5);
    ck_assert_int_eq(router_k_at(&config.k_schedule, 2000), 8);
    /* A shorter run still ends at all experts. */
    const char *short_run[] = {"train.steps=300", "schedule.warmup_steps=30"};
    cm_recipe smoe_short = load_lm("smoe-dropout.yaml", short_run, 2);
    recipe_router_config(&smoe_short, &config);
    ck_assert_int_eq(config.k_schedule.total_steps, 300);
    ck_assert_int_eq(router_k_at(&config.k_schedule, 300), 8);

    cm_recipe thor = load_lm("thor.yaml", NULL, 0);
    ck_assert_str_eq(thor.name, "thor");
    /* THOR accumulates 8 micro-batches of 2 (the release's --update-freq 8):
     * the same sequences per update as dense.yaml */
    ck_assert_int_eq(thor.train.grad_accum, 8);
    ck_assert_int_eq(thor.data.batch_size * thor.train.grad_accum, dense.data.batch_size);
    cm_recipe thor_per_update = thor;
    thor_per_update.data.batch_size = dense.data.batch_size;
    thor_per_update.train.grad_accum = 1;
    assert_dense_elsewhere(&thor_per_update, &dense, 512);
    ck_assert_int_eq(thor.router.type, ROUTER_THOR);
    ck_assert_int_eq(thor.moe.num_experts, 4);
    ck_assert_int_eq(thor.moe.every, 2);
    ck_assert_int_eq(recipe_expert_hidden(&thor), 1024);
    ck_assert_double_eq(thor.router.thor_alpha, 5.0);
    ck_assert_int_eq(thor.router.thor_level, ROUTER_THOR_PER_SEQUENCE);

    cm_recipe top_p = load_lm("top-p.yaml", NULL, 0);
    ck_assert_str_eq(top_p.name, "top-p");
    assert_dense_elsewhere(&top_p, &dense, 3072);
    ck_assert_int_eq(top_p.router.type, ROUTER_TOP_P);
    ck_assert_double_eq(top_p.router.top_p, 0.4);
    ck_assert_double_eq(top_p.router.entropy_coef, 1e-4);
    ck_assert_double_eq(top_p.router.aux_loss_coef, 1e-2);

    cm_recipe choice = load_lm("expert-choice.yaml", NULL, 0);
    ck_assert_str_eq(choice.name, "expert-choice");
    assert_dense_elsewhere(&choice, &dense, 1280);
    ck_assert_int_eq(choice.router.type, ROUTER_EXPERT_CHOICE);
    ck_assert_double_eq(choice.router.capacity_factor, 2.0);

    /* Every recipe's router and layer configs pass the router's own checks. */
    const cm_recipe *all[] = {&top2, &switch_top1, &smoe, &smoe_short, &thor, &top_p, &choice};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) {
        moe_config layer_config;
        recipe_moe_config(all[i], &layer_config);
        ag_params params;
        ag_params_init(&params);
        moe_layer layer;
        cm_status status = moe_declare(&layer, &layer_config, 0, &params, "blocks.0.moe");
        ck_assert_msg(status == CM_OK, "%s: %s", all[i]->name, cm_error_message());
        ag_params_free(&params);
    }
}
END_TEST

START_TEST(test_defaults) {
    cm_recipe r;
    recipe_defaults(&r);
    ck_assert(!r.moe.enabled);
    ck_assert_int_eq(r.moe.num_experts, 8);
    ck_assert_int_eq(r.moe.every, 1);
    ck_assert_int_eq(r.moe.expert_hidden, 0);
    ck_assert(!r.moe.split_dense);
    ck_assert_int_eq(r.moe.activation, AG_ACT_GELU);
    ck_assert_int_eq(r.router.type, ROUTER_TOPK);
    ck_assert_int_eq(r.router.k, 2);
    ck_assert_int_eq(r.router.gating, ROUTER_SOFTMAX_THEN_TOPK);
    ck_assert(!r.router.bias);
    ck_assert_int_eq(r.router.noise, ROUTER_NOISE_NONE);
    ck_assert_int_eq(r.router.aux_loss_scope, ROUTER_AUX_GLOBAL);
    ck_assert_double_eq(r.router.init_std, 0.02);
    ck_assert_double_eq(r.router.noise_std, 1.0);
    ck_assert_double_eq(r.router.aux_loss_coef, 1e-2);
    ck_assert_double_eq(r.router.z_loss_coef, 0.0);
    ck_assert_double_eq(r.router.top_p, 0.4);
    ck_assert_double_eq(r.router.entropy_coef, 1e-4);
    ck_assert_double_eq(r.router.capacity_factor, 0.0);
    ck_assert_int_eq(r.router.drop_policy, ROUTER_DROP_PROBABILITY);
    ck_assert_int_eq(r.router.k_schedule, ROUTER_K_CONSTANT);
    ck_assert_int_eq(r.router.k_min, 2);
    ck_assert_int_eq(r.router.k_max, 0);
    ck_assert_int_eq(r.router.k_span_steps, 0);
    ck_assert_double_eq(r.router.thor_alpha, 1.0);
    ck_assert_int_eq(r.router.thor_level, ROUTER_THOR_PER_SEQUENCE);
    ck_assert_int_eq(r.router.eval_k, 0);
    ck_assert_int_eq(recipe_expert_hidden(&r), 1024); /* d_ff */
    for (int layer = 0; layer < 4; layer++) ck_assert(!recipe_layer_is_moe(&r, layer));

    /* The defaults pass the cross-key checks with MoE on. */
    const char *on[] = {"moe.enabled=true"};
    cm_recipe enabled = load_ok(NULL, on, 1);
    ck_assert(enabled.moe.enabled);
    for (int layer = 0; layer < 4; layer++) ck_assert(recipe_layer_is_moe(&enabled, layer));
}
END_TEST

/* ---- cross-key checks -------------------------------------------------------------- */

START_TEST(test_consistency_messages) {
    const struct {
        const char *text;
        const char *message;
    } cases[] = {
        {"moe:\n  enabled: true\n  num_experts: 3\n  split_dense: true\n",
         "inline.yaml:4:16: moe.split_dense needs model.d_ff = 1024 to be divisible by "
         "moe.num_experts = 3"},
        {"moe:\n  enabled: true\n  split_dense: true\n  expert_hidden: 100\n",
         "inline.yaml:4:18: moe.expert_hidden = 100 contradicts moe.split_dense (model.d_ff / "
         "moe.num_experts = 128); set expert_hidden to 0 or split_dense to false"},
        {"moe:\n  enabled: true\n  num_experts: 4\nrouter:\n  k: 5\n",
         "inline.yaml:5:6: router.k = 5 exceeds moe.num_experts = 4 (router.type topk)"},
        {"moe:\n  enabled: true\nrouter:\n  k: 9\n  type: smoe_dropout\n",
         "inline.yaml:5:9: router.k = 9 exceeds moe.num_experts = 8 (router.type smoe_dropout)"},
        {"moe:\n  enabled: true\nrouter:\n  type: top_p\n  eval_k: 9\n",
         "inline.yaml:5:11: router.eval_k = 9 exceeds moe.num_experts = 8"},
        {"moe:\n  enabled: true\nrouter:\n  type: smoe_dropout\n  k_max: 9\n",
         "inline.yaml:5:10: router.k_max = 9 exceeds moe.num_experts = 8 (router.type "
         "smoe_dropout)"},
        {"moe:\n  enabled: true\nrouter:\n  type: smoe_dropout\n  k_max: 3\n  k_min: 4\n",
         "inline.yaml:6:10: router.k_min = 4 is above router.k_max = 3 (router.type "
         "smoe_dropout)"},
        {"moe:\n  enabled: true\nrouter:\n  type: smoe_dropout\n  k_min: 9\n",
         "inline.yaml:5:10: router.k_min = 9 is above router.k_max (0: moe.num_experts = 8; "
         "router.type smoe_dropout)"},
        {"moe:\n  enabled: true\nrouter:\n  type: expert_choice\n",
         "inline.yaml:4:9: router.type expert_choice needs router.capacity_factor > 0 (each "
         "expert takes T * capacity_factor / num_experts tokens; 2 is the usual value)"},
        {"moe:\n  enabled: true\nrouter:\n  type: smoe_dropout\n  noise: learned\n",
         "inline.yaml:5:10: router.noise learned needs a trained router network (router.type "
         "smoe_dropout has none)"},
        {"moe:\n  enabled: true\nrouter:\n  type: null_experts\n  null_experts: 2\n  k: 11\n",
         "inline.yaml:6:6: router.k = 11 exceeds moe.num_experts + router.null_experts = 10 "
         "(router.type null_experts)"},
        {"moe:\n  enabled: true\nrouter:\n  type: null_experts\n  eval_k: 10\n",
         "inline.yaml:5:11: router.eval_k = 10 exceeds moe.num_experts + router.null_experts = 8 "
         "(router.type null_experts)"},
        {"moe:\n  enabled: true\nrouter:\n  type: null_experts\n  noise: fixed\n",
         "inline.yaml:5:10: router.type null_experts routes without logit noise"},
        {"router:\n  bias_update_rate: 2\n",
         "inline.yaml:2:21: router.bias_update_rate = 2 is out of range [0, 1]"},
        {"moe:\n  enabled: true\nrouter:\n  noise: learned\n  type: thor\n",
         "inline.yaml:5:9: router.noise learned needs a trained router network (router.type "
         "thor has none)"},
        /* Ranges need no cross-key check. */
        {"router:\n  top_p: 0\n", "inline.yaml:2:10: router.top_p = 0 is out of range (0, 1]"},
        {"router:\n  top_p: 1.5\n", "inline.yaml:2:10: router.top_p = 1.5 is out of range (0, 1]"},
        {"moe:\n  every: 0\n", "inline.yaml:2:10: moe.every = 0 is out of range [1, 1024]"},
        {"moe:\n  num_experts: 0\n",
         "inline.yaml:2:16: moe.num_experts = 0 is out of range [1, 65536]"},
        {"router:\n  capacity_factor: -1\n",
         "inline.yaml:2:20: router.capacity_factor = -1 is out of range [0, 1000]"},
        {"router:\n  type: switch\n",
         "inline.yaml:2:9: unknown value 'switch' for router.type; valid values: topk, "
         "smoe_dropout, thor, top_p, expert_choice, null_experts, bias_balance, rmoe"},
        {"router:\n  k_schedule: linear\n",
         "inline.yaml:2:15: unknown value 'linear' for router.k_schedule; valid values: "
         "constant, linear_increase, cosine_increase, exp_increase, multi_step_increase"},
        {"moe:\n  activation: silo\n",
         "inline.yaml:2:15: unknown value 'silo' for moe.activation (did you mean 'silu'?); "
         "valid values: gelu, relu, silu, swiglu"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        expect_error(cases[i].text, NULL, 0, cases[i].message);
}
END_TEST

START_TEST(test_consistency_blame) {
    /* The same contradiction is reported at whichever involved key was set
     * last: here num_experts, after router.k. */
    expect_error("router:\n  k: 5\nmoe:\n  enabled: true\n  num_experts: 4\n", NULL, 0,
                 "inline.yaml:5:16: router.k = 5 exceeds moe.num_experts = 4 (router.type topk)");
    const char *fewer[] = {"moe.num_experts=2"};
    expect_error("moe:\n  enabled: true\nrouter:\n  k: 4\n", fewer, 1,
                 "--set moe.num_experts=2: router.k = 4 exceeds moe.num_experts = 2 (router.type "
                 "topk)");
    /* Switching the type last blames the type. */
    expect_error("moe:\n  enabled: true\nrouter:\n  k_max: 9\n  type: smoe_dropout\n", NULL, 0,
                 "inline.yaml:5:9: router.k_max = 9 exceeds moe.num_experts = 8 (router.type "
                 "smoe_dropout)");

    /* With moe.enabled false the router section is ignored, contradictions
     * included; turning MoE on exposes them and is blamed for it. */
    const char *broken = "moe:\n  num_experts: 4\nrouter:\n  k: 5\n  type: expert_choice\n";
    cm_recipe recipe;
    ck_assert_int_eq(recipe_load_text(broken, "inline.yaml", NULL, 0, &recipe), CM_OK);
    ck_assert(!recipe.moe.enabled);
    const char *enable[] = {"moe.enabled=true"};
    expect_error(broken, enable, 1,
                 "--set moe.enabled=true: router.type expert_choice needs "
                 "router.capacity_factor > 0 (each expert takes T * capacity_factor / "
                 "num_experts tokens; 2 is the usual value)");
    const char *enable_topk[] = {"moe.enabled=true", "router.type=topk"};
    expect_error(broken, enable_topk, 2,
                 "--set router.type=topk: router.k = 5 exceeds moe.num_experts = 4 (router.type "
                 "topk)");

    /* Types that do not read router.k do not check it (k 2, one expert). */
    const char *const k_unused[] = {"thor", "top_p", "expert_choice"};
    for (size_t i = 0; i < sizeof k_unused / sizeof k_unused[0]; i++) {
        char text[256];
        snprintf(text, sizeof text,
                 "moe:\n  enabled: true\n  num_experts: 1\nrouter:\n  type: %s\n  "
                 "capacity_factor: 2\n",
                 k_unused[i]);
        ck_assert_msg(recipe_load_text(text, "inline.yaml", NULL, 0, &recipe) == CM_OK, "%s: %s",
                      k_unused[i], cm_error_message());
    }

    /* Errors in files that extend the real recipes. */
    char path[1024], fixture[1024], expected[2048];
    source_path(fixture, sizeof fixture, "tests/data/recipes/moe_fewer_experts.yaml");
    snprintf(expected, sizeof expected,
             "%s:7:16: router.k_max = 8 exceeds moe.num_experts = 4 (router.type smoe_dropout)",
             fixture);
    ck_assert_int_eq(recipe_load(fixture, NULL, 0, &recipe), CM_ERR_INVALID);
    ck_assert_str_eq(cm_error_message(), expected);
    source_path(path, sizeof path, "recipes/lm/smoe-dropout.yaml");
    const char *k_max[] = {"router.k_max=16"};
    ck_assert_int_eq(recipe_load(path, k_max, 1, &recipe), CM_ERR_INVALID);
    ck_assert_str_eq(cm_error_message(), "--set router.k_max=16: router.k_max = 16 exceeds "
                                         "moe.num_experts = 8 (router.type smoe_dropout)");
    source_path(path, sizeof path, "recipes/lm/moe-top2.yaml");
    const char *d_ff[] = {"model.d_ff=1020"};
    ck_assert_int_eq(recipe_load(path, d_ff, 1, &recipe), CM_ERR_INVALID);
    ck_assert_str_eq(cm_error_message(), "--set model.d_ff=1020: moe.split_dense needs model.d_ff "
                                         "= 1020 to be divisible by moe.num_experts = 8");
    source_path(path, sizeof path, "recipes/lm/expert-choice.yaml");
    const char *dropless[] = {"router.capacity_factor=0"};
    ck_assert_int_eq(recipe_load(path, dropless, 1, &recipe), CM_ERR_INVALID);
    ck_assert_str_eq(cm_error_message(),
                     "--set router.capacity_factor=0: router.type expert_choice needs "
                     "router.capacity_factor > 0 (each expert takes T * capacity_factor / "
                     "num_experts tokens; 2 is the usual value)");
    /* A valid override of a real recipe: fewer experts, and k_max to match. */
    const char *small[] = {"moe.num_experts=4", "router.k_max=4"};
    source_path(path, sizeof path, "recipes/lm/smoe-dropout.yaml");
    recipe = load_ok(path, small, 2);
    ck_assert_int_eq(recipe_expert_hidden(&recipe), 256);
}
END_TEST

/* ---- recipe_moe.h --------------------------------------------------------------- */

START_TEST(test_router_config_fields) {
    const char *overrides[] = {
        "moe.enabled=true",
        "moe.num_experts=6",
        "router.type=smoe_dropout",
        "router.k=3",
        "router.gating=softmax_topk",
        "router.bias=true",
        "router.init_std=0.05",
        "router.noise=fixed",
        "router.noise_std=0.25",
        "router.aux_loss_coef=0.5",
        "router.aux_loss_scope=local",
        "router.z_loss_coef=0.125",
        "router.top_p=0.75",
        "router.entropy_coef=2",
        "router.capacity_factor=1.5",
        "router.drop_policy=position",
        "router.k_schedule=exp_increase",
        "router.k_min=1",
        "router.k_max=5",
        "router.k_span_steps=600",
        "router.thor_level=per_token",
        "router.thor_alpha=0.375",
        "train.steps=900",
    };
    cm_recipe r = load_ok(NULL, overrides, (int)(sizeof overrides / sizeof overrides[0]));
    router_config c;
    memset(&c, 0x5a, sizeof c);
    recipe_router_config(&r, &c);
    ck_assert_int_eq(c.kind, ROUTER_SMOE_DROPOUT);
    ck_assert_int_eq(c.num_experts, 6);
    ck_assert_int_eq(c.k, 3);
    ck_assert_int_eq(c.gating, ROUTER_SOFTMAX_THEN_TOPK);
    ck_assert(c.bias);
    ck_assert_float_eq(c.init_std, 0.05f);
    ck_assert_int_eq(c.noise, ROUTER_NOISE_FIXED);
    ck_assert_float_eq(c.noise_std, 0.25f);
    ck_assert_float_eq(c.aux_loss_coef, 0.5f);
    ck_assert_int_eq(c.aux_loss_scope, ROUTER_AUX_LOCAL);
    ck_assert_float_eq(c.z_loss_coef, 0.125f);
    ck_assert_float_eq(c.top_p, 0.75f);
    ck_assert_float_eq(c.entropy_coef, 2.0f);
    ck_assert_float_eq(c.capacity_factor, 1.5f);
    ck_assert_int_eq(c.drop_policy, ROUTER_DROP_POSITION);
    ck_assert_int_eq(c.k_schedule.mode, ROUTER_K_EXP_INCREASE);
    ck_assert_int_eq(c.k_schedule.k_min, 1);
    ck_assert_int_eq(c.k_schedule.k_max, 5);
    ck_assert_int_eq(c.k_schedule.total_steps, 600); /* k_span_steps, not train.steps */
    ck_assert_int_eq(c.thor_level, ROUTER_THOR_PER_TOKEN);
    ck_assert_float_eq(c.consistency_alpha, 0.375f);
    const char *new_keys[] = {"moe.enabled=true", "router.type=null_experts",
                              "router.null_experts=5", "router.bias_update_rate=0.25",
                              "router.k=9"};
    r = load_ok(NULL, new_keys, 5);
    recipe_router_config(&r, &c);
    ck_assert_int_eq(c.kind, ROUTER_NULL_EXPERTS);
    ck_assert_int_eq(c.null_experts, 5);
    ck_assert_float_eq(c.bias_update_rate, 0.25f);
    ck_assert_int_eq(router_choices(&c), 13);

    /* k_max 0 is num_experts; k_span_steps 0 is train.steps. */
    const char *open_ended[] = {"moe.num_experts=6", "router.k_max=0", "router.k_span_steps=0",
                                "train.steps=900", "router.k_schedule=linear_increase"};
    r = load_ok(NULL, open_ended, 5);
    recipe_router_config(&r, &c);
    ck_assert_int_eq(c.k_schedule.k_max, 6);
    ck_assert_int_eq(c.k_schedule.total_steps, 900);
    ck_assert_int_eq(c.k_schedule.mode, ROUTER_K_LINEAR_INCREASE);
    ck_assert_int_eq(c.gating, ROUTER_SOFTMAX_THEN_TOPK);
    ck_assert_int_eq(c.drop_policy, ROUTER_DROP_PROBABILITY);
    ck_assert_int_eq(c.thor_level, ROUTER_THOR_PER_SEQUENCE);
    ck_assert(!c.bias);
    ck_assert_int_eq(c.noise, ROUTER_NOISE_NONE);
    ck_assert_int_eq(c.aux_loss_scope, ROUTER_AUX_GLOBAL);
}
END_TEST

/* Index of `section.key` in the key table, for its enum names. */
static const char *const *enum_names_of(const char *section, const char *key) {
    for (int i = 0; i < recipe_key_count(); i++) {
        cm_recipe_key_info info = recipe_key_info(i);
        if (!strcmp(info.section, section) && !strcmp(info.key, key)) return info.enum_names;
    }
    ck_abort_msg("no key %s.%s", section, key);
    return NULL;
}

/* Every enum key spells its values with the name table of the module that
 * owns the enum: one table per concept. */
START_TEST(test_enum_keys_use_owner_tables) {
    const struct {
        const char *section, *key;
        const char *const *names;
    } keys[] = {
        {"moe", "activation", ag_activation_names},
        {"moe", "cnn_routing", moe_cnn_routing_names},
        {"router", "type", router_kind_names},
        {"router", "gating", router_gating_names},
        {"router", "drop_policy", router_drop_policy_names},
        {"router", "k_schedule", router_k_mode_names},
        {"router", "thor_level", router_thor_level_names},
        {"optim", "type", optim_kind_names},
        {"schedule", "type", optim_lr_kind_names},
        {"adversarial", "mode", adv_mode_names},
        {"adversarial", "router_objective", adv_router_objective_names},
    };
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++)
        ck_assert_msg(enum_names_of(keys[i].section, keys[i].key) == keys[i].names,
                      "%s.%s does not use its owner's name table", keys[i].section, keys[i].key);
}
END_TEST

START_TEST(test_enum_names_match) {
    /* Each router.type and moe.activation name reaches the method and the
     * activation of the same name in the router and layer modules. */
    const char *const *types = enum_names_of("router", "type");
    int n_types = 0;
    for (; types[n_types]; n_types++) {
        char set_type[64];
        snprintf(set_type, sizeof set_type, "router.type=%s", types[n_types]);
        const char *overrides[] = {set_type, "router.capacity_factor=2"};
        cm_recipe r = load_ok(NULL, overrides, 2);
        router_config c;
        recipe_router_config(&r, &c);
        ck_assert_str_eq(router_kind_name(c.kind), types[n_types]);
    }
    ck_assert_int_eq(n_types, ROUTER_KIND_COUNT);
    const char *const *activations = enum_names_of("moe", "activation");
    int n_activations = 0;
    for (; activations[n_activations]; n_activations++) {
        char set_activation[64];
        snprintf(set_activation, sizeof set_activation, "moe.activation=%s",
                 activations[n_activations]);
        const char *overrides[] = {set_activation};
        cm_recipe r = load_ok(NULL, overrides, 1);
        moe_config c;
        recipe_moe_config(&r, &c);
        ck_assert_str_eq(ag_activation_names[c.activation], activations[n_activations]);
    }
    ck_assert_int_eq(n_activations, AG_ACT_COUNT);
    /* The k schedules (k 2 -> 8 over 100 steps): the mode is the one of the
     * same name, step by step, and k halfway matches the formulas of optim.h. */
    const struct {
        const char *name;
        router_k_mode mode;
        int k_at_50;
    } schedules[] = {
        {"constant", ROUTER_K_CONSTANT, 8},                       /* k_max throughout */
        {"linear_increase", ROUTER_K_LINEAR_INCREASE, 5},         /* round(6 * 0.5) + 2 */
        {"cosine_increase", ROUTER_K_COSINE_INCREASE, 4},         /* 8 + round(-6 cos(pi / 4)) */
        {"exp_increase", ROUTER_K_EXP_INCREASE, 4},               /* 8 + round(-6 * 0.99^50) */
        {"multi_step_increase", ROUTER_K_MULTI_STEP_INCREASE, 4}, /* [1,2,4,8,16][2] */
    };
    const char *const *names = enum_names_of("router", "k_schedule");
    for (size_t i = 0; i < sizeof schedules / sizeof schedules[0]; i++) {
        ck_assert_str_eq(names[i], schedules[i].name);
        char set_schedule[64];
        snprintf(set_schedule, sizeof set_schedule, "router.k_schedule=%s", schedules[i].name);
        const char *overrides[] = {"router.type=smoe_dropout", set_schedule, "train.steps=100"};
        cm_recipe r = load_ok(NULL, overrides, 3);
        router_config c;
        recipe_router_config(&r, &c);
        ck_assert_msg(router_k_at(&c.k_schedule, 50) == schedules[i].k_at_50, "%s: k(50) = %d",
                      schedules[i].name, router_k_at(&c.k_schedule, 50));
        ck_assert_int_eq(c.k_schedule.mode, schedules[i].mode);
        router_k_schedule expected = {schedules[i].mode, 2, 8, 100};
        for (int64_t step = 0; step <= 120; step++)
            ck_assert_int_eq(router_k_at(&c.k_schedule, step), router_k_at(&expected, step));
    }
}
END_TEST

START_TEST(test_moe_config) {
    const char *overrides[] = {"moe.enabled=true", "moe.num_experts=4",  "moe.split_dense=true",
                               "model.d_ff=512",   "model.n_layers=8",   "model.init_std=0.04",
                               "moe.every=3",      "moe.activation=relu"};
    cm_recipe r = load_ok(NULL, overrides, 8);
    moe_config c;
    recipe_moe_config(&r, &c);
    ck_assert_int_eq(c.d_model, 256);
    ck_assert_int_eq(c.hidden, 128);
    ck_assert_int_eq(c.activation, AG_ACT_RELU);
    ck_assert_float_eq(c.init_std, 0.04f);
    ck_assert_float_eq_tol(c.out_std, 0.04f / 4.0f, 1e-7f); /* 0.04 / sqrt(2 * 8) */
    ck_assert_int_eq(c.router.num_experts, 4);
    ck_assert_int_eq(c.router.kind, ROUTER_TOPK);
    bool expected_moe[8] = {true, false, false, true, false, false, true, false};
    for (int layer = 0; layer < 8; layer++)
        ck_assert_int_eq(recipe_layer_is_moe(&r, layer), expected_moe[layer]);

    /* Without scale_residual_init both matrices use init_std; an explicit
     * expert_hidden wins over d_ff when split_dense is off. */
    const char *plain[] = {"model.scale_residual_init=false", "moe.expert_hidden=96"};
    r = load_ok(NULL, plain, 2);
    recipe_moe_config(&r, &c);
    ck_assert_float_eq(c.out_std, c.init_std);
    ck_assert_int_eq(c.hidden, 96);
    ck_assert_int_eq(recipe_expert_hidden(&r), 96);
    /* With split_dense, expert_hidden may repeat the split width. */
    const char *same[] = {"moe.enabled=true", "moe.split_dense=true", "moe.expert_hidden=128"};
    r = load_ok(NULL, same, 3);
    ck_assert_int_eq(recipe_expert_hidden(&r), 128);
}
END_TEST

int main(void) {
    Suite *suite = suite_create("recipe_moe");
    TCase *tc = tcase_create("recipe_moe");
    tcase_add_test(tc, test_lm_recipes);
    tcase_add_test(tc, test_routing_recipes);
    tcase_add_test(tc, test_defaults);
    tcase_add_test(tc, test_consistency_messages);
    tcase_add_test(tc, test_consistency_blame);
    tcase_add_test(tc, test_router_config_fields);
    tcase_add_test(tc, test_enum_keys_use_owner_tables);
    tcase_add_test(tc, test_enum_names_match);
    tcase_add_test(tc, test_moe_config);
    suite_add_tcase(suite, tc);
    SRunner *runner = srunner_create(suite);
    srunner_run_all(runner, CK_NORMAL);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
