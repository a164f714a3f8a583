/*
 * cuda_ctx.cu: the CUDA backend of gpu_seg.h, part 1: opening a device with one stream,
 * device memory and the host<->device copies. Volumes live in device memory from upload to
 * download; every copy and kernel of a context is queued on its one stream.
 * Thread safety: a context is used by one host thread at a time (gpu_seg.h).
 */
#include <stdio.h>
#include <stdlib.h>
#include "cuda_internal.h"

lc_rc gpu_cu_fail(lc_err *err, cudaError_t e, const char *what)
{
    lc_rc rc = e == cudaErrorMemoryAllocation ? LC_ERR_NOMEM : LC_ERR_INTERNAL;
    return lc_err_set(err, rc, "could not %s: %s (%s)", what, cudaGetErrorString(e),
                      cudaGetErrorName(e));
}

lc_rc gpu_cu_launched(lc_err *err, const char *what)
{
    cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? LC_OK : gpu_cu_fail(err, e, what);
}

lc_rc gpu_cu_fetch(gpu_cu_impl *c, void *host, const void *dev, size_t nbytes, const char *what,
                   lc_err *err)
{
    cudaError_t e = cudaMemcpyAsync(host, dev, nbytes, cudaMemcpyDeviceToHost, c->stream);
    if (e == cudaSuccess)
        e = cudaStreamSynchronize(c->stream);
    return e == cudaSuccess ? LC_OK : gpu_cu_fail(err, e, what);
}

lc_rc gpu_cu_enter(gpu_cu_impl *c, lc_err *err)
{
    cudaError_t e = cudaSetDevice(c->device);
    return e == cudaSuccess ? LC_OK : gpu_cu_fail(err, e, "select the CUDA device");
}

static void cu_close(void *impl)
{
    gpu_cu_impl *c = static_cast<gpu_cu_impl *>(impl);
    if (!c)
        return;
    /* Errors are ignored on the way out: there is nobody left to report them to. */
    if (cudaSetDevice(c->device) == cudaSuccess) {
        if (c->stream)
            cudaStreamSynchronize(c->stream);
        cudaFree(c->d_part);
        cudaFree(c->d_hist);
        cudaFree(c->d_se);
        cudaFree(c->d_scalar);
        if (c->stream)
            cudaStreamDestroy(c->stream);
    }
    free(c);
}

static lc_rc cu_alloc(void *impl, size_t nbytes, int zero, void **mem, lc_err *err)
{
    gpu_cu_impl *c = static_cast<gpu_cu_impl *>(impl);
    cudaError_t e;
    void *p = NULL;
    lc_rc rc = gpu_cu_enter(c, err);
    if (rc != LC_OK)
        return rc;
    e = cudaMalloc(&p, nbytes);
    if (e != cudaSuccess) {
        cudaGetLastError(); /* allocation failures are not sticky: clear it */
        return lc_err_set(err, e == cudaErrorMemoryAllocation ? LC_ERR_NOMEM : LC_ERR_INTERNAL,
                          "could not allocate %zu bytes of device memory: %s", nbytes,
                          cudaGetErrorString(e));
    }
    if (zero) {
        e = cudaMemsetAsync(p, 0, nbytes, c->stream);
        if (e != cudaSuccess) {
            cudaFree(p);
            return gpu_cu_fail(err, e, "clear a device volume");
        }
    }
    *mem = p;
    return LC_OK;
}

static void cu_release(void *impl, void *mem)
{
    gpu_cu_impl *c = static_cast<gpu_cu_impl *>(impl);
    /* cudaFree waits for the device, so queued kernels reading mem finish first. */
    if (mem && cudaSetDevice(c->device) == cudaSuccess)
        cudaFree(mem);
}

static lc_rc cu_copy(gpu_cu_impl *c, void *dst, const void *src, size_t nbytes, cudaMemcpyKind kind,
                     const char *what, lc_err *err)
{
    cudaError_t e;
    lc_rc rc = gpu_cu_enter(c, err);
    if (rc != LC_OK)
        return rc;
    e = cudaMemcpyAsync(dst, src, nbytes, kind, c->stream);
    if (e == cudaSuccess) /* the host buffer is the caller's again only after this */
        e = cudaStreamSynchronize(c->stream);
    return e == cudaSuccess ? LC_OK : gpu_cu_fail(err, e, what);
}

