/* Recipe loading (src/train/recipe.c): recipes/lm/dense.yaml, defaults, base:
 * chains, --set overrides, every kind of error with its exact file:line:col
 * message, cross-key checks, print -> load round trip over every key, and the
 * key reference in docs/recipes.md. Fixtures live in tests/data/recipes/.
 * The moe and router sections (their recipes, checks and the recipe_moe.h
 * helpers) are tested in test_recipe_moe.c; the round trip and the docs check
 * here cover their keys too. */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "train/recipe.h"

/* The repository root, from this file's path (absolute in CMake builds). */
static void source_path(char *buffer, size_t capacity, const char *relative) {
    const char *file = __FILE__;
    const char *suffix = strstr(file, "tests/test_recipe.c");
    ck_assert_msg(suffix != NULL, "cannot locate the source tree from %s", file);
    snprintf(buffer, capacity, "%.*s%s", (int)(suffix - file), file, relative);
}

static void fixture_path(char *buffer, size_t capacity, const char *name) {
    char relative[256];
    snprintf(relative, sizeof relative, "tests/data/recipes/%s", name);
    source_path(buffer, capacity, relative);
}

static cm_recipe load_ok(const char *path, const char *const *overrides, int n_overrides) {
    cm_recipe recipe;
    cm_status status = recipe_load(path, overrides, n_overrides, &recipe);
    ck_assert_msg(status == CM_OK, "loading %s failed: %s", path ? path : "(defaults)",
                  cm_error_message());
    return recipe;
}

/* Loads fixture `name` with `overrides` and expects `code` and the message
 * "<fixture path><expected>" exactly. */
static void expect_fixture_error(const char *name, const char *const *overrides, int n_overrides,
                                 cm_status code, const char *expected) {
    char path[1024], full[2048];
    fixture_path(path, sizeof path, name);
    snprintf(full, sizeof full, "%s%s", path, expected);
    cm_recipe recipe;
    cm_status status = recipe_load(path, overrides, n_overrides, &recipe);
    ck_assert_msg(status == code, "%s: expected status '%s', got '%s' (%s)", name,
                  cm_status_name(code), cm_status_name(status), cm_error_message());
    ck_assert_msg(strcmp(cm_error_message(), full) == 0, "%s:\n  expected: %s\n  got:      %s",
                  name, full, cm_error_message());
}

/* Loads `text` labelled "inline.yaml" and expects `code` and `expected` exactly. */
static void expect_text_error(const char *text, cm_status code, const char *expected) {
    cm_recipe recipe;
    cm_status status = recipe_load_text(text, "inline.yaml", NULL, 0, &recipe);
    ck_assert_msg(status == code, "[%s]: expected status '%s', got '%s' (%s)", text,
                  cm_status_name(code), cm_status_name(status), cm_error_message());
    ck_assert_msg(strcmp(cm_error_message(), expected) == 0,
                  "[%s]:\n  expected: %s\n  got:      %s", text, expected, cm_error_message());
}

/* ---- values ----------------------------------------------------------------------- */

START_TEST(test_dense_recipe) {
    char path[1024];
    source_path(path, sizeof path, "recipes/lm/dense.yaml");
    cm_recipe r = load_ok(path, NULL, 0);
    ck_assert_str_eq(r.name, "dense");
    ck_assert_int_eq(r.model.arch, CM_ARCH_TRANSFORMER_LM);
    ck_assert_int_eq(r.model.vocab_size, 256);
    ck_assert_int_eq(r.model.n_layers, 4);
    ck_assert_int_eq(r.model.d_model, 256);
    ck_assert_int_eq(r.model.n_heads, 4);
    ck_assert_int_eq(r.model.d_ff, 1024);
    ck_assert_double_eq(r.model.dropout, 0.1);
    ck_assert_double_eq(r.model.init_std, 0.02);
    ck_assert(r.model.scale_residual_init);
    ck_assert_double_eq(r.model.layernorm_eps, 1e-5); /* default */
    ck_assert_int_eq(r.data.format, CM_DATA_TEXT);
    ck_assert_str_eq(r.data.path, "data/kjv/train.txt");
    ck_assert_str_eq(r.data.valid_path, "data/kjv/valid.txt");
    ck_assert_str_eq(r.data.test_path, "data/kjv/test.txt");
    ck_assert_int_eq(r.data.seq_len, 256);
    ck_assert_int_eq(r.data.batch_size, 16);
    ck_assert_int_eq(r.optim.type, OPTIM_ADAMW);
    ck_assert_double_eq(r.optim.lr, 1e-3);
    ck_assert_double_eq(r.optim.beta1, 0.9);
    ck_assert_double_eq(r.optim.beta2, 0.95);
    ck_assert_double_eq(r.optim.eps, 1e-8);
    ck_assert_double_eq(r.optim.weight_decay, 0.1);
    ck_assert(!r.optim.decay_norms && !r.optim.decay_biases && !r.optim.decay_embeddings);
    ck_assert_double_eq(r.optim.grad_clip, 1.0);
    ck_assert_int_eq(r.schedule.type, OPTIM_LR_COSINE);
    ck_assert_int_eq(r.schedule.warmup_steps, 50);
    ck_assert_double_eq(r.schedule.min_lr, 1e-4);
    ck_assert_int_eq(r.train.steps, 2000);
    ck_assert_int_eq(r.train.seed, 1234);
    ck_assert_int_eq(r.train.log_every, 10);
    ck_assert_int_eq(r.train.eval_every, 200);
    ck_assert_int_eq(r.train.eval_batches, 20);
    ck_assert_int_eq(r.train.arena_mib, 1024);
    ck_assert_int_eq(r.train.threads, 0); /* default */
    ck_assert_int_eq(r.checkpoint.every, 500);
    ck_assert_int_eq(r.checkpoint.keep_last, 3);
    ck_assert_int_eq(r.eval.split, CM_SPLIT_VALID);
    char dir[256];
    ck_assert_int_eq(recipe_run_dir(&r, dir, sizeof dir), CM_OK);
    ck_assert_str_eq(dir, "runs/dense");
    ck_assert_int_eq(recipe_checkpoint_dir(&r, dir, sizeof dir), CM_OK);
    ck_assert_str_eq(dir, "runs/dense");
}
END_TEST

