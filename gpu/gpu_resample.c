/*
 * gpu_resample.c: the front-end of resampling to a new spacing (gpu_seg.h): the output size
 * rule, argument checks, and the per-axis ratio rounded to float once here so both backends
 * compute the same sample positions (gpu_rs_linear / gpu_rs_nearest in gpu_internal.h).
 * Thread safety: stateless apart from the context, which one thread uses at a time.
 */
#include <math.h>
#include "gpu_internal.h"

static lc_rc check_spacing(const double sp[3], const char *what, lc_err *err)
{
    if (!sp)
        return lc_err_set(err, LC_ERR_INVALID, "%s spacing is NULL", what);
    for (int a = 0; a < 3; a++)
        if (!isfinite(sp[a]) || !(sp[a] > 0))
            return lc_err_set(err, LC_ERR_INVALID, "invalid %s spacing %g along %c", what, sp[a],
                              "xyz"[a]);
    return LC_OK;
}

lc_rc gpu_resample_dims(const size_t in_dims[3], const double in_spacing[3],
                        const double out_spacing[3], size_t out_dims[3], lc_err *err)
{
    lc_rc rc;
    size_t d[3];
    if (!in_dims || !out_dims)
        return lc_err_set(err, LC_ERR_INVALID, "gpu_resample_dims: dims are NULL");
    if ((rc = check_spacing(in_spacing, "input", err)) != LC_OK ||
        (rc = check_spacing(out_spacing, "output", err)) != LC_OK)
        return rc;
    for (int a = 0; a < 3; a++) {
        if (!in_dims[a])
            return lc_err_set(err, LC_ERR_INVALID, "gpu_resample_dims: empty input");
        double m = round((double)in_dims[a] * in_spacing[a] / out_spacing[a]);
        if (!(m <= (double)GPU_MAX_VOXELS))
            return lc_err_set(err, LC_ERR_TOO_LARGE,
                              "resampling to spacing %g along %c gives over %zu voxels",
                              out_spacing[a], "xyz"[a], GPU_MAX_VOXELS);
        d[a] = m < 1 ? 1 : (size_t)m;
    }
    if (d[1] > GPU_MAX_VOXELS / d[0] || d[2] > GPU_MAX_VOXELS / (d[0] * d[1]))
        return lc_err_set(err, LC_ERR_TOO_LARGE,
                          "resampled volume %zux%zux%zu is over the limit of %zu voxels", d[0],
                          d[1], d[2], GPU_MAX_VOXELS);
    for (int a = 0; a < 3; a++)
        out_dims[a] = d[a];
    return LC_OK;
}

lc_rc gpu_resample(gpu_ctx *ctx, const gpu_vol *in, const double in_spacing[3],
                   const double out_spacing[3], gpu_interp interp, gpu_vol *out, lc_err *err)
{
    gpu_resample_job j = {0};
    lc_rc rc;
    if (!in)
        return lc_err_set(err, LC_ERR_INVALID, "gpu_resample: input is NULL");
    if ((rc = gpu_check_vol(ctx, in, in->dtype, "gpu_resample input", err)) != LC_OK ||
        (rc = gpu_check_out(ctx, out, in->dtype, "gpu_resample output", err)) != LC_OK)
        return rc;
    if (in == out || in->mem == out->mem)
        return lc_err_set(err, LC_ERR_INVALID, "gpu_resample: output is the input");
    if (interp != GPU_INTERP_NEAREST && interp != GPU_INTERP_LINEAR)
        return lc_err_set(err, LC_ERR_INVALID, "unknown interpolation %d", (int)interp);
    if (interp == GPU_INTERP_LINEAR && in->dtype != GPU_F32)
        return lc_err_set(err, LC_ERR_INVALID,
                          "gpu_resample: linear interpolation of a %s volume (labels and masks "
                          "take nearest)",
                          gpu_dtype_name(in->dtype));
    if ((rc = check_spacing(in_spacing, "input", err)) != LC_OK ||
        (rc = check_spacing(out_spacing, "output", err)) != LC_OK)
        return rc;
    for (int a = 0; a < 3; a++) {
        float r = (float)(out_spacing[a] / in_spacing[a]);
        if (!isfinite(r) || !(r > 0))
            return lc_err_set(err, LC_ERR_INVALID,
                              "spacing ratio %g / %g along %c is not representable in float",
                              out_spacing[a], in_spacing[a], "xyz"[a]);
        j.ratio[a] = r;
    }
    j.in = in->mem;
    j.out = out->mem;
    j.dtype = in->dtype;
    j.interp = interp;
    j.in_dims[0] = in->nx;
    j.in_dims[1] = in->ny;
    j.in_dims[2] = in->nz;
    j.out_dims[0] = out->nx;
    j.out_dims[1] = out->ny;
    j.out_dims[2] = out->nz;
    return ctx->ops->resample(ctx->impl, &j, err);
}
