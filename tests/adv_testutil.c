/* Shared helpers of the adversarial tests (see adv_testutil.h). */
#include "adv_testutil.h"

#include <check.h>
#include <math.h>

#include "common/rng.h"

void softmax_row(const double *logits, int classes, double *p) {
    double top = logits[0], sum = 0.0;
    for (int v = 1; v < classes; v++) top = fmax(top, logits[v]);
    for (int v = 0; v < classes; v++) sum += p[v] = exp(logits[v] - top);
    for (int v = 0; v < classes; v++) p[v] /= sum;
}

/* mean over rows of KL(softmax(a) || softmax(b)) */
double mean_kl(const double *a, const double *b, int rows, int classes) {
    double total = 0.0, p[16], q[16];
    for (int n = 0; n < rows; n++) {
        softmax_row(a + n * classes, classes, p);
        softmax_row(b + n * classes, classes, q);
        for (int v = 0; v < classes; v++) total += p[v] * (log(p[v]) - log(q[v]));
    }
    return total / rows;
}

void expect_in_ball(const float *x, const float *x_adv, int64_t n, float eps) {
    for (int64_t i = 0; i < n; i++) {
        ck_assert_msg(x_adv[i] >= 0.0f && x_adv[i] <= 1.0f, "pixel %lld = %g outside [0,1]",
                      (long long)i, x_adv[i]);
        ck_assert_msg(fabsf(x_adv[i] - x[i]) <= eps * (1.0f + 1e-6f),
                      "pixel %lld moved %g > eps %g", (long long)i, x_adv[i] - x[i], eps);
    }
}

/* x + eps * (random sign), clipped to [0,1]: a perturbation of the same size. */
void random_perturbation(const float *x, int64_t n, float eps, uint64_t seed, float *out) {
    cm_rng_fill_uniform((cm_rng_key){seed, 0, 0, CM_RNG_TEST}, 0, n, -1.0f, 1.0f, out);
    for (int64_t i = 0; i < n; i++)
        out[i] = fminf(fmaxf(x[i] + (out[i] >= 0.0f ? eps : -eps), 0.0f), 1.0f);
}
