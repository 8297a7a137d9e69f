/* The routed-expert part of a MoE block, for T tokens:
 *
 *   y[t] (+)= sum over (expert e, token t) pairs of  coef * down_e(silu(gate_e x_t) * up_e x_t)
 *
 * Pairs are grouped by expert (offsets, CSR style), so each expert's
 * weights are decoded once for all its tokens. Two parallel phases:
 * gate/up rows of all experts (each task also applies SwiGLU to its rows),
 * then down rows, a task being (expert, range of rows) into the pairs' own
 * scratch rows; the task that completes a range adds it into the output in
 * pair order, so that no two threads add into the same element. The expert
 * weights are read where they lie: resident MLX arrays or the expert
 * store's read buffers. A shared expert is one more "expert" whose
 * coefficient is its sigmoid gate. */
#include "fm_cpu.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int n_exp;
    const fm_qmat *gate, *up, *down;
    const int32_t *offsets; /* [n_exp+1] */
    const float *coef;      /* [pairs] */
    fm_xprep *px, *pu, *ph; /* per expert: x for gate, x for up (may alias px), hidden for down */
    const fm_xprep **gx, **ux; /* per expert: where its tokens' x is laid out for gate and up, */
    int64_t *slot0;            /* from this slot: an expert of one token uses the shared layout
                                * of all tokens (slot = token), one of several its own (slot 0) */
    fm_xprep by_bits[9];       /* the shared layouts, per code width */
    float *u;               /* up results [pairs, h_stride] */
    float **gptr, **uptr, **yptr; /* per pair */
    int64_t *task_e, *task_r0, *task_r1;
    int64_t pairs, per;  /* down: pairs, and rows per range of output rows */
    atomic_int *left;    /* down: per range, the experts whose rows are still to come */
} moe_ctx;

static void gate_up_task(void *vc, long i) {
    moe_ctx *c = vc;
    int e = (int)c->task_e[i];
    int64_t r0 = c->task_r0[i], r1 = c->task_r1[i], p0 = c->offsets[e], n = c->offsets[e + 1] - p0;
    fm_rows_args a = {&c->gate[e], c->gx[e], c->slot0[e], n, c->gptr + p0, NULL, 0};
    fm_rows(&a, r0, r1);
    fm_rows_args b = {&c->up[e], c->ux[e], c->slot0[e], n, c->uptr + p0, NULL, 0};
    fm_rows(&b, r0, r1);
    for (int64_t p = p0; p < p0 + n; p++) {
        float *g = c->gptr[p], *u = c->uptr[p];
        for (int64_t r = r0; r < r1; r++) g[r] = g[r] / (1.f + expf(-g[r])) * u[r]; /* silu(g)*u */
    }
}

/* Down rows r0..r1 of one expert for all its pairs, into the pairs' scratch rows. The task
 * that completes a range of rows (the last of its experts) adds the range's scratch rows
 * into y, coef[p] * scratch[p] in pair order: no two threads add into the same element,
 * and no pass over y after a barrier. */
static void down_task(void *vc, long i) {
    moe_ctx *c = vc;
    int e = (int)c->task_e[i];
    const int64_t r0 = c->task_r0[i], r1 = c->task_r1[i], p0 = c->offsets[e], n = c->offsets[e + 1] - p0;
    fm_rows_args a = {&c->down[e], &c->ph[e], 0, n, c->gptr + p0, NULL, 0};
    fm_rows(&a, r0, r1);
    if (atomic_fetch_sub_explicit(&c->left[r0 / c->per], 1, memory_order_acq_rel) != 1) return;
    for (int64_t p = 0; p < c->pairs; p++) {
        float *y = c->yptr[p];
        const float *s = c->gptr[p], k = c->coef[p];
        for (int64_t r = r0; r < r1; r++) y[r] = y[r] + s[r] * k;
    }
}

static int check_experts(int n_exp, const fm_qmat *gate, const fm_qmat *up, const fm_qmat *down) {
    const int64_t H = gate ? gate[0].cols : down[0].rows;
    for (int e = 0; e < n_exp; e++) {
        if (gate) {
            const fm_qmat *g = &gate[e], *u = &up[e];
            if (g->cols != H || u->cols != H || u->rows != g->rows || !fm_supported(g->bits, g->group) ||
                !fm_supported(u->bits, u->group) || H % g->group || H % u->group)
                return -1;
        }
        if (down) {
            const fm_qmat *d = &down[e];
            if (d->rows != H || !fm_supported(d->bits, d->group) || d->cols % d->group) return -1;
            if (gate && d->cols != gate[e].rows) return -1;
        }
    }
    return 0;
}

static void free_preps(moe_ctx *c) {
    if (!c->px) return;
    for (int e = 0; e < c->n_exp; e++) {
        if (c->pu[e].xp != c->px[e].xp || c->pu[e].xq != c->px[e].xq) fm_xprep_free(&c->pu[e]);
        fm_xprep_free(&c->px[e]);
        fm_xprep_free(&c->ph[e]);
    }
    free(c->px);
    for (int b = 0; b < 9; b++) fm_xprep_free(&c->by_bits[b]);
}

