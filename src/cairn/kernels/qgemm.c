/* cairn's quantized matrix products for x86 CPUs (AVX2 + FMA + F16C, with a portable C fallback): 4-bit and 8-bit
 * weights in groups of 32 along the input dimension, times activations that are quantized on the fly with one
 * scale per group of 32:
 *
 *   Q4 (GGUF Q4_1's numbers): w = q * d + m, q in 0..15, one (d, m) pair of fp16 per group; activations to int8
 *                             (as llama.cpp does for its Q4 dot products), or to int16 (cairn_q4w_gemm: prompt
 *                             chunks, whose KV every later token reads; twice the multiply instructions, and from
 *                             WIDEN_ROWS rows each tile's codes are widened to int16 once per task);
 *   Q8 (GGUF Q8_0's numbers): w = q * d,     q in -127..127, one fp16 d per group; activations to int16. With int8
 *                             activations the output head flipped the default model's greedy answers (the final
 *                             norm's outputs span a wide range within a group); int16 makes their rounding
 *                             negligible, at about the same cost (16-bit multiply-adds need no sign tricks).
 *
 * With xq the quantized activations of a group, xd their scale and xs = xd * sum(xq):
 *
 *     y[r, n] = sum_g ( d[n, g] * xd[r, g] * sum_j q[n, g, j] * xq[r, g, j]  +  m[n, g] * xs[r, g] ) + b[n]
 *
 * The same code serves one activation row (batch-1 decode, memory-bound) and many (batched decode and prompts,
 * compute-bound), because the weights are stored for it: output columns come in tiles of 8, and a tile's weights
 * for one group of 32 inputs are interleaved so that one 32-byte vector holds 4 consecutive inputs of each of the
 * 8 columns. Broadcasting 4 activations of a row against it (_mm256_maddubs_epi16) gives partial sums already
 * laid out by column: no horizontal sums, one vector of 8 fp16 scales per group, and each unpacked weight vector
 * is reused for up to 6 activation rows held in registers (4 for Q8). A tile's group is stored as
 *
 *   Q4, 160 bytes: 4 x 32 bytes of codes (byte 4c + i of vector p: low nibble = q[c][4p + i], high nibble =
 *                  q[c][16 + 4p + i], for column c of the tile), then d[8] and m[8] as fp16;
 *   Q8, 272 bytes: 16 x 16 bytes of codes (byte 2c + i of chunk p = q[c][2p + i]), then d[8] as fp16; a chunk
 *                  widened to 16 bits meets 2 activations of a row broadcast (_mm256_madd_epi16).
 *
 * In 16-bit lanes a Q4 group cannot overflow: each lane adds 8 product pairs of at most 2 * 15 * 127 = 3810.
 *
 * The activation rows may first go through a fused RMSNorm or SwiGLU, and the product may be added into y (the
 * residual stream) instead of stored. Tiles (and, for many rows, chunks of rows) are split across OpenMP threads
 * from the libgomp runtime PyTorch uses. Built on first use by cairn.kernels, loaded with ctypes; no Python C
 * API.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "simd.h"
#include "team.h"
#ifdef _OPENMP
#include <omp.h>
#endif

#define QK 32       /* inputs per group */
#define NC 8        /* output columns per tile */
#define RB 6        /* activation rows per register block (Q4; Q8 takes them 4 at a time) */
#define WIDEN_ROWS 3 /* Q4 with int16 activations: from this many rows in a task, the tile's codes are widened once */
#define ROW_CHUNK 64 /* rows per task at most when there are many (their activations stay in L1/L2 across tiles) */
#define Q4_BLOCK 160
#define Q8_BLOCK 272
/* Each thread reads its tiles front to back, once per token in batch-1 decode; asking for the bytes PF_DIST ahead of
 * the group being multiplied kept the loads from waiting on memory (a decode step of the default model: ~15% faster
 * on a 2-core AMD EPYC than leaving it to the hardware prefetcher; 2048 and 4096 bytes ahead did alike, 512 less) */
