/* Shared by the CNN tests (test_cnn.c, test_cnn_moe.c): seeded parameter
 * values, a double-precision reference of the dense ResNet and the MoE-CNN,
 * and the tiny dense configuration with its fixture. */
#ifndef CMOE_TESTS_CNN_REF_H
#define CMOE_TESTS_CNN_REF_H

#include "layers/cnn.h"
#include "layers/moe_conv.h"

/* Replaces the structured init (BN 1/0, tiny classifier) by seeded values of
 * the same kind, so no gradient is trivially zero or one. */
void randomize_params(ag_params *params, uint64_t seed);

/* Batch norm gains and shifts that keep every ReLU input ~1 away from its
 * kink, for the network gradient checks (see cnn_ref.c). */
void avoid_relu_kinks(ag_params *params);

/* The tensor of the named parameter (asserts it exists). */
ag_tensor *param(const ag_params *params, const char *name);

/* Logits [N,V] (malloc'd) of the dense ResNet in double. */
double *ref_cnn(const cnn_model *model, const ag_tensor *x, bool training);

/* The MoE-CNN with the given experts per router (as the model's routers
 * numbered them); router_logits[r] receives router r's logits [N,E]. */
double *ref_moe(const moe_cnn_model *model, const ag_tensor *x, bool training,
                int32_t *const *experts, double **router_logits);

/* stem 4, stage 0: one block of width 4 (identity shortcut), stage 1: one
 * block of width 6 (stride 2, projection); 3 input channels, 5 classes. */
cnn_config tiny_config(void);

typedef struct dense_fixture {
    ag_params params;
    cnn_model model;
} dense_fixture;

void dense_setup(dense_fixture *f, const cnn_config *config, uint64_t seed);

#endif
