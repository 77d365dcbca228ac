/* cairn's decode attention: one new token for each of B sequences, on the engine's paged KV pool (fp32 or fp16).
 *
 * In one call: RoPE on the token's query and key heads (rotate-half pairing, sin with its first half negated:
 * x * cos + roll(x, D/2) * sin), the rotated key and the value written into the pool at `slot`, then for each
 * query head softmax(q . k / sqrt(D)) . v over the keys at `key_slots` (GQA: query head h reads key head
 * h / (H / HK)). A key at position p is visible when 0 <= p <= q_pos and, with a window W > 0, p > q_pos - W or
 * p < sinks (padding has p = -1). Each sequence reads only its own keys (no padding to the longest), listed in
 * CSR form. This replaces some twenty PyTorch calls per layer in decode steps; the tests check it against
 * PyTorch's scaled_dot_product_attention with the model's mask.
 *
 * (sequence, key head, chunk of its keys) tasks are split across OpenMP threads. At most 64 query heads per key
 * head. Built and loaded by cairn.kernels; no Python C API.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include "simd.h"
#include "team.h"

/* The pool holds fp32 or fp16 ("half") rows; row r of D values starts at element r * D. Keys and values are read
 * through these, converted to fp32 (F16C) as they load. */
static inline const void *kv_row(const void *base, int64_t r, int64_t D, int half) {
    return (const char *)base + (size_t)(r * D) * (half ? 2 : 4);
}

static inline float kv_at(const void *row, int64_t j, int half) {
    return half ? half_to_float(((const uint16_t *)row)[j]) : ((const float *)row)[j];
}

#ifdef __AVX2__
static inline __attribute__((always_inline)) __m256 kv_load8(const void *row, int64_t j, int half) {
    return half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + j)))
                : _mm256_loadu_ps((const float *)row + j);
}
#endif

/* q . key over D values */
static inline float dot(const float *a, const void *key, int64_t n, int half) {
    float s = 0.f;
    int64_t j = 0;
#ifdef __AVX2__
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (; j + 16 <= n; j += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), kv_load8(key, j, half), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8), kv_load8(key, j + 8, half), acc1);
    }
    for (; j + 8 <= n; j += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), kv_load8(key, j, half), acc0);
    s = hsum8(_mm256_add_ps(acc0, acc1));
#endif
    for (; j < n; j++) s += a[j] * kv_at(key, j, half);
    return s;
}

#ifdef __AVX2__
/* out[u] = q_u . key for the n <= 4 query rows q_u = q + u * D (D a multiple of 8): the key is loaded once, and
 * the four horizontal sums share one reduction */
static inline __attribute__((always_inline)) void dots4(const float *q, const void *key, int64_t D, int n, int half,
                                                        float *out) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t j = 0; j < D; j += 8) {
        const __m256 k = kv_load8(key, j, half);
        for (int u = 0; u < n; u++) acc[u] = _mm256_fmadd_ps(_mm256_loadu_ps(q + u * D + j), k, acc[u]);
    }
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
}
#endif

#ifdef __AVX2__
/* out[g] = the scores q_g . key_u of 4 keys (u = 0..3, one vector) for the G <= 3 query heads q_g = q + g * D
 * sharing them (D a multiple of 8): each key is loaded once for all heads, and a head's 4 sums come out of one
 * transposing reduction, in a vector, where scoring key by key took a reduction and a round trip through memory
 * for every key */
static inline __attribute__((always_inline)) void scores4(const float *q, const void *const keys[4], int64_t D,
                                                          int G, int half, __m128 *out) {
    __m256 a[3][4];
    for (int g = 0; g < G; g++)
        for (int u = 0; u < 4; u++) a[g][u] = _mm256_setzero_ps();
    for (int64_t j = 0; j < D; j += 8)
        for (int u = 0; u < 4; u++) {
            const __m256 k = kv_load8(keys[u], j, half);
            for (int g = 0; g < G; g++) a[g][u] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * D + j), k, a[g][u]);
        }
    for (int g = 0; g < G; g++) {
        const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a[g][0], a[g][1]), _mm256_hadd_ps(a[g][2], a[g][3]));
        out[g] = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
    }
}
#endif

