/* cairn's decode step over all layers in one call: per layer the fused QKV product (RMSNorm inside), decode
 * attention, the output projection added into the residual stream, the fused gate/up product (RMSNorm inside) and
 * the down projection (SwiGLU inside) added into it. It calls the entry points of qgemm.c and attention.c that the
 * caller passes as function pointers (one per matrix: 4-bit or 8-bit tiles), so each kernel stays in its own
 * library; this file is only the loop that Python would otherwise run, some 150 calls a step, each paying the
 * interpreter and ctypes and letting the OpenMP workers fall asleep before the next (a batch-1 step of the default
 * model: 6.0 ms from Python, 4.2 ms here). Built and loaded by cairn.kernels; no Python C API. */
#include <stddef.h>
#include <stdint.h>

/* qgemm.c's cairn_q4_gemm / cairn_q8_gemm */
typedef int (*gemm_fn)(const float *x, const void *w, const float *bias, float *y, int64_t M, int64_t N, int64_t K,
                       int threads, int prologue, const float *g, float eps, int accumulate);
/* attention.c's cairn_decode_attention */
typedef int (*attention_fn)(const float *qkv, const float *cos, const float *sin, void *pool_k, void *pool_v,
                            const int64_t *slots, const int64_t *key_start, const int64_t *key_slots,
                            const int64_t *key_pos, const int64_t *q_pos, int64_t B, int64_t window, int64_t sinks,
                            int64_t H, int64_t HK, int64_t D, float *out, int threads, int kv_half);

/* x [B, d_model], the residual stream, updated in place through L layers. Matrix m of layer l (0 qkv, 1 o,
 * 2 gate_up, 3 down) is entry i = 4 l + m of fns, tiles, bias (may be NULL), n (outputs) and k (inputs); norms and
 * eps hold layer l's two RMSNorm weights at 2 l (before attention) and 2 l + 1 (before the MLP); pool_k, pool_v
 * and windows layer l's KV pool halves and window (0: none). qkv [B, n_qkv], attn [B, H D] and mid [B, n_gate_up]
 * are scratch. Returns 0, or -1 when a kernel could not allocate its scratch memory. */
int cairn_decode_layers(int64_t L, int64_t B, float *x, void *const *fns, void *const *tiles, void *const *bias,
                        const int64_t *n, const int64_t *k, void *const *norms, const float *eps, void *attention,
                        const float *cos, const float *sin, void *const *pool_k, void *const *pool_v,
                        const int64_t *slots, const int64_t *key_start, const int64_t *key_slots,
                        const int64_t *key_pos, const int64_t *q_pos, const int64_t *windows, int64_t sinks,
                        int64_t H, int64_t HK, int64_t D, float *qkv, float *attn, float *mid, int threads,
                        int kv_half) {
    const attention_fn att = (attention_fn)attention;
    for (int64_t l = 0; l < L; l++) {
        const int64_t i = 4 * l;
        gemm_fn f = (gemm_fn)fns[i];
        if (f(x, tiles[i], bias[i], qkv, B, n[i], k[i], threads, 1, norms[2 * l], eps[2 * l], 0)) return -1;
        if (att(qkv, cos, sin, pool_k[l], pool_v[l], slots, key_start, key_slots, key_pos, q_pos, B, windows[l],
                sinks, H, HK, D, attn, threads, kv_half))
            return -1;
        f = (gemm_fn)fns[i + 1];
        if (f(attn, tiles[i + 1], bias[i + 1], x, B, n[i + 1], k[i + 1], threads, 0, NULL, 0.f, 1)) return -1;
        f = (gemm_fn)fns[i + 2];
        if (f(x, tiles[i + 2], bias[i + 2], mid, B, n[i + 2], k[i + 2], threads, 1, norms[2 * l + 1], eps[2 * l + 1],
              0))
            return -1;
        f = (gemm_fn)fns[i + 3];
        if (f(mid, tiles[i + 3], bias[i + 3], x, B, n[i + 3], k[i + 3], threads, 2, NULL, 0.f, 1)) return -1;
    }
    return 0;
}