static int64_t task_capacity(int n_exp, const fm_qmat *m, int64_t at_least) {
    int64_t n = at_least;
    for (int e = 0; e < n_exp; e++) n += m[e].rows; /* one row per task at most */
    return n;
}

/* Phase 1. h[p] (row p of [pairs, h_stride]) = silu(gate_e x_t) * up_e x_t for every pair p
 * (token t = tok[p]) of expert e. */
int fm_moe_gate_up(int n_exp, const fm_qmat *gate, const fm_qmat *up, const int32_t *offsets,
                   const int32_t *tok, const float *x, int64_t T, float *h, int64_t h_stride) {
    if (n_exp <= 0) return 0;
    if (check_experts(n_exp, gate, up, NULL)) return -1;
    const int64_t H = gate[0].cols, pairs = offsets[n_exp];
    int64_t total_rows = 0;
    for (int e = 0; e < n_exp; e++) {
        if (gate[e].rows > h_stride || offsets[e + 1] < offsets[e]) return -1;
        if (offsets[e + 1] > offsets[e]) total_rows += gate[e].rows;
    }
    for (int64_t p = 0; p < pairs; p++)
        if (tok[p] < 0 || tok[p] >= T) return -1;
    if (pairs == 0) return 0;
    int rc = 0;
    moe_ctx c = {.n_exp = n_exp, .gate = gate, .up = up, .offsets = offsets};
    int64_t cap = task_capacity(n_exp, gate, 1);
    c.px = calloc(3 * n_exp, sizeof(fm_xprep));
    c.gx = malloc(sizeof(fm_xprep *) * 2 * n_exp);
    c.slot0 = malloc(sizeof(int64_t) * n_exp);
    char *filled = calloc(9 * T, 1); /* [bits][token]: laid out in by_bits[bits] */
    c.u = malloc(sizeof(float) * pairs * h_stride);
    c.gptr = malloc(sizeof(float *) * 2 * pairs);
    c.task_e = malloc(sizeof(int64_t) * 3 * cap);
    if (!c.px || !c.gx || !c.slot0 || !filled || !c.u || !c.gptr || !c.task_e) { rc = -2; goto done; }
    c.pu = c.px + n_exp;
    c.ph = c.pu + n_exp;
    c.ux = c.gx + n_exp;
    c.uptr = c.gptr + pairs;
    c.task_r0 = c.task_e + cap;
    c.task_r1 = c.task_r0 + cap;
    for (int64_t p = 0; p < pairs; p++) {
        c.gptr[p] = h + p * h_stride; /* gate results land in h and become h in place */
        c.uptr[p] = c.u + p * h_stride;
    }
    long n_tasks = 0;
    for (int e = 0; e < n_exp; e++) {
        int64_t p0 = offsets[e], n = offsets[e + 1] - p0;
        if (n == 0) continue;
        if (n == 1) { /* decode: every expert sees the same token, laid out once per width */
            const int t = tok[p0], wb[2] = {gate[e].bits, up[e].bits};
            for (int i = 0; i < 2; i++) {
                fm_xprep *bp = &c.by_bits[wb[i]];
                if (!bp->xp && !bp->xq && !fm_xprep_alloc(bp, wb[i], H, T)) { rc = -2; goto done; }
                if (!filled[wb[i] * T + t]) fm_xprep_fill(bp, t, x + (int64_t)t * H);
                filled[wb[i] * T + t] = 1;
            }
            c.gx[e] = &c.by_bits[wb[0]];
            c.ux[e] = &c.by_bits[wb[1]];
            c.slot0[e] = t;
        } else {
            if (!fm_xprep_alloc(&c.px[e], gate[e].bits, H, n)) { rc = -2; goto done; }
            for (int64_t p = 0; p < n; p++) fm_xprep_fill(&c.px[e], p, x + (int64_t)tok[p0 + p] * H);
            if (up[e].bits == gate[e].bits) {
                c.pu[e] = c.px[e];
            } else {
                if (!fm_xprep_alloc(&c.pu[e], up[e].bits, H, n)) { rc = -2; goto done; }
                for (int64_t p = 0; p < n; p++) fm_xprep_fill(&c.pu[e], p, x + (int64_t)tok[p0 + p] * H);
            }
            c.gx[e] = &c.px[e];
            c.ux[e] = &c.pu[e];
            c.slot0[e] = 0;
        }
        /* Rows per task as for one matrix: a task reads a stream of gate rows, then one of up
         * rows, each as long as a qmm task's (half as long: 1.28 -> 1.17 ms at 397B shapes). */
        int64_t rows = gate[e].rows, per = fm_rows_per_task(rows, H, gate[e].bits, total_rows);
        for (int64_t r = 0; r < rows; r += per, n_tasks++) {
            c.task_e[n_tasks] = e;
            c.task_r0[n_tasks] = r;
            c.task_r1[n_tasks] = r + per < rows ? r + per : rows;
        }
    }
    fm_parallel(gate_up_task, &c, n_tasks);
done:
    free_preps(&c);
    free(c.gx);
    free(c.slot0);
    free(filled);
    free(c.u);
    free(c.gptr);
    free(c.task_e);
    return rc;
}

