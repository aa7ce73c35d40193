/* IDX (Fashion-MNIST) loading through zlib, epoch-ordered training batches
 * with augmentation, and the evaluation walk. */
#include "data/idx.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "common/rng.h"
#include "common/check.h"

enum {
    IDX_MAGIC_IMAGES = 0x00000803, /* uint8, 3 dimensions */
    IDX_MAGIC_LABELS = 0x00000801, /* uint8, 1 dimension */
    /* Bounds that keep a corrupt header from asking for absurd allocations;
     * the sample count also has to fit the int32 permutation. */
    IDX_MAX_SIDE = 1 << 14,
    IDX_MAX_SAMPLES = 1 << 30,
};

/* The Fashion-MNIST files come from a package through a script; say so when
 * one is missing. */
static const char *missing_hint(const char *path) {
    return strstr(path, "fmnist") || strstr(path, "fashion-mnist")
               ? " (run data/prepare_fmnist.sh; the files come from the Debian package "
                 "dataset-fashion-mnist, which scripts/install-deps.sh installs)"
               : "";
}

/* An open gzip stream and the file name for messages. */
typedef struct idx_reader {
    gzFile file;
    const char *path;
} idx_reader;

/* Checks the gzip magic bytes before zlib sees the file: gzread would
 * otherwise pass a plain file through unchanged. */
static cm_status reader_open(idx_reader *reader, const char *path) {
    reader->file = NULL;
    reader->path = path;
    FILE *file = fopen(path, "rb");
    if (!file)
        return CM_ERR(CM_ERR_IO, "cannot open IDX file '%s': %s%s", path, strerror(errno),
                      missing_hint(path));
    unsigned char magic[2] = {0, 0};
    size_t got = fread(magic, 1, 2, file);
    fclose(file);
    if (got < 2 || magic[0] != 0x1f || magic[1] != 0x8b)
        return CM_ERR(CM_ERR_FORMAT,
                      "'%s' is not a gzip file (%s; expected a gzip-compressed IDX file as "
                      "dataset-fashion-mnist ships them)",
                      path, got < 2 ? "shorter than 2 bytes" : "no 1f 8b signature");
    reader->file = gzopen(path, "rb");
    if (!reader->file)
        return CM_ERR(CM_ERR_IO, "cannot open IDX file '%s': %s", path,
                      errno ? strerror(errno) : "out of memory");
    gzbuffer(reader->file, 1 << 17); /* fewer read calls on the 26 MB training images */
    return CM_OK;
}

static void reader_close(idx_reader *reader) {
    if (reader->file) gzclose(reader->file);
    reader->file = NULL;
}

/* Reads up to `size` bytes; *got = how many arrived before the stream ended.
 * A corrupt or truncated gzip stream is an error, even when zlib found it
 * while reading ahead of the bytes asked for; a clean end is not (the caller
 * compares *got with what the header promised). */
static cm_status reader_read(idx_reader *reader, void *buffer, size_t size, size_t *got) {
    *got = 0;
    while (*got < size) {
        size_t chunk = size - *got < (1u << 30) ? size - *got : (1u << 30);
        int n = gzread(reader->file, (unsigned char *)buffer + *got, (unsigned)chunk);
        if (n > 0) *got += (size_t)n;
        if (n < (int)chunk) break;
    }
    int zlib_error = Z_OK;
    const char *message = gzerror(reader->file, &zlib_error);
    if (zlib_error != Z_OK && zlib_error != Z_STREAM_END) {
        /* zlib's message starts with the path, which ours already names. */
        size_t path_length = strlen(reader->path);
        if (strncmp(message, reader->path, path_length) == 0 && message[path_length] == ':')
            message += path_length + 1 + (message[path_length + 1] == ' ');
        return CM_ERR(CM_ERR_IO, "'%s': corrupt or truncated gzip stream (zlib: %s)", reader->path,
                      message);
    }
    return CM_OK;
}

static cm_status read_exact(idx_reader *reader, void *buffer, size_t size, const char *what) {
    size_t got;
    CM_TRY(reader_read(reader, buffer, size, &got));
    if (got != size)
        return CM_ERR(CM_ERR_IO, "'%s' is truncated: expected %zu bytes of %s, found %zu",
                      reader->path, size, what, got);
    return CM_OK;
}

/* Reads exactly `size` bytes into a malloc'd *out (NULL on failure), growing
 * the buffer as the data arrives: a damaged header that promises terabytes
 * is reported as a truncated file after the bytes the file has, instead of
 * asking for terabytes up front. */
