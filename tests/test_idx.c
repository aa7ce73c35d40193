/* data/idx: loading small synthetic IDX.gz files (values / 255, big-endian
 * headers), every malformed-file error with the file name and the reason,
 * epoch-ordered training batches (deterministic, every sample once per
 * epoch), rank slices equal to rows of the global batch, augmentation against
 * an independent pad-crop-flip reference, the evaluation walk, and the real
 * Fashion-MNIST files from the Debian package. */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>

#include "common/rng.h"
#include "data/idx.h"

/* The synthetic set: odd, unequal sizes so that swapped axes, a flip of rows
 * instead of columns or little-endian dimensions cannot pass. */
enum { N = 13, H = 5, W = 7, IMAGE = H * W, BATCH = 5, MAX_ROWS = 64 };

static void temp_path(char *path) {
    strcpy(path, "/tmp/cmoe_test_idx_XXXXXX");
    int fd = mkstemp(path);
    ck_assert_int_ge(fd, 0);
    close(fd);
}

static void write_plain(char *path, const uint8_t *bytes, size_t size) {
    temp_path(path);
    FILE *file = fopen(path, "wb");
    ck_assert_ptr_nonnull(file);
    ck_assert_uint_eq(fwrite(bytes, 1, size, file), size);
    fclose(file);
}

static void write_gz(char *path, const uint8_t *bytes, size_t size) {
    temp_path(path);
    gzFile file = gzopen(path, "wb");
    ck_assert_ptr_nonnull(file);
    if (size > 0) ck_assert_int_eq(gzwrite(file, bytes, (unsigned)size), (int)size);
    ck_assert_int_eq(gzclose(file), Z_OK);
}

/* The compressed bytes of `bytes`; *compressed_size gets their count. */
static uint8_t *gzip_bytes(const uint8_t *bytes, size_t size, size_t *compressed_size) {
    char path[64];
    write_gz(path, bytes, size);
    FILE *file = fopen(path, "rb");
    ck_assert_ptr_nonnull(file);
    uint8_t *out = malloc(size + 1024);
    *compressed_size = fread(out, 1, size + 1024, file);
    fclose(file);
    unlink(path);
    return out;
}

static void put_u32_big_endian(uint8_t *out, uint32_t value) {
    out[0] = (uint8_t)(value >> 24);
    out[1] = (uint8_t)(value >> 16);
    out[2] = (uint8_t)(value >> 8);
    out[3] = (uint8_t)value;
}

/* Pixel (s, y, x) of the synthetic set: 1..255, never 0 (so a 0 in an
 * augmented image can only be padding), distinct enough that a wrong sample,
 * row or column shows. */
static uint8_t synthetic_pixel(int sample, int y, int x) {
    return (uint8_t)(1 + (sample * 71 + y * 23 + x * 5 + (x * y) % 3) % 255);
}

/* IDX image file bytes: header [magic, n, h, w] + n*h*w pixels; *size set. */
static uint8_t *image_file(uint32_t magic, uint32_t n, uint32_t h, uint32_t w, size_t num_pixels,
                           size_t *size) {
    *size = 16 + num_pixels;
    uint8_t *bytes = malloc(*size);
    put_u32_big_endian(bytes, magic);
    put_u32_big_endian(bytes + 4, n);
    put_u32_big_endian(bytes + 8, h);
    put_u32_big_endian(bytes + 12, w);
    for (size_t i = 0; i < num_pixels; i++) {
        size_t sample = i / IMAGE, y = i % IMAGE / W, x = i % W;
        bytes[16 + i] = synthetic_pixel((int)sample, (int)y, (int)x);
    }
    return bytes;
}

static uint8_t synthetic_label(int sample) {
    return (uint8_t)((sample * 7 + 3) % IDX_NUM_CLASSES);
}

static uint8_t *label_file(uint32_t magic, uint32_t n, size_t num_labels, size_t *size) {
    *size = 8 + num_labels;
    uint8_t *bytes = malloc(*size);
    put_u32_big_endian(bytes, magic);
    put_u32_big_endian(bytes + 4, n);
    for (size_t i = 0; i < num_labels; i++) bytes[8 + i] = synthetic_label((int)i);
    return bytes;
}

/* Writes the well-formed synthetic pair as .gz files. */
static void write_synthetic(char *images_path, char *labels_path) {
    size_t size;
    uint8_t *bytes = image_file(0x803, N, H, W, N * IMAGE, &size);
    write_gz(images_path, bytes, size);
    free(bytes);
    bytes = label_file(0x801, N, N, &size);
    write_gz(labels_path, bytes, size);
    free(bytes);
}

static void open_synthetic(idx_dataset *dataset) {
    char images_path[64], labels_path[64];
    write_synthetic(images_path, labels_path);
    cm_status status = idx_dataset_open(dataset, images_path, labels_path);
    unlink(images_path); /* loaded: nothing left behind even if a check fails */
    unlink(labels_path);
    ck_assert_msg(status == CM_OK, "%s", cm_error_message());
}

