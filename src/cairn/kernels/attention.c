/* cairn's decode attention: one new token for each of B sequences, on the engine's paged KV pool (fp32).
 *
 * In one call: RoPE on the token's query and key heads (rotate-half pairing, sin with its first half negated:
 * x * cos + roll(x, D/2) * sin), the rotated key and the value written into the pool at `slot`, then for each
 * query head softmax(q . k / sqrt(D)) . v over the keys at `key_slots` (GQA: query head h reads key head
 * h / (H / HK)). A key at position p is visible when 0 <= p <= q_pos and, with a window W > 0, p > q_pos - W or
 * p < sinks (padding has p = -1). Each sequence reads only its own keys (no padding to the longest), listed in
 * CSR form. This replaces some twenty PyTorch calls per layer in decode steps; the tests check it against
 * PyTorch's scaled_dot_product_attention with the model's mask.
 *
 * (sequence, key head) pairs are split across OpenMP threads. At most 64 query heads per key head. Built and loaded by cairn.kernels; no Python C API.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include "simd.h"

static inline float dot(const float *a, const float *b, int64_t n) {
    float s = 0.f;
    int64_t j = 0;
#ifdef __AVX2__
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (; j + 16 <= n; j += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8), _mm256_loadu_ps(b + j + 8), acc1);
    }
    for (; j + 8 <= n; j += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc0);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(_mm256_add_ps(acc0, acc1)),
                          _mm256_extractf128_ps(_mm256_add_ps(acc0, acc1), 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    s = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
#endif
    for (; j < n; j++) s += a[j] * b[j];
    return s;
}

/* o += w * v */
static inline void axpy(float *o, float w, const float *v, int64_t n) {
    int64_t j = 0;
#ifdef __AVX2__
    const __m256 ww = _mm256_set1_ps(w);
    for (; j + 8 <= n; j += 8) _mm256_storeu_ps(o + j, _mm256_fmadd_ps(ww, _mm256_loadu_ps(v + j), _mm256_loadu_ps(o + j)));
#endif
    for (; j < n; j++) o[j] += w * v[j];
}


/* x[i] = exp(x[i] - mx) in place (exp(-inf) = 0); returns their sum */
static float exp_shift(float *x, int64_t n, float mx) {
    float total = 0.f;
    int64_t i = 0;
#ifdef __AVX2__
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), _mm256_set1_ps(mx)));
        _mm256_storeu_ps(x + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, acc);
    for (int l = 0; l < 8; l++) total += lanes[l];
#endif
    for (; i < n; i++) {
        x[i] = x[i] == -INFINITY ? 0.f : expf(x[i] - mx);
        total += x[i];
    }
    return total;
}

/* ask for the D floats at p ahead of their use: a sequence's keys sit in scattered pool slots, which the hardware
 * prefetcher does not foresee, and a batch's KV does not fit in the caches */
static inline void prefetch_row(const float *p, int64_t D) {
    for (int64_t j = 0; j < D; j += 16) __builtin_prefetch(p + j);
}

#define AHEAD 6 /* keys prefetched ahead */

/* o[0 .. D) = sum_i w[i] * row_i, row i at base + ks[i] * stride; with `fetch` (the first of the query heads
 * sharing these rows) the rows AHEAD further on are prefetched. The sums stay in registers, 64 floats at a time. */
static void weighted_rows(float *o, const float *w, const float *base, const int64_t *ks, int64_t stride, int64_t S,
                          int64_t D, int fetch) {
    int64_t j0 = 0;
    if (fetch)
        for (int64_t i = 0; i < AHEAD && i < S; i++) prefetch_row(base + ks[i] * stride, D);
#ifdef __AVX2__
    for (; j0 + 64 <= D; j0 += 64) {
        __m256 a[8];
        for (int u = 0; u < 8; u++) a[u] = _mm256_setzero_ps();
        for (int64_t i = 0; i < S; i++) {
            if (fetch && j0 == 0 && i + AHEAD < S) prefetch_row(base + ks[i + AHEAD] * stride, D);
            if (w[i] == 0.f) continue;
            const float *v = base + ks[i] * stride + j0;
            const __m256 wv = _mm256_set1_ps(w[i]);
            for (int u = 0; u < 8; u++) a[u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(v + 8 * u), a[u]);
        }
        for (int u = 0; u < 8; u++) _mm256_storeu_ps(o + j0 + 8 * u, a[u]);
    }
    if (j0 < D) fetch = fetch && j0 == 0;
#endif
    for (int64_t j = j0; j < D; j++) o[j] = 0.f;
    if (j0 < D)
        for (int64_t i = 0; i < S; i++) {
            if (fetch && i + AHEAD < S) prefetch_row(base + ks[i + AHEAD] * stride, D);
            if (w[i] != 0.f) axpy(o + j0, w[i], base + ks[i] * stride + j0, D - j0);
        }
}

