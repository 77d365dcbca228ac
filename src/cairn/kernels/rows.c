/* cairn's activation pass for FBGEMM's int8 GEMM (batched decode), replacing some ten PyTorch calls a matrix.
 *
 * FBGEMM quantizes its whole input with one scale, so cairn hands it rows scaled to max |x| = 1 (one scale per
 * row, undone on the output) with the calibrated outlier channels zeroed; those channels go to an fp32 matmul
 * instead (LLM.int8()-style). In one pass per row this computes:
 *   v    = x (prologue 0), RMSNorm(x) * g (prologue 1), or silu(x[:K]) * x[K:2K] from a row of 2K (prologue 2);
 *   xo   = v at the outlier channels out_idx[0 .. n_out);
 *   amax = max |v| over the other channels (at least 1e-30);
 *   xs   = v / amax, with the outlier channels set to 0.
 * Built and loaded by cairn.kernels; no Python C API.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

int cairn_rows_for_int8(const float *x, int64_t M, int64_t K, int prologue, const float *g, float eps,
                        const int64_t *out_idx, int64_t n_out, float *xs, float *xo, float *amax) {
    unsigned char *is_out = calloc((size_t)K, 1);
    if (!is_out) return -1;
    for (int64_t i = 0; i < n_out; i++) is_out[out_idx[i]] = 1;
    for (int64_t r = 0; r < M; r++) {
        const float *v = x + r * (prologue == 2 ? 2 * K : K);
        float *dst = xs + r * K;
        if (prologue == 1) {
            double ss = 0.0;
            for (int64_t j = 0; j < K; j++) ss += (double)v[j] * v[j];
            const float inv = 1.f / sqrtf((float)(ss / (double)K) + eps);
            for (int64_t j = 0; j < K; j++) dst[j] = v[j] * inv * g[j];
        } else if (prologue == 2) {
            for (int64_t j = 0; j < K; j++) dst[j] = v[j] / (1.f + expf(-v[j])) * v[K + j];
        } else {
            for (int64_t j = 0; j < K; j++) dst[j] = v[j];
        }
        for (int64_t i = 0; i < n_out; i++) xo[r * n_out + i] = dst[out_idx[i]];
        float m = 0.f;
        for (int64_t j = 0; j < K; j++) {
            const float a = is_out[j] ? 0.f : fabsf(dst[j]);
            m = a > m ? a : m;
        }
        m = m > 1e-30f ? m : 1e-30f;
        amax[r] = m;
        for (int64_t j = 0; j < K; j++) dst[j] = is_out[j] ? 0.f : dst[j] / m; /* a division, as torch's div_ */
    }
    free(is_out);
    return 0;
}
