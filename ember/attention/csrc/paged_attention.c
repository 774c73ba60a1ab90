/* Paged attention on the CPU over ember's head-major KV cache [kv_heads, blocks, block, dim].
 *
 * One call attends every token of a step (decode and chunked prefill alike): a task is one
 * (sequence, kv head) pair and serves all of that head's query heads, so each key/value row
 * is read once per query position. Scores and accumulation are fp32; a bf16 or fp8 cache is
 * widened on load (an fp8 cache holds K/V as stored, scale 1, e4m3fn or e5m2 bits).
 *
 * The context is walked in tiles of TILE positions (16 with AVX-512, else 8: one register)
 * whatever the block size. A decode task puts the tile's keys in the lanes: a tile's rows are
 * widened to fp32 once and shared by the query heads, its scores come out of one joint
 * reduction (no horizontal sum per row), and the softmax runs over a chunk of tiles at once
 * (one max and rescale per chunk, not per tile). A prefill task has rows enough to put TILE
 * query rows in the lanes instead (attend_rows), which needs no reduction at all.
 * Written with GCC vector extensions, so the same source builds for AVX-512, AVX2 or NEON.
 * Built at run time by ember/attention/cpu_kernel.py.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#ifdef __AVX512BF16__
#include <immintrin.h>
#endif

#define MAX_GROUP 64
#define MAX_ROWS 64         /* (query position, head) pairs attended together */
#define MAX_DIM 256
#define MAX_BLOCK_SHIFT 7
/* Positions per tile == lanes per vector: one register of fp32. 16-lane vectors on a CPU
 * without AVX-512 compile to register pairs with stack round trips, several times slower. */
#ifdef __AVX512F__
#define TILE 16
#else
#define TILE 8
#endif
#define DECODE_TILES (128 / TILE)  /* a decode chunk: tiles scored, then softmaxed together */
#define PREFETCH_ROWS 64      /* lead that covers DRAM latency on scattered block tables */
#define MASKED (-1e30f)       /* not -inf: the kernel is built with -ffast-math */

typedef float vfloat __attribute__((vector_size(TILE * 4)));
typedef int32_t vint __attribute__((vector_size(TILE * 4)));
typedef uint32_t vuint __attribute__((vector_size(TILE * 4)));
typedef uint16_t vhalf __attribute__((vector_size(TILE * 2)));
typedef uint8_t vbyte __attribute__((vector_size(TILE)));

/* What the KV cache holds; queries and outputs are fp32 or bf16 (`io_bf16`). */
enum { KIND_F32 = 0, KIND_BF16 = 1, KIND_E4M3 = 2, KIND_E5M2 = 3, NUM_KINDS = 4 };

static inline size_t kind_bytes(int kind) {
    return kind == KIND_F32 ? 4 : kind == KIND_BF16 ? 2 : 1;
}

int supports_head_dim(int d) {
    return d == 32 || d == 64 || d == 80 || d == 96 || d == 128 || d == 256;
}

int max_group(void) { return MAX_GROUP; }

