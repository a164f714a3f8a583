/*
 * gpu.c: the public gpu_seg.h API: picks the backend at run time (CUDA when built with it and
 * a device answers, else the CPU reference), checks every argument once for all backends, and
 * forwards to the backend's vtable. Contexts own their backend; volumes belong to one context.
 * Thread safety: a context and its volumes are used by one thread at a time.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "lc/log.h"
#include "gpu_internal.h"

static const char *const backend_names[] = {
    [GPU_BACKEND_AUTO] = "auto",
    [GPU_BACKEND_CPU] = "cpu",
    [GPU_BACKEND_CUDA] = "cuda",
};

const char *gpu_backend_name(gpu_backend b)
{
    if ((int)b < 0 || (size_t)b >= sizeof(backend_names) / sizeof(backend_names[0]))
        return "unknown";
    return backend_names[b];
}

lc_rc gpu_backend_parse(const char *s, gpu_backend *out)
{
    for (size_t i = 0; s && i < sizeof(backend_names) / sizeof(backend_names[0]); i++) {
        if (strcmp(s, backend_names[i]) == 0) {
            *out = (gpu_backend)i;
            return LC_OK;
        }
    }
    return LC_ERR_INVALID;
}

#ifdef RADPIPE_HAVE_CUDA
static lc_rc open_cuda(int device, gpu_ctx *ctx, lc_err *err)
{
    return gpu_cuda_open(device, &ctx->ops, &ctx->impl, ctx->desc, sizeof(ctx->desc), err);
}
#else
static lc_rc open_cuda(int device, gpu_ctx *ctx, lc_err *err)
{
    (void)device;
    (void)ctx;
    return lc_err_set(err, LC_ERR_UNSUPPORTED, "radpipe was built without CUDA");
}
#endif

lc_rc gpu_ctx_open(const gpu_ctx_opts *opts, gpu_ctx **out, lc_err *err)
{
    lc_rc rc = LC_OK;
    gpu_ctx *ctx = NULL;

    if (!out)
        return lc_err_set(err, LC_ERR_INVALID, "gpu_ctx_open: out is NULL");
    *out = NULL;
    if (!opts)
        return lc_err_set(err, LC_ERR_INVALID, "gpu_ctx_open: opts is NULL");
    gpu_backend want = opts->backend;
    if (want != GPU_BACKEND_AUTO && want != GPU_BACKEND_CPU && want != GPU_BACKEND_CUDA)
        return lc_err_set(err, LC_ERR_INVALID, "unknown gpu backend %d", (int)want);
    if (opts->device < 0)
        return lc_err_set(err, LC_ERR_INVALID, "invalid CUDA device index %d", opts->device);
    if (opts->cpu_threads < 0)
        return lc_err_set(err, LC_ERR_INVALID, "invalid cpu thread count %d", opts->cpu_threads);

    ctx = calloc(1, sizeof(*ctx));
    if (!ctx)
        return lc_err_set(err, LC_ERR_NOMEM, "could not allocate a gpu context");
    ctx->mem_limit = opts->memory_limit;

    if (want != GPU_BACKEND_CPU) {
        lc_err cuda_err = {0};
        rc = open_cuda(opts->device, ctx, &cuda_err);
        if (rc == LC_OK) {
            ctx->backend = GPU_BACKEND_CUDA;
            goto opened;
        }
        /* No driver or no device is an expected state under AUTO; any other failure of a
         * present device (out of memory, busy) is reported, not hidden by a fallback. */
        if (want == GPU_BACKEND_CUDA || rc != LC_ERR_UNSUPPORTED) {
            lc_err_set(err, rc, "%s", lc_err_msg(&cuda_err));
            goto out;
        }
        lc_log_info("CUDA unavailable, using the CPU backend",
                    LC_LS("reason", lc_err_msg(&cuda_err)));
    }
    rc = gpu_ref_open(opts->cpu_threads, &ctx->ops, &ctx->impl, ctx->desc, sizeof(ctx->desc), err);
    if (rc != LC_OK)
        goto out;
    ctx->backend = GPU_BACKEND_CPU;

