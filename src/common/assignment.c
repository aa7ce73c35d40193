#include "common/assignment.h"

#include <math.h>
#include <stdbool.h>
#include <stdlib.h>

/* Working state, 1-based as in the textbook method: row 0 and column 0 are
 * the virtual start of every augmenting path. */
typedef struct lsa_state {
    int n;
    const double *score;
    double *row_potential, *column_potential, *slack; /* [n+1] */
    int32_t *row_of_column, *previous;                /* [n+1] */
    unsigned char *visited;                           /* [n+1] */
} lsa_state;

/* The cost of (row, column), 1-based: the negated score (we minimise). */
static double cost(const lsa_state *s, int row, int column) {
    return -s->score[(int64_t)(row - 1) * s->n + (column - 1)];
}

/* Grows a shortest augmenting path from `row` (free) to a free column and
 * flips it. */
static void augment(lsa_state *s, int row) {
    const int n = s->n;
    s->row_of_column[0] = row;
    int column = 0;
    for (int j = 0; j <= n; j++) {
        s->slack[j] = INFINITY;
        s->visited[j] = 0;
    }
    do {
        s->visited[column] = 1;
        const int i = s->row_of_column[column];
        double delta = INFINITY;
        int next = 0;
        for (int j = 1; j <= n; j++) {
            if (s->visited[j]) continue;
            const double reduced = cost(s, i, j) - s->row_potential[i] - s->column_potential[j];
            if (reduced < s->slack[j]) {
                s->slack[j] = reduced;
                s->previous[j] = column;
            }
            if (s->slack[j] < delta) {
                delta = s->slack[j];
                next = j;
            }
        }
        for (int j = 0; j <= n; j++) {
            if (s->visited[j]) {
                s->row_potential[s->row_of_column[j]] += delta;
                s->column_potential[j] -= delta;
            } else {
                s->slack[j] -= delta;
            }
        }
        column = next;
    } while (s->row_of_column[column] != 0);
    do { /* flip the path back to the start */
        const int before = s->previous[column];
        s->row_of_column[column] = s->row_of_column[before];
        column = before;
    } while (column != 0);
}

cm_status cm_assignment_max(const double *score, int n, int32_t *column_of) {
    if (n < 1) return CM_ERR(CM_ERR_INVALID, "assignment of %d rows: needs n >= 1", n);
    for (int64_t i = 0; i < (int64_t)n * n; i++)
        if (!isfinite(score[i]))
            return CM_ERR(CM_ERR_INVALID, "assignment score %lld is not finite", (long long)i);
    const size_t size = (size_t)n + 1;
    lsa_state s = {.n = n,
                   .score = score,
                   .row_potential = calloc(size, sizeof(double)),
                   .column_potential = calloc(size, sizeof(double)),
                   .slack = calloc(size, sizeof(double)),
                   .row_of_column = calloc(size, sizeof(int32_t)),
                   .previous = calloc(size, sizeof(int32_t)),
                   .visited = calloc(size, 1)};
    const bool ok = s.row_potential && s.column_potential && s.slack && s.row_of_column &&
                    s.previous && s.visited;
    if (ok) {
        for (int row = 1; row <= n; row++) augment(&s, row);
        for (int j = 1; j <= n; j++) column_of[s.row_of_column[j] - 1] = j - 1;
    }
    free(s.row_potential);
    free(s.column_potential);
    free(s.slack);
    free(s.row_of_column);
    free(s.previous);
    free(s.visited);
    return ok ? CM_OK : CM_ERR(CM_ERR_NOMEM, "out of memory for an assignment of %d rows", n);
}
