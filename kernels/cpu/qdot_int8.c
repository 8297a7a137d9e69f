/* 2- and 4-bit codes against integer activations with AVX512-VNNI.
 *
 * The float path (qmatmul.c) spends three vector ops per 16 codes (shift,
 * mask, FMA) and is instruction-bound at ~12 GB/s per core on Zen 4, below
 * the memory. Here a code stays a byte: one AND (plus one shift for the
 * high nibble) gives 64 codes as unsigned bytes, and VPDPBUSD multiplies
 * them with 64 signed bytes of activations, four products per 32-bit lane.
 *
 * Activations as integers, to float32 accuracy: per token, d = max|x| / 127
 * and V = round(x / d * 2^16), a 24-bit integer split into balanced base-256
 * digits V = A1*2^16 + A2*2^8 + A3 with every digit in [-128, 127] (A1 in
 * [-127, 127]). The error is at most d/2^17 = max|x| * 6e-8 per element,
 * the rounding of float32 at the largest element. Per 64-byte block and
 * row, the three digit dot products are chained in one 32-bit accumulator
 * (acc = ((S1 << 8) + S2 << 8) + S3, all exact: |acc| < 2^30 for 4-bit
 * codes), converted to float once and multiplied by the group scales of
 * its lanes. The biases are applied per row at the end from group sums of
 * the float activations: sum_j (q_j s + b) x_j = s sum q_j x_j + b sum x_j.
 *
 * Layout: a block is 64 bytes of a row (64*C codes, C = 8/bits codes per
 * byte). Code k of every byte is vector k; lane j (bytes 4j..4j+3) holds
 * columns 4jC .. 4jC+4C-1 of the block. The digits are stored to match:
 * xq[((b*3 + p)*C + k)*64 + n] = digit p of column b*64C + n*C + k. */
#include "fm_cpu.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#include <math.h>
#include <string.h>

#define FM_INLINE static inline __attribute__((always_inline))
#ifndef PF_HINT
#define PF_HINT _MM_HINT_T1
#endif
#ifndef PF_AHEAD
#define PF_AHEAD 8192
#endif

int fm_int8_supported(int bits) { return bits == 2 || bits == 4; }

/* Balanced base-256 digits of V (|V| <= 127 * 2^16): V = a1*2^16 + a2*2^8 + a3. */
FM_INLINE void digits(__m512i v, __m512i *a1, __m512i *a2, __m512i *a3) {
    const __m512i h = _mm512_set1_epi32(128), m = _mm512_set1_epi32(255);
    *a3 = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(v, h), m), h);
    v = _mm512_srai_epi32(_mm512_sub_epi32(v, *a3), 8);
    *a2 = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(v, h), m), h);
    *a1 = _mm512_srai_epi32(_mm512_sub_epi32(v, *a2), 8);
}

/* 16 floats of every C-th column: x[c0 + n*C + k] for n < 16 (zero past `cols`). */
FM_INLINE void load_strided(const float *x, int64_t c0, int64_t cols, int C, __m512 *out /* [C] */) {
    __m512 v[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int i = 0; i < C; i++) {
        int64_t left = cols - c0 - 16 * i;
        __mmask16 m = left >= 16 ? 0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
        v[i] = _mm512_maskz_loadu_ps(m, x + c0 + 16 * i);
    }
    const __m512i ev = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i od = _mm512_add_epi32(ev, _mm512_set1_epi32(1));
    if (C == 2) {
        out[0] = _mm512_permutex2var_ps(v[0], ev, v[1]);
        out[1] = _mm512_permutex2var_ps(v[0], od, v[1]);
    } else { /* C == 4: columns 4n+k; split even/odd twice */
        __m512 e0 = _mm512_permutex2var_ps(v[0], ev, v[1]), o0 = _mm512_permutex2var_ps(v[0], od, v[1]);
        __m512 e1 = _mm512_permutex2var_ps(v[2], ev, v[3]), o1 = _mm512_permutex2var_ps(v[2], od, v[3]);
        out[0] = _mm512_permutex2var_ps(e0, ev, e1);
        out[2] = _mm512_permutex2var_ps(e0, od, e1);
        out[1] = _mm512_permutex2var_ps(o0, ev, o1);
        out[3] = _mm512_permutex2var_ps(o0, od, o1);
    }
}

