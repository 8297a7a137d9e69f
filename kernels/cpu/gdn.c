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

static void head_task(void *vc, long h) {
    const gdn_ctx *c = vc;
    const int Dk = c->Dk, Dv = c->Dv, kh = (int)(h / (c->Hv / c->Hk));
    const float *q = c->q + (int64_t)kh * Dk, *k = c->k + (int64_t)kh * Dk, *v = c->v + h * Dv;
    const float decay = c->decay[h], beta = c->beta[h];
    float *o = c->out + h * Dv;
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
