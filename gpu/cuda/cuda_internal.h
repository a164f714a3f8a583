/*
 * cuda_internal.h: what the two CUDA translation units share: the backend's state (device,
 * one stream, small scratch buffers) and the error helpers. C++ for nvcc only.
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
    float *d_part;              /* 2 * CU_MAX_BLOCKS min/max partials */
    unsigned long long *d_hist; /* GPU_MAX_BINS counters */
} gpu_cu_impl;

/* Fill err from a CUDA error: out of memory -> LC_ERR_NOMEM, anything else -> LC_ERR_INTERNAL
 * (a launch or device fault is a bug or a broken device, not bad input). Returns the rc. */
lc_rc gpu_cu_fail(lc_err *err, cudaError_t e, const char *what);
/* Make impl's device current on this host thread (contexts may move between threads). */
lc_rc gpu_cu_enter(gpu_cu_impl *c, lc_err *err);

/* Kernels (cuda_kernels.cu), all queued on c->stream; min/max and histogram wait for their
 * result, threshold returns once queued (later calls on the stream are ordered after it). */
lc_rc gpu_cu_minmax(void *impl, const float *x, size_t n, float *lo, float *hi, lc_err *err);
lc_rc gpu_cu_histogram(void *impl, const float *x, size_t n, int nbins, float lo, float scale,
                       uint64_t *hist, lc_err *err);
lc_rc gpu_cu_threshold(void *impl, const float *x, size_t n, float lo, float hi, uint8_t *out,
                       lc_err *err);

#endif
