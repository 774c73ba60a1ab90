/* Interleaved rANS over the exponent byte of BF16 weights (format: docs/compression.md).
 *
 * A tensor of n symbols is cut into groups of GROUP_LANES * LANE_STEPS symbols. In a group,
 * lane j owns the symbols j, j + GROUP_LANES, j + 2 * GROUP_LANES, ...: at each step the
 * lanes decode neighbouring symbols, so a CPU interleaves 32 independent dependency chains and
 * a GPU writes coalesced. Each lane has its own 32-bit state; the lanes of a group share one
 * stream of 16-bit words, taken in lane order at each step by the lanes that renormalise.
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#define RANS_AVX512 1
#elif defined(__AVX2__)
#include <immintrin.h>
#define RANS_AVX2 1
#endif

#define PROB_BITS 12
#define PROB_SCALE (1u << PROB_BITS)
#define RANS_L (1u << 16)
#define GROUP_LANES 32
#define LANE_STEPS 2048
#define GROUP_SYMBOLS ((int64_t)GROUP_LANES * LANE_STEPS)

/* counts[s] += how many of bits[0..n) have exponent byte s (four tables: no store stalls). */
void ember_exponent_histogram(const uint16_t *bits, int64_t n, int64_t *counts) {
    int64_t part[4][256] = {{0}};
    int64_t i = 0;
    for (; i + 4 <= n; i += 4)
        for (int u = 0; u < 4; u++) part[u][(bits[i + u] >> 7) & 0xff]++;
    for (; i < n; i++) part[0][(bits[i] >> 7) & 0xff]++;
    for (int s = 0; s < 256; s++) counts[s] += part[0][s] + part[1][s] + part[2][s] + part[3][s];
}

static int64_t group_size(int64_t n, int64_t g) {
    int64_t rest = n - g * GROUP_SYMBOLS;
    return rest < GROUP_SYMBOLS ? rest : GROUP_SYMBOLS;
}

/* Encodes groups [group_lo, group_hi) of `bits` (BF16 as uint16). Group g's words end at
 * slots + (g + 1) * GROUP_SYMBOLS (written backwards: the steps and lanes in reverse, so the
 * decoder reads them forwards in its order); lens[g] is their number, states[32 g + j] the
 * state lane j's decoder starts from. */
void ember_rans_encode(const uint16_t *bits, int64_t n, const uint16_t *freq, int64_t group_lo,
                       int64_t group_hi, uint16_t *slots, uint32_t *lens, uint32_t *states) {
    uint32_t cum[256], acc = 0;
    for (int s = 0; s < 256; s++) { cum[s] = acc; acc += freq[s]; }
    for (int64_t g = group_lo; g < group_hi; g++) {
        const int64_t start = g * GROUP_SYMBOLS, group_n = group_size(n, g);
        uint16_t *end = slots + (g + 1) * GROUP_SYMBOLS, *p = end;
        uint32_t x[GROUP_LANES];
        for (int j = 0; j < GROUP_LANES; j++) x[j] = RANS_L;
        for (int64_t k0 = (group_n - 1) / GROUP_LANES * GROUP_LANES; k0 >= 0; k0 -= GROUP_LANES)
            for (int j = GROUP_LANES - 1; j >= 0; j--) {
                if (k0 + j >= group_n) continue;
                uint32_t s = (bits[start + k0 + j] >> 7) & 0xff, f = freq[s];
                if (x[j] >= ((RANS_L >> PROB_BITS) << 16) * f) { *--p = (uint16_t)x[j]; x[j] >>= 16; }
                x[j] = ((x[j] / f) << PROB_BITS) + (x[j] % f) + cum[s];
            }
        lens[g - group_lo] = (uint32_t)(end - p);
        memcpy(states + g * GROUP_LANES, x, sizeof(x));
    }
}

/* Copies group g's words (the tail of its slot) to out + offsets[g], for g in [0, groups). */
void ember_rans_pack(const uint16_t *slots, const uint32_t *offsets, int64_t groups,
                     uint16_t *out) {
    for (int64_t g = 0; g < groups; g++) {
        uint32_t len = offsets[g + 1] - offsets[g];
        memcpy(out + offsets[g], slots + (g + 1) * GROUP_SYMBOLS - len, (size_t)len * 2);
    }
}