#define PF_DIST 2048
#define PREFETCH_W(w, bytes)                                                                                          \
    do {                                                                                                              \
        for (int pf = 0; pf < (bytes); pf += 64) _mm_prefetch((const char *)(w) + PF_DIST + pf, _MM_HINT_T0);       \
    } while (0)


/* Each activation row is first turned into what the matmul multiplies, group by group:
 *   prologue 0: the row as it is;
 *   prologue 1: RMSNorm, x * g / sqrt(mean(x^2) + eps)  (the norm before a projection, fused);
 *   prologue 2: SwiGLU, silu(x[:K]) * x[K:2K] from a row of 2K  (the MLP's gate and up halves, fused);
 * then quantized per group of 32 to int8 (wide = 0: xq8, scale xd = max|v| / 127) or int16 (wide = 1: xq16,
 * xd = max|v| / 32767), with xs = xd * the sum of the group's codes. */
static void prepare_row(const float *v, int64_t K, int prologue, const float *g, float eps, int wide, int8_t *xq8,
                        int16_t *xq16, float *xd, float *xs) {
    float inv = 1.f;
    if (prologue == 1) {
        double ss = 0.0;
        for (int64_t j = 0; j < K; j++) ss += (double)v[j] * v[j];
        inv = 1.f / sqrtf((float)(ss / (double)K) + eps);
    }
    const float qmax = wide ? 32767.f : 127.f;
    for (int64_t b = 0; b < K / QK; b++) {
        const int64_t o = b * QK;
#ifdef __AVX2__
        __m256 vv[4];
        __m256 amax = _mm256_setzero_ps();
        const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
        for (int i = 0; i < 4; i++) {
            __m256 a = _mm256_loadu_ps(v + o + 8 * i);
            if (prologue == 1) {
                a = _mm256_mul_ps(_mm256_mul_ps(a, _mm256_set1_ps(inv)), _mm256_loadu_ps(g + o + 8 * i));
            } else if (prologue == 2) {
                const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), a));
                a = _mm256_mul_ps(_mm256_div_ps(a, _mm256_add_ps(_mm256_set1_ps(1.f), e)),
                                  _mm256_loadu_ps(v + K + o + 8 * i));
            }
            vv[i] = a;
            amax = _mm256_max_ps(amax, _mm256_and_ps(a, abs_mask));
        }
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        const float m = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
        const float d = m / qmax, id = d > 0.f ? 1.f / d : 0.f;
        __m256i q[4];
        for (int i = 0; i < 4; i++) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(vv[i], _mm256_set1_ps(id)));
        const __m256i s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        s4 = _mm_hadd_epi32(s4, s4);
        s4 = _mm_hadd_epi32(s4, s4);
        const int32_t qsum = _mm_cvtsi128_si32(s4);
        /* narrowing keeps the order: packs work within 128-bit lanes, the permutes undo the interleave */
        const __m256i p16a = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xD8);
        const __m256i p16b = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2], q[3]), 0xD8);
        if (wide) {
            _mm256_storeu_si256((__m256i *)(xq16 + o), p16a);
            _mm256_storeu_si256((__m256i *)(xq16 + o + 16), p16b);
        } else {
            _mm256_storeu_si256((__m256i *)(xq8 + o),
                                _mm256_permute4x64_epi64(_mm256_packs_epi16(p16a, p16b), 0xD8));
        }
#else
        float u[QK], m = 0.f;
        for (int j = 0; j < QK; j++) {
            float a = v[o + j];
            if (prologue == 1) a = a * inv * g[o + j];
            else if (prologue == 2) a = a / (1.f + expf(-a)) * v[K + o + j];
            u[j] = a;
            m = fabsf(a) > m ? fabsf(a) : m;
        }
        const float d = m / qmax, id = d > 0.f ? 1.f / d : 0.f;
        int32_t qsum = 0;
        for (int j = 0; j < QK; j++) {
            const int32_t qq = (int32_t)lrintf(u[j] * id);
            if (wide) xq16[o + j] = (int16_t)qq;
            else xq8[o + j] = (int8_t)qq;
            qsum += qq;
        }
