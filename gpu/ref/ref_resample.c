/*
 * ref_resample.c: resampling on the CPU reference: sample positions from the shared
 * gpu_rs_linear / gpu_rs_nearest (gpu_internal.h), x positions tabulated once per call, output
 * rows split across threads; trilinear blends in the same order as the CUDA kernel.
 * Thread safety: each part writes only its own output rows.
 */
#include <stdlib.h>
#include <string.h>
#include "ref_internal.h"
#include "ref_par.h"

typedef struct rs_job {
    const gpu_resample_job *j;
    size_t *x0, *x1; /* per output x: input columns (nearest: x0 only) */
    float *tx;
} rs_job;

static void linear_part(void *arg, int part, size_t begin, size_t end)
{
    const rs_job *r = arg;
    const gpu_resample_job *j = r->j;
    const float *in = j->in;
    float *out = j->out;
    size_t nx = j->in_dims[0], ny = j->in_dims[1], ox = j->out_dims[0], oy = j->out_dims[1];
    (void)part;
    for (size_t row = begin; row < end; row++) {
        size_t y0, y1, z0, z1;
        float ty, tz;
        gpu_rs_linear(row % oy, j->ratio[1], ny, &y0, &y1, &ty);
        gpu_rs_linear(row / oy, j->ratio[2], j->in_dims[2], &z0, &z1, &tz);
        const float *r00 = in + (z0 * ny + y0) * nx, *r01 = in + (z0 * ny + y1) * nx;
        const float *r10 = in + (z1 * ny + y0) * nx, *r11 = in + (z1 * ny + y1) * nx;
        float *o = out + row * ox;
        for (size_t x = 0; x < ox; x++) {
            size_t a = r->x0[x], b = r->x1[x];
            float t = r->tx[x];
            float c00 = gpu_lerp(r00[a], r00[b], t), c01 = gpu_lerp(r01[a], r01[b], t);
            float c10 = gpu_lerp(r10[a], r10[b], t), c11 = gpu_lerp(r11[a], r11[b], t);
            o[x] = gpu_lerp(gpu_lerp(c00, c01, ty), gpu_lerp(c10, c11, ty), tz);
        }
    }
}

static void nearest_part(void *arg, int part, size_t begin, size_t end)
{
    const rs_job *r = arg;
    const gpu_resample_job *j = r->j;
    size_t es = gpu_dtype_size(j->dtype);
    size_t nx = j->in_dims[0], ny = j->in_dims[1], ox = j->out_dims[0], oy = j->out_dims[1];
    (void)part;
    for (size_t row = begin; row < end; row++) {
        size_t y = gpu_rs_nearest(row % oy, j->ratio[1], ny);
        size_t z = gpu_rs_nearest(row / oy, j->ratio[2], j->in_dims[2]);
        const uint8_t *src = (const uint8_t *)j->in + (z * ny + y) * nx * es;
        uint8_t *dst = (uint8_t *)j->out + row * ox * es;
        if (es == 1)
            for (size_t x = 0; x < ox; x++)
                dst[x] = src[r->x0[x]];
        else
            for (size_t x = 0; x < ox; x++)
                memcpy(dst + x * es, src + r->x0[x] * es, es);
    }
}

lc_rc ref_resample(void *impl, const gpu_resample_job *j, lc_err *err)
{
    ref_impl *ri = impl;
    size_t ox = j->out_dims[0], rows = j->out_dims[1] * j->out_dims[2];
    rs_job r = {.j = j};
    lc_rc rc = LC_OK;

    r.x0 = malloc(ox * sizeof(*r.x0));
    r.x1 = malloc(ox * sizeof(*r.x1));
    r.tx = malloc(ox * sizeof(*r.tx));
    if (!r.x0 || !r.x1 || !r.tx) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "could not allocate resampling tables for %zu columns",
                        ox);
        goto out;
    }
    for (size_t x = 0; x < ox; x++) {
        if (j->interp == GPU_INTERP_LINEAR)
            gpu_rs_linear(x, j->ratio[0], j->in_dims[0], &r.x0[x], &r.x1[x], &r.tx[x]);
        else
            r.x0[x] = gpu_rs_nearest(x, j->ratio[0], j->in_dims[0]);
    }
    ref_run_units(ri->threads, rows, REF_MIN_PART / ox + 1,
                  j->interp == GPU_INTERP_LINEAR ? linear_part : nearest_part, &r);
out:
    free(r.x0);
    free(r.x1);
    free(r.tx);
    return rc;
}