opened:
    if (opts->warm_up && (rc = gpu_ctx_warm_up(ctx, err)) != LC_OK) {
        ctx->ops->close(ctx->impl);
        goto out;
    }
out:
    if (rc != LC_OK) {
        free(ctx);
        return rc;
    }
    *out = ctx;
    return LC_OK;
}

lc_rc gpu_ctx_new(gpu_backend want, int device, int cpu_threads, gpu_ctx **out, lc_err *err)
{
    gpu_ctx_opts o = {.backend = want, .device = device, .cpu_threads = cpu_threads};
    return gpu_ctx_open(&o, out, err);
}

gpu_backend gpu_ctx_backend(const gpu_ctx *ctx)
{
    return ctx ? ctx->backend : GPU_BACKEND_CPU;
}

const char *gpu_ctx_describe(const gpu_ctx *ctx)
{
    return ctx ? ctx->desc : "none";
}

void gpu_ctx_memory(const gpu_ctx *ctx, gpu_mem_stats *out)
{
    if (!out)
        return;
    *out = (gpu_mem_stats){0};
    if (ctx)
        *out =
            (gpu_mem_stats){.used = ctx->mem_used, .peak = ctx->mem_peak, .limit = ctx->mem_limit};
}

void gpu_ctx_free(gpu_ctx *ctx)
{
    if (!ctx)
        return;
    if (ctx->live_vols)
        lc_log_warn("gpu context freed before its volumes", LC_LI("volumes", ctx->live_vols));
    ctx->ops->close(ctx->impl);
    free(ctx);
}

/* --- volumes ------------------------------------------------------------------------------ */

size_t gpu_dtype_size(gpu_dtype t)
{
    switch (t) {
    case GPU_F32:
        return sizeof(float);
    case GPU_U8:
        return 1;
    case GPU_I32:
        return sizeof(int32_t);
    }
    return 0;
}

const char *gpu_dtype_name(gpu_dtype t)
{
    return t == GPU_F32 ? "f32" : t == GPU_U8 ? "u8" : t == GPU_I32 ? "i32" : "unknown";
}

/* Backend memory, counted against the context's limit. Every allocation of volumes and
 * kernel scratch goes through here and back through mem_release. */
lc_rc gpu_mem_alloc(gpu_ctx *ctx, size_t nbytes, int zero, void **mem, lc_err *err)
{
    *mem = NULL;
    if (ctx->mem_limit && (nbytes > ctx->mem_limit || ctx->mem_used > ctx->mem_limit - nbytes))
        return lc_err_set(err, LC_ERR_TOO_LARGE,
                          "gpu memory limit reached: %zu more bytes requested, %zu in use, "
                          "limit %zu bytes",
                          nbytes, ctx->mem_used, ctx->mem_limit);
    lc_rc rc = ctx->ops->alloc(ctx->impl, nbytes, zero, mem, err);
    if (rc != LC_OK)
        return rc;
    ctx->mem_used += nbytes;
    if (ctx->mem_used > ctx->mem_peak)
        ctx->mem_peak = ctx->mem_used;
    return LC_OK;
}

void gpu_mem_release(gpu_ctx *ctx, void *mem, size_t nbytes)
{
    if (!mem)
        return;
    ctx->ops->release(ctx->impl, mem);
    ctx->mem_used -= nbytes;
}

