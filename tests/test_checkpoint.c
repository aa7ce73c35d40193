/* HDF5 checkpoints: exact round trip, atomic naming, latest/prune, and clear
 * errors for missing, truncated, corrupted and mismatched files. */
#include <check.h>
#include <hdf5.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "train/checkpoint.h"

static char dir[] = "/tmp/cmoe-ckpt-XXXXXX";

static void make_dir(void) {
    ck_assert_ptr_nonnull(mkdtemp(dir));
}

static void remove_dir(void) {
    char command[256];
    snprintf(command, sizeof command, "rm -rf '%s'", dir);
    ck_assert_int_eq(system(command), 0);
    strcpy(dir, "/tmp/cmoe-ckpt-XXXXXX");
}

/* A small model: two dense tensors (one frozen) and an expert tensor. */
static ag_params make_model(int hidden, uint64_t seed) {
    ag_params params;
    ag_params_init(&params);
    ag_init normal = {AG_INIT_NORMAL, 0.0f, 1.0f};
    ag_param *frozen;
    ck_assert_int_eq(ag_params_declare(&params, "blocks.0.w", AG_GROUP_DENSE, 2, (int[]){hidden, 3},
                                       normal, NULL),
                     CM_OK);
    ck_assert_int_eq(
        ag_params_declare(&params, "router.w", AG_GROUP_DENSE, 1, (int[]){5}, normal, &frozen),
        CM_OK);
    ck_assert_int_eq(ag_params_declare(&params, "moe.experts.w1", AG_GROUP_EXPERT, 3,
                                       (int[]){2, 3, 4}, normal, NULL),
                     CM_OK);
    ck_assert_int_eq(ag_params_finalize(&params, seed), CM_OK);
    ag_param_set_frozen(frozen, true);
    for (int g = 0; g < AG_NUM_GROUPS; g++)
        for (size_t i = 0; i < params.buffers[g].numel; i++) {
            params.buffers[g].m[i] = 0.001f * (float)i + (float)seed;
            params.buffers[g].v[i] = 0.5f + 0.25f * (float)i;
        }
    return params;
}

static void save_model(const char *path, ag_params *params, int64_t step) {
    ckpt_meta meta = {.step = step, .seed = 77, .optimizer_step = step + 1};
    ck_assert_msg(ckpt_save(path, params, &meta, "name: test\nmodel: {d_model: 8}\n") == CM_OK,
                  "%s", cm_error_message());
}

START_TEST(test_round_trip_is_exact) {
    make_dir();
    char path[512];
    ckpt_path_for_step(dir, 12, path, sizeof path);
    ag_params saved = make_model(7, 1);
    save_model(path, &saved, 12);
    char tmp[600];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    ck_assert_int_ne(access(tmp, F_OK), 0); /* renamed into place */

    ag_params loaded = make_model(7, 2); /* different values everywhere */
    ckpt_meta meta;
    ck_assert_msg(ckpt_load(path, &loaded, &meta, true) == CM_OK, "%s", cm_error_message());
    ck_assert_int_eq(meta.step, 12);
    ck_assert_uint_eq(meta.seed, 77);
    ck_assert_int_eq(meta.optimizer_step, 13);
    for (int i = 0; i < saved.count; i++) {
        const ag_param *a = saved.items[i], *b = loaded.items[i];
        size_t bytes = (size_t)a->tensor.numel * sizeof(float);
        ck_assert_int_eq(memcmp(a->tensor.data, b->tensor.data, bytes), 0);
        if (a->frozen) continue;
        ck_assert_int_eq(memcmp(saved.buffers[a->group].m + a->offset,
                                loaded.buffers[b->group].m + b->offset, bytes),
                         0);
        ck_assert_int_eq(memcmp(saved.buffers[a->group].v + a->offset,
                                loaded.buffers[b->group].v + b->offset, bytes),
                         0);
    }
    char *recipe = NULL;
    ck_assert_int_eq(ckpt_read_recipe(path, &recipe), CM_OK);
    ck_assert_str_eq(recipe, "name: test\nmodel: {d_model: 8}\n");
    free(recipe);
    ag_params_free(&saved);
    ag_params_free(&loaded);
    remove_dir();
}
END_TEST

START_TEST(test_latest_and_prune) {
    make_dir();
    ag_params params = make_model(3, 1);
    char path[512];
    for (int step = 100; step <= 500; step += 100) {
        ckpt_path_for_step(dir, step, path, sizeof path);
        save_model(path, &params, step);
    }
    /* An incomplete write must never be taken for a checkpoint. */
    snprintf(path, sizeof path, "%s/ckpt-00000900.h5.tmp", dir);
    FILE *partial = fopen(path, "wb");
    fputs("partial", partial);
    fclose(partial);
    char latest[512];
    ck_assert_int_eq(ckpt_find_latest(dir, latest, sizeof latest), CM_OK);
    ck_assert_ptr_nonnull(strstr(latest, "ckpt-00000500.h5"));
    ck_assert_int_eq(ckpt_prune(dir, 2), CM_OK);
    ckpt_path_for_step(dir, 300, path, sizeof path);
    ck_assert_int_ne(access(path, F_OK), 0);
    ckpt_path_for_step(dir, 400, path, sizeof path);
    ck_assert_int_eq(access(path, F_OK), 0);
    ag_params_free(&params);
    remove_dir();
    ck_assert_int_eq(ckpt_find_latest("/nonexistent-dir", latest, sizeof latest), CM_ERR_IO);
}
END_TEST

