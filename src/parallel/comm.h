/* MPI process groups for expert and data parallelism.
 *
 * The world of W ranks is split into W / EP expert-parallel (EP) groups of EP
 * consecutive ranks; the experts of every MoE layer are divided evenly over
 * the ranks of an EP group (rank i of the group owns experts
 * [i E/EP, (i+1) E/EP)). The data-parallel (DP) group of a rank is the set of
 * ranks with the same position in their EP groups: they hold replicas of the
 * same experts. Every rank processes its own rows of the global batch.
 *
 *   dense gradients   summed over the world (every rank holds every dense parameter)
 *   expert gradients  summed over the DP group (the replicas of those experts)
 *   tokens            exchanged within the EP group (dispatch.h)
 *
 * A single process (no mpirun, or cm_comm == NULL where a function accepts
 * it) is a world of one: every collective degenerates to a copy, on the same
 * code path. Owns: the EP and DP communicators. */
#ifndef CMOE_PARALLEL_COMM_H
#define CMOE_PARALLEL_COMM_H

#include <mpi.h>
#include <stdbool.h>
#include <stdint.h>

#include "common/status.h"

typedef struct cm_comm {
    MPI_Comm world, ep, dp;
    int world_rank, world_size;
    int ep_rank, ep_size; /* position in / size of this rank's EP group */
    int dp_rank, dp_size; /* index of this rank's EP group / number of groups */
    bool owns_mpi;        /* comm_init called MPI_Init */
} cm_comm;

/* Initialises MPI if needed (MPI_Init_thread, funneled) and installs the
 * abort hook so a failed CM_ASSERT on any rank ends the whole job. */
cm_status comm_start(int *argc, char ***argv);
/* Builds the EP and DP groups; a world size not divisible by expert_parallel
 * is a clear error. expert_parallel 0 means the whole world. */
cm_status comm_init(cm_comm *comm, int expert_parallel);
void comm_free(cm_comm *comm);
/* MPI_Finalize if comm_start initialised MPI. */
void comm_stop(void);
/* Ends every rank of the job now (MPI_Abort), after printing `reason`. */
_Noreturn void comm_abort(const char *reason);

/* Checks that `num_experts` splits evenly over the EP group. */
cm_status comm_check_experts(const cm_comm *comm, int num_experts);
/* This rank's first expert and expert count for num_experts experts. */
void comm_local_experts(const cm_comm *comm, int num_experts, int *first, int *count);

/* In-place sums (all ranks get the result). comm NULL: nothing to do. */
cm_status comm_sum_floats(MPI_Comm group, float *values, int64_t count);
cm_status comm_sum_doubles(MPI_Comm group, double *values, int count);
cm_status comm_sum_int64(MPI_Comm group, int64_t *values, int count);
cm_status comm_sum_int32(MPI_Comm group, int32_t *values, int count);

/* Size of a communicator; 1 for MPI_COMM_NULL or a zero handle (a struct
 * initialised with {0}), which stand for a single process. */
int comm_size(MPI_Comm group);

#endif
