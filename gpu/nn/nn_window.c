/*
 * nn_window.c: gpu_nn_segment, nnU-Net's sliding-window inference on the model's backend.
 * Patch origins follow nnU-Net's compute_steps_for_sliding_window (volumes smaller than a
 * patch are padded symmetrically with zeros, the steps spread evenly with the last patch flush
 * with the border, positions rounded half to even as numpy does); each patch's softmax is
 * weighted by nnU-Net's Gaussian importance map (a centred Gaussian, sigma a fraction of the
 * patch, divided by its maximum, zeros raised to the smallest non-zero value), mirrored
 * predictions averaged, sums normalised by the summed weights, then argmax. Patches are cut,
 * accumulated and reduced by backend kernels: on CUDA nothing but the Gaussian crosses.
 * Ownership: returns new volumes (caller frees); scratch is counted and freed before return.
 * Thread safety: the model's (one thread at a time).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "nn_internal.h"

/* nnU-Net's steps along one axis: n steps from 0 to size - tile, evenly, rounded. */
static size_t axis_steps(int64_t size, int64_t tile, double step, int64_t *out, size_t cap)
{
    double target = (double)tile * step;
    int64_t n = (int64_t)ceil((double)(size - tile) / target) + 1;
    if (n < 1)
        n = 1;
    if ((size_t)n > cap)
        n = (int64_t)cap;
    double actual = n > 1 ? (double)(size - tile) / (double)(n - 1) : 0;
    for (int64_t i = 0; i < n; i++)
        out[i] = (int64_t)nearbyint(actual * (double)i); /* round half to even, as np.round */
    return (size_t)n;
}

/* The importance map of a pz x py x px patch (host, caller frees). */
static float *gaussian(const int64_t *ps, double sigma_frac)
{
    size_t n = (size_t)(ps[0] * ps[1] * ps[2]);
    float *g = calloc(n, sizeof(float));
    double *ax[3] = {NULL, NULL, NULL};
    if (!g)
        return NULL;
    for (int a = 0; a < 3; a++) {
        ax[a] = malloc((size_t)ps[a] * sizeof(double));
        if (!ax[a])
            goto fail;
        int64_t centre = ps[a] / 2; /* nnU-Net: tile_size // 2 */
        double sigma = (double)ps[a] * sigma_frac, c = (double)centre;
        /* scipy's gaussian_filter truncates its kernel at 4 sigma (radius rounded) */
        double radius = floor(4.0 * sigma + 0.5);
        for (int64_t i = 0; i < ps[a]; i++) {
            double d = (double)i - c;
            ax[a][i] = ps[a] == 1         ? 1.0
                       : fabs(d) > radius ? 0.0
                                          : exp(-0.5 * d * d / (sigma * sigma));
        }
    }
    float mn = INFINITY;
    for (int64_t z = 0, i = 0; z < ps[0]; z++)
        for (int64_t y = 0; y < ps[1]; y++)
            for (int64_t x = 0; x < ps[2]; x++, i++) {
                g[i] = (float)(ax[0][z] * ax[1][y] * ax[2][x]);
                if (g[i] > 0 && g[i] < mn)
                    mn = g[i];
            }
    for (size_t i = 0; i < n; i++)
        if (g[i] == 0)
            g[i] = mn;
    for (int a = 0; a < 3; a++)
        free(ax[a]);
    return g;
fail:
    for (int a = 0; a < 3; a++)
        free(ax[a]);
    free(g);
    return NULL;
}