START_TEST(test_missing_file) {
    ag_params params = make_model(3, 1);
    ck_assert_int_eq(ckpt_load("/tmp/no-such-checkpoint.h5", &params, NULL, true), CM_ERR_IO);
    ck_assert_ptr_nonnull(strstr(cm_error_message(), "/tmp/no-such-checkpoint.h5"));
    ck_assert_ptr_nonnull(strstr(cm_error_message(), "No such file"));
    ag_params_free(&params);
}
END_TEST

START_TEST(test_other_model_shape) {
    make_dir();
    char path[512];
    ckpt_path_for_step(dir, 1, path, sizeof path);
    ag_params small = make_model(3, 1), large = make_model(4, 1);
    save_model(path, &small, 1);
    ck_assert_int_eq(ckpt_load(path, &large, NULL, true), CM_ERR_FORMAT);
    ck_assert_msg(strstr(cm_error_message(), "blocks.0.w has shape [3,3] in the checkpoint but "
                                             "[4,3] in the model") != NULL,
                  "%s", cm_error_message());
    /* A model with a parameter fewer is also refused. */
    ag_params fewer;
    ag_params_init(&fewer);
    ck_assert_int_eq(ag_params_declare(&fewer, "blocks.0.w", AG_GROUP_DENSE, 2, (int[]){3, 3},
                                       (ag_init){AG_INIT_ZERO, 0, 0}, NULL),
                     CM_OK);
    ck_assert_int_eq(ag_params_finalize(&fewer, 1), CM_OK);
    ck_assert_int_eq(ckpt_load(path, &fewer, NULL, true), CM_ERR_FORMAT);
    ck_assert_ptr_nonnull(strstr(cm_error_message(), "another model"));
    ag_params_free(&small);
    ag_params_free(&large);
    ag_params_free(&fewer);
    remove_dir();
}
END_TEST

static long file_size(const char *path) {
    struct stat info;
    ck_assert_int_eq(stat(path, &info), 0);
    return (long)info.st_size;
}

START_TEST(test_truncated_file) {
    make_dir();
    char path[512], cut[600];
    ckpt_path_for_step(dir, 1, path, sizeof path);
    ag_params params = make_model(64, 1);
    save_model(path, &params, 1);
    long size = file_size(path);
    /* Every truncation point must be rejected, never crash or load garbage. */
    const double fractions[] = {0.0, 0.1, 0.5, 0.9, 0.99};
    for (size_t i = 0; i < sizeof fractions / sizeof fractions[0]; i++) {
        snprintf(cut, sizeof cut, "%s/cut.h5", dir);
        char command[1400];
        snprintf(command, sizeof command, "head -c %ld '%s' > '%s'", (long)(size * fractions[i]),
                 path, cut);
        ck_assert_int_eq(system(command), 0);
        cm_status status = ckpt_load(cut, &params, NULL, true);
        ck_assert_msg(status == CM_ERR_FORMAT, "fraction %g: status %d", fractions[i], status);
        ck_assert_ptr_nonnull(strstr(cm_error_message(), "cut.h5"));
    }
    ag_params_free(&params);
    remove_dir();
}
END_TEST

START_TEST(test_corrupted_data_detected) {
    make_dir();
    char path[512];
    ckpt_path_for_step(dir, 1, path, sizeof path);
    ag_params params = make_model(256, 1);
    save_model(path, &params, 1);
    /* Flip bytes inside the largest dataset (the values of blocks.0.w sit
     * in the middle of the file); the checksum must catch it. */
    long size = file_size(path);
    int rejected = 0, trials = 0;
    for (long offset = size / 8; offset < size - 64; offset += size / 16) {
        FILE *file = fopen(path, "r+b");
        ck_assert_ptr_nonnull(file);
        fseek(file, offset, SEEK_SET);
        int original = fgetc(file);
        fseek(file, offset, SEEK_SET);
        fputc(original ^ 0x5a, file);
        fclose(file);
        ag_params target = make_model(256, 2);
        cm_status status = ckpt_load(path, &target, NULL, true);
        trials++;
        rejected += status != CM_OK;
        if (status == CM_OK) {
            /* Either rejected, or the flipped byte was padding: then the
             * data must still be exactly what was saved. */
            ck_assert_int_eq(memcmp(target.buffers[0].data, params.buffers[0].data,
                                    params.buffers[0].numel * sizeof(float)),
                             0);
        }
        ag_params_free(&target);
        file = fopen(path, "r+b");
        fseek(file, offset, SEEK_SET);
        fputc(original, file);
        fclose(file);
    }
    ck_assert_int_gt(rejected, trials / 2);
    ag_params_free(&params);
    remove_dir();
}
END_TEST

