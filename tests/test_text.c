/* data/text: loading errors, random training windows (contiguous, shifted
 * targets, deterministic in (seed, step), every start reachable), rank slices
 * equal to rows of the global batch, and the sequential evaluation walk. */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/rng.h"
#include "data/text.h"

/* Writes `size` bytes to a new temporary file; *path gets its name. */
static void write_temp(char *path, const uint8_t *bytes, size_t size) {
    strcpy(path, "/tmp/cmoe_test_text_XXXXXX");
    int fd = mkstemp(path);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(write(fd, bytes, size), (ssize_t)size);
    close(fd);
}

/* Random bytes (all 256 values occur). */
static uint8_t *random_bytes(size_t size, uint64_t seed) {
    uint8_t *bytes = malloc(size);
    cm_rng_key key = {seed, 0, 0, CM_RNG_TEST};
    for (size_t i = 0; i < size; i++) bytes[i] = (uint8_t)cm_rng_below(key, i, 256);
    return bytes;
}

static void open_random(text_dataset *dataset, char *path, size_t size, uint8_t **bytes) {
    *bytes = random_bytes(size, 11);
    write_temp(path, *bytes, size);
    ck_assert_int_eq(text_dataset_open(dataset, path), CM_OK);
    unlink(path); /* loaded: no file left behind even if a check fails */
    ck_assert_int_eq(dataset->size, (int64_t)size);
    ck_assert_mem_eq(dataset->bytes, *bytes, size);
}

START_TEST(test_open_errors) {
    text_dataset dataset;
    const char *missing = "/tmp/cmoe_no_such_dir/none.txt";
    ck_assert_int_eq(text_dataset_open(&dataset, missing), CM_ERR_IO);
    ck_assert_ptr_nonnull(strstr(cm_error_message(), missing));
    ck_assert_ptr_null(dataset.bytes);
    ck_assert_int_eq(text_dataset_open(&dataset, "/tmp/cmoe_no_such_dir/kjv/train.txt"), CM_ERR_IO);
    ck_assert_ptr_nonnull(strstr(cm_error_message(), "data/prepare_kjv.sh"));

    char path[64];
    write_temp(path, (const uint8_t *)"", 0);
    cm_status status = text_dataset_open(&dataset, path);
    unlink(path);
    ck_assert_int_eq(status, CM_ERR_FORMAT);
    ck_assert_ptr_nonnull(strstr(cm_error_message(), path));
    ck_assert_ptr_nonnull(strstr(cm_error_message(), "empty"));

    /* A file shorter than seq_len + 1 cannot give a window. */
    write_temp(path, (const uint8_t *)"abcd", 4);
    ck_assert_int_eq(text_dataset_open(&dataset, path), CM_OK);
    unlink(path);
    int32_t inputs[8], targets[8];
    shard_range rows = {0, 1};
    ck_assert_int_eq(text_dataset_batch(&dataset, 1, 0, 1, 4, rows, inputs, targets),
                     CM_ERR_INVALID);
    ck_assert_int_eq(text_dataset_batch(&dataset, 1, 0, 1, 3, rows, inputs, targets), CM_OK);
    ck_assert_int_eq(inputs[0], 'a');
    ck_assert_int_eq(targets[2], 'd');
    ck_assert_int_eq(text_dataset_batch(&dataset, 1, 0, 1, 0, rows, inputs, targets),
                     CM_ERR_INVALID);
    rows.end = 2;
    ck_assert_int_eq(text_dataset_batch(&dataset, 1, 0, 1, 3, rows, inputs, targets),
                     CM_ERR_INVALID);
    text_eval_iter iter;
    ck_assert_int_eq(text_eval_begin(&iter, &dataset, 2, 4, 0, 1, 0), CM_ERR_INVALID);
    text_dataset_close(&dataset);
}
END_TEST

enum { SIZE = 3001, SEQ = 17, BATCH = 7 };

/* Each row is the file's bytes [start, start + SEQ] for the documented start,
 * inputs = the first SEQ bytes, targets = the window shifted by one. */
