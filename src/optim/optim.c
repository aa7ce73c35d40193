/* Optimizer dispatch, configuration checks and the weight-decay policy. */
#include <assert.h>
#include <ctype.h>
#include <math.h>
#include <string.h>

#include "optim/optim.h"

const char *const optim_kind_names[] = {"adamw", "sgd", NULL};
static_assert(sizeof optim_kind_names / sizeof optim_kind_names[0] == OPTIM_KIND_COUNT + 1,
              "optim_kind_names out of sync with optim_kind");

void optim_step(ag_params *params, const optim_config *config, double lr, optim_state *state) {
    switch (config->kind) {
    case OPTIM_ADAMW:
        optim_adamw_update(params, &config->adamw, lr, state, config->skip_unused_slices);
        break;
    case OPTIM_SGD:
        optim_sgd_update(params, &config->sgd, lr, state, config->skip_unused_slices);
        break;
    case OPTIM_KIND_COUNT: /* rejected by optim_config_check */
        break;
    }
}

static bool in_unit_interval(double x) { /* [0, 1) */
    return x >= 0.0 && x < 1.0;
}

cm_status optim_config_check(const optim_config *config) {
    switch (config->kind) {
    case OPTIM_ADAMW: {
        const optim_adamw_config *adamw = &config->adamw;
        if (!in_unit_interval(adamw->beta1))
            return CM_ERR(CM_ERR_INVALID, "adamw beta1 = %g is outside [0, 1)", adamw->beta1);
        if (!in_unit_interval(adamw->beta2))
            return CM_ERR(CM_ERR_INVALID, "adamw beta2 = %g is outside [0, 1)", adamw->beta2);
        if (!(adamw->eps > 0.0 && isfinite(adamw->eps)))
            return CM_ERR(CM_ERR_INVALID, "adamw eps = %g must be positive", adamw->eps);
        if (!(adamw->weight_decay >= 0.0 && isfinite(adamw->weight_decay)))
            return CM_ERR(CM_ERR_INVALID, "adamw weight_decay = %g must be >= 0",
                          adamw->weight_decay);
        return CM_OK;
    }
    case OPTIM_SGD: {
        const optim_sgd_config *sgd = &config->sgd;
        if (!in_unit_interval(sgd->momentum))
            return CM_ERR(CM_ERR_INVALID, "sgd momentum = %g is outside [0, 1)", sgd->momentum);
        if (!(sgd->weight_decay >= 0.0 && isfinite(sgd->weight_decay)))
            return CM_ERR(CM_ERR_INVALID, "sgd weight_decay = %g must be >= 0", sgd->weight_decay);
        if (sgd->nesterov && sgd->momentum <= 0.0)
            return CM_ERR(CM_ERR_INVALID, "sgd nesterov needs momentum > 0");
        return CM_OK;
    }
    case OPTIM_KIND_COUNT:
        break;
    }
    return CM_ERR(CM_ERR_INVALID, "unknown optimizer kind %d", (int)config->kind);
}

/* ---- weight-decay policy
 * ----------------------------------------------------- */

typedef enum param_class { CLASS_MATRIX, CLASS_NORM, CLASS_BIAS, CLASS_EMBEDDING } param_class;

static bool is_bias_name(const char *name) {
    const char *dot = strrchr(name, '.');
    const char *last = dot ? dot + 1 : name;
    if (strcmp(last, "bias") == 0) return true;
    if (last[0] != 'b') return false;
    for (const char *c = last + 1; *c; c++)
        if (!isdigit((unsigned char)*c)) return false;
    return true;
}

static param_class classify(const ag_param *param) {
    if (strstr(param->name, "emb") || strstr(param->name, "wte") || strstr(param->name, "wpe"))
        return CLASS_EMBEDDING;
    int rank = param->tensor.ndim - (param->group == AG_GROUP_EXPERT ? 1 : 0);
    if (rank <= 1) return is_bias_name(param->name) ? CLASS_BIAS : CLASS_NORM;
    return CLASS_MATRIX;
}

void optim_apply_decay_policy(ag_params *params, bool decay_norms, bool decay_biases,
                              bool decay_embeddings) {
    for (int i = 0; i < params->count; i++) {
        ag_param *param = params->items[i];
        bool decays = true;
        switch (classify(param)) {
        case CLASS_MATRIX:
            decays = true;
            break;
        case CLASS_NORM:
            decays = decay_norms;
            break;
        case CLASS_BIAS:
            decays = decay_biases;
            break;
        case CLASS_EMBEDDING:
            decays = decay_embeddings;
            break;
        }
        param->no_decay = !decays;
    }
}