#endif
        xd[b] = d;
        /* the min term uses the sum of the rounded values, not of v: then the result is exactly the dot product of
         * the weights with the rounded v, whose rounding errors meet zero-mean weights and mostly cancel (with the
         * exact sum they would meet the always-positive q*d and add up) */
        xs[b] = d * (float)qsum;
    }
}

/* out[r] (8 columns) for rows r < R of one tile, over all G groups */
#ifdef __AVX2__
/* the codes of vector p of a Q4 group, as bytes: lo = inputs 4p..4p+3 of each column, hi = inputs 16+4p.. */
static inline __attribute__((always_inline)) void q4_codes(const uint8_t *w, int p, __m256i *lo, __m256i *hi) {
    const __m256i packed = _mm256_loadu_si256((const __m256i *)(w + 32 * p)), lo4 = _mm256_set1_epi8(0x0F);
    *lo = _mm256_and_si256(packed, lo4);
    *hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), lo4);
}

/* acc + one Q4 group of a row: its 8 integer column sums s times d * xd, plus m * xs (d, m: the group's fp16 scales
 * and minima at w + 128 and w + 144) */
static inline __attribute__((always_inline)) __m256 q4_group(__m256 acc, __m256i s, const uint8_t *w, float xd,
                                                             float xs) {
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + 128)));
    const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + 144)));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(d, _mm256_set1_ps(xd)), acc);
    return _mm256_fmadd_ps(m, _mm256_set1_ps(xs), acc);
}

static inline __attribute__((always_inline)) void q4_tile(const uint8_t *w, int64_t G, const int8_t *xq,
                                                          const float *xd, const float *xs, int64_t K, int R,
                                                          __m256 *out) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[RB];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++, w += Q4_BLOCK) {
        PREFETCH_W(w, Q4_BLOCK);
        __m256i s16[RB];
        for (int r = 0; r < R; r++) s16[r] = _mm256_setzero_si256();
        for (int p = 0; p < 4; p++) {
            __m256i lo, hi;
            q4_codes(w, p, &lo, &hi);
            for (int r = 0; r < R; r++) {
                const int8_t *x = xq + r * K + g * QK;
                int32_t a, b;
                memcpy(&a, x + 4 * p, 4);
                memcpy(&b, x + 16 + 4 * p, 4);
                s16[r] = _mm256_add_epi16(s16[r], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(a)));
                KEEP(s16[r]);
                s16[r] = _mm256_add_epi16(s16[r], _mm256_maddubs_epi16(hi, _mm256_set1_epi32(b)));
                KEEP(s16[r]);
            }
        }
        for (int r = 0; r < R; r++)
            acc[r] = q4_group(acc[r], _mm256_madd_epi16(s16[r], ones), w, xd[r * G + g], xs[r * G + g]);
    }
    for (int r = 0; r < R; r++) out[r] = acc[r];
}

/* the codes of vector p of a Q4 group widened to int16: w[0], w[1] inputs 4p..4p+3 of columns 0-3 and 4-7, w[2],
 * w[3] inputs 16+4p.. of the same */
static inline __attribute__((always_inline)) void q4w_codes(const uint8_t *block, int p, __m256i *w) {
    __m256i lo, hi;
    q4_codes(block, p, &lo, &hi);
    w[0] = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(lo));
    w[1] = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(lo, 1));
    w[2] = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(hi));
    w[3] = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(hi, 1));
}

/* one group's vector p for rows r < R of int16 activations, against its widened codes w (q4w_codes); sa, sb gather
 * columns 0-3 and 4-7 (two partial sums per column), and the 4 activations of each half are broadcast as one 64-bit
 * pattern */