lc_rc gpu_nn_segment(gpu_nn_model *m, const gpu_vol *img, const gpu_nn_window_opts *opts,
                     gpu_vol **labels, gpu_vol **probs, lc_err *err)
{
    gpu_nn_window_opts o = {0};
    gpu_vol *lab = NULL, *pv = NULL;
    float *gauss_h = NULL;
    void *gauss = NULL, *acc = NULL, *wsum = NULL;
    int64_t *zs = NULL, *ys = NULL, *xs = NULL, *orgs = NULL;
    size_t acc_bytes = 0, wsum_bytes = 0, gauss_bytes = 0;
    lc_rc rc = LC_OK;

    if (labels)
        *labels = NULL;
    if (probs)
        *probs = NULL;
    if (!m || !labels)
        return lc_err_set(err, LC_ERR_INVALID, "gpu_nn_segment: model or labels is NULL");
    gpu_ctx *ctx = m->ctx;
    if ((rc = gpu_check_vol(ctx, img, GPU_F32, "gpu_nn_segment input", err)) != LC_OK)
        return rc;
    if (opts)
        o = *opts;
    const gpu_nn_info *in = &m->info;
    int sd = in->spatial_dims;
    if (sd != 2 && sd != 3)
        return lc_err_set(err, LC_ERR_UNSUPPORTED,
                          "gpu_nn_segment: the model has %d spatial axes, 2 or 3 are supported",
                          sd);
    if (in->in_channels > 1)
        return lc_err_set(err, LC_ERR_UNSUPPORTED,
                          "gpu_nn_segment: the model takes %d input channels, one is supported",
                          in->in_channels);
    double step = o.step == 0 ? 0.5 : o.step, sigma = o.sigma == 0 ? 0.125 : o.sigma;
    if (!(step > 0 && step <= 1))
        return lc_err_set(err, LC_ERR_INVALID, "gpu_nn_segment: step %g is not in (0, 1]", step);
    if (!(sigma > 0 && sigma <= 10))
        return lc_err_set(err, LC_ERR_INVALID, "gpu_nn_segment: sigma %g is not in (0, 10]", sigma);
    int batch = o.batch > 0 ? o.batch : 1;
    if (in->in_shape[0] > 0)
        batch = (int)in->in_shape[0]; /* a fixed batch: the model's */
    if (batch > 256)
        return lc_err_set(err, LC_ERR_INVALID, "gpu_nn_segment: batch %d is over 256", batch);

    /* patch size (z, y, x) and the volume's (z, y, x) */
    int64_t ps[3], vd[3] = {(int64_t)img->nz, (int64_t)img->ny, (int64_t)img->nx};
    for (int a = 0; a < 3; a++) {
        int mi = sd == 3 ? 2 + a : 1 + a; /* the model's axis for ours (2D: y, x) */
        if (sd == 2 && a == 0) {
            ps[0] = 1;
            continue;
        }
        ps[a] = o.patch[a] > 0 ? o.patch[a] : in->in_shape[mi];
        if (ps[a] < 1)
            return lc_err_set(err, LC_ERR_INVALID,
                              "gpu_nn_segment: the model's input size is free along an axis: give "
                              "opts->patch");
        if (in->in_shape[mi] > 0 && ps[a] != in->in_shape[mi])
            return lc_err_set(err, LC_ERR_INVALID,
                              "gpu_nn_segment: patch %lld along an axis where the model takes %lld",
                              (long long)ps[a], (long long)in->in_shape[mi]);
    }
    size_t pvox = (size_t)(ps[0] * ps[1] * ps[2]), nvox = img->n;

    /* the plan of one batch of patches */
    nn_shape ish = {.rank = sd + 2};
    ish.d[0] = batch;
    ish.d[1] = 1;
    for (int a = 0; a < sd; a++)
        ish.d[2 + a] = ps[3 - sd + a];
    nn_plan *plan;
    if (nn_model_plan(m, &ish, &plan, err) != LC_OK)
        return lc_err_wrap(err, "gpu_nn_segment");
    const nn_shape *osh = &plan->out_shape;
    if (osh->rank != ish.rank || osh->d[0] != batch ||
        memcmp(osh->d + 2, ish.d + 2, (size_t)sd * sizeof(int64_t)) != 0 || osh->d[1] < 2 ||
        osh->d[1] > 256) {
        char a[96], b[96];
        return lc_err_set(err, LC_ERR_UNSUPPORTED,
                          "gpu_nn_segment: the model maps %s to %s: expected class scores of the "
                          "patch's size (2 to 256 classes)",
                          nn_shape_str(&ish, a, sizeof(a)), nn_shape_str(osh, b, sizeof(b)));
    }
    int nc = (int)osh->d[1];

    /* patch origins (volume coordinates; negative where the volume is padded) */
    int64_t pd[3], lo[3];
    for (int a = 0; a < 3; a++) {
        pd[a] = vd[a] > ps[a] ? vd[a] : ps[a];
        lo[a] = (pd[a] - vd[a]) / 2;
    }
    if (sd == 2) { /* every slice on its own */
        pd[0] = vd[0];
        lo[0] = 0;
    }
    size_t cap[3];
    for (int a = 0; a < 3; a++)
        cap[a] = (size_t)(pd[a] - ps[a] + 1);
    zs = malloc(cap[0] * sizeof(int64_t));
    ys = malloc(cap[1] * sizeof(int64_t));
    xs = malloc(cap[2] * sizeof(int64_t));
    if (!zs || !ys || !xs) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        goto out;
    }
    size_t nz, ny, nx;
    if (sd == 2) {
        nz = (size_t)vd[0];
        for (size_t i = 0; i < nz; i++)
            zs[i] = (int64_t)i;
    } else {
        nz = axis_steps(pd[0], ps[0], step, zs, cap[0]);
    }
    ny = axis_steps(pd[1], ps[1], step, ys, cap[1]);
    nx = axis_steps(pd[2], ps[2], step, xs, cap[2]);
    size_t npatch = nz * ny * nx;
    orgs = malloc(npatch * 3 * sizeof(int64_t));
    if (!orgs) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        goto out;
    }
    for (size_t i = 0, k = 0; i < nz; i++)
        for (size_t j = 0; j < ny; j++)
            for (size_t l = 0; l < nx; l++, k++) {
                orgs[3 * k] = zs[i] - lo[0];
                orgs[3 * k + 1] = ys[j] - lo[1];
                orgs[3 * k + 2] = xs[l] - lo[2];
            }

    /* the importance map, the sums (in the probability volume when one is asked for) */
    gauss_h = gaussian(ps, sigma);
    if (!gauss_h) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        goto out;
    }
    gauss_bytes = pvox * sizeof(float);
    if ((rc = gpu_mem_alloc(ctx, gauss_bytes, 0, &gauss, err)) != LC_OK ||
        (rc = ctx->ops->to_mem(ctx->impl, gauss, gauss_h, gauss_bytes, err)) != LC_OK)
        goto out;
    if (probs) {
        if ((rc = gpu_vol_new(ctx, GPU_F32, img->nx, img->ny, img->nz * (size_t)nc, &pv, err)) !=
            LC_OK)
            goto out;
        acc = pv->mem;
    } else {
        acc_bytes = nvox * (size_t)nc * sizeof(float);
        if ((rc = gpu_mem_alloc(ctx, acc_bytes, 1, &acc, err)) != LC_OK)
            goto out;
    }
    wsum_bytes = nvox * sizeof(float);
    if ((rc = gpu_mem_alloc(ctx, wsum_bytes, 1, &wsum, err)) != LC_OK)
        goto out;
    if ((rc = gpu_vol_alloc(ctx, GPU_U8, img->nx, img->ny, img->nz, 0, &lab, err)) != LC_OK)
        goto out;

    int nflip = o.mirror ? (sd == 3 ? 8 : 4) : 1;
    float w = 1.0f / (float)nflip;
    for (size_t b0 = 0; b0 < npatch; b0 += (size_t)batch) {
        size_t bn = b0 + (size_t)batch <= npatch ? (size_t)batch : npatch - b0;
        if (o.cancelled && o.cancelled(o.cancel_arg)) {
            rc = lc_err_set(err, LC_ERR_CANCELLED,
                            "gpu_nn_segment: cancelled after %zu of %zu patches", b0, npatch);
            goto out;
        }
        for (int f = 0; f < nflip; f++) {
            int flip = f; /* 2D: f < 4, bits 0 (x) and 1 (y) only */
            float *dst = nn_model_input(m, plan);
            for (size_t k = 0; k < (size_t)batch; k++) {
                size_t pi = b0 + (k < bn ? k : 0); /* a short last batch repeats its first */
                nn_patch p = {.vd = {vd[0], vd[1], vd[2]},
                              .org = {orgs[3 * pi], orgs[3 * pi + 1], orgs[3 * pi + 2]},
                              .ps = {ps[0], ps[1], ps[2]},
                              .flip = flip};
                if ((rc = m->be->win_crop(m->bm, img->mem, &p, dst + k * pvox, err)) != LC_OK)
                    goto out;
            }
            if ((rc = nn_model_run(m, plan, err)) != LC_OK)
                goto out;
            const float *lg = nn_model_output(m, plan);
            for (size_t k = 0; k < bn; k++) {
                size_t pi = b0 + k;
                nn_patch p = {.vd = {vd[0], vd[1], vd[2]},
                              .org = {orgs[3 * pi], orgs[3 * pi + 1], orgs[3 * pi + 2]},
                              .ps = {ps[0], ps[1], ps[2]},
                              .flip = flip};
                if ((rc = m->be->win_accum(m->bm, lg + k * (size_t)nc * pvox, nc, !m->out_is_prob,
                                           &p, gauss, w, acc, wsum, err)) != LC_OK)
                    goto out;
            }
        }
        if (o.progress) {
            if (m->be->sync && (rc = m->be->sync(m->bm, err)) != LC_OK)
                goto out;
            o.progress(o.progress_arg, b0 + bn, npatch);
        }
    }
    if ((rc = m->be->win_finish(m->bm, acc, wsum, nc, nvox, pv ? acc : NULL, lab->mem, err)) !=
        LC_OK)
        goto out;
    if (m->be->sync && (rc = m->be->sync(m->bm, err)) != LC_OK)
        goto out;
    *labels = lab;
    lab = NULL;
    if (probs) {
        *probs = pv;
        pv = NULL;
    }
out:
    gpu_vol_free(lab);
    gpu_vol_free(pv);
    gpu_mem_release(ctx, gauss, gauss_bytes);
    gpu_mem_release(ctx, acc_bytes ? acc : NULL, acc_bytes);
    gpu_mem_release(ctx, wsum, wsum_bytes);
    free(gauss_h);
    free(zs);
    free(ys);
    free(xs);
    free(orgs);
    return rc;
}
