/* Shared by the adversarial tests (test_adversarial.c,
 * test_adversarial_cnn.c): the batch shape, softmax / KL in double, and the
 * eps-ball checks. */
#ifndef CMOE_TESTS_ADV_TESTUTIL_H
#define CMOE_TESTS_ADV_TESTUTIL_H

#include <stdint.h>

enum { N = 6, H = 3, W = 5, D = H * W, V = 4 };

void softmax_row(const double *logits, int classes, double *p);

/* mean over rows of KL(softmax(a) || softmax(b)) */
double mean_kl(const double *a, const double *b, int rows, int classes);

/* Asserts every pixel of x_adv is in [0,1] and within eps of x. */
void expect_in_ball(const float *x, const float *x_adv, int64_t n, float eps);

/* x + eps * (random sign), clipped to [0,1]: a perturbation of the same size. */
void random_perturbation(const float *x, int64_t n, float eps, uint64_t seed, float *out);

#endif
