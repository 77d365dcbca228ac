/* cairn's decode step over all layers in one call: per layer the fused QKV product (RMSNorm inside), decode
 * attention, the output projection added into the residual stream, the fused gate/up product (RMSNorm inside) and
 * the down projection (SwiGLU inside) added into it. It calls the entry points of qgemm.c and attention.c that the
 * caller passes as function pointers (one per matrix: 4-bit or 8-bit tiles), so each kernel stays in its own
 * library; this file is only the loop that Python would otherwise run, some 150 calls a step, each paying the
 * interpreter and ctypes and letting the OpenMP workers fall asleep before the next (a batch-1 step of the default
 * model: 6.0 ms from Python, 4.2 ms here). Built and loaded by cairn.kernels; no Python C API. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "team.h"
#ifdef __AVX2__
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

/* qgemm.c's cairn_q4_gemm_team / cairn_q8_gemm_team / cairn_q4w_gemm_team */
typedef int (*gemm_fn)(const float *x, const void *w, const float *bias, float *y, int64_t M, int64_t N, int64_t K,
                       void *team, int id, int prologue, const float *g, float eps, int accumulate);
/* attention.c's cairn_decode_attention_team */
typedef int (*attention_fn)(const float *qkv, const float *cos, const float *sin, void *pool_k, void *pool_v,
                            const int64_t *slots, const int64_t *key_start, const int64_t *key_slots,
                            const int64_t *key_pos, const int64_t *q_pos, int64_t B, int64_t window, int64_t sinks,
                            int64_t H, int64_t HK, int64_t D, float *out, void *team, int id, int kv_half);

/* The layer loop, run by every thread `id` of a team (team.h): each kernel does the thread's share of its work and
 * meets the others at the team's barrier where its output is read next (a product's end, attention's phases). A
 * kernel that ran out of scratch memory says so on this thread; the loop still runs every phase (its barriers must be
 * met by all) and returns -1. */
static int layer_loop(struct cairn_team *team, int id, int64_t L, int64_t B, float *x, void *const *fns,
                      void *const *tiles, void *const *bias, const int64_t *n, const int64_t *k, void *const *norms,
                      const float *eps, void *attention, const float *cos, const float *sin, void *const *pool_k,
                      void *const *pool_v, const int64_t *slots, const int64_t *key_start, const int64_t *key_slots,
                      const int64_t *key_pos, const int64_t *q_pos, const int64_t *windows, int64_t sinks, int64_t H,
                      int64_t HK, int64_t D, float *qkv, float *attn, float *mid, int kv_half) {
    const attention_fn att = (attention_fn)attention;
    int rc = 0;
    for (int64_t l = 0; l < L; l++) {
        const int64_t i = 4 * l;
        rc |= ((gemm_fn)fns[i])(x, tiles[i], bias[i], qkv, B, n[i], k[i], team, id, 1, norms[2 * l], eps[2 * l], 0);
        rc |= att(qkv, cos, sin, pool_k[l], pool_v[l], slots, key_start, key_slots, key_pos, q_pos, B, windows[l],
                  sinks, H, HK, D, attn, team, id, kv_half);
        rc |= ((gemm_fn)fns[i + 1])(attn, tiles[i + 1], bias[i + 1], x, B, n[i + 1], k[i + 1], team, id, 0, NULL,
                                    0.f, 1);
        rc |= ((gemm_fn)fns[i + 2])(x, tiles[i + 2], bias[i + 2], mid, B, n[i + 2], k[i + 2], team, id, 1,
                                    norms[2 * l + 1], eps[2 * l + 1], 0);
        rc |= ((gemm_fn)fns[i + 3])(mid, tiles[i + 3], bias[i + 3], x, B, n[i + 3], k[i + 3], team, id, 2, NULL,
                                    0.f, 1);
    }
    return rc ? -1 : 0;
}

