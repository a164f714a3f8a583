/*
 * ref_morph.c: one erosion or dilation pass of the CPU reference (gpu_morph_pass in
 * gpu_internal.h): per-row distances to the nearest target voxel in two sweeps, then each
 * output row combines the distance rows the structuring element covers with a byte-wise AND
 * (erosion) or OR (dilation) that the compiler vectorises. Rows are split across threads.
 * Thread safety: each part writes only its own rows.
 */
#include <string.h>
#include "ref_internal.h"
#include "ref_par.h"

static void dist_part(void *arg, int part, size_t begin, size_t end)
{
    const gpu_morph_pass *p = arg;
    size_t nx = p->nx;
    uint8_t cap = (uint8_t)(p->rx + 1), target = (uint8_t)p->target;
    (void)part;
    for (size_t r = begin; r < end; r++) {
        const uint8_t *in = p->in + r * nx;
        uint8_t *d = p->dist + r * nx;
        uint8_t run = cap;
        for (size_t x = 0; x < nx; x++) {
            if ((in[x] != 0) == target)
                run = 0;
            else if (run < cap)
                run++;
            d[x] = run;
        }
        run = cap;
        for (size_t x = nx; x-- > 0;) {
            if (d[x] == 0)
                run = 0;
            else if (run < cap)
                run++;
            if (run < d[x])
                d[x] = run;
        }
    }
}

/* 16 bytes at a time (v16, ref_internal.h), the row's tail byte by byte. */
static void comb_row(uint8_t *restrict out, const uint8_t *restrict d, size_t nx, uint8_t w,
                     int erode)
{
    size_t x = 0;
    const v16 wv = {w, w, w, w, w, w, w, w, w, w, w, w, w, w, w, w};
    for (; x + 16 <= nx; x += 16) {
        v16 dv, ov;
        memcpy(&dv, d + x, 16);
        memcpy(&ov, out + x, 16);
        /* a comparison gives 0 or all ones per byte */
        ov = erode ? ov & (v16)(dv > wv) : ov | (v16)(dv <= wv);
        memcpy(out + x, &ov, 16);
    }
    for (; x < nx; x++)
        out[x] = erode ? out[x] & (d[x] > w ? 0xff : 0) : out[x] | (d[x] <= w ? 0xff : 0);
}

static void comb_part(void *arg, int part, size_t begin, size_t end)
{
    const gpu_morph_pass *p = arg;
    size_t nx = p->nx, ny = p->ny, nz = p->nz;
    int wy = 2 * p->ry + 1;
    int erode = p->target == 0;
    (void)part;
    for (size_t r = begin; r < end; r++) {
        size_t y = r % ny, z = r / ny;
        uint8_t *out = p->out + r * nx;
        /* all ones / zeros while combining; 0 or 1 at the end */
        memset(out, erode ? 0xff : 0, nx);
        for (int dz = -p->rz; dz <= p->rz; dz++) {
            if ((dz < 0 && z < (size_t)-dz) || (dz > 0 && z + (size_t)dz >= nz))
                continue; /* outside: never the target, so erosion holds and dilation misses */
            for (int dy = -p->ry; dy <= p->ry; dy++) {
                int w = (int)p->w[(dz + p->rz) * wy + dy + p->ry];
                if (w < 0 || (dy < 0 && y < (size_t)-dy) || (dy > 0 && y + (size_t)dy >= ny))
                    continue;
                comb_row(out, p->dist + ((z + dz) * ny + (y + dy)) * nx, nx, (uint8_t)w, erode);
            }
        }
        for (size_t x = 0; x < nx; x++)
            out[x] &= 1;
    }
}

lc_rc ref_morph(void *impl, const gpu_morph_pass *p, lc_err *err)
{
    ref_impl *r = impl;
    size_t rows = p->ny * p->nz, min_rows = REF_MIN_PART / p->nx + 1;
    (void)err;
    /* every distance row is complete before any output row reads it: two runs, joined */
    ref_run_units(r->threads, rows, min_rows, dist_part, (void *)p);
    ref_run_units(r->threads, rows, min_rows, comb_part, (void *)p);
    return LC_OK;
}
