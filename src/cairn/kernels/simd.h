/* Vector helpers shared by cairn's kernels (included by the .c files; cairn.kernels builds each with its headers). */
#ifndef CAIRN_SIMD_H
#define CAIRN_SIMD_H
#include <math.h>
#include <stdint.h>
#include <string.h>

/* IEEE half <-> float, one value (F16C's instructions do 8 at once where the kernels have AVX2) */
static inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 31, man = h & 1023;
    float f;
    if (exp == 0) {
        f = ldexpf((float)man, -24);  /* zero or subnormal */
    } else if (exp == 31) {
        f = man ? NAN : INFINITY;
    } else {
        f = ldexpf((float)(man | 1024), (int)exp - 25);
    }
    uint32_t bits;
    memcpy(&bits, &f, 4);
    bits |= sign;
    memcpy(&f, &bits, 4);
    return f;
}

/* rounded to nearest, ties to even; overflow gives inf, as _mm256_cvtps_ph does */
static inline uint16_t float_to_half(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    const uint32_t absx = x & 0x7fffffff;
    if (absx >= 0x7f800000) return sign | (absx > 0x7f800000 ? 0x7e00 : 0x7c00);  /* nan, inf */
    if (absx >= 0x477ff000) return sign | 0x7c00;  /* rounds past 65504 */
    if (absx < 0x38800000) {  /* below the smallest normal half: a subnormal, in units of 2^-24 */
        float a;
        memcpy(&a, &absx, 4);
        return sign | (uint16_t)lrintf(a * 16777216.f);
    }
    const uint32_t mant = absx & 0x7fffff, e = (absx >> 23) - 112;  /* rebias 127 -> 15 */
    uint32_t h = (e << 10) | (mant >> 13);
    const uint32_t rest = mant & 0x1fff;
    if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) h++;  /* carries into the exponent correctly */
    return sign | (uint16_t)h;
}
#ifdef __AVX2__
#include <immintrin.h>

/* Pins v to a register at this point of a chain of integer adds. Integer adds are associative, so the compiler may
 * rebuild a chain (acc += p1; acc += p2; ...) as a tree, which keeps every product alive at once: in the matmul
 * kernels that spilled dozens of vectors to the stack. An empty asm that "changes" v keeps the chain a chain. */
#define KEEP(v) __asm__("" : "+x"(v))

/* exp of 8 floats (the Cephes polynomial after range reduction; relative error ~1e-7); -inf gives 0, and inputs
 * are clamped to [-87.3, 88.4], so a large one gives ~2.4e38 rather than inf */
static inline __m256 exp8(__m256 x) {
    const __m256 masked = _mm256_cmp_ps(x, _mm256_set1_ps(-INFINITY), _CMP_EQ_OQ);
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-87.3365447504f));
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    const __m256 z = _mm256_mul_ps(x, x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_add_ps(_mm256_fmadd_ps(y, z, x), _mm256_set1_ps(1.f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(0x7f)), 23);
    return _mm256_andnot_ps(masked, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif
#endif