/* Opens the step's parallel region: `team` gets the region's size, and every thread its id, before any kernel runs */
#ifdef _OPENMP
#define TEAM_BEGIN(team)                                                                                              \
    const int id = omp_get_thread_num();                                                                              \
    if (id == 0) (team).n = omp_get_num_threads();                                                                    \
    _Pragma("omp barrier")
#else
#define TEAM_BEGIN(team)                                                                                              \
    const int id = 0;                                                                                                 \
    (team).n = 1;
#endif

/* x [B, d_model], the residual stream, updated in place through L layers. Matrix m of layer l (0 qkv, 1 o,
 * 2 gate_up, 3 down) is entry i = 4 l + m of fns (the kernels' _team entry points), tiles, bias (may be NULL), n
 * (outputs) and k (inputs); norms and eps hold layer l's two RMSNorm weights at 2 l (before attention) and 2 l + 1
 * (before the MLP); pool_k, pool_v and windows layer l's KV pool halves and window (0: none). qkv [B, n_qkv], attn
 * [B, H D] and mid [B, n_gate_up] are scratch. The loop runs in one parallel region of `threads` threads. Returns 0,
 * or -1 when a kernel could not allocate its scratch memory. */
int cairn_decode_layers(int64_t L, int64_t B, float *x, void *const *fns, void *const *tiles, void *const *bias,
                        const int64_t *n, const int64_t *k, void *const *norms, const float *eps, void *attention,
                        const float *cos, const float *sin, void *const *pool_k, void *const *pool_v,
                        const int64_t *slots, const int64_t *key_start, const int64_t *key_slots,
                        const int64_t *key_pos, const int64_t *q_pos, const int64_t *windows, int64_t sinks,
                        int64_t H, int64_t HK, int64_t D, float *qkv, float *attn, float *mid, int threads,
                        int kv_half) {
    struct cairn_team team = {0};
    int err = 0;
#pragma omp parallel num_threads(threads)
    {
        TEAM_BEGIN(team);
        if (layer_loop(&team, id, L, B, x, fns, tiles, bias, n, k, norms, eps, attention, cos, sin, pool_k, pool_v,
                       slots, key_start, key_slots, key_pos, q_pos, windows, sinks, H, HK, D, qkv, attn, mid,
                       kv_half)) {
#pragma omp atomic write
            err = 1;
        }
    }
    return err ? -1 : 0;
}

/* A whole batch-1 (or small-batch) decode step in one call: the tokens' embedding rows, their RoPE rows, the layer
 * loop above, and the output head with the final RMSNorm inside, into logits. What stays the same from step to step
 * (the layers' arrays, the head, the embedding, the RoPE tables) is in `struct cairn_step`, filled once by the
 * caller; a step passes only its tokens, positions and KV index. */
struct cairn_step {
    int64_t L, H, HK, D, d_model, n_qkv, n_gate_up, vocab, sinks;
    int kv_half;
    /* the embedding: 0 an fp32 table [vocab, d_model]; 1 the rows of a Q8 head's tiles (qgemm.c's pack_q8: a tied
     * embedding whose head runs the same Q8_0 blocks); -1 none (the caller fills x) */
    int embed_kind;
    const void *embed;
    void *const *fns;
    void *const *tiles;
    void *const *bias;
    const int64_t *n, *k;
    void *const *norms;
    const float *eps;
    void *attention;
    void *const *pool_k, *const *pool_v;
    const int64_t *windows;
    void *head_fn;
    const void *head_tiles;
    const float *head_bias;
    const float *final_g;
    float final_eps;
};

#define Q8_BYTES 272 /* qgemm.c's Q8 tile group: 16 x 16 bytes of codes, then d[8] as fp16 */

