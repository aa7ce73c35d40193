/* Byte-level text corpus (vocabulary = the 256 byte values), e.g. data/kjv/.
 *
 * Training batches are windows of seq_len + 1 bytes at random offsets: row i
 * of the global batch at step s starts at
 *     cm_rng_below({seed, s, 0, CM_RNG_DATA}, i, size - seq_len),
 * its inputs are the first seq_len bytes and its targets the same window
 * shifted by one. Every row is a pure function of (seed, step, row), so a
 * data-parallel rank that computes rows [r*B/R, (r+1)*B/R) gets exactly those
 * rows of the single-rank batch, and the whole data cursor a checkpoint needs
 * is (seed, step): a resumed run continues with the same batches.
 *
 * Evaluation walks a split in order: window w has inputs at bytes
 * [w*seq_len, (w+1)*seq_len) and targets shifted by one, so every byte but the
 * first is predicted exactly once; the last (size - 1) % seq_len bytes, too few
 * for a full window, are not evaluated.
 * Owns: the file's bytes (text_dataset_close frees them). */
#ifndef CMOE_DATA_TEXT_H
#define CMOE_DATA_TEXT_H

#include <stdint.h>

#include "common/status.h"
#include "data/shard.h"

enum { TEXT_VOCAB_SIZE = 256 };

typedef struct text_dataset {
    uint8_t *bytes;
    int64_t size;
    char path[512]; /* for messages */
} text_dataset;

/* Reads the whole file. A missing, unreadable or empty file is an error whose
 * message names the path. */
cm_status text_dataset_open(text_dataset *dataset, const char *path);
void text_dataset_close(text_dataset *dataset);

/* Rows [rows.begin, rows.end) of the global training batch for `step`:
 * inputs, targets [rows.end - rows.begin, seq_len], byte values 0..255.
 * CM_ERR_INVALID if seq_len < 1, the file has fewer than seq_len + 1 bytes or
 * the range is not inside [0, global_batch). */
cm_status text_dataset_batch(const text_dataset *dataset, uint64_t seed, uint64_t step,
                             int global_batch, int seq_len, shard_range rows, int32_t *inputs,
                             int32_t *targets);

/* Sequential evaluation over a whole split, global_batch windows per batch;
 * each rank takes its shard_rows share of every batch (the last batch may
 * hold fewer than global_batch windows). */
typedef struct text_eval_iter {
    const text_dataset *dataset;
    int global_batch, seq_len, rank, ranks;
    int64_t num_windows; /* windows the split holds, capped by max_batches */
    int64_t next_window; /* first window of the next batch */
} text_eval_iter;

/* max_batches <= 0 means no limit. CM_ERR_INVALID for bad sizes or a file
 * shorter than seq_len + 1 bytes. */
cm_status text_eval_begin(text_eval_iter *iter, const text_dataset *dataset, int global_batch,
                          int seq_len, int rank, int ranks, int64_t max_batches);
/* Fills this rank's rows of the next batch: inputs, targets [*local_rows,
 * seq_len], room for global_batch rows needed. Returns the number of windows
 * in the whole batch (all ranks), 0 when the split is exhausted. *local_rows
 * may be 0 on some ranks for a short last batch. */
int text_eval_next(text_eval_iter *iter, int32_t *inputs, int32_t *targets, int *local_rows);

#endif