/* o += w * v */
static inline void axpy(float *o, float w, const void *v, int64_t n, int half) {
    int64_t j = 0;
#ifdef __AVX2__
    const __m256 ww = _mm256_set1_ps(w);
    for (; j + 8 <= n; j += 8) _mm256_storeu_ps(o + j, _mm256_fmadd_ps(ww, kv_load8(v, j, half), _mm256_loadu_ps(o + j)));
#endif
    for (; j < n; j++) o[j] += w * kv_at(v, j, half);
}

/* the row of D values at src (fp32) into the pool's row dst, as fp32 or fp16 (rounded to nearest) */
static void kv_store(void *dst, const float *src, int64_t D, int half) {
    int64_t j = 0;
    if (!half) {
        for (; j < D; j++) ((float *)dst)[j] = src[j];
        return;
    }
#ifdef __AVX2__
    for (; j + 8 <= D; j += 8)
        _mm_storeu_si128((__m128i *)((uint16_t *)dst + j),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; j < D; j++) ((uint16_t *)dst)[j] = float_to_half(src[j]);
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

/* ask for the row at p (D values) ahead of its use: a sequence's keys sit in scattered pool slots, which the
 * hardware prefetcher does not foresee, and a batch's KV does not fit in the caches */
static inline void prefetch_row(const void *p, int64_t D, int half) {
    const int64_t bytes = D * (half ? 2 : 4);
    for (int64_t j = 0; j < bytes; j += 64) __builtin_prefetch((const char *)p + j);
}

/* the key and value rows of pool row r, asked for together */
static inline void prefetch_kv(const void *pool_k, const void *pool_v, int64_t r, int64_t D, int half) {
    prefetch_row(kv_row(pool_k, r, D, half), D, half);
    prefetch_row(kv_row(pool_v, r, D, half), D, half);
}

#define AHEAD 16 /* rows prefetched ahead (~100 ns of DRAM latency is several hundred cycles of work) */

/* o[0 .. D) = sum_i w[i] * row_i, row i being pool row ks[i] * HK + kh; with `fetch` (the first of the query heads
 * sharing these rows) the rows AHEAD further on are prefetched. The sums stay in registers, 64 floats at a time. */
static void weighted_rows(float *o, const float *w, const void *pool, const int64_t *ks, int64_t HK, int64_t kh,
                          int64_t S, int64_t D, int fetch, int half) {
    int64_t j0 = 0;
    if (fetch)
        for (int64_t i = 0; i < AHEAD && i < S; i++) prefetch_row(kv_row(pool, ks[i] * HK + kh, D, half), D, half);
#ifdef __AVX2__
    for (; j0 + 64 <= D; j0 += 64) {
        __m256 a[8];
        for (int u = 0; u < 8; u++) a[u] = _mm256_setzero_ps();
        for (int64_t i = 0; i < S; i++) {
            if (fetch && j0 == 0 && i + AHEAD < S) prefetch_row(kv_row(pool, ks[i + AHEAD] * HK + kh, D, half), D, half);
            if (w[i] == 0.f) continue;
            const void *v = kv_row(pool, ks[i] * HK + kh, D, half);
            const __m256 wv = _mm256_set1_ps(w[i]);
            for (int u = 0; u < 8; u++) a[u] = _mm256_fmadd_ps(wv, kv_load8(v, j0 + 8 * u, half), a[u]);
        }
        for (int u = 0; u < 8; u++) _mm256_storeu_ps(o + j0 + 8 * u, a[u]);
    }
    if (j0 < D) fetch = fetch && j0 == 0;
#endif
    for (int64_t j = j0; j < D; j++) o[j] = 0.f;
    if (j0 < D)
        for (int64_t i = 0; i < S; i++) {
            if (fetch && i + AHEAD < S) prefetch_row(kv_row(pool, ks[i + AHEAD] * HK + kh, D, half), D, half);
            if (w[i] != 0.f) {
                const char *v = kv_row(pool, ks[i] * HK + kh, D, half);
                axpy(o + j0, w[i], v + j0 * (half ? 2 : 4), D - j0, half);
            }
        }
}

/* whether a key at position p is seen from position qp (see the top of the file) */
static inline int visible(int64_t p, int64_t qp, int64_t window, int64_t sinks) {
    return p >= 0 && p <= qp && (window <= 0 || p > qp - window || p < sinks);
}

static void rope(const float *x, const float *cos, const float *sin, int64_t D, float *out) {
    const int64_t half = D / 2;
    for (int64_t j = 0; j < half; j++) out[j] = x[j] * cos[j] + x[j + half] * sin[j];
    for (int64_t j = half; j < D; j++) out[j] = x[j] * cos[j] + x[j - half] * sin[j];
}

/* What the tasks of a call share: the rotated queries, the scores, the chunks' softmax partials and where each
 * sequence's tasks begin. */
struct plan {
    float *q, *scores, *part;
    int64_t *first_task, tasks, chunk;
    int split;
};

static void free_plan(struct plan *pl) {
    if (!pl) return;
    free(pl->q), free(pl->scores), free(pl->part), free(pl->first_task), free(pl);
}

/* One thread's part before the tasks: the buffers, RoPE on the queries, the new keys (rotated) and values written
 * into the pool, and the tasks' layout. NULL when memory ran out. */
static struct plan *make_plan(const float *qkv, const float *cos, const float *sin, void *pool_k, void *pool_v,
                              const int64_t *slots, const int64_t *key_start, int64_t B, int64_t H, int64_t HK,
                              int64_t D, int threads, int half) {
    const int64_t group = H / HK, row = (H + 2 * HK) * D;
    struct plan *pl = calloc(1, sizeof *pl);
    if (!pl) return NULL;
    pl->q = malloc((size_t)(B * H * D + D) * sizeof(float));
    pl->scores = malloc((size_t)(key_start[B] * H + 1) * sizeof(float));
    pl->first_task = malloc((size_t)(B + 1) * sizeof(int64_t));
    if (!pl->q || !pl->scores || !pl->first_task) {
        free_plan(pl);
        return NULL;
    }
    float *q = pl->q, *krot = q + B * H * D;  /* one rotated key before it is stored */
    for (int64_t b = 0; b < B; b++) {
        const float *x = qkv + b * row, *c = cos + b * D, *s = sin + b * D;
        for (int64_t h = 0; h < H; h++) rope(x + h * D, c, s, D, q + (b * H + h) * D);
        for (int64_t h = 0; h < HK; h++) {
            rope(x + (H + h) * D, c, s, D, krot);
            kv_store((void *)kv_row(pool_k, slots[b] * HK + h, D, half), krot, D, half);
            kv_store((void *)kv_row(pool_v, slots[b] * HK + h, D, half), x + (H + HK + h) * D, D, half);
        }
    }
    /* Tasks: (sequence, key head, chunk of its keys). Each key and value is read once for the `group` query heads
     * sharing it (the KV of a batch does not fit in L2; reading it once per query head tripled the traffic). A
     * long sequence's keys are split into chunks so that one sequence (or a few) still keeps every thread busy;
     * a chunk leaves its softmax partials (max, sum of exps, unnormalized weighted values) and a second pass
     * merges them, as flash-decoding does. */
    const int64_t work = key_start[B] * HK, target = work / (8 * (threads > 0 ? threads : 1));
    const int64_t chunk = target > 256 ? target : 256;
    int64_t *first_task = pl->first_task;
    first_task[0] = 0;
    for (int64_t b = 0; b < B; b++) {
        const int64_t S = key_start[b + 1] - key_start[b];
        first_task[b + 1] = first_task[b] + HK * (S > 0 ? (S + chunk - 1) / chunk : 1);
    }
    pl->chunk = chunk;
    pl->tasks = first_task[B];
    pl->split = pl->tasks > B * HK;  /* some sequence has more than one chunk: their partials need merging */
    /* per task and query head: max, sum of exps, then D weighted values */
    pl->part = malloc((size_t)(pl->tasks * group * (D + 2)) * sizeof(float));
    if (!pl->part) {
        free_plan(pl);
        return NULL;
    }
    return pl;
}

/* task `task` (see make_plan) */
static void run_task(const struct plan *pl, int64_t task, void *pool_k, void *pool_v, const int64_t *key_start,
                     const int64_t *key_slots, const int64_t *key_pos, const int64_t *q_pos, int64_t window,
                     int64_t sinks, int64_t H, int64_t HK, int64_t D, float *out, int half) {
    const float scale = 1.f / sqrtf((float)D);
    const int64_t group = H / HK, chunk = pl->chunk;
    const int64_t *first_task = pl->first_task;
    const float *q = pl->q;
    float *scores = pl->scores, *part = pl->part;
    int64_t b = 0;
    while (first_task[b + 1] <= task) b++;  /* B is small: a scan beats a search */
    const int64_t n_chunks = (first_task[b + 1] - first_task[b]) / HK, t = task - first_task[b];
    const int64_t kh = t / n_chunks, c = t % n_chunks, h0 = kh * group;
    const int64_t k0 = key_start[b], S = key_start[b + 1] - k0, qp = q_pos[b];
    const int64_t i0 = c * chunk, i1 = i0 + chunk < S ? i0 + chunk : S, n = i1 - i0;
    const int64_t *ks = key_slots + k0 + i0, *kp = key_pos + k0 + i0;
    float *sc = scores + k0 * H + h0 * S + i0;  /* head g's scores at sc[g * S + i] */
    float *pt = part + task * group * (D + 2);
    float mx[64];
    for (int64_t g = 0; g < group; g++) mx[g] = -INFINITY;
    /* the scores; each key's value row is prefetched along with it, so that the weighted sums below find the
     * values in L2 */
    for (int64_t i = 0; i < AHEAD && i < n; i++) prefetch_kv(pool_k, pool_v, ks[i] * HK + kh, D, half);
    const float *qh = q + (b * H + h0) * D;
#ifdef __AVX2__
    if (D % 8 == 0 && group <= 3) {  /* (GQA's usual groups) keys 4 at a time, see scores4 */
        __m128 m4[3];
        for (int64_t g = 0; g < group; g++) m4[g] = _mm_set1_ps(-INFINITY);
        for (int64_t i = 0; i < n; i += 4) {
            for (int64_t r = i + AHEAD; r < i + AHEAD + 4 && r < n; r++)
                prefetch_kv(pool_k, pool_v, ks[r] * HK + kh, D, half);
            const int nb = n - i < 4 ? (int)(n - i) : 4;
            const void *keys[4];
            int32_t keep[4];
            for (int u = 0; u < 4; u++) {  /* past the last key: its row again, scored but dropped */
                const int64_t r = i + (u < nb ? u : nb - 1);
                keys[u] = kv_row(pool_k, ks[r] * HK + kh, D, half);
                keep[u] = u < nb && visible(kp[r], qp, window, sinks) ? -1 : 0;
            }
            __m128 v[3];
            switch (group) {  /* a constant head count for each: unrolled, in registers */
                case 1: scores4(qh, keys, D, 1, half, v); break;
                case 2: scores4(qh, keys, D, 2, half, v); break;
                default: scores4(qh, keys, D, 3, half, v);
            }
            const __m128 mask = _mm_castsi128_ps(_mm_loadu_si128((const __m128i *)keep));
            for (int64_t g = 0; g < group; g++) {
                const __m128 x = _mm_blendv_ps(_mm_set1_ps(-INFINITY), _mm_mul_ps(v[g], _mm_set1_ps(scale)), mask);
                m4[g] = _mm_max_ps(m4[g], x);
                float t[4];
                _mm_storeu_ps(t, x);
                for (int u = 0; u < nb; u++) sc[g * S + i + u] = t[u];
            }
        }
        for (int64_t g = 0; g < group; g++) {
            float t[4];
            _mm_storeu_ps(t, m4[g]);
            mx[g] = fmaxf(fmaxf(t[0], t[1]), fmaxf(t[2], t[3]));
        }
    } else
#endif
    for (int64_t i = 0; i < n; i++) {
        if (i + AHEAD < n) prefetch_kv(pool_k, pool_v, ks[i + AHEAD] * HK + kh, D, half);
        if (!visible(kp[i], qp, window, sinks)) {
            for (int64_t g = 0; g < group; g++) sc[g * S + i] = -INFINITY;
            continue;
        }
        const void *key = kv_row(pool_k, ks[i] * HK + kh, D, half);
        int64_t g = 0;
#ifdef __AVX2__
        for (; D % 8 == 0 && g < group; g += 4) {  /* up to 4 query heads at once */
            float v[4];
            const float *qg = qh + g * D;
            switch (group - g < 4 ? (int)(group - g) : 4) {  /* a constant n for each: unrolled, no spills */
                case 1: dots4(qg, key, D, 1, half, v); break;
                case 2: dots4(qg, key, D, 2, half, v); break;
                case 3: dots4(qg, key, D, 3, half, v); break;
                default: dots4(qg, key, D, 4, half, v);
            }
            for (int u = 0; u < 4 && g + u < group; u++) {
                sc[(g + u) * S + i] = v[u] * scale;
                mx[g + u] = v[u] * scale > mx[g + u] ? v[u] * scale : mx[g + u];
            }
        }
#endif
        for (; g < group; g++) {
            const float v = dot(qh + g * D, key, D, half) * scale;
            sc[g * S + i] = v;
            mx[g] = v > mx[g] ? v : mx[g];
        }
    }
    for (int64_t g = 0; g < group; g++) {
        const float total = mx[g] == -INFINITY ? 0.f : exp_shift(sc + g * S, n, mx[g]);
        if (n_chunks == 1) {  /* the whole sequence: the output itself, normalized (no merge) */
            float *o = out + (b * H + h0 + g) * D;
            weighted_rows(o, sc + g * S, pool_v, ks, HK, kh, n, D, g == 0, half);
            const float inv = total > 0.f ? 1.f / total : 0.f;
            for (int64_t j = 0; j < D; j++) o[j] *= inv;
            continue;
        }
        float *o = pt + g * (D + 2);
        o[0] = mx[g];
        o[1] = total;
        if (mx[g] == -INFINITY)
            for (int64_t j = 0; j < D; j++) o[2 + j] = 0.f;
        else
            weighted_rows(o + 2, sc + g * S, pool_v, ks, HK, kh, n, D, g == 0, half);
    }
}


/* merge (sequence, query head) bh's chunks: out = sum_c e^(m_c - M) o_c / sum_c e^(m_c - M) l_c */
static void run_merge(const struct plan *pl, int64_t bh, int64_t H, int64_t HK, int64_t D, float *out) {
    const int64_t group = H / HK, *first_task = pl->first_task;
    const float *part = pl->part;
    const int64_t b = bh / H, h = bh % H, kh = h / group, g = h % group;
    const int64_t n_chunks = (first_task[b + 1] - first_task[b]) / HK;
    if (n_chunks == 1) return;  /* written directly above */
    const float *p0 = part + ((first_task[b] + kh * n_chunks) * group + g) * (D + 2);
    const int64_t stride = group * (D + 2);  /* from one chunk's partials to the next's */
    float M = -INFINITY;
    for (int64_t c = 0; c < n_chunks; c++) M = p0[c * stride] > M ? p0[c * stride] : M;
    float *o = out + bh * D;
    for (int64_t j = 0; j < D; j++) o[j] = 0.f;
    float total = 0.f;
    if (M != -INFINITY)
        for (int64_t c = 0; c < n_chunks; c++) {
            const float *pc = p0 + c * stride;
            if (pc[0] == -INFINITY) continue;
            const float w = expf(pc[0] - M);
            total += w * pc[1];
            for (int64_t j = 0; j < D; j++) o[j] += w * pc[2 + j];
        }
    const float inv = total > 0.f ? 1.f / total : 0.f;
    for (int64_t j = 0; j < D; j++) o[j] *= inv;
}

/* B decode rows, each one new token of its own sequence. Row b: qkv[b] holds its q, k, v heads; cos/sin[b] its
 * RoPE tables; its key and value go to pool slot slots[b]; it attends over the keys key_slots[key_start[b] ..
 * key_start[b + 1]) at positions key_pos[...] from position q_pos[b]; out[b] gets its H * D attention output. The
 * pool is fp32, or fp16 with kv_half. Returns 0, or -1 if scratch memory ran out. */
int cairn_decode_attention(const float *qkv, const float *cos, const float *sin, void *pool_k, void *pool_v,
                           const int64_t *slots, const int64_t *key_start, const int64_t *key_slots,
                           const int64_t *key_pos, const int64_t *q_pos, int64_t B, int64_t window, int64_t sinks,
                           int64_t H, int64_t HK, int64_t D, float *out, int threads, int kv_half) {
    const int half = kv_half != 0;
    struct plan *pl = make_plan(qkv, cos, sin, pool_k, pool_v, slots, key_start, B, H, HK, D, threads, half);
    if (!pl) return -1;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(dynamic)
        for (int64_t task = 0; task < pl->tasks; task++)
            run_task(pl, task, pool_k, pool_v, key_start, key_slots, key_pos, q_pos, window, sinks, H, HK, D, out,
                     half);
        if (pl->split) {
#pragma omp for schedule(static)
            for (int64_t bh = 0; bh < B * H; bh++) run_merge(pl, bh, H, HK, D, out);
        }
    }
    free_plan(pl);
    return 0;
}

