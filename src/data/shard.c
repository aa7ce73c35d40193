#include "data/shard.h"

#include <stdint.h>

shard_range shard_rows(int rows, int rank, int ranks) {
    shard_range range = {(int)((int64_t)rank * rows / ranks),
                         (int)((int64_t)(rank + 1) * rows / ranks)};
    return range;
}
