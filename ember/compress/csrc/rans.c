/* Lane-interleaved rANS over the exponent byte of BF16 weights (format: docs/compression.md).
 *
 * A tensor of n symbols is cut into groups of GROUP_LANES * LANE_STEPS symbols. In a group,
 * lane j owns the symbols j, j + GROUP_LANES, j + 2 * GROUP_LANES, ...: at each step the
 * lanes decode neighbouring symbols, so a CPU interleaves 32 independent dependency chains and
 * a GPU writes coalesced. Each lane has its own 16-bit word stream and 32-bit final state.
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define RANS_AVX512 1
#endif

#define PROB_BITS 12
#define PROB_SCALE (1u << PROB_BITS)
#define RANS_L (1u << 16)
#define GROUP_LANES 32
#define LANE_STEPS 2048
#define GROUP_SYMBOLS ((int64_t)GROUP_LANES * LANE_STEPS)

int ember_rans_prob_bits(void) { return PROB_BITS; }
int ember_rans_group_lanes(void) { return GROUP_LANES; }
int ember_rans_lane_steps(void) { return LANE_STEPS; }

static int64_t lane_count(int64_t n, int64_t lane) {
    int64_t group_n = n - (lane / GROUP_LANES) * GROUP_SYMBOLS;
    int64_t j = lane % GROUP_LANES;
    if (group_n > GROUP_SYMBOLS) group_n = GROUP_SYMBOLS;
    return group_n > j ? (group_n - j + GROUP_LANES - 1) / GROUP_LANES : 0;
}

/* counts[s] += how many of bits[0..n) have exponent byte s (four tables: no store stalls). */
void ember_exponent_histogram(const uint16_t *bits, int64_t n, int64_t *counts) {
    int64_t part[4][256] = {{0}};
    int64_t i = 0;
    for (; i + 4 <= n; i += 4)
        for (int u = 0; u < 4; u++) part[u][(bits[i + u] >> 7) & 0xff]++;
    for (; i < n; i++) part[0][(bits[i] >> 7) & 0xff]++;
    for (int s = 0; s < 256; s++) counts[s] += part[0][s] + part[1][s] + part[2][s] + part[3][s];
}

/* Encodes lanes [lane_lo, lane_hi) of `bits` (BF16 as uint16). Lane i's words end at
 * slots + (i + 1) * LANE_STEPS (written backwards, so they read forwards from there);
 * lens[i] is their number and states[i] the state the decoder starts from. */
void ember_rans_encode(const uint16_t *bits, int64_t n, const uint16_t *freq, int64_t lane_lo,
                       int64_t lane_hi, uint16_t *slots, uint32_t *lens, uint32_t *states) {
    uint32_t cum[256], acc = 0;
    for (int s = 0; s < 256; s++) { cum[s] = acc; acc += freq[s]; }
    for (int64_t lane = lane_lo; lane < lane_hi; lane++) {
        int64_t base = (lane / GROUP_LANES) * GROUP_SYMBOLS + lane % GROUP_LANES;
        uint16_t *end = slots + (lane + 1) * LANE_STEPS, *p = end;
        uint32_t x = RANS_L;
        for (int64_t k = lane_count(n, lane) - 1; k >= 0; k--) {
            uint32_t s = (bits[base + k * GROUP_LANES] >> 7) & 0xff, f = freq[s];
            if (x >= ((RANS_L >> PROB_BITS) << 16) * f) { *--p = (uint16_t)x; x >>= 16; }
            x = ((x / f) << PROB_BITS) + (x % f) + cum[s];
        }
        lens[lane - lane_lo] = (uint32_t)(end - p);
        states[lane - lane_lo] = x;
    }
}

/* Copies lane i's words (the tail of its slot) to out + offsets[i], for i in [0, num_lanes). */
void ember_rans_pack(const uint16_t *slots, const uint32_t *offsets, int64_t num_lanes,
                     uint16_t *out) {
    for (int64_t i = 0; i < num_lanes; i++) {
        uint32_t len = offsets[i + 1] - offsets[i];
        memcpy(out + offsets[i], slots + (i + 1) * LANE_STEPS - len, (size_t)len * 2);
    }
}

