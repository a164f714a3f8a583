/*
 * gpu_morph.c: the front-end of gpu_morphology (gpu_seg.h): checks the arguments, builds the
 * ball-in-millimetres structuring element once on the host (as half-widths in x per (dy, dz)
 * row, the form both backends consume) and runs erosion/dilation passes through the backend.
 * Thread safety: a context is used by one thread at a time.
 */
#include <math.h>
#include <stdlib.h>
#include "gpu_internal.h"

/* Offsets on the sphere's surface count as inside despite rounding (r = k * spacing). */
#define SLACK (1.0 + 1e-9)

static int inside(double dx, double dy, double dz, const double sp[3], double lim)
{
    double a = dx * sp[0], b = dy * sp[1], c = dz * sp[2];
    return a * a + b * b + c * c <= lim;
}

/* reach[a] = the largest k with (k * sp[a])^2 <= r^2 (1 + 1e-9), at most MAX_REACH + 1. */
static int reach_of(double radius, double sp)
{
    double lim = radius * radius * SLACK;
    int k = 0;
    while (k <= GPU_MORPH_MAX_REACH && ((k + 1) * sp) * ((k + 1) * sp) <= lim)
        k++;
    return k;
}

/* Fills reach[3] and w (GPU_MORPH_MAX_W entries) for a ball of radius mm on spacing sp. */
static lc_rc build_element(double radius, const double sp[3], int reach[3], int8_t *w, lc_err *err)
{
    static const char axis[3] = {'x', 'y', 'z'};
    double lim = radius * radius * SLACK;

    if (!isfinite(radius) || radius < 0)
        return lc_err_set(err, LC_ERR_INVALID, "invalid morphology radius %g", radius);
    for (int a = 0; a < 3; a++) {
        if (!isfinite(sp[a]) || !(sp[a] > 0))
            return lc_err_set(err, LC_ERR_INVALID, "invalid voxel spacing %g along %c", sp[a],
                              axis[a]);
        reach[a] = reach_of(radius, sp[a]);
        if (reach[a] > GPU_MORPH_MAX_REACH)
            return lc_err_set(err, LC_ERR_INVALID,
                              "morphology radius %g reaches more than %d voxels along %c "
                              "(spacing %g)",
                              radius, GPU_MORPH_MAX_REACH, axis[a], sp[a]);
    }
    int ny = 2 * reach[1] + 1;
    for (int dz = -reach[2]; dz <= reach[2]; dz++)
        for (int dy = -reach[1]; dy <= reach[1]; dy++) {
            int hw = -1;
            while (hw < reach[0] && inside(hw + 1, dy, dz, sp, lim))
                hw++;
            w[(dz + reach[2]) * ny + dy + reach[1]] = (int8_t)hw;
        }
    return LC_OK;
}

static lc_rc pass(gpu_ctx *ctx, const gpu_vol *in, gpu_vol *out, void *dist, int target,
                  const int reach[3], const int8_t *w, lc_err *err)
{
    gpu_morph_pass p = {
        .in = in->mem,
        .out = out->mem,
        .dist = dist,
        .nx = in->nx,
        .ny = in->ny,
        .nz = in->nz,
        .target = target,
        .rx = reach[0],
        .ry = reach[1],
        .rz = reach[2],
        .w = w,
    };
    return ctx->ops->morph(ctx->impl, &p, err);
}

lc_rc gpu_morphology(gpu_ctx *ctx, gpu_morph_op op, const gpu_vol *in, double radius,
                     const double spacing[3], gpu_vol *out, lc_err *err)
{
    static const double unit[3] = {1, 1, 1};
    int8_t *w = NULL;
    void *dist = NULL;
    int reach[3];
    lc_rc rc = gpu_check_vol(ctx, in, GPU_U8, "gpu_morphology input", err);
    if (rc == LC_OK)
        rc = gpu_check_out(ctx, out, GPU_U8, "gpu_morphology output", err);
    if (rc == LC_OK)
        rc = gpu_check_dims(in, out, "gpu_morphology", err);
    if (rc != LC_OK)
        return rc;
    if (op != GPU_MORPH_ERODE && op != GPU_MORPH_DILATE && op != GPU_MORPH_OPEN &&
        op != GPU_MORPH_CLOSE)
        return lc_err_set(err, LC_ERR_INVALID, "unknown morphology operation %d", (int)op);

    w = malloc(GPU_MORPH_MAX_W);
    if (!w)
        return lc_err_set(err, LC_ERR_NOMEM, "could not allocate a structuring element");
    if ((rc = build_element(radius, spacing ? spacing : unit, reach, w, err)) != LC_OK)
        goto out;
    if ((rc = gpu_mem_alloc(ctx, in->n, 0, &dist, err)) != LC_OK)
        goto out;
    /* erosion looks for background (target 0) near a voxel, dilation for foreground */
    int first = op == GPU_MORPH_ERODE || op == GPU_MORPH_OPEN ? 0 : 1;
    rc = pass(ctx, in, out, dist, first, reach, w, err);
    if (rc == LC_OK && (op == GPU_MORPH_OPEN || op == GPU_MORPH_CLOSE))
        rc = pass(ctx, out, out, dist, !first, reach, w, err);
out:
    gpu_mem_release(ctx, dist, in->n);
    free(w);
    return rc;
}
