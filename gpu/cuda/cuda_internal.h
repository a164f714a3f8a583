/*
 * cuda_internal.h: what the CUDA translation units share: the backend's state (device, one
 * stream, small scratch buffers), launch and error helpers, and the gpu_ops entries each
 * file implements. C++ for nvcc only.
 * Thread safety: a gpu_cu_impl is used by one host thread at a time (its gpu_ctx's rule).
 */
#ifndef CUDA_INTERNAL_H
#define CUDA_INTERNAL_H

#include <cuda_runtime.h>
#include "gpu_internal.h"

/* Upper bound of blocks a reduction launches; sizes the partials buffer. */
#define CU_MAX_BLOCKS 1024
#define CU_THREADS    256

typedef struct gpu_cu_impl {
    int device;
    int sm_count;
    cudaStream_t stream;
    float *d_part;                /* 2 * CU_MAX_BLOCKS min/max partials */
    unsigned long long *d_hist;   /* GPU_MAX_BINS counters */
    int8_t *d_se;                 /* GPU_MORPH_MAX_W half-widths of a structuring element */
    unsigned long long *d_scalar; /* CU_SCALARS small results (counts, label totals) */
} gpu_cu_impl;

#define CU_SCALARS 4

/* Enough blocks of CU_THREADS to fill the device, never more than the work or CU_MAX_BLOCKS
 * (grid-stride kernels cover the rest). */
static inline unsigned gpu_cu_grid(const gpu_cu_impl *c, size_t n)
{
    size_t want = (n + CU_THREADS - 1) / CU_THREADS;
    size_t fill = (size_t)c->sm_count * 8;
    size_t g = want < fill ? want : fill;
    if (g > CU_MAX_BLOCKS)
        g = CU_MAX_BLOCKS;
    return g ? (unsigned)g : 1u;
}

/* Checks the launch just queued; returns LC_OK or the error in err. */
lc_rc gpu_cu_launched(lc_err *err, const char *what);
/* Copies nbytes of device memory to host on the stream and waits for it. */
lc_rc gpu_cu_fetch(gpu_cu_impl *c, void *host, const void *dev, size_t nbytes, const char *what,
                   lc_err *err);

/* Fill err from a CUDA error: out of memory -> LC_ERR_NOMEM, anything else -> LC_ERR_INTERNAL
 * (a launch or device fault is a bug or a broken device, not bad input). Returns the rc. */
lc_rc gpu_cu_fail(lc_err *err, cudaError_t e, const char *what);
/* Make impl's device current on this host thread (contexts may move between threads). */
lc_rc gpu_cu_enter(gpu_cu_impl *c, lc_err *err);

/* Kernels, all queued on c->stream: those returning a value (min/max, histogram, count,
 * label count) wait for it; the others return once queued (later calls on the stream are
 * ordered after them). cuda_kernels.cu: */
lc_rc gpu_cu_minmax(void *impl, const float *x, size_t n, float *lo, float *hi, lc_err *err);
lc_rc gpu_cu_histogram(void *impl, const float *x, size_t n, int nbins, float lo, float scale,
                       uint64_t *hist, lc_err *err);
lc_rc gpu_cu_threshold(void *impl, const float *x, size_t n, float lo, float hi, uint8_t *out,
                       lc_err *err);
lc_rc gpu_cu_window(void *impl, const float *x, size_t n, float a, float b, float inv_width,
                    float *out, lc_err *err);
lc_rc gpu_cu_count(void *impl, const uint8_t *m, size_t n, uint64_t *count, lc_err *err);
/* cuda_morph.cu */
lc_rc gpu_cu_morph(void *impl, const gpu_morph_pass *p, lc_err *err);
/* cuda_label.cu */
size_t gpu_cu_label_scratch(void *impl, size_t n);
lc_rc gpu_cu_label(void *impl, const uint8_t *m, int invert, const size_t dims[3], int conn,
                   int32_t *labels, void *scratch, size_t *nlabels, lc_err *err);
lc_rc gpu_cu_label_sizes(void *impl, const int32_t *labels, size_t n, size_t nlabels,
                         uint64_t *counts, lc_err *err);
lc_rc gpu_cu_lut(void *impl, const int32_t *labels, size_t n, const uint8_t *table, size_t ntable,
                 uint8_t flip, uint8_t *out, lc_err *err);
lc_rc gpu_cu_mark_border(void *impl, const int32_t *labels, const size_t dims[3], int planar,
                         uint8_t *table, size_t ntable, lc_err *err);
/* cuda_resample.cu */
lc_rc gpu_cu_resample(void *impl, const gpu_resample_job *j, lc_err *err);

#endif