static float f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 31, man = h & 1023;
    uint32_t bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            int e = -1;
            uint32_t m = man;
            do { m <<= 1; e++; } while (!(m & 1024));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((m & 1023) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* row `tok` of a Q8 tiled matrix [vocab, K] as fp32: q * d, as the GGUF Q8_0 dequantization computes it */
static void q8_tile_row(const uint8_t *tiles, int64_t tok, int64_t K, float *out) {
    const int64_t G = K / 32, c = tok % 8;
    const uint8_t *t = tiles + (tok / 8) * G * Q8_BYTES;
    for (int64_t g = 0; g < G; g++, t += Q8_BYTES) {
        uint16_t h;
        memcpy(&h, t + 256 + 2 * c, 2);
        const float d = f16_to_f32(h);
        for (int j = 0; j < 32; j++) out[g * 32 + j] = (float)(int8_t)t[16 * (j / 2) + 2 * c + j % 2] * d;
    }
}

/* The first index of the largest of x[lo, hi) into *at, its value into *best; a NaN counts as larger than any
 * number (the first NaN wins), as torch.argmax has it. Returns 1 when the range has a NaN. */
static int argmax_part(const float *x, int64_t lo, int64_t hi, int64_t *at, float *best) {
    int64_t i = lo;
    float m = -INFINITY;
    int nan = 0;
#ifdef __AVX2__
    if (hi - lo >= 8) {  /* the largest value (and whether any is NaN) 8 at a time, then its first index */
        __m256 vm = _mm256_set1_ps(-INFINITY), vn = _mm256_setzero_ps();
        for (; i + 8 <= hi; i += 8) {
            const __m256 v = _mm256_loadu_ps(x + i);
            vn = _mm256_or_ps(vn, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
            vm = _mm256_max_ps(vm, v);
        }
        nan = _mm256_movemask_ps(vn) != 0;
        float lanes[8];
        _mm256_storeu_ps(lanes, vm);
        for (int j = 0; j < 8; j++) m = lanes[j] > m ? lanes[j] : m;
    }
#endif
    for (int64_t j = i; j < hi; j++) {
        if (x[j] != x[j]) nan = 1;
        else if (x[j] > m) m = x[j];
    }
    for (int64_t j = lo; j < hi; j++) {
        if (nan ? x[j] != x[j] : x[j] == m) {
            *at = j;
            *best = x[j];
            return nan;
        }
    }
    *at = lo;  /* (an empty range, or every value -inf: the first) */
    *best = -INFINITY;
    return 0;
}

/* Row b's argmax from the parts of `parts` threads (part p covers a range before part p + 1's): a NaN first, then
 * the largest value, the earlier part on a tie */
static int64_t argmax_merge(const float *best, const int64_t *at, const int *nan, int parts) {
    int k = 0;
    for (int p = 1; p < parts; p++) {
        if (nan[k]) break;
        if (nan[p] || best[p] > best[k]) k = p;
    }
    return at[k];
}

/* out[b] = argmax of row b of x [B, V], the row split into `parts` ranges as the step's team splits it (a test's
 * view of the step's greedy choice). Returns 0, or -1 when out of memory. */
int cairn_argmax_rows(const float *x, int64_t B, int64_t V, int parts, int64_t *out) {
    if (parts < 1) parts = 1;
    float *best = malloc((size_t)parts * sizeof(float));
    int64_t *at = malloc((size_t)parts * sizeof(int64_t));
    int *nan = malloc((size_t)parts * sizeof(int));
    if (!best || !at || !nan) {
        free(best), free(at), free(nan);
        return -1;
    }
    for (int64_t b = 0; b < B; b++) {
        for (int p = 0; p < parts; p++) {
            int64_t lo, hi;
            team_range(V, p, parts, &lo, &hi);
            nan[p] = argmax_part(x + b * V, lo, hi, &at[p], &best[p]);
        }
        out[b] = argmax_merge(best, at, nan, parts);
    }
    free(best), free(at), free(nan);
    return 0;
}

/* tokens, rope_rows, q_pos, slots: [B] each; key_start [B + 1], key_slots and key_pos: the CSR key index of
 * cairn_decode_layers. cos_table / sin_table [*, D]: row rope_rows[b] is token b's (sin with its first half
 * negated, as cairn_decode_attention takes it). x [B, d_model] (filled here unless embed_kind is -1), logits
 * [B, vocab]. argmax [B] (or NULL): each row's greedy token, found by the team beside the head (argmax_part over its
 * share of the row, merged by thread 0), so that a greedy step needs no second parallel region, which would wake
 * the threads that went to sleep after this one. Returns 0, or -1 when scratch memory ran out. */
int cairn_decode_step(const struct cairn_step *s, int64_t B, const int64_t *tokens, const float *cos_table,
                      const float *sin_table, const int64_t *rope_rows, const int64_t *slots, const int64_t *key_start,
                      const int64_t *key_slots, const int64_t *key_pos, const int64_t *q_pos, float *x, float *logits,
                      int64_t *argmax, int threads) {
    const int64_t D = s->D, dm = s->d_model;
    const int parts = threads > 0 ? threads : 1;
    const size_t floats = (size_t)B * (size_t)(2 * D + s->n_qkv + s->H * D + s->n_gate_up),
                 per_part = (size_t)B * (size_t)parts;
    /* the parts of each row's argmax after the floats: [B][parts] values, then (8-byte aligned) indices, NaN flags */
    const size_t at_offset = ((floats + per_part) * sizeof(float) + 7) & ~(size_t)7;
    char *base = malloc(at_offset + per_part * (sizeof(int64_t) + sizeof(int)));
    if (!base) return -1;
    float *scratch = (float *)base;
    float *cos = scratch, *sin = cos + B * D, *qkv = sin + B * D, *attn = qkv + B * s->n_qkv,
          *mid = attn + B * s->H * D;
    float *part_best = scratch + floats;
    int64_t *part_at = (int64_t *)(base + at_offset);
    int *part_nan = (int *)(part_at + per_part);
    for (int64_t b = 0; b < B; b++) {
        if (s->embed_kind == 0) memcpy(x + b * dm, (const float *)s->embed + tokens[b] * dm, (size_t)dm * 4);
        else if (s->embed_kind == 1) q8_tile_row(s->embed, tokens[b], dm, x + b * dm);
        memcpy(cos + b * D, cos_table + rope_rows[b] * D, (size_t)D * 4);
        memcpy(sin + b * D, sin_table + rope_rows[b] * D, (size_t)D * 4);
    }
    struct cairn_team team = {0};
    int err = 0;
#pragma omp parallel num_threads(threads)
    {
        TEAM_BEGIN(team);
        int rc = layer_loop(&team, id, s->L, B, x, s->fns, s->tiles, s->bias, s->n, s->k, s->norms, s->eps,
                            s->attention, cos, sin, s->pool_k, s->pool_v, slots, key_start, key_slots, key_pos, q_pos,
                            s->windows, s->sinks, s->H, s->HK, D, qkv, attn, mid, s->kv_half);
        rc |= ((gemm_fn)s->head_fn)(x, s->head_tiles, s->head_bias, logits, B, s->vocab, dm, &team, id, 1,
                                    s->final_g, s->final_eps, 0);
        if (argmax) {  /* (the head's product ended at a barrier: every logit is written) */
            for (int64_t b = 0; b < B; b++) {
                int64_t lo, hi;
                team_range(s->vocab, id, team.n, &lo, &hi);
                part_nan[b * parts + id] = argmax_part(logits + b * s->vocab, lo, hi, &part_at[b * parts + id],
                                                       &part_best[b * parts + id]);
            }
            team_barrier(&team);
            if (id == 0)
                for (int64_t b = 0; b < B; b++)
                    argmax[b] = argmax_merge(part_best + b * parts, part_at + b * parts, part_nan + b * parts, team.n);
        }
        if (rc) {
#pragma omp atomic write
            err = 1;
        }
    }
    free(base);
    return err ? -1 : 0;
}
