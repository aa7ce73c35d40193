#include "train/checkpoint.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <hdf5.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/check.h"

#include <stdint.h>

static const char FORMAT_NAME[] = "cmoe-ckpt";
enum { MAX_STRING_ATTR_BYTES = 16 << 20 };

/* HDF5 prints its error stack by default; cmoe reports errors itself. */
static void silence_hdf5(void) {
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
}

/* ---- small attribute helpers -------------------------------------------- */

static herr_t write_attr(hid_t obj, const char *name, hid_t type, const void *value) {
    hid_t space = H5Screate(H5S_SCALAR);
    hid_t attr = H5Acreate2(obj, name, type, space, H5P_DEFAULT, H5P_DEFAULT);
    herr_t status = attr < 0 ? -1 : H5Awrite(attr, type, value);
    if (attr >= 0) H5Aclose(attr);
    H5Sclose(space);
    return status;
}

static herr_t write_string_attr(hid_t obj, const char *name, const char *value) {
    hid_t type = H5Tcopy(H5T_C_S1);
    H5Tset_size(type, strlen(value) + 1);
    H5Tset_strpad(type, H5T_STR_NULLTERM);
    herr_t status = write_attr(obj, name, type, value);
    H5Tclose(type);
    return status;
}

static herr_t read_attr(hid_t obj, const char *name, hid_t type, void *value) {
    if (H5Aexists(obj, name) <= 0) return -1;
    hid_t attr = H5Aopen(obj, name, H5P_DEFAULT);
    if (attr < 0) return -1;
    herr_t status = H5Aread(attr, type, value);
    H5Aclose(attr);
    return status;
}

/* Reads a string attribute into a malloc'd buffer. */
static char *read_string_attr(hid_t obj, const char *name) {
    if (H5Aexists(obj, name) <= 0) return NULL;
    hid_t attr = H5Aopen(obj, name, H5P_DEFAULT);
    if (attr < 0) return NULL;
    hid_t file_type = H5Aget_type(attr);
    size_t size = H5Tget_size(file_type);
    char *value = NULL;
    /* A damaged file may claim a string of up to 4 GiB (the size field has
     * 32 bits): refuse instead of allocating it. Recipes are a few KiB. */
    if (size > 0 && size <= MAX_STRING_ATTR_BYTES && H5Tget_class(file_type) == H5T_STRING &&
        !H5Tis_variable_str(file_type)) {
        hid_t mem_type = H5Tcopy(H5T_C_S1);
        H5Tset_size(mem_type, size + 1);
        value = calloc(1, size + 1);
        if (value && H5Aread(attr, mem_type, value) < 0) {
            free(value);
            value = NULL;
        }
        H5Tclose(mem_type);
    }
    H5Tclose(file_type);
    H5Aclose(attr);
    return value;
}

/* ---- datasets -------------------------------------------------------------- */

static herr_t write_dataset(hid_t group, const char *name, const ag_tensor *shape_of,
                            const float *data) {
    hsize_t dims[AG_MAX_DIMS];
    for (int i = 0; i < shape_of->ndim; i++) dims[i] = (hsize_t)shape_of->shape[i];
    hid_t space = H5Screate_simple(shape_of->ndim, dims, NULL);
    hid_t properties = H5Pcreate(H5P_DATASET_CREATE);
    /* One chunk holding the whole tensor, so the Fletcher-32 filter applies. */
    H5Pset_chunk(properties, shape_of->ndim, dims);
    H5Pset_fletcher32(properties);
    hid_t dataset =
        H5Dcreate2(group, name, H5T_IEEE_F32LE, space, H5P_DEFAULT, properties, H5P_DEFAULT);
    herr_t status =
        dataset < 0 ? -1 : H5Dwrite(dataset, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, data);
    if (dataset >= 0) H5Dclose(dataset);
    H5Pclose(properties);
    H5Sclose(space);
    return status;
}

/* True when the dataset's values are 32-bit IEEE floats (any byte order);
 * else `name` says what they are ("int32", "float64", ...). */
static bool is_float32(hid_t dataset, char *name, size_t size) {
    hid_t type = H5Dget_type(dataset);
    H5T_class_t type_class = type < 0 ? H5T_NO_CLASS : H5Tget_class(type);
    size_t bytes = type < 0 ? 0 : H5Tget_size(type);
    if (type >= 0) H5Tclose(type);
    const char *kind = type_class == H5T_FLOAT     ? "float"
                       : type_class == H5T_INTEGER ? "int"
                       : type_class == H5T_STRING  ? "string"
                                                   : "non-numeric";
    snprintf(name, size, "%s%zu", kind, 8 * bytes);
    return type_class == H5T_FLOAT && bytes == 4;
}

/* Reads dataset `name` of `group` into `data` after checking its shape. The
 * file holds `shards` times the parameter's leading dimension (expert tensors
 * in their global layout); this rank reads rows [shard * rows, (shard+1) rows). */