static lc_rc cu_to_mem(void *impl, void *mem, const void *host, size_t nbytes, lc_err *err)
{
    return cu_copy(static_cast<gpu_cu_impl *>(impl), mem, host, nbytes, cudaMemcpyHostToDevice,
                   "copy a volume to the device", err);
}

static lc_rc cu_to_host(void *impl, void *host, const void *mem, size_t nbytes, lc_err *err)
{
    return cu_copy(static_cast<gpu_cu_impl *>(impl), host, mem, nbytes, cudaMemcpyDeviceToHost,
                   "copy a volume from the device", err);
}

/* Positional: C++17 has no designated initialisers. Order of gpu_ops in gpu_internal.h. */
static const gpu_ops cu_ops = {
    cu_close,             /* close */
    cu_alloc,             /* alloc */
    cu_release,           /* release */
    cu_to_mem,            /* to_mem */
    cu_to_host,           /* to_host */
    gpu_cu_minmax,        /* minmax */
    gpu_cu_histogram,     /* histogram */
    gpu_cu_threshold,     /* threshold */
    gpu_cu_window,        /* window */
    gpu_cu_count,         /* count */
    gpu_cu_morph,         /* morph */
    gpu_cu_label_scratch, /* label_scratch */
    gpu_cu_label,         /* label */
    gpu_cu_label_sizes,   /* label_sizes */
    gpu_cu_lut,           /* lut */
    gpu_cu_mark_border,   /* mark_border */
    gpu_cu_resample,      /* resample */
};

extern "C" lc_rc gpu_cuda_open(int device, const gpu_ops **ops, void **impl, char *desc, size_t cap,
                               lc_err *err)
{
    int count = 0;
    cudaDeviceProp prop;
    gpu_cu_impl *c = NULL;
    cudaError_t e = cudaGetDeviceCount(&count);
    lc_rc rc = LC_OK;

    /* No driver, a driver older than the runtime, or no device: CUDA is simply absent. */
    if (e != cudaSuccess) {
        cudaGetLastError();
        return lc_err_set(err, LC_ERR_UNSUPPORTED, "no CUDA device: %s", cudaGetErrorString(e));
    }
    if (count == 0)
        return lc_err_set(err, LC_ERR_UNSUPPORTED, "no CUDA device: the driver reports none");
    if (device >= count)
        return lc_err_set(err, LC_ERR_INVALID, "CUDA device %d does not exist (%d device%s)",
                          device, count, count == 1 ? "" : "s");

    c = static_cast<gpu_cu_impl *>(calloc(1, sizeof(*c)));
    if (!c)
        return lc_err_set(err, LC_ERR_NOMEM, "could not allocate the CUDA backend");
    c->device = device;
    if ((e = cudaSetDevice(device)) != cudaSuccess ||
        (e = cudaGetDeviceProperties(&prop, device)) != cudaSuccess) {
        rc = gpu_cu_fail(err, e, "open the CUDA device");
        goto out;
    }
    c->sm_count = prop.multiProcessorCount > 0 ? prop.multiProcessorCount : 1;
    if ((e = cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking)) != cudaSuccess) {
        rc = gpu_cu_fail(err, e, "create a CUDA stream");
        goto out;
    }
    if ((e = cudaMalloc(&c->d_part, 2 * CU_MAX_BLOCKS * sizeof(float))) != cudaSuccess ||
        (e = cudaMalloc(&c->d_hist, GPU_MAX_BINS * sizeof(unsigned long long))) != cudaSuccess ||
        (e = cudaMalloc(&c->d_se, GPU_MORPH_MAX_W)) != cudaSuccess ||
        (e = cudaMalloc(&c->d_scalar, CU_SCALARS * sizeof(unsigned long long))) != cudaSuccess) {
        rc = gpu_cu_fail(err, e, "allocate CUDA scratch buffers");
        goto out;
    }
    snprintf(desc, cap, "cuda: %s (sm_%d%d, %.0f GiB)", prop.name, prop.major, prop.minor,
             (double)prop.totalGlobalMem / (1024.0 * 1024.0 * 1024.0));
    *ops = &cu_ops;
    *impl = c;
out:
    if (rc != LC_OK)
        cu_close(c);
    return rc;
}