static inline __attribute__((always_inline)) void q4w_rows(const __m256i *w, const int16_t *xq, int64_t K, int64_t g,
                                                           int p, int R, __m256i *sa, __m256i *sb) {
    for (int r = 0; r < R; r++) {
        const int16_t *x = xq + r * K + g * QK;
        int64_t a, b;
        memcpy(&a, x + 4 * p, 8);
        memcpy(&b, x + 16 + 4 * p, 8);
        const __m256i xa = _mm256_set1_epi64x(a), xb = _mm256_set1_epi64x(b);
        sa[r] = _mm256_add_epi32(sa[r], _mm256_madd_epi16(w[0], xa));
        KEEP(sa[r]);
        sa[r] = _mm256_add_epi32(sa[r], _mm256_madd_epi16(w[2], xb));
        KEEP(sa[r]);
        sb[r] = _mm256_add_epi32(sb[r], _mm256_madd_epi16(w[1], xa));
        KEEP(sb[r]);
        sb[r] = _mm256_add_epi32(sb[r], _mm256_madd_epi16(w[3], xb));
        KEEP(sb[r]);
    }
}

/* Q4 weights against int16 activations (prompt chunks, where int8 activations cost accuracy): each unpacked byte
 * vector is widened to two vectors of int16 (columns 0-3 and 4-7, 4 inputs each) and meets 4 activations broadcast
 * as one 64-bit pattern (_mm256_madd_epi16 sums input pairs: two int32 per column, added at the group's end).
 * Twice the multiply instructions of the int8 path; at most 2 rows per call (16 live vectors). For more rows,
 * q4w_widen + q4ws_tile do the unpacking once. */
static inline __attribute__((always_inline)) void q4w_tile(const uint8_t *w, int64_t G, const int16_t *xq,
                                                           const float *xd, const float *xs, int64_t K, int R,
                                                           __m256 *out) {
    __m256 acc[2];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++, w += Q4_BLOCK) {
        __m256i sa[2], sb[2];  /* columns 0-3 and 4-7: per column, two partial sums (inputs 0,1 and 2,3 of 4) */
        for (int r = 0; r < R; r++) sa[r] = sb[r] = _mm256_setzero_si256();
        for (int p = 0; p < 4; p++) {
            __m256i wv[4];
            q4w_codes(w, p, wv);
            q4w_rows(wv, xq, K, g, p, R, sa, sb);
        }
        for (int r = 0; r < R; r++)  /* hadd within 128-bit lanes gives columns (0 1 4 5 | 2 3 6 7): permuted back */
            acc[r] = q4_group(acc[r], _mm256_permute4x64_epi64(_mm256_hadd_epi32(sa[r], sb[r]), 0xD8), w,
                              xd[r * G + g], xs[r * G + g]);
    }
    for (int r = 0; r < R; r++) out[r] = acc[r];
}

/* The tile's codes widened to int16 once, for a task of many rows (prompt chunks): per group and vector p, the four
 * vectors q4w_tile makes (inputs 4p.. and 16+4p.. of columns 0-3 and 4-7), 512 bytes a group. */
static void q4w_widen(const uint8_t *w, int64_t G, __m256i *ws) {
    for (int64_t g = 0; g < G; g++, w += Q4_BLOCK)
        for (int p = 0; p < 4; p++, ws += 4) q4w_codes(w, p, ws);
}

/* q4w_tile's products from the widened codes (ws, from q4w_widen; the scales still come from the tile w): no
 * unpacking in the loop, so up to RB rows share each loaded vector and the multiplies set the pace */
static inline __attribute__((always_inline)) void q4ws_tile(const __m256i *ws, const uint8_t *w, int64_t G,
                                                            const int16_t *xq, const float *xd, const float *xs,
                                                            int64_t K, int R, __m256 *out) {
    __m256 acc[RB];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++, w += Q4_BLOCK) {
        __m256i sa[RB], sb[RB];
        for (int r = 0; r < R; r++) sa[r] = sb[r] = _mm256_setzero_si256();
        for (int p = 0; p < 4; p++, ws += 4) q4w_rows(ws, xq, K, g, p, R, sa, sb);
        for (int r = 0; r < R; r++)
            acc[r] = q4_group(acc[r], _mm256_permute4x64_epi64(_mm256_hadd_epi32(sa[r], sb[r]), 0xD8), w,
                              xd[r * G + g], xs[r * G + g]);
    }
    for (int r = 0; r < R; r++) out[r] = acc[r];
}

