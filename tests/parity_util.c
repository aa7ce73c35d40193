#include "parity_util.h"

#include <check.h>
#include <math.h>
#include <stdlib.h>

double parity_relative_error(const float *got, const double *want, int64_t n) {
    double max_diff = 0.0, max_ref = 0.0;
    for (int64_t i = 0; i < n; i++) {
        max_diff = fmax(max_diff, fabs((double)got[i] - want[i]));
        max_ref = fmax(max_ref, fabs(want[i]));
    }
    return max_ref > 0 ? max_diff / max_ref : max_diff;
}

double *parity_read_doubles(hid_t file, const char *name, int64_t n) {
    hid_t dataset = H5Dopen2(file, name, H5P_DEFAULT);
    ck_assert_msg(dataset >= 0, "reference has no %s", name);
    hid_t space = H5Dget_space(dataset);
    ck_assert_int_eq(H5Sget_simple_extent_npoints(space), n);
    H5Sclose(space);
    double *values = malloc((size_t)n * sizeof(double));
    ck_assert_ptr_nonnull(values);
    ck_assert_int_ge(H5Dread(dataset, H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT, values), 0);
    H5Dclose(dataset);
    return values;
}