/* Token t's activations x into slot t: digits, their unit, and group sums at every group size. */
void fm_xprep_fill_int8(fm_xprep *p, int64_t t, const float *x) {
    const int C = p->P / 4;
    const int64_t cols = p->cols, nb = p->nb;
    int8_t *xq = p->xq + t * nb * 3 * C * 64;
    __m512 mx = _mm512_setzero_ps();
    for (int64_t c = 0; c < cols; c += 16) {
        __mmask16 m = cols - c >= 16 ? 0xFFFF : (__mmask16)((1u << (cols - c)) - 1);
        mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_maskz_loadu_ps(m, x + c)));
    }
    const float amax = _mm512_reduce_max_ps(mx);
    /* V = round(x * 127 * 2^16 / max): |V| <= 127 * 2^16 < 2^23, so the float product is
     * within half a unit and V within one unit (d / 2^16) of the exact value. */
    const double d = amax > 0.f ? (double)amax / 127.0 : 1.0;
    const __m512 k = _mm512_set1_ps((float)(65536.0 / d));
    for (int64_t b = 0; b < nb; b++)
        for (int j = 0; j < 4; j++) { /* 16 bytes of each code vector */
            __m512 xs[4];
            load_strided(x, b * 64 * C + j * 16 * C, cols, C, xs);
            for (int kk = 0; kk < C; kk++) {
                __m512i a1, a2, a3;
                digits(_mm512_cvtps_epi32(_mm512_mul_ps(xs[kk], k)), &a1, &a2, &a3);
                int8_t *dst = xq + b * 3 * C * 64 + kk * 64 + j * 16;
                _mm_storeu_si128((__m128i *)dst, _mm512_cvtepi32_epi8(a1));
                _mm_storeu_si128((__m128i *)(dst + C * 64), _mm512_cvtepi32_epi8(a2));
                _mm_storeu_si128((__m128i *)(dst + 2 * C * 64), _mm512_cvtepi32_epi8(a3));
            }
        }
    p->xd[t] = (float)(d / 65536.0);
    /* Group sums for groups of 32, 64 and 128 columns (whichever the matrices use). */
    float *s32 = p->xs + t * p->xs_stride, *s64 = s32 + cols / 32 + 1, *s128 = s64 + cols / 64 + 1;
    for (int64_t j = 0; j < cols / 32; j++)
        s32[j] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_loadu_ps(x + 32 * j), _mm512_loadu_ps(x + 32 * j + 16)));
    for (int64_t j = 0; j < cols / 64; j++) s64[j] = s32[2 * j] + s32[2 * j + 1];
    for (int64_t j = 0; j < cols / 128; j++) s128[j] = s64[2 * j] + s64[2 * j + 1];
}

static const float *group_sums(const fm_xprep *p, int64_t t, int group) {
    const float *xs = p->xs + t * p->xs_stride;
    for (int g = 32; g < group; g *= 2) xs += p->cols / g + 1;
    return xs;
}

/* The scales of groups first..first+count-1 placed on the lanes of their codes. */
FM_INLINE __m512 lane_scales(const void *p, int64_t first, __mmask16 m, int type, __m512i gidx, __m512i gidx16) {
    if (type == FM_F32) return _mm512_permutexvar_ps(gidx, _mm512_maskz_loadu_ps(m, (const float *)p + first));
    __m512i h = _mm512_zextsi256_si512(_mm256_maskz_loadu_epi16(m, (const uint16_t *)p + first));
    if (type == FM_BF16) return _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, gidx16, h));
    return _mm512_permutexvar_ps(gidx, _mm512_cvtph_ps(_mm512_castsi512_si256(h)));
}

/* acc + sum_g biases[g] * xs[g] over one row's n groups, lane-wise (reduced by the caller). */
FM_INLINE __m512 bias_dot(__m512 acc, const void *biases, int64_t first, int64_t n, int type, const float *xs) {
    for (int64_t g = 0; g < n; g += 16) {
        __mmask16 m = n - g >= 16 ? 0xFFFF : (__mmask16)((1u << (n - g)) - 1);
        __m512 b;
        if (type == FM_F32) b = _mm512_maskz_loadu_ps(m, (const float *)biases + first + g);
        else {
            __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)biases + first + g);
            b = type == FM_BF16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
                                : _mm512_cvtph_ps(h);
        }
        acc = _mm512_fmadd_ps(b, _mm512_maskz_loadu_ps(m, xs + g), acc);
    }
    return acc;
}

