/* Affine-quantized matrix times float32 activations: y[t] = W x[t].
 *
 * The activations are rearranged once per call so that the weights need
 * no shuffles: a vector lane holds one packing unit of a row (a 32-bit
 * word of 2-, 4- or 8-bit codes, or 3 bytes of 3-bit codes: P codes), a
 * block is 16 lanes (16*P columns), and code s of every lane is taken with
 * one shift and one mask. xp[(b*P + s)*16 + i] = x[b*16*P + i*P + s]
 * matches that order. Scales and biases are applied per lane after the
 * block's dot products: sum_j (q_j*s + b) x_j = s*sum q_j x_j + b*sum x_j,
 * with xl[b*16 + i] the lane sums of x.
 *
 * Rows are split into tasks over all threads. Up to 4 tokens share one
 * decode of the weights (prompt chunks); more tokens are tiled by 4. */
#include "fm_cpu.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define FM_AVX512 1
#include <immintrin.h>
#endif

#define FM_INLINE static inline __attribute__((always_inline))
#define TOK_TILE 4

/* Codes per packing unit and bytes per unit. */
static int codes_per_unit(int bits) { return bits == 3 ? 8 : 32 / bits; }

int fm_supported(int bits, int group) {
    return (bits == 2 || bits == 3 || bits == 4 || bits == 8) &&
           (group == 32 || group == 64 || group == 128);
}

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, f;
    if (exp == 0) {
        if (man == 0) f = sign;
        else { /* subnormal */
            float v = ldexpf((float)man, -24);
            memcpy(&f, &v, 4);
            f |= sign;
        }
    } else if (exp == 31) f = sign | 0x7f800000u | (man << 13);
    else f = sign | ((exp + 112) << 23) | (man << 13);
    float out;
    memcpy(&out, &f, 4);
    return out;
}

static inline float load_scale(const void *p, int64_t i, int type) {
    if (type == FM_F32) return ((const float *)p)[i];
    uint16_t h = ((const uint16_t *)p)[i];
    if (type == FM_BF16) {
        uint32_t f = (uint32_t)h << 16;
        float out;
        memcpy(&out, &f, 4);
        return out;
    }
    return half_to_float(h);
}

/* ---- activation layout ---- */

/* FLASHMOE_CPU_FLOAT=1: the float path for every width (for comparisons). */
static int getenv_flag_float(void) {
    static int v = -1;
    if (v < 0) {
        const char *e = getenv("FLASHMOE_CPU_FLOAT");
        v = e && *e && *e != '0';
    }
    return v;
}

static int64_t xp_stride(const fm_xprep *p) { return p->nb * p->P * 16; }
static int64_t xl_stride(const fm_xprep *p) { return p->nb * 16; }

int fm_xprep_alloc(fm_xprep *p, int bits, int64_t cols, int64_t T) {
    const int P = codes_per_unit(bits);
    memset(p, 0, sizeof *p);
    p->P = P;
    p->cols = cols;
    p->nb = (cols + 16 * P - 1) / (16 * P);
    if (fm_int8_supported(bits) && !getenv_flag_float()) {
        p->xs_stride = cols / 32 + cols / 64 + cols / 128 + 3;
        p->xq = aligned_alloc(64, (size_t)(T * p->nb * 3 * (P / 4) * 64 + 64));
        p->xd = malloc(sizeof(float) * T);
        p->xs = malloc(sizeof(float) * T * p->xs_stride);
        return p->xq && p->xd && p->xs;
    }
#ifdef FM_AVX512
    p->xscale = (float)(1 << bits); /* see row_dot: codes enter as 1 + q/2^bits */
#else
    p->xscale = 1.f;
#endif
    p->xp = aligned_alloc(64, (size_t)(T * xp_stride(p) * 4 + 64));
    p->xl = aligned_alloc(64, (size_t)(T * xl_stride(p) * 4 + 64));
    return p->xp && p->xl;
}