START_TEST(test_defaults) {
    cm_recipe defaults;
    recipe_defaults(&defaults);
    ck_assert_str_eq(defaults.name, "run");
    ck_assert_int_eq(defaults.model.n_layers, 4);
    ck_assert_double_eq(defaults.model.dropout, 0.0);
    ck_assert_int_eq(defaults.optim.type, OPTIM_ADAMW);
    ck_assert_double_eq(defaults.optim.lr, 3e-4);
    ck_assert_double_eq(defaults.optim.beta2, 0.999);
    ck_assert_double_eq(defaults.optim.weight_decay, 0.01);
    ck_assert_double_eq(defaults.optim.grad_clip, 0.0);
    ck_assert_int_eq(defaults.schedule.type, OPTIM_LR_CONSTANT);
    ck_assert_int_eq(defaults.schedule.step_size, 1000);
    ck_assert_double_eq(defaults.schedule.gamma, 0.1);
    ck_assert_int_eq(defaults.train.steps, 2000);
    ck_assert_str_eq(defaults.train.out_dir, "");
    ck_assert_str_eq(defaults.checkpoint.dir, "");
    ck_assert_int_eq(defaults.eval.split, CM_SPLIT_VALID);

    /* No file gives exactly the defaults; an empty file or text (nothing,
     * comments, ~, ---) is refused: it would train the defaults silently. */
    cm_recipe no_file = load_ok(NULL, NULL, 0);
    ck_assert(memcmp(&no_file, &defaults, sizeof defaults) == 0);
    char path[1024];
    fixture_path(path, sizeof path, "empty.yaml");
    cm_recipe empty;
    ck_assert_int_eq(recipe_load(path, NULL, 0, &empty), CM_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(cm_error_message(), "empty.yaml: the recipe is empty"));
    const char *const empty_texts[] = {"", "# only a comment\n", "~\n", "---\n"};
    for (int i = 0; i < 4; i++) {
        ck_assert_int_eq(recipe_load_text(empty_texts[i], "empty", NULL, 0, &empty),
                         CM_ERR_INVALID);
        ck_assert_ptr_nonnull(strstr(cm_error_message(), "the recipe is empty"));
    }
    ck_assert_int_eq(recipe_load_text("name: x\n", "named", NULL, 0, &empty), CM_OK);
    ck_assert_str_eq(empty.name, "x");
}
END_TEST

START_TEST(test_base_inheritance) {
    char parent_path[1024], child_path[1024], grandchild_path[1024];
    fixture_path(parent_path, sizeof parent_path, "parent.yaml");
    fixture_path(child_path, sizeof child_path, "child.yaml");
    fixture_path(grandchild_path, sizeof grandchild_path, "nested/grandchild.yaml");
    cm_recipe parent = load_ok(parent_path, NULL, 0);
    ck_assert_str_eq(parent.name, "parent");
    ck_assert_int_eq(parent.model.n_layers, 2);
    ck_assert_double_eq(parent.optim.lr, 0.01);

    /* The child changes optim.lr and nothing else. */
    cm_recipe child = load_ok(child_path, NULL, 0);
    ck_assert_double_eq(child.optim.lr, 0.002);
    cm_recipe expected = parent;
    expected.optim.lr = 0.002;
    ck_assert(memcmp(&child, &expected, sizeof child) == 0);
    char key[64];
    ck_assert(recipe_first_difference(&parent, &child, key, sizeof key));
    ck_assert_str_eq(key, "optim.lr");

    /* Three levels, across directories: base paths are relative to the file. */
    cm_recipe grandchild = load_ok(grandchild_path, NULL, 0);
    expected = child;
    snprintf(expected.name, sizeof expected.name, "grandchild");
    expected.train.steps = 50;
    ck_assert(memcmp(&grandchild, &expected, sizeof grandchild) == 0);
    ck_assert_int_eq(grandchild.model.d_model, 64); /* from the grandparent */
}
END_TEST

START_TEST(test_base_errors) {
    /* An error inside a base names the base file and its line:col. */
    char broken_base[1024];
    fixture_path(broken_base, sizeof broken_base, "out_of_range.yaml");
    char expected[8192];
    snprintf(expected, sizeof expected, "%s:4:7: optim.lr = -1 is out of range (0, 10]",
             broken_base);
    char path[1024];
    fixture_path(path, sizeof path, "broken_base.yaml");
    cm_recipe recipe;
    ck_assert_int_eq(recipe_load(path, NULL, 0, &recipe), CM_ERR_INVALID);
    ck_assert_str_eq(cm_error_message(), expected);

    char missing[1024];
    fixture_path(missing, sizeof missing, "does_not_exist.yaml");
    snprintf(expected, sizeof expected, ":3:7: cannot open base '%s': No such file or directory",
             missing);
    expect_fixture_error("missing_base.yaml", NULL, 0, CM_ERR_IO, expected);

    /* cycle_a -> cycle_b -> cycle_a, reported where cycle_b names cycle_a. */
    char a[1024], b[1024];
    fixture_path(a, sizeof a, "cycle_a.yaml");
    fixture_path(b, sizeof b, "cycle_b.yaml");
    snprintf(expected, sizeof expected, "%s:2:7: base cycle: %s -> %s -> %s", b, a, b, a);
    ck_assert_int_eq(recipe_load(a, NULL, 0, &recipe), CM_ERR_INVALID);
    ck_assert_str_eq(cm_error_message(), expected);
}
END_TEST

