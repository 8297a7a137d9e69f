/* llm-flashmoe CPU kernels: shared declarations.
 *
 * Quantized matrices are MLX affine format: row r of a [rows, cols] matrix
 * is a little-endian bit stream, element c at bit c*bits; scales and biases
 * are [rows, cols/group] (float32, bfloat16 or float16); value = q*scale+bias.
 * Activations and outputs are float32. */
#ifndef FM_CPU_H
#define FM_CPU_H

#include <stdint.h>

enum { FM_F32 = 0, FM_BF16 = 1, FM_F16 = 2 };

typedef struct {
    const void *w;      /* packed codes, rows * cols*bits/8 bytes */
    const void *scales; /* rows * cols/group */
    const void *biases;
    int64_t rows, cols;
    int32_t bits, group;
    int32_t scale_type; /* FM_F32 / FM_BF16 / FM_F16, scales and biases alike */
    int32_t pad;
} fm_qmat;

typedef void (*fm_task_fn)(void *ctx, long task);

/* pages.c */
int64_t fm_huge_remap(void *p, int64_t len);

/* pool.c */
int fm_set_threads(int n, long spin_us); /* spin_us < 0: default */
int fm_threads(void);
void fm_parallel(fm_task_fn fn, void *ctx, long n_tasks);


/* qmatmul.c, internal: activations rearranged for one code width, as floats
 * (xp, xl: see qmatmul.c) or, for 2- and 4-bit codes on AVX512-VNNI, as
 * integer digits (xq, xd, xs: see qdot_int8.c). */
typedef struct {
    int P;        /* codes per packing unit (32-bit lane) */
    float xscale; /* float layout: activations are stored times this (a power of two) */
    int64_t cols; /* in features */
    int64_t nb;   /* blocks of 16 units */
    float *xp;    /* [slots][nb*P*16] */
    float *xl;    /* [slots][nb*16] */
    int8_t *xq;   /* [slots][nb][3 digits][P/4 codes per byte][64] */
    float *xd;    /* [slots]: the digits' unit */
    float *xs;    /* [slots][xs_stride]: group sums for groups of 32, 64, 128 */
    int64_t xs_stride;
} fm_xprep;

int fm_supported(int bits, int group);
int fm_xprep_alloc(fm_xprep *p, int bits, int64_t cols, int64_t slots);
void fm_xprep_fill(fm_xprep *p, int64_t slot, const float *x);
void fm_xprep_free(fm_xprep *p);

/* Rows [r0, r1) of m for the T activation slots slot0..slot0+T-1 of xp:
 * out[t][r] = (coef ? coef[t] : 1) * (W x_t)[r], added to out if accumulate. */
typedef struct {
    const fm_qmat *m;
    const fm_xprep *xp;
    int64_t slot0, T;
    float *const *out;
    const float *coef;
    int accumulate;
} fm_rows_args;

void fm_rows(const fm_rows_args *a, int64_t r0, int64_t r1);

/* qdot_int8.c: the integer path (AVX512-VNNI builds only; elsewhere unsupported). */
int fm_int8_supported(int bits);
void fm_xprep_fill_int8(fm_xprep *p, int64_t slot, const float *x);
void fm_rows_int8(const fm_rows_args *a, int64_t r0, int64_t r1);
int64_t fm_rows_per_task(int64_t rows, int64_t cols, int bits, int64_t total_rows);

#endif