/* Software prefetches that miss the TLB are dropped: on 4 KiB pages every page would
 * start with demand misses (one core, 4-bit rows of 4096: 11-15 GB/s on 4 KiB pages,
 * 18-19 on 2 MiB pages). PREFETCHW does walk the page table (a load would too, but
 * stall retirement for a whole memory latency): one per 4 KiB, WALK_AHEAD bytes ahead,
 * puts the translation in the TLB before the prefetches reach the page (measured:
 * 15 -> 20 GB/s at 4096 in-features, 11 -> 15 at 1024). For the scales and biases,
 * one per row at the rows their prefetches reach. */
#ifndef WALK_AHEAD
#define WALK_AHEAD 16384
#endif
FM_INLINE void walk_ahead(const uint8_t *w, const char *scales, const char *biases) {
    __builtin_prefetch(w + WALK_AHEAD, 1, 3);
    __builtin_prefetch(scales + WALK_AHEAD / 8, 1, 3);
    __builtin_prefetch(biases + WALK_AHEAD / 8, 1, 3);
}

/* One block of one row against one token's digits: the exact integer dot product of the
 * block's lanes, as floats. */
FM_INLINE __m512 block_dot(__m512i W, const int8_t *xb, int bits) {
    const int C = 8 / bits;
    const __m512i cmask = _mm512_set1_epi8((char)((1 << bits) - 1));
    __m512i q[4];
    for (int k = 0; k < C; k++) q[k] = _mm512_and_si512(k ? _mm512_srli_epi16(W, bits * k) : W, cmask);
    __m512i acc = _mm512_setzero_si512();
    for (int p = 0; p < 3; p++) {
        if (p) acc = _mm512_slli_epi32(acc, 8);
        for (int k = 0; k < C; k++) acc = _mm512_dpbusd_epi32(acc, q[k], _mm512_load_si512(xb + (p * C + k) * 64));
    }
    return _mm512_cvtepi32_ps(acc);
}

/* Row r against NT tokens (slots t0..t0+NT-1): each decoded block serves every token.
 * (Two rows sharing each activation load, as the float path does for long rows, were
 * slower here: 19 against 21 GB/s from L2, one core, 4096 in-features.) */
FM_INLINE void row_dot(const fm_qmat *m, int64_t r, const fm_xprep *xp, int64_t t0, int NT, int bits, int group,
                       int st, float *res /* [NT] */) {
    const int C = 8 / bits;
    const int64_t cols = m->cols, ngroups = cols / group, BE = 64 * C, nb = xp->nb;
    const int gpb = (int)(BE / group); /* BE >= 128 >= group */
    const int64_t row_bytes = cols * bits / 8, xq_stride = nb * 3 * C * 64;
    const uint8_t *w = (const uint8_t *)m->w + r * row_bytes;
    const int ssize = st == FM_F32 ? 4 : 2;
    /* Scales and biases as far ahead as the codes (rows of 1024 4-bit codes carry half
     * as many bytes again of float32 scales and biases: streams as important as theirs). */
    const int64_t s_ahead = (r + (PF_AHEAD + row_bytes - 1) / row_bytes) * ngroups * ssize;
    for (int64_t o = 0; o < ngroups * ssize; o += 64) {
        _mm_prefetch((const char *)m->scales + s_ahead + o, PF_HINT);
        _mm_prefetch((const char *)m->biases + s_ahead + o, PF_HINT);
    }
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i gidx = _mm512_srli_epi32(_mm512_mullo_epi32(lane, _mm512_set1_epi32(4 * C)), __builtin_ctz(group));
    const __m512i gidx16 = _mm512_slli_epi32(gidx, 16);
    const __mmask16 smask = (__mmask16)((1u << gpb) - 1);
    const int8_t *xq = xp->xq + t0 * xq_stride;
    const float *scales = (const float *)m->scales; /* (typed by st in lane_scales) */
    __m512 tot[4];
    for (int t = 0; t < NT; t++) tot[t] = _mm512_setzero_ps();
    const int64_t full = row_bytes / 64;
    walk_ahead(w, (const char *)m->scales + s_ahead, (const char *)m->biases + s_ahead);
    for (int64_t b = 0; b < full; b++) {
        if (b && (b & 63) == 0) __builtin_prefetch(w + b * 64 + WALK_AHEAD, 1, 3);
        _mm_prefetch((const char *)w + b * 64 + PF_AHEAD, PF_HINT);
        const __m512i W = _mm512_loadu_si512(w + b * 64);
        const __m512 sv = lane_scales(scales, r * ngroups + b * gpb, smask, st, gidx, gidx16);
        for (int t = 0; t < NT; t++)
            tot[t] = _mm512_fmadd_ps(block_dot(W, xq + t * xq_stride + b * 3 * C * 64, bits), sv, tot[t]);
    }
    if (full < nb) { /* a last, partial block */
        const int64_t b = full, left = row_bytes - b * 64, first = b * BE / group;
        const int count = ngroups - first < gpb ? (int)(ngroups - first) : gpb;
        const __m512i W = _mm512_maskz_loadu_epi32((__mmask16)((1u << (left / 4)) - 1), w + b * 64);
        const __m512 sv = lane_scales(scales, r * ngroups + first, (__mmask16)((1u << count) - 1), st, gidx, gidx16);
        for (int t = 0; t < NT; t++)
            tot[t] = _mm512_fmadd_ps(block_dot(W, xq + t * xq_stride + b * 3 * C * 64, bits), sv, tot[t]);
    }
    for (int t = 0; t < NT; t++) { /* one reduction for the codes' part and the biases' */
        __m512 v = _mm512_mul_ps(tot[t], _mm512_set1_ps(xp->xd[t0 + t]));
        v = bias_dot(v, m->biases, r * ngroups, ngroups, st, group_sums(xp, t0 + t, group));
        res[t] = _mm512_reduce_add_ps(v);
    }
}