void fm_xprep_free(fm_xprep *p) {
    free(p->xp);
    free(p->xl);
    free(p->xq);
    free(p->xd);
    free(p->xs);
    p->xp = p->xl = p->xs = p->xd = NULL;
    p->xq = NULL;
}

/* Token t's activations x (cols floats) into slot t of the layout. */
void fm_xprep_fill(fm_xprep *p, int64_t t, const float *x) {
    if (p->xq) {
        fm_xprep_fill_int8(p, t, x);
        return;
    }
    const int P = p->P;
    float *xp = p->xp + t * xp_stride(p), *xl = p->xl + t * xl_stride(p);
    for (int64_t b = 0; b < p->nb; b++) {
        for (int i = 0; i < 16; i++) {
            float sum = 0.f;
            for (int s = 0; s < P; s++) {
                int64_t c = b * 16 * P + (int64_t)i * P + s;
                float v = c < p->cols ? x[c] : 0.f;
                xp[(b * P + s) * 16 + i] = v * p->xscale; /* a power of two: exact */
                sum += v;
            }
            xl[b * 16 + i] = sum;
        }
    }
}

/* ---- one row against up to TOK_TILE tokens ---- */

#ifdef FM_AVX512
/* The scales of groups first..first+count-1 placed on the lanes of their
 * codes (gidx: lane -> group within the block) as float32. */
FM_INLINE __m512 load_scales16(const void *p, int64_t first, int count, int type, __m512i gidx, __m512i gidx16) {
    __mmask16 m = (__mmask16)((1u << count) - 1);
    if (type == FM_F32) return _mm512_permutexvar_ps(gidx, _mm512_maskz_loadu_ps(m, (const float *)p + first));
    __m512i h = _mm512_zextsi256_si512(_mm256_maskz_loadu_epi16(m, (const uint16_t *)p + first));
    /* bfloat16 is the top half of a float32: one word shuffle into the high halves. */
    if (type == FM_BF16) return _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, gidx16, h));
    return _mm512_permutexvar_ps(gidx, _mm512_cvtph_ps(_mm512_castsi512_si256(h)));
}

FM_INLINE __m512i load_units(const uint8_t *w, int bits, int lanes) {
    if (bits != 3) {
        if (lanes == 16) return _mm512_loadu_si512(w);
        return _mm512_maskz_loadu_epi32((__mmask16)((1u << lanes) - 1), w);
    }
    /* 3-bit: lane i takes bytes 3i..3i+2; the top byte is never used by a code. */
    __m512i raw = _mm512_maskz_loadu_epi8((__mmask64)((1ull << (3 * lanes)) - 1), w);
#ifdef __AVX512VBMI__
    const __m512i idx = _mm512_set_epi8(
        0, 47, 46, 45, 0, 44, 43, 42, 0, 41, 40, 39, 0, 38, 37, 36, 0, 35, 34, 33, 0, 32, 31, 30,
        0, 29, 28, 27, 0, 26, 25, 24, 0, 23, 22, 21, 0, 20, 19, 18, 0, 17, 16, 15, 0, 14, 13, 12,
        0, 11, 10, 9, 0, 8, 7, 6, 0, 5, 4, 3, 0, 2, 1, 0);
    return _mm512_permutexvar_epi8(idx, raw);
#else
    uint8_t tmp[64];
    uint32_t u[16];
    _mm512_storeu_si512(tmp, raw);
    for (int i = 0; i < 16; i++) u[i] = tmp[3 * i] | (tmp[3 * i + 1] << 8) | ((uint32_t)tmp[3 * i + 2] << 16);
    return _mm512_loadu_si512(u);
#endif
}

/* Bytes ahead of the current block to prefetch, into L2. The loop does
 * enough work per cache line that out-of-order execution alone keeps too
 * few misses in flight (measured: ~4 GB/s per core without, on a 19
 * GB/s-per-core VM). Into L1 at 2 KiB the prefetches are limited by L1's
 * few miss buffers; into L2 at 8 KiB one core read 8-bit rows at 17.5
 * instead of 14 GB/s (qdot_int8.c: 4-bit, 18-19 instead of 11-13). */