START_TEST(test_load_values) {
    idx_dataset dataset;
    open_synthetic(&dataset);
    ck_assert_int_eq(dataset.num_samples, N);
    ck_assert_int_eq(dataset.height, H);
    ck_assert_int_eq(dataset.width, W);
    float image[IMAGE];
    int high_pixels = 0;
    for (int s = 0; s < N; s++) {
        ck_assert_int_eq(dataset.labels[s], synthetic_label(s));
        idx_dataset_image(&dataset, s, image);
        for (int y = 0; y < H; y++)
            for (int x = 0; x < W; x++) {
                uint8_t pixel = synthetic_pixel(s, y, x);
                ck_assert_uint_eq(dataset.pixels[(s * H + y) * W + x], pixel);
                ck_assert_float_eq(image[y * W + x], (float)pixel / 255.0f);
                high_pixels += pixel >= 128;
            }
    }
    ck_assert_int_gt(high_pixels, 0); /* bytes >= 128 come out as large values, not negative */
    idx_dataset_close(&dataset);

    /* The ends of the range: 0 -> 0.0 and 255 -> 1.0 exactly. */
    size_t size;
    uint8_t *bytes = image_file(0x803, 1, 1, 2, 2, &size);
    bytes[16] = 0;
    bytes[17] = 255;
    char images_path[64], labels_path[64];
    write_gz(images_path, bytes, size);
    free(bytes);
    bytes = label_file(0x801, 1, 1, &size);
    write_gz(labels_path, bytes, size);
    free(bytes);
    cm_status status = idx_dataset_open(&dataset, images_path, labels_path);
    unlink(images_path);
    unlink(labels_path);
    ck_assert_int_eq(status, CM_OK);
    idx_dataset_image(&dataset, 0, image);
    ck_assert_float_eq(image[0], 0.0f);
    ck_assert_float_eq(image[1], 1.0f);
    idx_dataset_close(&dataset);
}
END_TEST

/* Opens (images, labels), expects `expected`, a message holding `name` and
 * every string in `reasons` (NULL-terminated), and an empty data set. */
static void expect_error(const char *images_path, const char *labels_path, cm_status expected,
                         const char *name, const char *const *reasons) {
    idx_dataset dataset;
    cm_status status = idx_dataset_open(&dataset, images_path, labels_path);
    const char *message = cm_error_message();
    ck_assert_msg(status == expected, "status %s, expected %s: %s", cm_status_name(status),
                  cm_status_name(expected), message);
    ck_assert_msg(strstr(message, name), "'%s' does not name %s", message, name);
    for (; *reasons; reasons++)
        ck_assert_msg(strstr(message, *reasons), "'%s' does not say '%s'", message, *reasons);
    ck_assert_ptr_null(dataset.pixels);
    ck_assert_ptr_null(dataset.labels);
    idx_dataset_close(&dataset);
}

#define REASONS(...) ((const char *const[]){__VA_ARGS__, NULL})

START_TEST(test_missing_and_not_gzip) {
    char images_path[64], labels_path[64];
    write_synthetic(images_path, labels_path);
    const char *missing = "/tmp/cmoe_no_such_dir/images.gz";
    expect_error(missing, labels_path, CM_ERR_IO, missing, REASONS("cannot open"));
    expect_error(images_path, missing, CM_ERR_IO, missing, REASONS("cannot open"));
    /* A path into data/fmnist says where the files come from. */
    const char *fmnist = "/tmp/cmoe_no_such_dir/fmnist/train-images-idx3-ubyte.gz";
    expect_error(
        fmnist, labels_path, CM_ERR_IO, fmnist,
        REASONS("data/prepare_fmnist.sh", "dataset-fashion-mnist", "scripts/install-deps.sh"));

    /* An uncompressed IDX file and an empty file are not gzip files. */
    size_t size;
    uint8_t *bytes = image_file(0x803, N, H, W, N * IMAGE, &size);
    char plain_path[64];
    write_plain(plain_path, bytes, size);
    free(bytes);
    expect_error(plain_path, labels_path, CM_ERR_FORMAT, plain_path, REASONS("not a gzip file"));
    unlink(plain_path);
    write_plain(plain_path, (const uint8_t *)"", 0);
    expect_error(images_path, plain_path, CM_ERR_FORMAT, plain_path, REASONS("not a gzip file"));
    unlink(plain_path);
    unlink(images_path);
    unlink(labels_path);
}
END_TEST