static inline __attribute__((always_inline)) void q8_tile(const uint8_t *w, int64_t G, const int16_t *xq,
                                                          const float *xd, int64_t K, int R, __m256 *out) {
    __m256 acc[RB];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++, w += Q8_BLOCK) {
        PREFETCH_W(w, Q8_BLOCK);
        __m256i s32[RB];
        for (int r = 0; r < R; r++) s32[r] = _mm256_setzero_si256();
        for (int p = 0; p < 16; p++) {
            const __m256i q = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + 16 * p)));
            for (int r = 0; r < R; r++) {
                int32_t a;
                memcpy(&a, xq + r * K + g * QK + 2 * p, 4);
                s32[r] = _mm256_add_epi32(s32[r], _mm256_madd_epi16(q, _mm256_set1_epi32(a)));
                KEEP(s32[r]);
            }
        }
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + 256)));
        for (int r = 0; r < R; r++)
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32[r]), _mm256_mul_ps(d, _mm256_set1_ps(xd[r * G + g])),
                                     acc[r]);
    }
    for (int r = 0; r < R; r++) out[r] = acc[r];
}
#endif

#ifndef __AVX2__
/* the same products in plain C, one row at a time, for CPUs without AVX2 */
static void tile_scalar(int bits, const uint8_t *w, int64_t G, const int8_t *xq8, const int16_t *xq16,
                        const float *xd, const float *xs, int64_t K, int R, float out[RB][NC]) {
    for (int r = 0; r < R; r++) {
        for (int c = 0; c < NC; c++) out[r][c] = 0.f;
        const uint8_t *b = w;
        for (int64_t g = 0; g < G; g++, b += bits == 4 ? Q4_BLOCK : Q8_BLOCK) {
            const uint16_t *scales = (const uint16_t *)(b + (bits == 4 ? 128 : 256));
            for (int c = 0; c < NC; c++) {
                int64_t s = 0;
                for (int j = 0; j < QK; j++) {
                    if (bits == 4) {
                        const uint8_t byte = b[32 * ((j % 16) / 4) + 4 * c + j % 4];
                        const int32_t xv = xq8 ? xq8[r * K + g * QK + j] : xq16[r * K + g * QK + j];
                        s += (j < 16 ? byte & 0x0F : byte >> 4) * xv;
                    } else {
                        s += (int8_t)b[16 * (j / 2) + 2 * c + j % 2] * xq16[r * K + g * QK + j];
                    }
                }
                float v = half_to_float(scales[c]) * xd[r * G + g] * (float)s;
                if (bits == 4) v += half_to_float(scales[NC + c]) * xs[r * G + g];
                out[r][c] += v;
            }
        }
    }
}
#endif

static void write_tile(float *y, int64_t N, int64_t n0, const float *bias, int accumulate, const float *v) {
    const int64_t cols = N - n0 < NC ? N - n0 : NC;
    for (int64_t c = 0; c < cols; c++) {
        const float o = v[c] + (bias ? bias[n0 + c] : 0.f);
        y[n0 + c] = accumulate ? y[n0 + c] + o : o;
    }
}

