/* cmoe merge's work on expert weights: permuting hidden units, weight
 * matching, and merging groups (train/merge.h, METHODS.md 10.6-10.7). */
#include <cblas.h>
#include <stdlib.h>
#include <string.h>

#include "common/assignment.h"
#include "train/merge.h"

enum { TENSORS = 6 };

/* One tensor of the layer: expert e's values are base[e * per_expert ...]. */
typedef struct expert_tensor {
    float *base;
    int64_t per_expert;
} expert_tensor;

/* w1, b1, w2, b2, w3, b3 (the last two with a NULL base without swiglu). */
static void layer_tensors(const merge_experts *x, expert_tensor out[TENSORS]) {
    const int64_t H = x->hidden, D = x->d_model;
    out[0] = (expert_tensor){x->w1, H * D};
    out[1] = (expert_tensor){x->b1, H};
    out[2] = (expert_tensor){x->w2, D * H};
    out[3] = (expert_tensor){x->b2, D};
    out[4] = (expert_tensor){x->w3, H * D};
    out[5] = (expert_tensor){x->b3, H};
}

/* rows [H, width] of `data`: row u becomes old row perm[u]. */
static void permute_rows(float *data, int rows, int width, const int32_t *perm, float *scratch) {
    memcpy(scratch, data, sizeof(float) * (size_t)rows * width);
    for (int u = 0; u < rows; u++)
        memcpy(data + (size_t)u * width, scratch + (size_t)perm[u] * width, sizeof(float) * width);
}

cm_status merge_permute_units(const merge_experts *x, int expert, const int32_t *perm) {
    const int H = x->hidden, D = x->d_model;
    float *scratch = malloc(sizeof(float) * (size_t)H * D);
    if (!scratch) return CM_ERR(CM_ERR_NOMEM, "out of memory");
    const size_t matrix = (size_t)expert * H * D;
    permute_rows(x->w1 + matrix, H, D, perm, scratch);
    permute_rows(x->b1 + (size_t)expert * H, H, 1, perm, scratch);
    if (x->w3) permute_rows(x->w3 + matrix, H, D, perm, scratch);
    if (x->b3) permute_rows(x->b3 + (size_t)expert * H, H, 1, perm, scratch);
    float *w2 = x->w2 + matrix; /* [D,H]: columns */
    for (int d = 0; d < D; d++) permute_rows(w2 + (size_t)d * H, H, 1, perm, scratch);
    free(scratch);
    return CM_OK;
}

/* features [H, K] (double) of expert e: its w1 row, w2 column (and w3 row)
 * of each hidden unit side by side. */
static void unit_features(const merge_experts *x, int expert, int width, double *features) {
    const int H = x->hidden, D = x->d_model;
    const size_t matrix = (size_t)expert * H * D;
    for (int u = 0; u < H; u++) {
        double *row = features + (size_t)u * width;
        for (int d = 0; d < D; d++) {
            row[d] = x->w1[matrix + (size_t)u * D + d];
            row[D + d] = x->w2[matrix + (size_t)d * H + u];
            if (x->w3) row[2 * D + d] = x->w3[matrix + (size_t)u * D + d];
        }
    }
}

cm_status merge_match_units(const merge_experts *x, int reference, int target, int32_t *perm) {
    const int H = x->hidden, width = (x->w3 ? 3 : 2) * x->d_model;
    double *a = malloc(sizeof(double) * (size_t)H * width);
    double *b = malloc(sizeof(double) * (size_t)H * width);
    double *score = malloc(sizeof(double) * (size_t)H * H);
    cm_status status = CM_OK;
    if (!a || !b || !score) {
        status = CM_ERR(CM_ERR_NOMEM, "out of memory");
    } else {
        unit_features(x, reference, width, a);
        unit_features(x, target, width, b);
        /* score[u, v] = <features_r[u], features_t[v]> */
        cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, H, H, width, 1.0, a, width, b, width,
                    0.0, score, H);
        status = cm_assignment_max(score, H, perm);
    }
    free(a);
    free(b);
    free(score);
    return status;
}

cm_status merge_align_layer(const merge_experts *x) {
    int32_t *perm = malloc(sizeof(int32_t) * (size_t)x->hidden);
    if (!perm) return CM_ERR(CM_ERR_NOMEM, "out of memory");
    cm_status status = CM_OK;
    for (int t = 1; t < x->n && status == CM_OK; t++) {
        status = merge_match_units(x, 0, t, perm);
        if (status == CM_OK) status = merge_permute_units(x, t, perm);
    }
    free(perm);
    return status;
}

/* One tensor of group `members` [count]: out = the weighted mean (or the
 * dominant's values), written to every member. */
static void merge_tensor(const expert_tensor *t, const int32_t *members, int count,
                         const double *weight, double denominator, int dominant, double *sum) {
    const int64_t n = t->per_expert;
    if (dominant >= 0) {
        for (int64_t i = 0; i < n; i++) sum[i] = t->base[dominant * n + i];
    } else {
        memset(sum, 0, sizeof(double) * (size_t)n);
        for (int m = 0; m < count; m++) {
            const float *w = t->base + members[m] * n;
            for (int64_t i = 0; i < n; i++) sum[i] += weight[m] * (double)w[i];
        }
        for (int64_t i = 0; i < n; i++) sum[i] /= denominator;
    }
    for (int m = 0; m < count; m++) {
        float *w = t->base + members[m] * n;
        for (int64_t i = 0; i < n; i++) w[i] = (float)sum[i];
    }
}

/* The group of `leader` (its lowest index): members [count] and weights. */
static int group_members(const merge_experts *x, const int32_t *group_of, int leader,
                         const double *freq, merge_weighting weights, int32_t *members,
                         double *weight, double *denominator) {
    int count = 0;
    double total = 0.0;
    for (int e = 0; e < x->n; e++) {
        if (group_of[e] != leader) continue;
        weight[count] = weights == MERGE_WEIGHTS_FREQUENCY ? freq[e] : 1.0;
        total += weight[count];
        members[count++] = e;
    }
    *denominator = weights == MERGE_WEIGHTS_FREQUENCY ? total + 1e-7 : (double)count;
    return count;
}

cm_status merge_layer_weights(const merge_experts *x, const int32_t *group_of,
                              const int32_t *dominant, const double *freq, merge_mode mode,
                              merge_weighting weights) {
    expert_tensor tensors[TENSORS];
    layer_tensors(x, tensors);
    int32_t *members = malloc(sizeof(int32_t) * (size_t)x->n);
    double *weight = malloc(sizeof(double) * (size_t)x->n);
    double *sum = malloc(sizeof(double) * (size_t)x->hidden * x->d_model);
    if (!members || !weight || !sum) {
        free(members);
        free(weight);
        free(sum);
        return CM_ERR(CM_ERR_NOMEM, "out of memory");
    }
    for (int leader = 0; leader < x->n; leader++) {
        if (group_of[leader] != leader) continue;
        double denominator;
        const int count =
            group_members(x, group_of, leader, freq, weights, members, weight, &denominator);
        if (count == 1) continue; /* a group of one stays as it is */
        const int keep = mode == MERGE_MODE_PRUNE ? dominant[leader] : -1;
        for (int i = 0; i < TENSORS; i++)
            if (tensors[i].base)
                merge_tensor(&tensors[i], members, count, weight, denominator, keep, sum);
    }
    free(members);
    free(weight);
    free(sum);
    return CM_OK;
}
