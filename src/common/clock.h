/* The monotonic clock every timing in cmoe reads (progress, bench, the
 * exchange counters). Owns: nothing. */
#ifndef CMOE_COMMON_CLOCK_H
#define CMOE_COMMON_CLOCK_H

/* Monotonic seconds since an arbitrary origin. */
double cm_now(void);

#endif