static void gemm_rows(int bits, const uint8_t *w, const float *bias, float *y, int64_t r0, int R, int64_t N,
                      int64_t K, int64_t t, const int8_t *xq8, const int16_t *xq16, const float *xd, const float *xs,
                      int accumulate, const void *widened) {
    const int64_t G = K / QK, n0 = t * NC;
    const uint8_t *tile = w + t * G * (bits == 4 ? Q4_BLOCK : Q8_BLOCK);
    const int8_t *x8 = xq8 ? xq8 + r0 * K : NULL;
    const int16_t *x16 = xq16 ? xq16 + r0 * K : NULL;
    const float *d = xd + r0 * G, *s = xs + r0 * G;
#ifdef __AVX2__
    __m256 out[RB];
    if (bits == 4 && x16 && widened) {  /* int16 activations, the tile's codes already widened */
        const __m256i *ws = widened;
        switch (R) {
            case 1: q4ws_tile(ws, tile, G, x16, d, s, K, 1, out); break;
            case 2: q4ws_tile(ws, tile, G, x16, d, s, K, 2, out); break;
            case 3: q4ws_tile(ws, tile, G, x16, d, s, K, 3, out); break;
            case 4: q4ws_tile(ws, tile, G, x16, d, s, K, 4, out); break;
            case 5: q4ws_tile(ws, tile, G, x16, d, s, K, 5, out); break;
            default: q4ws_tile(ws, tile, G, x16, d, s, K, 6, out);
        }
    } else if (bits == 4 && x16) {  /* int16 activations: two rows at a time */
        for (int r = 0; r < R; r += 2)
            if (R - r >= 2) q4w_tile(tile, G, x16 + r * K, d + r * G, s + r * G, K, 2, out + r);
            else q4w_tile(tile, G, x16 + r * K, d + r * G, s + r * G, K, 1, out + r);
    } else if (bits == 4) {
        switch (R) {
            case 1: q4_tile(tile, G, x8, d, s, K, 1, out); break;
            case 2: q4_tile(tile, G, x8, d, s, K, 2, out); break;
            case 3: q4_tile(tile, G, x8, d, s, K, 3, out); break;
            case 4: q4_tile(tile, G, x8, d, s, K, 4, out); break;
            case 5: q4_tile(tile, G, x8, d, s, K, 5, out); break;
            default: q4_tile(tile, G, x8, d, s, K, 6, out);
        }
    } else {
        for (int r = 0; r < R; r += 4) {  /* 4 rows of int16 activations fill the registers */
            switch (R - r < 4 ? R - r : 4) {
                case 1: q8_tile(tile, G, x16 + r * K, d + r * G, K, 1, out + r); break;
                case 2: q8_tile(tile, G, x16 + r * K, d + r * G, K, 2, out + r); break;
                case 3: q8_tile(tile, G, x16 + r * K, d + r * G, K, 3, out + r); break;
                default: q8_tile(tile, G, x16 + r * K, d + r * G, K, 4, out + r);
            }
        }
    }
    for (int r = 0; r < R; r++) {
        float *row = y + (r0 + r) * N;
        if (n0 + NC <= N) {
            __m256 v = out[r];
            if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + n0));
            if (accumulate) v = _mm256_add_ps(v, _mm256_loadu_ps(row + n0));
            _mm256_storeu_ps(row + n0, v);
        } else {
            float tmp[NC];
            _mm256_storeu_ps(tmp, out[r]);
            write_tile(row, N, n0, bias, accumulate, tmp);
        }
    }
#else
    (void)widened;
    float out[RB][NC];
    tile_scalar(bits, tile, G, x8, x16, d, s, K, R, out);
    for (int r = 0; r < R; r++) write_tile(y + (r0 + r) * N, N, n0, bias, accumulate, out[r]);
#endif
}

/* Task `task` of a product: (chunk of up to ROW_CHUNK rows, tile), the chunks of even size (a short last chunk
 * would leave a thread idle); within a task, register blocks of RB rows. ws: the calling thread's G * 512 bytes for
 * widened codes, or NULL. */
