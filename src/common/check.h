/* Invariant checks that stay on in release builds.
 *
 * CM_ASSERT is for bugs (a shape mismatch between ops, a broken invariant),
 * not for user errors, which are returned as cm_status values. A failed check
 * prints the expression, file:line and a formatted message, then calls the
 * abort hook: abort() by default; the parallel module installs one that calls
 * MPI_Abort so no rank is left waiting. */
#ifndef CMOE_COMMON_CHECK_H
#define CMOE_COMMON_CHECK_H

_Noreturn void cm_assert_fail(const char *expr, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

#define CM_ASSERT(cond, ...)                                                                       \
    do {                                                                                           \
        if (__builtin_expect(!(cond), 0)) cm_assert_fail(#cond, __FILE__, __LINE__, __VA_ARGS__);  \
    } while (0)

typedef void (*cm_abort_hook)(void);
/* Replaces the function called after a failed check (it must not return). */
void cm_set_abort_hook(cm_abort_hook hook);

#endif
