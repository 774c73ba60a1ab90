/* y = x W^T (+ b) with bf16 or fp16 weights packed into column panels, for AVX2 CPUs whose
 * oneDNN has no bf16/fp16 GEMM. Built at run time by ember/model/panel_gemm.py, which also
 * packs the weights.
 *
 * A panel is 16 output columns of W stored k-major, [k][16] 16-bit: the 16 weights that one
 * element of x meets are 32 contiguous bytes. The kernel keeps an MR x 16 block of fp32 sums
 * in registers; for each k it widens the panel's 16 weights (bf16: two unpacks against zero,
 * bf16 being the top half of an fp32; fp16: F16C's conversion), broadcasts MR elements of x
 * and issues 2 MR FMAs, so no horizontal sum and no per-row re-widening is needed (unlike
 * bf16_gemv.c). Within a bf16 panel the columns are stored in the order the 128-bit-lane
 * unpacks produce (0-3, 8-11, 4-7, 12-15), so the two widened vectors hold columns 0-7 and
 * 8-15; an fp16 panel is in column order.
 *
 * With few rows one panel gives too few independent sums to hide the FMA latency, so 1, 2 and
 * 3 rows take 4, 3 and 2 panels at once. Products of the 16-bit values are summed in fp32 and
 * rounded once to the weights' dtype, as a bf16/fp16 GEMM does; `out_f32` writes that rounded
 * value as fp32 (the logits' `.float()` without a second pass).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#define NR 16 /* columns per panel: two vectors of 8 fp32 */
/* k per pass: a longer k takes several passes, their partial sums round-tripping through memory
 * (each block then starts on a cache miss, ~20% at k = 1024 with two passes of 512). */
#define KC_MAX 4096
/* fp32 x of one row chunk, which stays in L2 while the thread's panels pass over it. */
#define X_CHUNK_BYTES (240 * 1024)

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

int panel_gemm_available(void) { return 1; }

/* The 16 weights at p as fp32: columns 0-7 and 8-15 of the panel. */
static inline void widen_panel_row(const uint16_t *p, int fp16, __m256 *lo, __m256 *hi) {
    if (fp16) {
        *lo = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
        *hi = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 8)));
        return;
    }
    const __m256i v = _mm256_loadu_si256((const __m256i *)p);
    const __m256i zero = _mm256_setzero_si256();
    *lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v));
    *hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v));
}

/* sums[r][16 p + j] = init[r][16 p + j] + x[r] . column j of panel p over kc, for MR rows of x
 * (packed k-major: x[c * MR + r]) and NP panels (panel stride in elements); `init` NULL counts
 * as zeros. */
/* UNROLLED: fully unrolled before GCC's scalar replacement of `acc`, which otherwise keeps a copy
 * of every accumulator on the stack and stores it after each FMA. */
#define UNROLLED _Pragma("GCC unroll 16")
#define DEFINE_KERNEL(MR, NP, FP16)                                                           \
    static void kernel_##MR##_##NP##_##FP16(const float *x, const uint16_t *w,                \
                                   size_t panel_stride, int kc, const float *init,            \
                                   size_t ld_init, float *sums, size_t ld_sums) {             \
        __m256 acc[MR][2 * NP];                                                               \
        UNROLLED for (int r = 0; r < MR; ++r)                                                 \
            UNROLLED for (int j = 0; j < 2 * NP; ++j)                                         \
                acc[r][j] = init ? _mm256_loadu_ps(init + r * ld_init + 8 * j)                \
                                 : _mm256_setzero_ps();                                       \
        for (int c = 0; c < kc; ++c) {                                                        \
            UNROLLED for (int p = 0; p < NP; ++p) {                                           \
                __m256 lo, hi;                                                                \
                widen_panel_row(w + p * panel_stride + (size_t)c * NR, FP16, &lo, &hi);       \
                UNROLLED for (int r = 0; r < MR; ++r) {                                       \
                    const __m256 xv = _mm256_broadcast_ss(x + (size_t)c * MR + r);            \
                    acc[r][2 * p] = _mm256_fmadd_ps(xv, lo, acc[r][2 * p]);                   \
                    acc[r][2 * p + 1] = _mm256_fmadd_ps(xv, hi, acc[r][2 * p + 1]);           \
                }                                                                             \
            }                                                                                 \
        }                                                                                     \
        UNROLLED for (int r = 0; r < MR; ++r)                                                 \
            UNROLLED for (int j = 0; j < 2 * NP; ++j)                                         \
                _mm256_storeu_ps(sums + r * ld_sums + 8 * j, acc[r][j]);                      \
    }