static cm_status read_growing(idx_reader *reader, size_t size, const char *what, uint8_t **out) {
    *out = NULL;
    uint8_t *buffer = NULL;
    size_t capacity = 0, used = 0;
    while (used < size) {
        size_t next = capacity ? 2 * capacity : (size_t)1 << 20;
        if (next > size) next = size;
        uint8_t *grown = realloc(buffer, next);
        if (!grown) {
            free(buffer);
            return CM_ERR(CM_ERR_NOMEM, "cannot allocate %zu bytes for the %s of '%s'", next, what,
                          reader->path);
        }
        buffer = grown;
        capacity = next;
        size_t got;
        cm_status status = reader_read(reader, buffer + used, capacity - used, &got);
        used += got;
        if (status == CM_OK && used < capacity)
            status = CM_ERR(CM_ERR_IO, "'%s' is truncated: expected %zu bytes of %s, found %zu",
                            reader->path, size, what, used);
        if (status != CM_OK) {
            free(buffer);
            return status;
        }
    }
    *out = buffer;
    return CM_OK;
}

/* The data must end the file: trailing bytes mean the header is wrong. */
static cm_status expect_end(idx_reader *reader) {
    unsigned char extra[4096];
    size_t got, total = 0;
    do {
        CM_TRY(reader_read(reader, extra, sizeof extra, &got));
        total += got;
    } while (got == sizeof extra);
    if (total > 0)
        return CM_ERR(CM_ERR_FORMAT,
                      "'%s' has %zu%s bytes after the data its header describes (wrong header?)",
                      reader->path, total, total >= sizeof extra ? " or more" : "");
    return CM_OK;
}

static uint32_t big_endian_u32(const unsigned char bytes[4]) {
    return (uint32_t)bytes[0] << 24 | (uint32_t)bytes[1] << 16 | (uint32_t)bytes[2] << 8 |
           (uint32_t)bytes[3];
}

/* Reads magic and dimensions: dims[num_dims]. */
static cm_status read_header(idx_reader *reader, uint32_t expected_magic, const char *kind,
                             int num_dims, uint32_t *dims) {
    unsigned char bytes[16];
    CM_TRY(read_exact(reader, bytes, 4, "IDX header"));
    uint32_t magic = big_endian_u32(bytes);
    if (magic != expected_magic) {
        const char *swapped =
            magic == IDX_MAGIC_LABELS   ? " (that is an IDX label file: images and labels swapped?)"
            : magic == IDX_MAGIC_IMAGES ? " (that is an IDX image file: images and labels swapped?)"
                                        : "";
        return CM_ERR(CM_ERR_FORMAT, "'%s' is not an IDX %s file: magic 0x%08x, expected 0x%08x%s",
                      reader->path, kind, magic, expected_magic, swapped);
    }
    CM_TRY(read_exact(reader, bytes, 4 * (size_t)num_dims, "IDX header"));
    for (int d = 0; d < num_dims; d++) dims[d] = big_endian_u32(bytes + 4 * d);
    return CM_OK;
}

static cm_status load_images(idx_dataset *dataset, const char *path) {
    idx_reader reader;
    CM_TRY(reader_open(&reader, path));
    uint32_t dims[3];
    cm_status status = read_header(&reader, IDX_MAGIC_IMAGES, "image", 3, dims);
    if (status == CM_OK && (dims[0] < 1 || dims[0] > IDX_MAX_SAMPLES || dims[1] < 1 ||
                            dims[1] > IDX_MAX_SIDE || dims[2] < 1 || dims[2] > IDX_MAX_SIDE))
        status =
            CM_ERR(CM_ERR_FORMAT,
                   "'%s': implausible image dimensions [%u, %u, %u] (need 1..%d images of "
                   "1..%d x 1..%d pixels)",
                   path, dims[0], dims[1], dims[2], IDX_MAX_SAMPLES, IDX_MAX_SIDE, IDX_MAX_SIDE);
    if (status == CM_OK)
        status =
            read_growing(&reader, (size_t)dims[0] * dims[1] * dims[2], "pixels", &dataset->pixels);
    if (status == CM_OK) status = expect_end(&reader);
    reader_close(&reader);
    if (status != CM_OK) return status;
    dataset->num_samples = dims[0];
    dataset->height = (int)dims[1];
    dataset->width = (int)dims[2];
    return CM_OK;
}

