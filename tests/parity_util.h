/* Helpers shared by the PyTorch parity tests (tests/test_parity*.c). */
#ifndef CMOE_TESTS_PARITY_UTIL_H
#define CMOE_TESTS_PARITY_UTIL_H

#include <hdf5.h>
#include <stdint.h>

/* max |got - want| over max |want| (the absolute difference if want is 0). */
double parity_relative_error(const float *got, const double *want, int64_t n);

/* A numeric dataset of n elements of an HDF5 file, as doubles (malloc'd);
 * fails the running Check test if it is missing or has another size. */
double *parity_read_doubles(hid_t file, const char *name, int64_t n);

#endif
