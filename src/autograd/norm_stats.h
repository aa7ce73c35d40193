/* Layer norm's row statistics, shared by the op (ops_norm.c) and the
 * incremental decoder (layers/lm_decode.c) so the two stay bit-identical:
 * the mean and biased variance from sums of x - x[0] in double (shifting by
 * a sample of the row keeps E[x^2] - E[x]^2 from cancelling when the mean is
 * large next to the spread), eps inside the square root. */
#ifndef CMOE_AUTOGRAD_NORM_STATS_H
#define CMOE_AUTOGRAD_NORM_STATS_H

#include <math.h>

static inline void ag_norm_row_stats(const float *x, int d, float eps, float *mean, float *rstd) {
    float shift = x[0];
    double shifted_total = 0.0, shifted_squares = 0.0;
    for (int i = 0; i < d; i++) {
        double centred = (double)x[i] - shift;
        shifted_total += centred;
        shifted_squares += centred * centred;
    }
    double shifted_mean = shifted_total / d;
    double variance = shifted_squares / d - shifted_mean * shifted_mean;
    if (variance < 0.0) variance = 0.0;
    *mean = (float)(shift + shifted_mean);
    *rstd = (float)(1.0 / sqrt(variance + eps));
}

#endif