static cm_status load_labels(idx_dataset *dataset, const char *path) {
    idx_reader reader;
    CM_TRY(reader_open(&reader, path));
    uint32_t count = 0;
    cm_status status = read_header(&reader, IDX_MAGIC_LABELS, "label", 1, &count);
    if (status == CM_OK && count != (uint64_t)dataset->num_samples)
        status = CM_ERR(CM_ERR_FORMAT, "'%s' has %u labels but '%s' has %lld images", path, count,
                        dataset->images_path, (long long)dataset->num_samples);
    uint8_t *raw = NULL;
    if (status == CM_OK) {
        raw = malloc(count);
        dataset->labels = malloc((size_t)count * sizeof *dataset->labels);
        if (!raw || !dataset->labels)
            status = CM_ERR(CM_ERR_NOMEM, "cannot allocate %u labels for '%s'", count, path);
    }
    if (status == CM_OK) status = read_exact(&reader, raw, count, "labels");
    if (status == CM_OK) status = expect_end(&reader);
    reader_close(&reader);
    for (uint32_t i = 0; status == CM_OK && i < count; i++) {
        if (raw[i] < IDX_NUM_CLASSES)
            dataset->labels[i] = raw[i];
        else
            status = CM_ERR(CM_ERR_FORMAT, "'%s': label %u of sample %u is outside 0..%d", path,
                            (unsigned)raw[i], i, IDX_NUM_CLASSES - 1);
    }
    free(raw);
    return status;
}

cm_status idx_dataset_open(idx_dataset *dataset, const char *images_path, const char *labels_path) {
    memset(dataset, 0, sizeof *dataset);
    dataset->epoch_order_epoch = -1;
    snprintf(dataset->images_path, sizeof dataset->images_path, "%s", images_path);
    snprintf(dataset->labels_path, sizeof dataset->labels_path, "%s", labels_path);
    cm_status status = load_images(dataset, images_path);
    if (status == CM_OK) status = load_labels(dataset, labels_path);
    if (status != CM_OK) idx_dataset_close(dataset);
    return status;
}

void idx_dataset_close(idx_dataset *dataset) {
    free(dataset->pixels);
    free(dataset->labels);
    free(dataset->epoch_order);
    memset(dataset, 0, sizeof *dataset);
    dataset->epoch_order_epoch = -1;
}

/* pixels [height*width] bytes -> out [height*width] = x / 255. */
static void bytes_to_unit(const uint8_t *pixels, int64_t count, float *out) {
    for (int64_t i = 0; i < count; i++) out[i] = (float)pixels[i] / 255.0f;
}

void idx_dataset_image(const idx_dataset *dataset, int64_t index, float *out) {
    const int64_t image_size = (int64_t)dataset->height * dataset->width;
    CM_ASSERT(index >= 0 && index < dataset->num_samples, "image %lld of %lld", (long long)index,
              (long long)dataset->num_samples);
    bytes_to_unit(dataset->pixels + index * image_size, image_size, out);
}

/* Makes dataset->epoch_order the permutation of `epoch` for `seed`. */
static cm_status ensure_epoch_order(idx_dataset *dataset, uint64_t seed, int64_t epoch) {
    if (dataset->epoch_order_epoch == epoch && dataset->epoch_order_seed == seed) return CM_OK;
    if (!dataset->epoch_order) {
        dataset->epoch_order = malloc((size_t)dataset->num_samples * sizeof(int32_t));
        if (!dataset->epoch_order)
            return CM_ERR(CM_ERR_NOMEM, "cannot allocate the epoch order of %lld samples of '%s'",
                          (long long)dataset->num_samples, dataset->images_path);
    }
    cm_rng_key key = {seed, (uint64_t)epoch, 0, CM_RNG_DATA};
    cm_rng_permutation(key, (int32_t)dataset->num_samples, dataset->epoch_order);
    dataset->epoch_order_seed = seed;
    dataset->epoch_order_epoch = epoch;
    return CM_OK;
}

cm_status idx_dataset_sample_index(idx_dataset *dataset, uint64_t seed, uint64_t step,
                                   int global_batch, int row, int64_t *sample) {
    if (row < 0 || row >= global_batch)
        return CM_ERR(CM_ERR_INVALID, "row %d is not inside a batch of %d", row, global_batch);
    const uint64_t num_samples = (uint64_t)dataset->num_samples;
    const uint64_t position = step * (uint64_t)global_batch + (uint64_t)row;
    CM_TRY(ensure_epoch_order(dataset, seed, (int64_t)(position / num_samples)));
    *sample = dataset->epoch_order[position % num_samples];
    return CM_OK;
}

/* A uniform integer in [low, high] from 32 random bits (multiply-shift). */
static int uniform_in(uint32_t bits, int low, int high) {
    return low + (int)(((uint64_t)bits * (uint64_t)(high - low + 1)) >> 32);
}

idx_augment_choice idx_augment_choose(const idx_augment *augment, uint64_t seed, uint64_t step,
                                      int row) {
    idx_augment_choice choice = {0, 0, false};
    if (!augment || (augment->crop_padding == 0 && !augment->horizontal_flip)) return choice;
    uint32_t bits[4];
    cm_rng_block((cm_rng_key){seed, step, 0, CM_RNG_AUGMENT}, (uint64_t)row, bits);
    const int padding = augment->crop_padding;
    choice.shift_y = uniform_in(bits[0], -padding, padding);
    choice.shift_x = uniform_in(bits[1], -padding, padding);
    choice.flip = augment->horizontal_flip && (bits[2] >> 31);
    return choice;
}