START_TEST(test_windows_are_contiguous_and_shifted) {
    text_dataset dataset;
    char path[64];
    uint8_t *bytes;
    open_random(&dataset, path, SIZE, &bytes);
    int32_t inputs[BATCH * SEQ], targets[BATCH * SEQ];
    int high_bytes = 0;
    for (uint64_t step = 0; step < 5; step++) {
        ck_assert_int_eq(text_dataset_batch(&dataset, 42, step, BATCH, SEQ, (shard_range){0, BATCH},
                                            inputs, targets),
                         CM_OK);
        cm_rng_key key = {42, step, 0, CM_RNG_DATA};
        for (int row = 0; row < BATCH; row++) {
            uint64_t start = cm_rng_below(key, (uint64_t)row, SIZE - SEQ);
            for (int t = 0; t < SEQ; t++) {
                ck_assert_int_eq(inputs[row * SEQ + t], bytes[start + (uint64_t)t]);
                ck_assert_int_eq(targets[row * SEQ + t], bytes[start + (uint64_t)t + 1]);
                if (t + 1 < SEQ)
                    ck_assert_int_eq(targets[row * SEQ + t], inputs[row * SEQ + t + 1]);
                ck_assert(inputs[row * SEQ + t] >= 0 && inputs[row * SEQ + t] < TEXT_VOCAB_SIZE);
                high_bytes += inputs[row * SEQ + t] >= 128;
            }
        }
    }
    ck_assert_int_gt(high_bytes, 0); /* bytes >= 128 come out positive */
    text_dataset_close(&dataset);
    free(bytes);
}
END_TEST

/* Every start 0 .. size - seq_len - 1 occurs and none beyond: a 40-byte file of
 * distinct bytes, so a window's first byte is its start. */
START_TEST(test_every_start_reachable) {
    uint8_t bytes[40];
    for (int i = 0; i < 40; i++) bytes[i] = (uint8_t)i;
    char path[64];
    write_temp(path, bytes, sizeof bytes);
    text_dataset dataset;
    ck_assert_int_eq(text_dataset_open(&dataset, path), CM_OK);
    unlink(path);
    int seen[40] = {0};
    int32_t inputs[8 * 8], targets[8 * 8];
    for (uint64_t step = 0; step < 100; step++) {
        ck_assert_int_eq(
            text_dataset_batch(&dataset, 3, step, 8, 8, (shard_range){0, 8}, inputs, targets),
            CM_OK);
        for (int row = 0; row < 8; row++) seen[inputs[row * 8]]++;
    }
    for (int start = 0; start < 40; start++) {
        if (start <= 40 - 8 - 1)
            ck_assert_msg(seen[start] > 0, "start %d never drawn", start);
        else
            ck_assert_int_eq(seen[start], 0);
    }
    text_dataset_close(&dataset);
}
END_TEST

START_TEST(test_determinism) {
    text_dataset dataset;
    char path[64];
    uint8_t *bytes;
    open_random(&dataset, path, SIZE, &bytes);
    int32_t a_in[BATCH * SEQ], a_tg[BATCH * SEQ], b_in[BATCH * SEQ], b_tg[BATCH * SEQ];
    shard_range all = {0, BATCH};
    ck_assert_int_eq(text_dataset_batch(&dataset, 5, 9, BATCH, SEQ, all, a_in, a_tg), CM_OK);
    ck_assert_int_eq(text_dataset_batch(&dataset, 5, 9, BATCH, SEQ, all, b_in, b_tg), CM_OK);
    ck_assert_mem_eq(a_in, b_in, sizeof a_in);
    ck_assert_mem_eq(a_tg, b_tg, sizeof a_tg);
    ck_assert_int_eq(text_dataset_batch(&dataset, 5, 10, BATCH, SEQ, all, b_in, b_tg), CM_OK);
    ck_assert(memcmp(a_in, b_in, sizeof a_in) != 0); /* next step: another batch */
    ck_assert_int_eq(text_dataset_batch(&dataset, 6, 9, BATCH, SEQ, all, b_in, b_tg), CM_OK);
    ck_assert(memcmp(a_in, b_in, sizeof a_in) != 0); /* another seed: another batch */
    /* Rows of one batch start at different places (not one draw repeated). */
    ck_assert(memcmp(a_in, a_in + SEQ, SEQ * sizeof(int32_t)) != 0);
    text_dataset_close(&dataset);
    free(bytes);
}
END_TEST

/* For R = 1..5 ranks, rank r's rows [r*B/R, (r+1)*B/R) are exactly those rows
 * of the single-rank batch, and the ranges tile [0, B). */
START_TEST(test_rank_slices_equal_global_rows) {
    text_dataset dataset;
    char path[64];
    uint8_t *bytes;
    open_random(&dataset, path, SIZE, &bytes);
    int32_t global_in[BATCH * SEQ], global_tg[BATCH * SEQ];
    ck_assert_int_eq(text_dataset_batch(&dataset, 8, 3, BATCH, SEQ, (shard_range){0, BATCH},
                                        global_in, global_tg),
                     CM_OK);
    for (int ranks = 1; ranks <= 5; ranks++) {
        int next_row = 0;
        for (int rank = 0; rank < ranks; rank++) {
            shard_range rows = shard_rows(BATCH, rank, ranks);
            ck_assert_int_eq(rows.begin, next_row);
            next_row = rows.end;
            int32_t in[BATCH * SEQ], tg[BATCH * SEQ];
            ck_assert_int_eq(text_dataset_batch(&dataset, 8, 3, BATCH, SEQ, rows, in, tg), CM_OK);
            size_t bytes_used = (size_t)(rows.end - rows.begin) * SEQ * sizeof(int32_t);
            ck_assert_mem_eq(in, global_in + rows.begin * SEQ, bytes_used);
            ck_assert_mem_eq(tg, global_tg + rows.begin * SEQ, bytes_used);
        }
        ck_assert_int_eq(next_row, BATCH);
    }
    text_dataset_close(&dataset);
    free(bytes);
}
END_TEST

