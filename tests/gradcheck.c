#include "gradcheck.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/rng.h"

enum { GC_ARENA_BYTES = 256 << 20 };

gc_options gc_default_options(void) {
    return (gc_options){.eps = 1e-2,
                        .atol = 1e-3,
                        .rtol = 1e-2,
                        .max_checks_per_input = 256,
                        .precise = true,
                        .seed = 1234};
}

ag_tensor *gc_tensor_new(int ndim, const int *shape, float low, float high, uint64_t seed,
                         bool requires_grad) {
    ag_tensor *t = calloc(1, sizeof *t);
    ag_tensor_set_shape(t, ndim, shape);
    size_t bytes = (size_t)(t->numel ? t->numel : 1) * sizeof(float);
    t->data = malloc(bytes);
    t->grad = calloc(1, bytes);
    t->requires_grad = requires_grad;
    t->name = "input";
    cm_rng_fill_uniform((cm_rng_key){seed, 0, 0, CM_RNG_TEST}, 0, t->numel, low, high, t->data);
    return t;
}

void gc_tensor_free(ag_tensor *t) {
    if (!t) return;
    free(t->data);
    free(t->grad);
    free(t);
}

/* L = sum w_k y_k in double, forward in no-grad mode. NAN on failure. */
static double weighted_output(ag_ctx *ctx, gc_forward_fn forward, ag_tensor *const *inputs,
                              void *user, const float *weights, int64_t numel) {
    ag_ctx_reset(ctx);
    bool previous = ag_set_grad_enabled(ctx, false);
    ag_tensor *y = forward(ctx, inputs, user);
    ag_set_grad_enabled(ctx, previous);
    if (!y || y->numel != numel) return NAN;
    double total = 0.0;
    for (int64_t k = 0; k < numel; k++) total += (double)weights[k] * y->data[k];
    return total;
}

gc_result gc_check(const char *label, gc_forward_fn forward, ag_tensor *const *inputs, int n_inputs,
                   void *user, const gc_options *options) {
    gc_result result = {.ok = false, .worst_input = -1};
    ag_ctx ctx;
    if (ag_ctx_init(&ctx, GC_ARENA_BYTES) != CM_OK) {
        snprintf(result.message, sizeof result.message, "%s: cannot create context", label);
        return result;
    }
    for (int i = 0; i < n_inputs; i++)
        if (inputs[i]->grad) memset(inputs[i]->grad, 0, (size_t)inputs[i]->numel * sizeof(float));

    /* Analytic pass. */
    ag_ctx_reset(&ctx);
    ag_tensor *y = forward(&ctx, inputs, user);
    if (!y) {
        snprintf(result.message, sizeof result.message, "%s: forward failed: %s", label,
                 cm_error_message());
        ag_ctx_free(&ctx);
        return result;
    }
    int64_t numel = y->numel;
    float *weights = malloc((size_t)(numel ? numel : 1) * sizeof(float));
    cm_rng_fill_uniform((cm_rng_key){options->seed, 1, 0, CM_RNG_TEST}, 0, numel, -1.0f, 1.0f,
                        weights);
    cm_status status = ag_backward_from(&ctx, y, weights);
    if (status != CM_OK) {
        snprintf(result.message, sizeof result.message, "%s: backward failed: %s", label,
                 cm_error_message());
        free(weights);
        ag_ctx_free(&ctx);
        return result;
    }
    float **analytic = calloc((size_t)n_inputs, sizeof *analytic);
    for (int i = 0; i < n_inputs; i++) {
        if (!inputs[i]->requires_grad) continue;
        analytic[i] = malloc((size_t)(inputs[i]->numel ? inputs[i]->numel : 1) * sizeof(float));
        memcpy(analytic[i], inputs[i]->grad, (size_t)inputs[i]->numel * sizeof(float));
    }

    result.ok = true;
    double eps = options->eps;
    for (int i = 0; i < n_inputs && result.ok; i++) {
        ag_tensor *x = inputs[i];
        if (!x->requires_grad) continue;
        int64_t n = x->numel;
        int64_t count = n < options->max_checks_per_input ? n : options->max_checks_per_input;
        for (int64_t c = 0; c < count; c++) {
            int64_t j = count == n ? c
                                   : (int64_t)cm_rng_below(
                                         (cm_rng_key){options->seed, 2, (uint32_t)i, CM_RNG_TEST},
                                         (uint64_t)c, (uint64_t)n);
            float original = x->data[j];
            double at[4];
            const double offsets[4] = {1, -1, 2, -2};
            int points = options->precise ? 4 : 2;
            for (int p = 0; p < points; p++) {
                x->data[j] = (float)(original + offsets[p] * eps);
                at[p] = weighted_output(&ctx, forward, inputs, user, weights, numel);
            }
            x->data[j] = original;
            double step_plus = (double)(float)(original + eps) - original;
            double numeric = options->precise
                                 ? (8.0 * (at[0] - at[1]) - (at[2] - at[3])) / (12.0 * step_plus)
                                 : (at[0] - at[1]) / (2.0 * step_plus);
            double a = analytic[i][j];
            double allowed = options->atol + options->rtol * fabs(numeric);
            double ratio =
                isfinite(a) && isfinite(numeric) ? fabs(a - numeric) / allowed : INFINITY;
            result.checked++;
            if (ratio > result.worst_ratio || result.worst_input < 0) {
                result.worst_ratio = ratio;
                result.worst_input = i;
                result.worst_index = j;
                result.worst_analytic = a;
                result.worst_numeric = numeric;
            }
            if (!(ratio <= 1.0)) result.ok = false;
        }
        for (int64_t j = 0; j < n; j++)
            if (!isfinite(analytic[i][j])) {
                result.ok = false;
                result.worst_input = i;
                result.worst_index = j;
                result.worst_analytic = analytic[i][j];
                break;
            }
    }
    snprintf(result.message, sizeof result.message,
             "%s: %s after %lld elements; worst: input %d element %lld analytic %.7g numeric "
             "%.7g (error/allowed %.3g; eps %g atol %g rtol %g)",
             label, result.ok ? "ok" : "MISMATCH", (long long)result.checked, result.worst_input,
             (long long)result.worst_index, result.worst_analytic, result.worst_numeric,
             result.worst_ratio, options->eps, options->atol, options->rtol);
    if (!result.ok) fprintf(stderr, "gradcheck %s\n", result.message);

    for (int i = 0; i < n_inputs; i++) free(analytic[i]);
    free(analytic);
    free(weights);
    ag_ctx_free(&ctx);
    return result;
}