#ifndef PF_AHEAD
#define PF_AHEAD 8192
#endif
#ifndef PF_HINT
#define PF_HINT _MM_HINT_T1
#endif
/* Prefetches that miss the TLB are dropped; a write-intent prefetch (PREFETCHW) walks the
 * page table: one per 4 KiB this far ahead keeps the prefetches working on 4 KiB pages
 * (see qdot_int8.c for the figures). */
#define WALK_AHEAD 16384
#define WALK_AT(p) __builtin_prefetch((const char *)(p), 1, 3)
#define WALK(p) WALK_AT((const char *)(p) + WALK_AHEAD)

/* A code q becomes the float 1 + q/2^bits by placing it in the top of the
 * mantissa of 1.0 (one shift, one bitwise op): no conversion instruction,
 * and the shift/shuffle ports, the bottleneck on AVX-512 machines that
 * split 512-bit ops (Zen 4), get one op per 16 codes instead of two or
 * three. The activations are pre-scaled by 2^bits, so a lane accumulates
 * acc = 2^bits * sum x + sum q x, and the lane sums of x take the 2^bits
 * back out exactly enough (one float op on values of like magnitude). */
FM_INLINE void row_dot(const fm_qmat *m, int64_t r, const fm_xprep *xp, int64_t t0, int NT, int bits,
                       int group, float *res) {
    const int P = bits == 3 ? 8 : 32 / bits, U = bits == 3 ? 3 : 4;
    const int64_t cols = m->cols, ngroups = cols / group, BE = 16 * P;
    const int gpb = BE >= group ? (int)(BE / group) : 1;
    const int64_t row_bytes = cols * bits / 8;
    const uint8_t *w = (const uint8_t *)m->w + r * row_bytes;
    const int64_t srow = r * ngroups;
    const int ssize = m->scale_type == FM_F32 ? 4 : 2;
    /* Scales and biases of a row a few rows ahead. */
    for (int64_t o = 0; o < ngroups * ssize; o += 64) {
        _mm_prefetch((const char *)m->scales + (srow + 4 * ngroups) * ssize + o, _MM_HINT_T0);
        _mm_prefetch((const char *)m->biases + (srow + 4 * ngroups) * ssize + o, _MM_HINT_T0);
    }
    const int top = 23 - bits; /* lowest mantissa bit of the code */
    const __m512i cmask = _mm512_set1_epi32(((1 << bits) - 1) << top);
    const __m512i one = _mm512_set1_epi32(0x3F800000);
    const __m512 two_b = _mm512_set1_ps((float)(1 << bits));
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i gidx = _mm512_srli_epi32(_mm512_mullo_epi32(lane, _mm512_set1_epi32(P)), __builtin_ctz(group));
    const __m512i gidx16 = _mm512_slli_epi32(gidx, 16); /* word 2i+1 of dword i = gidx[i] */
    const float *xpt[TOK_TILE], *xlt[TOK_TILE];
    __m512 tot[TOK_TILE];
    for (int t = 0; t < NT; t++) {
        xpt[t] = xp->xp + (t0 + t) * xp_stride(xp);
        xlt[t] = xp->xl + (t0 + t) * xl_stride(xp);
        tot[t] = _mm512_setzero_ps();
    }
    WALK(w);
    WALK_AT((const char *)m->scales + (srow + 4 * ngroups) * ssize + WALK_AHEAD / 8);
    WALK_AT((const char *)m->biases + (srow + 4 * ngroups) * ssize + WALK_AHEAD / 8);
    for (int64_t b = 0; b < xp->nb; b++) {
        int64_t left = cols - b * BE;
        int lanes = left >= BE ? 16 : (int)(left / P);
        if (b && ((b * 16 * U) & 4095) < 16 * U) WALK(w + b * 16 * U);
        _mm_prefetch((const char *)w + b * 16 * U + PF_AHEAD, PF_HINT);
        if (U == 3) _mm_prefetch((const char *)w + b * 16 * U + PF_AHEAD + 64, PF_HINT);
        __m512i L = load_units(w + b * 16 * U, bits, lanes);
        __m512 acc[TOK_TILE];
        for (int t = 0; t < NT; t++) acc[t] = _mm512_setzero_ps();
#pragma GCC unroll 16
        for (int s = 0; s < P; s++) {
            const int sh = top - bits * s;
            __m512i v = sh > 0 ? _mm512_slli_epi32(L, sh) : sh < 0 ? _mm512_srli_epi32(L, -sh) : L;
            __m512 q = _mm512_castsi512_ps(_mm512_ternarylogic_epi32(v, cmask, one, 0xEA)); /* (v&cmask)|one */
            for (int t = 0; t < NT; t++)
                acc[t] = _mm512_fmadd_ps(q, _mm512_load_ps(xpt[t] + (b * P + s) * 16), acc[t]);
        }
        int64_t first = (b * BE) / group;
        int count = ngroups - first < gpb ? (int)(ngroups - first) : gpb;
        __m512 sv = load_scales16(m->scales, srow + first, count, m->scale_type, gidx, gidx16);
        __m512 bv = load_scales16(m->biases, srow + first, count, m->scale_type, gidx, gidx16);
        for (int t = 0; t < NT; t++) {
            __m512 xl = _mm512_load_ps(xlt[t] + b * 16);
            __m512 qx = _mm512_fnmadd_ps(two_b, xl, acc[t]); /* sum q x */
            tot[t] = _mm512_fmadd_ps(qx, sv, tot[t]);
            tot[t] = _mm512_fmadd_ps(bv, xl, tot[t]);
        }
    }
    for (int t = 0; t < NT; t++) res[t] = _mm512_reduce_add_ps(tot[t]);
}

