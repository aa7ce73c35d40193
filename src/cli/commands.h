/* The cmoe subcommands that live outside main.c, and the allocation counter
 * of the cmoe executable (alloc_count.c). */
#ifndef CMOE_CLI_COMMANDS_H
#define CMOE_CLI_COMMANDS_H

#include <signal.h>
#include <stdbool.h>

/* `cmoe bench RECIPE ...`: argc/argv after the command name; returns the
 * process exit status. */
int command_bench(int argc, char **argv);
/* `cmoe study STUDY.yaml ...` (study.c), likewise. */
int command_study(int argc, char **argv);
/* `cmoe sample CKPT ...` (sample.c), likewise. */
int command_sample(int argc, char **argv);
/* `cmoe route CKPT ...` (route.c, route_out.c), likewise. */
int command_route(int argc, char **argv);
/* `cmoe upcycle DENSE.h5 --recipe MOE.yaml -o OUT.h5` (upcycle.c), likewise. */
int command_upcycle(int argc, char **argv);
/* `cmoe merge CKPT -o OUT.h5 ...` (merge.c): MC-SMoE's merge, likewise. */
int command_merge(int argc, char **argv);

/* Makes SIGINT and SIGTERM set the returned flag (a second signal ends the
 * process at once); the run loop saves a checkpoint and stops on it. */
volatile sig_atomic_t *cli_catch_stop_signals(void);

/* False in sanitizer builds, whose allocator is the sanitizer's. */
bool alloc_count_available(void);
/* Counting on or off (off at start). */
void alloc_count_enable(bool on);
/* Allocation calls counted so far in the whole process, all threads
 * (malloc, calloc, realloc and the aligned variants); -1 if unavailable. */
long long alloc_count_total(void);
/* Where an allocation comes from (alloc_count.c: by its call stack). */
typedef enum alloc_source {
    ALLOC_MPI,       /* a frame in Open MPI or the libraries it runs on */
    ALLOC_OWN,       /* else a frame in cmoe's code */
    ALLOC_ELSEWHERE, /* OpenBLAS, libc, or a stack that did not unwind */
    ALLOC_N_SOURCES
} alloc_source;
/* The part of alloc_count_total from `source`; -1 if unavailable. */
long long alloc_count_from(alloc_source source);

#endif