static cm_status read_dataset(const char *path, hid_t group, const char *group_name,
                              const ag_param *param, float *data, int shard, int shards) {
    if (H5Lexists(group, param->name, H5P_DEFAULT) <= 0)
        return CM_ERR(CM_ERR_FORMAT, "%s: no dataset /%s/%s; the checkpoint is of another model",
                      path, group_name, param->name);
    hid_t dataset = H5Dopen2(group, param->name, H5P_DEFAULT);
    if (dataset < 0)
        return CM_ERR(CM_ERR_FORMAT, "%s: cannot open /%s/%s (corrupted file?)", path, group_name,
                      param->name);
    char type_name[32];
    if (!is_float32(dataset, type_name, sizeof type_name)) {
        H5Dclose(dataset);
        return CM_ERR(CM_ERR_FORMAT,
                      "%s: /%s/%s holds %s values; a cmoe checkpoint stores float32 (a converted "
                      "file is refused rather than silently cast)",
                      path, group_name, param->name, type_name);
    }
    hid_t space = H5Dget_space(dataset);
    int ndim = H5Sget_simple_extent_ndims(space);
    hsize_t dims[H5S_MAX_RANK] = {0};
    bool same = ndim == param->tensor.ndim;
    if (ndim < 0 || H5Sget_simple_extent_dims(space, dims, NULL) < 0) same = false;
    ag_tensor global = param->tensor; /* the shape the file should have */
    global.shape[0] *= shards;
    for (int i = 0; same && i < ndim; i++) same = dims[i] == (hsize_t)global.shape[i];
    cm_status status = CM_OK;
    hid_t memory = H5S_ALL, selection = H5S_ALL;
    if (same && shards > 1) { /* this rank's rows of the leading dimension */
        hsize_t start[AG_MAX_DIMS] = {0}, count[AG_MAX_DIMS];
        for (int i = 0; i < ndim; i++) count[i] = (hsize_t)param->tensor.shape[i];
        start[0] = (hsize_t)shard * (hsize_t)param->tensor.shape[0];
        H5Sselect_hyperslab(space, H5S_SELECT_SET, start, NULL, count, NULL);
        memory = H5Screate_simple(ndim, count, NULL);
        selection = space;
    }
    if (!same) {
        char want[64], got[400] = "[";
        ag_shape_str(&global, want, sizeof want);
        for (int i = 0; i < ndim; i++)
            snprintf(got + strlen(got), sizeof got - strlen(got), i ? ",%llu" : "%llu",
                     (unsigned long long)dims[i]);
        strncat(got, "]", sizeof got - strlen(got) - 1);
        status = CM_ERR(CM_ERR_FORMAT,
                        "%s: /%s/%s has shape %s in the checkpoint but %s in the model; the "
                        "checkpoint is of another model shape",
                        path, group_name, param->name, got, want);
    } else if (H5Dread(dataset, H5T_NATIVE_FLOAT, memory, selection, H5P_DEFAULT, data) < 0) {
        status = CM_ERR(CM_ERR_FORMAT,
                        "%s: cannot read /%s/%s: checksum mismatch or truncated data (corrupted "
                        "checkpoint)",
                        path, group_name, param->name);
    }
    if (memory != H5S_ALL) H5Sclose(memory);
    H5Sclose(space);
    H5Dclose(dataset);
    return status;
}

/* ---- save ------------------------------------------------------------------ */

/* What is written for one parameter: its global shape and where its
 * values and moments are (gathered copies for sharded expert tensors). */
typedef struct ckpt_entry {
    const ag_param *param;
    ag_tensor shape; /* global shape */
    const float *data, *m, *v;
    const int64_t *steps; /* expert slices' update counts [global slices], or NULL */
} ckpt_entry;

/* The "steps" attribute of an expert parameter's /optim/m dataset: the
 * update count of each expert slice (optim.skip_unused_experts). */
static herr_t write_steps_attr(hid_t group, const char *name, const int64_t *steps, int count) {
    hid_t dataset = H5Dopen2(group, name, H5P_DEFAULT);
    if (dataset < 0) return -1;
    hsize_t dims[1] = {(hsize_t)count};
    hid_t space = H5Screate_simple(1, dims, NULL);
    hid_t attr = H5Acreate2(dataset, "steps", H5T_STD_I64LE, space, H5P_DEFAULT, H5P_DEFAULT);
    herr_t status = attr < 0 ? -1 : H5Awrite(attr, H5T_NATIVE_INT64, steps);
    if (attr >= 0) H5Aclose(attr);
    H5Sclose(space);
    H5Dclose(dataset);
    return status;
}