/* A volume struct of checked size; mem is left to the caller (*out: free with free()). */
static lc_rc vol_make(gpu_ctx *ctx, gpu_dtype dtype, size_t nx, size_t ny, size_t nz, gpu_vol **out,
                      lc_err *err)
{
    gpu_vol *v = NULL;
    size_t esize = gpu_dtype_size(dtype);

    if (!ctx)
        return lc_err_set(err, LC_ERR_INVALID, "gpu volume: context or out is NULL");
    if (!esize)
        return lc_err_set(err, LC_ERR_INVALID, "unknown gpu volume type %d", (int)dtype);
    if (!nx || !ny || !nz)
        return lc_err_set(err, LC_ERR_INVALID, "invalid volume size %zux%zux%zu: empty", nx, ny,
                          nz);
    /* Each factor is checked before it multiplies, so the product never wraps. */
    if (nx > GPU_MAX_VOXELS || ny > GPU_MAX_VOXELS / nx || nz > GPU_MAX_VOXELS / (nx * ny))
        return lc_err_set(err, LC_ERR_TOO_LARGE,
                          "volume size %zux%zux%zu is over the limit of %zu voxels", nx, ny, nz,
                          GPU_MAX_VOXELS);

    v = calloc(1, sizeof(*v));
    if (!v)
        return lc_err_set(err, LC_ERR_NOMEM, "could not allocate a gpu volume");
    v->ctx = ctx;
    v->dtype = dtype;
    v->nx = nx;
    v->ny = ny;
    v->nz = nz;
    v->n = nx * ny * nz;
    v->nbytes = v->n * esize;
    *out = v;
    return LC_OK;
}

lc_rc gpu_vol_alloc(gpu_ctx *ctx, gpu_dtype dtype, size_t nx, size_t ny, size_t nz, int zero,
                    gpu_vol **out, lc_err *err)
{
    gpu_vol *v = NULL;
    lc_rc rc;
    if (!out)
        return lc_err_set(err, LC_ERR_INVALID, "gpu volume: context or out is NULL");
    *out = NULL;
    if ((rc = vol_make(ctx, dtype, nx, ny, nz, &v, err)) != LC_OK)
        return rc;
    rc = gpu_mem_alloc(ctx, v->nbytes, zero, &v->mem, err);
    if (rc != LC_OK) {
        free(v);
        return rc;
    }
    ctx->live_vols++;
    *out = v;
    return LC_OK;
}

lc_rc gpu_vol_new(gpu_ctx *ctx, gpu_dtype dtype, size_t nx, size_t ny, size_t nz, gpu_vol **out,
                  lc_err *err)
{
    return gpu_vol_alloc(ctx, dtype, nx, ny, nz, 1, out, err);
}

lc_rc gpu_vol_upload(gpu_ctx *ctx, gpu_dtype dtype, const void *host, size_t nx, size_t ny,
                     size_t nz, gpu_vol **out, lc_err *err)
{
    gpu_vol *v = NULL;
    lc_rc rc;

    if (!out)
        return lc_err_set(err, LC_ERR_INVALID, "gpu_vol_upload: out is NULL");
    *out = NULL;
    if (!host)
        return lc_err_set(err, LC_ERR_INVALID, "gpu_vol_upload: host buffer is NULL");
    rc = gpu_vol_alloc(ctx, dtype, nx, ny, nz, 0, &v, err);
    if (rc != LC_OK)
        return rc;
    rc = ctx->ops->to_mem(ctx->impl, v->mem, host, v->nbytes, err);
    if (rc != LC_OK) {
        gpu_vol_free(v);
        return rc;
    }
    *out = v;
    return LC_OK;
}

lc_rc gpu_vol_borrow(gpu_ctx *ctx, gpu_dtype dtype, const void *host, size_t nx, size_t ny,
                     size_t nz, gpu_vol **out, lc_err *err)
{
    gpu_vol *v = NULL;
    lc_rc rc;

    if (!out)
        return lc_err_set(err, LC_ERR_INVALID, "gpu_vol_borrow: out is NULL");
    *out = NULL;
    if (!host)
        return lc_err_set(err, LC_ERR_INVALID, "gpu_vol_borrow: host buffer is NULL");
    /* Only the CPU's memory is host memory; a misaligned buffer is copied rather than read
     * through misaligned pointers. */
    size_t esize = gpu_dtype_size(dtype);
    if (!ctx || ctx->backend != GPU_BACKEND_CPU || !esize || (uintptr_t)host % esize != 0) {
        rc = gpu_vol_upload(ctx, dtype, host, nx, ny, nz, &v, err);
    } else if ((rc = vol_make(ctx, dtype, nx, ny, nz, &v, err)) == LC_OK) {
        v->mem = (void *)(uintptr_t)host; /* never written: readonly below */
        v->borrowed = 1;
        ctx->live_vols++;
    }
    if (rc != LC_OK)
        return rc;
    v->readonly = 1;
    *out = v;
    return LC_OK;
}