static void build_table(const uint16_t *freq, uint32_t *table) {
    /* slot -> freq | (slot - cum) << 12 | symbol << 24 */
    uint32_t slot = 0;
    for (uint32_t s = 0; s < 256; s++)
        for (uint32_t i = 0; i < freq[s] && slot < PROB_SCALE; i++, slot++)
            table[slot] = freq[s] | (i << PROB_BITS) | (s << 24);
}

static inline uint16_t join(uint32_t sign_mantissa, uint32_t exponent) {
    return (uint16_t)(((sign_mantissa & 0x80) << 8) | (exponent << 7) | (sign_mantissa & 0x7f));
}

#ifdef RANS_AVX512
/* One step of 16 lanes: the scalar loop below, with a gather for the table and an expand
 * giving each renormalising lane the next word of the shared stream (16 words are loaded, in
 * bounds thanks to the padding words; only AVX-512F is needed, no VBMI2). */
static inline void step16(__m512i *x, const uint16_t **p, const uint32_t *table,
                          const uint8_t *sm, uint16_t *out) {
    const __m512i low12 = _mm512_set1_epi32(PROB_SCALE - 1);
    __m512i t = _mm512_i32gather_epi32(_mm512_and_si512(*x, low12), (const void *)table, 4);
    __m512i v = _mm512_add_epi32(
        _mm512_mullo_epi32(_mm512_and_si512(t, low12), _mm512_srli_epi32(*x, PROB_BITS)),
        _mm512_and_si512(_mm512_srli_epi32(t, PROB_BITS), low12));
    __mmask16 need = _mm512_cmplt_epu32_mask(v, _mm512_set1_epi32(RANS_L));
    __m512i w = _mm512_maskz_expand_epi32(
        need, _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)*p)));
    *p += __builtin_popcount(need);
    *x = _mm512_mask_or_epi32(v, need, _mm512_slli_epi32(v, 16), w);
    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)sm));
    __m512i bits = _mm512_or_si512(
        _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x80)), 8),
        _mm512_or_si512(_mm512_slli_epi32(_mm512_srli_epi32(t, 24), 7),
                        _mm512_and_si512(b, _mm512_set1_epi32(0x7f))));
    _mm256_storeu_si256((__m256i *)out, _mm512_cvtepi32_epi16(bits));
}

/* The group's full steps, two vectors of 16 lanes. Stops early (returning the symbols done)
 * if the stream pointer passes `end`: corrupt data, caught by the caller's end check; reads
 * stay in bounds because the words end with 32 padding words. */
static int64_t full_steps(uint32_t *x, const uint16_t **p, const uint16_t *end,
                          const uint32_t *table, const uint8_t *sm, uint16_t *out,
                          int64_t group_n) {
    __m512i xa = _mm512_loadu_si512(x), xb = _mm512_loadu_si512(x + 16);
    int64_t k0 = 0;
    for (; k0 + GROUP_LANES <= group_n && *p <= end; k0 += GROUP_LANES) {
        step16(&xa, p, table, sm + k0, out + k0);
        step16(&xb, p, table, sm + k0 + 16, out + k0 + 16);
    }
    _mm512_storeu_si512(x, xa);
    _mm512_storeu_si512(x + 16, xb);
    return k0;
}
#endif

#ifdef RANS_AVX2
/* expand[m][i]: which of the loaded words lane i takes when the lanes in mask m renormalise
 * (the number of renormalising lanes before it); AVX2 has no expand instruction. */
static int32_t expand[256][8];

__attribute__((constructor)) static void build_expand(void) {  /* once, when loaded */
    for (int m = 0; m < 256; m++)
        for (int i = 0, k = 0; i < 8; i++) {
            expand[m][i] = k;
            k += (m >> i) & 1;
        }
}

