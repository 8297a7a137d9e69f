/* The small ops of a decode step, on the calling thread: RMSNorm (with the
 * residual add before it) and the router's top-k. Each is a few microseconds
 * of arithmetic; in numpy each was several calls, ~20 us apart from the cache
 * misses of a step whose weights have just flushed the caches (measured in
 * decode at 397B shapes: add_rms_norm 70-80 us, moe_route 70 us, rms_norm
 * 40 us per layer). */
#include "fm_cpu.h"

#include <math.h>
#include <stddef.h>

/* Per row of x [rows, cols]: h = x + y (y may be NULL: h = x; h may be NULL when y is),
 * n = h / sqrt(mean(h^2) + eps) * w. The sum of squares in double. */
int fm_rms_norm(const float *x, const float *y, const float *w, int64_t rows, int64_t cols, float eps, float *h,
                float *n) {
    if (rows <= 0 || cols <= 0) return rows < 0 || cols < 0 ? -1 : 0;
    if (y && !h) return -1;
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * cols, *yr = y ? y + r * cols : NULL;
        float *hr = y ? h + r * cols : NULL, *nr = n + r * cols;
        const float *src = xr;
        if (yr) {
            for (int64_t i = 0; i < cols; i++) hr[i] = xr[i] + yr[i];
            src = hr;
        }
        double ss = 0.0;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < cols; i++) ss += (double)src[i] * src[i];
        const float s = (float)(1.0 / sqrt(ss / (double)cols + (double)eps));
        for (int64_t i = 0; i < cols; i++) nr[i] = src[i] * s * w[i];
    }
    return 0;
}

/* Router logits [E] -> the k largest (ids in descending order of logit, the lower id first
 * among equals) and their softmax probabilities, renormalised over the k if norm. */
int fm_route(const float *logits, int E, int k, int norm, int32_t *ids, float *weights) {
    if (k <= 0 || k > E || k > 64) return -1;
    int n = 0;
    for (int e = 0; e < E; e++) { /* insertion into the sorted top k */
        const float v = logits[e];
        if (v != v) return -1; /* NaN */
        if (n == k && v <= logits[ids[k - 1]]) continue;
        int j = n < k ? n++ : k - 1;
        while (j > 0 && logits[ids[j - 1]] < v) {
            ids[j] = ids[j - 1];
            j--;
        }
        ids[j] = e;
    }
    const float top = logits[ids[0]];
    float denom = 0.f;
    if (norm) {
        for (int i = 0; i < k; i++) denom += expf(logits[ids[i]] - top);
    } else {
        double s = 0.0;
        for (int e = 0; e < E; e++) s += expf(logits[e] - top);
        denom = (float)s;
    }
    for (int i = 0; i < k; i++) weights[i] = expf(logits[ids[i]] - top) / denom;
    return 0;
}
