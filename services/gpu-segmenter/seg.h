/*
 * seg.h: gpu-segmenter internals. Geometry checks and slice order (seg_geom.c), volume
 * assembly from the index and the store (seg_volume.c), job parameters (seg_params.c), the
 * algorithms on the gpu/ API (seg_algo.c), the outputs (seg_nifti.c, seg_dcmseg.c,
 * seg_png.c, seg_stow.c) and the job itself (seg_job.c). A seg_ctx is built by main() and used
 * by the worker thread only; it owns the one gpu_ctx of the process.
 */
#ifndef SEG_H
#define SEG_H

#include <stdint.h>
#include "gpu_seg.h"
#include "lc/dicom_seg.h"
#include "lc/service.h"
#include "lc/worker.h"

typedef struct seg_cfg {
    char *gpu_backend; /* auto|cpu|cuda */
    long long gpu_device;
    long long cpu_threads;
    long long gpu_memory_limit; /* bytes, 0 = none */
    char *stow_url;             /* "" = no STOW-RS */
    char *stow_token;           /* bearer token for stow_url, "" = none (secret) */
    long long max_voxels;       /* largest series volume accepted */
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

/* ---- geometry (seg_geom.c): pure functions over per-frame geometry ------------------------ */

/* One frame of the series as read from its object. */
typedef struct seg_frame_in {
    const char *sop_uid; /* borrowed, for messages */
    int rows, cols;
    int has_ipp, has_iop;
    double ipp[3], iop[6];
    long temporal;        /* temporal position (1-based) when the object says, else 0 */
    long instance_number; /* 0 when absent */
    int frame;            /* 1-based frame within its object, 0 for a single-frame object */
} seg_frame_in;

/* The frames as a stack of nz positions by nt time points. */
typedef struct seg_stack {
    size_t nz, nt;
    size_t *order;      /* nz * nt input indices: order[t * nz + k] (caller frees) */
    double normal[3];   /* row cosine x column cosine */
    double step[3];     /* LPS mm from slice k to k + 1 (see seg_geom_stack) */
    double gap_min, gap_max; /* distances between neighbouring positions along the normal */
    int uniform;        /* 1 when every gap equals the smallest within tolerance */
} seg_stack;

/* Check and order the frames: equal sizes, every frame with a position and orientation,
 * one orientation, positions on one line (a tilted stack is a line too), each position
 * repeated the same number of times (nt; a 4-D series orders its repeats by temporal
 * position, then instance number, then frame), and no missing slices (a gap that is a
 * multiple of the smallest one). A stack whose gaps vary otherwise (a CT reconstructed with
 * two slice spacings) is accepted with uniform = 0; its step is then the first gap's (as
 * dcm2niix), else the mean step from the first to the last position. Failures are
 * LC_ERR_INVALID with a message naming the instances. */
lc_rc seg_geom_stack(const seg_frame_in *f, size_t n, seg_stack *out, lc_err *err);

/* ---- volume (seg_volume.c) ---------------------------------------------------------------- */

/* The source frame of one slice of the volume. */
typedef struct seg_slice {
    char *sop_uid, *sop_class_uid; /* owned */
    int frame;                     /* 1-based in a multi-frame object, 0 otherwise */
    double ipp[3];
    long temporal; /* 1-based time point in a 4-D series, 0 in a 3-D one */
} seg_slice;

/* A series as float volumes, x (columns) fastest, then y (rows), then z (slices sorted by
 * their position along the normal), then t (time points of a 4-D series), with every frame's
 * RescaleSlope/Intercept applied. */
typedef struct seg_volume {
    size_t nx, ny, nz, nt;
    float *data;         /* nx * ny * nz * nt */
    double spacing[3];   /* mm: columns, rows, slices (the length of step) */
    double affine[4][4]; /* voxel (i, j, k) -> patient (LPS) mm, for every time point */
    double iop[6];
    double slice_thickness; /* mm; the slice spacing when the objects give none */
    int spacing_uniform;
    double gap_min, gap_max;
    seg_slice *slices; /* nz * nt: slice k of time point t at [t * nz + k] */
    lc_dicom_header *ref;         /* the first object's header: patient, study, modality */
    char *frame_of_reference_uid; /* NULL when absent */
    int acq_3d;                   /* MRAcquisitionType 3D (NIfTI is then reoriented) */
    double gantry_tilt;           /* degrees, as the objects say */
    char *series_uid;
} seg_volume;

/* Progress of a job in steps, published at most twice a second (and always when forced). */
typedef struct seg_progress {
    lc_worker_job *j; /* NULL: nothing is reported and nothing stops the work */
    long long done, total;
    int64_t last_ms;
} seg_progress;
void seg_progress_step(seg_progress *p, long long steps, int force);
/* 1 when the job must stop (lease lost, or shutdown past its drain time). */
int seg_progress_should_stop(const seg_progress *p);

/* Load the series from the index and the object store (local files, or copies of remote
 * objects in a temporary directory). Geometry problems and objects that are not images
 * fail with LC_ERR_INVALID/LC_ERR_UNSUPPORTED and a message that says which; a volume over
 * max_voxels is LC_ERR_TOO_LARGE. pr may be NULL; else the load adds two steps per object to
 * its total (header, pixels), reports them, and stops with LC_ERR_CANCELLED when asked. */
lc_rc seg_volume_load(lc_db *db, lc_store *store, const char *series_uid, size_t max_voxels,
                      seg_progress *pr, seg_volume **out, lc_err *err);
void seg_volume_free(seg_volume *v);

/* ---- parameters (seg_params.c): proto/params/segment.schema.json, in C ------------------- */

typedef enum seg_algorithm {
    SEG_ALGO_OTSU = 0,
    SEG_ALGO_BODY,
    SEG_ALGO_THRESHOLD,
} seg_algorithm;

typedef enum seg_fill {
    SEG_FILL_NONE = 0,
    SEG_FILL_2D,
    SEG_FILL_3D,
} seg_fill;

#define SEG_MAX_MORPH 8

typedef struct seg_morph_step {
    gpu_morph_op op;
    double radius_mm;
} seg_morph_step;

typedef struct seg_params {
    seg_algorithm algorithm;
    char series_uid[65]; /* "" = choose */
    int nbins;
    int has_window;
    double window_level, window_width; /* body: HU window before Otsu */
    double lower, upper;               /* threshold: HU range (inclusive) */
    seg_morph_step morph[SEG_MAX_MORPH];
    int nmorph;
    int connectivity;     /* 6 or 26 */
    long long keep_largest; /* 0 = all components */
    double min_component_mm3;
    seg_fill fill;
    int stow; /* send the SEG to RADPIPE_SEG_STOW_URL (default: when configured) */
    char label[65];
} seg_params;

const char *seg_algorithm_name(seg_algorithm a);
/* Validate params (a JSON object, borrowed; NULL = {}) with the rules of
 * proto/params/segment.schema.json and fill p with them and the defaults. LC_ERR_INVALID
 * with a message naming the parameter ("params.window.width must be a number > 0"). */
lc_rc seg_params_parse(const cJSON *params, seg_params *p, lc_err *err);

/* ---- algorithms (seg_algo.c) -------------------------------------------------------------- */

typedef struct seg_algo_stats {
    float threshold;     /* Otsu's threshold, or the range's lower bound */
    uint64_t voxels;     /* voxels in the mask */
    size_t components;   /* components kept (0 when no component step ran) */
} seg_algo_stats;

/* Run p's algorithm on one nx*ny*nz float volume (host, borrowed) and write the mask (0/1)
 * into mask (host, nx*ny*nz bytes): the volume is uploaded once, the mask downloaded once.
 * spacing: voxel size in mm (morphology radii and component volumes). */
lc_rc seg_algo_run(gpu_ctx *ctx, const seg_params *p, const float *vol, size_t nx, size_t ny,
                   size_t nz, const double spacing[3], uint8_t *mask, seg_algo_stats *st,
                   lc_err *err);

/* ---- outputs ------------------------------------------------------------------------------ */

/* The NIfTI-1 affine of v as dcm2niix writes it (RAS, rows flipped; MR 3D acquisitions
 * reoriented to the nearest orthogonal axes), the dims, and for each output voxel the index
 * of the volume voxel it shows (map, nx*ny*nz entries, caller frees; NULL when not wanted). */
typedef struct seg_nifti_geom {
    size_t dims[3];
    double sform[4][4];
} seg_nifti_geom;
lc_rc seg_nifti_geometry(const seg_volume *v, seg_nifti_geom *g, size_t **map, lc_err *err);
/* Write mask (nx*ny*nz*nt, volume order) as a gzip'd NIfTI-1 file at path (".nii.gz"). */
lc_rc seg_nifti_write(const seg_volume *v, const uint8_t *mask, const char *descrip,
                      const char *path, lc_err *err);

/* The DICOM SEG of mask (volume order): one segment (label 1). */
lc_rc seg_dcmseg_build(const seg_volume *v, const uint8_t *mask, const seg_params *p,
                       void **buf, size_t *len, char sop_uid[65], lc_err *err);

/* A PNG montage of up to 16 slices of time point 0, the mask outlined; *buf caller frees. */
lc_rc seg_png_montage(const seg_volume *v, const uint8_t *mask, void **buf, size_t *len,
                      lc_err *err);

/* POST one DICOM object to a STOW-RS endpoint (multipart/related; type="application/dicom").
 * token may be NULL or "". 5xx and network errors are LC_ERR_UNAVAILABLE (the job is
 * retried), 4xx LC_ERR_INVALID. */
lc_rc seg_stow(const char *url, const char *token, const void *buf, size_t len, lc_err *err);

/* ---- the job (seg_job.c) ------------------------------------------------------------------ */

/* The lc_worker_fn for job.segment (ctx is the seg_ctx). */
lc_rc seg_job(void *ctx, lc_worker_job *j, cJSON **result, lc_err *err);

#endif
