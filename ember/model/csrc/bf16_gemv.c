/* y = x W^T (+ b) for a few rows of x, bf16 weights, on a CPU without oneDNN bf16 GEMMs.
 *
 * With few rows a GEMM is bound by reading the weights; PyTorch's bf16 fallback reads them
 * once per row, this reads them from memory once. The output is computed in tiles of
 * W_TILE weight rows by X_TILE rows of x: each step loads 8 bf16 weights of every tile row,
 * widens them in registers and multiplies them into X_TILE * W_TILE independent fp32
 * accumulators (enough to hide the FMA latency). The weight rows of a tile stay in L1/L2
 * while every group of x rows passes over them. Products of the bf16 values are summed in
 * fp32 and rounded to bf16 once, as a bf16 GEMM does. Built at run time by
 * ember/model/widened_gemm.py.
 */
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#define LANES 8
#define W_TILE 3 /* 3 x 4 tiles: 12 accumulators, the most AVX2's 16 registers hold */
#define X_TILE 4
typedef float vfloat __attribute__((vector_size(LANES * 4)));
typedef uint16_t vhalf __attribute__((vector_size(LANES * 2)));
typedef uint32_t vuint __attribute__((vector_size(LANES * 4)));

static inline vfloat load_vec(const float *p) {
    vfloat v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* LANES bf16 values as fp32 (bf16 is the top half of an fp32). */
EMBER_DEFINE_BF16_LOAD(widen_vec, vfloat, vhalf, vuint)

static inline float hsum(vfloat v) {
    float s = 0.f;
    for (int l = 0; l < LANES; ++l) s += v[l];
    return s;
}

/* sums[a][b] = x[a] . w[b] over k (a multiple of LANES), for XT rows of x and W_TILE weight
 * rows. A short weight tile repeats a row pointer, so the loop keeps its fixed shape and the
 * caller drops the repeated results. */
#define DEFINE_DOT_TILE(XT)                                                                 \
    static void dot_tile_##XT(const float *const x[], const uint16_t *const w[W_TILE],      \
                              int k, float sums[][W_TILE]) {                                \
        vfloat acc[XT][W_TILE] = {{{0}}};                                                   \
        for (int c = 0; c < k; c += LANES) {                                                \
            for (int b = 0; b < W_TILE; ++b) {                                              \
                const vfloat wv = widen_vec(w[b] + c);                                      \
                for (int a = 0; a < XT; ++a) acc[a][b] += load_vec(x[a] + c) * wv;          \
            }                                                                               \
        }                                                                                   \
        for (int a = 0; a < XT; ++a)                                                        \
            for (int b = 0; b < W_TILE; ++b) sums[a][b] = hsum(acc[a][b]);                  \
    }
DEFINE_DOT_TILE(1)
DEFINE_DOT_TILE(2)
DEFINE_DOT_TILE(4)

/* Output columns [j, j + nw) for every row, nw <= W_TILE: rows X_TILE at a time, then the
 * remainder in twos and ones, while the tile's weight rows stay in cache. */
static void weight_tile(const float *x, const uint16_t *w, const uint16_t *bias, uint16_t *out,
                        int rows, int n, int k, int j, int nw) {
    const uint16_t *wrow[W_TILE];
    float bv[W_TILE];
    for (int b = 0; b < W_TILE; ++b) {
        wrow[b] = w + (size_t)(j + (b < nw ? b : 0)) * k;
        bv[b] = bias && b < nw ? bf16_to_f32(bias[j + b]) : 0.f;
    }
    for (int r = 0; r < rows;) {
        const int left = rows - r;
        const int nx = left >= X_TILE ? X_TILE : left >= 2 ? 2 : 1;
        const float *xrow[X_TILE];
        for (int a = 0; a < nx; ++a) xrow[a] = x + (size_t)(r + a) * k;
        float sums[X_TILE][W_TILE];
        if (nx == 4) dot_tile_4(xrow, wrow, k, sums);
        else if (nx == 2) dot_tile_2(xrow, wrow, k, sums);
        else dot_tile_1(xrow, wrow, k, sums);
        for (int a = 0; a < nx; ++a)
            for (int b = 0; b < nw; ++b)
                out[(size_t)(r + a) * n + j + b] = f32_to_bf16(sums[a][b] + bv[b]);
        r += nx;
    }
}

/* x: [rows, k] fp32; w: [n, k] bf16; bias: [n] bf16 or NULL; out: [rows, n] bf16.
 * k must be a multiple of LANES. Returns -1 (writing nothing) if not. */
int bf16_gemv(const float *x, const uint16_t *w, const uint16_t *bias, uint16_t *out,
              int rows, int n, int k, int num_threads) {
    if (k % LANES != 0 || k <= 0) return -1;
    const int tiles = (n + W_TILE - 1) / W_TILE;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int t = 0; t < tiles; ++t) {
        const int j = t * W_TILE;
        weight_tile(x, w, bias, out, rows, n, k, j, n - j < W_TILE ? n - j : W_TILE);
    }
    return 0;
}
