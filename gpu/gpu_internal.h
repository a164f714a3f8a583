/*
 * gpu_internal.h: what gpu/gpu.c shares with the backends (gpu/ref in C, gpu/cuda in C++):
 * the backend vtable, the context and volume structs, and the one histogram bin formula that
 * every backend uses so their counts are bit-identical. Not for use outside gpu/.
 * Thread safety: as gpu_seg.h (a context is used by one thread at a time).
 */
#ifndef GPU_INTERNAL_H
#define GPU_INTERNAL_H

#include "gpu_seg.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Backend operations on backend memory ("mem": host memory for the CPU, device memory for
 * CUDA). gpu.c validates every argument first: n > 0, matching dtypes and sizes, nbins in
 * range, so backends only report their own failures. */
typedef struct gpu_ops {
    void (*close)(void *impl);
    /* nbytes > 0; zero-filled when zero != 0. *mem is released with release. */
    lc_rc (*alloc)(void *impl, size_t nbytes, int zero, void **mem, lc_err *err);
    void (*release)(void *impl, void *mem);
    /* Synchronous copies: on return the host buffer may be reused or read. */
    lc_rc (*to_mem)(void *impl, void *mem, const void *host, size_t nbytes, lc_err *err);
    lc_rc (*to_host)(void *impl, void *host, const void *mem, size_t nbytes, lc_err *err);
    /* NaN ignored; *lo = +INF and *hi = -INF when every value is NaN. */
    lc_rc (*minmax)(void *impl, const float *x, size_t n, float *lo, float *hi, lc_err *err);
    /* hist (host, nbins entries) is overwritten; bins by gpu_bin_of(x, lo, scale, nbins). */
    lc_rc (*histogram)(void *impl, const float *x, size_t n, int nbins, float lo, float scale,
                       uint64_t *hist, lc_err *err);
    lc_rc (*threshold)(void *impl, const float *x, size_t n, float lo, float hi, uint8_t *out,
                       lc_err *err);
} gpu_ops;

struct gpu_ctx {
    gpu_backend backend;
    const gpu_ops *ops;
    void *impl;
    size_t live_vols; /* volumes not yet freed: gpu_ctx_free checks it is 0 */
    char desc[160];
};

struct gpu_vol {
    gpu_ctx *ctx; /* the context whose memory holds mem */
    gpu_dtype dtype;
    size_t nx, ny, nz, n, nbytes;
    void *mem;
};

/* Open a backend: fills *ops, *impl (closed with ops->close) and a description. The CUDA
 * backend answers LC_ERR_UNSUPPORTED when there is no driver or no device. */
lc_rc gpu_ref_open(int threads, const gpu_ops **ops, void **impl, char *desc, size_t cap,
                   lc_err *err);
#ifdef RADPIPE_HAVE_CUDA
lc_rc gpu_cuda_open(int device, const gpu_ops **ops, void **impl, char *desc, size_t cap,
                    lc_err *err);
#endif

/* Otsu's threshold from a histogram of nbins >= 2 bins over [lo, hi]: the centre of the bin
 * that maximises the between-class variance (scikit-image's convention). Host code shared
 * by all backends. */
lc_rc gpu_otsu_from_hist(const uint64_t *hist, int nbins, float lo, float hi, float *threshold,
                         lc_err *err);

#ifdef __cplusplus
}
#endif

/* The bin formula, shared verbatim by C and CUDA. scale = (float)nbins / (hi - lo) is computed
 * once on the host (gpu.c) and passed to every backend. Both steps are single IEEE float
 * operations (no contraction into an FMA is possible: a subtraction feeds a product), so the
 * CPU (SSE) and the GPU (no fast-math, denormals kept) round identically. The clamps happen
 * in float before the conversion so an out-of-range float never reaches (int). x is not NaN. */
#ifdef __CUDACC__
#define GPU_HD static inline __host__ __device__
#else
#define GPU_HD static inline
#endif

GPU_HD int gpu_bin_of(float x, float lo, float scale, int nbins)
{
    float f = (x - lo) * scale;
    if (!(f > 0.0f))
        return 0;
    if (f >= (float)nbins)
        return nbins - 1;
    int b = (int)f;
    return b < nbins ? b : nbins - 1;
}

#endif
