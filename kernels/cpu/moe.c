/* The routed-expert part of a MoE block, for T tokens:
 *
 *   y[t] (+)= sum over (expert e, token t) pairs of  coef * down_e(silu(gate_e x_t) * up_e x_t)
 *
 * Pairs are grouped by expert (offsets, CSR style), so each expert's
 * weights are decoded once for all its tokens. Two parallel phases:
 * gate/up rows of all experts (each task also applies SwiGLU to its rows),
 * then down rows, where a task owns a range of output rows across all
 * experts so that no two threads add into the same element. The expert
 * weights are read where they lie: resident MLX arrays or the expert
 * store's read buffers. A shared expert is one more "expert" whose
 * coefficient is its sigmoid gate. */
#include "fm_cpu.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int n_exp;
    const fm_qmat *gate, *up, *down;
    const int32_t *offsets; /* [n_exp+1] */
    const float *coef;      /* [pairs] */
    fm_xprep *px, *pu, *ph; /* per expert: x for gate, x for up (may alias px), hidden for down */
    float *g, *u;           /* [pairs, I_max] */
    int64_t I_max;
    float **gptr, **uptr, **yptr; /* per pair */
    int64_t *task_e, *task_r0, *task_r1;
} moe_ctx;

static void gate_up_task(void *vc, long i) {
    moe_ctx *c = vc;
    int e = (int)c->task_e[i];
    int64_t r0 = c->task_r0[i], r1 = c->task_r1[i], p0 = c->offsets[e], n = c->offsets[e + 1] - p0;
    fm_rows_args a = {&c->gate[e], &c->px[e], 0, n, c->gptr + p0, NULL, 0};
    fm_rows(&a, r0, r1);
    fm_rows_args b = {&c->up[e], &c->pu[e], 0, n, c->uptr + p0, NULL, 0};
    fm_rows(&b, r0, r1);
    for (int64_t p = p0; p < p0 + n; p++) {
        float *g = c->gptr[p], *u = c->uptr[p];
        for (int64_t r = r0; r < r1; r++) g[r] = g[r] / (1.f + expf(-g[r])) * u[r]; /* silu(g)*u */
    }
}

static void down_task(void *vc, long i) {
    moe_ctx *c = vc;
    int64_t r0 = c->task_r0[i], r1 = c->task_r1[i];
    for (int e = 0; e < c->n_exp; e++) {
        int64_t p0 = c->offsets[e], n = c->offsets[e + 1] - p0;
        if (n == 0) continue;
        fm_rows_args a = {&c->down[e], &c->ph[e], 0, n, c->yptr + p0, c->coef + p0, 1};
        fm_rows(&a, r0, r1);
    }
}