START_TEST(test_damaged_gzip_streams) {
    char images_path[64], labels_path[64];
    write_synthetic(images_path, labels_path);
    size_t size, compressed_size;
    uint8_t *bytes = image_file(0x803, N, H, W, N * IMAGE, &size);
    uint8_t *compressed = gzip_bytes(bytes, size, &compressed_size);
    free(bytes);
    char damaged_path[64];
    /* Cut inside the deflate stream: the gzip stream ends unexpectedly. */
    write_plain(damaged_path, compressed, compressed_size / 2);
    expect_error(damaged_path, labels_path, CM_ERR_IO, damaged_path,
                 REASONS("corrupt or truncated gzip stream"));
    unlink(damaged_path);
    /* Only the 4-byte CRC and length trailer missing: all data decodes, the
     * stream still is not complete. */
    write_plain(damaged_path, compressed, compressed_size - 8);
    expect_error(damaged_path, labels_path, CM_ERR_IO, damaged_path,
                 REASONS("corrupt or truncated gzip stream"));
    unlink(damaged_path);
    /* A wrong CRC: the data decodes but does not check. */
    compressed[compressed_size - 8] ^= 0x5a;
    write_plain(damaged_path, compressed, compressed_size);
    expect_error(damaged_path, labels_path, CM_ERR_IO, damaged_path,
                 REASONS("corrupt or truncated gzip stream"));
    unlink(damaged_path);
    free(compressed);
    unlink(images_path);
    unlink(labels_path);
}
END_TEST

START_TEST(test_wrong_magic) {
    char images_path[64], labels_path[64];
    write_synthetic(images_path, labels_path);
    /* Swapped files: each is rejected by its magic, with a hint. */
    expect_error(
        labels_path, images_path, CM_ERR_FORMAT, labels_path,
        REASONS("not an IDX image file: magic 0x00000801, expected 0x00000803", "swapped"));
    size_t size;
    char bad_path[64];
    uint8_t *bytes = label_file(0x803, N, N, &size);
    write_gz(bad_path, bytes, size);
    free(bytes);
    expect_error(images_path, bad_path, CM_ERR_FORMAT, bad_path,
                 REASONS("not an IDX label file: magic 0x00000803, expected 0x00000801"));
    unlink(bad_path);
    /* A little-endian magic (a byte-order mistake in a writer). */
    bytes = image_file(0x03080000, N, H, W, N * IMAGE, &size);
    write_gz(bad_path, bytes, size);
    free(bytes);
    expect_error(bad_path, labels_path, CM_ERR_FORMAT, bad_path,
                 REASONS("not an IDX image file: magic 0x03080000, expected 0x00000803"));
    unlink(bad_path);
    unlink(images_path);
    unlink(labels_path);
}
END_TEST

START_TEST(test_bad_sizes_and_labels) {
    char images_path[64], labels_path[64];
    write_synthetic(images_path, labels_path);
    size_t size;
    char bad_path[64];
    /* 12 labels for 13 images: both files named. */
    uint8_t *bytes = label_file(0x801, N - 1, N - 1, &size);
    write_gz(bad_path, bytes, size);
    free(bytes);
    expect_error(images_path, bad_path, CM_ERR_FORMAT, bad_path,
                 REASONS("has 12 labels", images_path, "has 13 images"));
    unlink(bad_path);

    /* Label 10 at sample 4. */
    bytes = label_file(0x801, N, N, &size);
    bytes[8 + 4] = 10;
    write_gz(bad_path, bytes, size);
    free(bytes);
    expect_error(images_path, bad_path, CM_ERR_FORMAT, bad_path,
                 REASONS("label 10 of sample 4 is outside 0..9"));
    unlink(bad_path);

    /* A header promising more data than the file holds. */
    bytes = image_file(0x803, N, H, W, 400, &size);
    write_gz(bad_path, bytes, size);
    free(bytes);
    expect_error(bad_path, labels_path, CM_ERR_IO, bad_path,
                 REASONS("expected 455 bytes of pixels, found 400"));
    unlink(bad_path);
    /* The largest header the bounds allow (2^58 bytes of pixels) on a file
     * with 400: truncated, found by reading, not by asking for 2^58 bytes
     * (fuzz/corpus/idx/huge-header; the sanitizers abort on that request). */
    bytes = image_file(0x803, 1u << 30, 1u << 14, 1u << 14, 400, &size);
    write_gz(bad_path, bytes, size);
    free(bytes);
    expect_error(bad_path, labels_path, CM_ERR_IO, bad_path,
                 REASONS("expected 288230376151711744 bytes of pixels, found 400"));
    unlink(bad_path);
    bytes = label_file(0x801, N, N - 1, &size);
    write_gz(bad_path, bytes, size);
    free(bytes);
    expect_error(images_path, bad_path, CM_ERR_IO, bad_path,
                 REASONS("expected 13 bytes of labels, found 12"));
    unlink(bad_path);
    bytes = image_file(0x803, N, H, W, 0, &size);
    write_gz(bad_path, bytes, size - 2); /* half of the width field */
    free(bytes);
    expect_error(bad_path, labels_path, CM_ERR_IO, bad_path,
                 REASONS("expected 12 bytes of IDX header, found 10"));
    unlink(bad_path);

    /* More data than the header describes. */
    bytes = image_file(0x803, N - 1, H, W, N * IMAGE, &size);
    write_gz(bad_path, bytes, size);
    free(bytes);
    expect_error(bad_path, labels_path, CM_ERR_FORMAT, bad_path,
                 REASONS("35 bytes after the data"));
    unlink(bad_path);

    /* Zero images and dimensions read with the wrong byte order. */
    bytes = image_file(0x803, 0, H, W, 0, &size);
    write_gz(bad_path, bytes, size);
    free(bytes);
    expect_error(bad_path, labels_path, CM_ERR_FORMAT, bad_path,
                 REASONS("implausible image dimensions [0, 5, 7]"));
    unlink(bad_path);
    bytes = image_file(0x803, N, 0x1c000000, 0x1c000000, 0, &size);
    write_gz(bad_path, bytes, size);
    free(bytes);
    expect_error(bad_path, labels_path, CM_ERR_FORMAT, bad_path,
                 REASONS("implausible image dimensions"));
    unlink(bad_path);
    unlink(images_path);
    unlink(labels_path);
}
END_TEST