#define DEFINE_KERNELS(MR, NP) DEFINE_KERNEL(MR, NP, 0) DEFINE_KERNEL(MR, NP, 1)
DEFINE_KERNELS(1, 4)
DEFINE_KERNELS(2, 3)
DEFINE_KERNELS(3, 2)
DEFINE_KERNELS(1, 1)
DEFINE_KERNELS(2, 1)
DEFINE_KERNELS(3, 1)
DEFINE_KERNELS(4, 1)
DEFINE_KERNELS(5, 1)
DEFINE_KERNELS(6, 1)

typedef void (*kernel_fn)(const float *, const uint16_t *, size_t, int, const float *, size_t,
                          float *, size_t);

#define MAX_MR 6
#define MAX_NP 4

/* Rows per block and panels per group for a GEMM of `rows` rows. */
static void block_shape(int rows, int *mr, int *np) {
    *mr = rows < MAX_MR ? rows : MAX_MR;
    *np = rows == 1 ? 4 : rows == 2 ? 3 : rows == 3 ? 2 : 1;
}

static kernel_fn pick_kernel(int mr, int np, int fp16) {
    static const kernel_fn multi_panel[2][3] = {{kernel_3_2_0, kernel_2_3_0, kernel_1_4_0},
                                                {kernel_3_2_1, kernel_2_3_1, kernel_1_4_1}};
    static const kernel_fn one_panel[2][MAX_MR + 1] = {
        {NULL, kernel_1_1_0, kernel_2_1_0, kernel_3_1_0, kernel_4_1_0, kernel_5_1_0, kernel_6_1_0},
        {NULL, kernel_1_1_1, kernel_2_1_1, kernel_3_1_1, kernel_4_1_1, kernel_5_1_1, kernel_6_1_1}};
    return np > 1 ? multi_panel[fp16][np - 2] : one_panel[fp16][mr];
}

typedef struct {
    const float *x;          /* fp32, packed by row block: block r0 is [k][mr] at x + r0 k */
    const uint16_t *panels;  /* [num_panels, k, 16] bf16 or fp16 */
    const uint16_t *bias;    /* [n] in the weights' dtype, or NULL */
    void *out;               /* [rows, n] in the weights' dtype, or fp32 when out_f32 */
    float *partial;          /* [rows, num_panels * 16] fp32 sums between passes, k > KC_MAX only */
    int rows, n, k, fp16, out_f32;
} gemm_args;

static inline float to_f32(uint16_t h, int fp16) { return fp16 ? _cvtsh_ss(h) : bf16_to_f32(h); }

static inline uint16_t from_f32(float f, int fp16) {
    return fp16 ? _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT) : f32_to_bf16(f);
}

/* 8 16-bit values as fp32. */
static inline __m256 widen_8(__m128i h, int fp16) {
    return fp16 ? _mm256_cvtph_ps(h) : bf16x8_to_f32(h);
}

/* 8 fp32 values rounded to the weights' 16-bit dtype (nearest, ties to even). */
static inline __m128i narrow_8(__m256 v, int fp16) {
    if (fp16) return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
    const __m256i bits = f32x8_to_bf16_bits(v);
    return _mm256_castsi256_si128(
        _mm256_permute4x64_epi64(_mm256_packus_epi32(bits, bits), 0xD8));
}

/* 8 sums (+ bias) of one row, rounded to the weights' dtype, into out at element `at`. */
static inline void store_8(const gemm_args *g, __m256 sums, int col, size_t at) {
    if (g->bias)
        sums = _mm256_add_ps(sums, widen_8(_mm_loadu_si128((const __m128i *)(g->bias + col)),
                                           g->fp16));
    const __m128i y = narrow_8(sums, g->fp16);
    if (g->out_f32)
        _mm256_storeu_ps((float *)g->out + at, widen_8(y, g->fp16));
    else
        _mm_storeu_si128((__m128i *)((uint16_t *)g->out + at), y);
}

/* A finished block's sums + bias, rounded, into out (columns past n are padding). */
static void store_block(const gemm_args *g, const float *sums, size_t ldc, int r0, int mr,
                        int col0, int cols) {
    for (int r = 0; r < mr; ++r) {
        const size_t row = (size_t)(r0 + r) * g->n;
        int j = 0;
        for (; j + 8 <= cols && col0 + j + 8 <= g->n; j += 8)
            store_8(g, _mm256_loadu_ps(sums + r * ldc + j), col0 + j, row + col0 + j);
        for (; j < cols && col0 + j < g->n; ++j) {
            const int col = col0 + j;
            const float b = g->bias ? to_f32(g->bias[col], g->fp16) : 0.f;
            const uint16_t y = from_f32(sums[r * ldc + j] + b, g->fp16);
            if (g->out_f32)
                ((float *)g->out)[row + col] = to_f32(y, g->fp16);
            else
                ((uint16_t *)g->out)[row + col] = y;
        }
    }
}

/* Panels [p0, p0 + np) against rows [m0, m1) of x over k range [k0, k0 + kc): the sums of
 * earlier passes come from `partial`, and go back there unless this is the last pass. */