static inline vfloat load_vec(const float *p) {
    vfloat v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store_vec(float *p, vfloat v) { memcpy(p, &v, sizeof v); }

EMBER_DEFINE_BF16_LOAD(load_bf16_vec, vfloat, vhalf, vuint)

static inline vfloat splat(float x) { return (vfloat){0} + x; }

/* fp8 caches need _Float16 (gcc >= 12 on x86, and arm64); without it supports_kinds() says no
 * and the PyTorch path serves them. */
#ifdef __FLT16_MAX__
#define HAS_FP8 1
typedef _Float16 vf16 __attribute__((vector_size(TILE * 2)));

/* TILE fp8 values widened exactly through fp16, which the CPU converts in one instruction:
 * e5m2 is fp16's top byte; e4m3fn's exponent and mantissa placed in fp16's fields give its
 * value divided by 2^8 (bias 15 for 7), subnormals included. The cache never holds NaN or
 * inf: writes clamp to the format's largest finite value. */
static inline vfloat load_fp8_vec(const uint8_t *p, int e4m3) {
    vbyte b;
    memcpy(&b, p, sizeof b);
    const vhalf u = __builtin_convertvector(b, vhalf);
    const vhalf bits = e4m3 ? (vhalf)(((u & 0x7F) << 7) | ((u & 0x80) << 8)) : (vhalf)(u << 8);
    vf16 h;
    memcpy(&h, &bits, sizeof h);
    const vfloat f = __builtin_convertvector(h, vfloat);
    return e4m3 ? f * 256.f : f;
}
#else
#define HAS_FP8 0
static inline vfloat load_fp8_vec(const uint8_t *p, int e4m3) {
    (void)p, (void)e4m3;
    return (vfloat){0};
}
#endif

/* Lane-wise `mask ? a : b` (C has no vector ternary). */
static inline vfloat blend(vint mask, vfloat a, vfloat b) {
    vint ai, bi;
    memcpy(&ai, &a, sizeof ai);
    memcpy(&bi, &b, sizeof bi);
    const vint r = (mask & ai) | (~mask & bi);
    vfloat out;
    memcpy(&out, &r, sizeof out);
    return out;
}

/* TILE vectors -> one vector whose lane j is the sum of vector j's lanes (log2(TILE) shuffle
 * levels, each halving the lanes every row keeps). */
#if TILE == 16
static inline vfloat sum_each(vfloat x[TILE]) {
    const vint lo8 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
    const vint hi8 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
    const vint lo4 = {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27};
    const vint hi4 = {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31};
    const vint lo2 = {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29};
    const vint hi2 = {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31};
    const vint lo1 = {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30};
    const vint hi1 = {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31};
    vfloat a[8], b[4], c[2];
    for (int i = 0; i < 8; ++i)  /* lanes 0-7: row i, 8-15: row i + 8 */
        a[i] = __builtin_shuffle(x[i], x[i + 8], lo8) + __builtin_shuffle(x[i], x[i + 8], hi8);
    for (int i = 0; i < 4; ++i)  /* quarters: rows i, i + 4, i + 8, i + 12 */
        b[i] = __builtin_shuffle(a[i], a[i + 4], lo4) + __builtin_shuffle(a[i], a[i + 4], hi4);
    for (int i = 0; i < 2; ++i)  /* pair k: row i + 2k */
        c[i] = __builtin_shuffle(b[i], b[i + 2], lo2) + __builtin_shuffle(b[i], b[i + 2], hi2);
    return __builtin_shuffle(c[0], c[1], lo1) + __builtin_shuffle(c[0], c[1], hi1);
}
#else
static inline vfloat sum_each(vfloat x[TILE]) {
    const vint lo4 = {0, 1, 2, 3, 8, 9, 10, 11};
    const vint hi4 = {4, 5, 6, 7, 12, 13, 14, 15};
    const vint lo2 = {0, 1, 8, 9, 4, 5, 12, 13};
    const vint hi2 = {2, 3, 10, 11, 6, 7, 14, 15};
    const vint lo1 = {0, 8, 2, 10, 4, 12, 6, 14};
    const vint hi1 = {1, 9, 3, 11, 5, 13, 7, 15};
    vfloat a[4], b[2];
    for (int i = 0; i < 4; ++i)  /* lanes 0-3: row i, 4-7: row i + 4 */
        a[i] = __builtin_shuffle(x[i], x[i + 4], lo4) + __builtin_shuffle(x[i], x[i + 4], hi4);
    for (int i = 0; i < 2; ++i)  /* pair k: row i + 2k */
        b[i] = __builtin_shuffle(a[i], a[i + 2], lo2) + __builtin_shuffle(a[i], a[i + 2], hi2);
    return __builtin_shuffle(b[0], b[1], lo1) + __builtin_shuffle(b[0], b[1], hi1);
}
#endif

static inline float max_of(vfloat v) {
    float m = v[0];
    for (int l = 1; l < TILE; ++l) m = v[l] > m ? v[l] : m;
    return m;
}

static inline float sum_of(vfloat v) {
    float s = 0.f;
    for (int l = 0; l < TILE; ++l) s += v[l];
    return s;
}

/* e^x for x <= 0 (scores minus their running max): Cephes' expf, range reduction by ln 2 and a
 * degree-7 polynomial (about 1 ulp), inline where a libmvec call per tile cost more than the
 * arithmetic. Below -87 it returns ~0 (masked lanes are -1e30). */
static inline vfloat exp_vec(vfloat x) {
    x = blend(x < -87.f, splat(-87.f), x);
    const vfloat y = x * 1.44269504088896341f;
    const vint n = __builtin_convertvector(y - 0.5f, vint); /* y <= 0: round half away */
    const vfloat nf = __builtin_convertvector(n, vfloat);
    const vfloat r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
    vfloat p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    const vint scale_bits = (n + 127) << 23;
    vfloat two_n;
    memcpy(&two_n, &scale_bits, sizeof two_n);
    return p * two_n;
}

/* The blocks one task reads: while a thread works on a task it pulls the next one's into L2,
 * so short decode tasks do not each start with a stall on memory. */
typedef struct {
    const char *k_head, *v_head;
    const int64_t *table;
    int first_block, last_block;
} task_span;

typedef struct {
    const void *q;
    task_span span;
    int q_begin, q_end, ctx, kvh, group, num_heads, block_shift, window;
    float scale;
    const task_span *next; /* NULL for a thread's last task */
    void *out;
} task_args;

/* Blocks [from, to) of the span, K and V, into L2 (the current task keeps L1). */
static inline void prefetch_span(const task_span *span, int from, int to, int block_shift,
                                 size_t row_bytes) {
    const size_t bytes = ((size_t)1 << block_shift) * row_bytes;
    for (int b = span->first_block + from; b < span->first_block + to; ++b) {
        const size_t at = ((size_t)span->table[b] << block_shift) * row_bytes;
        for (size_t off = 0; off < bytes; off += 64) {
            __builtin_prefetch(span->k_head + at + off, 0, 2);
            __builtin_prefetch(span->v_head + at + off, 0, 2);
        }
    }
}

static inline size_t row_offset(const task_args *a, int pos, size_t row_bytes) {
    const int64_t block = a->span.table[pos >> a->block_shift];
    const int in_block = pos & ((1 << a->block_shift) - 1);
    return (((size_t)block << a->block_shift) + in_block) * row_bytes;
}

/* Positions [from, to) of this task's K and V rows into L1. */
static inline void prefetch_rows(const task_args *a, int from, int to, size_t row_bytes) {
    for (int pos = from; pos < to; ++pos) {
        const size_t at = row_offset(a, pos, row_bytes);
        for (size_t off = 0; off < row_bytes; off += 64) {
            __builtin_prefetch(a->span.k_head + at + off, 0, 3);
            __builtin_prefetch(a->span.v_head + at + off, 0, 3);
        }
    }
}

static inline int min_int(int x, int y) { return x < y ? x : y; }

/* Before tile i of a pass over positions [lo, last_pos): on a task's first pass, K and V rows
 * PREFETCH_ROWS ahead into L1; across its last pass, the next task's blocks into L2. */
static inline void prefetch_ahead(const task_args *a, int i, int num_tiles, int lo, int last_pos,
                                  int first_pass, int last_pass, size_t row_bytes) {
    if (first_pass) {
        const int ahead = lo + i * TILE + PREFETCH_ROWS;
        if (i == 0) prefetch_rows(a, lo, min_int(ahead, last_pos), row_bytes);
        if (ahead < last_pos) prefetch_rows(a, ahead, min_int(ahead + TILE, last_pos), row_bytes);
    }
    if (last_pass && a->next) {
        const int next_blocks = a->next->last_block - a->next->first_block + 1;
        prefetch_span(a->next, i * next_blocks / num_tiles, (i + 1) * next_blocks / num_tiles,
                      a->block_shift, row_bytes);
    }
}

static inline void widen_row(const char *src, int kind, int dim, float *dst) {
    for (int c = 0; c < dim; c += TILE)
        store_vec(dst + c, kind == KIND_BF16 ? load_bf16_vec((const uint16_t *)src + c)
                         : kind == KIND_F32  ? load_vec((const float *)src + c)
                                             : load_fp8_vec((const uint8_t *)src + c,
                                                            kind == KIND_E4M3));
}

static inline __attribute__((always_inline)) void widen_rows(const task_args *a,
                                                             const char *head, int start, int n,
                                                             int kind, int dim, float *rows) {
    const size_t row_bytes = (size_t)dim * kind_bytes(kind);
    for (int j = 0; j < n; ++j)
        widen_row(head + row_offset(a, start + j, row_bytes), kind, dim, rows + j * dim);
}

/* Rows [start, start + n) of the K or V cache, widened into rows[TILE][dim]. A full tile (all
 * but a context's last) gets a copy of each loop with a fixed trip count, unrolled: decode at
 * short contexts is bound by this per-tile work, not by memory. */
static inline __attribute__((always_inline)) void widen_tile(const task_args *a,
                                                             const char *head, int start, int n,
                                                             int kind, int dim, float *rows) {
    if (n == TILE)
        widen_rows(a, head, start, TILE, kind, dim, rows);
    else
        widen_rows(a, head, start, n, kind, dim, rows);
}

/* Rows [start, start + n) of an fp8 cache as bf16 rows[TILE][dim]: exact (bf16 has fp8's
 * exponent range and more mantissa), so the bf16 dot product serves fp8 keys too. */
static inline void narrow_row(const uint8_t *src, int kind, size_t len, uint16_t *dst) {
    for (size_t c = 0; c < len; c += TILE) {
        const vfloat v = load_fp8_vec(src + c, kind == KIND_E4M3);
        vuint bits;
        memcpy(&bits, &v, sizeof bits);
        const vhalf h = __builtin_convertvector(bits >> 16, vhalf);
        memcpy(dst + c, &h, sizeof h);
    }
}

static inline void narrow_tile(const task_args *a, const char *head, int start, int n, int kind,
                               int dim, uint16_t *rows) {
    for (int j = 0; j < n; ++j)
        narrow_row((const uint8_t *)head + row_offset(a, start + j, (size_t)dim), kind,
                   (size_t)dim, rows + j * dim);
}

static inline int is_fp8(int kind) { return kind == KIND_E4M3 || kind == KIND_E5M2; }

static inline __attribute__((always_inline)) vfloat dot_rows_f32(const float *qg,
                                                                 const float *keys, int n,
                                                                 int dim) {
    vfloat part[TILE];
    for (int j = 0; j < TILE; ++j) {
        vfloat dot = {0};
        if (j < n)
            for (int c = 0; c < dim; c += TILE)
                dot += load_vec(qg + c) * load_vec(keys + j * dim + c);
        part[j] = dot;
    }
    return sum_each(part);
}

/* Raw q.k of query head g against the tile's n keys, widened to fp32 beforehand (a full tile:
 * as widen_tile). */
static inline vfloat dot_tile_f32(const float *qg, const float *keys, int n, int dim) {
    return n == TILE ? dot_rows_f32(qg, keys, TILE, dim) : dot_rows_f32(qg, keys, n, dim);
}

#ifdef __AVX512BF16__
/* The same from the bf16 rows in place: vdpbf16ps multiplies bf16 pairs exactly and sums in
 * fp32, so no key is widened (the dominant cost of a decode step's attention). */
static inline vfloat dot_row_bf16(const uint16_t *q, const uint16_t *k, int dim) {
    __m512 dot = _mm512_setzero_ps();
    int c = 0;
    for (; c + 32 <= dim; c += 32)
        dot = _mm512_dpbf16_ps(dot, (__m512bh)_mm512_loadu_si512(q + c),
                               (__m512bh)_mm512_loadu_si512(k + c));
    if (c < dim) { /* head dim 80: a 16-wide tail */
        const __mmask32 tail = (__mmask32)((1u << (dim - c)) - 1);
        dot = _mm512_dpbf16_ps(dot, (__m512bh)_mm512_maskz_loadu_epi16(tail, q + c),
                               (__m512bh)_mm512_maskz_loadu_epi16(tail, k + c));
    }
    return (vfloat)dot;
}

/* keys: the tile's bf16 rows (narrowed from fp8), or NULL to read them in the bf16 cache. */
static inline vfloat dot_tile_bf16(const task_args *a, const uint16_t *qg, const uint16_t *keys,
                                   int start, int n, int dim) {
    vfloat part[TILE];
    for (int j = 0; j < TILE; ++j) {
        const uint16_t *k = keys ? keys + j * dim
                                 : (const uint16_t *)(a->span.k_head
                                                      + row_offset(a, start + j, (size_t)dim * 2));
        part[j] = j < n ? dot_row_bf16(qg, k, dim) : (vfloat){0};
    }
    return sum_each(part);
}
#define NATIVE_BF16_DOT 1
#else
#define NATIVE_BF16_DOT 0
#endif

static inline __attribute__((always_inline)) void accumulate_rows(const float *values,
                                                                  vfloat weights, int n, int dim,
                                                                  float *acc_g) {
    for (int c = 0; c < dim; c += TILE) {
        vfloat acc = load_vec(acc_g + c);
        for (int j = 0; j < n; ++j) acc += weights[j] * load_vec(values + j * dim + c);
        store_vec(acc_g + c, acc);
    }
}

/* acc_g += the tile's n value rows weighted by `weights` (a full tile: as widen_tile). */
static inline __attribute__((always_inline)) void accumulate_tile(const float *values,
                                                                  vfloat weights, int n, int dim,
                                                                  float *acc_g) {
    if (n == TILE)
        accumulate_rows(values, weights, TILE, dim, acc_g);
    else
        accumulate_rows(values, weights, n, dim, acc_g);
}

static inline void load_queries(const task_args *a, int t, int bf16, int dim, float *qf) {
    const size_t first = ((size_t)t * a->num_heads + (size_t)a->kvh * a->group) * dim;
    for (int i = 0; i < a->group * dim; ++i) {
        const float x = bf16 ? bf16_to_f32(((const uint16_t *)a->q)[first + i])
                             : ((const float *)a->q)[first + i];
        qf[i] = x;
    }
}

static inline void store_outputs(const task_args *a, int t, int bf16, int dim, const float *acc,
                                 const float *sums) {
    const size_t first = ((size_t)t * a->num_heads + (size_t)a->kvh * a->group) * dim;
    for (int g = 0; g < a->group; ++g) {
        const float inv = 1.f / sums[g];
        for (int d = 0; d < dim; ++d) {
            const float x = acc[g * dim + d] * inv;
            if (bf16)
                ((uint16_t *)a->out)[first + g * dim + d] = f32_to_bf16(x);
            else
                ((float *)a->out)[first + g * dim + d] = x;
        }
    }
}

/* Query head g's raw scores straight from the bf16 cache (only where the CPU has a bf16 dot). */
static inline vfloat dot_tile_native(const task_args *a, int t, int g, const uint16_t *keys,
                                     int start, int n, int dim) {
#if NATIVE_BF16_DOT
    const size_t head = (size_t)t * a->num_heads + (size_t)a->kvh * a->group + g;
    return dot_tile_bf16(a, (const uint16_t *)a->q + head * dim, keys, start, n, dim);
#else
    (void)a, (void)t, (void)g, (void)keys, (void)start, (void)n, (void)dim;
    return (vfloat){0};
#endif
}

/* Query head g's raw scores of the tile's n keys, scaled; lanes past n are MASKED. */
static inline __attribute__((always_inline)) vfloat tile_scores(const task_args *a, int g,
                                                                const float *qf,
                                                                const float *tile,
                                                                const uint16_t *keys, int start,
                                                                int n, int widen_keys, int dim) {
    const vfloat dots = widen_keys ? dot_tile_f32(qf + g * dim, tile, n, dim)
                                   : dot_tile_native(a, a->q_begin, g, keys, start, n, dim);
    if (n == TILE) return dots * a->scale;
    vint lane;
    for (int l = 0; l < TILE; ++l) lane[l] = l;
    return blend(lane < n, dots * a->scale, splat(MASKED));
}

static inline vfloat max_vec(vfloat x, vfloat y) { return blend(x > y, x, y); }

/* Folds a chunk's scores (scores[g * DECODE_TILES + i]: head g, tile i) into each head's
 * running max and sum, rescaling its accumulator where the max grew, and replaces them with
 * their softmax weights. */
static inline __attribute__((always_inline)) void fold_chunk(vfloat *scores, int num_tiles,
                                                             int last_n, int group, int dim,
                                                             float *maxs, float *sums,
                                                             float *acc) {
    vint lane;
    for (int l = 0; l < TILE; ++l) lane[l] = l;
    for (int g = 0; g < group; ++g) {
        vfloat *s = scores + g * DECODE_TILES;
        vfloat top = s[0];
        for (int i = 1; i < num_tiles; ++i) top = max_vec(top, s[i]);
        const float chunk_max = max_of(top);
        if (chunk_max > maxs[g]) {
            const float rescale = expf(maxs[g] - chunk_max);
            sums[g] *= rescale;
            for (int c = 0; c < dim; c += TILE)
                store_vec(acc + g * dim + c, load_vec(acc + g * dim + c) * rescale);
            maxs[g] = chunk_max;
        }
        vfloat total = {0};
        for (int i = 0; i < num_tiles; ++i) {
            vfloat weight = exp_vec(s[i] - maxs[g]);
            if (i == num_tiles - 1 && last_n < TILE)  /* exp_vec(MASKED) is tiny, not 0 */
                weight = blend(lane < last_n, weight, splat(0.f));
            total += s[i] = weight;
        }
        sums[g] += sum_of(total);
    }
}

/* One (sequence, kv head) task of a decode step: its one query position against the context,
 * DECODE_TILES tiles at a time. A chunk's scores are all computed first (keys widened once per
 * tile and shared by the query heads), then softmaxed together (one max and rescale per chunk,
 * exp over independent vectors), then its value rows are accumulated with those weights. */
static inline __attribute__((always_inline)) void attend(const task_args *a, int bf16, int kind,
                                                         int dim) {
    const size_t row_bytes = (size_t)dim * kind_bytes(kind);
    float qf[MAX_GROUP * MAX_DIM] __attribute__((aligned(64)));
    float acc[MAX_GROUP * MAX_DIM] __attribute__((aligned(64)));
    float tile[TILE * MAX_DIM] __attribute__((aligned(64)));
    uint16_t keys16[TILE * MAX_DIM] __attribute__((aligned(64)));  /* fp8 keys, narrowed */
    vfloat scores[MAX_GROUP * DECODE_TILES];
    float maxs[MAX_GROUP], sums[MAX_GROUP];
    const int group = a->group, ctx = a->ctx;
    const int widen_keys = !(bf16 && (kind == KIND_BF16 || is_fp8(kind)) && NATIVE_BF16_DOT);
    const uint16_t *keys = widen_keys || kind == KIND_BF16 ? NULL : keys16;
    const int lo = (a->window > 0 && ctx - a->window > 0) ? ctx - a->window : 0;
    const int num_tiles = (ctx - 1 - lo) / TILE + 1;
    if (widen_keys) load_queries(a, a->q_begin, bf16, dim, qf);  /* the bf16 dot reads q */
    memset(acc, 0, sizeof(float) * group * dim);
    for (int g = 0; g < group; ++g) maxs[g] = MASKED, sums[g] = 0.f;
    for (int i0 = 0; i0 < num_tiles; i0 += DECODE_TILES) {
        const int i1 = min_int(i0 + DECODE_TILES, num_tiles);
        for (int i = i0; i < i1; ++i) {
            const int start = lo + i * TILE, n = min_int(ctx - start, TILE);
            prefetch_ahead(a, i, num_tiles, lo, ctx, 1, 1, row_bytes);
            if (widen_keys) widen_tile(a, a->span.k_head, start, n, kind, dim, tile);
            else if (keys) narrow_tile(a, a->span.k_head, start, n, kind, dim, keys16);
            for (int g = 0; g < group; ++g)
                scores[g * DECODE_TILES + i - i0] = tile_scores(a, g, qf, tile, keys, start, n,
                                                                widen_keys, dim);
        }
        const int last_n = min_int(ctx - (lo + (i1 - 1) * TILE), TILE);
        fold_chunk(scores, i1 - i0, last_n, group, dim, maxs, sums, acc);
        for (int i = i0; i < i1; ++i) {
            const int start = lo + i * TILE, n = min_int(ctx - start, TILE);
            widen_tile(a, a->span.v_head, start, n, kind, dim, tile);
            for (int g = 0; g < group; ++g)
                accumulate_tile(tile, scores[g * DECODE_TILES + i - i0], n, dim, acc + g * dim);
        }
    }
    store_outputs(a, a->q_begin, bf16, dim, acc, sums);
}

/* ---- Prefill: lanes are query rows ------------------------------------------------------
 * A prefill chunk has many (position, head) rows per kv head, so its lanes hold TILE rows and
 * the keys of a tile are walked one by one: each score vector is TILE rows' dot with one key
 * (the key's elements broadcast from memory), the online softmax runs down the tile's TILE
 * score vectors with no horizontal reduction, and each value element is broadcast into TILE
 * rows' accumulators. With AVX512-BF16 a query pair (q[c], q[c+1]) per lane meets the key's
 * bf16 pair in one vdpbf16ps, so keys are never widened. */

typedef struct {
    vfloat max, sum;
    vint pos_hi, pos_lo;  /* each lane attends positions [pos_lo, pos_hi] */
    int first_pos, last_pos;
} lane_rows;

static const float ZERO_ROW[MAX_DIM] __attribute__((aligned(64)));

/* Rows [r0, r0 + TILE) of the block starting at query position t0, transposed into qt
 * ([dim][TILE] fp32, or [dim / 2][TILE] bf16 pairs for the native dot), with their
 * windows. */
static inline void load_lane_rows(const task_args *a, int t0, int r0, int rows, int bf16,
                                  int native, int dim, float *qt, lane_rows *lr) {
    const int group = a->group;
    int pos_hi[TILE], pos_lo[TILE];
    lr->first_pos = 1 << 30, lr->last_pos = -1;
    for (int lane = 0; lane < TILE; ++lane) {
        const int r = r0 + lane;
        if (r >= rows) {  /* no row: attends nothing */
            pos_hi[lane] = -1, pos_lo[lane] = 0;
            for (int c = 0; c < dim; ++c) qt[c * TILE + lane] = 0.f;
            continue;
        }
        const int t = t0 + r / group;
        const int pos = a->ctx - (a->q_end - t);
        pos_hi[lane] = pos;
        pos_lo[lane] = (a->window > 0 && pos - a->window + 1 > 0) ? pos - a->window + 1 : 0;
        lr->first_pos = pos_lo[lane] < lr->first_pos ? pos_lo[lane] : lr->first_pos;
        lr->last_pos = pos > lr->last_pos ? pos : lr->last_pos;
        const size_t at = ((size_t)t * a->num_heads + (size_t)a->kvh * group + r % group) * dim;
        if (native) {  /* the lane's pair c/2 as one 32-bit word, as vdpbf16ps reads it */
            const uint32_t *pairs = (const uint32_t *)((const uint16_t *)a->q + at);
            for (int c = 0; c < dim / 2; ++c) memcpy(&qt[c * TILE + lane], &pairs[c], 4);
        } else {
            for (int c = 0; c < dim; ++c)
                qt[c * TILE + lane] = bf16 ? bf16_to_f32(((const uint16_t *)a->q)[at + c])
                                           : ((const float *)a->q)[at + c];
        }
    }
    memcpy(&lr->pos_hi, pos_hi, sizeof pos_hi);
    memcpy(&lr->pos_lo, pos_lo, sizeof pos_lo);
    lr->max = splat(MASKED), lr->sum = splat(0.f);
}

/* Where the tile's key rows are, once per tile for all its row groups: in the bf16 cache for
 * the native dot, else widened in ktile; a zero row past the context. */
static inline void locate_keys(const task_args *a, const float *ktile, int start, int n,
                               int native, int dim, const void *keys[TILE]) {
    for (int j = 0; j < TILE; ++j)
        keys[j] = j >= n ? (const void *)ZERO_ROW
                : native ? (const void *)(a->span.k_head
                                          + row_offset(a, start + j, (size_t)dim * 2))
                         : (const void *)(ktile + j * dim);
}

/* Raw scores of TILE rows (lanes) against the tile's keys: scores[j] for key j. */
static inline void score_keys(const float *qt, const void *const keys[TILE], int native,
                              int dim, vfloat scores[TILE]) {
    for (int j = 0; j < TILE; ++j) scores[j] = (vfloat){0};
#if NATIVE_BF16_DOT
    if (native) {
        for (int c = 0; c < dim / 2; ++c) {
            const __m512bh q = (__m512bh)_mm512_load_ps(qt + c * TILE);
            for (int j = 0; j < TILE; ++j)
                scores[j] = (vfloat)_mm512_dpbf16_ps(
                    (__m512)scores[j], q,
                    (__m512bh)_mm512_set1_epi32((int)((const uint32_t *)keys[j])[c]));
        }
        return;
    }
#endif
    (void)native;
    for (int c = 0; c < dim; ++c) {
        const vfloat q = load_vec(qt + c * TILE);
        for (int j = 0; j < TILE; ++j) scores[j] += q * ((const float *)keys[j])[c];
    }
}

/* The tile folded into TILE rows' online softmax and accumulators (acct [dim][TILE]). */
static inline void fold_rows(vfloat scores[TILE], const float *vtile, int start, float scale,
                             int dim, lane_rows *lr, float *acct) {
    vfloat tile_max = splat(MASKED);
    vint valid[TILE];
    for (int j = 0; j < TILE; ++j) {
        valid[j] = (start + j <= lr->pos_hi) & (start + j >= lr->pos_lo);
        scores[j] = blend(valid[j], scores[j] * scale, splat(MASKED));
        tile_max = blend(scores[j] > tile_max, scores[j], tile_max);
    }
    const vfloat new_max = blend(tile_max > lr->max, tile_max, lr->max);
    const vfloat rescale = exp_vec(lr->max - new_max);
    vfloat sum = lr->sum * rescale;
    for (int j = 0; j < TILE; ++j) {
        scores[j] = blend(valid[j], exp_vec(scores[j] - new_max), splat(0.f));
        sum += scores[j];
    }
    lr->max = new_max, lr->sum = sum;
    for (int c = 0; c < dim; ++c) {
        vfloat acc = load_vec(acct + c * TILE) * rescale;
        for (int j = 0; j < TILE; ++j) acc += scores[j] * vtile[j * dim + c];
        store_vec(acct + c * TILE, acc);
    }
}

static inline void store_lane_rows(const task_args *a, int t0, int r0, int rows, int bf16,
                                   int dim, const float *acct, const lane_rows *lr) {
    const vfloat inv = 1.f / blend(lr->sum > 0.f, lr->sum, splat(1.f));
    for (int lane = 0; lane < TILE && r0 + lane < rows; ++lane) {
        const int r = r0 + lane, t = t0 + r / a->group;
        const size_t at = ((size_t)t * a->num_heads + (size_t)a->kvh * a->group + r % a->group)
                          * dim;
        for (int c = 0; c < dim; ++c) {
            const float x = acct[c * TILE + lane] * inv[lane];
            if (bf16)
                ((uint16_t *)a->out)[at + c] = f32_to_bf16(x);
            else
                ((float *)a->out)[at + c] = x;
        }
    }
}

/* One (sequence, kv head) task of a prefill chunk: query positions in blocks of up to
 * MAX_ROWS rows; each block walks the union of its rows' contexts once, tile by tile, and
 * each group of TILE rows skips the tiles outside all of its rows' windows. */
static inline __attribute__((always_inline)) void attend_rows(const task_args *a, int bf16,
                                                              int kind, int dim) {
    enum { LANE_GROUPS = MAX_ROWS / TILE };
    const size_t row_bytes = (size_t)dim * kind_bytes(kind);
    float qt[MAX_ROWS * MAX_DIM] __attribute__((aligned(64)));
    float acct[MAX_ROWS * MAX_DIM] __attribute__((aligned(64)));
    float ktile[TILE * MAX_DIM] __attribute__((aligned(64)));
    float vtile[TILE * MAX_DIM] __attribute__((aligned(64)));
    lane_rows lr[LANE_GROUPS];
    vfloat scores[TILE];
    const void *keys[TILE];
    const int native = bf16 && kind == KIND_BF16 && NATIVE_BF16_DOT;
    const int per_block = MAX_ROWS / a->group;
    for (int t0 = a->q_begin; t0 < a->q_end; t0 += per_block) {
        const int t1 = t0 + per_block < a->q_end ? t0 + per_block : a->q_end;
        const int rows = (t1 - t0) * a->group, groups = (rows + TILE - 1) / TILE;
        const int first_pass = t0 == a->q_begin, last_pass = t1 == a->q_end;
        int lo = 1 << 30, last_pos = 0;
        for (int lg = 0; lg < groups; ++lg) {
            load_lane_rows(a, t0, lg * TILE, rows, bf16, native, dim, qt + lg * TILE * dim,
                           &lr[lg]);
            lo = lr[lg].first_pos < lo ? lr[lg].first_pos : lo;
            last_pos = lr[lg].last_pos + 1 > last_pos ? lr[lg].last_pos + 1 : last_pos;
        }
        memset(acct, 0, sizeof(float) * groups * TILE * dim);
        const int num_tiles = (last_pos - 1 - lo) / TILE + 1;
        for (int i = 0; i < num_tiles; ++i) {
            const int start = lo + i * TILE;
            const int n = last_pos - start < TILE ? last_pos - start : TILE;
            prefetch_ahead(a, i, num_tiles, lo, last_pos, first_pass, last_pass, row_bytes);
            if (!native) widen_tile(a, a->span.k_head, start, n, kind, dim, ktile);
            locate_keys(a, ktile, start, n, native, dim, keys);
            widen_tile(a, a->span.v_head, start, n, kind, dim, vtile);
            if (n < TILE)  /* rows past the context: finite zeros (their weights are 0) */
                memset(vtile + n * dim, 0, sizeof(float) * (TILE - n) * dim);
            for (int lg = 0; lg < groups; ++lg) {
                if (start > lr[lg].last_pos || start + n <= lr[lg].first_pos) continue;
                score_keys(qt + lg * TILE * dim, keys, native, dim, scores);
                fold_rows(scores, vtile, start, a->scale, dim, &lr[lg],
                          acct + lg * TILE * dim);
            }
        }
        for (int lg = 0; lg < groups; ++lg)
            store_lane_rows(a, t0, lg * TILE, rows, bf16, dim, acct + lg * TILE * dim, &lr[lg]);
    }
}

/* A prefill task over an fp8 cache: its blocks are narrowed to bf16 once, into a copy with
 * an identity block table, and attended as a bf16 cache (attend_rows would otherwise convert
 * each row again for every block of query rows it walks). */
static void attend_rows_fp8(const task_args *a, int bf16, int kind, int dim) {
    const int shift = a->block_shift, num_blocks = a->span.last_block + 1;
    const size_t block_elems = ((size_t)1 << shift) * dim;
    uint16_t *kv16 = malloc(2 * (size_t)num_blocks * block_elems * sizeof *kv16);
    int64_t *table = malloc((size_t)num_blocks * sizeof *table);
    if (kv16 == NULL || table == NULL) {  /* no memory: widen tile by tile instead */
        free(kv16), free(table);
        attend_rows(a, bf16, kind, dim);
        return;
    }
    uint16_t *v16 = kv16 + (size_t)num_blocks * block_elems;
    for (int b = a->span.first_block; b < num_blocks; ++b) {
        const size_t at = (size_t)a->span.table[b] * block_elems;  /* fp8: 1 byte each */
        table[b] = b;
        narrow_row((const uint8_t *)a->span.k_head + at, kind, block_elems,
                   kv16 + b * block_elems);
        narrow_row((const uint8_t *)a->span.v_head + at, kind, block_elems,
                   v16 + b * block_elems);
    }
    task_args local = *a;
    local.span.k_head = (const char *)kv16, local.span.v_head = (const char *)v16;
    local.span.table = table;
    local.next = NULL;  /* its blocks are fp8: prefetching them as bf16 rows would miss */
    attend_rows(&local, bf16, KIND_BF16, dim);
    free(kv16), free(table);
}

/* Specialised per query/cache dtype and head dim so the inner loops have fixed trip counts. */
#define DEFINE_ATTEND(IO, KIND, DIM)                                               \
    static void attend_##IO##_##KIND##_##DIM(const task_args *a) {                 \
        if (a->q_end - a->q_begin > 1 && is_fp8(KIND)) attend_rows_fp8(a, IO, KIND, DIM); \
        else if (a->q_end - a->q_begin > 1) attend_rows(a, IO, KIND, DIM);         \
        else attend(a, IO, KIND, DIM);                                             \
    }
