/*
 * seg.h: gpu-segmenter internals. Geometry checks and slice order (seg_geom.c), volume
 * assembly from the index and the store (seg_volume.c), job parameters (seg_params.c), the
 * algorithms on the gpu/ API (seg_algo.c), the outputs (seg_nifti.c, seg_dcmseg.c,
 * seg_png.c, seg_stow.c), the model registry (seg_model.c), model inference (seg_infer.c) and
 * the job itself (seg_job.c). A seg_ctx is built by main() and used by the worker thread only;
 * it owns the one gpu_ctx of the process and the models resident on it.
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
    char *models_dir;           /* RADPIPE_MODELS_DIR: <name>/{model.onnx,model.json}; "" or
                                 * NULL = no models */
} seg_cfg;

extern const lc_cfg_var seg_cfg_vars[];
extern const size_t seg_cfg_nvars;

/* ---- models (seg_model.c): model.json, proto/models/model.schema.json in C, and the
 * registry of models loaded once at start and resident on the gpu_ctx ---------------------- */

typedef enum seg_norm {
    SEG_NORM_CT = 1, /* clip to the dataset's percentiles, z-score with its mean and std */
    SEG_NORM_ZSCORE, /* the volume's own mean and std */
} seg_norm;

typedef struct seg_code {
    char code[17], scheme[4], meaning[65];
} seg_code;

typedef struct seg_model_label {
    int value; /* 1..nlabels: the network's output channel */
    char name[65];
    seg_code category, type;
    int rgb[3];
} seg_model_label;

/* What model.json says, checked. Axes here are the volume's: spacing x, y, z; the patch z, y,
 * x as gpu_nn_window_opts takes it (model.json lists both slowest first). */
typedef struct seg_model_desc {
    char name[65], version[33], modality[3];
    char *description;       /* owned, "" when absent */
    seg_model_label *labels; /* owned, nlabels entries ordered by value */
    int nlabels;
    seg_norm norm;
    double clip_lo, clip_hi, mean, std; /* SEG_NORM_CT */
    int dims;                           /* spatial dims of the network: 2 or 3 */
    double spacing[3];                  /* x, y, z mm; 2-D models: z = 0 (slices kept) */
    int64_t patch[3];                   /* z, y, x; 2-D models: [0] = 0 */
    double step;                        /* sliding-window stride, fraction of the patch */
    int mirror, batch;
    char onnx_sha256[65]; /* "" when not given */
} seg_model_desc;

/* Check j (borrowed) with the rules of proto/models/model.schema.json and the ones it cannot
 * state (label values 1..N once each, percentile_00_5 < percentile_99_5) and fill d.
 * LC_ERR_INVALID with a message naming the member ("labels[0].type.code must be ...").
 * Release d with seg_model_desc_release (also after a failure). */
lc_rc seg_model_desc_parse(const cJSON *j, seg_model_desc *d, lc_err *err);
void seg_model_desc_release(seg_model_desc *d);
/* The labels, normalisation, spacing and patch as model.json writes them (caller frees). */
cJSON *seg_model_desc_labels_json(const seg_model_desc *d);

struct gpu_nn_model;

typedef struct seg_model {
    seg_model_desc d;
    char sha256[65]; /* of model.onnx */
    long long onnx_bytes;
    struct gpu_nn_model *nn; /* owned: resident on the context */
    size_t params;           /* weights after folding, as the engine counts them */
    double load_seconds;
    lc_counter *jobs; /* radpipe_model_jobs_total{model} */
} seg_model;

typedef struct seg_model_failure {
    char name[65]; /* the folder */
    char error[512];
} seg_model_failure;

typedef struct seg_models {
    seg_model *v; /* n entries, ordered by name */
    size_t n;
    seg_model_failure *bad; /* failed entries: the folders that could not be loaded at start */
    size_t failed;
} seg_models;

/* Load every model of dir (borrowed; "" or NULL: none) onto gpu: each sub-folder holding a
 * model.json or a model.onnx is a model; a bad one (description, file, network, or the two
 * disagreeing) is logged with its reason and skipped, and the rest load. Metrics (when
 * metrics is not NULL): radpipe_model_loads_total{model,result}, radpipe_model_load_seconds
 * {model}, radpipe_models_loaded. Fails only when dir itself cannot be read or memory runs
 * out. Release with seg_models_release (before gpu_ctx_free). */
lc_rc seg_models_load(seg_models *ms, gpu_ctx *gpu, const char *dir, lc_metrics *metrics,
                      lc_err *err);
/* Upsert one row per resident model into the models table (proto/sql/005_models.sql), in
 * one transaction; owner names this segmenter (host:pid). */
lc_rc seg_models_record(const seg_models *ms, lc_db *db, const char *owner, lc_err *err);
/* The resident model called name, or NULL. Borrowed. */
seg_model *seg_models_find(const seg_models *ms, const char *name);
/* Why the model folder called name failed to load at start, or NULL. Borrowed. */
const char *seg_models_failure(const seg_models *ms, const char *name);
void seg_models_release(seg_models *ms);

