/* bfloat16 <-> float32 for ember's C sources (found on the include path that ember.native
 * gives every library it builds). */
#ifndef EMBER_BF16_H
#define EMBER_BF16_H

#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t x) {
    const uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Nearest, ties to even; NaN stays a quiet NaN. Written without a branch so loops vectorise. */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    const uint32_t nearest = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const uint32_t quiet_nan = (u >> 16) | 0x40u;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : nearest);
}

#ifdef __AVX2__
#include <immintrin.h>

/* 8 bf16 values as fp32: one vpmovzxwd and a shift (GCC's generic vector widening of the same
 * takes two 128-bit halves and an insert). */
static inline __m256 bf16x8_to_f32(__m128i h) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* f32_to_bf16 on 8 lanes: each lane's bf16 bits in its low 16 bits. */
static inline __m256i f32x8_to_bf16_bits(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i nearest = _mm256_srli_epi32(
        _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd)), 16);
    const __m256i is_nan = _mm256_cmpgt_epi32(
        _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
    const __m256i quiet_nan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    return _mm256_blendv_epi8(nearest, quiet_nan, is_nan);
}
#endif

/* 8 bf16 values at p as fp32 into dst (bf16x8_to_f32); 0 without AVX2. */
static inline int widen_bf16x8(const uint16_t *p, void *dst) {
#ifdef __AVX2__
    const __m256 v = bf16x8_to_f32(_mm_loadu_si128((const __m128i *)p));
    memcpy(dst, &v, sizeof v);
    return 1;
#else
    (void)p, (void)dst;
    return 0;
#endif
}

/* Defines `static inline VFLOAT NAME(const uint16_t *p)`: a GCC vector of fp32 lanes widened
 * from as many bf16 values at p (VHALF and VUINT: the same lane count in 16 and 32 bits). */
#define EMBER_DEFINE_BF16_LOAD(NAME, VFLOAT, VHALF, VUINT)                                   \
    static inline VFLOAT NAME(const uint16_t *p) {                                         \
        VFLOAT v;                                                                          \
        if (sizeof v != 32 || !widen_bf16x8(p, &v)) {                                      \
            VHALF h;                                                                       \
            memcpy(&h, p, sizeof h);                                                       \
            const VUINT bits = __builtin_convertvector(h, VUINT) << 16;                     \
            memcpy(&v, &bits, sizeof v);                                                   \
        }                                                                                  \
        return v;                                                                          \
    }

#endif