#define DEFINE_DIMS(IO, KIND)                                                                  \
    DEFINE_ATTEND(IO, KIND, 32) DEFINE_ATTEND(IO, KIND, 64) DEFINE_ATTEND(IO, KIND, 80)       \
    DEFINE_ATTEND(IO, KIND, 96) DEFINE_ATTEND(IO, KIND, 128) DEFINE_ATTEND(IO, KIND, 256)     \
    static const attend_fn attend_##IO##_##KIND[6] = {                                       \
        attend_##IO##_##KIND##_32, attend_##IO##_##KIND##_64, attend_##IO##_##KIND##_80,     \
        attend_##IO##_##KIND##_96, attend_##IO##_##KIND##_128, attend_##IO##_##KIND##_256};

typedef void (*attend_fn)(const task_args *);

DEFINE_DIMS(0, 0)  /* fp32 everywhere */
DEFINE_DIMS(1, 1)  /* bf16 everywhere */
DEFINE_DIMS(0, 2)  /* fp32 queries, e4m3 cache */
DEFINE_DIMS(1, 2)
DEFINE_DIMS(0, 3)  /* e5m2 cache */
DEFINE_DIMS(1, 3)

/* NULL where the pair has no kernel (a bf16 cache under fp32 queries, and the reverse). */
static const attend_fn *attend_table(int io_bf16, int kind) {
    static const attend_fn *const by_kind[2][NUM_KINDS] = {
        {attend_0_0, NULL, attend_0_2, attend_0_3},
        {NULL, attend_1_1, attend_1_2, attend_1_3},
    };
    if (io_bf16 < 0 || io_bf16 > 1 || kind < 0 || kind >= NUM_KINDS || (is_fp8(kind) && !HAS_FP8))
        return NULL;
    return by_kind[io_bf16][kind];
}

