/* cmoe merge's plan: frequencies, similarities, the global allocation of
 * groups and the groups themselves (train/merge.h, METHODS.md 10.2-10.5). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "train/merge.h"

const char *const merge_grouping_names[MERGE_GROUPING_COUNT + 1] = {"msmoe", "random", NULL};
const char *const merge_weighting_names[MERGE_WEIGHTS_COUNT + 1] = {"frequency", "uniform", NULL};
const char *const merge_mode_names[MERGE_MODE_COUNT + 1] = {"merge", "prune", NULL};

void merge_frequencies(const int64_t *counts, int n, double *freq) {
    int64_t total = 0;
    for (int e = 0; e < n; e++) total += counts[e];
    for (int e = 0; e < n; e++) freq[e] = total > 0 ? (double)counts[e] / (double)total : 0.0;
}

void merge_gram_add(double *gram, const float *logits, int64_t tokens, int n) {
    for (int64_t t = 0; t < tokens; t++) {
        const float *row = logits + t * n;
        for (int i = 0; i < n; i++)
            for (int j = 0; j < n; j++) gram[i * n + j] += (double)row[i] * (double)row[j];
    }
}

void merge_similarity(const double *gram, int n, double *similarity) {
    const double eps = 1e-7;
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++) {
            const double norm_i = fmax(sqrt(gram[i * n + i]), eps);
            const double norm_j = fmax(sqrt(gram[j * n + j]), eps);
            const double cosine = fmin(1.0, fmax(-1.0, gram[i * n + j] / (norm_i * norm_j)));
            similarity[i * n + j] = i == j ? 1.0 : (cosine + 1.0) / 2.0;
        }
}

static int descending(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x < y) - (x > y);
}

/* Steps 1-2 of 10.4: unmerged layers at 1.0, each merged layer's most-used
 * expert (the lowest index among equals) at 1.0. */
static void adjusted_frequencies(const double *freq, const bool *merged, int layers, int n,
                                 double *out) {
    for (int l = 0; l < layers; l++) {
        int top = 0;
        for (int e = 0; e < n; e++) {
            out[l * n + e] = merged[l] ? freq[l * n + e] : 1.0;
            if (freq[l * n + e] > freq[l * n + top]) top = e;
        }
        out[l * n + top] = 1.0;
    }
}

cm_status merge_allocate(const double *freq, const bool *merged, int layers, int n, int g_avg,
                         int *groups) {
    if (g_avg < 1 || g_avg > n)
        return CM_ERR(CM_ERR_INVALID, "the average group count %d is not in [1, %d experts]", g_avg,
                      n);
    int merged_layers = 0;
    for (int l = 0; l < layers; l++) merged_layers += merged[l];
    for (int l = 0; l < layers; l++) groups[l] = n;
    if (g_avg == n || merged_layers == 0) return CM_OK;
    const int64_t total = (int64_t)layers * n;
    double *adjusted = malloc(sizeof(double) * (size_t)total);
    double *sorted = malloc(sizeof(double) * (size_t)total);
    if (!adjusted || !sorted) {
        free(adjusted);
        free(sorted);
        return CM_ERR(CM_ERR_NOMEM, "out of memory");
    }
    adjusted_frequencies(freq, merged, layers, n, adjusted);
    memcpy(sorted, adjusted, sizeof(double) * (size_t)total);
    qsort(sorted, (size_t)total, sizeof(double), descending);
    const int64_t g_total = (int64_t)g_avg * merged_layers + (int64_t)n * (layers - merged_layers);
    const double threshold = sorted[g_total]; /* g_total < total as g_avg < n */
    for (int l = 0; l < layers; l++) {
        groups[l] = 0;
        for (int e = 0; e < n; e++) groups[l] += adjusted[l * n + e] > threshold;
    }
    free(adjusted);
    free(sorted);
    if (threshold == 1.0)
        return CM_ERR(CM_ERR_INVALID,
                      "the frequency threshold of the global allocation is 1.0: %lld groups "
                      "leave nothing to merge",
                      (long long)g_total);
    return CM_OK;
}

/* dominant[e] and group_of[e] from the labels: label[e] in [0, groups), the
 * dominant expert of label i is leader[i]; lowest: scratch [groups]. */
static void finish_groups(int n, int groups, const int32_t *leader, const int32_t *label,
                          int32_t *lowest, int32_t *dominant, int32_t *group_of) {
    for (int i = 0; i < groups; i++) lowest[i] = n;
    for (int e = 0; e < n; e++)
        if (e < lowest[label[e]]) lowest[label[e]] = e;
    for (int e = 0; e < n; e++) {
        dominant[e] = leader[label[e]];
        group_of[e] = lowest[label[e]];
    }
}

/* Scratch for a layer's grouping: order, label, lowest, [n] each. */
static int32_t *group_scratch(int n) {
    return malloc(sizeof(int32_t) * 3 * (size_t)n);
}

cm_status merge_group_msmoe(const double *freq, const double *similarity, int n, int groups,
                            int32_t *dominant, int32_t *group_of) {
    int32_t *order = group_scratch(n), *label = order + n;
    if (!order) return CM_ERR(CM_ERR_NOMEM, "out of memory");
    for (int e = 0; e < n; e++) { /* insertion sort: stable, most used first */
        int at = e;
        while (at > 0 && freq[order[at - 1]] < freq[e]) {
            order[at] = order[at - 1];
            at--;
        }
        order[at] = e;
    }
    for (int i = 0; i < groups; i++) label[order[i]] = i;
    for (int i = groups; i < n; i++) {
        const int e = order[i];
        int best = 0;
        for (int j = 1; j < groups; j++)
            if (similarity[e * n + order[j]] > similarity[e * n + order[best]]) best = j;
        label[e] = best;
    }
    finish_groups(n, groups, order, label, label + n, dominant, group_of);
    free(order);
    return CM_OK;
}

cm_status merge_group_random(cm_rng_key key, int n, int groups, int32_t *dominant,
                             int32_t *group_of) {
    int32_t *order = group_scratch(n), *label = order + n;
    if (!order) return CM_ERR(CM_ERR_NOMEM, "out of memory");
    cm_rng_permutation(key, n, order);
    cm_rng_key members = key;
    members.step += 1; /* the memberships: draws of their own */
    for (int i = 0; i < n; i++)
        label[order[i]] = i < groups ? i : (int32_t)cm_rng_below(members, (uint64_t)i, groups);
    finish_groups(n, groups, order, label, label + n, dominant, group_of);
    free(order);
    return CM_OK;
}