static void panel_group(const gemm_args *g, int p0, int np, int mr_max, int m0, int m1, int k0,
                        int kc) {
    const size_t panel_stride = (size_t)g->k * NR;
    const size_t ld_partial = (size_t)((g->n + NR - 1) / NR) * NR;
    const int last = k0 + kc == g->k;
    float block[MAX_MR * MAX_NP * NR];
    for (int r0 = m0; r0 < m1; r0 += mr_max) {
        const int mr = m1 - r0 < mr_max ? m1 - r0 : mr_max;
        float *partial = g->partial ? g->partial + (size_t)r0 * ld_partial + (size_t)p0 * NR : NULL;
        pick_kernel(mr, np, g->fp16)(g->x + (size_t)r0 * g->k + (size_t)k0 * mr,
                            g->panels + (size_t)p0 * panel_stride + (size_t)k0 * NR, panel_stride,
                            kc, k0 ? partial : NULL, ld_partial, last ? block : partial,
                            last ? (size_t)np * NR : ld_partial);
        if (last) store_block(g, block, (size_t)np * NR, r0, mr, p0 * NR, np * NR);
    }
}

/* k per pass (even passes of at most KC_MAX) and rows per chunk (a multiple of the block). */
static void chunk_shape(int k, int mr_max, int *kc, int *mc) {
    const int passes = (k + KC_MAX - 1) / KC_MAX;
    *kc = (k + passes - 1) / passes;
    const int rows = (int)(X_CHUNK_BYTES / ((size_t)*kc * sizeof(float))) / mr_max * mr_max;
    *mc = rows > mr_max ? rows : mr_max;
}

/* Rows [r0, r0 + mr) of x widened to fp32 as the kernels read them, [k][mr] at x32 + r0 k. */
static void pack_block(const uint16_t *x, int r0, int mr, int k, int fp16, float *x32) {
    float *dst = x32 + (size_t)r0 * k;
    for (int r = 0; r < mr; ++r) {
        const uint16_t *src = x + (size_t)(r0 + r) * k;
        for (int c = 0; c < k; ++c) dst[(size_t)c * mr + r] = to_f32(src[c], fp16);
    }
}

/* x: [rows, k] and bias: [n] (or NULL) in the weights' dtype, bf16 or fp16 (`fp16`). */
int panel_gemm(const uint16_t *x, const uint16_t *panels, const uint16_t *bias, void *out,
               int rows, int n, int k, int fp16, int out_f32, int num_threads) {
    if (rows <= 0 || n <= 0 || k <= 0) return -1;
    const int num_panels = (n + NR - 1) / NR;
    float *x32 = malloc((size_t)rows * k * sizeof(float));
    float *partial = k > KC_MAX ? malloc((size_t)rows * num_panels * NR * sizeof(float)) : NULL;
    if (!x32 || (k > KC_MAX && !partial)) {
        free(x32), free(partial);
        return -2;
    }
    gemm_args g = {x32, panels, bias, out, partial, rows, n, k, fp16, out_f32};
    int mr_max, np, kc_step, mc;
    block_shape(rows, &mr_max, &np);
    chunk_shape(k, mr_max, &kc_step, &mc);
    const int groups = (num_panels + np - 1) / np;
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for schedule(static)
        for (int r0 = 0; r0 < rows; r0 += mr_max)
            pack_block(x, r0, rows - r0 < mr_max ? rows - r0 : mr_max, k, fp16, x32);
        /* (the for's barrier: every row is widened before any thread reads it) */
        /* Static schedules of the same loop give each thread the same panels every time, so
         * the partial sums a thread reads back are its own: no barrier between passes. */
        for (int m0 = 0; m0 < rows; m0 += mc) {
            const int m1 = rows - m0 < mc ? rows : m0 + mc;
            for (int k0 = 0; k0 < k; k0 += kc_step) {
                const int kc = k - k0 < kc_step ? k - k0 : kc_step;
#pragma omp for schedule(static) nowait
                for (int gi = 0; gi < groups; ++gi) {
                    const int p0 = gi * np;
                    if (p0 + np <= num_panels) {
                        panel_group(&g, p0, np, mr_max, m0, m1, k0, kc);
                    } else { /* the last, short group: one panel at a time */
                        for (int p = p0; p < num_panels; ++p)
                            panel_group(&g, p, 1, mr_max, m0, m1, k0, kc);
                    }
                }
            }
        }
    }
    free(x32), free(partial);
    return 0;
}

#else
int panel_gemm_available(void) { return 0; }

int panel_gemm(const uint16_t *x, const uint16_t *panels, const uint16_t *bias, void *out,
               int rows, int n, int k, int fp16, int out_f32, int num_threads) {
    (void)x, (void)panels, (void)bias, (void)out, (void)rows, (void)n, (void)k, (void)fp16,
        (void)out_f32, (void)num_threads;
    return -1;
}
#endif
