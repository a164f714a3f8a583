/*
 * seg.h: gpu-segmenter internals: volume assembly from an indexed series (seg_volume.c) and
 * the segment job (seg_job.c). A seg_ctx is built by main() and used by the worker thread
 * only; it owns the one gpu_ctx of the process.
 */
#ifndef SEG_H
#define SEG_H

#include "gpu_seg.h"
#include "lc/service.h"
#include "lc/worker.h"

typedef struct seg_cfg {
    char *gpu_backend; /* auto|cpu|cuda */
    long long gpu_device;
    long long cpu_threads;
} seg_cfg;

extern const lc_cfg_var seg_cfg_vars[];
extern const size_t seg_cfg_nvars;

typedef struct seg_ctx {
    lc_service *svc;    /* borrowed */
    const seg_cfg *cfg; /* borrowed */
    gpu_ctx *gpu;       /* owned */
    lc_histogram *seconds;
} seg_ctx;

lc_rc seg_init(seg_ctx *c, lc_service *svc, const seg_cfg *cfg, lc_err *err);
void seg_release(seg_ctx *c);

/* A series as a float volume, x (columns) fastest, then y (rows), then z (slices sorted by
 * their position along the slice normal), with RescaleSlope/Intercept applied. */
typedef struct seg_volume {
    size_t nx, ny, nz;
    float *data;
    double spacing[3];   /* mm: columns, rows, slices */
    double affine[4][4]; /* voxel (i, j, k) -> patient (LPS) mm */
    int spacing_uniform; /* 0 when slice gaps differ by more than 10 % */
    char **sop_uids;     /* the instance of each slice (nz, or 1 for multi-frame) */
    size_t nsop;
} seg_volume;

/* Load the series from the index and the object store. Geometry problems (mixed sizes or
 * orientations, duplicate positions, missing geometry, non-image objects) fail with
 * LC_ERR_INVALID/LC_ERR_UNSUPPORTED and a message that says which; j may be NULL (else it is
 * used for progress and cancellation). */
lc_rc seg_volume_load(lc_db *db, lc_store *store, const char *series_uid, lc_worker_job *j,
                      seg_volume **out, lc_err *err);
void seg_volume_free(seg_volume *v);

/* The lc_worker_fn for job.segment (ctx is the seg_ctx). */
lc_rc seg_job(void *ctx, lc_worker_job *j, cJSON **result, lc_err *err);

#endif