int supports_kinds(int io_bf16, int kind) { return attend_table(io_bf16, kind) != NULL; }

static attend_fn attend_for(int io_bf16, int kind, int dim) {
    const int index = dim == 32 ? 0 : dim == 64 ? 1 : dim == 80 ? 2 : dim == 96 ? 3
                    : dim == 128 ? 4 : 5;
    return attend_table(io_bf16, kind)[index];
}

typedef struct {
    const void *q, *k_cache, *v_cache;
    const int64_t *block_tables;
    const int32_t *query_start, *context_lens;
    void *out;
    int num_heads, num_kv_heads, head_dim, block_shift, max_blocks, window, io_bf16, kind;
    int64_t head_bytes;
    float scale;
} call_args;

/* The blocks task `task` reads (its first query position sets the window's start). */
static task_span span_of(const call_args *c, int task) {
    const int s = task / c->num_kv_heads, kvh = task % c->num_kv_heads;
    const int ctx = c->context_lens[s];
    const int first_pos = ctx - (c->query_start[s + 1] - c->query_start[s]);
    const int lo = (c->window > 0 && first_pos - c->window + 1 > 0) ? first_pos - c->window + 1
                                                                    : 0;
    task_span span = {(const char *)c->k_cache + kvh * c->head_bytes,
                      (const char *)c->v_cache + kvh * c->head_bytes,
                      c->block_tables + (int64_t)s * c->max_blocks, lo >> c->block_shift,
                      (ctx - 1) >> c->block_shift};
    return span;
}