static void rope(const float *x, const float *cos, const float *sin, int64_t D, float *out) {
    const int64_t half = D / 2;
    for (int64_t j = 0; j < half; j++) out[j] = x[j] * cos[j] + x[j + half] * sin[j];
    for (int64_t j = half; j < D; j++) out[j] = x[j] * cos[j] + x[j - half] * sin[j];
}

/* B decode rows, each one new token of its own sequence. Row b: qkv[b] holds its q, k, v heads; cos/sin[b] its
 * RoPE tables; its key and value go to pool slot slots[b]; it attends over the keys key_slots[key_start[b] ..
 * key_start[b + 1]) at positions key_pos[...] from position q_pos[b]; out[b] gets its H * D attention output.
 * Returns 0, or -1 if scratch memory ran out. */
int cairn_decode_attention(const float *qkv, const float *cos, const float *sin, float *pool_k, float *pool_v,
                           const int64_t *slots, const int64_t *key_start, const int64_t *key_slots,
                           const int64_t *key_pos, const int64_t *q_pos, int64_t B, int64_t window, int64_t sinks,
                           int64_t H, int64_t HK, int64_t D, float *out, int threads) {
    const float scale = 1.f / sqrtf((float)D);
    const int64_t group = H / HK, row = (H + 2 * HK) * D;
    float *q = malloc((size_t)(B * H * D) * sizeof(float));
    float *scores = malloc((size_t)(key_start[B] * H + 1) * sizeof(float));
    if (!q || !scores) {
        free(q), free(scores);
        return -1;
    }
    for (int64_t b = 0; b < B; b++) {
        const float *x = qkv + b * row, *c = cos + b * D, *s = sin + b * D;
        for (int64_t h = 0; h < H; h++) rope(x + h * D, c, s, D, q + (b * H + h) * D);
        for (int64_t h = 0; h < HK; h++) {
            rope(x + (H + h) * D, c, s, D, pool_k + (slots[b] * HK + h) * D);
            const float *v = x + (H + HK + h) * D;
            float *dst = pool_v + (slots[b] * HK + h) * D;
            for (int64_t j = 0; j < D; j++) dst[j] = v[j];
        }
    }
    /* one task per (sequence, key head): each key and value is read once for the `group` query heads sharing it
     * (the KV of a batch does not fit in L2; reading it once per query head tripled the traffic) */
#pragma omp parallel for num_threads(threads) schedule(dynamic)
    for (int64_t bk = 0; bk < B * HK; bk++) {
        const int64_t b = bk / HK, kh = bk % HK, h0 = kh * group;
        const int64_t k0 = key_start[b], S = key_start[b + 1] - k0, qp = q_pos[b];
        const int64_t *ks = key_slots + k0, *kp = key_pos + k0;
        float *sc = scores + k0 * H + h0 * S;  /* rows h0 .. h0 + group - 1, S scores each */
        float mx[64];
        for (int64_t g = 0; g < group; g++) mx[g] = -INFINITY;
        for (int64_t i = 0; i < AHEAD && i < S; i++) prefetch_row(pool_k + (ks[i] * HK + kh) * D, D);
        for (int64_t i = 0; i < S; i++) {
            if (i + AHEAD < S) prefetch_row(pool_k + (ks[i + AHEAD] * HK + kh) * D, D);
            const int64_t p = kp[i];
            const int visible = p >= 0 && p <= qp && (window <= 0 || p > qp - window || p < sinks);
            const float *key = pool_k + (ks[i] * HK + kh) * D;
            for (int64_t g = 0; g < group; g++) {
                const float v = visible ? dot(q + (b * H + h0 + g) * D, key, D) * scale : -INFINITY;
                sc[g * S + i] = v;
                mx[g] = v > mx[g] ? v : mx[g];
            }
        }
        for (int64_t g = 0; g < group; g++) {
            float *o = out + (b * H + h0 + g) * D;
            const float total = mx[g] == -INFINITY ? 0.f : exp_shift(sc + g * S, S, mx[g]);
            weighted_rows(o, sc + g * S, pool_v + kh * D, ks, HK * D, S, D, g == 0);
            const float inv = total > 0.f ? 1.f / total : 0.f;
            for (int64_t j = 0; j < D; j++) o[j] *= inv;
        }
    }
    free(q), free(scores);
    return 0;
}