/* The documented order, computed here from cm_rng_permutation directly. */
static int expected_sample(uint64_t seed, uint64_t step, int global_batch, int row) {
    uint64_t position = step * (uint64_t)global_batch + (uint64_t)row;
    int32_t order[N];
    cm_rng_permutation((cm_rng_key){seed, position / N, 0, CM_RNG_DATA}, N, order);
    return order[position % N];
}

/* Rows hold the image (/255) and label of the documented sample; over two
 * epochs every sample comes exactly once per epoch, in a new order. */
START_TEST(test_batches_follow_epoch_order) {
    idx_dataset dataset;
    open_synthetic(&dataset);
    float images[BATCH * IMAGE];
    int32_t labels[BATCH];
    int seen[2][N] = {{0}};
    int first_epoch[N], second_epoch[N];
    for (uint64_t step = 0; step < 6; step++) { /* 30 positions: epochs 0, 1 and part of 2 */
        ck_assert_int_eq(idx_dataset_batch(&dataset, 42, step, BATCH, (shard_range){0, BATCH}, NULL,
                                           images, labels),
                         CM_OK);
        for (int row = 0; row < BATCH; row++) {
            int sample = expected_sample(42, step, BATCH, row);
            int64_t reported = -1;
            ck_assert_int_eq(idx_dataset_sample_index(&dataset, 42, step, BATCH, row, &reported),
                             CM_OK);
            ck_assert_int_eq(reported, sample);
            ck_assert_int_eq(labels[row], synthetic_label(sample));
            for (int y = 0; y < H; y++)
                for (int x = 0; x < W; x++)
                    ck_assert_float_eq(images[row * IMAGE + y * W + x],
                                       (float)synthetic_pixel(sample, y, x) / 255.0f);
            int position = (int)step * BATCH + row;
            if (position < 2 * N) {
                seen[position / N][sample]++;
                (position < N ? first_epoch : second_epoch)[position % N] = sample;
            }
        }
    }
    for (int s = 0; s < N; s++) {
        ck_assert_int_eq(seen[0][s], 1);
        ck_assert_int_eq(seen[1][s], 1);
    }
    ck_assert(memcmp(first_epoch, second_epoch, sizeof first_epoch) != 0);
    int64_t sample;
    ck_assert_int_eq(idx_dataset_sample_index(&dataset, 42, 0, BATCH, BATCH, &sample),
                     CM_ERR_INVALID);
    idx_dataset_close(&dataset);
}
END_TEST

