/* cairn's 4-bit matrix-vector kernel for x86 CPUs (AVX2 + FMA, with a portable C fallback).
 *
 * Weights are GGUF Q4_1-style groups of 32 along the input dimension: w = q * d + m, with q in 0..15 and one
 * (d, m) pair of floats per group. Each group's 32 codes are packed into 16 bytes: element j in the low nibble
 * of byte j, element j + 16 in its high nibble (the GGUF layout, so a file's blocks are used as they are).
 *
 * Activations are quantized on the fly to int8 with one scale per group of 32 (as llama.cpp does for its Q4
 * dot products), so a group's dot product is 32 integer multiply-adds: _mm256_maddubs_epi16 on unsigned codes
 * times signed activations. With xsum the sum of the rounded activations of a group:
 *
 *     y[m, n] = sum_g ( d[n, g] * xd[m, g] * sum_j q[n, g, j] * xq[m, g, j]  +  m[n, g] * xsum[m, g] ) + b[n]
 *
 * The activation rows may first go through a fused RMSNorm or SwiGLU, and the product may be added into y
 * (the residual stream) instead of stored: see prepare_rows and cairn_q4_matmul.
 *
 * Rows n are split across OpenMP threads (the same libgomp runtime PyTorch uses). Built on first use by
 * cairn.kernels, loaded with ctypes; no Python C API.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define QK 32

/* Each activation row is first turned into what the matmul multiplies, in one pass over it:
 *   prologue 0: the row as it is;
 *   prologue 1: RMSNorm, x * g / sqrt(mean(x^2) + eps)  (the norm before a projection, fused);
 *   prologue 2: SwiGLU, silu(x[:K]) * x[K:2K] from a row of 2K  (the MLP's gate and up halves, fused);
 * then quantized to int8 per group of 32 (xq, scale xd; xs = xd * the sum of the group's xq). */
static void prepare_rows(const float *x, int64_t M, int64_t K, int prologue, const float *g, float eps, float *tmp,
                         int8_t *xq, float *xd, float *xs) {
    const int64_t G = K / QK;
    for (int64_t r = 0; r < M; r++) {
        const float *v = x + r * (prologue == 2 ? 2 * K : K);
        if (prologue == 1) {
            double ss = 0.0;
            for (int64_t j = 0; j < K; j++) ss += (double)v[j] * v[j];
            const float inv = 1.f / sqrtf((float)(ss / (double)K) + eps);
            for (int64_t j = 0; j < K; j++) tmp[j] = v[j] * inv * g[j];
            v = tmp;
        } else if (prologue == 2) {
            for (int64_t j = 0; j < K; j++) tmp[j] = v[j] / (1.f + expf(-v[j])) * v[K + j];
            v = tmp;
        }
        for (int64_t b = 0; b < G; b++) {
            const float *u = v + b * QK;
            float amax = 0.f;
            for (int j = 0; j < QK; j++) {
                float a = fabsf(u[j]);
                amax = a > amax ? a : amax;
            }
            const float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
            int32_t qsum = 0;
            for (int j = 0; j < QK; j++) {
                const int8_t q = (int8_t)lrintf(u[j] * id);
                xq[(r * G + b) * QK + j] = q;
                qsum += q;
            }
            xd[r * G + b] = d;
            /* the min term uses the sum of the rounded values, not of x: then the result is exactly the dot product
             * of the weights with the rounded x, whose rounding errors meet zero-mean weights and mostly cancel
             * (with the exact sum they would meet the always-positive q*d and add up) */
            xs[r * G + b] = d * (float)qsum;
        }
    }
}

#ifdef __AVX2__
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256 group_dot(const uint8_t *qs, const int8_t *xq) {
    const __m128i lo4 = _mm_set1_epi8(0x0F);
    const __m128i b = _mm_loadu_si128((const __m128i *)qs);
    const __m256i w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), lo4), _mm_and_si128(b, lo4));
    const __m256i p16 = _mm256_maddubs_epi16(w, _mm256_loadu_si256((const __m256i *)xq));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}
#endif

static float row_dot(const uint8_t *qs, const float *d, const float *mn, const int8_t *xq, const float *xd,
                     const float *xs, int64_t G) {
    float macc = 0.f;
    for (int64_t g = 0; g < G; g++) macc += mn[g] * xs[g];
#ifdef __AVX2__
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 1 < G; g += 2) {
        acc0 = _mm256_fmadd_ps(group_dot(qs + g * 16, xq + g * QK), _mm256_set1_ps(d[g] * xd[g]), acc0);
        acc1 = _mm256_fmadd_ps(group_dot(qs + (g + 1) * 16, xq + (g + 1) * QK),
                               _mm256_set1_ps(d[g + 1] * xd[g + 1]), acc1);
    }
    for (; g < G; g++)
        acc0 = _mm256_fmadd_ps(group_dot(qs + g * 16, xq + g * QK), _mm256_set1_ps(d[g] * xd[g]), acc0);
    return hsum8(_mm256_add_ps(acc0, acc1)) + macc;
#else
    float acc = 0.f;
    for (int64_t g = 0; g < G; g++) {
        int32_t s = 0;
        for (int j = 0; j < 16; j++) {
            s += (qs[g * 16 + j] & 0x0F) * xq[g * QK + j];
            s += (qs[g * 16 + j] >> 4) * xq[g * QK + j + 16];
        }
        acc += d[g] * xd[g] * (float)s;
    }
    return acc + macc;
#endif
}

/* y[M, N] (=, or += when accumulate) prologue(x)[M, K] w[N, K]^T (+ bias). K must be a multiple of 32; x is
 * [M, 2K] for the SwiGLU prologue. Returns 0, or -1 if scratch memory ran out. */
int cairn_q4_matmul(const float *x, const uint8_t *qs, const float *d, const float *mn, const float *bias,
                    float *y, int64_t M, int64_t N, int64_t K, int threads, int prologue, const float *g, float eps,
                    int accumulate) {
    const int64_t G = K / QK;
    int8_t *xq = malloc((size_t)(M * K));
    float *xd = malloc((size_t)(M * G) * sizeof(float)), *xs = malloc((size_t)(M * G) * sizeof(float));
    float *tmp = prologue ? malloc((size_t)K * sizeof(float)) : NULL;
    if (!xq || !xd || !xs || (prologue && !tmp)) {
        free(xq), free(xd), free(xs), free(tmp);
        return -1;
    }
    prepare_rows(x, M, K, prologue, g, eps, tmp, xq, xd, xs);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *wq = qs + n * (K / 2);
        const float *dn = d + n * G, *mnn = mn + n * G;
        for (int64_t m = 0; m < M; m++) {
            float v = row_dot(wq, dn, mnn, xq + m * K, xd + m * G, xs + m * G, G);
            if (bias) v += bias[n];
            if (accumulate)
                y[m * N + n] += v;
            else
                y[m * N + n] = v;
        }
    }
    free(xq), free(xd), free(xs), free(tmp);
    return 0;
}
