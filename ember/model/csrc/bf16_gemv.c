/* y = x W^T (+ b) for a few rows of x, bf16 weights, on a CPU without oneDNN bf16 GEMMs.
 *
 * With few rows a GEMM is bound by reading the weights; PyTorch's bf16 fallback reads them
 * once per row, this reads them once. Each weight row is widened to fp32 once (into a
 * per-thread buffer in L1) and dotted with every row of x; products of the bf16 values are
 * summed in fp32 and rounded to bf16 once, as a bf16 GEMM does. Built at run time by
 * ember/model/bf16_gemv.py.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#define LANES 8
typedef float vfloat __attribute__((vector_size(LANES * 4)));
typedef uint16_t vhalf __attribute__((vector_size(LANES * 2)));
typedef uint32_t vuint __attribute__((vector_size(LANES * 4)));

static inline vfloat load_vec(const float *p) {
    vfloat v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* n bf16 values (n a multiple of LANES) widened into dst. */
static void widen(const uint16_t *src, int n, float *dst) {
    for (int c = 0; c < n; c += LANES) {
        vhalf h;
        memcpy(&h, src + c, sizeof h);
        const vuint bits = __builtin_convertvector(h, vuint) << 16;
        memcpy(dst + c, &bits, sizeof bits);
    }
}

static inline float dot(const float *x, const float *w, int k) {
    vfloat acc0 = {0}, acc1 = {0};
    int c = 0;
    for (; c + 2 * LANES <= k; c += 2 * LANES) {
        acc0 += load_vec(x + c) * load_vec(w + c);
        acc1 += load_vec(x + c + LANES) * load_vec(w + c + LANES);
    }
    for (; c < k; c += LANES) acc0 += load_vec(x + c) * load_vec(w + c);
    const vfloat acc = acc0 + acc1;
    float s = 0.f;
    for (int l = 0; l < LANES; ++l) s += acc[l];
    return s;
}

/* x: [rows, k] fp32; w: [n, k] bf16; bias: [n] bf16 or NULL; out: [rows, n] bf16.
 * k must be a multiple of LANES. Returns -1 (writing nothing) if not, or out of memory. */
int bf16_gemv(const float *x, const uint16_t *w, const uint16_t *bias, uint16_t *out,
              int rows, int n, int k, int num_threads) {
    if (k % LANES != 0 || k <= 0) return -1;
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        float *wf = aligned_alloc(64, ((size_t)k * sizeof(float) + 63) / 64 * 64);
        if (wf == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(static)
            for (int j = 0; j < n; ++j) {
                widen(w + (size_t)j * k, k, wf);
                const float b = bias ? bf16_to_f32(bias[j]) : 0.f;
                for (int r = 0; r < rows; ++r)
                    out[(size_t)r * n + j] = f32_to_bf16(dot(x + (size_t)r * k, wf, k) + b);
            }
        }
        free(wf);
    }
    return failed ? -1 : 0;
}
