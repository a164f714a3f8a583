/*
 * ref_internal.h: what the CPU reference backend's files share: its state (a thread count)
 * and the gpu_ops entries implemented outside ref.c (morphology, labelling, resampling).
 * Thread safety: the impl is read-only after open; calls may not overlap on one context.
 */
#ifndef REF_INTERNAL_H
#define REF_INTERNAL_H

#include "gpu_internal.h"

typedef struct ref_impl {
    int threads;
} ref_impl;

/* ref_morph.c */
lc_rc ref_morph(void *impl, const gpu_morph_pass *p, lc_err *err);
/* ref_label.c */
size_t ref_label_scratch(void *impl, size_t n);
lc_rc ref_label(void *impl, const uint8_t *m, int invert, const size_t dims[3], int conn,
                int32_t *labels, void *scratch, size_t *nlabels, lc_err *err);
lc_rc ref_label_sizes(void *impl, const int32_t *labels, size_t n, size_t nlabels, uint64_t *counts,
                      lc_err *err);
lc_rc ref_lut(void *impl, const int32_t *labels, size_t n, const uint8_t *table, size_t ntable,
              uint8_t flip, uint8_t *out, lc_err *err);
lc_rc ref_mark_border(void *impl, const int32_t *labels, const size_t dims[3], int planar,
                      uint8_t *table, size_t ntable, lc_err *err);
/* ref_resample.c */
lc_rc ref_resample(void *impl, const gpu_resample_job *j, lc_err *err);

#endif