START_TEST(test_set_overrides) {
    char path[1024];
    fixture_path(path, sizeof path, "child.yaml");
    const char *overrides[] = {
        "optim.lr=0.5",       "optim.lr=0.25", /* the last one wins */
        "name=tuned",         "model.dropout=0.2",    "train.steps=7",
        "schedule.type=step", "optim.nesterov=false", "train.out_dir=/tmp/out dir",
        "checkpoint.dir=", /* empty value: an empty string */
    };
    cm_recipe r = load_ok(path, overrides, (int)(sizeof overrides / sizeof overrides[0]));
    ck_assert_double_eq(r.optim.lr, 0.25);
    ck_assert_str_eq(r.name, "tuned");
    ck_assert_double_eq(r.model.dropout, 0.2);
    ck_assert_int_eq(r.train.steps, 7);
    ck_assert_int_eq(r.schedule.type, OPTIM_LR_STEP);
    ck_assert_str_eq(r.train.out_dir, "/tmp/out dir");
    ck_assert_str_eq(r.checkpoint.dir, "");
    ck_assert_int_eq(r.model.d_model, 64); /* still from parent.yaml */
    char dir[256];
    ck_assert_int_eq(recipe_run_dir(&r, dir, sizeof dir), CM_OK);
    ck_assert_str_eq(dir, "/tmp/out dir");
    ck_assert_int_eq(recipe_checkpoint_dir(&r, dir, sizeof dir), CM_OK);
    ck_assert_str_eq(dir, "/tmp/out dir");
    ck_assert_int_eq(recipe_run_dir(&r, dir, 5), CM_ERR_INVALID);

    /* Overrides work without a file too. */
    const char *only[] = {"model.n_layers=12"};
    cm_recipe defaults_plus = load_ok(NULL, only, 1);
    ck_assert_int_eq(defaults_plus.model.n_layers, 12);
}
END_TEST