typedef struct seg_ctx {
    lc_service *svc;    /* borrowed */
    const seg_cfg *cfg; /* borrowed */
    gpu_ctx *gpu;       /* owned */
    lc_histogram *seconds;
    seg_models models; /* owned: resident for the life of the process */
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
    size_t *order;           /* nz * nt input indices: order[t * nz + k] (caller frees) */
    double normal[3];        /* row cosine x column cosine */
    double step[3];          /* LPS mm from slice k to k + 1 (see seg_geom_stack) */
    double gap_min, gap_max; /* distances between neighbouring positions along the normal */
    int uniform;             /* 1 when every gap equals the smallest within tolerance */
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
    seg_slice *slices;            /* nz * nt: slice k of time point t at [t * nz + k] */
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
    char model[65];      /* "" = an algorithm job; else the model of RADPIPE_MODELS_DIR */
    char series_uid[65]; /* "" = choose */
    int nbins;
    int has_window;
    double window_level, window_width; /* body: HU window before Otsu */
    double lower, upper;               /* threshold: HU range (inclusive) */
    seg_morph_step morph[SEG_MAX_MORPH];
    int nmorph;
    int connectivity;       /* 6 or 26 */
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
    float threshold;   /* Otsu's threshold, or the range's lower bound */
    uint64_t voxels;   /* voxels in the mask */
    size_t components; /* components kept (0 when no component step ran) */
} seg_algo_stats;

/* Run p's algorithm on one nx*ny*nz float volume (host, borrowed) and write the mask (0/1)
 * into mask (host, nx*ny*nz bytes): the volume is uploaded once, the mask downloaded once.
 * spacing: voxel size in mm (morphology radii and component volumes). */
lc_rc seg_algo_run(gpu_ctx *ctx, const seg_params *p, const float *vol, size_t nx, size_t ny,
                   size_t nz, const double spacing[3], uint8_t *mask, seg_algo_stats *st,
                   lc_err *err);

/* ---- model inference (seg_infer.c) -------------------------------------------------------- */

typedef struct seg_infer_stats {
    size_t rdims[3]; /* the grid the network saw: x, y, z at the model's spacing */
    int resampled;   /* 0 when the series already had the model's spacing */
    size_t patches;  /* sliding-window patches (each run once, or mirrored) */
    double seconds;  /* the sliding window alone */
} seg_infer_stats;

/* Run model m on one nx*ny*nz float volume (host, borrowed, x fastest; HU on CT) of voxel
 * spacing sp (x, y, z mm): normalised as model.json says (on the host, into a copy), moved
 * to the backend once, resampled (linear) to the model's spacing, segmented by the sliding
 * window (gpu_nn_segment), the class map resampled back (nearest) and downloaded into labels
 * (host, nx*ny*nz bytes: 0 background, else the label value). pr (may be NULL) gets the
 * patches as steps and stops the window when the job must stop (LC_ERR_CANCELLED). Errors
 * of the engine come back as they are (LC_ERR_TOO_LARGE over RADPIPE_GPU_MEMORY_LIMIT);
 * without the engine in the build: LC_ERR_UNSUPPORTED. */
lc_rc seg_infer_run(gpu_ctx *ctx, seg_model *m, const float *vol, size_t nx, size_t ny, size_t nz,
                    const double sp[3], seg_progress *pr, uint8_t *labels, seg_infer_stats *st,
                    lc_err *err);
/* 1 when this build holds the inference engine (gpu/nn). */
int seg_infer_available(void);

/* ---- outputs ------------------------------------------------------------------------------ */

/* The NIfTI-1 affine of v as dcm2niix writes it (RAS, rows flipped; MR 3D acquisitions
 * reoriented to the nearest orthogonal axes), the dims, and for each output voxel the index
 * of the volume voxel it shows (map, nx*ny*nz entries, caller frees; NULL when not wanted). */
typedef struct seg_nifti_geom {
    size_t dims[3];
    double sform[4][4];
} seg_nifti_geom;
lc_rc seg_nifti_geometry(const seg_volume *v, seg_nifti_geom *g, size_t **map, lc_err *err);
/* Write mask (nx*ny*nz*nt, volume order) as a gzip'd NIfTI-1 file at path (".nii.gz");
 * max_label: the largest value (cal_max; 1 for a binary mask, else a label map). */
lc_rc seg_nifti_write(const seg_volume *v, const uint8_t *mask, int max_label, const char *descrip,
                      const char *path, lc_err *err);

/* The DICOM SEG of mask (volume order): one segment (label 1). */
lc_rc seg_dcmseg_build(const seg_volume *v, const uint8_t *mask, const seg_params *p, void **buf,
                       size_t *len, char sop_uid[65], lc_err *err);
/* The DICOM SEG of a model's label map (volume order, values 0..nlabels): one segment per
 * model label, coded as model.json says, in label order. */
lc_rc seg_dcmseg_build_model(const seg_volume *v, const uint8_t *labels, const seg_model *m,
                             void **buf, size_t *len, char sop_uid[65], lc_err *err);

/* A PNG montage of up to 16 slices of time point 0, each label's outline drawn in
 * palette[label] (NULL: every label red); *buf caller frees. */
lc_rc seg_png_montage(const seg_volume *v, const uint8_t *mask, const uint8_t (*palette)[3],
                      void **buf, size_t *len, lc_err *err);

/* POST one DICOM object to a STOW-RS endpoint (multipart/related; type="application/dicom").
 * token may be NULL or "". 5xx and network errors are LC_ERR_UNAVAILABLE (the job is
 * retried), 4xx LC_ERR_INVALID. */
lc_rc seg_stow(const char *url, const char *token, const void *buf, size_t len, lc_err *err);

/* ---- the job (seg_job.c) ------------------------------------------------------------------ */

/* The lc_worker_fn for job.segment (ctx is the seg_ctx). */
lc_rc seg_job(void *ctx, lc_worker_job *j, cJSON **result, lc_err *err);

#endif