START_TEST(test_determinism) {
    const idx_augment augment = {2, true};
    idx_dataset dataset, fresh;
    open_synthetic(&dataset);
    open_synthetic(&fresh);
    float a[BATCH * IMAGE], b[BATCH * IMAGE], c[BATCH * IMAGE];
    int32_t a_labels[BATCH], b_labels[BATCH], c_labels[BATCH];
    const shard_range all = {0, BATCH};
    ck_assert_int_eq(idx_dataset_batch(&dataset, 5, 9, BATCH, all, &augment, a, a_labels), CM_OK);
    /* Another seed in the same epoch, after that epoch was cached for seed 5,
     * equals the batch of a data set that never cached anything. */
    ck_assert_int_eq(idx_dataset_batch(&fresh, 6, 9, BATCH, all, &augment, b, b_labels), CM_OK);
    ck_assert_int_eq(idx_dataset_batch(&dataset, 6, 9, BATCH, all, &augment, c, c_labels), CM_OK);
    ck_assert_mem_eq(b, c, sizeof b);
    ck_assert_mem_eq(b_labels, c_labels, sizeof b_labels);
    ck_assert(memcmp(a, b, sizeof a) != 0); /* another seed: another batch */
    /* Other epochs in the cache in between, then the same batch again, and
     * from the other data set: identical. */
    ck_assert_int_eq(idx_dataset_batch(&dataset, 5, 100, BATCH, all, &augment, b, b_labels), CM_OK);
    ck_assert_int_eq(idx_dataset_batch(&dataset, 6, 0, BATCH, all, &augment, b, b_labels), CM_OK);
    ck_assert_int_eq(idx_dataset_batch(&dataset, 5, 9, BATCH, all, &augment, b, b_labels), CM_OK);
    ck_assert_mem_eq(a, b, sizeof a);
    ck_assert_mem_eq(a_labels, b_labels, sizeof a_labels);
    ck_assert_int_eq(idx_dataset_batch(&fresh, 5, 9, BATCH, all, &augment, b, b_labels), CM_OK);
    ck_assert_mem_eq(a, b, sizeof a);
    ck_assert_mem_eq(a_labels, b_labels, sizeof a_labels);
    /* The next step gives another batch. */
    ck_assert_int_eq(idx_dataset_batch(&fresh, 5, 10, BATCH, all, &augment, b, b_labels), CM_OK);
    ck_assert(memcmp(a, b, sizeof a) != 0);
    idx_dataset_close(&dataset);
    idx_dataset_close(&fresh);
}
END_TEST

/* For R = 1..5 ranks, rank r's rows [r*B/R, (r+1)*B/R) are exactly those rows
 * of the single-rank batch, augmentation included, for batches that cross an
 * epoch boundary (B = 7, N = 13). */
START_TEST(test_rank_slices_equal_global_rows) {
    enum { B = 7 };
    const idx_augment augment = {2, true};
    idx_dataset dataset;
    open_synthetic(&dataset);
    for (uint64_t step = 0; step < 4; step++) {
        float global[B * IMAGE];
        int32_t global_labels[B];
        ck_assert_int_eq(idx_dataset_batch(&dataset, 8, step, B, (shard_range){0, B}, &augment,
                                           global, global_labels),
                         CM_OK);
        for (int ranks = 1; ranks <= 5; ranks++) {
            int next_row = 0;
            for (int rank = 0; rank < ranks; rank++) {
                shard_range rows = shard_rows(B, rank, ranks);
                ck_assert_int_eq(rows.begin, next_row);
                next_row = rows.end;
                float local[B * IMAGE];
                int32_t local_labels[B];
                ck_assert_int_eq(
                    idx_dataset_batch(&dataset, 8, step, B, rows, &augment, local, local_labels),
                    CM_OK);
                int count = rows.end - rows.begin;
                ck_assert_mem_eq(local, global + rows.begin * IMAGE,
                                 (size_t)count * IMAGE * sizeof(float));
                ck_assert_mem_eq(local_labels, global_labels + rows.begin,
                                 (size_t)count * sizeof(int32_t));
            }
            ck_assert_int_eq(next_row, B);
        }
    }
    float images[B * IMAGE];
    int32_t labels[B];
    ck_assert_int_eq(
        idx_dataset_batch(&dataset, 8, 0, B, (shard_range){3, B + 1}, NULL, images, labels),
        CM_ERR_INVALID);
    ck_assert_int_eq(
        idx_dataset_batch(&dataset, 8, 0, B, (shard_range){-1, 2}, NULL, images, labels),
        CM_ERR_INVALID);
    ck_assert_int_eq(
        idx_dataset_batch(&dataset, 8, 0, 0, (shard_range){0, 0}, NULL, images, labels),
        CM_ERR_INVALID);
    idx_dataset_close(&dataset);
}
END_TEST

/* Independent reference: zero-pad the image by p on every side, take the
 * H x W window whose top-left corner is (p + shift_y, p + shift_x), then
 * reverse the order of its columns if flipped. */
static void reference_augment(int sample, int padding, idx_augment_choice choice, float *out) {
    enum { MAX_PAD = 4 };
    double padded[H + 2 * MAX_PAD][W + 2 * MAX_PAD] = {{0}};
    for (int y = 0; y < H; y++)
        for (int x = 0; x < W; x++)
            padded[y + padding][x + padding] = synthetic_pixel(sample, y, x);
    double window[H][W];
    for (int y = 0; y < H; y++)
        for (int x = 0; x < W; x++)
            window[y][x] = padded[padding + choice.shift_y + y][padding + choice.shift_x + x];
    for (int y = 0; y < H; y++)
        for (int x = 0; x < W; x++) {
            double value = choice.flip ? window[y][W - 1 - x] : window[y][x];
            out[y * W + x] = (float)value / 255.0f;
        }
}

/* Every augmented row equals the reference for the row's drawn choice; the
 * draws cover exactly [-p, p] for both shifts and flip about half the rows. */
