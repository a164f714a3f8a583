/*
 * ref_internal.h: what the CPU reference backend's files share: its state (a thread count)
 * and the gpu_ops entries implemented outside ref.c (morphology, labelling, resampling).
 * Thread safety: the impl is read-only after open; calls may not overlap on one context.
 */
#ifndef REF_INTERNAL_H
#define REF_INTERNAL_H

#include "gpu_internal.h"

/* GCC vector extensions (SSE2 on x86-64, whatever the target has elsewhere); loads and stores
 * go through memcpy, so no alignment is assumed. */
typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));
typedef uint64_t v2u64 __attribute__((vector_size(16)));
typedef int16_t v8s __attribute__((vector_size(16)));
typedef int8_t v16s __attribute__((vector_size(16)));
typedef uint8_t v16 __attribute__((vector_size(16)));

typedef struct ref_impl {
    int threads;
} ref_impl;

/* ref_morph.c */
lc_rc ref_morph(void *impl, const gpu_morph_pass *p, lc_err *err);
/* ref_label.c */
size_t ref_runs_bytes(void *impl, size_t nruns);
lc_rc ref_runs_count(void *impl, const uint8_t *m, gpu_runs *r, lc_err *err);
lc_rc ref_runs_label(void *impl, const uint8_t *m, int conn, gpu_runs *r, lc_err *err);
lc_rc ref_runs_sizes(void *impl, const gpu_runs *r, uint64_t *counts, lc_err *err);
lc_rc ref_runs_mark_border(void *impl, const gpu_runs *r, int planar, uint8_t *table, lc_err *err);
lc_rc ref_runs_lut(void *impl, const gpu_runs *r, const uint8_t *table, uint8_t flip, uint8_t *out,
                   lc_err *err);
lc_rc ref_runs_write(void *impl, const gpu_runs *r, int32_t *labels, lc_err *err);
lc_rc ref_label_sizes(void *impl, const int32_t *labels, size_t n, size_t nlabels, uint64_t *counts,
                      lc_err *err);
lc_rc ref_lut(void *impl, const int32_t *labels, size_t n, const uint8_t *table, size_t ntable,
              uint8_t flip, uint8_t *out, lc_err *err);
lc_rc ref_mark_border(void *impl, const int32_t *labels, const size_t dims[3], int planar,
                      uint8_t *table, size_t ntable, lc_err *err);
/* ref_resample.c */
lc_rc ref_resample(void *impl, const gpu_resample_job *j, lc_err *err);

#endif
