/* cairn's decode attention for one sequence's one new token, on the engine's paged KV pool (fp32).
 *
 * In one call: RoPE on the token's query and key heads (rotate-half pairing, sin with its first half negated:
 * x * cos + roll(x, D/2) * sin), the rotated key and the value written into the pool at `slot`, then for each
 * query head softmax(q . k / sqrt(D)) . v over the keys at `key_slots` (GQA: query head h reads key head
 * h / (H / HK)). A key at position p is visible when 0 <= p <= q_pos and, with a window W > 0, p > q_pos - W or
 * p < sinks (padding has p = -1). This replaces some twenty PyTorch calls per layer in batch-1 decode; the
 * engine's runner checks it against PyTorch's scaled_dot_product_attention in the tests.
 *
 * Heads are split across OpenMP threads. Built and loaded by cairn.kernels; no Python C API.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

static inline float dot(const float *a, const float *b, int64_t n) {
    float acc[8] = {0};
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
        for (int l = 0; l < 8; l++) acc[l] += a[j + l] * b[j + l];
    float s = 0.f;
    for (; j < n; j++) s += a[j] * b[j];
    for (int l = 0; l < 8; l++) s += acc[l];
    return s;
}

static void rope(const float *x, const float *cos, const float *sin, int64_t D, float *out) {
    const int64_t half = D / 2;
    for (int64_t j = 0; j < D; j++) out[j] = x[j] * cos[j] + x[(j + half) % D] * sin[j];
}

/* Returns 0, or -1 if scratch memory ran out. */
int cairn_decode_attention(const float *qkv, const float *cos, const float *sin, float *pool_k, float *pool_v,
                           int64_t slot, const int64_t *key_slots, const int64_t *key_pos, int64_t S, int64_t q_pos,
                           int64_t window, int64_t sinks, int64_t H, int64_t HK, int64_t D, float *out,
                           int threads) {
    const float scale = 1.f / sqrtf((float)D);
    const int64_t group = H / HK;
    float *q = malloc((size_t)(H * D) * sizeof(float));
    float *scores = malloc((size_t)(H * S) * sizeof(float));
    if (!q || !scores) {
        free(q), free(scores);
        return -1;
    }
    for (int64_t h = 0; h < H; h++) rope(qkv + h * D, cos, sin, D, q + h * D);
    for (int64_t h = 0; h < HK; h++) {
        rope(qkv + (H + h) * D, cos, sin, D, pool_k + (slot * HK + h) * D);
        const float *v = qkv + (H + HK + h) * D;
        float *dst = pool_v + (slot * HK + h) * D;
        for (int64_t j = 0; j < D; j++) dst[j] = v[j];
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t h = 0; h < H; h++) {
        const int64_t kh = h / group;
        const float *qh = q + h * D;
        float *sc = scores + h * S;
        float mx = -INFINITY;
        for (int64_t s = 0; s < S; s++) {
            const int64_t p = key_pos[s];
            const int visible = p >= 0 && p <= q_pos && (window <= 0 || p > q_pos - window || p < sinks);
            sc[s] = visible ? dot(qh, pool_k + (key_slots[s] * HK + kh) * D, D) * scale : -INFINITY;
            mx = sc[s] > mx ? sc[s] : mx;
        }
        float *o = out + h * D;
        for (int64_t j = 0; j < D; j++) o[j] = 0.f;
        float total = 0.f;
        for (int64_t s = 0; s < S; s++) {
            if (sc[s] == -INFINITY) continue;
            const float w = expf(sc[s] - mx);
            total += w;
            const float *v = pool_v + (key_slots[s] * HK + kh) * D;
            for (int64_t j = 0; j < D; j++) o[j] += w * v[j];
        }
        const float inv = total > 0.f ? 1.f / total : 0.f;
        for (int64_t j = 0; j < D; j++) o[j] *= inv;
    }
    free(q), free(scores);
    return 0;
}