/* Decode (one token): R rows at once. Each activation load serves R rows and
 * the R accumulators are independent chains: one row alone is bound by the
 * latency of its chain of P fused multiply-adds per block and by loading
 * the activations (32 KiB for 8192 in-features: more than L1) once per row.
 * Measured on Zen 4 (2 cores, one busy): the 8192 -> 4096 projection 9.5 ->
 * 11.9 GB/s with R = 2 (R = 4: 10.0); 4096 in-features lost ~10%, so
 * those keep the one-row loop.
 * The rows are consecutive, so their codes are one region read in R
 * streams; each stream prefetches PF_AHEAD/R ahead, past its row's end
 * into the same row of the next R. */
#define ROWS_1TOK 2
FM_INLINE void rows_dot_1tok(const fm_qmat *m, int64_t r, const fm_xprep *xp, int64_t t0, int bits, int group,
                             float *res) {
    enum { R = ROWS_1TOK };
    const int P = bits == 3 ? 8 : 32 / bits, U = bits == 3 ? 3 : 4;
    const int64_t cols = m->cols, ngroups = cols / group, BE = 16 * P;
    const int gpb = BE >= group ? (int)(BE / group) : 1;
    const int64_t row_bytes = cols * bits / 8, pf = PF_AHEAD / R;
    const uint8_t *w0 = (const uint8_t *)m->w + r * row_bytes;
    const int ssize = m->scale_type == FM_F32 ? 4 : 2;
    for (int64_t o = 0; o < R * ngroups * ssize; o += 64) { /* the next R rows' scales and biases */
        _mm_prefetch((const char *)m->scales + (r + R) * ngroups * ssize + o, _MM_HINT_T0);
        _mm_prefetch((const char *)m->biases + (r + R) * ngroups * ssize + o, _MM_HINT_T0);
    }
    const int top = 23 - bits;
    const __m512i cmask = _mm512_set1_epi32(((1 << bits) - 1) << top);
    const __m512i one = _mm512_set1_epi32(0x3F800000);
    const __m512 two_b = _mm512_set1_ps((float)(1 << bits));
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i gidx = _mm512_srli_epi32(_mm512_mullo_epi32(lane, _mm512_set1_epi32(P)), __builtin_ctz(group));
    const __m512i gidx16 = _mm512_slli_epi32(gidx, 16);
    const float *xpt = xp->xp + t0 * xp_stride(xp), *xlt = xp->xl + t0 * xl_stride(xp);
    __m512 tot[R];
    for (int i = 0; i < R; i++) tot[i] = _mm512_setzero_ps();
    for (int i = 0; i < R; i++) WALK(w0 + i * row_bytes);
    for (int64_t b = 0; b < xp->nb; b++) {
        int64_t left = cols - b * BE;
        int lanes = left >= BE ? 16 : (int)(left / P);
        int64_t at = b * 16 * U, ahead = at + pf >= row_bytes ? at + pf + (R - 1) * row_bytes : at + pf;
        __m512i L[R];
        __m512 acc[R];
        for (int i = 0; i < R; i++) {
            if (b && (at & 4095) < 16 * U) WALK(w0 + i * row_bytes + at);
            _mm_prefetch((const char *)w0 + i * row_bytes + ahead, PF_HINT);
            if (U == 3) _mm_prefetch((const char *)w0 + i * row_bytes + ahead + 64, PF_HINT);
            L[i] = load_units(w0 + i * row_bytes + at, bits, lanes);
            acc[i] = _mm512_setzero_ps();
        }
#pragma GCC unroll 16
        for (int s = 0; s < P; s++) {
            const int sh = top - bits * s;
            const __m512 xv = _mm512_load_ps(xpt + (b * P + s) * 16);
            for (int i = 0; i < R; i++) {
                __m512i v = sh > 0 ? _mm512_slli_epi32(L[i], sh) : sh < 0 ? _mm512_srli_epi32(L[i], -sh) : L[i];
                __m512 q = _mm512_castsi512_ps(_mm512_ternarylogic_epi32(v, cmask, one, 0xEA));
                acc[i] = _mm512_fmadd_ps(q, xv, acc[i]);
            }
        }
        int64_t first = (b * BE) / group;
        int count = ngroups - first < gpb ? (int)(ngroups - first) : gpb;
        __m512 xl = _mm512_load_ps(xlt + b * 16);
        for (int i = 0; i < R; i++) {
            __m512 sv = load_scales16(m->scales, (r + i) * ngroups + first, count, m->scale_type, gidx, gidx16);
            __m512 bv = load_scales16(m->biases, (r + i) * ngroups + first, count, m->scale_type, gidx, gidx16);
            __m512 qx = _mm512_fnmadd_ps(two_b, xl, acc[i]);
            tot[i] = _mm512_fmadd_ps(qx, sv, tot[i]);
            tot[i] = _mm512_fmadd_ps(bv, xl, tot[i]);
        }
    }
    for (int i = 0; i < R; i++) res[i] = _mm512_reduce_add_ps(tot[i]);
}
#else
/* Portable path: the same layout in plain loops, left to the compiler's
 * vectoriser (NEON, AVX2). */
