/* Assertion helpers of the conv-op and CNN tests (test_ops_conv.c,
 * test_ops_bn_pool.c, test_cnn.c, test_cnn_moe.c): values against a
 * double-precision reference, gradient checks, and the += rule. */
#ifndef CMOE_TESTS_CONV_TESTUTIL_H
#define CMOE_TESTS_CONV_TESTUTIL_H

#include "gradcheck.h"

/* Asserts got[i] == want[i] within tol (relative to max(1, |want|)). */
void expect_close(const char *label, const float *got, const double *want, int64_t n, double tol);

/* Elements gc_check compares for t (it samples inputs larger than that). */
int64_t checks_for(const ag_tensor *t);

/* gc_check with the default options; asserts it passed and compared at
 * least min_checked elements. */
void expect_gradcheck(const char *label, gc_forward_fn forward, ag_tensor *const *in, int n_in,
                      void *user, int64_t min_checked);

/* Runs forward + backward twice without zeroing the gradients and asserts
 * every wanted gradient doubled. */
void expect_accumulates(const char *label, gc_forward_fn forward, ag_tensor *const *in, int n_in,
                        void *user);

/* gc_tensor_free of in[0..n). */
void free_inputs(ag_tensor **in, int n);

#endif