static void run_task(const call_args *c, attend_fn fn, int task, task_span span,
                     const task_span *next) {
    const int s = task / c->num_kv_heads;
    task_args a = {c->q, span, c->query_start[s], c->query_start[s + 1],
                   c->context_lens[s], task % c->num_kv_heads, c->num_heads / c->num_kv_heads,
                   c->num_heads, c->block_shift, c->window, c->scale, next, c->out};
    fn(&a);
}

/* Tasks are handed out one at a time from a shared counter (contexts differ in length, so a
 * static split would idle a thread); each thread claims its next task before running the
 * current one, so it knows which blocks to prefetch. */
static int run(const call_args *c, int num_seqs, int num_threads) {
    if (c->num_heads / c->num_kv_heads > MAX_GROUP || c->block_shift > MAX_BLOCK_SHIFT
        || !supports_head_dim(c->head_dim) || !supports_kinds(c->io_bf16, c->kind))
        return -1;
    const attend_fn fn = attend_for(c->io_bf16, c->kind, c->head_dim);
    const int num_tasks = num_seqs * c->num_kv_heads;
    int counter = 0;
#pragma omp parallel num_threads(num_threads)
    {
        int task = __atomic_fetch_add(&counter, 1, __ATOMIC_RELAXED);
        task_span span = task < num_tasks ? span_of(c, task) : (task_span){0};
        while (task < num_tasks) {
            const int following = __atomic_fetch_add(&counter, 1, __ATOMIC_RELAXED);
            const int has_next = following < num_tasks;
            const task_span next = has_next ? span_of(c, following) : (task_span){0};
            run_task(c, fn, task, span, has_next ? &next : NULL);
            task = following;
            span = next;
        }
    }
    return 0;
}

