/* The linear assignment problem (LSA): a one-to-one matching of n rows to n
 * columns that maximises the total score, by the Hungarian method with
 * potentials and shortest augmenting paths (Kuhn-Munkres as Jonker and
 * Volgenant write it): O(n^3) time, O(n) memory besides the scores.
 * cmoe merge aligns the hidden units of experts with it (METHODS.md 10.6;
 * scipy's linear_sum_assignment with maximize=True in the release).
 * Owns: nothing beyond a call. */
#ifndef CMOE_COMMON_ASSIGNMENT_H
#define CMOE_COMMON_ASSIGNMENT_H

#include <stdint.h>

#include "common/status.h"

/* score [n,n] row-major (finite); fills column_of[row] [n] with a
 * permutation maximising sum_row score[row, column_of[row]]. Among equal
 * optima the result is deterministic (not necessarily scipy's).
 * CM_ERR_INVALID for n < 1 or a non-finite score, CM_ERR_NOMEM. */
cm_status cm_assignment_max(const double *score, int n, int32_t *column_of);

#endif
