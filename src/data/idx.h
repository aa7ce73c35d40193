/* Image classification data in IDX files (Fashion-MNIST), gzip-compressed as
 * Debian's dataset-fashion-mnist ships them (data/prepare_fmnist.sh links them
 * into data/fmnist/).
 *
 * IDX: a big-endian uint32 magic (0x00000803: uint8 images with 3 dimensions
 * [N, height, width]; 0x00000801: uint8 labels with 1 dimension [N]), each
 * dimension as a big-endian uint32, then the values in row-major order.
 *
 * Pixels stay bytes in memory (47 MB for the training set instead of 188 MB
 * of floats on every rank) and become x / 255 in [0, 1] when a batch is
 * filled. Images come out as [rows, 1, height, width] (one channel).
 *
 * Training order: epochs of random permutations. Row i of the global batch of
 * B at step s is global position g = s*B + i; epoch e = g / N; the row is
 * sample order_e[g % N] with order_e = cm_rng_permutation({seed, e, 0,
 * CM_RNG_DATA}, N). Every epoch visits every image exactly once, and a row is
 * a pure function of (seed, step, B, i): a data-parallel rank computing rows
 * [begin, end) gets exactly those rows of the single-rank batch, and the data
 * cursor a checkpoint needs is (seed, step) with the same B.
 *
 * Augmentation of row i at step s draws from cm_rng_block({seed, s, 0,
 * CM_RNG_AUGMENT}, i) (see idx_augment_choose): a random crop of the image
 * zero-padded by p on every side (a shift by dy, dx in [-p, p]) and, if
 * enabled, a horizontal flip with probability 1/2:
 *     out[y][x] = src[y + dy][x' + dx], x' = flip ? width-1-x : x,
 * and 0 where y + dy or x' + dx falls outside the image.
 *
 * Evaluation walks a split in order, batch after batch, the last one short;
 * each rank takes its shard_rows share of every batch (the same rank-rows
 * convention as data/text.h). Owns: pixels, labels and the epoch-order cache
 * (idx_dataset_close frees them). */
#ifndef CMOE_DATA_IDX_H
#define CMOE_DATA_IDX_H

#include <stdbool.h>
#include <stdint.h>

#include "common/status.h"
#include "data/shard.h"

enum { IDX_NUM_CLASSES = 10 };

typedef struct idx_dataset {
    uint8_t *pixels; /* [num_samples, height, width], as stored in the file */
    int32_t *labels; /* [num_samples], 0 .. IDX_NUM_CLASSES - 1 */
    int64_t num_samples;
    int height, width;
    char images_path[512], labels_path[512]; /* for messages */
    /* The permutation of the epoch the latest training row came from, kept so
     * that a batch does not rebuild it; results never depend on it. */
    int32_t *epoch_order; /* [num_samples] */
    uint64_t epoch_order_seed;
    int64_t epoch_order_epoch; /* -1: nothing cached */
} idx_dataset;

/* Loads both files. Errors name the file and the reason: a missing file
 * (CM_ERR_IO), not a gzip file (CM_ERR_FORMAT), a corrupt or truncated gzip
 * stream or fewer values than the header promises (CM_ERR_IO), a wrong magic,
 * zero or implausible dimensions, bytes after the data, image and label
 * counts that differ, a label outside 0..9 (CM_ERR_FORMAT). */
cm_status idx_dataset_open(idx_dataset *dataset, const char *images_path, const char *labels_path);
void idx_dataset_close(idx_dataset *dataset);

/* Sample `index` as floats: out [1, height, width] = pixel / 255. */
void idx_dataset_image(const idx_dataset *dataset, int64_t index, float *out);

/* *sample = the sample behind row `row` of the global training batch at
 * `step` (see the ordering above). Caches the epoch's permutation in
 * `dataset`. CM_ERR_INVALID if row is outside [0, global_batch), CM_ERR_NOMEM
 * if the permutation cannot be allocated. */
cm_status idx_dataset_sample_index(idx_dataset *dataset, uint64_t seed, uint64_t step,
                                   int global_batch, int row, int64_t *sample);

typedef struct idx_augment {
    int crop_padding;     /* random crop of the image padded by this many zeros; 0 = none */
    bool horizontal_flip; /* mirror the columns with probability 1/2 */
} idx_augment;

/* The random choices for one row: shifts in [-crop_padding, crop_padding]. */
typedef struct idx_augment_choice {
    int shift_y, shift_x;
    bool flip;
} idx_augment_choice;

/* Pure function of (seed, step, row) and the options: shift_y, shift_x and the
 * flip come from words 0, 1 and 2 of cm_rng_block({seed, step, 0,
 * CM_RNG_AUGMENT}, row). No augmentation (NULL or all off) gives {0, 0, false}. */
idx_augment_choice idx_augment_choose(const idx_augment *augment, uint64_t seed, uint64_t step,
                                      int row);

/* Rows [rows.begin, rows.end) of the global training batch for `step`:
 * images [rows.end - rows.begin, 1, height, width] in [0, 1], labels
 * [rows.end - rows.begin]. `augment` may be NULL (no augmentation).
 * CM_ERR_INVALID if global_batch < 1, the range is not inside
 * [0, global_batch) or crop_padding is outside [0, min(height, width)];
 * CM_ERR_NOMEM if the epoch order cannot be allocated. */
cm_status idx_dataset_batch(idx_dataset *dataset, uint64_t seed, uint64_t step, int global_batch,
                            shard_range rows, const idx_augment *augment, float *images,
                            int32_t *labels);

/* Sequential evaluation over a whole split, global_batch samples per batch. */
typedef struct idx_eval_iter {
    const idx_dataset *dataset;
    int global_batch, rank, ranks;
    int64_t num_samples; /* samples the walk covers: all, or max_batches full batches */
    int64_t next_sample; /* first sample of the next batch */
    int64_t batch_first; /* first sample of the batch idx_eval_next returned last */
} idx_eval_iter;

/* max_batches <= 0 means no limit. CM_ERR_INVALID for a batch < 1 or a rank
 * outside [0, ranks). */
cm_status idx_eval_begin(idx_eval_iter *iter, const idx_dataset *dataset, int global_batch,
                         int rank, int ranks, int64_t max_batches);
/* Fills this rank's rows of the next batch: images [*local_rows, 1, height,
 * width], labels [*local_rows] (room for global_batch rows needed); they are
 * samples batch_first + shard_rows(n, rank, ranks).begin onwards. Returns
 * n, the number of samples in the whole batch (all ranks), 0 when the split is
 * exhausted. *local_rows may be 0 on some ranks for a short last batch. */
int idx_eval_next(idx_eval_iter *iter, float *images, int32_t *labels, int *local_rows);

#endif