/* Phase 2. y[tok[p]] (+)= coef[p] * down_e h[p] over all pairs p; y is [T, H]. */
int fm_moe_down(int n_exp, const fm_qmat *down, const int32_t *offsets, const int32_t *tok, const float *coef,
                const float *h, int64_t h_stride, int64_t T, float *y, int accumulate) {
    if (n_exp <= 0) return 0;
    if (check_experts(n_exp, NULL, NULL, down)) return -1;
    const int64_t H = down[0].rows, pairs = offsets[n_exp];
    for (int e = 0; e < n_exp; e++)
        if (down[e].cols > h_stride || offsets[e + 1] < offsets[e]) return -1;
    for (int64_t p = 0; p < pairs; p++)
        if (tok[p] < 0 || tok[p] >= T) return -1;
    if (!accumulate) memset(y, 0, sizeof(float) * T * H);
    if (pairs == 0) return 0;
    int rc = 0;
    /* Tasks are (expert, range of rows) as in fm_qmm, each writing its pairs' own scratch
     * rows, ordered range by range; the last task of a range adds it into y (down_task).
     * (Tasks owning output rows across all experts, row by row, read K+1 short streams
     * each: measured 16 against 20 GB/s at 397B shapes.) */
    moe_ctx c = {.n_exp = n_exp, .down = down, .offsets = offsets, .coef = coef, .pairs = pairs};
    int64_t cap = task_capacity(n_exp, down, 1);
    float *scratch = malloc(sizeof(float) * pairs * H);
    c.px = calloc(3 * n_exp, sizeof(fm_xprep));
    c.yptr = malloc(sizeof(float *) * 2 * pairs);
    c.task_e = malloc(sizeof(int64_t) * 3 * cap);
    c.left = calloc(H, sizeof(atomic_int));
    if (!scratch || !c.px || !c.yptr || !c.task_e || !c.left) { rc = -2; goto done; }
    c.pu = c.px + n_exp;
    c.ph = c.pu + n_exp;
    c.gptr = c.yptr + pairs;
    c.task_r0 = c.task_e + cap;
    c.task_r1 = c.task_r0 + cap;
    for (int64_t p = 0; p < pairs; p++) {
        c.yptr[p] = y + (int64_t)tok[p] * H;
        c.gptr[p] = scratch + p * H;
    }
    int active = 0;
    int64_t total_rows = 0;
    for (int e = 0; e < n_exp; e++) {
        int64_t p0 = offsets[e], n = offsets[e + 1] - p0;
        if (n == 0) continue;
        if (!fm_xprep_alloc(&c.ph[e], down[e].bits, down[e].cols, n)) { rc = -2; goto done; }
        for (int64_t p = 0; p < n; p++) fm_xprep_fill(&c.ph[e], p, h + (p0 + p) * h_stride);
        active++;
        total_rows += H;
    }
    c.per = H; /* one range length for all experts: the shortest any of them asks for */
    for (int e = 0; e < n_exp; e++) {
        if (offsets[e + 1] == offsets[e]) continue;
        int64_t per = fm_rows_per_task(H, down[e].cols, down[e].bits, total_rows);
        if (per < c.per) c.per = per;
    }
    long n_tasks = 0;
    for (int64_t r = 0, j = 0; r < H; r += c.per, j++) {
        atomic_init(&c.left[j], active);
        for (int e = 0; e < n_exp; e++) {
            if (offsets[e + 1] == offsets[e]) continue;
            c.task_e[n_tasks] = e;
            c.task_r0[n_tasks] = r;
            c.task_r1[n_tasks] = r + c.per < H ? r + c.per : H;
            n_tasks++;
        }
    }
    fm_parallel(down_task, &c, n_tasks);
done:
    free_preps(&c);
    free(scratch);
    free(c.yptr);
    free(c.task_e);
    free(c.left);
    return rc;
}

/* Both phases: y[t] (+)= sum over pairs of coef * down_e(silu(gate_e x_t) * up_e x_t). */
int fm_moe(int n_exp, const fm_qmat *gate, const fm_qmat *up, const fm_qmat *down, const int32_t *offsets,
           const int32_t *tok, const float *coef, const float *x, int64_t T, float *y, int accumulate) {
    if (n_exp <= 0) return 0;
    if (check_experts(n_exp, gate, up, down)) return -1;
    int64_t I_max = 1, pairs = offsets[n_exp];
    for (int e = 0; e < n_exp; e++)
        if (gate[e].rows > I_max) I_max = gate[e].rows;
    float *h = malloc(sizeof(float) * (pairs > 0 ? pairs : 1) * I_max);
    if (!h) return -2;
    int rc = fm_moe_gate_up(n_exp, gate, up, offsets, tok, x, T, h, I_max);
    if (rc == 0) rc = fm_moe_down(n_exp, down, offsets, tok, coef, h, I_max, T, y, accumulate);
    free(h);
    return rc;
}