/* src [height, width] bytes -> out [height, width]: out[y][x] = src[y + dy][x'
 * + dx] / 255 with x' = flip ? width-1-x : x, 0 outside the image. */
static void augment_image(const uint8_t *src, int height, int width, idx_augment_choice choice,
                          float *out) {
    for (int y = 0; y < height; y++) {
        const int src_y = y + choice.shift_y;
        float *out_row = out + (size_t)y * width;
        if (src_y < 0 || src_y >= height) {
            memset(out_row, 0, (size_t)width * sizeof *out_row);
            continue;
        }
        const uint8_t *src_row = src + (size_t)src_y * width;
        for (int x = 0; x < width; x++) {
            const int src_x = (choice.flip ? width - 1 - x : x) + choice.shift_x;
            out_row[x] = src_x >= 0 && src_x < width ? (float)src_row[src_x] / 255.0f : 0.0f;
        }
    }
}

cm_status idx_dataset_batch(idx_dataset *dataset, uint64_t seed, uint64_t step, int global_batch,
                            shard_range rows, const idx_augment *augment, float *images,
                            int32_t *labels) {
    if (global_batch < 1)
        return CM_ERR(CM_ERR_INVALID, "training batch %d must be >= 1", global_batch);
    if (rows.begin < 0 || rows.begin > rows.end || rows.end > global_batch)
        return CM_ERR(CM_ERR_INVALID, "rows [%d, %d) are not inside a batch of %d", rows.begin,
                      rows.end, global_batch);
    const int max_padding = dataset->height < dataset->width ? dataset->height : dataset->width;
    if (augment && (augment->crop_padding < 0 || augment->crop_padding > max_padding))
        return CM_ERR(CM_ERR_INVALID, "crop padding %d is outside 0..%d for %dx%d images of '%s'",
                      augment->crop_padding, max_padding, dataset->height, dataset->width,
                      dataset->images_path);
    const int64_t image_size = (int64_t)dataset->height * dataset->width;
    for (int row = rows.begin; row < rows.end; row++) {
        int64_t sample;
        CM_TRY(idx_dataset_sample_index(dataset, seed, step, global_batch, row, &sample));
        const uint8_t *src = dataset->pixels + sample * image_size;
        float *out = images + (size_t)(row - rows.begin) * (size_t)image_size;
        idx_augment_choice choice = idx_augment_choose(augment, seed, step, row);
        if (choice.shift_y == 0 && choice.shift_x == 0 && !choice.flip)
            bytes_to_unit(src, image_size, out);
        else
            augment_image(src, dataset->height, dataset->width, choice, out);
        labels[row - rows.begin] = dataset->labels[sample];
    }
    return CM_OK;
}

cm_status idx_eval_begin(idx_eval_iter *iter, const idx_dataset *dataset, int global_batch,
                         int rank, int ranks, int64_t max_batches) {
    memset(iter, 0, sizeof *iter);
    if (global_batch < 1)
        return CM_ERR(CM_ERR_INVALID, "evaluation batch %d must be >= 1", global_batch);
    if (ranks < 1 || rank < 0 || rank >= ranks)
        return CM_ERR(CM_ERR_INVALID, "rank %d of %d", rank, ranks);
    iter->dataset = dataset;
    iter->global_batch = global_batch;
    iter->rank = rank;
    iter->ranks = ranks;
    iter->num_samples = dataset->num_samples;
    if (max_batches > 0 && max_batches <= iter->num_samples / global_batch)
        iter->num_samples = max_batches * global_batch;
    return CM_OK;
}

int idx_eval_next(idx_eval_iter *iter, float *images, int32_t *labels, int *local_rows) {
    int64_t remaining = iter->num_samples - iter->next_sample;
    int batch_samples = (int)(remaining < iter->global_batch ? remaining : iter->global_batch);
    *local_rows = 0;
    if (batch_samples <= 0) return 0;
    const idx_dataset *dataset = iter->dataset;
    const int64_t image_size = (int64_t)dataset->height * dataset->width;
    shard_range rows = shard_rows(batch_samples, iter->rank, iter->ranks);
    for (int row = rows.begin; row < rows.end; row++) {
        int64_t sample = iter->next_sample + row;
        idx_dataset_image(dataset, sample,
                          images + (size_t)(row - rows.begin) * (size_t)image_size);
        labels[row - rows.begin] = dataset->labels[sample];
    }
    *local_rows = rows.end - rows.begin;
    iter->batch_first = iter->next_sample;
    iter->next_sample += batch_samples;
    return batch_samples;
}
