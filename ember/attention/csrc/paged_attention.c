/* Paged attention on the CPU over ember's head-major KV cache [kv_heads, blocks, block, dim].
 *
 * One call attends every token of a step (decode and chunked prefill alike): a task is one
 * (sequence, kv head) pair and serves all of that head's query heads, so each key/value row
 * is read once per query position. Scores and accumulation are fp32; bf16 is widened on load.
 * Specialised per head_dim so the inner loops have fixed trip counts (full vectorisation).
 * Built at run time by ember/attention/cpu_kernel.py.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_GROUP 64
#define PREFETCH_AHEAD 4 /* blocks: enough lead to cover DRAM latency on scattered tables */
#define MAX_BLOCK_SHIFT 7
#define MAX_BLOCK (1 << MAX_BLOCK_SHIFT)

static inline float bf16_to_f32(uint16_t x) {
    uint32_t u = ((uint32_t)x) << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN */
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even */
    return (uint16_t)(u >> 16);
}

#define IDENTITY(x) (x)

/* The next block's rows are a jump the hardware prefetcher cannot guess: ask for them early. */
static inline void prefetch_block(const void *head, int64_t block, int block_shift,
                                  size_t row_bytes) {
    const char *start = (const char *)head + ((size_t)block << block_shift) * row_bytes;
    const size_t bytes = ((size_t)1 << block_shift) * row_bytes;
    for (size_t off = 0; off < bytes; off += 64) __builtin_prefetch(start + off, 0, 3);
}

/* One (sequence, kv head) task for a fixed head dim DIM: a single pass over the context,
 * block by block, with an online softmax (rescale the accumulators when the max grows). */
