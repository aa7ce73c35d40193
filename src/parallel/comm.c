#include "parallel/comm.h"

#include <stdio.h>
#include <stdlib.h>

#include "common/check.h"
#include "common/log.h"

static bool started_mpi = false;

static void abort_all(void) {
    MPI_Abort(MPI_COMM_WORLD, 1);
}

_Noreturn void comm_abort(const char *reason) {
    cm_log_error("%s", reason);
    int initialized = 0, finalized = 0;
    MPI_Initialized(&initialized);
    MPI_Finalized(&finalized);
    if (initialized && !finalized) MPI_Abort(MPI_COMM_WORLD, 1);
    exit(1);
}

/* Turns an MPI error code into a status with MPI's own text. */
static cm_status mpi_error(int code, const char *call) {
    char text[MPI_MAX_ERROR_STRING];
    int length = 0;
    MPI_Error_string(code, text, &length);
    return CM_ERR(CM_ERR_MPI, "%s failed: %.*s", call, length, text);
}

#define MPI_TRY(call)                                                                              \
    do {                                                                                           \
        int mpi_code_ = (call);                                                                    \
        if (mpi_code_ != MPI_SUCCESS) return mpi_error(mpi_code_, #call);                          \
    } while (0)

cm_status comm_start(int *argc, char ***argv) {
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (!initialized) {
        int provided;
        MPI_TRY(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided));
        started_mpi = true;
    }
    /* Errors come back as codes (turned into statuses), not as aborts. */
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    int rank = 0, size = 1;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    cm_log_set_rank(rank, size);
    cm_set_abort_hook(abort_all);
    return CM_OK;
}

void comm_stop(void) {
    if (started_mpi) MPI_Finalize();
    started_mpi = false;
}

cm_status comm_init(cm_comm *comm, int expert_parallel) {
    *comm = (cm_comm){.world = MPI_COMM_WORLD, .ep = MPI_COMM_NULL, .dp = MPI_COMM_NULL};
    MPI_Comm_rank(MPI_COMM_WORLD, &comm->world_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &comm->world_size);
    int ep = expert_parallel > 0 ? expert_parallel : comm->world_size;
    if (comm->world_size % ep != 0)
        return CM_ERR(CM_ERR_INVALID,
                      "parallel.expert_parallel = %d does not divide the %d ranks of the job", ep,
                      comm->world_size);
    comm->ep_size = ep;
    comm->ep_rank = comm->world_rank % ep;
    comm->dp_size = comm->world_size / ep;
    comm->dp_rank = comm->world_rank / ep;
    MPI_TRY(MPI_Comm_split(MPI_COMM_WORLD, comm->dp_rank, comm->ep_rank, &comm->ep));
    MPI_TRY(MPI_Comm_split(MPI_COMM_WORLD, comm->ep_rank, comm->dp_rank, &comm->dp));
    return CM_OK;
}

void comm_free(cm_comm *comm) {
    if (comm->ep != MPI_COMM_NULL) MPI_Comm_free(&comm->ep);
    if (comm->dp != MPI_COMM_NULL) MPI_Comm_free(&comm->dp);
}

cm_status comm_check_experts(const cm_comm *comm, int num_experts) {
    if (comm && num_experts % comm->ep_size != 0)
        return CM_ERR(CM_ERR_INVALID,
                      "moe.num_experts = %d cannot be split evenly over %d expert-parallel ranks "
                      "(parallel.expert_parallel)",
                      num_experts, comm->ep_size);
    return CM_OK;
}

void comm_local_experts(const cm_comm *comm, int num_experts, int *first, int *count) {
    int ranks = comm ? comm->ep_size : 1, rank = comm ? comm->ep_rank : 0;
    *count = num_experts / ranks;
    *first = rank * *count;
}

int comm_size(MPI_Comm group) {
    int size = 1;
    if (group != MPI_COMM_NULL && group != (MPI_Comm)0) MPI_Comm_size(group, &size);
    return size;
}

cm_status comm_sum_int32(MPI_Comm group, int32_t *values, int count) {
    if (comm_size(group) == 1) return CM_OK;
    MPI_TRY(MPI_Allreduce(MPI_IN_PLACE, values, count, MPI_INT32_T, MPI_SUM, group));
    return CM_OK;
}

cm_status comm_sum_floats(MPI_Comm group, float *values, int64_t count) {
    if (comm_size(group) == 1) return CM_OK;
    /* MPI counts are int: reduce in chunks. */
    const int64_t chunk = 1 << 28;
    for (int64_t done = 0; done < count; done += chunk) {
        int n = (int)(count - done < chunk ? count - done : chunk);
        MPI_TRY(MPI_Allreduce(MPI_IN_PLACE, values + done, n, MPI_FLOAT, MPI_SUM, group));
    }
    return CM_OK;
}

cm_status comm_sum_doubles(MPI_Comm group, double *values, int count) {
    if (comm_size(group) == 1) return CM_OK;
    MPI_TRY(MPI_Allreduce(MPI_IN_PLACE, values, count, MPI_DOUBLE, MPI_SUM, group));
    return CM_OK;
}

cm_status comm_sum_int64(MPI_Comm group, int64_t *values, int count) {
    if (comm_size(group) == 1) return CM_OK;
    MPI_TRY(MPI_Allreduce(MPI_IN_PLACE, values, count, MPI_INT64_T, MPI_SUM, group));
    return CM_OK;
}
