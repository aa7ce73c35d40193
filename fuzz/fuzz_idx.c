/* libFuzzer target: the IDX reader (data/idx.h), images and labels.
 *
 * Input: byte 0 holds flags, bytes 1-2 the length L of the image file
 * (big-endian, clamped to what follows), then L bytes of the image file and
 * the rest is the label file. Each file is written to the target's
 * temporary directory gzip-compressed by the target, so mutations reach the
 * IDX header and data, or (flag bit 0: images, bit 1: labels) as given, so
 * they reach the gzip stream too. When both files load, a training batch
 * (augmented as bits 2-5 say) and an evaluation walk are read from them. */
#include <stdlib.h>
#include <string.h>

#include "data/idx.h"
#include "fuzz_util.h"

enum { RAW_IMAGES = 1, RAW_LABELS = 2, MAX_BATCH = 5 };

/* A batch of up to MAX_BATCH rows at two steps, then an evaluation walk. */
static void read_batches(idx_dataset *dataset, uint8_t flags) {
    const size_t image = (size_t)dataset->height * (size_t)dataset->width;
    int batch = dataset->num_samples < MAX_BATCH ? (int)dataset->num_samples : MAX_BATCH;
    float *images = malloc((size_t)MAX_BATCH * image * sizeof(float));
    int32_t *labels = malloc(MAX_BATCH * sizeof(int32_t));
    if (!images || !labels) fuzz_fail("out of memory");
    idx_augment augment = {.crop_padding = (flags >> 2) & 7, .horizontal_flip = flags >> 5 & 1};
    int min_side = dataset->height < dataset->width ? dataset->height : dataset->width;
    for (uint64_t step = 0; step < 8; step += 7) {
        shard_range rows = {0, batch};
        cm_status status =
            idx_dataset_batch(dataset, 1234, step, batch, rows, &augment, images, labels);
        if ((status == CM_OK) != (augment.crop_padding <= min_side))
            fuzz_fail("idx_dataset_batch: %s with crop %d of %dx%d images", cm_status_name(status),
                      augment.crop_padding, dataset->height, dataset->width);
        for (int i = 0; status == CM_OK && i < batch; i++)
            if (labels[i] < 0 || labels[i] >= IDX_NUM_CLASSES) fuzz_fail("label %d", labels[i]);
    }
    idx_eval_iter iter;
    if (idx_eval_begin(&iter, dataset, 3, 0, 1, 4) != CM_OK) fuzz_fail("idx_eval_begin");
    int local_rows = 0;
    while (idx_eval_next(&iter, images, labels, &local_rows) > 0)
        if (local_rows < 0 || local_rows > 3) fuzz_fail("local rows %d", local_rows);
    free(images);
    free(labels);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 3) return 0;
    uint8_t flags = data[0];
    size_t image_size = (size_t)data[1] << 8 | data[2];
    data += 3;
    size -= 3;
    if (image_size > size) image_size = size;
    char images_path[512], labels_path[512];
    fuzz_temp_path("images.idx.gz", images_path, sizeof images_path);
    fuzz_temp_path("labels.idx.gz", labels_path, sizeof labels_path);
    fuzz_write_file(images_path, data, image_size, !(flags & RAW_IMAGES));
    fuzz_write_file(labels_path, data + image_size, size - image_size, !(flags & RAW_LABELS));
    idx_dataset dataset;
    if (idx_dataset_open(&dataset, images_path, labels_path) == CM_OK) {
        if (dataset.num_samples < 1 || dataset.height < 1 || dataset.width < 1)
            fuzz_fail("opened an empty data set");
        read_batches(&dataset, flags);
        idx_dataset_close(&dataset);
    }
    cm_error_clear();
    return 0;
}