FM_INLINE void row_dot(const fm_qmat *m, int64_t r, const fm_xprep *xp, int64_t t0, int NT, int bits,
                       int group, float *res) {
    const int P = bits == 3 ? 8 : 32 / bits, U = bits == 3 ? 3 : 4;
    const int64_t cols = m->cols, ngroups = cols / group, BE = 16 * P;
    const uint8_t *w = (const uint8_t *)m->w + r * (cols * bits / 8);
    const int64_t srow = r * ngroups;
    const uint32_t mask = (1u << bits) - 1;
    float tot[TOK_TILE][16];
    memset(tot, 0, sizeof tot);
    for (int64_t b = 0; b < xp->nb; b++) {
        int64_t left = cols - b * BE;
        int lanes = left >= BE ? 16 : (int)(left / P);
        uint32_t L[16];
        for (int i = 0; i < 16; i++) {
            const uint8_t *u = w + (b * 16 + i) * U;
            L[i] = i >= lanes ? 0 : (U == 4 ? (uint32_t)u[0] | (uint32_t)u[1] << 8 | (uint32_t)u[2] << 16 | (uint32_t)u[3] << 24
                                         : (uint32_t)u[0] | (uint32_t)u[1] << 8 | (uint32_t)u[2] << 16);
        }
        float sv[16], bv[16];
        for (int i = 0; i < 16; i++) {
            int64_t g = ((b * 16 + i) * P) / group;
            if (g >= ngroups) g = ngroups - 1; /* lanes past the end carry zero activations */
            sv[i] = load_scale(m->scales, srow + g, m->scale_type);
            bv[i] = load_scale(m->biases, srow + g, m->scale_type);
        }
        for (int t = 0; t < NT; t++) {
            const float *xpt = xp->xp + (t0 + t) * xp_stride(xp) + b * P * 16;
            const float *xlt = xp->xl + (t0 + t) * xl_stride(xp) + b * 16;
            float acc[16] = {0};
            for (int s = 0; s < P; s++)
                for (int i = 0; i < 16; i++) acc[i] += (float)((L[i] >> (bits * s)) & mask) * xpt[s * 16 + i];
            for (int i = 0; i < 16; i++) tot[t][i] += acc[i] * sv[i] + bv[i] * xlt[i];
        }
    }
    for (int t = 0; t < NT; t++) {
        float s = 0.f;
        for (int i = 0; i < 16; i++) s += tot[t][i];
        res[t] = s;
    }
}
#endif