/* One step of 8 lanes (see step16). */
static inline void step8(__m256i *x, const uint16_t **p, const uint32_t *table,
                         const uint8_t *sm, uint16_t *out) {
    const __m256i low12 = _mm256_set1_epi32(PROB_SCALE - 1);
    __m256i t = _mm256_i32gather_epi32((const int *)table, _mm256_and_si256(*x, low12), 4);
    __m256i v = _mm256_add_epi32(
        _mm256_mullo_epi32(_mm256_and_si256(t, low12), _mm256_srli_epi32(*x, PROB_BITS)),
        _mm256_and_si256(_mm256_srli_epi32(t, PROB_BITS), low12));
    __m256i need = _mm256_cmpeq_epi32(_mm256_srli_epi32(v, 16), _mm256_setzero_si256());
    int mask = _mm256_movemask_ps(_mm256_castsi256_ps(need));
    __m256i loaded = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)*p));
    __m256i w = _mm256_permutevar8x32_epi32(
        loaded, _mm256_loadu_si256((const __m256i *)expand[mask]));
    *p += __builtin_popcount(mask);
    *x = _mm256_blendv_epi8(v, _mm256_or_si256(_mm256_slli_epi32(v, 16), w), need);
    __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)sm));
    __m256i bits = _mm256_or_si256(
        _mm256_slli_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x80)), 8),
        _mm256_or_si256(_mm256_slli_epi32(_mm256_srli_epi32(t, 24), 7),
                        _mm256_and_si256(b, _mm256_set1_epi32(0x7f))));
    _mm_storeu_si128((__m128i *)out, _mm_packus_epi32(_mm256_castsi256_si128(bits),
                                                      _mm256_extracti128_si256(bits, 1)));
}

/* The group's full steps, four vectors of 8 lanes (see the AVX-512 full_steps). */
static int64_t full_steps(uint32_t *x, const uint16_t **p, const uint16_t *end,
                          const uint32_t *table, const uint8_t *sm, uint16_t *out,
                          int64_t group_n) {
    __m256i xv[4];
    for (int v = 0; v < 4; v++) xv[v] = _mm256_loadu_si256((const __m256i *)(x + 8 * v));
    int64_t k0 = 0;
    for (; k0 + GROUP_LANES <= group_n && *p <= end; k0 += GROUP_LANES)
        for (int v = 0; v < 4; v++) step8(&xv[v], p, table, sm + k0 + 8 * v, out + k0 + 8 * v);
    for (int v = 0; v < 4; v++) _mm256_storeu_si256((__m256i *)(x + 8 * v), xv[v]);
    return k0;
}
#endif

/* Steps k0.. of one group, lane by lane: the portable path, and a last partial step. */
static void tail_steps(uint32_t *x, const uint16_t **p, const uint16_t *end,
                       const uint32_t *table, const uint8_t *sm, uint16_t *out, int64_t k0,
                       int64_t group_n) {
    for (; k0 < group_n && *p <= end; k0 += GROUP_LANES) {
        const int width = group_n - k0 < GROUP_LANES ? (int)(group_n - k0) : GROUP_LANES;
        for (int j = 0; j < width; j++) {
            uint32_t t = table[x[j] & (PROB_SCALE - 1)];
            uint32_t v = (t & (PROB_SCALE - 1)) * (x[j] >> PROB_BITS)
                         + ((t >> PROB_BITS) & (PROB_SCALE - 1));
            uint32_t need = v < RANS_L;
            x[j] = need ? (v << 16) | **p : v;
            *p += need;
            out[k0 + j] = join(sm[k0 + j], t >> 24);
        }
    }
}

/* Decodes groups [group_lo, group_hi) into out (BF16 bits), joining each exponent with its
 * sign/mantissa byte. `words` ends with 32 padding words; offsets (groups + 1 entries) were
 * checked by the caller to increase and end 32 words before the end of `words`. Returns 0, or
 * -1 - g for the first group whose stream does not end exactly where it should (corrupt). */
int64_t ember_rans_decode(const uint16_t *words, const uint32_t *offsets, const uint32_t *states,
                          const uint16_t *freq, const uint8_t *sm, int64_t n, int64_t group_lo,
                          int64_t group_hi, uint16_t *out) {
    uint32_t table[PROB_SCALE];
    build_table(freq, table);
    for (int64_t g = group_lo; g < group_hi; g++) {
        const int64_t start = g * GROUP_SYMBOLS, group_n = group_size(n, g);
        const uint16_t *p = words + offsets[g], *end = words + offsets[g + 1];
        uint32_t x[GROUP_LANES];
        memcpy(x, states + g * GROUP_LANES, sizeof(x));
        int64_t k0 = 0;
#if defined(RANS_AVX512) || defined(RANS_AVX2)
        k0 = full_steps(x, &p, end, table, sm + start, out + start, group_n);
#endif
        tail_steps(x, &p, end, table, sm + start, out + start, k0, group_n);
        if (p != end) return -1 - g;
        for (int j = 0; j < GROUP_LANES; j++)
            if (x[j] != RANS_L) return -1 - g;
    }
    return 0;
}