#define DEFINE_TASK(NAME, T, LOAD, STORE, DIM)                                                \
static void NAME(const T *q, const T *k_head, const T *v_head, const int64_t *table,          \
                 int q_begin, int q_end, int ctx, int kvh, int group, int num_heads,           \
                 int block_shift, float scale, int window, T *out) {                           \
    const int block_size = 1 << block_shift;                                                   \
    const size_t block_elems = (size_t)block_size * DIM;                                       \
    float qf[MAX_GROUP][DIM], acc[MAX_GROUP][DIM], row[DIM];                                   \
    float maxs[MAX_GROUP], sums[MAX_GROUP], scores[MAX_GROUP][MAX_BLOCK];                      \
    for (int t = q_begin; t < q_end; ++t) {                                                    \
        const int pos = ctx - (q_end - t);                                                     \
        const int lo = (window > 0 && pos - window + 1 > 0) ? pos - window + 1 : 0;            \
        for (int g = 0; g < group; ++g) {                                                      \
            const T *qh = q + ((int64_t)t * num_heads + kvh * group + g) * DIM;                \
            for (int d = 0; d < DIM; ++d) qf[g][d] = LOAD(qh[d]) * scale;                      \
            for (int d = 0; d < DIM; ++d) acc[g][d] = 0.f;                                     \
            maxs[g] = -INFINITY;                                                               \
            sums[g] = 0.f;                                                                     \
        }                                                                                      \
        const int first_block = lo >> block_shift, last_block = pos >> block_shift;            \
        for (int b = first_block; b < first_block + PREFETCH_AHEAD && b <= last_block; ++b) {  \
            prefetch_block(k_head, table[b], block_shift, DIM * sizeof(T));                    \
            prefetch_block(v_head, table[b], block_shift, DIM * sizeof(T));                    \
        }                                                                                      \
        for (int b = first_block; b <= last_block; ++b) {                                      \
            const T *kb = k_head + table[b] * block_elems;                                     \
            const T *vb = v_head + table[b] * block_elems;                                     \
            if (b + PREFETCH_AHEAD <= last_block) {                                            \
                prefetch_block(k_head, table[b + PREFETCH_AHEAD], block_shift, DIM * sizeof(T)); \
                prefetch_block(v_head, table[b + PREFETCH_AHEAD], block_shift, DIM * sizeof(T)); \
            }                                                                                  \
            const int j0 = b == first_block ? lo - (b << block_shift) : 0;                     \
            const int j1 = b == last_block ? pos - (b << block_shift) + 1 : block_size;        \
            for (int j = j0; j < j1; ++j) {                                                    \
                for (int d = 0; d < DIM; ++d) row[d] = LOAD(kb[j * DIM + d]);                  \
                for (int g = 0; g < group; ++g) {                                              \
                    float dot = 0.f;                                                           \
                    for (int d = 0; d < DIM; ++d) dot += qf[g][d] * row[d];                    \
                    scores[g][j] = dot;                                                        \
                }                                                                              \
            }                                                                                  \
            for (int g = 0; g < group; ++g) {                                                  \
                float block_max = maxs[g];                                                     \
                for (int j = j0; j < j1; ++j)                                                  \
                    block_max = scores[g][j] > block_max ? scores[g][j] : block_max;           \
                if (block_max > maxs[g]) {                                                     \
                    const float rescale = expf(maxs[g] - block_max);                           \
                    sums[g] *= rescale;                                                        \
                    for (int d = 0; d < DIM; ++d) acc[g][d] *= rescale;                        \
                    maxs[g] = block_max;                                                       \
                }                                                                              \
                for (int j = j0; j < j1; ++j) {                                                \
                    scores[g][j] = expf(scores[g][j] - block_max);                             \
                    sums[g] += scores[g][j];                                                   \
                }                                                                              \
            }                                                                                  \
            for (int j = j0; j < j1; ++j) {                                                    \
                for (int d = 0; d < DIM; ++d) row[d] = LOAD(vb[j * DIM + d]);                  \
                for (int g = 0; g < group; ++g) {                                              \
                    const float w = scores[g][j];                                              \
                    for (int d = 0; d < DIM; ++d) acc[g][d] += w * row[d];                     \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
        for (int g = 0; g < group; ++g) {                                                      \
            T *oh = out + ((int64_t)t * num_heads + kvh * group + g) * DIM;                    \
            const float inv = 1.f / sums[g];                                                   \
            for (int d = 0; d < DIM; ++d) oh[d] = STORE(acc[g][d] * inv);                      \
        }                                                                                      \
    }                                                                                          \
}

#define DEFINE_KERNEL(NAME, T, LOAD, STORE)                                                   \
DEFINE_TASK(NAME##_d32, T, LOAD, STORE, 32)                                                    \
DEFINE_TASK(NAME##_d64, T, LOAD, STORE, 64)                                                    \
DEFINE_TASK(NAME##_d80, T, LOAD, STORE, 80)                                                    \
DEFINE_TASK(NAME##_d96, T, LOAD, STORE, 96)                                                    \
DEFINE_TASK(NAME##_d128, T, LOAD, STORE, 128)                                                  \
DEFINE_TASK(NAME##_d256, T, LOAD, STORE, 256)                                                  \
int NAME(const T *q, const T *k_cache, const T *v_cache, const int64_t *block_tables,         \
         const int32_t *query_start, const int32_t *context_lens, T *out, int num_seqs,        \
         int num_heads, int num_kv_heads, int head_dim, int num_blocks, int block_shift,       \
         int max_blocks, float scale, int window, int num_threads) {                           \
    const int group = num_heads / num_kv_heads;                                                \
    const int64_t head_stride = (int64_t)num_blocks * ((int64_t)1 << block_shift) * head_dim;  \
    if (group > MAX_GROUP || block_shift > MAX_BLOCK_SHIFT) return -1;                         \
    if (head_dim != 32 && head_dim != 64 && head_dim != 80 && head_dim != 96                   \
        && head_dim != 128 && head_dim != 256) return -1;                                      \
    const int num_tasks = num_seqs * num_kv_heads;                                             \
    _Pragma("omp parallel for schedule(dynamic, 4) num_threads(num_threads)")                  \
    for (int task = 0; task < num_tasks; ++task) {                                             \
        const int s = task / num_kv_heads, kvh = task % num_kv_heads;                          \
            const int ctx = context_lens[s];                                                       \
        const T *k_head = k_cache + kvh * head_stride, *v_head = v_cache + kvh * head_stride;  \
        const int64_t *table = block_tables + (int64_t)s * max_blocks;                         \
        const int qb = query_start[s], qe = query_start[s + 1];                                \
        switch (head_dim) {                                                                    \
        case 32: NAME##_d32(q, k_head, v_head, table, qb, qe, ctx, kvh, group, num_heads,      \
                            block_shift, scale, window, out); break;                   \
        case 64: NAME##_d64(q, k_head, v_head, table, qb, qe, ctx, kvh, group, num_heads,      \
                            block_shift, scale, window, out); break;                   \
        case 80: NAME##_d80(q, k_head, v_head, table, qb, qe, ctx, kvh, group, num_heads,      \
                            block_shift, scale, window, out); break;                   \
        case 96: NAME##_d96(q, k_head, v_head, table, qb, qe, ctx, kvh, group, num_heads,      \
                            block_shift, scale, window, out); break;                   \
        case 128: NAME##_d128(q, k_head, v_head, table, qb, qe, ctx, kvh, group, num_heads,    \
                              block_shift, scale, window, out); break;                 \
        default: NAME##_d256(q, k_head, v_head, table, qb, qe, ctx, kvh, group, num_heads,     \
                             block_shift, scale, window, out); break;                  \
        }                                                                                      \
    }                                                                                          \
    return 0;                                                                                  \
}

DEFINE_KERNEL(paged_attention_f32, float, IDENTITY, IDENTITY)
DEFINE_KERNEL(paged_attention_bf16, uint16_t, bf16_to_f32, f32_to_bf16)

int max_group(void) { return MAX_GROUP; }
int supports_head_dim(int d) {
    return d == 32 || d == 64 || d == 80 || d == 96 || d == 128 || d == 256;
}