FM_INLINE void rows_typed(const fm_rows_args *a, int64_t r0, int64_t r1, int bits, int group, int st) {
    float res[4];
    for (int64_t t0 = 0; t0 < a->T; t0 += 4) {
        int NT = a->T - t0 < 4 ? (int)(a->T - t0) : 4;
        for (int64_t r = r0; r < r1; r++) {
            switch (NT) { /* constant counts keep the accumulators in registers */
            case 1: row_dot(a->m, r, a->xp, a->slot0 + t0, 1, bits, group, st, res); break;
            case 2: row_dot(a->m, r, a->xp, a->slot0 + t0, 2, bits, group, st, res); break;
            case 3: row_dot(a->m, r, a->xp, a->slot0 + t0, 3, bits, group, st, res); break;
            default: row_dot(a->m, r, a->xp, a->slot0 + t0, 4, bits, group, st, res); break;
            }
            for (int t = 0; t < NT; t++) {
                float v = a->coef ? res[t] * a->coef[t0 + t] : res[t];
                float *o = a->out[t0 + t] + r;
                *o = a->accumulate ? *o + v : v;
            }
        }
    }
}

FM_INLINE void rows_bits(const fm_rows_args *a, int64_t r0, int64_t r1, int bits, int group) {
    switch (a->m->scale_type) { /* one specialisation per scale type, bits and group */
    case FM_F32: rows_typed(a, r0, r1, bits, group, FM_F32); break;
    case FM_BF16: rows_typed(a, r0, r1, bits, group, FM_BF16); break;
    default: rows_typed(a, r0, r1, bits, group, FM_F16); break;
    }
}

#define FM_GROUPS(bits)                                                 \
    switch (a->m->group) {                                              \
    case 32: rows_bits(a, r0, r1, bits, 32); break;                     \
    case 64: rows_bits(a, r0, r1, bits, 64); break;                     \
    default: rows_bits(a, r0, r1, bits, 128); break;                    \
    }

void fm_rows_int8(const fm_rows_args *a, int64_t r0, int64_t r1) {
    if (a->m->bits == 2) { FM_GROUPS(2); }
    else { FM_GROUPS(4); }
}

#else
int fm_int8_supported(int bits) { (void)bits; return 0; }
void fm_xprep_fill_int8(fm_xprep *p, int64_t t, const float *x) { (void)p; (void)t; (void)x; }
void fm_rows_int8(const fm_rows_args *a, int64_t r0, int64_t r1) { (void)a; (void)r0; (void)r1; }
#endif