/* The same as thread `id` of a team (team.h) running a decode step: thread 0 prepares (make_plan) and hands the
 * plan over at a barrier, the threads take tasks from a shared counter, merge, and meet at a last barrier, after
 * which `out` may be read. Returns 0, or -1 on every thread if scratch memory ran out. */
int cairn_decode_attention_team(const float *qkv, const float *cos, const float *sin, void *pool_k, void *pool_v,
                                const int64_t *slots, const int64_t *key_start, const int64_t *key_slots,
                                const int64_t *key_pos, const int64_t *q_pos, int64_t B, int64_t window,
                                int64_t sinks, int64_t H, int64_t HK, int64_t D, float *out, void *team_, int id,
                                int kv_half) {
    struct cairn_team *team = team_;
    const int half = kv_half != 0;
    if (id == 0) {
        team->shared = make_plan(qkv, cos, sin, pool_k, pool_v, slots, key_start, B, H, HK, D, team->n, half);
        atomic_store_explicit(&team->next, 0, memory_order_relaxed);
    }
    team_barrier(team);
    struct plan *pl = team->shared;
    if (!pl) {
        team_barrier(team);  /* thread 0 may reuse `shared` only once every thread has read it */
        return -1;
    }
    const int64_t tasks = pl->tasks;
    const int split = pl->split;  /* read now: without a merge, thread 0 frees the plan right after the next barrier */
    for (int64_t task; (task = atomic_fetch_add_explicit(&team->next, 1, memory_order_relaxed)) < tasks;)
        run_task(pl, task, pool_k, pool_v, key_start, key_slots, key_pos, q_pos, window, sinks, H, HK, D, out, half);
    team_barrier(team);
    if (split) {
        int64_t lo, hi;
        team_range(B * H, id, team->n, &lo, &hi);
        for (int64_t bh = lo; bh < hi; bh++) run_merge(pl, bh, H, HK, D, out);
        team_barrier(team);
    }
    if (id == 0) free_plan(pl);  /* every thread is past its last read of the plan */
    return 0;
}
