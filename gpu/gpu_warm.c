/*
 * gpu_warm.c: gpu_ctx_warm_up: every kernel of gpu_seg.h once on a small synthetic volume, so
 * CUDA's lazy module loading and first launches (and the CPU's first page faults and thread
 * starts) happen at service start, not in the first job. Results are discarded.
 * Thread safety: a context is used by one thread at a time.
 */
#include <math.h>
#include <stdlib.h>
#include "gpu_internal.h"

#define WX 32
#define WY 32
#define WZ 16

lc_rc gpu_ctx_warm_up(gpu_ctx *ctx, lc_err *err)
{
    static const double sp[3] = {1.0, 1.0, 2.0}, sp2[3] = {2.0, 2.0, 2.0};
    static const gpu_morph_op ops[4] = {GPU_MORPH_ERODE, GPU_MORPH_DILATE, GPU_MORPH_OPEN,
                                        GPU_MORPH_CLOSE};
    static const int conns[4] = {6, 26, 4, 8};
    float *host = NULL, t = 0, lo, hi;
    gpu_vol *img = NULL, *mask = NULL, *labels = NULL, *small = NULL, *small_l = NULL;
    uint64_t hist[256], count;
    size_t nl = 0, kept = 0;
    lc_rc rc;

    if (!ctx)
        return lc_err_set(err, LC_ERR_INVALID, "gpu_ctx_warm_up: context is NULL");
    host = malloc(WX * WY * WZ * sizeof(*host));
    if (!host)
        return lc_err_set(err, LC_ERR_NOMEM, "could not allocate the warm-up volume");
    /* a hollow ball in noise-free background: every kernel has work on both classes */
    for (int z = 0; z < WZ; z++)
        for (int y = 0; y < WY; y++)
            for (int x = 0; x < WX; x++) {
                double d = hypot(hypot(x - WX / 2.0, y - WY / 2.0), 2.0 * (z - WZ / 2.0));
                host[(z * WY + y) * WX + x] = d < 12 && d > 5 ? 40.0f : -1000.0f;
            }
    if ((rc = gpu_vol_upload(ctx, GPU_F32, host, WX, WY, WZ, &img, err)) != LC_OK ||
        (rc = gpu_vol_new(ctx, GPU_U8, WX, WY, WZ, &mask, err)) != LC_OK ||
        (rc = gpu_vol_new(ctx, GPU_I32, WX, WY, WZ, &labels, err)) != LC_OK ||
        (rc = gpu_minmax(ctx, img, &lo, &hi, err)) != LC_OK ||
        (rc = gpu_histogram(ctx, img, 256, lo, hi + 1, hist, err)) != LC_OK ||
        (rc = gpu_otsu_threshold(ctx, img, 256, &t, err)) != LC_OK ||
        (rc = gpu_threshold(ctx, img, nextafterf(t, INFINITY), INFINITY, mask, err)) != LC_OK ||
        (rc = gpu_count_nonzero(ctx, mask, &count, err)) != LC_OK)
        goto out;
    for (int i = 0; i < 4 && rc == LC_OK; i++)
        rc = gpu_morphology(ctx, ops[i], mask, 2.0, sp, mask, err);
    for (int i = 0; i < 4 && rc == LC_OK; i++)
        rc = gpu_label(ctx, mask, conns[i], labels, &nl, err);
    if (rc != LC_OK)
        goto out;
    /* gpu_keep_largest runs gpu_label_sizes and gpu_select_components */
    if ((rc = gpu_keep_largest(ctx, mask, 26, 1, 0, mask, &kept, err)) != LC_OK ||
        (rc = gpu_fill_holes(ctx, mask, 6, mask, err)) != LC_OK ||
        (rc = gpu_fill_holes(ctx, mask, 4, mask, err)) != LC_OK ||
        (rc = gpu_window(ctx, img, 40.0f, 400.0f, img, err)) != LC_OK)
        goto out;
    size_t in_dims[3] = {WX, WY, WZ}, out_dims[3];
    if ((rc = gpu_resample_dims(in_dims, sp, sp2, out_dims, err)) != LC_OK ||
        (rc = gpu_vol_new(ctx, GPU_F32, out_dims[0], out_dims[1], out_dims[2], &small, err)) !=
            LC_OK ||
        (rc = gpu_vol_new(ctx, GPU_U8, out_dims[0], out_dims[1], out_dims[2], &small_l, err)) !=
            LC_OK ||
        (rc = gpu_resample(ctx, img, sp, sp2, GPU_INTERP_LINEAR, small, err)) != LC_OK ||
        (rc = gpu_resample(ctx, img, sp, sp2, GPU_INTERP_NEAREST, small, err)) != LC_OK ||
        (rc = gpu_resample(ctx, mask, sp, sp2, GPU_INTERP_NEAREST, small_l, err)) != LC_OK)
        goto out;
    /* the download waits for everything queued, so a device fault shows here */
    rc = gpu_vol_download(ctx, small, host, err);
out:
    gpu_vol_free(small_l);
    gpu_vol_free(small);
    gpu_vol_free(labels);
    gpu_vol_free(mask);
    gpu_vol_free(img);
    free(host);
    return rc;
}
