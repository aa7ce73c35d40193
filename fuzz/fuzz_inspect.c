/* libFuzzer target: `cmoe inspect`'s reader, ckpt_describe
 * (train/checkpoint.h), on an HDF5 file written to the target's temporary
 * directory, printing to /dev/null. Besides no crash/hang/leak: no HDF5
 * object stays open. */
#include <hdf5.h>
#include <stdio.h>

#include "fuzz_util.h"
#include "train/checkpoint.h"

static FILE *sink;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!sink) sink = fopen("/dev/null", "w");
    if (!sink) fuzz_fail("cannot open /dev/null");
    char path[512];
    fuzz_temp_path("inspect.h5", path, sizeof path);
    fuzz_write_file(path, data, size, 0);
    ckpt_describe(path, sink);
    ssize_t open_objects = H5Fget_obj_count(H5F_OBJ_ALL, H5F_OBJ_ALL);
    if (open_objects != 0) fuzz_fail("%zd HDF5 objects left open", open_objects);
    cm_error_clear();
    return 0;
}
