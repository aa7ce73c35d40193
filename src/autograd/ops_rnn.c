/* Recurrent cells: the gate arithmetic of a GRU step (PyTorch's GRUCell
 * convention), fused into one op with its backward. The two matrix products
 * that feed it (input and hidden projections) are ordinary ag_linear calls,
 * so the op itself only sees the pre-activations. */
#include <math.h>

#include "autograd/op_write.h"

/* ---- gru_cell: gi [N,3H], gh [N,3H], h [N,H] -> [N,H] ---------------------- */

typedef struct gru_saved {
    float *gates; /* [N,3H]: r, z, n of each row, side by side */
} gru_saved;

static float sigmoid(float v) {
    return 1.0f / (1.0f + expf(-v));
}

/* One row: r = s(gi_r + gh_r), z = s(gi_z + gh_z), n = tanh(gi_n + r gh_n),
 * h' = (1 - z) n + z h; gates receives r, z, n. */
static void gru_row(const float *gi, const float *gh, const float *h, int hidden, float *gates,
                    float *out) {
    for (int j = 0; j < hidden; j++) {
        float r = sigmoid(gi[j] + gh[j]);
        float z = sigmoid(gi[hidden + j] + gh[hidden + j]);
        float n = tanhf(gi[2 * hidden + j] + r * gh[2 * hidden + j]);
        gates[j] = r;
        gates[hidden + j] = z;
        gates[2 * hidden + j] = n;
        out[j] = (1.0f - z) * n + z * h[j];
    }
}

/* With g = dh' and the saved r, z, n:
 *   dh += g z,  dn = g (1 - z),  dz = g (h - n),
 *   dpre_n = dn (1 - n^2):  dgi_n += dpre_n,  dgh_n += dpre_n r,  dr = dpre_n gh_n,
 *   dpre_r = dr r (1 - r),  dpre_z = dz z (1 - z): into gi and gh alike. */
static void gru_cell_backward(ag_ctx *ctx, ag_node *node) {
    (void)ctx;
    const gru_saved *saved = node->saved;
    ag_tensor *gi = node->in[0], *gh = node->in[1], *h = node->in[2];
    const int hidden = ag_last_dim(h);
    const int64_t rows = ag_rows(h);
    const float *dout = node->out->grad;
    for (int64_t row = 0; row < rows; row++) {
        const float *gates = saved->gates + row * 3 * hidden, *g = dout + row * hidden;
        const float *h_row = h->data + row * hidden, *gh_row = gh->data + row * 3 * hidden;
        float *dgi = ag_wants_grad(gi) ? gi->grad + row * 3 * hidden : NULL;
        float *dgh = ag_wants_grad(gh) ? gh->grad + row * 3 * hidden : NULL;
        float *dh = ag_wants_grad(h) ? h->grad + row * hidden : NULL;
        for (int j = 0; j < hidden; j++) {
            const float r = gates[j], z = gates[hidden + j], n = gates[2 * hidden + j];
            const float dpre_n = g[j] * (1.0f - z) * (1.0f - n * n);
            const float dpre_r = dpre_n * gh_row[2 * hidden + j] * r * (1.0f - r);
            const float dpre_z = g[j] * (h_row[j] - n) * z * (1.0f - z);
            if (dh) dh[j] += g[j] * z;
            if (dgi) {
                dgi[j] += dpre_r;
                dgi[hidden + j] += dpre_z;
                dgi[2 * hidden + j] += dpre_n;
            }
            if (dgh) {
                dgh[j] += dpre_r;
                dgh[hidden + j] += dpre_z;
                dgh[2 * hidden + j] += dpre_n * r;
            }
        }
    }
}

ag_tensor *ag_gru_cell(ag_ctx *ctx, ag_tensor *gi, ag_tensor *gh, ag_tensor *h) {
    AG_OP_BEGIN(ctx, gi, gh, h);
    const int hidden = ag_last_dim(h);
    const int64_t rows = ag_rows(h);
    AG_CHECK_SHAPES(ag_same_shape(gi, gh), "gru_cell", gi, gh);
    AG_CHECK_SHAPES(ag_last_dim(gi) == 3 * hidden && ag_rows(gi) == rows, "gru_cell", gi, h);
    ag_tensor *out = ag_empty(ctx, "gru_cell", h->ndim, h->shape);
    float *gates = ag_alloc_floats(ctx, rows * 3 * hidden, "gru_cell");
    if (!out || !gates) return NULL;
    for (int64_t row = 0; row < rows; row++)
        gru_row(gi->data + row * 3 * hidden, gh->data + row * 3 * hidden, h->data + row * hidden,
                hidden, gates + row * 3 * hidden, out->data + row * hidden);
    ag_node *node = ag_record(ctx, "gru_cell", gru_cell_backward, out, 3,
                              (ag_tensor *[]){gi, gh, h}, sizeof(gru_saved));
    if (ag_failed(ctx)) return NULL;
    if (node) ((gru_saved *)node->saved)->gates = gates;
    return out;
}
