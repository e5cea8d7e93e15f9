/* Decode-sized products on the CPU, fp32: routed SwiGLU experts, and a Linear over a few rows.
 *
 * Decode gives each active expert, and each of the router's Linears at a small batch, one to a few
 * rows, so each weight is read once from memory for very little arithmetic: the work is a stream over
 * the weights. The BLAS GEMMs torch calls are built for larger products and read cold weights at a
 * fraction of the bandwidth one core has (benchmarks/results/expert_compute-*.json: the `gemv` kernel against `loop` and `grouped_mm`).
 * Here every weight row is read once, in memory order, and multiplied into all of the rows while it
 * is in cache. The hardware prefetcher follows that order; prefetching rows ahead in software
 * measured slower.
 *
 * Weights are [in, out] in memory: gate_up [E][H][2I] (gate in the first I columns, up in the next I),
 * down [E][I][H]. Rows of x are grouped by expert, counts[e] rows for local expert e, in order.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* acc[r][n] = sum_k x[r][k] * w[k][n], for r < rows, n < out; x rows are `ldx` apart. */
static void rows_times(const float *restrict w, int64_t in, int64_t out, const float *restrict x,
                       int64_t ldx, int64_t rows, float *restrict acc) {
    memset(acc, 0, (size_t)(rows * out) * sizeof(float));
    for (int64_t k = 0; k < in; ++k) {
        const float *restrict row = w + k * out;
        for (int64_t r = 0; r < rows; ++r) {
            const float xv = x[r * ldx + k];
            float *restrict a = acc + r * out;
            for (int64_t n = 0; n < out; ++n) a[n] += xv * row[n];
        }
    }
}

/* y[rows][out] = x[rows][in] times w ([in][out] memory): a Linear's weight over a few rows. */
void linear_rows(const float *x, float *y, const float *w, int64_t rows, int64_t in, int64_t out) {
    rows_times(w, in, out, x, in, rows, y);
}

/* y[rows][H] = per row, down(silu(gate(x)) * up(x)) of its expert. Returns 0, or -1 if out of memory. */
int swiglu_experts(const float *x, float *y, const float *gate_up, const float *down,
                   const int64_t *counts, int64_t num_experts, int64_t hidden, int64_t inter) {
    int64_t most = 0;
    for (int64_t e = 0; e < num_experts; ++e) most = counts[e] > most ? counts[e] : most;
    float *h = malloc((size_t)(most * 2 * inter) * sizeof(float));
    float *act = malloc((size_t)(most * inter) * sizeof(float));
    if (most && (!h || !act)) {
        free(h);
        free(act);
        return -1;
    }
    int64_t start = 0;
    for (int64_t e = 0; e < num_experts; ++e) {
        const int64_t rows = counts[e];
        if (!rows) continue;
        rows_times(gate_up + e * hidden * 2 * inter, hidden, 2 * inter, x + start * hidden, hidden, rows, h);
        for (int64_t r = 0; r < rows; ++r) {
            const float *gate = h + r * 2 * inter, *up = gate + inter;
            for (int64_t j = 0; j < inter; ++j) act[r * inter + j] = gate[j] / (1.0f + expf(-gate[j])) * up[j];
        }
        rows_times(down + e * inter * hidden, inter, hidden, act, inter, rows, y + start * hidden);
        start += rows;
    }
    free(h);
    free(act);
    return 0;
}