lc_rc gpu_check_out(const gpu_ctx *ctx, const gpu_vol *v, gpu_dtype want, const char *what,
                    lc_err *err)
{
    lc_rc rc = gpu_check_vol(ctx, v, want, what, err);
    if (rc == LC_OK && v->readonly)
        return lc_err_set(err, LC_ERR_INVALID, "%s: the volume is read-only (gpu_vol_borrow)",
                          what);
    return rc;
}

lc_rc gpu_check_vol(const gpu_ctx *ctx, const gpu_vol *v, gpu_dtype want, const char *what,
                    lc_err *err)
{
    if (!ctx || !v)
        return lc_err_set(err, LC_ERR_INVALID, "%s: context or volume is NULL", what);
    if (v->ctx != ctx)
        return lc_err_set(err, LC_ERR_INVALID, "%s: the volume belongs to another context", what);
    if (v->dtype != want)
        return lc_err_set(err, LC_ERR_INVALID, "%s: volume of type %s, expected %s", what,
                          gpu_dtype_name(v->dtype), gpu_dtype_name(want));
    return LC_OK;
}

lc_rc gpu_check_dims(const gpu_vol *a, const gpu_vol *b, const char *what, lc_err *err)
{
    if (a->nx != b->nx || a->ny != b->ny || a->nz != b->nz)
        return lc_err_set(err, LC_ERR_INVALID, "%s: output is %zux%zux%zu, input is %zux%zux%zu",
                          what, b->nx, b->ny, b->nz, a->nx, a->ny, a->nz);
    return LC_OK;
}

lc_rc gpu_vol_download(gpu_ctx *ctx, const gpu_vol *v, void *host, lc_err *err)
{
    lc_rc rc = gpu_check_vol(ctx, v, v ? v->dtype : GPU_F32, "gpu_vol_download", err);
    if (rc != LC_OK)
        return rc;
    if (!host)
        return lc_err_set(err, LC_ERR_INVALID, "gpu_vol_download: host buffer is NULL");
    if (host == v->mem) /* a borrowed buffer downloaded onto itself */
        return LC_OK;
    return ctx->ops->to_host(ctx->impl, host, v->mem, v->nbytes, err);
}

void gpu_vol_free(gpu_vol *v)
{
    if (!v)
        return;
    if (!v->borrowed)
        gpu_mem_release(v->ctx, v->mem, v->nbytes);
    v->ctx->live_vols--;
    free(v);
}

gpu_dtype gpu_vol_dtype(const gpu_vol *v)
{
    return v->dtype;
}

void gpu_vol_dims(const gpu_vol *v, size_t dims[3])
{
    dims[0] = v->nx;
    dims[1] = v->ny;
    dims[2] = v->nz;
}

size_t gpu_vol_voxels(const gpu_vol *v)
{
    return v->n;
}

/* --- kernels ------------------------------------------------------------------------------ */