#ifdef RANS_AVX512
/* One step of 16 lanes: the scalar loop below, with gathers for the table and the words. */
static inline void step16(__m512i *x, __m512i *pos, const uint32_t *table, const uint16_t *words,
                          __m512i limit, const uint8_t *sm, uint16_t *out) {
    const __m512i low12 = _mm512_set1_epi32(PROB_SCALE - 1);
    /* the next word of every lane, fetched whether needed or not: its address does not depend
     * on this step's symbol, so the load overlaps the table lookup instead of following it.
     * Reads 4 bytes at word pos: in bounds because the stream ends with two padding words. */
    __m512i w = _mm512_i32gather_epi32(_mm512_min_epu32(*pos, limit), (const void *)words, 2);
    __m512i t = _mm512_i32gather_epi32(_mm512_and_si512(*x, low12), (const void *)table, 4);
    __m512i v = _mm512_add_epi32(
        _mm512_mullo_epi32(_mm512_and_si512(t, low12), _mm512_srli_epi32(*x, PROB_BITS)),
        _mm512_and_si512(_mm512_srli_epi32(t, PROB_BITS), low12));
    __mmask16 need = _mm512_cmplt_epu32_mask(v, _mm512_set1_epi32(RANS_L));
    w = _mm512_and_si512(w, _mm512_set1_epi32(0xffff));
    *x = _mm512_mask_or_epi32(v, need, _mm512_slli_epi32(v, 16), w);
    *pos = _mm512_mask_add_epi32(*pos, need, *pos, _mm512_set1_epi32(1));
    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)sm));
    __m512i bits = _mm512_or_si512(
        _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x80)), 8),
        _mm512_or_si512(_mm512_slli_epi32(_mm512_srli_epi32(t, 24), 7),
                        _mm512_and_si512(b, _mm512_set1_epi32(0x7f))));
    _mm256_storeu_si256((__m256i *)out, _mm512_cvtepi32_epi16(bits));
}

/* The group's full steps (all 32 lanes live), two vectors of 16 lanes; returns symbols done. */
static int64_t full_steps(uint32_t *x, uint32_t *pos, const uint32_t *table,
                          const uint16_t *words, int64_t n_words, const uint8_t *sm,
                          uint16_t *out, int64_t group_n) {
    __m512i xa = _mm512_loadu_si512(x), xb = _mm512_loadu_si512(x + 16);
    __m512i pa = _mm512_loadu_si512(pos), pb = _mm512_loadu_si512(pos + 16);
    const __m512i limit = _mm512_set1_epi32((int32_t)(n_words - 2));
    int64_t k0 = 0;
    for (; k0 + GROUP_LANES <= group_n; k0 += GROUP_LANES) {
        step16(&xa, &pa, table, words, limit, sm + k0, out + k0);
        step16(&xb, &pb, table, words, limit, sm + k0 + 16, out + k0 + 16);
    }
    _mm512_storeu_si512(x, xa); _mm512_storeu_si512(x + 16, xb);
    _mm512_storeu_si512(pos, pa); _mm512_storeu_si512(pos + 16, pb);
    return k0;
}
#endif

/* Decodes groups [group_lo, group_hi) into out (BF16 bits), joining each exponent with its
 * sign/mantissa byte. `words` holds n_words >= 2 words (two padding words at the end), offsets
 * num_lanes + 1 entries, all checked by the caller to lie inside it. Returns 0, or -1 - g for
 * the first group whose streams do not end exactly where they should (corrupt data). */
int64_t ember_rans_decode(const uint16_t *words, int64_t n_words, const uint32_t *offsets,
                          const uint32_t *states, const uint16_t *freq, const uint8_t *sm,
                          int64_t n, int64_t group_lo, int64_t group_hi, uint16_t *out) {
    uint32_t table[PROB_SCALE];  /* slot -> freq | (slot - cum) << 12 | symbol << 24 */
    uint32_t slot = 0;
    for (uint32_t s = 0; s < 256; s++)
        for (uint32_t i = 0; i < freq[s] && slot < PROB_SCALE; i++, slot++)
            table[slot] = freq[s] | (i << PROB_BITS) | (s << 24);
    const int64_t last_word = n_words - 1;
    for (int64_t g = group_lo; g < group_hi; g++) {
        uint32_t x[GROUP_LANES], pos[GROUP_LANES];
        const int64_t lane0 = g * GROUP_LANES, start = g * GROUP_SYMBOLS;
        for (int j = 0; j < GROUP_LANES; j++) { x[j] = states[lane0 + j]; pos[j] = offsets[lane0 + j]; }
        int64_t group_n = n - start < GROUP_SYMBOLS ? n - start : GROUP_SYMBOLS, k0 = 0;
#ifdef RANS_AVX512
        k0 = full_steps(x, pos, table, words, n_words, sm + start, out + start, group_n);
#endif
        for (; k0 < group_n; k0 += GROUP_LANES) {
            const int width = group_n - k0 < GROUP_LANES ? (int)(group_n - k0) : GROUP_LANES;
            const uint8_t *sm_k = sm + start + k0;
            uint16_t *out_k = out + start + k0;
            for (int j = 0; j < width; j++) {
                uint32_t t = table[x[j] & (PROB_SCALE - 1)];
                uint32_t v = (t & (PROB_SCALE - 1)) * (x[j] >> PROB_BITS) + ((t >> PROB_BITS) & (PROB_SCALE - 1));
                uint32_t p = pos[j], need = v < RANS_L;
                uint32_t w = words[p < last_word ? p : last_word];
                x[j] = need ? (v << 16) | w : v;
                pos[j] = p + need;
                uint32_t b = sm_k[j];
                out_k[j] = (uint16_t)(((b & 0x80) << 8) | ((t >> 24) << 7) | (b & 0x7f));
            }
        }
        for (int j = 0; j < GROUP_LANES; j++)
            if (x[j] != RANS_L || pos[j] != offsets[lane0 + j + 1]) return -1 - g;
    }
    return 0;
}
