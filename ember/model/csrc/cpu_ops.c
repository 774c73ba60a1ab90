/* Fused elementwise ops of the decoder on the CPU: residual add + RMSNorm and neox RoPE. Each
 * replaces several PyTorch ops (and their temporaries) with one pass over the rows, and rounds
 * to bf16 where PyTorch's ops round, so results are PyTorch's up to the order of the fp32 sum
 * of squares. Built at run time by ember/model/cpu_ops.py.
 *
 * `kind` 0 is float32, 1 bfloat16 (raw 16-bit words); contiguous rows unless a stride is given.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#define PARALLEL_MIN_ELEMENTS 32768 /* below this a step's op is faster on one thread */

/* x rounded to the storage dtype, kept as float. */
static inline float round_to(float x, int kind) {
    return kind ? bf16_to_f32(f32_to_bf16(x)) : x;
}

static inline float load(const void *p, size_t i, int kind) {
    return kind ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* Stores a value already rounded by round_to. */
static inline void store(void *p, size_t i, float x, int kind) {
    if (kind)
        ((uint16_t *)p)[i] = f32_to_bf16(x);
    else
        ((float *)p)[i] = x;
}

#define INLINE static inline __attribute__((always_inline))

/* One row: out = weight * round(rmsnorm(s)), s = x (+ residual, rounded and written back
 * into x). */
INLINE void rms_norm_row(void *x, const void *residual, const void *weight, void *out,
                         size_t base, int dim, float eps, int kind) {
    float sum_sq = 0.f;
    for (int d = 0; d < dim; ++d) {
        float v = load(x, base + d, kind);
        if (residual) {
            v = round_to(v + load(residual, base + d, kind), kind);
            store(x, base + d, v, kind);
        }
        sum_sq += v * v;
    }
    const float inv = 1.f / sqrtf(sum_sq / (float)dim + eps);
    for (int d = 0; d < dim; ++d) {
        const float normed = round_to(load(x, base + d, kind) * inv, kind);
        store(out, base + d, round_to(load(weight, d, kind) * normed, kind), kind);
    }
}

/* `kind` is chosen inside the loop body: OpenMP outlines the body before inlining, so a kind
 * fixed outside it would reach the rows as a variable and their loops would not vectorise. */
INLINE void rms_norm_impl(void *x, const void *residual, const void *weight, void *out, int rows,
                          int dim, float eps, int kind, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if ((size_t)rows * dim >= PARALLEL_MIN_ELEMENTS)
    for (int r = 0; r < rows; ++r) {
        const size_t base = (size_t)r * dim;
        if (kind && residual)
            rms_norm_row(x, residual, weight, out, base, dim, eps, 1);
        else if (kind)
            rms_norm_row(x, NULL, weight, out, base, dim, eps, 1);
        else if (residual)
            rms_norm_row(x, residual, weight, out, base, dim, eps, 0);
        else
            rms_norm_row(x, NULL, weight, out, base, dim, eps, 0);
    }
}

/* One head's rotation (out never overlaps x, cos or sin: ivdep lets the loop vectorise). */
INLINE void rope_row(const void *x, const void *cos, const void *sin, void *out,
                     int half, int kind) {
#pragma GCC ivdep
    for (int d = 0; d < half; ++d) {
        const float x1 = load(x, d, kind), x2 = load(x, half + d, kind);
        const float c1 = load(cos, d, kind), c2 = load(cos, half + d, kind);
        const float s1 = load(sin, d, kind), s2 = load(sin, half + d, kind);
        const float lo = round_to(x1 * c1, kind) + round_to(-x2 * s1, kind);
        const float hi = round_to(x2 * c2, kind) + round_to(x1 * s2, kind);
        store(out, d, round_to(lo, kind), kind);
        store(out, half + d, round_to(hi, kind), kind);
    }
}

/* out = x * cos + cat(-x2, x1) * sin per head (products rounded, then their sum); x's token and
 * head strides in elements, out contiguous [tokens, heads, 2 * half], cos/sin [tokens, 2 * half]. */
INLINE void apply_rope_impl(const void *x, const void *cos, const void *sin, void *out,
                            int tokens, int heads, int half, long stride_tok, long stride_head,
                            int kind, int num_threads) {
    const int dim = 2 * half;
    const size_t elem = kind ? 2 : 4;
#pragma omp parallel for num_threads(num_threads) if ((size_t)tokens * heads * dim >= PARALLEL_MIN_ELEMENTS)
    for (int t = 0; t < tokens; ++t) {
        const size_t angle = (size_t)t * dim;
        for (int h = 0; h < heads; ++h) {
            const size_t src = (size_t)t * stride_tok + (size_t)h * stride_head;
            const size_t dst = ((size_t)t * heads + h) * dim;
            const char *xs = (const char *)x + src * elem;
            const char *cs = (const char *)cos + angle * elem, *ss = (const char *)sin + angle * elem;
            char *os = (char *)out + dst * elem;
            if (kind)  /* constant in each copy (see rms_norm_impl) */
                rope_row(xs, cs, ss, os, half, 1);
            else
                rope_row(xs, cs, ss, os, half, 0);
        }
    }
}

void rms_norm(void *x, const void *residual, const void *weight, void *out, int rows, int dim,
              float eps, int kind, int num_threads) {
    rms_norm_impl(x, residual, weight, out, rows, dim, eps, kind, num_threads);
}

void apply_rope(const void *x, const void *cos, const void *sin, void *out, int tokens,
                int heads, int half, long stride_tok, long stride_head, int kind,
                int num_threads) {
    apply_rope_impl(x, cos, sin, out, tokens, heads, half, stride_tok, stride_head, kind,
                    num_threads);
}