lc_rc gpu_minmax(gpu_ctx *ctx, const gpu_vol *v, float *lo, float *hi, lc_err *err)
{
    float l, h;
    lc_rc rc = gpu_check_vol(ctx, v, GPU_F32, "gpu_minmax", err);
    if (rc != LC_OK)
        return rc;
    if (!lo || !hi)
        return lc_err_set(err, LC_ERR_INVALID, "gpu_minmax: lo or hi is NULL");
    rc = ctx->ops->minmax(ctx->impl, v->mem, v->n, &l, &h, err);
    if (rc != LC_OK)
        return rc;
    if (l > h)
        return lc_err_set(err, LC_ERR_INVALID, "volume of %zu voxels holds only NaN", v->n);
    /* -0 and +0 compare equal, so which one a reduction keeps depends on its order; adding
     * +0 makes the answer the same on every backend and thread count. */
    *lo = l + 0.0f;
    *hi = h + 0.0f;
    return LC_OK;
}

/* Checks the histogram range and computes the scale of gpu_bin_of, in float. */
static lc_rc hist_scale(int nbins, float lo, float hi, float *scale, lc_err *err)
{
    if (nbins < 1 || nbins > GPU_MAX_BINS)
        return lc_err_set(err, LC_ERR_INVALID, "invalid histogram bin count %d: not in 1..%d",
                          nbins, GPU_MAX_BINS);
    if (!isfinite(lo) || !isfinite(hi) || !(lo < hi))
        return lc_err_set(err, LC_ERR_INVALID, "invalid histogram range [%g, %g]", (double)lo,
                          (double)hi);
    float width = hi - lo;
    float s = (float)nbins / width;
    if (!isfinite(width) || !isfinite(s))
        return lc_err_set(err, LC_ERR_INVALID,
                          "histogram range [%g, %g] cannot be split into %d bins in float",
                          (double)lo, (double)hi, nbins);
    *scale = s;
    return LC_OK;
}

lc_rc gpu_histogram(gpu_ctx *ctx, const gpu_vol *v, int nbins, float lo, float hi, uint64_t *hist,
                    lc_err *err)
{
    float scale;
    lc_rc rc = gpu_check_vol(ctx, v, GPU_F32, "gpu_histogram", err);
    if (rc != LC_OK)
        return rc;
    if (!hist)
        return lc_err_set(err, LC_ERR_INVALID, "gpu_histogram: hist is NULL");
    rc = hist_scale(nbins, lo, hi, &scale, err);
    if (rc != LC_OK)
        return rc;
    return ctx->ops->histogram(ctx->impl, v->mem, v->n, nbins, lo, scale, hist, err);
}

lc_rc gpu_histogram_minmax(gpu_ctx *ctx, const gpu_vol *v, int nbins, float lo, float hi,
                           uint64_t *hist, float *vmin, float *vmax, lc_err *err)
{
    float scale, l, h;
    lc_rc rc = gpu_check_vol(ctx, v, GPU_F32, "gpu_histogram_minmax", err);
    if (rc != LC_OK)
        return rc;
    if (!hist || !vmin || !vmax)
        return lc_err_set(err, LC_ERR_INVALID, "gpu_histogram_minmax: hist, vmin or vmax is NULL");
    if ((rc = hist_scale(nbins, lo, hi, &scale, err)) != LC_OK)
        return rc;
    if (!ctx->ops->minmax_histogram) { /* two passes */
        if ((rc = gpu_minmax(ctx, v, vmin, vmax, err)) != LC_OK)
            return rc;
        return ctx->ops->histogram(ctx->impl, v->mem, v->n, nbins, lo, scale, hist, err);
    }
    rc = ctx->ops->minmax_histogram(ctx->impl, v->mem, v->n, nbins, lo, scale, hist, &l, &h, err);
    if (rc != LC_OK)
        return rc;
    if (l > h)
        return lc_err_set(err, LC_ERR_INVALID, "volume of %zu voxels holds only NaN", v->n);
    *vmin = l + 0.0f; /* as gpu_minmax */
    *vmax = h + 0.0f;
    return LC_OK;
}

