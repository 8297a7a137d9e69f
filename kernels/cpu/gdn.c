/* One decode step of a GatedDeltaNet layer (SPEC section 2), after its input
 * projections and before out_proj, all float32:
 *
 *   causal conv (kernel Kc) over q|k|v, SiLU, split; q, k L2-normalised per
 *   head (q also scaled by Dk^-1/2); g = A * softplus(a + dt_bias),
 *   beta = sigmoid(b); per value head h (key head h / (Hv/Hk)) and per row i
 *   of its state S [Dv, Dk]:
 *       s = S[i] * exp(g);  d = (v[i] - s.k) * beta;  s += d k;  o[i] = s.q
 *   then o = rmsnorm(o) * norm_w * silu(z) per head.
 *
 * Rows of S are independent, so the state is read and written once (4 MiB
 * per layer at 397B), heads spread over threads. The new state goes to a
 * separate buffer: snapshots of the conversation keep the old one. */
#include "fm_cpu.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int Hk, Hv, Dk, Dv;
    float eps;
    const float *q, *k, *v, *z, *decay, *beta, *norm_w, *s_in;
    float *s_out, *out;
} gdn_ctx;

#if defined(__AVX512F__)
#include <immintrin.h>
/* Dk = 128: a row of the state stays in 8 registers from its load to its store, and the
 * new state streams past the caches (non-temporal stores: no read of the destination lines
 * for ownership, 8 instead of 12 MiB of traffic per 397B layer; the state is next read a
 * whole step later). Streaming stores need 64-byte aligned addresses and MLX's buffers are
 * only 8-byte aligned, so the head's state [Dv][128] is written as one stream of aligned
 * 64-byte chunks, each made of the tail of one register and the head of the next (a = floats
 * before the first boundary); the unaligned ends of the head (shared with the neighbouring
 * heads' lines) take masked ordinary stores. */
static void head_rows_128(const gdn_ctx *c, long h, const float *q, const float *k, const float *v,
                          float decay, float beta, float *o) {
    const int Dv = c->Dv;
    const __m512 dv = _mm512_set1_ps(decay);
    __m512 K[8], Q[8];
    for (int j = 0; j < 8; j++) {
        K[j] = _mm512_loadu_ps(k + 16 * j);
        Q[j] = _mm512_loadu_ps(q + 16 * j);
    }
    const float *si = c->s_in + (int64_t)h * Dv * 128;
    float *so = c->s_out + (int64_t)h * Dv * 128;
    const int a = (int)((64 - ((uintptr_t)so & 63)) & 63) / 4; /* so is float-aligned */
    const __m512i idx = _mm512_add_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                         _mm512_set1_epi32(a));
    __m512 prev = _mm512_setzero_ps(); /* the last register of the previous row */
    for (int i = 0; i < Dv; i++, si += 128) {
        float *p = so + (int64_t)i * 128;
        __m512 S[8], acc = _mm512_setzero_ps();
        for (int j = 0; j < 8; j++) {
            S[j] = _mm512_mul_ps(_mm512_loadu_ps(si + 16 * j), dv);
            acc = _mm512_fmadd_ps(S[j], K[j], acc);
        }
        const float d = (v[i] - _mm512_reduce_add_ps(acc)) * beta;
        const __m512 dd = _mm512_set1_ps(d);
        acc = _mm512_setzero_ps();
        for (int j = 0; j < 8; j++) {
            S[j] = _mm512_fmadd_ps(dd, K[j], S[j]);
            acc = _mm512_fmadd_ps(S[j], Q[j], acc);
        }
        o[i] = _mm512_reduce_add_ps(acc);
        if (a == 0) {
            for (int j = 0; j < 8; j++) _mm512_stream_ps(p + 16 * j, S[j]);
            continue;
        }
        if (i == 0) _mm512_mask_storeu_ps(p, (__mmask16)((1u << a) - 1), S[0]);
        else _mm512_stream_ps(p - 16 + a, _mm512_permutex2var_ps(prev, idx, S[0]));
        for (int j = 0; j < 7; j++) _mm512_stream_ps(p + 16 * j + a, _mm512_permutex2var_ps(S[j], idx, S[j + 1]));
        prev = S[7];
    }
    if (a) /* the head's last 16 - a floats */
        _mm512_mask_storeu_ps(so + (int64_t)Dv * 128 - 16 + a, (__mmask16)((1u << (16 - a)) - 1),
                              _mm512_permutex2var_ps(prev, idx, _mm512_setzero_ps()));
    _mm_sfence(); /* this thread's streamed stores, before its task counts as done */
}
#endif

