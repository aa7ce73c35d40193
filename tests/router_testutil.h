/* Fixtures and references shared by the router tests (test_routers.c,
 * test_routers_methods.c): a declared router with its parameters and arena,
 * logits set by hand, routing with the output's invariants asserted,
 * double-precision references (softmax, logsumexp, rank, logits) and
 * gradient checks of the gates and losses with the selection held fixed. */
#ifndef CMOE_TESTS_ROUTER_TESTUTIL_H
#define CMOE_TESTS_ROUTER_TESTUTIL_H

#include <stdbool.h>
#include <stdint.h>

#include "gradcheck.h"
#include "routers/router.h"
#include "routers/router_internal.h"

enum { ARENA_BYTES = 16 << 20, MAX_E = 8 };

/* ---- fixtures -------------------------------------------------------------- */

typedef struct fixture {
    ag_params params;
    router r;
    ag_ctx ctx;
} fixture;

/* A config of `kind` with E experts and k; softmax-then-topK, init std 0.02,
 * noise std 1, top_p 0.5, a constant k schedule at k, THOR per sequence,
 * RMoE's H_r 3. */
router_config make_config(router_kind kind, int experts, int k);
/* Declares the router (layer 3, PREFIX "router") with d_model inputs,
 * finalizes the parameters and makes a 16 MiB arena. */
void fixture_init(fixture *f, const router_config *config, int d_model);
void fixture_free(fixture *f);
ag_tensor *weight_of(fixture *f);
/* x = the identity [T,T] and W[e][t] = logits[t][e], so x W^T = logits [T,E]
 * exactly (d_model must be T). Returns x (free with gc_tensor_free). */
ag_tensor *set_logits(fixture *f, int tokens, const float *logits, bool x_grad);
/* An evaluation call: seed 5, step 9, seq_len 4. */
router_call eval_call(void);
/* Routes x (after an arena reset) and asserts the CSR invariants. */
router_output route(fixture *f, ag_tensor *x, const router_call *call);
/* Slots of token t must be exactly `experts` (count n, ascending). */
void assert_token_experts(const router_output *out, int t, int n, const int *experts);

/* ---- direct double-precision references ------------------------------------- */

void ref_softmax(const float *row, int n, double *out);
double ref_logsumexp(const float *row, int n);
/* rank of entry i among row[0..n): how many entries beat it (larger, or equal
 * with a lower index). Selected by top-k iff rank < k. */
int ref_rank(const double *row, int n, int i);
/* logits [T,E] in double from the router's current x, W, b. */
void ref_logits(fixture *f, const ag_tensor *x, double *logits);

/* ---- gradient checks with the selection held fixed ---------------------------- */

/* x [T,E+2] = [L | u], W [E,E+2] = [I | v], b small: the logits are L plus a
 * small data-dependent part, and every input reaches them. L[t] is a
 * permutation of `levels` scaled by scales[t % n_scales]. */
ag_tensor *margin_inputs(fixture *f, int tokens, const float *levels, const float *scales,
                         int n_scales, uint64_t seed);
/* How far the top-p selection of every token is from changing (see
 * router_testutil.c); a gradcheck step must move the probabilities by less. */
double top_p_margin(const double *logits, int tokens, int experts, double threshold);
/* gc_check of the gates (aux false) or the aux loss w.r.t. x, W (and b),
 * asserting that the selection never changes across the perturbations. */
void run_gradcheck(const char *label, fixture *f, ag_tensor *x, bool aux);
/* The same with a given call (training: with the configured noise), and
 * the learned noise weight and the null experts' weight and bias among the
 * checked inputs when the router has them. */
void run_gradcheck_call(const char *label, fixture *f, ag_tensor *x, bool aux,
                        const router_call *call);

extern const float five_levels[5]; /* -1.4, -0.7, 0, 0.7, 1.4 */

#endif
