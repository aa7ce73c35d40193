#include "train/routing_mi.h"

#include <math.h>

/* Token t's expert with the largest gate in layer i; -1 with no slot. */
static int top1(const lm_moe_report *report, int i, int t) {
    int best = -1;
    float best_gate = 0.0f;
    for (int s = report->offsets[i][t]; s < report->offsets[i][t + 1]; s++) {
        const int e = report->expert[i][s];
        const float gate = report->gates[i][s];
        if (best < 0 || gate > best_gate || (gate == best_gate && e < best)) {
            best = e;
            best_gate = gate;
        }
    }
    return best;
}

void routing_count_top1_pairs(const lm_moe_report *report, int experts, int64_t *counts) {
    for (int i = 0; i + 1 < report->n_layers; i++) {
        int64_t *joint = counts + (int64_t)i * experts * experts;
        const int tokens = (int)report->stats[i].tokens;
        for (int t = 0; t < tokens; t++) {
            const int a = top1(report, i, t), b = top1(report, i + 1, t);
            if (a >= 0 && b >= 0) joint[(int64_t)a * experts + b]++;
        }
    }
}

/* I(A;B) = sum_ab p(a,b) log2(p(a,b) / (p(a) p(b))) of one [E][E] table. */
static double mutual_information(const int64_t *joint, int experts, int64_t total) {
    double mi = 0.0;
    for (int a = 0; a < experts; a++) {
        int64_t row = 0;
        for (int b = 0; b < experts; b++) row += joint[a * experts + b];
        for (int b = 0; b < experts; b++) {
            const int64_t n = joint[a * experts + b];
            if (n == 0) continue;
            int64_t column = 0;
            for (int c = 0; c < experts; c++) column += joint[c * experts + b];
            mi += (double)n / (double)total *
                  log2((double)n * (double)total / ((double)row * (double)column));
        }
    }
    return mi;
}

double routing_top1_mutual_information(const int64_t *counts, int pairs, int experts) {
    double sum = 0.0;
    int used = 0;
    for (int i = 0; i < pairs; i++) {
        const int64_t *joint = counts + (int64_t)i * experts * experts;
        int64_t total = 0;
        for (int j = 0; j < experts * experts; j++) total += joint[j];
        if (total == 0) continue;
        sum += mutual_information(joint, experts, total);
        used++;
    }
    return used ? sum / used : NAN;
}