int fm_moe(int n_exp, const fm_qmat *gate, const fm_qmat *up, const fm_qmat *down, const int32_t *offsets,
           const int32_t *tok, const float *coef, const float *x, int64_t T, float *y, int accumulate) {
    if (n_exp <= 0) return 0;
    const int64_t H = gate[0].cols, pairs = offsets[n_exp];
    int64_t I_max = 0, total_rows = 0;
    for (int e = 0; e < n_exp; e++) {
        const fm_qmat *g = &gate[e], *u = &up[e], *d = &down[e];
        if (g->cols != H || u->cols != H || d->rows != H || u->rows != g->rows || d->cols != g->rows) return -1;
        if (!fm_supported(g->bits, g->group) || !fm_supported(u->bits, u->group) ||
            !fm_supported(d->bits, d->group) || H % g->group || H % u->group || d->cols % d->group)
            return -1;
        if (g->rows > I_max) I_max = g->rows;
        if (offsets[e + 1] > offsets[e]) total_rows += g->rows;
    }
    for (int64_t p = 0; p < pairs; p++)
        if (tok[p] < 0 || tok[p] >= T) return -1;
    if (!accumulate) memset(y, 0, sizeof(float) * T * H);
    if (pairs == 0) return 0;

    int rc = 0;
    moe_ctx c = {.n_exp = n_exp, .gate = gate, .up = up, .down = down, .offsets = offsets, .coef = coef,
                 .I_max = I_max};
    c.px = calloc(3 * n_exp, sizeof(fm_xprep));
    c.g = malloc(sizeof(float) * 2 * pairs * I_max);
    c.gptr = malloc(sizeof(float *) * 3 * pairs);
    int64_t max_tasks = 0;
    for (int e = 0; e < n_exp; e++) max_tasks += gate[e].rows; /* one row per task at most */
    if (H > max_tasks) max_tasks = H;
    c.task_e = malloc(sizeof(int64_t) * 3 * max_tasks);
    if (!c.px || !c.g || !c.gptr || !c.task_e) { rc = -2; goto done; }
    c.pu = c.px + n_exp;
    c.ph = c.pu + n_exp;
    c.u = c.g + pairs * I_max;
    c.uptr = c.gptr + pairs;
    c.yptr = c.uptr + pairs;
    c.task_r0 = c.task_e + max_tasks;
    c.task_r1 = c.task_r0 + max_tasks;

    for (int64_t p = 0; p < pairs; p++) {
        c.gptr[p] = c.g + p * I_max;
        c.uptr[p] = c.u + p * I_max;
        c.yptr[p] = y + (int64_t)tok[p] * H;
    }
    /* Phase 1: gate and up. */
    long n_tasks = 0;
    for (int e = 0; e < n_exp; e++) {
        int64_t p0 = offsets[e], n = offsets[e + 1] - p0;
        if (n == 0) continue;
        if (!fm_xprep_alloc(&c.px[e], gate[e].bits, H, n)) { rc = -2; goto done; }
        for (int64_t p = 0; p < n; p++) fm_xprep_fill(&c.px[e], p, x + (int64_t)tok[p0 + p] * H);
        if (up[e].bits == gate[e].bits) {
            c.pu[e] = c.px[e];
        } else {
            if (!fm_xprep_alloc(&c.pu[e], up[e].bits, H, n)) { rc = -2; goto done; }
            for (int64_t p = 0; p < n; p++) fm_xprep_fill(&c.pu[e], p, x + (int64_t)tok[p0 + p] * H);
        }
        int64_t rows = gate[e].rows, per = fm_rows_per_task(rows, H, gate[e].bits + up[e].bits, total_rows);
        for (int64_t r = 0; r < rows; r += per, n_tasks++) {
            c.task_e[n_tasks] = e;
            c.task_r0[n_tasks] = r;
            c.task_r1[n_tasks] = r + per < rows ? r + per : rows;
        }
    }
    fm_parallel(gate_up_task, &c, n_tasks);

    /* Phase 2: down, accumulated into y by output rows. */
    int max_down_bits = 0;
    for (int e = 0; e < n_exp; e++) {
        int64_t p0 = offsets[e], n = offsets[e + 1] - p0;
        if (n == 0) continue;
        if (!fm_xprep_alloc(&c.ph[e], down[e].bits, down[e].cols, n)) { rc = -2; goto done; }
        for (int64_t p = 0; p < n; p++) fm_xprep_fill(&c.ph[e], p, c.gptr[p0 + p]);
        if (down[e].bits > max_down_bits) max_down_bits = down[e].bits;
    }
    int64_t per = fm_rows_per_task(H, I_max * n_exp, max_down_bits, H);
    n_tasks = 0;
    for (int64_t r = 0; r < H; r += per, n_tasks++) {
        c.task_r0[n_tasks] = r;
        c.task_r1[n_tasks] = r + per < H ? r + per : H;
    }
    fm_parallel(down_task, &c, n_tasks);

done:
    if (c.px) {
        for (int e = 0; e < n_exp; e++) {
            if (c.pu[e].xp != c.px[e].xp) fm_xprep_free(&c.pu[e]);
            fm_xprep_free(&c.px[e]);
            fm_xprep_free(&c.ph[e]);
        }
    }
    free(c.px);
    free(c.g);
    free(c.gptr);
    free(c.task_e);
    return rc;
}