FM_INLINE void rows_bits(const fm_rows_args *a, int64_t r0, int64_t r1, int bits, int group) {
    float res[TOK_TILE];
    const int64_t s0 = a->slot0;
#ifdef FM_AVX512
    if (a->T == 1 && a->m->cols > 4096) { /* measured: no gain while a row's activations fit in L1 */
        float rr[ROWS_1TOK];
        for (; r0 + ROWS_1TOK <= r1; r0 += ROWS_1TOK) {
            rows_dot_1tok(a->m, r0, a->xp, s0, bits, group, rr);
            for (int i = 0; i < ROWS_1TOK; i++) {
                float v = a->coef ? rr[i] * a->coef[0] : rr[i];
                float *o = a->out[0] + r0 + i;
                *o = a->accumulate ? *o + v : v;
            }
        }
    }
#endif
    for (int64_t t0 = 0; t0 < a->T; t0 += TOK_TILE) {
        int NT = a->T - t0 < TOK_TILE ? (int)(a->T - t0) : TOK_TILE;
        for (int64_t r = r0; r < r1; r++) {
            switch (NT) { /* constant token counts let the compiler keep accumulators in registers */
            case 1: row_dot(a->m, r, a->xp, s0 + t0, 1, bits, group, res); break;
            case 2: row_dot(a->m, r, a->xp, s0 + t0, 2, bits, group, res); break;
            case 3: row_dot(a->m, r, a->xp, s0 + t0, 3, bits, group, res); break;
            default: row_dot(a->m, r, a->xp, s0 + t0, 4, bits, group, res); break;
            }
            for (int t = 0; t < NT; t++) {
                float v = a->coef ? res[t] * a->coef[t0 + t] : res[t];
                float *o = a->out[t0 + t] + r;
                *o = a->accumulate ? *o + v : v;
            }
        }
    }
}

/* One specialisation per (bits, group): shifts and group arithmetic become constants. */
#define FM_GROUPS(bits)                                                 \
    switch (a->m->group) {                                              \
    case 32: rows_bits(a, r0, r1, bits, 32); break;                     \
    case 64: rows_bits(a, r0, r1, bits, 64); break;                     \
    default: rows_bits(a, r0, r1, bits, 128); break;                    \
    }

void fm_rows(const fm_rows_args *a, int64_t r0, int64_t r1) {
    if (a->xp->xq) {
        fm_rows_int8(a, r0, r1);
        return;
    }
    switch (a->m->bits) {
    case 2: FM_GROUPS(2); break;
    case 3: FM_GROUPS(3); break;
    case 4: FM_GROUPS(4); break;
    default: FM_GROUPS(8); break;
    }
}

/* ---- fm_qmm: several matrices sharing one input ---- */

