/* libFuzzer target: the checkpoint loader (train/checkpoint.h).
 *
 * Input: an HDF5 file, written to the target's temporary directory and
 * loaded into a small model (the one tests/test_checkpoint.c uses: a dense
 * tensor, a frozen one and an expert tensor) as one process
 * (ckpt_load_sharded with no communicator) and as expert-parallel rank 1 of
 * 2 (the file's expert tensor split in two), with the optimizer moments;
 * then its recipe is read (ckpt_read_recipe) and loaded, as `cmoe eval`
 * does. Besides no crash/hang/leak: no HDF5 object stays open.
 *
 * CMOE_FUZZ_WRITE_SEEDS=DIR ./fuzz_checkpoint writes valid checkpoints of
 * this model to DIR and exits (how fuzz/corpus/checkpoint was seeded). */
#include <hdf5.h>
#include <stdio.h>
#include <stdlib.h>

#include "fuzz_util.h"
#include "train/checkpoint.h"
#include "train/recipe.h"

static ag_params whole, half; /* all experts; the second of two expert shards */

/* experts: the leading dimension of moe.experts.w1 in this process. */
static void build_model(ag_params *params, int experts) {
    ag_params_init(params);
    ag_init normal = {AG_INIT_NORMAL, 0.0f, 1.0f};
    ag_param *frozen;
    if (ag_params_declare(params, "blocks.0.w", AG_GROUP_DENSE, 2, (int[]){7, 3}, normal, NULL) ||
        ag_params_declare(params, "router.w", AG_GROUP_DENSE, 1, (int[]){5}, normal, &frozen) ||
        ag_params_declare(params, "moe.experts.w1", AG_GROUP_EXPERT, 3, (int[]){experts, 3, 4},
                          normal, NULL) ||
        ag_params_finalize(params, 1) != CM_OK)
        fuzz_fail("cannot build the model: %s", cm_error_message());
    ag_param_set_frozen(frozen, true);
}

static const char RECIPE[] = "name: fuzz\nmodel:\n  d_model: 8\n  n_heads: 2\n";

static void write_seed(const char *dir, const char *name, const ag_params *params, int64_t step,
                       const char *recipe, const ckpt_origin *origin) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    ckpt_meta meta = {.step = step, .seed = 77, .optimizer_step = step + 1};
    cm_status status = origin ? ckpt_save_with_origin(path, params, &meta, recipe, origin)
                              : ckpt_save(path, params, &meta, recipe);
    if (status != CM_OK) fuzz_fail("cannot write %s: %s", path, cm_error_message());
}

static void write_seeds(const char *dir) {
    write_seed(dir, "model.h5", &whole, 12, RECIPE, NULL);
    write_seed(dir, "no-recipe.h5", &whole, 0, NULL, NULL);
    ckpt_origin origin = {.path = "dense.h5",
                          .step = 5,
                          .seed = 3,
                          .recipe = RECIPE,
                          .method = "upcycled: experts copied from the dense MLP"};
    write_seed(dir, "upcycled.h5", &whole, 3, RECIPE, &origin);
}

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    build_model(&whole, 2);
    build_model(&half, 1);
    const char *seeds = getenv("CMOE_FUZZ_WRITE_SEEDS");
    if (seeds) {
        write_seeds(seeds);
        exit(0);
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char path[512];
    fuzz_temp_path("checkpoint.h5", path, sizeof path);
    fuzz_write_file(path, data, size, 0);
    ckpt_meta meta;
    if (ckpt_load_sharded(path, &whole, &meta, true, NULL) == CM_OK &&
        (meta.step < 0 || meta.optimizer_step < 0))
        fuzz_fail("loaded negative steps");
    cm_comm second_of_two = {.ep_rank = 1, .ep_size = 2};
    ckpt_load_sharded(path, &half, &meta, true, &second_of_two);
    char *text = NULL;
    if (ckpt_read_recipe(path, &text) == CM_OK) {
        cm_recipe recipe;
        recipe_load_text(text, "checkpoint recipe", NULL, 0, &recipe);
        free(text);
    }
    ssize_t open_objects = H5Fget_obj_count(H5F_OBJ_ALL, H5F_OBJ_ALL);
    if (open_objects != 0) fuzz_fail("%zd HDF5 objects left open", open_objects);
    cm_error_clear();
    return 0;
}