START_TEST(test_set_errors) {
    const struct {
        const char *override;
        const char *message;
    } cases[] = {
        {"optim.lr=abc", "--set optim.lr=abc: expected a number for optim.lr, got 'abc'"},
        {"optim.lr=-1", "--set optim.lr=-1: optim.lr = -1 is out of range (0, 10]"},
        {"optim.lr=", "--set optim.lr=: expected a number for optim.lr, got ''"},
        {"train.steps=1e3",
         "--set train.steps=1e3: expected an integer for train.steps, got '1e3'"},
        {"train.steps=0",
         "--set train.steps=0: train.steps = 0 is out of range [1, 1000000000000]"},
        {"model.d_model=99999999999",
         "--set model.d_model=99999999999: model.d_model = 99999999999 is out of range [1, 65536]"},
        {"optim.lrr=1",
         "--set optim.lrr=1: unknown key 'lrr' in section 'optim' (did you mean 'lr'?)"},
        {"optimm.lr=1", "--set optimm.lr=1: unknown section 'optimm' (did you mean 'optim'?)"},
        {"nme=x", "--set nme=x: unknown top-level key 'nme' (did you mean 'name'?)"},
        {"optim.lr", "--set optim.lr: expected section.key=value"},
        {"base=x.yaml",
         "--set base=x.yaml: base cannot be overridden; load the other recipe instead"},
        {"optim=1", "--set optim=1: 'optim' is a section; use --set optim.KEY=VALUE"},
        {"optim.type=adam",
         "--set optim.type=adam: unknown value 'adam' for optim.type (did you mean 'adamw'?); "
         "valid values: adamw, sgd"},
        {"eval.split=holdout",
         "--set eval.split=holdout: unknown value 'holdout' for eval.split; valid values: valid, "
         "test, train"},
        {"optim.nesterov=1",
         "--set optim.nesterov=1: expected true or false for optim.nesterov, got '1'"},
        {"name=a/b", "--set name=a/b: bad name 'a/b': use only letters, digits, '.', '_' and '-' "
                     "(it names a directory)"},
        {"data.path=", "--set data.path=: bad data.path '': it must not be empty"},
        {"model.n_heads=3",
         "--set model.n_heads=3: model.d_model = 256 is not divisible by model.n_heads = 3"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        cm_recipe recipe;
        cm_status status = recipe_load(NULL, &cases[i].override, 1, &recipe);
        ck_assert_msg(status == CM_ERR_INVALID, "%s: got status %s", cases[i].override,
                      cm_status_name(status));
        ck_assert_msg(strcmp(cm_error_message(), cases[i].message) == 0,
                      "\n  expected: %s\n  got:      %s", cases[i].message, cm_error_message());
    }
    /* The unknown-key message lists the valid keys when nothing is close. */
    const char *far[] = {"optim.foo=1"};
    cm_recipe recipe;
    ck_assert_int_eq(recipe_load(NULL, far, 1, &recipe), CM_ERR_INVALID);
    ck_assert_str_eq(cm_error_message(),
                     "--set optim.foo=1: unknown key 'foo' in section 'optim'; valid keys: type, "
                     "lr, beta1, beta2, eps, weight_decay, decay_norms, decay_biases, "
                     "decay_embeddings, momentum, nesterov, grad_clip, skip_unused_experts");
    /* A failed load leaves the output untouched. */
    memset(&recipe, 0x5a, sizeof recipe);
    cm_recipe before = recipe;
    ck_assert_int_eq(recipe_load(NULL, far, 1, &recipe), CM_ERR_INVALID);
    ck_assert(memcmp(&recipe, &before, sizeof recipe) == 0);
}
END_TEST

/* ---- file errors ---------------------------------------------------------------- */

START_TEST(test_file_errors) {
    const struct {
        const char *fixture;
        cm_status code;
        const char *message; /* after the fixture's path */
    } cases[] = {
        {"unknown_key.yaml", CM_ERR_INVALID,
         ":5:3: unknown key 'lrr' in section 'optim' (did you mean 'lr'?)"},
        {"unknown_section.yaml", CM_ERR_INVALID,
         ":3:1: unknown section 'optimm' (did you mean 'optim'?)"},
        {"wrong_type.yaml", CM_ERR_INVALID,
         ":4:10: expected an integer for train.steps, got 'abc'"},
        {"wrong_type_number.yaml", CM_ERR_INVALID,
         ":4:7: expected a number for optim.lr, got 'fast'"},
        {"wrong_type_bool.yaml", CM_ERR_INVALID,
         ":4:13: expected true or false for optim.nesterov, got 'yes'"},
        {"out_of_range.yaml", CM_ERR_INVALID, ":4:7: optim.lr = -1 is out of range (0, 10]"},
        {"bad_enum.yaml", CM_ERR_INVALID,
         ":4:9: unknown value 'adamx' for optim.type (did you mean 'adamw'?); valid values: "
         "adamw, sgd"},
        {"malformed.yaml", CM_ERR_FORMAT,
         ":5:6: did not find expected ',' or ']' (while parsing a flow sequence at 4:12)"},
        {"duplicate.yaml", CM_ERR_INVALID,
         ":5:3: duplicate key 'lr' in section 'optim' (first given on line 4)"},
        {"not_mapping.yaml", CM_ERR_INVALID,
         ":3:8: section 'model' must be a mapping of keys (indented 'key: value' lines), got a "
         "single value"},
        {"inconsistent.yaml", CM_ERR_INVALID,
         ":4:12: model.d_model = 64 is not divisible by model.n_heads = 3"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        expect_fixture_error(cases[i].fixture, NULL, 0, cases[i].code, cases[i].message);

    /* A missing file. */
    char path[1024], expected[2048];
    fixture_path(path, sizeof path, "no_such_recipe.yaml");
    snprintf(expected, sizeof expected, "%s: cannot open: No such file or directory", path);
    cm_recipe recipe;
    ck_assert_int_eq(recipe_load(path, NULL, 0, &recipe), CM_ERR_IO);
    ck_assert_str_eq(cm_error_message(), expected);
    /* A directory is not a recipe. */
    fixture_path(path, sizeof path, "nested");
    ck_assert_int_eq(recipe_load(path, NULL, 0, &recipe), CM_ERR_IO);
}
END_TEST

START_TEST(test_yaml_shape_errors) {
    expect_text_error(
        "model:\n  d_model: [1, 2]\n", CM_ERR_INVALID,
        "inline.yaml:2:12: expected a single value for model.d_model, got a sequence");
    expect_text_error("name:\n  first: x\n", CM_ERR_INVALID,
                      "inline.yaml:2:3: expected a single value for name, got a mapping");
    expect_text_error("model:\n  - d_model\n", CM_ERR_INVALID,
                      "inline.yaml:2:3: section 'model' must be a mapping of keys (indented 'key: "
                      "value' lines), got a sequence");
    expect_text_error("just text\n", CM_ERR_INVALID,
                      "inline.yaml:1:1: a recipe must be a mapping of keys and sections, got a "
                      "single value");
    expect_text_error("- a\n- b\n", CM_ERR_INVALID,
                      "inline.yaml:1:1: a recipe must be a mapping of keys and sections, got a "
                      "sequence");
    expect_text_error("name: a\n---\nname: b\n", CM_ERR_FORMAT,
                      "inline.yaml:2:1: a recipe file holds a single YAML document");
    expect_text_error("model:\n  ? [a, b]\n  : 1\n", CM_ERR_INVALID,
                      "inline.yaml:2:5: expected a key name, got a sequence");
    expect_text_error("model: &shared\n  d_model: 64\n", CM_ERR_FORMAT,
                      "inline.yaml:1:8: YAML anchors are not supported in recipes (use base: to "
                      "share settings)");
    expect_text_error("name: x\nmodel: *shared\n", CM_ERR_FORMAT,
                      "inline.yaml:2:8: YAML aliases are not supported in recipes (use base: to "
                      "share settings)");
    expect_text_error("model:\n  d_model: !!int 64\n", CM_ERR_FORMAT,
                      "inline.yaml:2:12: YAML tags ('tag:yaml.org,2002:int') are not supported in "
                      "recipes");
    expect_text_error("name: a\nname: b\n", CM_ERR_INVALID,
                      "inline.yaml:2:1: duplicate key 'name' (first given on line 1)");
    expect_text_error("optim:\n  lr: 1\noptim:\n  eps: 1\n", CM_ERR_INVALID,
                      "inline.yaml:3:1: duplicate section 'optim' (first given on line 1)");
    expect_text_error("colour: red\n", CM_ERR_INVALID,
                      "inline.yaml:1:1: unknown top-level key 'colour'; valid top-level keys and "
                      "sections: base, name, model, moe, router, data, optim, schedule, train, "
                      "checkpoint, eval, parallel, adversarial, upcycle");
    expect_text_error("adversarial:\n  eps: 8\n", CM_ERR_INVALID,
                      "inline.yaml:2:8: adversarial.eps = 8 is out of range (0, 1]");
    expect_text_error("adversarial:\n  eps: 0\n", CM_ERR_INVALID,
                      "inline.yaml:2:8: adversarial.eps = 0 is out of range (0, 1]");
    expect_text_error("model:\n  cnn_widths: 32,x\n", CM_ERR_INVALID,
                      "inline.yaml:2:15: bad model.cnn_widths '32,x': expected 1 to 4 "
                      "comma-separated widths, e.g. 32,64,128");
    expect_text_error("model:\n  arch: resnet\n", CM_ERR_INVALID,
                      "inline.yaml:2:9: model.arch resnet needs data.format idx (images)");
    expect_text_error("model:\n  arch: resnet\ndata:\n  format: idx\nadversarial:\n  mode: "
                      "advmoe\n",
                      CM_ERR_INVALID,
                      "inline.yaml:6:9: adversarial.mode advmoe needs moe.enabled: true and "
                      "moe.num_experts >= 2 (it alternates expert and router steps)");
    expect_text_error("moe:\n  num_expert: 8\n", CM_ERR_INVALID,
                      "inline.yaml:2:3: unknown key 'num_expert' in section 'moe' (did you mean "
                      "'num_experts'?)");
    expect_text_error(
        "router:\n  capacity: 2\n", CM_ERR_INVALID,
        "inline.yaml:2:3: unknown key 'capacity' in section 'router'; valid keys: "
        "type, k, gating, bias, init_std, noise, noise_std, aux_loss_coef, "
        "aux_loss_scope, z_loss_coef, top_p, entropy_coef, capacity_factor, drop_policy, "
        "k_schedule, k_min, k_max, k_span_steps, thor_alpha, thor_level, eval_k, null_experts, "
        "bias_update_rate, rnn_hidden, rnn_state");
    expect_text_error("modle:\n  d_model: 8\n", CM_ERR_INVALID,
                      "inline.yaml:1:1: unknown section 'modle' (did you mean 'model'?)");
    expect_text_error("name: a\n\tmodel: 1\n", CM_ERR_FORMAT,
                      "inline.yaml:2:1: found a tab character that violates indentation (while "
                      "scanning a plain scalar at 1:7)");
    expect_text_error("name: \"a\xff\"\n", CM_ERR_FORMAT,
                      "inline.yaml:1:9: invalid leading UTF-8 octet");
}
END_TEST

START_TEST(test_value_errors) {
    expect_text_error("train:\n  steps: \"100\"\n", CM_ERR_INVALID,
                      "inline.yaml:2:10: expected an integer for train.steps, got the quoted "
                      "string '100' (drop the quotes)");
    expect_text_error("train:\n  steps:\n", CM_ERR_INVALID,
                      "inline.yaml:2:9: missing value for train.steps");
    expect_text_error("data:\n  path: ~\n", CM_ERR_INVALID,
                      "inline.yaml:2:9: missing value for data.path (write \"\" for an empty "
                      "string)");
    expect_text_error("optim:\n  lr: .inf\n", CM_ERR_INVALID,
                      "inline.yaml:2:7: expected a number for optim.lr, got '.inf'");
    expect_text_error("optim:\n  beta1: 1\n", CM_ERR_INVALID,
                      "inline.yaml:2:10: optim.beta1 = 1 is out of range [0, 1)");
    expect_text_error("optim:\n  beta1: 0x1\n", CM_ERR_INVALID,
                      "inline.yaml:2:10: expected a number for optim.beta1, got '0x1'");
    expect_text_error("train:\n  seed: 9223372036854775808\n", CM_ERR_INVALID,
                      "inline.yaml:2:9: train.seed = 9223372036854775808 is out of range [0, "
                      "9223372036854775807]");
    expect_text_error("base: ~\n", CM_ERR_INVALID,
                      "inline.yaml:1:7: base must be the path of another recipe, got nothing");
    expect_text_error("model:\n  d_model: \"a\\0b\"\n", CM_ERR_INVALID,
                      "inline.yaml:2:12: the value of model.d_model contains a NUL character");

    char long_path[400];
    memset(long_path, 'x', sizeof long_path - 1);
    long_path[sizeof long_path - 1] = '\0';
    char text[512];
    snprintf(text, sizeof text, "data:\n  path: %s\n", long_path);
    expect_text_error(text, CM_ERR_INVALID,
                      "inline.yaml:2:9: data.path is too long (399 bytes, at most 255)");

    /* Edge values inside the range are accepted; integers work for numbers. */
    cm_recipe r;
    ck_assert_int_eq(recipe_load_text("optim:\n  beta1: 0\n  lr: 10\n  eps: 1e-300\ntrain:\n  "
                                      "seed: 9223372036854775807\n  steps: +5\n",
                                      "edges", NULL, 0, &r),
                     CM_OK);
    ck_assert_double_eq(r.optim.beta1, 0.0);
    ck_assert_double_eq(r.optim.lr, 10.0);
    ck_assert_double_eq(r.optim.eps, 1e-300);
    ck_assert_int_eq(r.train.seed, INT64_MAX);
    ck_assert_int_eq(r.train.steps, 5);
}
END_TEST

START_TEST(test_consistency) {
    const struct {
        const char *text;
        const char *message;
    } cases[] = {
        {"model:\n  vocab_size: 100\n",
         "inline.yaml:2:15: model.vocab_size = 100 is too small for data.format text (bytes need "
         "256)"},
        {"optim:\n  lr: 0.001\nschedule:\n  type: cosine\n  min_lr: 0.01\n",
         "inline.yaml:5:11: schedule.min_lr = 0.01 is above optim.lr = 0.001"},
        {"train:\n  steps: 10\nschedule:\n  warmup_steps: 11\n",
         "inline.yaml:4:17: schedule.warmup_steps = 11 exceeds train.steps = 10"},
        {"optim:\n  type: sgd\n  nesterov: true\n",
         "inline.yaml:3:13: optim.nesterov needs optim.type sgd and optim.momentum > 0"},
        {"optim:\n  nesterov: true\n  momentum: 0.9\n",
         "inline.yaml:3:13: optim.nesterov needs optim.type sgd and optim.momentum > 0"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        expect_text_error(cases[i].text, CM_ERR_INVALID, cases[i].message);

    /* The error points at whichever involved key was set last. */
    const char *set_last[] = {"model.d_model=100"};
    cm_recipe r;
    ck_assert_int_eq(recipe_load_text("model:\n  n_heads: 8\n", "inline.yaml", set_last, 1, &r),
                     CM_ERR_INVALID);
    ck_assert_str_eq(cm_error_message(),
                     "--set model.d_model=100: model.d_model = 100 is not divisible by "
                     "model.n_heads = 8");
    /* min_lr above lr is fine unless the schedule is cosine; these are valid. */
    ck_assert_int_eq(
        recipe_load_text("optim:\n  lr: 0.001\nschedule:\n  min_lr: 0.01\n", "ok", NULL, 0, &r),
        CM_OK);
    ck_assert_int_eq(recipe_load_text("optim:\n  type: sgd\n  momentum: 0.9\n  nesterov: true\n",
                                      "ok", NULL, 0, &r),
                     CM_OK);
    ck_assert(r.optim.nesterov);
}
END_TEST

/* ---- output -------------------------------------------------------------------- */

/* A non-default value for every key, including strings that need quoting. */
static const char *const every_key_overrides[] = {
    "name=all.keys-1",
    "model.arch=resnet", /* with data.format idx; the LM keys still round-trip */
    "model.vocab_size=300",
    "model.n_layers=3",
    "model.d_model=96",
    "model.n_heads=6",
    "model.d_ff=200",
    "model.dropout=0.125",
    "model.init_std=0.03",
    "model.scale_residual_init=false",
    "model.layernorm_eps=1e-6",
    "model.cnn_widths=8,16",
    "model.cnn_blocks=2",
    "model.cnn_stem=12",
    "model.cnn_ratio=0.5",
    /* moe and router: d_ff 200 / 5 experts = 40, so expert_hidden 40 agrees
     * with split_dense; smoe_dropout needs k_min <= k_max <= num_experts. */
    "moe.enabled=true",
    "moe.num_experts=5",
    "moe.every=3",
    "moe.expert_hidden=40",
    "moe.split_dense=true",
    "moe.activation=silu",
    "moe.expert_dropout=0.25",
    "moe.cnn_routing=per_layer",
    "moe.merged=true",
    "router.type=smoe_dropout",
    "router.k=3",
    "router.gating=topk_softmax",
    "router.bias=true",
    "router.init_std=0.05",
    "router.noise=fixed",
    "router.noise_std=0.3",
    "router.aux_loss_coef=0.02",
    "router.aux_loss_scope=local",
    "router.z_loss_coef=1e-3",
    "router.top_p=0.55",
    "router.entropy_coef=1e-3",
    "router.capacity_factor=1.25",
    "router.drop_policy=position",
    "router.k_schedule=multi_step_increase",
    "router.k_min=1",
    "router.k_max=4",
    "router.k_span_steps=77",
    "router.thor_alpha=5",
    "router.thor_level=per_token",
    "router.null_experts=3",
    "router.bias_update_rate=0.01",
    "router.rnn_hidden=16",
    "router.rnn_state=detach",
    "router.eval_k=5",
    "data.format=idx",
    "data.path=with \"quotes\" and \\backslash\\: #hash",
    "data.valid_path=v\tab.txt",
    "data.test_path=t\xc3\xa9st.txt",
    "data.seq_len=31",
    "data.batch_size=5",
    "data.labels_path=l.gz",
    "data.test_labels_path=tl.gz",
    "data.augment_crop=2",
    "data.augment_flip=true",
    "optim.type=sgd",
    "optim.lr=0.1",
    "optim.beta1=0.85",
    "optim.beta2=0.98765432109876543",
    "optim.eps=1e-10",
    "optim.weight_decay=0.05",
    "optim.decay_norms=true",
    "optim.decay_biases=true",
    "optim.decay_embeddings=true",
    "optim.momentum=0.9",
    "optim.nesterov=true",
    "optim.grad_clip=0.7",
    "optim.skip_unused_experts=false",
    "schedule.type=step",
    "schedule.warmup_steps=13",
    "schedule.min_lr=0.001",
    "schedule.step_size=17",
    "schedule.gamma=0.3333333333333333",
    "train.steps=99",
    "train.seed=18446744073",
    "train.log_every=3",
    "train.eval_every=0",
    "train.grad_accum=3",
    "train.eval_batches=2",
    "train.arena_mib=64",
    "train.threads=2",
    "train.recompute=experts", /* resnet ignores it */
    "train.out_dir=out",
    "checkpoint.dir=ckpt dir",
    "checkpoint.every=0",
    "checkpoint.keep_last=0",
    "eval.split=test",
    "parallel.expert_parallel=2",
    "parallel.shadow_experts=auto",
    "parallel.shadow_float_cost=750",
    "adversarial.mode=advmoe",
    "adversarial.eps=0.3",
    "adversarial.step_size=0.05",
    "adversarial.steps=7",
    "adversarial.eval_steps=9",
    "adversarial.eval_step_size=0.01",
    "adversarial.eval_router_weight=3",
    "adversarial.beta=1.5",
    "adversarial.router_weight=2.5",
    "adversarial.router_objective=paper",
    "upcycle.router=zero",
    "upcycle.scaling=output",
    "upcycle.drop_ratio=0.25",
    "upcycle.drop_scope=matrix",
};

START_TEST(test_round_trip) {
    int n = (int)(sizeof every_key_overrides / sizeof every_key_overrides[0]);
    /* The list must name every key in the table, so every type is printed. */
    ck_assert_int_eq(n, recipe_key_count());
    for (int k = 0; k < recipe_key_count(); k++) {
        cm_recipe_key_info info = recipe_key_info(k);
        char prefix[96];
        snprintf(prefix, sizeof prefix, "%s%s%s=", info.section, info.section[0] ? "." : "",
                 info.key);
        bool found = false;
        for (int i = 0; i < n; i++)
            found |= strncmp(every_key_overrides[i], prefix, strlen(prefix)) == 0;
        ck_assert_msg(found, "every_key_overrides misses %s", prefix);
    }
    cm_recipe original = load_ok(NULL, every_key_overrides, n);
    cm_recipe defaults;
    recipe_defaults(&defaults);
    ck_assert(recipe_first_difference(&original, &defaults, NULL, 0));
    /* Every key really is off its default, except enums with one value. */
    for (int k = 0; k < recipe_key_count(); k++) {
        cm_recipe_key_info info = recipe_key_info(k);
        if (info.enum_names && !info.enum_names[1]) continue;
        char path[96], value[1024], default_value[1024];
        snprintf(path, sizeof path, "%s%s%s", info.section, info.section[0] ? "." : "", info.key);
        ck_assert_int_eq(recipe_get(&original, path, value, sizeof value), CM_OK);
        ck_assert_int_eq(recipe_get(&defaults, path, default_value, sizeof default_value), CM_OK);
        ck_assert_msg(strcmp(value, default_value) != 0, "every_key_overrides leaves %s at %s",
                      path, value);
    }
    ck_assert_str_eq(original.data.path, "with \"quotes\" and \\backslash\\: #hash");

    size_t length = recipe_format(&original, NULL, 0);
    char *text = malloc(length + 1);
    ck_assert_uint_eq(recipe_format(&original, text, length + 1), length);
    ck_assert_uint_eq(strlen(text), length);
    cm_recipe reloaded;
    cm_status status = recipe_load_text(text, "resolved", NULL, 0, &reloaded);
    ck_assert_msg(status == CM_OK, "%s\n%s", cm_error_message(), text);
    char key[96];
    ck_assert_msg(!recipe_first_difference(&original, &reloaded, key, sizeof key),
                  "%s differs after the round trip", key);
    ck_assert(memcmp(&original, &reloaded, sizeof original) == 0);
    /* Formatting is a fixed point. */
    char *again = malloc(length + 1);
    recipe_format(&reloaded, again, length + 1);
    ck_assert_str_eq(again, text);

    /* recipe_print writes the same text. */
    FILE *file = tmpfile();
    ck_assert_ptr_nonnull(file);
    ck_assert_int_eq(recipe_print(&original, file), CM_OK);
    rewind(file);
    char *printed = calloc(length + 2, 1);
    ck_assert_uint_eq(fread(printed, 1, length + 1, file), length);
    ck_assert_str_eq(printed, text);
    fclose(file);

    /* A few lines, so a change in the layout is noticed. */
    ck_assert_ptr_nonnull(strstr(text, "name: \"all.keys-1\"\nmodel:\n  arch: resnet\n"));
    ck_assert_ptr_nonnull(strstr(text, "\n  lr: 0.1\n"));
    ck_assert_ptr_nonnull(
        strstr(text, "\n  path: \"with \\\"quotes\\\" and \\\\backslash\\\\: #hash\"\n"));
    ck_assert_ptr_nonnull(strstr(text, "\n  valid_path: \"v\\x09ab.txt\"\n"));
    ck_assert_ptr_nonnull(strstr(text, "\n  nesterov: true\n"));
    ck_assert_ptr_nonnull(strstr(text, "\n  seed: 18446744073\n"));
    ck_assert_ptr_nonnull(strstr(text, "eval:\n  split: test\n"));
    ck_assert_ptr_nonnull(strstr(text, "\nmoe:\n  enabled: true\n  num_experts: 5\n"));
    ck_assert_ptr_nonnull(strstr(text, "\nrouter:\n  type: smoe_dropout\n  k: 3\n"));
    ck_assert_ptr_nonnull(strstr(text, "\n  z_loss_coef: 0.001\n"));
    ck_assert_ptr_nonnull(strstr(text, "\n  k_schedule: multi_step_increase\n"));
    free(printed);
    free(again);
    free(text);
}
END_TEST

START_TEST(test_format_buffer) {
    cm_recipe r;
    recipe_defaults(&r);
    size_t length = recipe_format(&r, NULL, 0);
    ck_assert_uint_gt(length, 100);
    char small[16];
    memset(small, 'z', sizeof small);
    ck_assert_uint_eq(recipe_format(&r, small, sizeof small), length);
    ck_assert_str_eq(small, "name: \"run\"\nmod"); /* truncated and terminated */

    char value[64];
    ck_assert_int_eq(recipe_get(&r, "optim.type", value, sizeof value), CM_OK);
    ck_assert_str_eq(value, "adamw");
    ck_assert_int_eq(recipe_get(&r, "optim.lr", value, sizeof value), CM_OK);
    ck_assert_str_eq(value, "0.0003");
    ck_assert_int_eq(recipe_get(&r, "name", value, sizeof value), CM_OK);
    ck_assert_str_eq(value, "\"run\"");
    ck_assert_int_eq(recipe_get(&r, "train.steps", value, sizeof value), CM_OK);
    ck_assert_str_eq(value, "2000");
    ck_assert_int_eq(recipe_get(&r, "optim.lrr", value, sizeof value), CM_ERR_INVALID);
    ck_assert_int_eq(recipe_get(&r, "data.path", value, 4), CM_ERR_INVALID);
}
END_TEST

/* ---- the key table and its documentation ---------------------------------------- */

/* Deep nesting is refused at depth 17 (it took 48 s to reach the old
 * "must be a mapping" error on 100,000 brackets: libyaml's scanner is
 * quadratic in the depth). */
START_TEST(test_deep_nesting_refused) {
    enum { DEPTH = 20000 };
    char *text = malloc(2 * DEPTH + 16);
    ck_assert_ptr_nonnull(text);
    int n = sprintf(text, "model: ");
    for (int i = 0; i < DEPTH; i++) text[n++] = '[';
    for (int i = 0; i < DEPTH; i++) text[n++] = ']';
    text[n] = '\0';
    cm_recipe recipe;
    ck_assert_int_eq(recipe_load_text(text, "deep.yaml", NULL, 0, &recipe), CM_ERR_FORMAT);
    ck_assert_ptr_nonnull(strstr(cm_error_message(), "deep.yaml:1:23: nesting deeper than 16"));
    free(text);
}
END_TEST

START_TEST(test_key_table) {
    int n = recipe_key_count();
    ck_assert_int_gt(n, 40);
    for (int i = 0; i < n; i++) {
        cm_recipe_key_info info = recipe_key_info(i);
        ck_assert_msg(info.help && strlen(info.help) > 5, "key %d has no help", i);
        ck_assert_msg(!strchr(info.help, '|'), "help of %s breaks the Markdown table", info.key);
        bool numeric = !strcmp(info.type, "integer") || !strcmp(info.type, "number");
        ck_assert_msg(numeric == (info.range[0] != '\0'), "%s: range only for numbers", info.key);
        ck_assert_msg(!strcmp(info.type, "enum") == (info.enum_names != NULL), "%s", info.key);
        for (int j = 0; j < i; j++) {
            cm_recipe_key_info other = recipe_key_info(j);
            ck_assert_msg(strcmp(info.section, other.section) || strcmp(info.key, other.key),
                          "%s.%s declared twice", info.section, info.key);
        }
    }
}
END_TEST

static char *read_whole_file(const char *path) {
    FILE *file = fopen(path, "rb");
    ck_assert_msg(file != NULL, "cannot open %s", path);
    fseek(file, 0, SEEK_END);
    long size = ftell(file);
    rewind(file);
    char *text = malloc((size_t)size + 1);
    ck_assert_uint_eq(fread(text, 1, (size_t)size, file), (size_t)size);
    text[size] = '\0';
    fclose(file);
    return text;
}

START_TEST(test_docs_cover_every_key) {
    char path[1024];
    source_path(path, sizeof path, "docs/recipes.md");
    char *docs = read_whole_file(path);
    FILE *reference = tmpfile();
    ck_assert_ptr_nonnull(reference);
    ck_assert_int_eq(recipe_write_reference(reference), CM_OK);
    long size = ftell(reference);
    rewind(reference);
    char *generated = calloc((size_t)size + 1, 1);
    ck_assert_uint_eq(fread(generated, 1, (size_t)size, reference), (size_t)size);
    fclose(reference);

    /* Every key row of the generated reference (type, default, range, help)
     * must appear verbatim in the docs. */
    int rows = 0;
    for (char *line = strtok(generated, "\n"); line; line = strtok(NULL, "\n")) {
        if (strncmp(line, "| `", 3) != 0) continue;
        rows++;
        ck_assert_msg(strstr(docs, line) != NULL,
                      "docs/recipes.md is missing or has a stale row; expected:\n%s", line);
    }
    ck_assert_int_eq(rows, recipe_key_count());
    for (int i = 0; i < recipe_key_count(); i++) {
        cm_recipe_key_info info = recipe_key_info(i);
        char name[96];
        snprintf(name, sizeof name, "`%s%s%s`", info.section, info.section[0] ? "." : "", info.key);
        ck_assert_msg(strstr(docs, name) != NULL, "docs/recipes.md does not mention %s", name);
    }
    free(generated);
    free(docs);
}
END_TEST

int main(void) {
    Suite *suite = suite_create("recipe");
    TCase *tc = tcase_create("recipe");
    tcase_add_test(tc, test_dense_recipe);
    tcase_add_test(tc, test_defaults);
    tcase_add_test(tc, test_base_inheritance);
    tcase_add_test(tc, test_base_errors);
    tcase_add_test(tc, test_set_overrides);
    tcase_add_test(tc, test_set_errors);
    tcase_add_test(tc, test_file_errors);
    tcase_add_test(tc, test_yaml_shape_errors);
    tcase_add_test(tc, test_value_errors);
    tcase_add_test(tc, test_consistency);
    tcase_add_test(tc, test_round_trip);
    tcase_add_test(tc, test_format_buffer);
    tcase_add_test(tc, test_deep_nesting_refused);
    tcase_add_test(tc, test_key_table);
    tcase_add_test(tc, test_docs_cover_every_key);
    suite_add_tcase(suite, tc);
    SRunner *runner = srunner_create(suite);
    srunner_run_all(runner, CK_NORMAL);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
