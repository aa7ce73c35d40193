/* How a global batch is split over the ranks that share it (data
 * parallelism): the same rule for text windows and images, so a job gives
 * the same batches on any number of ranks. Owns: nothing. */
#ifndef CMOE_DATA_SHARD_H
#define CMOE_DATA_SHARD_H

/* Rows [begin, end) of a batch of `rows` that rank `rank` of `ranks` takes:
 * begin = rank * rows / ranks, end = (rank + 1) * rows / ranks. */
typedef struct shard_range {
    int begin, end;
} shard_range;
shard_range shard_rows(int rows, int rank, int ranks);

#endif