/* q and out are fp32 or bf16 (io_bf16), the caches of `cache_kind`. Returns -1 for a shape or
 * dtype pair the kernel has no code for. */
int paged_attention(const void *q, const void *k_cache, const void *v_cache,
                    const int64_t *block_tables, const int32_t *query_start,
                    const int32_t *context_lens, void *out, int num_seqs, int num_heads,
                    int num_kv_heads, int head_dim, int num_blocks, int block_shift,
                    int max_blocks, float scale, int window, int io_bf16, int cache_kind,
                    int num_threads) {
    if (cache_kind < 0 || cache_kind >= NUM_KINDS) return -1;
    const int64_t head_bytes = (int64_t)num_blocks * ((int64_t)1 << block_shift) * head_dim
                               * (int64_t)kind_bytes(cache_kind);
    call_args c = {q, k_cache, v_cache, block_tables, query_start, context_lens, out,
                   num_heads, num_kv_heads, head_dim, block_shift, max_blocks, window, io_bf16,
                   cache_kind, head_bytes, scale};
    return run(&c, num_seqs, num_threads);
}

/* A step's K and V rows into their cache slots (the cache as [kv_heads, slots, dim]); k and v
 * are [tokens, kv_heads, dim] with rows contiguous, at the given element strides. Returns -1,
 * writing nothing, if a slot is outside the cache. */
int write_kv(const char *k, const char *v, char *key_cache, char *value_cache,
             const int64_t *slots, int tokens, int kv_heads, int dim, int64_t num_slots,
             int64_t k_stride_tok, int64_t k_stride_head, int64_t v_stride_tok,
             int64_t v_stride_head, int elem_bytes) {
    for (int t = 0; t < tokens; ++t)
        if (slots[t] < 0 || slots[t] >= num_slots) return -1;
    const size_t row = (size_t)dim * elem_bytes;
    for (int t = 0; t < tokens; ++t)
        for (int h = 0; h < kv_heads; ++h) {
            const size_t at = ((size_t)h * num_slots + slots[t]) * row;
            memcpy(key_cache + at, k + (t * k_stride_tok + h * k_stride_head) * elem_bytes, row);
            memcpy(value_cache + at, v + (t * v_stride_tok + h * v_stride_head) * elem_bytes, row);
        }
    return 0;
}