START_TEST(test_augmentation_matches_reference) {
    idx_dataset dataset;
    open_synthetic(&dataset);
    for (int padding = 0; padding <= 4; padding += 2) {
        const idx_augment augment = {padding, true};
        int shift_y_seen[9] = {0}, shift_x_seen[9] = {0}, flips = 0, rows_checked = 0;
        for (uint64_t step = 0; step < 40; step++) {
            float images[BATCH * IMAGE], expected[IMAGE];
            int32_t labels[BATCH];
            ck_assert_int_eq(idx_dataset_batch(&dataset, 3, step, BATCH, (shard_range){0, BATCH},
                                               &augment, images, labels),
                             CM_OK);
            for (int row = 0; row < BATCH; row++) {
                idx_augment_choice choice = idx_augment_choose(&augment, 3, step, row);
                ck_assert(choice.shift_y >= -padding && choice.shift_y <= padding);
                ck_assert(choice.shift_x >= -padding && choice.shift_x <= padding);
                shift_y_seen[choice.shift_y + 4]++;
                shift_x_seen[choice.shift_x + 4]++;
                flips += choice.flip;
                int sample = expected_sample(3, step, BATCH, row);
                ck_assert_int_eq(labels[row], synthetic_label(sample));
                reference_augment(sample, padding, choice, expected);
                for (int i = 0; i < IMAGE; i++)
                    ck_assert_msg(images[row * IMAGE + i] == expected[i],
                                  "p %d step %d row %d pixel %d: %g, expected %g (shift %d,%d "
                                  "flip %d)",
                                  padding, (int)step, row, i, images[row * IMAGE + i], expected[i],
                                  choice.shift_y, choice.shift_x, choice.flip);
                rows_checked++;
            }
        }
        for (int shift = -4; shift <= 4; shift++) {
            bool inside = shift >= -padding && shift <= padding;
            ck_assert_msg(inside == (shift_y_seen[shift + 4] > 0), "p %d shift_y %d", padding,
                          shift);
            ck_assert_msg(inside == (shift_x_seen[shift + 4] > 0), "p %d shift_x %d", padding,
                          shift);
        }
        ck_assert_int_gt(flips, rows_checked * 35 / 100);
        ck_assert_int_lt(flips, rows_checked * 65 / 100);
    }
    /* Vertical and horizontal shifts are separate draws. */
    const idx_augment crop = {2, false};
    int differ = 0;
    for (int row = 0; row < 50; row++) {
        idx_augment_choice choice = idx_augment_choose(&crop, 1, 1, row);
        differ += choice.shift_y != choice.shift_x;
        ck_assert(!choice.flip);
    }
    ck_assert_int_gt(differ, 10);
    idx_augment_choice none = idx_augment_choose(NULL, 1, 1, 0);
    ck_assert(none.shift_y == 0 && none.shift_x == 0 && !none.flip);
    idx_dataset_close(&dataset);
}
END_TEST

/* Spelled-out special cases: padding 0 without flip is the identity; a flip
 * mirrors the columns (not the rows); padded positions are exactly 0 and the
 * rest is the shifted image. */
