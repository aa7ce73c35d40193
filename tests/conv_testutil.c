/* Assertion helpers of the conv-op and CNN tests (see conv_testutil.h). */
#include "conv_testutil.h"

#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* The arena of expect_accumulates' forward and backward passes. */
enum { ARENA_BYTES = 8 << 20 };

/* Asserts got[i] == want[i] within tol (relative to max(1, |want|)). */
void expect_close(const char *label, const float *got, const double *want, int64_t n, double tol) {
    for (int64_t i = 0; i < n; i++) {
        double allowed = tol * (fabs(want[i]) > 1.0 ? fabs(want[i]) : 1.0);
        ck_assert_msg(fabs(got[i] - want[i]) <= allowed, "%s element %lld: got %.9g want %.9g",
                      label, (long long)i, got[i], want[i]);
    }
}

/* Elements gc_check compares for t (it samples inputs larger than that). */
int64_t checks_for(const ag_tensor *t) {
    int64_t limit = gc_default_options().max_checks_per_input;
    return t->numel < limit ? t->numel : limit;
}

void expect_gradcheck(const char *label, gc_forward_fn forward, ag_tensor *const *in, int n_in,
                      void *user, int64_t min_checked) {
    gc_options options = gc_default_options();
    gc_result r = gc_check(label, forward, in, n_in, user, &options);
    ck_assert_msg(r.ok, "%s", r.message);
    ck_assert_int_ge(r.checked, min_checked);
}

/* Runs forward + backward twice without zeroing the gradients and asserts
 * every wanted gradient doubled (a beta = 0 sgemm or an "=" instead of "+="
 * would leave one pass's value). The upstream gradient is fixed and uneven. */
void expect_accumulates(const char *label, gc_forward_fn forward, ag_tensor *const *in, int n_in,
                        void *user) {
    ag_ctx ctx;
    ck_assert_int_eq(ag_ctx_init(&ctx, ARENA_BYTES), CM_OK);
    float *once[4] = {0};
    ck_assert_int_le(n_in, 4);
    for (int i = 0; i < n_in; i++) memset(in[i]->grad, 0, (size_t)in[i]->numel * sizeof(float));
    for (int round = 0; round < 2; round++) {
        ag_ctx_reset(&ctx);
        ag_tensor *y = forward(&ctx, in, user);
        ck_assert_ptr_nonnull(y);
        float *dy = malloc((size_t)y->numel * sizeof(float));
        for (int64_t k = 0; k < y->numel; k++) dy[k] = (float)((k * 7) % 11) / 11.0f - 0.4f;
        ck_assert_int_eq(ag_backward_from(&ctx, y, dy), CM_OK);
        free(dy);
        for (int i = 0; i < n_in && round == 0; i++) {
            once[i] = malloc((size_t)in[i]->numel * sizeof(float));
            memcpy(once[i], in[i]->grad, (size_t)in[i]->numel * sizeof(float));
        }
    }
    for (int i = 0; i < n_in; i++) {
        if (!in[i]->requires_grad) continue;
        double largest = 0.0;
        for (int64_t j = 0; j < in[i]->numel; j++) {
            float single = once[i][j];
            largest = fmax(largest, fabs(single));
            ck_assert_msg(fabsf(in[i]->grad[j] - 2.0f * single) <= 1e-5f * (1.0f + fabsf(single)),
                          "%s input %d element %lld: %g after two passes, %g after one", label, i,
                          (long long)j, in[i]->grad[j], single);
        }
        ck_assert_msg(largest > 1e-3, "%s input %d: gradient is all zero", label, i);
    }
    for (int i = 0; i < n_in; i++) free(once[i]);
    ag_ctx_free(&ctx);
}

void free_inputs(ag_tensor **in, int n) {
    for (int i = 0; i < n; i++) gc_tensor_free(in[i]);
}