/* The walk covers bytes [0, W*SEQ) as inputs and [1, W*SEQ] as targets in
 * order, W = (size - 1) / SEQ; every rank split gives the same rows; a batch
 * cap stops early. */
START_TEST(test_eval_iterator) {
    text_dataset dataset;
    char path[64];
    uint8_t *bytes;
    open_random(&dataset, path, SIZE, &bytes);
    const int windows = (SIZE - 1) / SEQ; /* 176: 25 full batches of 7, then 1 */
    int32_t *all_in = calloc((size_t)windows * SEQ, sizeof(int32_t));
    int32_t *all_tg = calloc((size_t)windows * SEQ, sizeof(int32_t));
    for (int ranks = 1; ranks <= 3; ranks++) {
        text_eval_iter iters[3];
        for (int rank = 0; rank < ranks; rank++)
            ck_assert_int_eq(text_eval_begin(&iters[rank], &dataset, BATCH, SEQ, rank, ranks, 0),
                             CM_OK);
        memset(all_in, 0xff, (size_t)windows * SEQ * sizeof(int32_t));
        int done = 0, batches = 0;
        for (;;) {
            int batch_windows = 0;
            int row_offset = 0;
            for (int rank = 0; rank < ranks; rank++) {
                int32_t in[BATCH * SEQ], tg[BATCH * SEQ];
                int local = -1;
                int n = text_eval_next(&iters[rank], in, tg, &local);
                if (rank == 0) batch_windows = n;
                ck_assert_int_eq(n, batch_windows);
                ck_assert_int_eq(local,
                                 shard_rows(n, rank, ranks).end - shard_rows(n, rank, ranks).begin);
                memcpy(all_in + (size_t)(done + row_offset) * SEQ, in,
                       (size_t)local * SEQ * sizeof(int32_t));
                memcpy(all_tg + (size_t)(done + row_offset) * SEQ, tg,
                       (size_t)local * SEQ * sizeof(int32_t));
                row_offset += local;
            }
            if (batch_windows == 0) break;
            ck_assert_int_eq(row_offset, batch_windows);
            done += batch_windows;
            batches++;
        }
        ck_assert_int_eq(done, windows);
        ck_assert_int_eq(batches, (windows + BATCH - 1) / BATCH);
        for (int i = 0; i < windows * SEQ; i++) {
            ck_assert_int_eq(all_in[i], bytes[i]);
            ck_assert_int_eq(all_tg[i], bytes[i + 1]);
        }
    }
    /* max_batches = 3: 21 windows from the start, then nothing. */
    text_eval_iter iter;
    ck_assert_int_eq(text_eval_begin(&iter, &dataset, BATCH, SEQ, 0, 1, 3), CM_OK);
    int32_t in[BATCH * SEQ], tg[BATCH * SEQ];
    int local = 0, total = 0;
    for (int n; (n = text_eval_next(&iter, in, tg, &local)) > 0;) total += n;
    ck_assert_int_eq(total, 3 * BATCH);
    ck_assert_mem_eq(in, all_in + 2 * BATCH * SEQ, sizeof in); /* last = third batch */
    ck_assert_int_eq(text_eval_next(&iter, in, tg, &local), 0);
    ck_assert_int_eq(local, 0);
    free(all_in);
    free(all_tg);
    text_dataset_close(&dataset);
    free(bytes);
}
END_TEST

int main(void) {
    Suite *suite = suite_create("text");
    TCase *tc = tcase_create("text");
    tcase_add_test(tc, test_open_errors);
    tcase_add_test(tc, test_windows_are_contiguous_and_shifted);
    tcase_add_test(tc, test_every_start_reachable);
    tcase_add_test(tc, test_determinism);
    tcase_add_test(tc, test_rank_slices_equal_global_rows);
    tcase_add_test(tc, test_eval_iterator);
    suite_add_tcase(suite, tc);
    SRunner *runner = srunner_create(suite);
    srunner_run_all(runner, CK_NORMAL);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