START_TEST(test_crop_and_flip_cases) {
    idx_dataset dataset;
    open_synthetic(&dataset);
    const shard_range all = {0, BATCH};
    float plain[BATCH * IMAGE], images[BATCH * IMAGE];
    int32_t plain_labels[BATCH], labels[BATCH];
    ck_assert_int_eq(idx_dataset_batch(&dataset, 4, 2, BATCH, all, NULL, plain, plain_labels),
                     CM_OK);
    const idx_augment identity = {0, false};
    ck_assert_int_eq(idx_dataset_batch(&dataset, 4, 2, BATCH, all, &identity, images, labels),
                     CM_OK);
    ck_assert_mem_eq(images, plain, sizeof images);
    ck_assert_mem_eq(labels, plain_labels, sizeof labels);

    const idx_augment flip_only = {0, true};
    int flipped_rows = 0, kept_rows = 0;
    for (uint64_t step = 0; step < 8; step++) {
        ck_assert_int_eq(idx_dataset_batch(&dataset, 4, step, BATCH, all, NULL, plain, labels),
                         CM_OK);
        ck_assert_int_eq(
            idx_dataset_batch(&dataset, 4, step, BATCH, all, &flip_only, images, labels), CM_OK);
        for (int row = 0; row < BATCH; row++) {
            const float *in = plain + row * IMAGE, *out = images + row * IMAGE;
            bool flip = idx_augment_choose(&flip_only, 4, step, row).flip;
            flipped_rows += flip;
            kept_rows += !flip;
            for (int y = 0; y < H; y++)
                for (int x = 0; x < W; x++) {
                    float mirrored = in[y * W + (W - 1 - x)], kept = in[y * W + x];
                    ck_assert_float_eq(out[y * W + x], flip ? mirrored : kept);
                }
        }
    }
    ck_assert_int_gt(flipped_rows, 0);
    ck_assert_int_gt(kept_rows, 0);

    /* p = 2: every pixel is either 0, exactly where the shifted position falls
     * outside the image, or the (never 0) source pixel it shifted from. */
    const idx_augment crop = {2, false};
    int zeros = 0;
    for (uint64_t step = 0; step < 8; step++) {
        ck_assert_int_eq(idx_dataset_batch(&dataset, 4, step, BATCH, all, &crop, images, labels),
                         CM_OK);
        for (int row = 0; row < BATCH; row++) {
            idx_augment_choice choice = idx_augment_choose(&crop, 4, step, row);
            int sample = expected_sample(4, step, BATCH, row);
            for (int y = 0; y < H; y++)
                for (int x = 0; x < W; x++) {
                    int src_y = y + choice.shift_y, src_x = x + choice.shift_x;
                    bool outside = src_y < 0 || src_y >= H || src_x < 0 || src_x >= W;
                    float value = images[row * IMAGE + y * W + x];
                    if (outside) {
                        ck_assert_float_eq(value, 0.0f);
                        zeros++;
                    } else {
                        ck_assert_float_eq(value,
                                           (float)synthetic_pixel(sample, src_y, src_x) / 255.0f);
                    }
                }
        }
    }
    ck_assert_int_gt(zeros, 0);

    /* Padding must be within 0..min(H, W). */
    const idx_augment negative = {-1, false}, too_wide = {H + 1, false};
    ck_assert_int_eq(idx_dataset_batch(&dataset, 4, 0, BATCH, all, &negative, images, labels),
                     CM_ERR_INVALID);
    ck_assert_int_eq(idx_dataset_batch(&dataset, 4, 0, BATCH, all, &too_wide, images, labels),
                     CM_ERR_INVALID);
    idx_dataset_close(&dataset);
}
END_TEST

/* The walk returns samples 0..N-1 in order (batches of 5, 5, 3) for every
 * rank split, including ranks with no rows in the short batch; a batch cap
 * stops early. */
START_TEST(test_eval_iterator) {
    idx_dataset dataset;
    open_synthetic(&dataset);
    for (int ranks = 1; ranks <= 4; ranks++) {
        idx_eval_iter iters[4];
        for (int rank = 0; rank < ranks; rank++)
            ck_assert_int_eq(idx_eval_begin(&iters[rank], &dataset, BATCH, rank, ranks, 0), CM_OK);
        float all[N * IMAGE];
        int32_t all_labels[N];
        memset(all, 0xff, sizeof all);
        int done = 0, batches = 0;
        for (;;) {
            int batch_samples = 0, row_offset = 0;
            for (int rank = 0; rank < ranks; rank++) {
                float images[BATCH * IMAGE];
                int32_t labels[BATCH];
                int local = -1;
                int n = idx_eval_next(&iters[rank], images, labels, &local);
                if (rank == 0) batch_samples = n;
                ck_assert_int_eq(n, batch_samples);
                shard_range rows = shard_rows(n, rank, ranks);
                ck_assert_int_eq(local, rows.end - rows.begin);
                ck_assert_int_eq(rows.begin, row_offset);
                if (n > 0) ck_assert_int_eq(iters[rank].batch_first, done);
                memcpy(all + (size_t)(done + row_offset) * IMAGE, images,
                       (size_t)local * IMAGE * sizeof(float));
                memcpy(all_labels + done + row_offset, labels, (size_t)local * sizeof(int32_t));
                row_offset += local;
            }
            if (batch_samples == 0) break;
            ck_assert_int_eq(row_offset, batch_samples);
            done += batch_samples;
            batches++;
        }
        ck_assert_int_eq(done, N);
        ck_assert_int_eq(batches, 3);
        for (int s = 0; s < N; s++) {
            ck_assert_int_eq(all_labels[s], synthetic_label(s));
            for (int i = 0; i < IMAGE; i++)
                ck_assert_float_eq(all[s * IMAGE + i],
                                   (float)synthetic_pixel(s, i / W, i % W) / 255.0f);
        }
    }
    /* max_batches = 2: 10 samples; 3 or more is the whole split. */
    for (int max_batches = 2; max_batches <= 3; max_batches++) {
        idx_eval_iter iter;
        ck_assert_int_eq(idx_eval_begin(&iter, &dataset, BATCH, 0, 1, max_batches), CM_OK);
        float images[BATCH * IMAGE];
        int32_t labels[BATCH];
        int local = 0, total = 0;
        for (int n; (n = idx_eval_next(&iter, images, labels, &local)) > 0;) total += n;
        ck_assert_int_eq(total, max_batches == 2 ? 2 * BATCH : N);
        ck_assert_int_eq(idx_eval_next(&iter, images, labels, &local), 0);
        ck_assert_int_eq(local, 0);
    }
    idx_eval_iter iter;
    ck_assert_int_eq(idx_eval_begin(&iter, &dataset, 0, 0, 1, 0), CM_ERR_INVALID);
    ck_assert_int_eq(idx_eval_begin(&iter, &dataset, BATCH, 2, 2, 0), CM_ERR_INVALID);
    idx_dataset_close(&dataset);
}
END_TEST