static void gemm_task(int64_t task, int bits, const uint8_t *w, const float *bias, float *y, int64_t M, int64_t N,
                      int64_t K, const int8_t *xq8, const int16_t *xq16, const float *xd, const float *xs,
                      int accumulate, void *ws) {
    const int64_t G = K / QK, T = (N + NC - 1) / NC;
    const int64_t chunks = (M + ROW_CHUNK - 1) / ROW_CHUNK, chunk = (M + chunks - 1) / chunks;  /* even sizes */
    const int64_t c = task / T, t = task % T, end = (c + 1) * chunk < M ? (c + 1) * chunk : M;
#ifdef __AVX2__
    const int widen = ws && end - c * chunk >= WIDEN_ROWS;
    if (widen) q4w_widen(w + t * G * Q4_BLOCK, G, ws);
#else
    const int widen = 0;
#endif
    for (int64_t r0 = c * chunk; r0 < end; r0 += RB)
        gemm_rows(bits, w, bias, y, r0, end - r0 < RB ? (int)(end - r0) : RB, N, K, t, xq8, xq16, xd, xs, accumulate,
                  widen ? ws : NULL);
}

static int64_t gemm_task_count(int64_t M, int64_t N) {
    return (M + ROW_CHUNK - 1) / ROW_CHUNK * ((N + NC - 1) / NC);
}

/* y[M, N] (=, or += when accumulate) prologue(x)[M, K] w^T (+ bias), w packed in tiles as described at the top
 * (bits 4 or 8; N rounded up to a multiple of 8 in the packing, K a multiple of 32). x is [M, 2K] for the SwiGLU
 * prologue. Opens an OpenMP region of `threads`. Returns 0, or -1 if scratch memory ran out. */
static int qgemm(int bits, int wide, const float *x, const uint8_t *w, const float *bias, float *y, int64_t M,
                 int64_t N, int64_t K, int threads, int prologue, const float *g, float eps, int accumulate) {
    const int64_t G = K / QK;
    int8_t *xq8 = wide ? NULL : malloc((size_t)(M * K));
    int16_t *xq16 = wide ? malloc((size_t)(M * K) * sizeof(int16_t)) : NULL;
    float *xd = malloc((size_t)(M * G) * sizeof(float)), *xs = malloc((size_t)(M * G) * sizeof(float));
    if (!(xq8 || xq16) || !xd || !xs) {
        free(xq8), free(xq16), free(xd), free(xs);
        return -1;
    }
    const int64_t stride = prologue == 2 ? 2 * K : K, tasks = gemm_task_count(M, N);
    /* Q4 with int16 activations over many rows: each task widens its tile's codes once, into its thread's 512
     * bytes a group */
    const int widening = bits == 4 && wide && M >= WIDEN_ROWS;
    uint8_t *scratch = widening ? aligned_alloc(32, (size_t)(threads > 0 ? threads : 1) * (size_t)G * 512) : NULL;
    if (widening && !scratch) {
        free(xq8), free(xq16), free(xd), free(xs);
        return -1;
    }
#pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
        void *ws = scratch ? scratch + (size_t)omp_get_thread_num() * (size_t)G * 512 : NULL;
#else
        void *ws = scratch;
#endif
#pragma omp for schedule(static)
        for (int64_t r = 0; r < M; r++)
            prepare_row(x + r * stride, K, prologue, g, eps, wide, xq8 ? xq8 + r * K : NULL,
                        xq16 ? xq16 + r * K : NULL, xd + r * G, xs + r * G);
#pragma omp for schedule(static)
        for (int64_t task = 0; task < tasks; task++)
            gemm_task(task, bits, w, bias, y, M, N, K, xq8, xq16, xd, xs, accumulate, ws);
    }
    free(xq8), free(xq16), free(xd), free(xs), free(scratch);
    return 0;
}

/* The same product as one thread `id` of a team (team.h) running a decode step: every thread quantizes the (few)
 * activation rows itself, into scratch of its own, so the only synchronisation is the team barrier at the end, after
 * which y may be read. The scratch is the thread's, kept from call to call and grown when a call needs more. Returns
 * 0, or -1 if this thread's scratch memory ran out (it still meets the barrier; its share of y is not written). */
static _Thread_local struct { void *p; size_t n; } team_scratch;

