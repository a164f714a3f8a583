/*
 * gpu_seg.h: radpipe's segmentation kernels behind one API, on CUDA (gpu/cuda) or on the CPU
 * (gpu/ref), chosen at run time. A gpu_ctx owns the backend (one CUDA stream, or a CPU thread
 * count); a gpu_vol is a volume that stays in the backend's memory across a pipeline.
 * Thread safety: a context and its volumes are used by one thread at a time; distinct
 * contexts may be used from distinct threads.
 */
#ifndef GPU_SEG_H
#define GPU_SEG_H

#include <stddef.h>
#include <stdint.h>
#include <stdarg.h>

#ifdef __cplusplus
extern "C" {
#endif

#include "lc/rc.h"

typedef enum gpu_backend {
    GPU_BACKEND_AUTO = 0, /* CUDA when built with it and a device answers, else CPU */
    GPU_BACKEND_CPU,
    GPU_BACKEND_CUDA,
} gpu_backend;

typedef enum gpu_dtype {
    GPU_F32 = 1, /* float images (intensities, Hounsfield units) */
    GPU_U8,      /* masks: 0 or 1 */
} gpu_dtype;

/* Histograms have at most this many bins. */
#define GPU_MAX_BINS 65536
/* A volume holds at most this many voxels (256 GiB of float), so sizes never overflow. */
#define GPU_MAX_VOXELS ((size_t)1 << 36)

typedef struct gpu_ctx gpu_ctx;
typedef struct gpu_vol gpu_vol;

/* "auto", "cpu", "cuda" (and back); parse returns LC_ERR_INVALID for anything else. */
const char *gpu_backend_name(gpu_backend b);
lc_rc gpu_backend_parse(const char *s, gpu_backend *out);

/* Open a context. want: AUTO picks CUDA device `device` when radpipe was built with CUDA and
 * the driver reports a device; with no driver or no device it falls back to the CPU and logs
 * one info line with the reason. CUDA asked for explicitly but unavailable: LC_ERR_UNSUPPORTED.
 * device: CUDA device index (>= 0; ignored for CPU). cpu_threads: worker threads of the CPU
 * backend, 0 = online CPUs (ignored for CUDA). *out: caller frees with gpu_ctx_free. */
lc_rc gpu_ctx_new(gpu_backend want, int device, int cpu_threads, gpu_ctx **out, lc_err *err);
/* The backend in use: GPU_BACKEND_CPU or GPU_BACKEND_CUDA, never AUTO. */
gpu_backend gpu_ctx_backend(const gpu_ctx *ctx);
/* "cpu (2 threads)" or "cuda: NVIDIA H100 80GB HBM3 (sm_90, 79 GiB)"; borrowed, valid as long
 * as ctx. */
const char *gpu_ctx_describe(const gpu_ctx *ctx);
/* Accepts NULL. Every volume of ctx must be freed first. */
void gpu_ctx_free(gpu_ctx *ctx);

/* A new volume of nx*ny*nz voxels (x fastest), zero-filled. *out: free with gpu_vol_free. */
lc_rc gpu_vol_new(gpu_ctx *ctx, gpu_dtype dtype, size_t nx, size_t ny, size_t nz, gpu_vol **out,
                  lc_err *err);
/* A new volume holding a copy of host (borrowed; nx*ny*nz elements of dtype, x fastest):
 * exactly one host-to-device copy. *out: free with gpu_vol_free. */
lc_rc gpu_vol_upload(gpu_ctx *ctx, gpu_dtype dtype, const void *host, size_t nx, size_t ny,
                     size_t nz, gpu_vol **out, lc_err *err);
/* Copy v into host (borrowed, room for gpu_vol_voxels(v) elements of v's dtype): exactly one
 * device-to-host copy; waits for all work queued on ctx. */
lc_rc gpu_vol_download(gpu_ctx *ctx, const gpu_vol *v, void *host, lc_err *err);
/* Accepts NULL. */
void gpu_vol_free(gpu_vol *v);
gpu_dtype gpu_vol_dtype(const gpu_vol *v);
/* dims[0..2] = nx, ny, nz */
void gpu_vol_dims(const gpu_vol *v, size_t dims[3]);
size_t gpu_vol_voxels(const gpu_vol *v);

/* Smallest and largest value of a GPU_F32 volume, NaN ignored (-0 is reported as +0).
 * LC_ERR_INVALID when every voxel is NaN. */
lc_rc gpu_minmax(gpu_ctx *ctx, const gpu_vol *v, float *lo, float *hi, lc_err *err);

/* Histogram of a GPU_F32 volume into hist[0..nbins-1] (caller's array, overwritten).
 * 1 <= nbins <= GPU_MAX_BINS; lo < hi, both finite. NaN voxels are not counted; values below
 * lo land in bin 0, values above hi in bin nbins-1. The bin of x is computed in float, the
 * same way on every backend, so counts are identical everywhere:
 *     scale = (float)nbins / (hi - lo);  f = (x - lo) * scale;
 *     bin = f <= 0 ? 0 : f >= nbins ? nbins - 1 : (int)f                                    */
lc_rc gpu_histogram(gpu_ctx *ctx, const gpu_vol *v, int nbins, float lo, float hi, uint64_t *hist,
                    lc_err *err);

/* Otsu's threshold of a GPU_F32 volume with scikit-image's threshold_otsu convention: the
 * histogram of nbins (2..GPU_MAX_BINS) bins between the volume's min and max; the threshold
 * is the centre of the bin k that maximises the between-class variance of bins [0..k] vs
 * [k+1..], i.e. min + (k + 0.5) * (max - min) / nbins (first k on ties). A constant volume
 * returns its value. Only the histogram leaves the device. LC_ERR_INVALID when the volume is
 * all NaN or holds infinities. */
lc_rc gpu_otsu_threshold(gpu_ctx *ctx, const gpu_vol *v, int nbins, float *threshold, lc_err *err);

/* out[i] = 1 where lo <= in[i] <= hi (both inclusive; hi may be +INFINITY, lo -INFINITY),
 * else 0 (NaN gives 0). in: GPU_F32; out: GPU_U8 of the same dims (both borrowed). */
lc_rc gpu_threshold(gpu_ctx *ctx, const gpu_vol *in, float lo, float hi, gpu_vol *out, lc_err *err);

#ifdef __cplusplus
}
#endif

#endif