START_TEST(test_not_a_checkpoint) {
    make_dir();
    char path[512];
    snprintf(path, sizeof path, "%s/text.h5", dir);
    FILE *file = fopen(path, "w");
    fputs("this is not HDF5\n", file);
    fclose(file);
    ag_params params = make_model(3, 1);
    ck_assert_int_eq(ckpt_load(path, &params, NULL, true), CM_ERR_FORMAT);
    ck_assert_ptr_nonnull(strstr(cm_error_message(), "not a readable HDF5 file"));
    ag_params_free(&params);
    remove_dir();
}
END_TEST

/* A negative step or optimizer step (an edited or damaged file) is refused:
 * resuming from it would train from step -5 or divide by a bias correction
 * of 1 - beta^-1. */
START_TEST(test_negative_steps_refused) {
    make_dir();
    char path[512];
    ckpt_path_for_step(dir, 1, path, sizeof path);
    ag_params params = make_model(3, 1);
    const ckpt_meta bad[] = {{.step = -5, .seed = 1, .optimizer_step = 0},
                             {.step = 3, .seed = 1, .optimizer_step = -1}};
    for (int i = 0; i < 2; i++) {
        ck_assert_int_eq(ckpt_save(path, &params, &bad[i], "name: t\n"), CM_OK);
        ag_params target = make_model(3, 2);
        ck_assert_int_eq(ckpt_load(path, &target, NULL, true), CM_ERR_FORMAT);
        ck_assert_ptr_nonnull(strstr(cm_error_message(), "is negative"));
        ag_params_free(&target);
    }
    ag_params_free(&params);
    remove_dir();
}
END_TEST

/* Rewrites the "steps" attribute of /optim/m/NAME with `count` entries. */
static void rewrite_steps(const char *path, const char *name, hsize_t count) {
    hid_t file = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
    ck_assert_int_ge(file, 0);
    char dataset_path[256];
    snprintf(dataset_path, sizeof dataset_path, "optim/m/%s", name);
    hid_t dataset = H5Dopen2(file, dataset_path, H5P_DEFAULT);
    ck_assert_int_ge(dataset, 0);
    ck_assert_int_ge(H5Adelete(dataset, "steps"), 0);
    int64_t steps[8] = {4, 4, 4, 4, 4, 4, 4, 4};
    hid_t space = H5Screate_simple(1, &count, NULL);
    hid_t attr = H5Acreate2(dataset, "steps", H5T_STD_I64LE, space, H5P_DEFAULT, H5P_DEFAULT);
    ck_assert_int_ge(attr, 0);
    ck_assert_int_ge(H5Awrite(attr, H5T_NATIVE_INT64, steps), 0);
    H5Aclose(attr);
    H5Sclose(space);
    H5Dclose(dataset);
    H5Fclose(file);
}

/* An expert moment's "steps" attribute holds one count per expert of the
 * model: more or fewer is a damaged file, refused before anything is
 * allocated for it (a damaged dataspace may claim any size). */
START_TEST(test_steps_attribute_checked) {
    make_dir();
    char path[512];
    ckpt_path_for_step(dir, 4, path, sizeof path);
    ag_params params = make_model(3, 1); /* moe.experts.w1 has 2 experts */
    const hsize_t counts[] = {3, 1};
    for (int i = 0; i < 2; i++) {
        save_model(path, &params, 4);
        rewrite_steps(path, "moe.experts.w1", counts[i]);
        ag_params target = make_model(3, 2);
        ck_assert_int_eq(ckpt_load(path, &target, NULL, true), CM_ERR_FORMAT);
        ck_assert_msg(strstr(cm_error_message(), "bad steps attribute of /optim/m/moe.experts.w1"),
                      "%s", cm_error_message());
        ag_params_free(&target);
    }
    ag_params_free(&params);
    remove_dir();
}
END_TEST

int main(void) {
    Suite *suite = suite_create("checkpoint");
    TCase *tc = tcase_create("checkpoint");
    tcase_add_test(tc, test_round_trip_is_exact);
    tcase_add_test(tc, test_latest_and_prune);
    tcase_add_test(tc, test_missing_file);
    tcase_add_test(tc, test_other_model_shape);
    tcase_add_test(tc, test_truncated_file);
    tcase_add_test(tc, test_corrupted_data_detected);
    tcase_add_test(tc, test_not_a_checkpoint);
    tcase_add_test(tc, test_negative_steps_refused);
    tcase_add_test(tc, test_steps_attribute_checked);
    tcase_set_timeout(tc, 60);
    suite_add_tcase(suite, tc);
    SRunner *runner = srunner_create(suite);
    srunner_run_all(runner, CK_NORMAL);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