static void head_task(void *vc, long h) {
    const gdn_ctx *c = vc;
    const int Dk = c->Dk, Dv = c->Dv, kh = (int)(h / (c->Hv / c->Hk));
    const float *q = c->q + (int64_t)kh * Dk, *k = c->k + (int64_t)kh * Dk, *v = c->v + h * Dv;
    const float decay = c->decay[h], beta = c->beta[h];
    float *o = c->out + h * Dv;
#if defined(__AVX512F__)
    if (Dk == 128 && ((uintptr_t)c->s_out & 3) == 0) head_rows_128(c, h, q, k, v, decay, beta, o);
    else
#endif
    for (int i = 0; i < Dv; i++) {
        const float *si = c->s_in + ((int64_t)h * Dv + i) * Dk;
        float *so = c->s_out + ((int64_t)h * Dv + i) * Dk;
        float sk = 0.f;
#pragma omp simd reduction(+ : sk)
        for (int j = 0; j < Dk; j++) {
            float s = si[j] * decay;
            so[j] = s;
            sk += s * k[j];
        }
        const float d = (v[i] - sk) * beta;
        float sq = 0.f;
#pragma omp simd reduction(+ : sq)
        for (int j = 0; j < Dk; j++) {
            float s = so[j] + d * k[j];
            so[j] = s;
            sq += s * q[j];
        }
        o[i] = sq;
    }
    /* Gated RMSNorm of this head's output. */
    float ss = 0.f;
    for (int i = 0; i < Dv; i++) ss += o[i] * o[i];
    const float r = 1.f / sqrtf(ss / Dv + c->eps);
    const float *z = c->z + h * Dv;
    for (int i = 0; i < Dv; i++) o[i] = o[i] * r * c->norm_w[i] * (z[i] / (1.f + expf(-z[i])));
}

static void l2_normalize(float *x, int n, float scale) {
    float ss = 0.f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    const float r = scale / sqrtf(ss + 1e-6f);
    for (int i = 0; i < n; i++) x[i] *= r;
}

static float softplus(float x) { return x > 20.f ? x : log1pf(expf(x)); }

/* conv_in [Kc-1, C] (NULL: zeros) -> conv_out [Kc-1, C]; s_in (NULL: zeros), s_out [Hv, Dv, Dk]. */
int fm_gdn_step(const float *qkv, const float *z, const float *b, const float *a, const float *conv_in,
                const float *conv_w, const float *A, const float *dt_bias, const float *norm_w, const float *s_in,
                int Hk, int Hv, int Dk, int Dv, int Kc, float eps, float *conv_out, float *s_out, float *out) {
    if (Hk <= 0 || Hv % Hk || Kc < 1) return -1;
    const int64_t C = 2 * (int64_t)Hk * Dk + (int64_t)Hv * Dv;
    float *y = malloc(sizeof(float) * (C + 2 * Hv));
    float *zeros = NULL;
    if (!y) return -2;
    if (!s_in) {
        zeros = calloc((size_t)Hv * Dv * Dk, sizeof(float));
        if (!zeros) { free(y); return -2; }
        s_in = zeros;
    }
    /* Causal depthwise conv over the last Kc inputs, then SiLU. */
    for (int64_t ch = 0; ch < C; ch++) {
        const float *w = conv_w + ch * Kc;
        float acc = qkv[ch] * w[Kc - 1];
        if (conv_in)
            for (int j = 0; j < Kc - 1; j++) acc += conv_in[j * C + ch] * w[j];
        y[ch] = acc / (1.f + expf(-acc));
    }
    if (Kc > 1) {
        if (conv_in) memmove(conv_out, conv_in + C, sizeof(float) * C * (Kc - 2));
        else memset(conv_out, 0, sizeof(float) * C * (Kc - 2));
        memcpy(conv_out + C * (Kc - 2), qkv, sizeof(float) * C);
    }
    float *q = y, *k = y + (int64_t)Hk * Dk, *v = y + 2 * (int64_t)Hk * Dk;
    for (int h = 0; h < Hk; h++) {
        l2_normalize(q + (int64_t)h * Dk, Dk, 1.f / sqrtf((float)Dk));
        l2_normalize(k + (int64_t)h * Dk, Dk, 1.f);
    }
    float *decay = y + C, *beta = decay + Hv;
    for (int h = 0; h < Hv; h++) {
        decay[h] = expf(A[h] * softplus(a[h] + dt_bias[h]));
        beta[h] = 1.f / (1.f + expf(-b[h]));
    }
    gdn_ctx c = {Hk, Hv, Dk, Dv, eps, q, k, v, z, decay, beta, norm_w, s_in, s_out, out};
    fm_parallel(head_task, &c, Hv);
    free(y);
    free(zeros);
    return 0;
}