lc_rc gpu_otsu_threshold(gpu_ctx *ctx, const gpu_vol *v, int nbins, float *threshold, lc_err *err)
{
    float lo, hi, scale;
    uint64_t *hist = NULL;
    lc_rc rc = gpu_check_vol(ctx, v, GPU_F32, "gpu_otsu_threshold", err);
    if (rc != LC_OK)
        return rc;
    if (!threshold)
        return lc_err_set(err, LC_ERR_INVALID, "gpu_otsu_threshold: threshold is NULL");
    if (nbins < 2 || nbins > GPU_MAX_BINS)
        return lc_err_set(err, LC_ERR_INVALID, "invalid Otsu bin count %d: not in 2..%d", nbins,
                          GPU_MAX_BINS);
    rc = gpu_minmax(ctx, v, &lo, &hi, err);
    if (rc != LC_OK)
        return rc;
    if (!isfinite(lo) || !isfinite(hi))
        return lc_err_set(err, LC_ERR_INVALID,
                          "cannot compute Otsu's threshold: the volume holds infinite values");
    if (lo == hi) { /* one value: scikit-image returns it */
        *threshold = lo;
        return LC_OK;
    }
    rc = hist_scale(nbins, lo, hi, &scale, err);
    if (rc != LC_OK)
        return rc;
    hist = malloc((size_t)nbins * sizeof(*hist));
    if (!hist)
        return lc_err_set(err, LC_ERR_NOMEM, "could not allocate a histogram of %d bins", nbins);
    rc = ctx->ops->histogram(ctx->impl, v->mem, v->n, nbins, lo, scale, hist, err);
    if (rc == LC_OK)
        rc = gpu_otsu_from_hist(hist, nbins, lo, hi, threshold, err);
    free(hist);
    return rc;
}

lc_rc gpu_threshold(gpu_ctx *ctx, const gpu_vol *in, float lo, float hi, gpu_vol *out, lc_err *err)
{
    lc_rc rc = gpu_check_vol(ctx, in, GPU_F32, "gpu_threshold input", err);
    if (rc == LC_OK)
        rc = gpu_check_out(ctx, out, GPU_U8, "gpu_threshold output", err);
    if (rc != LC_OK)
        return rc;
    if ((rc = gpu_check_dims(in, out, "gpu_threshold", err)) != LC_OK)
        return rc;
    if (isnan(lo) || isnan(hi) || lo > hi)
        return lc_err_set(err, LC_ERR_INVALID, "invalid threshold range [%g, %g]", (double)lo,
                          (double)hi);
    return ctx->ops->threshold(ctx->impl, in->mem, in->n, lo, hi, out->mem, err);
}

lc_rc gpu_window(gpu_ctx *ctx, const gpu_vol *in, float level, float width, gpu_vol *out,
                 lc_err *err)
{
    lc_rc rc = gpu_check_vol(ctx, in, GPU_F32, "gpu_window input", err);
    if (rc == LC_OK)
        rc = gpu_check_out(ctx, out, GPU_F32, "gpu_window output", err);
    if (rc == LC_OK)
        rc = gpu_check_dims(in, out, "gpu_window", err);
    if (rc != LC_OK)
        return rc;
    float half = width / 2, a = level - half, b = level + half, inv = 1.0f / width;
    if (!isfinite(level) || !isfinite(width) || !(width > 0) || !isfinite(a) || !isfinite(b) ||
        !isfinite(inv) || !(a < b))
        return lc_err_set(err, LC_ERR_INVALID, "invalid window: level %g, width %g", (double)level,
                          (double)width);
    return ctx->ops->window(ctx->impl, in->mem, in->n, a, b, inv, out->mem, err);
}

lc_rc gpu_count_nonzero(gpu_ctx *ctx, const gpu_vol *mask, uint64_t *count, lc_err *err)
{
    lc_rc rc = gpu_check_vol(ctx, mask, GPU_U8, "gpu_count_nonzero", err);
    if (rc != LC_OK)
        return rc;
    if (!count)
        return lc_err_set(err, LC_ERR_INVALID, "gpu_count_nonzero: count is NULL");
    return ctx->ops->count(ctx->impl, mask->mem, mask->n, count, err);
}