static int qgemm_team(int bits, int wide, const float *x, const uint8_t *w, const float *bias, float *y, int64_t M,
                      int64_t N, int64_t K, struct cairn_team *team, int id, int prologue, const float *g, float eps,
                      int accumulate) {
    const int64_t G = K / QK;
    const int widening = bits == 4 && wide && M >= WIDEN_ROWS;
    const size_t codes = ((size_t)(M * K) * (wide ? 2 : 1) + 31) & ~(size_t)31;
    const size_t need = (widening ? (size_t)G * 512 : 0) + codes + 2 * (size_t)(M * G) * sizeof(float);
    if (team_scratch.n < need) {
        const size_t size = (need + 4095) & ~(size_t)4095;
        free(team_scratch.p);
        team_scratch.p = aligned_alloc(32, size);
        team_scratch.n = team_scratch.p ? size : 0;
    }
    uint8_t *base = team_scratch.p;
    if (base) {
        void *ws = widening ? base : NULL;
        uint8_t *at = base + (widening ? (size_t)G * 512 : 0);
        float *xd = (float *)(at + codes), *xs = xd + M * G;
        int8_t *xq8 = wide ? NULL : (int8_t *)at;
        int16_t *xq16 = wide ? (int16_t *)at : NULL;
        const int64_t stride = prologue == 2 ? 2 * K : K;
        for (int64_t r = 0; r < M; r++)
            prepare_row(x + r * stride, K, prologue, g, eps, wide, xq8 ? xq8 + r * K : NULL,
                        xq16 ? xq16 + r * K : NULL, xd + r * G, xs + r * G);
        int64_t lo, hi;
        team_range(gemm_task_count(M, N), id, team->n, &lo, &hi);
        for (int64_t task = lo; task < hi; task++)
            gemm_task(task, bits, w, bias, y, M, N, K, xq8, xq16, xd, xs, accumulate, ws);
    }
    team_barrier(team);
    return base ? 0 : -1;
}

int cairn_q4_gemm_team(const float *x, const uint8_t *w, const float *bias, float *y, int64_t M, int64_t N, int64_t K,
                       void *team, int id, int prologue, const float *g, float eps, int accumulate) {
    return qgemm_team(4, 0, x, w, bias, y, M, N, K, team, id, prologue, g, eps, accumulate);
}

int cairn_q8_gemm_team(const float *x, const uint8_t *w, const float *bias, float *y, int64_t M, int64_t N, int64_t K,
                       void *team, int id, int prologue, const float *g, float eps, int accumulate) {
    return qgemm_team(8, 1, x, w, bias, y, M, N, K, team, id, prologue, g, eps, accumulate);
}

int cairn_q4w_gemm_team(const float *x, const uint8_t *w, const float *bias, float *y, int64_t M, int64_t N,
                        int64_t K, void *team, int id, int prologue, const float *g, float eps, int accumulate) {
    return qgemm_team(4, 1, x, w, bias, y, M, N, K, team, id, prologue, g, eps, accumulate);
}

int cairn_q4_gemm(const float *x, const uint8_t *w, const float *bias, float *y, int64_t M, int64_t N, int64_t K,
                  int threads, int prologue, const float *g, float eps, int accumulate) {
    return qgemm(4, 0, x, w, bias, y, M, N, K, threads, prologue, g, eps, accumulate);
}

/* Q4 weights, int16 activations (see q4w_tile) */
int cairn_q4w_gemm(const float *x, const uint8_t *w, const float *bias, float *y, int64_t M, int64_t N, int64_t K,
                   int threads, int prologue, const float *g, float eps, int accumulate) {
    return qgemm(4, 1, x, w, bias, y, M, N, K, threads, prologue, g, eps, accumulate);
}

int cairn_q8_gemm(const float *x, const uint8_t *w, const float *bias, float *y, int64_t M, int64_t N, int64_t K,
                  int threads, int prologue, const float *g, float eps, int accumulate) {
    return qgemm(8, 1, x, w, bias, y, M, N, K, threads, prologue, g, eps, accumulate);
}
