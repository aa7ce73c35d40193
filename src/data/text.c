/* Byte-level text corpus: loading, random training windows, evaluation walk. */
#include "data/text.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>

#include "common/rng.h"

/* The KJV splits are made by a script; say so when one is missing. */
static const char *missing_hint(const char *path) {
    return strstr(path, "kjv") ? " (run data/prepare_kjv.sh to create it)" : "";
}

cm_status text_dataset_open(text_dataset *dataset, const char *path) {
    memset(dataset, 0, sizeof *dataset);
    FILE *file = fopen(path, "rb");
    if (!file)
        return CM_ERR(CM_ERR_IO, "cannot open text data set '%s': %s%s", path, strerror(errno),
                      missing_hint(path));
    struct stat info;
    if (fstat(fileno(file), &info) != 0 || !S_ISREG(info.st_mode)) {
        fclose(file);
        return CM_ERR(CM_ERR_IO, "text data set '%s' is not a regular file (a directory?)", path);
    }
    off_t size = -1;
    if (fseeko(file, 0, SEEK_END) == 0) size = ftello(file);
    if (size < 0 || fseeko(file, 0, SEEK_SET) != 0) {
        fclose(file);
        return CM_ERR(CM_ERR_IO, "cannot determine the size of text data set '%s'", path);
    }
    if (size == 0) {
        fclose(file);
        return CM_ERR(CM_ERR_FORMAT, "text data set '%s' is empty%s", path, missing_hint(path));
    }
    uint8_t *bytes = malloc((size_t)size);
    if (!bytes) {
        fclose(file);
        return CM_ERR(CM_ERR_NOMEM, "cannot allocate %lld bytes for text data set '%s'",
                      (long long)size, path);
    }
    size_t got = fread(bytes, 1, (size_t)size, file);
    fclose(file);
    if (got != (size_t)size) {
        free(bytes);
        return CM_ERR(CM_ERR_IO, "read %zu of %lld bytes of text data set '%s'", got,
                      (long long)size, path);
    }
    dataset->bytes = bytes;
    dataset->size = (int64_t)size;
    snprintf(dataset->path, sizeof dataset->path, "%s", path);
    return CM_OK;
}

void text_dataset_close(text_dataset *dataset) {
    free(dataset->bytes);
    memset(dataset, 0, sizeof *dataset);
}

static cm_status check_window(const text_dataset *dataset, int seq_len) {
    if (seq_len < 1) return CM_ERR(CM_ERR_INVALID, "sequence length %d must be >= 1", seq_len);
    if (dataset->size < (int64_t)seq_len + 1)
        return CM_ERR(CM_ERR_INVALID,
                      "text data set '%s' has %lld bytes, fewer than sequence length %d + 1",
                      dataset->path, (long long)dataset->size, seq_len);
    return CM_OK;
}

/* window [seq_len + 1] bytes -> inputs [seq_len] = window[0..], targets =
 * window[1..]. */
static void copy_window(const uint8_t *window, int seq_len, int32_t *inputs, int32_t *targets) {
    for (int t = 0; t < seq_len; t++) {
        inputs[t] = window[t];
        targets[t] = window[t + 1];
    }
}

cm_status text_dataset_batch(const text_dataset *dataset, uint64_t seed, uint64_t step,
                             int global_batch, int seq_len, shard_range rows, int32_t *inputs,
                             int32_t *targets) {
    CM_TRY(check_window(dataset, seq_len));
    if (rows.begin < 0 || rows.begin > rows.end || rows.end > global_batch)
        return CM_ERR(CM_ERR_INVALID, "rows [%d, %d) are not inside a batch of %d", rows.begin,
                      rows.end, global_batch);
    cm_rng_key key = {seed, step, 0, CM_RNG_DATA};
    uint64_t num_starts = (uint64_t)(dataset->size - seq_len);
    for (int row = rows.begin; row < rows.end; row++) {
        uint64_t start = cm_rng_below(key, (uint64_t)row, num_starts);
        size_t out = (size_t)(row - rows.begin) * (size_t)seq_len;
        copy_window(dataset->bytes + start, seq_len, inputs + out, targets + out);
    }
    return CM_OK;
}

cm_status text_eval_begin(text_eval_iter *iter, const text_dataset *dataset, int global_batch,
                          int seq_len, int rank, int ranks, int64_t max_batches) {
    memset(iter, 0, sizeof *iter);
    CM_TRY(check_window(dataset, seq_len));
    if (global_batch < 1)
        return CM_ERR(CM_ERR_INVALID, "evaluation batch %d must be >= 1", global_batch);
    if (ranks < 1 || rank < 0 || rank >= ranks)
        return CM_ERR(CM_ERR_INVALID, "rank %d of %d", rank, ranks);
    iter->dataset = dataset;
    iter->global_batch = global_batch;
    iter->seq_len = seq_len;
    iter->rank = rank;
    iter->ranks = ranks;
    iter->num_windows = (dataset->size - 1) / seq_len;
    if (max_batches > 0 && max_batches <= iter->num_windows / global_batch)
        iter->num_windows = max_batches * global_batch;
    return CM_OK;
}

int text_eval_next(text_eval_iter *iter, int32_t *inputs, int32_t *targets, int *local_rows) {
    int64_t remaining = iter->num_windows - iter->next_window;
    int batch_windows = (int)(remaining < iter->global_batch ? remaining : iter->global_batch);
    *local_rows = 0;
    if (batch_windows <= 0) return 0;
    shard_range rows = shard_rows(batch_windows, iter->rank, iter->ranks);
    for (int row = rows.begin; row < rows.end; row++) {
        int64_t start = (iter->next_window + row) * (int64_t)iter->seq_len;
        size_t out = (size_t)(row - rows.begin) * (size_t)iter->seq_len;
        copy_window(iter->dataset->bytes + start, iter->seq_len, inputs + out, targets + out);
    }
    *local_rows = rows.end - rows.begin;
    iter->next_window += batch_windows;
    return batch_windows;
}