/* The real files from Debian's dataset-fashion-mnist (scripts/install-deps.sh
 * installs it). Known facts, checked with Python's gzip module on the
 * package version 0.0~git20200523.55506a9-1: 60000/10000 images of 28x28,
 * 6000/1000 of each class, the first labels, and pixel sums. */
START_TEST(test_real_fashion_mnist) {
    static const struct {
        const char *images, *labels;
        int64_t num_samples, per_class;
        int32_t first_labels[5];
        int64_t first_image_sum, all_pixel_sum;
    } splits[2] = {
        {"train-images-idx3-ubyte.gz",
         "train-labels-idx1-ubyte.gz",
         60000,
         6000,
         {9, 0, 0, 3, 0},
         76247,
         3431114169LL},
        {"t10k-images-idx3-ubyte.gz",
         "t10k-labels-idx1-ubyte.gz",
         10000,
         1000,
         {9, 2, 1, 1, 6},
         33456,
         573469082LL},
    };
    const char *dir = "/usr/share/datasets/fashion-mnist";
    for (int split = 0; split < 2; split++) {
        char images_path[256], labels_path[256];
        snprintf(images_path, sizeof images_path, "%s/%s", dir, splits[split].images);
        snprintf(labels_path, sizeof labels_path, "%s/%s", dir, splits[split].labels);
        idx_dataset dataset;
        cm_status status = idx_dataset_open(&dataset, images_path, labels_path);
        ck_assert_msg(status == CM_OK,
                      "%s (install the Debian package dataset-fashion-mnist: "
                      "scripts/install-deps.sh)",
                      cm_error_message());
        ck_assert_int_eq(dataset.num_samples, splits[split].num_samples);
        ck_assert_int_eq(dataset.height, 28);
        ck_assert_int_eq(dataset.width, 28);
        int64_t per_class[IDX_NUM_CLASSES] = {0};
        for (int64_t s = 0; s < dataset.num_samples; s++) per_class[dataset.labels[s]]++;
        for (int c = 0; c < IDX_NUM_CLASSES; c++)
            ck_assert_int_eq(per_class[c], splits[split].per_class);
        for (int s = 0; s < 5; s++)
            ck_assert_int_eq(dataset.labels[s], splits[split].first_labels[s]);
        int64_t first_sum = 0, all_sum = 0;
        for (int i = 0; i < 784; i++) first_sum += dataset.pixels[i];
        for (int64_t i = 0; i < dataset.num_samples * 784; i++) all_sum += dataset.pixels[i];
        ck_assert_int_eq(first_sum, splits[split].first_image_sum);
        ck_assert_int_eq(all_sum, splits[split].all_pixel_sum);

        /* An augmented batch of real images: values in [0, 1], labels valid. */
        enum { B = 16 };
        static float images[B * 784];
        int32_t labels[B];
        const idx_augment augment = {4, true};
        ck_assert_int_eq(
            idx_dataset_batch(&dataset, 1, 7, B, (shard_range){0, B}, &augment, images, labels),
            CM_OK);
        float max_value = 0.0f;
        for (int i = 0; i < B * 784; i++) {
            ck_assert(images[i] >= 0.0f && images[i] <= 1.0f);
            if (images[i] > max_value) max_value = images[i];
        }
        ck_assert_float_eq(max_value, 1.0f);
        for (int row = 0; row < B; row++) ck_assert(labels[row] >= 0 && labels[row] < 10);
        idx_dataset_close(&dataset);
    }
}
END_TEST

int main(void) {
    Suite *suite = suite_create("idx");
    TCase *tc = tcase_create("idx");
    tcase_add_test(tc, test_load_values);
    tcase_add_test(tc, test_missing_and_not_gzip);
    tcase_add_test(tc, test_damaged_gzip_streams);
    tcase_add_test(tc, test_wrong_magic);
    tcase_add_test(tc, test_bad_sizes_and_labels);
    tcase_add_test(tc, test_batches_follow_epoch_order);
    tcase_add_test(tc, test_determinism);
    tcase_add_test(tc, test_rank_slices_equal_global_rows);
    tcase_add_test(tc, test_augmentation_matches_reference);
    tcase_add_test(tc, test_crop_and_flip_cases);
    tcase_add_test(tc, test_eval_iterator);
    tcase_add_test(tc, test_real_fashion_mnist);
    suite_add_tcase(suite, tc);
    SRunner *runner = srunner_create(suite);
    srunner_run_all(runner, CK_NORMAL);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
