/*
 * seg_algo.c: the three algorithms on the gpu/ API, one 3-D volume at a time. The volume
 * crosses to the device once (on the CPU backend not at all: the kernels read the caller's
 * buffer, borrowed read-only) and only the mask comes back; everything between runs on device
 * memory (histogram and counts excepted). The image is freed as soon as the mask exists, so
 * morphology and labelling find the most room under RADPIPE_GPU_MEMORY_LIMIT. Uses the
 * caller's gpu_ctx (one thread at a time).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "seg.h"

/* Otsu's threshold of the volume clipped to [a, b] (the body's HU window), without writing
 * the clipped volume: the histogram over [max(min, a), min(max, b)] with out-of-range values
 * counted in the end bins is the histogram of the clipped values, and the threshold falls
 * strictly inside that range, so "clipped > t" and "raw > t" are the same voxels. The scan
 * over the histogram is scikit-image's threshold_otsu, as gpu_otsu_threshold does it: bin
 * centres, class weights and sums from both ends, the first maximum. *empty = 1 when the
 * clipped volume is constant (scikit-image then returns that value and nothing is above it).
 * A CT spans the window, so [a, b] is the range nearly always: the histogram over it is taken
 * in the same pass as the min and max (gpu_histogram_minmax) and taken again only when the
 * clipped range turns out narrower. */
static lc_rc otsu_clipped(gpu_ctx *ctx, const gpu_vol *img, int nbins, float a, float b, float *t,
                          int *empty, lc_err *err)
{
    float lo, hi;
    lc_rc rc = LC_OK;
    uint64_t *hist = malloc((size_t)nbins * sizeof(*hist));
    double *w2 = malloc((size_t)nbins * sizeof(*w2)), *s2 = malloc((size_t)nbins * sizeof(*s2));
    *empty = 0;
    if (!hist || !w2 || !s2) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory for a histogram");
        goto out;
    }
    if ((rc = gpu_histogram_minmax(ctx, img, nbins, a, b, hist, &lo, &hi, err)) != LC_OK)
        goto out;
    lo = lo < a ? a : lo > b ? b : lo;
    hi = hi > b ? b : hi < a ? a : hi;
    if (!(lo < hi)) {
        *t = lo;
        *empty = 1;
        goto out;
    }
    if ((lo != a || hi != b) && (rc = gpu_histogram(ctx, img, nbins, lo, hi, hist, err)) != LC_OK)
        goto out;
    double width = ((double)hi - (double)lo) / nbins, w1 = 0, s1 = 0, best = -1;
    int best_k = 0;
    for (int k = nbins - 1; k >= 0; k--) {
        double c = (double)hist[k];
        w2[k] = c + (k + 1 < nbins ? w2[k + 1] : 0);
        s2[k] = c * ((double)lo + (k + 0.5) * width) + (k + 1 < nbins ? s2[k + 1] : 0);
    }
    for (int k = 0; k + 1 < nbins; k++) {
        double c = (double)hist[k];
        w1 += c;
        s1 += c * ((double)lo + (k + 0.5) * width);
        if (w1 == 0 || w2[k + 1] == 0)
            continue;
        double d = s1 / w1 - s2[k + 1] / w2[k + 1], var = w1 * w2[k + 1] * d * d;
        if (var > best) {
            best = var;
            best_k = k;
        }
    }
    *t = (float)((double)lo + (best_k + 0.5) * width);
out:
    free(hist);
    free(w2);
    free(s2);
    return rc;
}

/* Morphology, component filtering and hole filling of body and threshold. */
static lc_rc post_process(gpu_ctx *ctx, const seg_params *p, gpu_vol *m, const double sp[3],
                          seg_algo_stats *st, lc_err *err)
{
    lc_rc rc = LC_OK;
    for (int i = 0; i < p->nmorph && rc == LC_OK; i++)
        rc = gpu_morphology(ctx, p->morph[i].op, m, p->morph[i].radius_mm, sp, m, err);
    if (rc != LC_OK)
        return rc;
    if (p->keep_largest > 0 || p->min_component_mm3 > 0) {
        double vox = sp[0] * sp[1] * sp[2];
        uint64_t min_voxels =
            p->min_component_mm3 > 0 ? (uint64_t)ceil(p->min_component_mm3 / vox) : 0;
        rc = gpu_keep_largest(ctx, m, p->connectivity, (size_t)p->keep_largest, min_voxels, m,
                              &st->components, err);
        if (rc != LC_OK)
            return rc;
    }
    if (p->fill == SEG_FILL_2D)
        rc = gpu_fill_holes(ctx, m, 4, m, err);
    else if (p->fill == SEG_FILL_3D)
        rc = gpu_fill_holes(ctx, m, 6, m, err);
    return rc;
}

lc_rc seg_algo_run(gpu_ctx *ctx, const seg_params *p, const float *vol, size_t nx, size_t ny,
                   size_t nz, const double spacing[3], uint8_t *mask, seg_algo_stats *st,
                   lc_err *err)
{
    gpu_vol *img = NULL, *m = NULL;
    float t = 0;
    memset(st, 0, sizeof(*st));
    /* the image is only read: on the CPU the kernels read vol itself */
    lc_rc rc = gpu_vol_borrow(ctx, GPU_F32, vol, nx, ny, nz, &img, err);
    if (rc == LC_OK)
        rc = gpu_vol_new(ctx, GPU_U8, nx, ny, nz, &m, err);
    if (rc != LC_OK)
        goto out;
    switch (p->algorithm) {
    case SEG_ALGO_OTSU:
        /* foreground is strictly above the threshold, as scikit-image's `image > t` */
        if ((rc = gpu_otsu_threshold(ctx, img, p->nbins, &t, err)) == LC_OK)
            rc = gpu_threshold(ctx, img, nextafterf(t, INFINITY), INFINITY, m, err);
        st->threshold = t;
        break;
    case SEG_ALGO_BODY: {
        /* HU window, then Otsu: air and tissue become two clear classes */
        float w = (float)p->window_width, a = (float)p->window_level - w / 2;
        int empty = 0;
        if ((rc = otsu_clipped(ctx, img, p->nbins, a, a + w, &t, &empty, err)) == LC_OK && !empty)
            rc = gpu_threshold(ctx, img, nextafterf(t, INFINITY), INFINITY, m, err);
        st->threshold = t;
        break;
    }
    case SEG_ALGO_THRESHOLD:
        rc = gpu_threshold(ctx, img, (float)p->lower, (float)p->upper, m, err);
        st->threshold = (float)p->lower;
        break;
    }
    if (rc != LC_OK)
        goto out;
    gpu_vol_free(img);
    img = NULL;
    if (p->algorithm != SEG_ALGO_OTSU && (rc = post_process(ctx, p, m, spacing, st, err)) != LC_OK)
        goto out;
    if ((rc = gpu_count_nonzero(ctx, m, &st->voxels, err)) != LC_OK ||
        (rc = gpu_vol_download(ctx, m, mask, err)) != LC_OK)
        goto out;
out:
    gpu_vol_free(m);
    gpu_vol_free(img);
    return rc;
}