/* The /upcycled_from (or /merged_from) group. */
static herr_t write_origin(hid_t file, const ckpt_origin *origin) {
    const char *name = origin->group ? origin->group : "upcycled_from";
    hid_t group = H5Gcreate2(file, name, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    if (group < 0) return -1;
    herr_t failed = 0;
    failed |= write_string_attr(group, "path", origin->path ? origin->path : "") < 0;
    failed |= write_attr(group, "step", H5T_NATIVE_INT64, &origin->step) < 0;
    failed |= write_attr(group, "seed", H5T_NATIVE_UINT64, &origin->seed) < 0;
    failed |= write_string_attr(group, "recipe", origin->recipe ? origin->recipe : "") < 0;
    failed |= write_string_attr(group, "method", origin->method ? origin->method : "") < 0;
    H5Gclose(group);
    return failed ? -1 : 0;
}

/* The attributes and datasets of a checkpoint (and its origin, if any) into
 * the open `file`; true if any HDF5 call failed. */
static bool write_contents(hid_t file, const ckpt_entry *entries, int count, const ckpt_meta *meta,
                           const char *recipe_text, const ckpt_origin *origin) {
    herr_t failed = 0;
    const int version = CKPT_FORMAT_VERSION;
    failed |= write_string_attr(file, "format", FORMAT_NAME) < 0;
    failed |= write_attr(file, "version", H5T_NATIVE_INT, &version) < 0;
    failed |= write_attr(file, "step", H5T_NATIVE_INT64, &meta->step) < 0;
    failed |= write_attr(file, "seed", H5T_NATIVE_UINT64, &meta->seed) < 0;
    failed |= write_attr(file, "optimizer_step", H5T_NATIVE_INT64, &meta->optimizer_step) < 0;
    failed |= write_string_attr(file, "recipe", recipe_text ? recipe_text : "") < 0;
    if (origin) failed |= write_origin(file, origin) < 0;

    hid_t values = H5Gcreate2(file, "params", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    hid_t optim = H5Gcreate2(file, "optim", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    hid_t first = optim < 0 ? -1 : H5Gcreate2(optim, "m", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    hid_t second = optim < 0 ? -1 : H5Gcreate2(optim, "v", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    failed |= values < 0 || optim < 0 || first < 0 || second < 0;
    for (int i = 0; i < count && !failed; i++) {
        const ag_param *param = entries[i].param;
        failed |= write_dataset(values, param->name, &entries[i].shape, entries[i].data) < 0;
        hid_t dataset = failed ? -1 : H5Dopen2(values, param->name, H5P_DEFAULT);
        if (dataset >= 0) {
            const int frozen = param->frozen, expert = param->group == AG_GROUP_EXPERT;
            const int no_decay = param->no_decay;
            failed |= write_attr(dataset, "frozen", H5T_NATIVE_INT, &frozen) < 0;
            failed |= write_attr(dataset, "no_decay", H5T_NATIVE_INT, &no_decay) < 0;
            failed |= write_attr(dataset, "expert", H5T_NATIVE_INT, &expert) < 0;
            H5Dclose(dataset);
        }
        if (param->frozen) continue;
        failed |= write_dataset(first, param->name, &entries[i].shape, entries[i].m) < 0;
        failed |= write_dataset(second, param->name, &entries[i].shape, entries[i].v) < 0;
        if (!failed && entries[i].steps)
            failed |= write_steps_attr(first, param->name, entries[i].steps,
                                       entries[i].shape.shape[0]) < 0;
    }
    if (first >= 0) H5Gclose(first);
    if (second >= 0) H5Gclose(second);
    if (optim >= 0) H5Gclose(optim);
    if (values >= 0) H5Gclose(values);
    return failed != 0;
}

/* ---- the file image: HDF5 writes to memory, cmoe writes the bytes ------------
 * HDF5 (1.10) writing a checkpoint straight to a full disk fails inside a
 * dataset's or the file's close and leaves half-closed objects that it
 * crashes on when the library shuts down at exit. So the checkpoint is built
 * by the core driver in memory (no backing store), whose buffer these
 * callbacks own and keep when HDF5 closes the file; write_bytes then writes
 * it, and a full disk is a plain write error. */

typedef struct image_capture {
    void *buffer;
    size_t size;
} image_capture;

static void *image_malloc(size_t size, H5FD_file_image_op_t op, void *udata) {
    (void)op;
    image_capture *capture = udata;
    capture->buffer = malloc(size);
    capture->size = capture->buffer ? size : 0;
    return capture->buffer;
}

static void *image_memcpy(void *dest, const void *src, size_t size, H5FD_file_image_op_t op,
                          void *udata) {
    (void)op;
    (void)udata;
    return memcpy(dest, src, size);
}

static void *image_realloc(void *ptr, size_t size, H5FD_file_image_op_t op, void *udata) {
    (void)op;
    image_capture *capture = udata;
    void *larger = realloc(ptr, size);
    if (!larger) return NULL; /* ptr stays the capture's */
    capture->buffer = larger;
    capture->size = size;
    return larger;
}

static herr_t image_free(void *ptr, H5FD_file_image_op_t op, void *udata) {
    image_capture *capture = udata;
    if (op == H5FD_FILE_IMAGE_OP_FILE_CLOSE && ptr == capture->buffer) return 0; /* kept */
    if (ptr == capture->buffer) *capture = (image_capture){0};
    free(ptr);
    return 0;
}

static void *image_udata_copy(void *udata) {
    return udata;
}

static herr_t image_udata_free(void *udata) {
    (void)udata;
    return 0;
}

/* The file's length as its superblock (version 2 or 3, 8-byte addresses)
 * states it: the end-of-file address at byte 28; the buffer may be longer
 * (the core driver grows it by increments). */
static size_t image_length(const image_capture *capture) {
    const unsigned char *bytes = capture->buffer;
    static const unsigned char signature[8] = {0x89, 'H', 'D', 'F', '\r', '\n', 0x1a, '\n'};
    if (capture->size < 36 || memcmp(bytes, signature, 8) != 0 || bytes[8] < 2 || bytes[9] != 8)
        return capture->size;
    uint64_t eof = 0;
    for (int i = 7; i >= 0; i--) eof = eof << 8 | bytes[28 + i];
    return eof > 0 && eof <= capture->size ? (size_t)eof : capture->size;
}

/* The checkpoint in memory: *capture's buffer (malloc'd) and its length. */
static cm_status build_image(const char *name, const ckpt_entry *entries, int count,
                             const ckpt_meta *meta, const char *recipe_text,
                             const ckpt_origin *origin, image_capture *capture, size_t *length) {
    *capture = (image_capture){0};
    H5FD_file_image_callbacks_t callbacks = {image_malloc, image_memcpy,     image_realloc,
                                             image_free,   image_udata_copy, image_udata_free,
                                             capture};
    hid_t access = H5Pcreate(H5P_FILE_ACCESS);
    H5Pset_libver_bounds(access, H5F_LIBVER_V110, H5F_LIBVER_LATEST);
    H5Pset_fapl_core(access, (size_t)1 << 20, 0);
    herr_t set = H5Pset_file_image_callbacks(access, &callbacks);
    hid_t file = set < 0 ? -1 : H5Fcreate(name, H5F_ACC_TRUNC, H5P_DEFAULT, access);
    H5Pclose(access);
    if (file < 0) return CM_ERR(CM_ERR_HDF5, "%s: cannot create the checkpoint in memory", name);
    bool failed = write_contents(file, entries, count, meta, recipe_text, origin);
    failed |= H5Fclose(file) < 0;
    if (failed || !capture->buffer) {
        free(capture->buffer);
        *capture = (image_capture){0};
        return CM_ERR(CM_ERR_HDF5, "%s: building the checkpoint failed (out of memory?)", name);
    }
    *length = image_length(capture);
    return CM_OK;
}

/* bytes into a new file at path, synced before it is closed (the data reach
 * the disk before a rename publishes them). */
static cm_status write_bytes(const char *path, const void *bytes, size_t size) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return CM_ERR(CM_ERR_IO, "%s: cannot create: %s", path, strerror(errno));
    const char *at = bytes;
    size_t left = size;
    int error = 0;
    while (left > 0 && !error) {
        ssize_t wrote = write(fd, at, left);
        if (wrote < 0 && errno != EINTR) error = errno;
        if (wrote == 0) error = ENOSPC; /* nothing taken: a full device */
        if (wrote > 0) {
            at += wrote;
            left -= (size_t)wrote;
        }
    }
    if (!error && fsync(fd) != 0 && errno != EINVAL) error = errno; /* EINVAL: no sync here */
    if (close(fd) != 0 && !error) error = errno;
    if (error)
        return CM_ERR(CM_ERR_IO, "%s: cannot write the checkpoint (%zu of %zu bytes): %s", path,
                      size - left, size, strerror(error));
    return CM_OK;
}

/* fsync of a file or directory: the data reach the disk before the rename
 * publishes them, so a power loss cannot leave a renamed but empty file. */
static cm_status sync_path(const char *path) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return CM_ERR(CM_ERR_IO, "%s: cannot open to sync: %s", path, strerror(errno));
    int failed = fsync(fd) != 0 && errno != EINVAL; /* EINVAL: no sync on this file system */
    int error = errno;
    close(fd);
    if (failed) return CM_ERR(CM_ERR_IO, "%s: fsync failed: %s", path, strerror(error));
    return CM_OK;
}

/* The directory part of a path ("." without one). */
static void parent_of(const char *path, char *out, size_t size) {
    const char *slash = strrchr(path, '/');
    if (!slash)
        snprintf(out, size, ".");
    else
        snprintf(out, size, "%.*s", slash == path ? 1 : (int)(slash - path), path);
}

/* Writes entries to path.tmp (synced), renames it to path, syncs the
 * directory. On failure path.tmp is removed and path is untouched. */
static cm_status write_atomically(const char *path, const ckpt_entry *entries, int count,
                                  const ckpt_meta *meta, const char *recipe_text,
                                  const ckpt_origin *origin) {
    silence_hdf5();
    char temporary[4096];
    if ((size_t)snprintf(temporary, sizeof temporary, "%s.tmp", path) >= sizeof temporary)
        return CM_ERR(CM_ERR_INVALID, "checkpoint path too long: %s", path);
    image_capture image;
    size_t length = 0;
    cm_status status =
        build_image(temporary, entries, count, meta, recipe_text, origin, &image, &length);
    if (status == CM_OK) status = write_bytes(temporary, image.buffer, length);
    free(image.buffer);
    if (status != CM_OK) {
        remove(temporary);
        return status;
    }
    if (rename(temporary, path) != 0) {
        status = CM_ERR(CM_ERR_IO, "cannot rename %s to %s: %s", temporary, path, strerror(errno));
        remove(temporary);
        return status;
    }
    char dir[4096];
    parent_of(path, dir, sizeof dir);
    return sync_path(dir);
}

static ckpt_entry local_entry(const ag_params *params, const ag_param *param) {
    const ag_param_buffer *buffer = &params->buffers[param->group];
    return (ckpt_entry){param,
                        param->tensor,
                        param->tensor.data,
                        buffer->m + param->offset,
                        buffer->v + param->offset,
                        param->slice_steps};
}

cm_status ckpt_save(const char *path, const ag_params *params, const ckpt_meta *meta,
                    const char *recipe_text) {
    return ckpt_save_sharded(path, params, meta, recipe_text, NULL);
}

cm_status ckpt_save_with_origin(const char *path, const ag_params *params, const ckpt_meta *meta,
                                const char *recipe_text, const ckpt_origin *origin) {
    ckpt_entry *entries = calloc((size_t)params->count + 1, sizeof *entries);
    if (!entries) return CM_ERR(CM_ERR_NOMEM, "out of memory saving %s", path);
    for (int i = 0; i < params->count; i++) entries[i] = local_entry(params, params->items[i]);
    cm_status status = write_atomically(path, entries, params->count, meta, recipe_text, origin);
    free(entries);
    return status;
}

/* Gathers `local` (count floats per rank) of the EP group to its rank 0. */
static cm_status gather_shards(const cm_comm *comm, const float *local, int64_t count,
                               float *global) {
    if (count > INT32_MAX) return CM_ERR(CM_ERR_INVALID, "expert tensor too large to gather");
    int code = MPI_Gather(local, (int)count, MPI_FLOAT, global, (int)count, MPI_FLOAT, 0, comm->ep);
    return code == MPI_SUCCESS ? CM_OK : CM_ERR(CM_ERR_MPI, "MPI_Gather of expert shards failed");
}

/* Gathers an expert parameter's slice step counts of the EP group to its
 * rank 0 (*global: a malloc'd copy there, kept in *copy for freeing). */
static cm_status gather_steps(const cm_comm *comm, const ag_param *param, bool writer,
                              const int64_t **global, float **copy) {
    int64_t *all = NULL;
    if (writer) {
        all = malloc((size_t)param->slices * (size_t)comm->ep_size * sizeof(int64_t));
        if (!all) return CM_ERR(CM_ERR_NOMEM, "out of memory gathering %s", param->name);
        *copy = (float *)(void *)all;
        *global = all;
    }
    int code = MPI_Gather(param->slice_steps, param->slices, MPI_INT64_T, all, param->slices,
                          MPI_INT64_T, 0, comm->ep);
    return code == MPI_SUCCESS ? CM_OK : CM_ERR(CM_ERR_MPI, "MPI_Gather of step counts failed");
}

cm_status ckpt_save_sharded(const char *path, const ag_params *params, const ckpt_meta *meta,
                            const char *recipe_text, const cm_comm *comm) {
    ckpt_entry *entries = calloc((size_t)params->count, sizeof *entries);
    if (!entries) return CM_ERR(CM_ERR_NOMEM, "out of memory saving %s", path);
    bool sharded = comm && comm->ep_size > 1;
    bool writer = !comm || comm->world_rank == 0;
    /* Only the first EP group gathers; world rank 0 is its rank 0. */
    bool gathers = sharded && comm->dp_rank == 0;
    cm_status status = CM_OK;
    float *copies[4 * 1024] = {0};
    int n_copies = 0, gathered = 0;
    for (int i = 0; i < params->count && status == CM_OK; i++) {
        const ag_param *param = params->items[i];
        entries[i] = local_entry(params, param);
        if (!sharded || param->group != AG_GROUP_EXPERT) continue;
        entries[i].shape.shape[0] *= comm->ep_size;
        entries[i].shape.numel *= comm->ep_size;
        if (!gathers) continue;
        /* the same decision on every rank of the group: each gathers 4 arrays */
        if (++gathered > (int)(sizeof copies / sizeof copies[0]) / 4) {
            status = CM_ERR(CM_ERR_INVALID, "too many expert tensors to checkpoint");
            break;
        }
        const float *sources[3] = {entries[i].data, entries[i].m, entries[i].v};
        const float **targets[3] = {&entries[i].data, &entries[i].m, &entries[i].v};
        if (param->slice_steps)
            status = gather_steps(comm, param, writer, &entries[i].steps, &copies[n_copies]);
        if (writer && entries[i].steps != param->slice_steps) n_copies++;
        for (int j = 0; j < 3 && status == CM_OK; j++) {
            float *global = NULL;
            if (writer) {
                global = copies[n_copies++] =
                    malloc((size_t)entries[i].shape.numel * sizeof(float));
                if (!global) status = CM_ERR(CM_ERR_NOMEM, "out of memory saving %s", path);
            }
            if (status == CM_OK)
                status = gather_shards(comm, sources[j], param->tensor.numel, global);
            if (writer) *targets[j] = global;
        }
    }
    if (writer && status == CM_OK)
        status = write_atomically(path, entries, params->count, meta, recipe_text, NULL);
    for (int i = 0; i < n_copies; i++) free(copies[i]);
    free(entries);
    if (comm && comm->world_size > 1) {
        /* Every rank learns whether the writer succeeded. */
        int code = (int)status;
        MPI_Bcast(&code, 1, MPI_INT, 0, comm->world);
        if (!writer && code != CM_OK)
            status = CM_ERR((cm_status)code, "rank 0 could not write the checkpoint %s", path);
    }
    return status;
}

/* ---- load ------------------------------------------------------------------ */

/* Opens `path` read-only after checking it exists and is a cmoe checkpoint. */
static cm_status open_checkpoint(const char *path, hid_t *file_out) {
    silence_hdf5();
    FILE *probe = fopen(path, "rb");
    if (!probe) return CM_ERR(CM_ERR_IO, "%s: cannot open checkpoint: %s", path, strerror(errno));
    fclose(probe);
    hid_t file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (file < 0)
        return CM_ERR(CM_ERR_FORMAT,
                      "%s: not a readable HDF5 file (truncated or corrupted checkpoint?)", path);
    char *format = read_string_attr(file, "format");
    int version = -1;
    bool known = format && strcmp(format, FORMAT_NAME) == 0;
    free(format);
    if (!known) {
        H5Fclose(file);
        return CM_ERR(CM_ERR_FORMAT, "%s: not a cmoe checkpoint (no format = \"%s\" attribute)",
                      path, FORMAT_NAME);
    }
    if (read_attr(file, "version", H5T_NATIVE_INT, &version) < 0 || version < 1 ||
        version > CKPT_FORMAT_VERSION) {
        H5Fclose(file);
        return CM_ERR(CM_ERR_FORMAT,
                      "%s: checkpoint format version %d, this cmoe reads versions 1 to %d", path,
                      version, CKPT_FORMAT_VERSION);
    }
    *file_out = file;
    return CM_OK;
}

/* Counts the datasets directly inside a group. */
static hsize_t count_links(hid_t group) {
    H5G_info_t info;
    return H5Gget_info(group, &info) < 0 ? 0 : info.nlinks;
}

/* Expert tensors are read as shard `shard` of `shards`; dense ones whole. */
#define GROUP_SHARD(param)                                                                         \
    ((param)->group == AG_GROUP_EXPERT ? shard : 0),                                               \
        ((param)->group == AG_GROUP_EXPERT ? shards : 1)

/* The slice step counts of an expert parameter: this rank's part of the
 * "steps" attribute, or optimizer_step for every slice when the file has none
 * (written before per-expert counts: every expert was updated every step). */
static cm_status read_steps_attr(const char *path, hid_t group, ag_param *param, int shard,
                                 int shards, int64_t optimizer_step) {
    for (int j = 0; j < param->slices; j++) param->slice_steps[j] = optimizer_step;
    hid_t dataset = H5Dopen2(group, param->name, H5P_DEFAULT);
    if (dataset < 0) return CM_ERR(CM_ERR_FORMAT, "%s: cannot open /optim/m/%s", path, param->name);
    cm_status status = CM_OK;
    if (H5Aexists(dataset, "steps") > 0) {
        hid_t attr = H5Aopen(dataset, "steps", H5P_DEFAULT);
        hid_t space = attr < 0 ? -1 : H5Aget_space(attr);
        hssize_t count = space < 0 ? -1 : H5Sget_simple_extent_npoints(space);
        /* One count per expert of the whole model, checked before the
         * allocation: the file's dataspace may claim any size. */
        bool expected = count == (hssize_t)shards * param->slices;
        int64_t *all = expected ? malloc((size_t)count * sizeof(int64_t)) : NULL;
        int first = shard * param->slices;
        if (!all || H5Aread(attr, H5T_NATIVE_INT64, all) < 0)
            status =
                CM_ERR(CM_ERR_FORMAT, "%s: bad steps attribute of /optim/m/%s", path, param->name);
        else
            memcpy(param->slice_steps, all + first, (size_t)param->slices * sizeof(int64_t));
        free(all);
        if (space >= 0) H5Sclose(space);
        if (attr >= 0) H5Aclose(attr);
    }
    H5Dclose(dataset);
    return status;
}

static cm_status load_groups(const char *path, hid_t file, ag_params *params, bool load_optimizer,
                             int shard, int shards, int64_t optimizer_step) {
    hid_t values = H5Gopen2(file, "params", H5P_DEFAULT);
    if (values < 0) return CM_ERR(CM_ERR_FORMAT, "%s: no /params group", path);
    cm_status status = CM_OK;
    if (count_links(values) != (hsize_t)params->count)
        status = CM_ERR(CM_ERR_FORMAT,
                        "%s: holds %llu parameters but the model has %d; the checkpoint is of "
                        "another model",
                        path, (unsigned long long)count_links(values), params->count);
    for (int i = 0; i < params->count && status == CM_OK; i++)
        status = read_dataset(path, values, "params", params->items[i],
                              params->items[i]->tensor.data, GROUP_SHARD(params->items[i]));
    H5Gclose(values);
    if (status != CM_OK || !load_optimizer) return status;

    hid_t first = H5Gopen2(file, "optim/m", H5P_DEFAULT);
    hid_t second = H5Gopen2(file, "optim/v", H5P_DEFAULT);
    if (first < 0 || second < 0)
        status = CM_ERR(CM_ERR_FORMAT, "%s: no /optim/m or /optim/v", path);
    for (int i = 0; i < params->count && status == CM_OK; i++) {
        ag_param *param = params->items[i];
        if (param->frozen) continue;
        ag_param_buffer *buffer = &params->buffers[param->group];
        status = read_dataset(path, first, "optim/m", param, buffer->m + param->offset,
                              GROUP_SHARD(param));
        if (status == CM_OK && param->slice_steps)
            status = read_steps_attr(path, first, param, shard, shards, optimizer_step);
        if (status == CM_OK)
            status = read_dataset(path, second, "optim/v", param, buffer->v + param->offset,
                                  GROUP_SHARD(param));
    }
    if (first >= 0) H5Gclose(first);
    if (second >= 0) H5Gclose(second);
    return status;
}

cm_status ckpt_load(const char *path, ag_params *params, ckpt_meta *meta, bool load_optimizer) {
    return ckpt_load_sharded(path, params, meta, load_optimizer, NULL);
}

cm_status ckpt_load_sharded(const char *path, ag_params *params, ckpt_meta *meta,
                            bool load_optimizer, const cm_comm *comm) {
    CM_ASSERT(params->finalized, "ckpt_load needs a finalized parameter registry");
    int shard = comm ? comm->ep_rank : 0, shards = comm ? comm->ep_size : 1;
    hid_t file;
    CM_TRY(open_checkpoint(path, &file));
    cm_status status = CM_OK;
    ckpt_meta read = {0};
    if (read_attr(file, "step", H5T_NATIVE_INT64, &read.step) < 0 ||
        read_attr(file, "seed", H5T_NATIVE_UINT64, &read.seed) < 0 ||
        read_attr(file, "optimizer_step", H5T_NATIVE_INT64, &read.optimizer_step) < 0)
        status = CM_ERR(CM_ERR_FORMAT, "%s: missing step/seed/optimizer_step attributes", path);
    else if (read.step < 0 || read.optimizer_step < 0)
        status = CM_ERR(CM_ERR_FORMAT,
                        "%s: step %lld or optimizer_step %lld is negative (a damaged or edited "
                        "checkpoint)",
                        path, (long long)read.step, (long long)read.optimizer_step);
    if (status == CM_OK)
        status =
            load_groups(path, file, params, load_optimizer, shard, shards, read.optimizer_step);
    H5Fclose(file);
    if (status == CM_OK && meta) *meta = read;
    return status;
}

cm_status ckpt_read_recipe(const char *path, char **recipe_text) {
    hid_t file;
    CM_TRY(open_checkpoint(path, &file));
    *recipe_text = read_string_attr(file, "recipe");
    H5Fclose(file);
    if (!*recipe_text) return CM_ERR(CM_ERR_FORMAT, "%s: no recipe attribute", path);
    return CM_OK;
}

/* Element counts saturate at UINT64_MAX: HDF5 allows extents whose product
 * does not fit 64 bits (a chunked 2^40 x 2^40 dataset with nothing written). */
typedef struct describe_state {
    FILE *out;
    uint64_t total, trainable;
} describe_state;

static uint64_t saturating_add(uint64_t a, uint64_t b) {
    return a > UINT64_MAX - b ? UINT64_MAX : a + b;
}
static uint64_t saturating_mul(uint64_t a, uint64_t b) {
    if (a == 0 || b == 0) return 0;
    return a > UINT64_MAX / b ? UINT64_MAX : a * b;
}

/* "123", or ">=2^64" for a saturated count. */
static void count_str(uint64_t count, char *out, size_t size) {
    if (count == UINT64_MAX)
        snprintf(out, size, ">=2^64");
    else
        snprintf(out, size, "%llu", (unsigned long long)count);
}

/* The names of a group's links, in HDF5's native order. */
typedef struct name_list {
    char **names;
    size_t count, capacity;
} name_list;

static herr_t collect_name(hid_t group, const char *name, const H5L_info_t *info, void *user) {
    (void)group;
    (void)info;
    name_list *list = user;
    if (list->count == list->capacity) {
        size_t capacity = list->capacity ? 2 * list->capacity : 64;
        char **grown = realloc(list->names, capacity * sizeof *grown);
        if (!grown) return -1;
        list->names = grown;
        list->capacity = capacity;
    }
    char *copy = strdup(name);
    if (!copy) return -1;
    list->names[list->count++] = copy;
    return 0;
}

static int compare_names(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The link names of `group` sorted by strcmp (HDF5's name order), or -1.
 * They are listed in native order and sorted here: for H5_ITER_INC on a
 * group with dense link storage (more than 8 links, as /params has) HDF5
 * 1.10.8 first builds a sorted table, and when a damaged link fails to
 * decode, the table's cleanup frees uninitialised pointers (a crash in
 * H5G__link_release_table, found by fuzz_inspect; with glibc it segfaults
 * under MALLOC_PERTURB_). The native order walks the B-tree without it. */
static herr_t sorted_link_names(hid_t group, name_list *list) {
    *list = (name_list){0};
    herr_t walked = H5Literate(group, H5_INDEX_NAME, H5_ITER_NATIVE, NULL, collect_name, list);
    if (walked >= 0 && list->count > 1)
        qsort(list->names, list->count, sizeof *list->names, compare_names);
    return walked;
}

static void free_names(name_list *list) {
    for (size_t i = 0; i < list->count; i++) free(list->names[i]);
    free(list->names);
    *list = (name_list){0};
}

static herr_t describe_one(hid_t group, const char *name, describe_state *state) {
    hid_t dataset = H5Dopen2(group, name, H5P_DEFAULT);
    if (dataset < 0) return -1;
    hid_t space = H5Dget_space(dataset);
    hsize_t dims[H5S_MAX_RANK] = {0}; /* any rank HDF5 allows, not just a cmoe tensor's */
    int ndim = H5Sget_simple_extent_ndims(space);
    if (ndim < 0 || ndim > H5S_MAX_RANK || H5Sget_simple_extent_dims(space, dims, NULL) < 0)
        ndim = 0;
    H5Sclose(space);
    uint64_t count = 1;
    char shape[160] = "[";
    for (int i = 0; i < ndim; i++) {
        count = saturating_mul(count, dims[i]);
        snprintf(shape + strlen(shape), sizeof shape - strlen(shape), i ? ",%llu" : "%llu",
                 (unsigned long long)dims[i]);
    }
    strncat(shape, "]", sizeof shape - strlen(shape) - 1);
    int frozen = 0, no_decay = 0, expert = 0;
    read_attr(dataset, "frozen", H5T_NATIVE_INT, &frozen);
    read_attr(dataset, "no_decay", H5T_NATIVE_INT, &no_decay);
    read_attr(dataset, "expert", H5T_NATIVE_INT, &expert);
    H5Dclose(dataset);
    char count_text[32];
    count_str(count, count_text, sizeof count_text);
    fprintf(state->out, "  %-40s %-16s %10s%s%s%s\n", name, shape, count_text,
            expert ? "  expert" : "", frozen ? "  frozen" : "", no_decay ? "  no-decay" : "");
    state->total = saturating_add(state->total, count);
    if (!frozen) state->trainable = saturating_add(state->trainable, count);
    return 0;
}

/* "upcycled from PATH (step S, seed N): METHOD" (or "merged from ..."),
 * when the file has the group. */
static void describe_origin(hid_t file, FILE *out) {
    const bool merged = H5Lexists(file, "merged_from", H5P_DEFAULT) > 0;
    if (!merged && H5Lexists(file, "upcycled_from", H5P_DEFAULT) <= 0) return;
    hid_t group = H5Gopen2(file, merged ? "merged_from" : "upcycled_from", H5P_DEFAULT);
    if (group < 0) return;
    int64_t step = -1;
    uint64_t seed = 0;
    read_attr(group, "step", H5T_NATIVE_INT64, &step);
    read_attr(group, "seed", H5T_NATIVE_UINT64, &seed);
    char *source = read_string_attr(group, "path"), *method = read_string_attr(group, "method");
    fprintf(out, "  %s from %s (step %lld, seed %llu): %s\n", merged ? "merged" : "upcycled",
            source ? source : "?", (long long)step, (unsigned long long)seed,
            method ? method : "?");
    free(source);
    free(method);
    H5Gclose(group);
}

cm_status ckpt_describe(const char *path, FILE *out) {
    hid_t file;
    CM_TRY(open_checkpoint(path, &file));
    ckpt_meta meta = {0};
    read_attr(file, "step", H5T_NATIVE_INT64, &meta.step);
    read_attr(file, "seed", H5T_NATIVE_UINT64, &meta.seed);
    read_attr(file, "optimizer_step", H5T_NATIVE_INT64, &meta.optimizer_step);
    fprintf(out, "%s\n  format cmoe-ckpt v%d, step %lld, seed %llu, optimizer step %lld\n", path,
            CKPT_FORMAT_VERSION, (long long)meta.step, (unsigned long long)meta.seed,
            (long long)meta.optimizer_step);
    describe_origin(file, out);
    describe_state state = {out, 0, 0};
    hid_t values = H5Gopen2(file, "params", H5P_DEFAULT);
    name_list names = {0};
    herr_t walked = values < 0 ? -1 : sorted_link_names(values, &names);
    for (size_t i = 0; walked >= 0 && i < names.count; i++)
        walked = describe_one(values, names.names[i], &state);
    free_names(&names);
    if (values >= 0) H5Gclose(values);
    char *recipe = read_string_attr(file, "recipe");
    H5Fclose(file);
    if (walked < 0) {
        free(recipe);
        return CM_ERR(CM_ERR_FORMAT, "%s: cannot list /params (corrupted checkpoint?)", path);
    }
    char total[32], trainable[32];
    count_str(state.total, total, sizeof total);
    count_str(state.trainable, trainable, sizeof trainable);
    fprintf(out, "  %s parameters (%s trainable)\n\nrecipe:\n%s", total, trainable,
            recipe ? recipe : "(none)\n");
    free(recipe);
    return CM_OK;
}

/* ---- files in a run directory ----------------------------------------------- */

void ckpt_path_for_step(const char *dir, int64_t step, char *out, size_t size) {
    snprintf(out, size, "%s/ckpt-%08lld.h5", dir, (long long)step);
}

/* Step of a complete checkpoint file name, or -1. */
static long long step_of(const char *name) {
    long long step;
    int consumed = 0;
    if (sscanf(name, "ckpt-%lld.h5%n", &step, &consumed) != 1) return -1;
    return name[consumed] == '\0' && step >= 0 ? step : -1;
}

/* The steps of the complete checkpoints in dir, sorted ascending. */
static cm_status list_steps(const char *dir, long long **steps_out, int *count_out) {
    DIR *handle = opendir(dir);
    if (!handle) return CM_ERR(CM_ERR_IO, "%s: cannot open directory: %s", dir, strerror(errno));
    long long *steps = NULL;
    int count = 0, capacity = 0;
    for (struct dirent *entry; (entry = readdir(handle));) {
        long long step = step_of(entry->d_name);
        if (step < 0) continue;
        if (count == capacity) {
            capacity = capacity ? 2 * capacity : 16;
            long long *grown = realloc(steps, (size_t)capacity * sizeof *grown);
            if (!grown) {
                free(steps);
                closedir(handle);
                return CM_ERR(CM_ERR_NOMEM, "out of memory listing %s", dir);
            }
            steps = grown;
        }
        steps[count++] = step;
    }
    closedir(handle);
    for (int i = 1; i < count; i++)
        for (int j = i; j > 0 && steps[j - 1] > steps[j]; j--) {
            long long tmp = steps[j];
            steps[j] = steps[j - 1];
            steps[j - 1] = tmp;
        }
    *steps_out = steps;
    *count_out = count;
    return CM_OK;
}

cm_status ckpt_find_latest(const char *dir, char *out, size_t size) {
    long long *steps;
    int count;
    CM_TRY(list_steps(dir, &steps, &count));
    if (count == 0) {
        free(steps);
        return CM_ERR(CM_ERR_IO, "%s: no complete checkpoint (ckpt-*.h5) to resume from", dir);
    }
    ckpt_path_for_step(dir, steps[count - 1], out, size);
    free(steps);
    return CM_OK;
}

cm_status ckpt_remove_temporaries(const char *dir) {
    DIR *handle = opendir(dir);
    if (!handle) return CM_ERR(CM_ERR_IO, "%s: cannot open directory: %s", dir, strerror(errno));
    cm_status status = CM_OK;
    for (struct dirent *entry; status == CM_OK && (entry = readdir(handle));) {
        const size_t length = strlen(entry->d_name);
        if (strncmp(entry->d_name, "ckpt-", 5) != 0 || length < 8 ||
            strcmp(entry->d_name + length - 7, ".h5.tmp") != 0)
            continue;
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, entry->d_name);
        if (remove(path) != 0)
            status = CM_ERR(CM_ERR_IO, "cannot delete %s: %s", path, strerror(errno));
    }
    closedir(handle);
    return status;
}

cm_status ckpt_prune(const char *dir, int keep) {
    CM_ASSERT(keep >= 1, "keep %d", keep);
    long long *steps;
    int count;
    CM_TRY(list_steps(dir, &steps, &count));
    cm_status status = CM_OK;
    char path[4096];
    for (int i = 0; i < count - keep && status == CM_OK; i++) {
        ckpt_path_for_step(dir, steps[i], path, sizeof path);
        if (remove(path) != 0)
            status =
                CM_ERR(CM_ERR_IO, "cannot delete old checkpoint %s: %s", path, strerror(errno));
    }
    free(steps);
    return status;
}
