/*
 * seg_infer.c: one 3-D volume through a resident model, nnU-Net's inference on the gpu/ API:
 * intensities normalised as model.json says (host, into a copy: the outputs still need the
 * original values), the copy moved to the backend once (on the CPU borrowed, not copied),
 * resampled (linear) to the model's spacing, the sliding window (gpu_nn_segment: Gaussian
 * weighted softmax, argmax), the class map resampled back to the series grid (nearest) and
 * downloaded. Each backend volume is freed as soon as the next exists, so the window finds
 * the most room under RADPIPE_GPU_MEMORY_LIMIT. Uses the caller's gpu_ctx (one thread).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "lc/util.h"
#include "seg.h"
#include "seg_nn_config.h"
#if SEG_HAVE_NN
#include "gpu_nn.h"
#endif

int seg_infer_available(void)
{
    return SEG_HAVE_NN;
}

#if SEG_HAVE_NN

/* nnU-Net's normalisation into out (n floats). CT: clip to the dataset's 0.5 and 99.5
 * percentiles, then (x - mean) / std with its statistics. MR: (x - mean) / max(std, 1e-8)
 * with the volume's own mean and std (computed in double over the finite voxels). NaN
 * voxels become 0 (the mean) either way. */
static void normalise(const seg_model_desc *d, const float *in, size_t n, float *out)
{
    if (d->norm == SEG_NORM_CT) {
        const float lo = (float)d->clip_lo, hi = (float)d->clip_hi, mean = (float)d->mean;
        const float inv = (float)(1.0 / d->std);
        for (size_t i = 0; i < n; i++) {
            float x = in[i];
            x = x < lo ? lo : x > hi ? hi : x; /* NaN stays NaN */
            out[i] = x == x ? (x - mean) * inv : 0.0f;
        }
        return;
    }
    double s = 0, s2 = 0;
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        if (isfinite(in[i])) {
            s += in[i];
            s2 += (double)in[i] * in[i];
            k++;
        }
    double mean = k ? s / (double)k : 0, var = k ? s2 / (double)k - mean * mean : 0;
    double sd = var > 0 ? sqrt(var) : 0;
    const float m = (float)mean, inv = (float)(1.0 / (sd > 1e-8 ? sd : 1e-8));
    for (size_t i = 0; i < n; i++)
        out[i] = isfinite(in[i]) ? (in[i] - m) * inv : 0.0f;
}

typedef struct window_cb {
    seg_progress *pr;
    size_t last;
    int counted; /* the window's patches were added to the job's total */
    size_t total;
} window_cb;

static int on_cancel(void *arg)
{
    const window_cb *w = arg;
    return seg_progress_should_stop(w->pr);
}

/* Patches done: one step each, published at most twice a second (and at the end). */
static void on_progress(void *arg, size_t done, size_t total)
{
    window_cb *w = arg;
    if (!w->counted && w->pr) {
        w->pr->total += (long long)total;
        w->counted = 1;
    }
    w->total = total;
    if (done > w->last) {
        seg_progress_step(w->pr, (long long)(done - w->last), done == total);
        w->last = done;
    }
}

lc_rc seg_infer_run(gpu_ctx *ctx, seg_model *m, const float *vol, size_t nx, size_t ny, size_t nz,
                    const double sp[3], seg_progress *pr, uint8_t *labels, seg_infer_stats *st,
                    lc_err *err)
{
    const seg_model_desc *d = &m->d;
    const size_t n = nx * ny * nz, dims[3] = {nx, ny, nz};
    gpu_vol *img = NULL, *rs = NULL, *lab = NULL, *back = NULL;
    float *norm = malloc(n * sizeof(float));
    lc_rc rc = LC_OK;
    /* the model's grid; a 2-D model keeps the slices as they are */
    double ts[3] = {d->spacing[0], d->spacing[1], d->dims == 3 ? d->spacing[2] : sp[2]};
    memset(st, 0, sizeof(*st));
    if (!norm)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory for the normalised volume");
    normalise(d, vol, n, norm);
    if ((rc = gpu_vol_borrow(ctx, GPU_F32, norm, nx, ny, nz, &img, err)) != LC_OK)
        goto out;
    for (int a = 0; a < 3; a++)
        st->resampled |= fabs(ts[a] / sp[a] - 1) > 1e-3;
    if (st->resampled) {
        if ((rc = gpu_resample_dims(dims, sp, ts, st->rdims, err)) != LC_OK ||
            (rc = gpu_vol_new(ctx, GPU_F32, st->rdims[0], st->rdims[1], st->rdims[2], &rs, err)) !=
                LC_OK ||
            (rc = gpu_resample(ctx, img, sp, ts, GPU_INTERP_LINEAR, rs, err)) != LC_OK)
            goto out;
        gpu_vol_free(img);
        img = NULL;
    } else {
        memcpy(st->rdims, dims, sizeof(dims));
        rs = img;
        img = NULL;
    }

    window_cb cb = {.pr = pr};
    gpu_nn_window_opts o = {
        .patch = {d->patch[0], d->patch[1], d->patch[2]},
        .step = d->step,
        .mirror = d->mirror,
        .batch = d->batch,
        .cancelled = on_cancel,
        .cancel_arg = &cb,
        .progress = on_progress,
        .progress_arg = &cb,
    };
    int64_t t0 = lc_now_ms();
    rc = gpu_nn_segment(m->nn, rs, &o, &lab, NULL, err);
    st->seconds = (double)(lc_now_ms() - t0) / 1000.0;
    st->patches = cb.total;
    if (rc != LC_OK)
        goto out;
    gpu_vol_free(rs);
    rs = NULL;
    free(norm); /* nothing borrows it any more */
    norm = NULL;
    if (st->resampled) {
        if ((rc = gpu_vol_new(ctx, GPU_U8, nx, ny, nz, &back, err)) != LC_OK ||
            (rc = gpu_resample(ctx, lab, ts, sp, GPU_INTERP_NEAREST, back, err)) != LC_OK)
            goto out;
        gpu_vol_free(lab);
        lab = NULL;
    } else {
        back = lab;
        lab = NULL;
    }
    rc = gpu_vol_download(ctx, back, labels, err);
out:
    gpu_vol_free(back);
    gpu_vol_free(lab);
    gpu_vol_free(rs);
    gpu_vol_free(img);
    free(norm);
    return rc;
}

#else

lc_rc seg_infer_run(gpu_ctx *ctx, seg_model *m, const float *vol, size_t nx, size_t ny, size_t nz,
                    const double sp[3], seg_progress *pr, uint8_t *labels, seg_infer_stats *st,
                    lc_err *err)
{
    (void)ctx, (void)m, (void)vol, (void)nx, (void)ny, (void)nz, (void)sp, (void)pr;
    (void)labels;
    memset(st, 0, sizeof(*st));
    return lc_err_set(err, LC_ERR_UNSUPPORTED,
                      "this build has no inference engine (gpu/nn was not compiled in)");
}

#endif