typedef struct {
    int n_mats;
    const fm_qmat *mats;
    fm_xprep *prep[9]; /* by bits */
    int64_t T;
    float *const *outs; /* per matrix: [T, rows] */
    int64_t *task_mat, *task_r0, *task_r1;
    float **rowptrs; /* per matrix: T pointers into outs */
} qmm_ctx;

static void qmm_task(void *vctx, long i) {
    qmm_ctx *c = vctx;
    int mi = (int)c->task_mat[i];
    fm_rows_args a = {&c->mats[mi], c->prep[c->mats[mi].bits], 0, c->T, c->rowptrs + mi * c->T, NULL, 0};
    fm_rows(&a, c->task_r0[i], c->task_r1[i]);
}

/* Rows per task: a few tasks per thread so that a late or slow thread is
 * balanced out, but at least ~32 KiB of codes per task, so that a small
 * matrix stays on the calling thread instead of paying for a wake-up. */
int64_t fm_rows_per_task(int64_t rows, int64_t cols, int bits, int64_t total_rows) {
    int64_t row_bytes = cols * bits / 8 + 1;
    int64_t fair = total_rows / ((int64_t)fm_threads() * 4);
    int64_t least = (32 * 1024 + row_bytes - 1) / row_bytes;
    int64_t n = fair < 4 * least ? fair : 4 * least; /* bounded tasks for big matrices */
    if (n < least) n = least;
    if (n < 1) n = 1;
    if (n > rows) n = rows;
    return n;
}

int fm_qmm(int n_mats, const fm_qmat *mats, const float *x, int64_t T, float *const *outs) {
    if (n_mats <= 0 || T <= 0) return 0;
    int64_t cols = mats[0].cols, total_rows = 0;
    for (int i = 0; i < n_mats; i++) {
        if (mats[i].cols != cols || !fm_supported(mats[i].bits, mats[i].group) || cols % mats[i].group) return -1;
        total_rows += mats[i].rows;
    }
    qmm_ctx c = {.n_mats = n_mats, .mats = mats, .T = T, .outs = outs};
    fm_xprep preps[9];
    memset(preps, 0, sizeof preps);
    int rc = 0;
    for (int i = 0; i < n_mats; i++) {
        int bits = mats[i].bits;
        if (!c.prep[bits]) {
            if (!fm_xprep_alloc(&preps[bits], bits, cols, T)) { rc = -2; goto done; }
            for (int64_t t = 0; t < T; t++) fm_xprep_fill(&preps[bits], t, x + t * cols);
            c.prep[bits] = &preps[bits];
        }
    }
    int64_t n_tasks = 0;
    for (int i = 0; i < n_mats; i++) {
        int64_t per = fm_rows_per_task(mats[i].rows, cols, mats[i].bits, total_rows);
        n_tasks += (mats[i].rows + per - 1) / per;
    }
    c.task_mat = malloc(sizeof(int64_t) * 3 * n_tasks);
    c.rowptrs = malloc(sizeof(float *) * n_mats * T);
    if (!c.task_mat || !c.rowptrs) { rc = -2; goto done; }
    c.task_r0 = c.task_mat + n_tasks;
    c.task_r1 = c.task_r0 + n_tasks;
    int64_t k = 0;
    for (int i = 0; i < n_mats; i++) {
        int64_t per = fm_rows_per_task(mats[i].rows, cols, mats[i].bits, total_rows);
        for (int64_t r = 0; r < mats[i].rows; r += per, k++) {
            c.task_mat[k] = i;
            c.task_r0[k] = r;
            c.task_r1[k] = r + per < mats[i].rows ? r + per : mats[i].rows;
        }
        for (int64_t t = 0; t < T; t++) c.rowptrs[i * T + t] = outs[i] + t * mats[i].rows;
    }
    fm_parallel(qmm_task, &c, n_tasks);
done:
    free(c.task_mat);
    free(c.rowptrs);
    for (int b = 0; b < 9; b++) fm_xprep_free(&preps[b]);
    return rc;
}
