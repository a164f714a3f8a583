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
    GPU_U8,      /* masks: 0 or 1 (kernels reading a mask treat any non-zero byte as 1) */
    GPU_I32,     /* labels of gpu_label: 0 background, 1..nlabels components */
} gpu_dtype;

/* Histograms have at most this many bins. */
#define GPU_MAX_BINS 65536
/* A volume holds at most this many voxels (256 GiB of float), so sizes never overflow. */
#define GPU_MAX_VOXELS ((size_t)1 << 36)
/* gpu_label and gpu_fill_holes take volumes of at most this many voxels: labels and their
 * union-find links are voxel indices in 32 bits (2^31 - 1 voxels = 8 GiB of labels). */
#define GPU_LABEL_MAX_VOXELS ((size_t)INT32_MAX)
/* Morphology: the structuring element reaches at most this many voxels from its centre along
 * each axis (radius / spacing, rounded down). */
#define GPU_MORPH_MAX_REACH 64

typedef struct gpu_ctx gpu_ctx;
typedef struct gpu_vol gpu_vol;

/* "auto", "cpu", "cuda" (and back); parse returns LC_ERR_INVALID for anything else. */
const char *gpu_backend_name(gpu_backend b);
lc_rc gpu_backend_parse(const char *s, gpu_backend *out);
/* Bytes per voxel of dtype: 4, 1, 4; 0 for an unknown type. */
size_t gpu_dtype_size(gpu_dtype t);

/* --- contexts ------------------------------------------------------------------------------
 * One context per process: it owns the backend (on CUDA: the device, one stream that every
 * copy and kernel of the context is queued on, and small scratch buffers; on the CPU: the
 * worker thread count) and accounts for the backend memory its volumes and kernels hold. */

typedef struct gpu_ctx_opts {
    gpu_backend backend; /* AUTO, CPU or CUDA (see gpu_ctx_new) */
    int device;          /* CUDA device index, >= 0 (RADPIPE_GPU_DEVICE); ignored by the CPU */
    int cpu_threads;     /* CPU worker threads, 0 = online CPUs; ignored by CUDA */
    /* Bytes of backend memory the context may hold at once, 0 = no limit
     * (RADPIPE_GPU_MEMORY_LIMIT). Counted: every volume (gpu_vol_new/upload) and every
     * scratch buffer a kernel allocates while it runs (listed with each kernel below), on
     * either backend (on the CPU "backend memory" is host memory, counted the same way).
     * Not counted: the CUDA runtime's own context (hundreds of MiB, outside our control) and
     * the fixed per-context scratch (about 1 MiB, allocated at open). An allocation that
     * would go over the limit fails with LC_ERR_TOO_LARGE and a message giving the request,
     * the bytes in use and the limit; nothing is allocated and the context stays usable. */
    size_t memory_limit;
    /* != 0: before returning, run every kernel once on a small volume (gpu_ctx_warm_up), so
     * CUDA's lazy module loading and first-launch costs (or the CPU's first page faults) are
     * paid at start-up and the first job runs as fast as the rest. */
    int warm_up;
} gpu_ctx_opts;

/* Open a context. opts->backend: AUTO picks CUDA device opts->device when radpipe was built
 * with CUDA and the driver reports a device; with no driver or no device it falls back to the
 * CPU and logs one info line with the reason. CUDA asked for explicitly but unavailable:
 * LC_ERR_UNSUPPORTED. A failing warm-up fails the open. *out: caller frees with gpu_ctx_free. */
lc_rc gpu_ctx_open(const gpu_ctx_opts *opts, gpu_ctx **out, lc_err *err);
/* gpu_ctx_open with no memory limit and no warm-up (kept for existing callers). */
lc_rc gpu_ctx_new(gpu_backend want, int device, int cpu_threads, gpu_ctx **out, lc_err *err);
/* Run every kernel of this API once on a small volume (32x32x16), then free it. Needs about
 * 300 KiB under the memory limit. Safe to call again; results are discarded. */
lc_rc gpu_ctx_warm_up(gpu_ctx *ctx, lc_err *err);
/* The backend in use: GPU_BACKEND_CPU or GPU_BACKEND_CUDA, never AUTO. */
gpu_backend gpu_ctx_backend(const gpu_ctx *ctx);
/* "cpu (2 threads)" or "cuda: NVIDIA H100 80GB HBM3 (sm_90, 79 GiB)"; borrowed, valid as long
 * as ctx. */
const char *gpu_ctx_describe(const gpu_ctx *ctx);

typedef struct gpu_mem_stats {
    size_t used;  /* bytes held now by volumes and running kernels' scratch */
    size_t peak;  /* the most held at once since the context opened */
    size_t limit; /* opts->memory_limit (0 = none) */
} gpu_mem_stats;
void gpu_ctx_memory(const gpu_ctx *ctx, gpu_mem_stats *out);
/* Accepts NULL. Every volume of ctx must be freed first. */
void gpu_ctx_free(gpu_ctx *ctx);

/* --- volumes -------------------------------------------------------------------------------
 * Voxels are stored x fastest: index i = x + nx * (y + ny * z). Only gpu_vol_upload and
 * gpu_vol_download copy a volume between host and device; every kernel below reads and writes
 * device memory only (the small results that cross are listed with each kernel). */

/* A new volume of nx*ny*nz voxels (x fastest), zero-filled. *out: free with gpu_vol_free. */
lc_rc gpu_vol_new(gpu_ctx *ctx, gpu_dtype dtype, size_t nx, size_t ny, size_t nz, gpu_vol **out,
                  lc_err *err);
/* A new volume holding a copy of host (borrowed; nx*ny*nz elements of dtype, x fastest):
 * exactly one host-to-device copy. *out: free with gpu_vol_free. */
lc_rc gpu_vol_upload(gpu_ctx *ctx, gpu_dtype dtype, const void *host, size_t nx, size_t ny,
                     size_t nz, gpu_vol **out, lc_err *err);
/* A read-only volume over host (borrowed: nx*ny*nz elements of dtype, x fastest, which must
 * stay valid and unchanged until gpu_vol_free(*out)). On the CPU the kernels read host
 * itself: no copy, and nothing counted against the memory limit (a buffer not aligned to its
 * element size is copied instead). On CUDA it is gpu_vol_upload: one copy, counted. Kernels
 * refuse it as an output (LC_ERR_INVALID). *out: free with gpu_vol_free. */
lc_rc gpu_vol_borrow(gpu_ctx *ctx, gpu_dtype dtype, const void *host, size_t nx, size_t ny,
                     size_t nz, gpu_vol **out, lc_err *err);
/* Copy v into host (borrowed, room for gpu_vol_voxels(v) elements of v's dtype): exactly one
 * device-to-host copy (none when host is the buffer v borrows); waits for all work queued on
 * ctx. */
lc_rc gpu_vol_download(gpu_ctx *ctx, const gpu_vol *v, void *host, lc_err *err);
/* Accepts NULL. */
void gpu_vol_free(gpu_vol *v);
gpu_dtype gpu_vol_dtype(const gpu_vol *v);
/* dims[0..2] = nx, ny, nz */
void gpu_vol_dims(const gpu_vol *v, size_t dims[3]);
size_t gpu_vol_voxels(const gpu_vol *v);

/* --- kernels -------------------------------------------------------------------------------
 * Common rules: every volume argument belongs to ctx (else LC_ERR_INVALID); an output has the
 * dtype and the dims stated (else LC_ERR_INVALID); an output may be the input itself only
 * where the kernel says so. Results are identical on both backends and every CPU thread count
 * except where a tolerance is stated (resampling). On CUDA, kernels that return only a status
 * return once queued; a device fault surfaces at the next call that waits. */

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

/* gpu_histogram and gpu_minmax together (same arguments, results and errors): one pass over
 * the volume where the backend can fuse them (the CPU), else the two kernels. For a range
 * guessed in advance, e.g. a window that the volume's values are then clipped to. */
lc_rc gpu_histogram_minmax(gpu_ctx *ctx, const gpu_vol *v, int nbins, float lo, float hi,
                           uint64_t *hist, float *vmin, float *vmax, lc_err *err);

/* Otsu's threshold of a GPU_F32 volume with scikit-image's threshold_otsu convention: the
 * histogram of nbins (2..GPU_MAX_BINS) bins between the volume's min and max; the threshold
 * is the centre of the bin k that maximises the between-class variance of bins [0..k] vs
 * [k+1..], i.e. min + (k + 0.5) * (max - min) / nbins (first k on ties). A constant volume
 * returns its value. Only the histogram leaves the device. LC_ERR_INVALID when the volume is
 * all NaN or holds infinities. */
lc_rc gpu_otsu_threshold(gpu_ctx *ctx, const gpu_vol *v, int nbins, float *threshold, lc_err *err);

/* Threshold to a mask by a value range (e.g. a HU range): out[i] = 1 where lo <= in[i] <= hi
 * (both inclusive; hi may be +INFINITY, lo -INFINITY), else 0 (NaN gives 0). For "above
 * Otsu's threshold t" as scikit-image means it (image > t) pass lo = nextafterf(t, INFINITY).
 * in: GPU_F32; out: GPU_U8 of the same dims (both borrowed). No copies, no scratch. */
lc_rc gpu_threshold(gpu_ctx *ctx, const gpu_vol *in, float lo, float hi, gpu_vol *out, lc_err *err);

/* Window: out[i] = (min(max(in[i], a), b) - a) * (1 / width), clamped to [0, 1], where
 * a = level - width / 2 and b = level + width / 2 (a, b and 1 / width computed once in float);
 * values at or below a give 0, at or above b give 1, NaN stays NaN. width > 0, both finite.
 * in, out: GPU_F32 of the same dims; out may be in. For a mask of a HU range instead, use
 * gpu_threshold. No copies, no scratch. */
lc_rc gpu_window(gpu_ctx *ctx, const gpu_vol *in, float level, float width, gpu_vol *out,
                 lc_err *err);

/* Number of non-zero voxels of a GPU_U8 mask (the count is the only thing copied back). */
lc_rc gpu_count_nonzero(gpu_ctx *ctx, const gpu_vol *mask, uint64_t *count, lc_err *err);

/* --- morphology ------------------------------------------------------------------------------
 * 3D binary morphology of a GPU_U8 mask (non-zero = foreground; output 0 or 1) with an
 * ellipsoidal structuring element that is a ball in physical space: the voxel offset
 * (dx, dy, dz) belongs to it when (dx*sx)^2 + (dy*sy)^2 + (dz*sz)^2 <= r^2 (1 + 1e-9), with
 * r = radius and (sx, sy, sz) = spacing, both in mm. Anisotropic spacing is thus taken into
 * account (a 2 mm ball on 0.7 x 0.7 x 2.5 mm voxels reaches 2 voxels in x and y, 0 in z).
 * spacing NULL means (1, 1, 1): radius in voxels, and for an integer radius the element is
 * exactly scikit-image's ball(radius). The element is computed once on the host and used by
 * both backends, so results are identical.
 * Borders follow scikit-image's binary_erosion / binary_dilation (scipy border_value 1 and 0):
 * erosion treats voxels outside the volume as foreground (the border does not eat into the
 * mask), dilation treats them as background. Open = erode then dilate; close = dilate then
 * erode (skimage.morphology.binary_opening / binary_closing).
 * radius >= 0 and finite, spacing > 0 and finite; radius / spacing must stay under
 * GPU_MORPH_MAX_REACH + 1 on every axis (LC_ERR_INVALID otherwise). A radius smaller than
 * every spacing gives the single-voxel element: out = (in != 0).
 * in, out: GPU_U8 of the same dims; out may be in. Scratch: one GPU_U8 volume of the same dims
 * (counted against the memory limit). Copies: the element's extent table (<= 33 KiB) to the
 * device. */
typedef enum gpu_morph_op {
    GPU_MORPH_ERODE = 1,
    GPU_MORPH_DILATE,
    GPU_MORPH_OPEN,
    GPU_MORPH_CLOSE,
} gpu_morph_op;

lc_rc gpu_morphology(gpu_ctx *ctx, gpu_morph_op op, const gpu_vol *in, double radius,
                     const double spacing[3], gpu_vol *out, lc_err *err);

/* --- connected components ------------------------------------------------------------------
 * Connectivity: 6 or 26 (3D: faces, or faces+edges+corners), or 4 or 8 (2D: each z slice on
 * its own, never across slices; labels are still unique across the volume). */

/* Label the connected components of the foreground (non-zero) of a GPU_U8 mask into a
 * GPU_I32 volume of the same dims: background 0, components 1..*nlabels. Numbering is
 * deterministic and equals scipy.ndimage.label / skimage.measure.label: components are
 * numbered in the order of their first voxel in raster order (smallest index i), so every
 * backend and thread count gives the same volume. mask must have at most GPU_LABEL_MAX_VOXELS
 * voxels. Scratch, counted: on CUDA one counter per 4096 voxels (the output holds the
 * union-find links while it runs); on the CPU the mask's runs (maximal stretches of
 * foreground voxels along x): 4 bytes per row of the volume and 12 per run, at most one run
 * per two voxels but typically far fewer (a 512x512x300 CT body mask: about 0.3 M runs, 4
 * MiB, where a label volume takes 300 MiB). Copies back: the label count only. */
lc_rc gpu_label(gpu_ctx *ctx, const gpu_vol *mask, int connectivity, gpu_vol *labels,
                size_t *nlabels, lc_err *err);

/* Voxel count of every label: sizes[0] = background voxels, sizes[l] = voxels of label l, for
 * l = 1..nlabels (caller's array of nlabels + 1 entries, overwritten). labels: GPU_I32 as
 * gpu_label wrote it, nlabels its count; a voxel value outside 0..nlabels is LC_ERR_INVALID
 * (on every backend). Scratch and copy back: nlabels + 2 64-bit counters. */
lc_rc gpu_label_sizes(gpu_ctx *ctx, const gpu_vol *labels, size_t nlabels, uint64_t *sizes,
                      lc_err *err);

/* Component filtering: out[i] = 1 when labels[i] is a kept component, else 0. Kept: the
 * components of at least min_voxels voxels, and of those only the keep_largest largest
 * (keep_largest 0 = all of them); equal sizes are ordered by label (the component whose
 * first voxel comes first wins), so the choice is deterministic. *kept (may be NULL) receives
 * the number of components kept. labels: GPU_I32 from gpu_label with its nlabels (errors as
 * gpu_label_sizes); out: GPU_U8 of the same dims. Scratch: the sizes (8 bytes per label,
 * copied back) and a keep table (1 byte per label, copied to the device). */
lc_rc gpu_select_components(gpu_ctx *ctx, const gpu_vol *labels, size_t nlabels,
                            size_t keep_largest, uint64_t min_voxels, gpu_vol *out, size_t *kept,
                            lc_err *err);

/* gpu_label, then gpu_select_components, in one call: the same output. in, out: GPU_U8 of the
 * same dims; out may be in. Scratch: on CUDA a GPU_I32 label volume (4 bytes per voxel) plus
 * the tables above; on the CPU no label volume, only the runs (as gpu_label) and the tables. */
lc_rc gpu_keep_largest(gpu_ctx *ctx, const gpu_vol *in, int connectivity, size_t keep_largest,
                       uint64_t min_voxels, gpu_vol *out, size_t *kept, lc_err *err);

/* Hole filling: out = in, plus every background voxel whose background component (with
 * connectivity bg_connectivity) does not touch the border of the volume. With 6 (or 26) this
 * is scipy.ndimage.binary_fill_holes(in) (or with structure=np.ones((3,3,3))): a 3D fill,
 * where a cavity open to the top or bottom slice is not a hole. With 4 (or 8) each z slice is
 * filled on its own, its border being the slice's edges (scipy's binary_fill_holes applied to
 * every slice): the usual choice for a body outline whose lungs or bowel gas reach the first
 * or last slice. in, out: GPU_U8 of the same dims; out may be in. Scratch: on CUDA one
 * GPU_I32 volume (4 bytes per voxel), on the CPU the background's runs (as gpu_label), and
 * one byte per background component (no copies but the component count). */
lc_rc gpu_fill_holes(gpu_ctx *ctx, const gpu_vol *in, int bg_connectivity, gpu_vol *out,
                     lc_err *err);

/* --- resampling ------------------------------------------------------------------------------
 * Resample to a new voxel spacing on the same physical grid origin (ITK's convention for
 * resampling with unchanged origin and direction): the centre of output voxel (i, j, k) is at
 * (i * ox, j * oy, k * oz) mm from the centre of input voxel (0, 0, 0), i.e. at the continuous
 * input index p = (i * rx, j * ry, k * rz) with r = (float)(out_spacing / in_spacing) per axis
 * (the ratio is rounded to float once, on the host; p is one float product). The voxel-to-
 * patient affine of the output is the input's with each column scaled by r: same origin.
 * Interpolation (each axis): GPU_INTERP_LINEAR (F32 only): trilinear between floor(p) and
 * floor(p) + 1, coordinates clamped to [0, n - 1] first (edge values repeat: scipy's
 * map_coordinates(order=1, mode="nearest")); GPU_INTERP_NEAREST (any dtype: labels and masks
 * use it): the input voxel floor(p + 0.5), clamped to [0, n - 1] (ties round up).
 * Tolerance between backends: nearest is exact; linear differs by at most 1e-6 * (|max| + |min|)
 * of the input (the kernels round identically by design: no FMA contraction on either side).
 * out: caller's volume of in's dtype, any dims (gpu_resample_dims gives the usual ones); it
 * may not be in. No scratch, no copies. */
typedef enum gpu_interp {
    GPU_INTERP_NEAREST = 1,
    GPU_INTERP_LINEAR,
} gpu_interp;

/* The output size for a new spacing: n_out = max(1, round(n_in * in_spacing / out_spacing))
 * per axis (round half away from zero; what SimpleITK and nnU-Net pipelines use), so the
 * output covers the input's extent to within half an output voxel. LC_ERR_INVALID for
 * spacings that are not finite and > 0, LC_ERR_TOO_LARGE past GPU_MAX_VOXELS. */
lc_rc gpu_resample_dims(const size_t in_dims[3], const double in_spacing[3],
                        const double out_spacing[3], size_t out_dims[3], lc_err *err);

lc_rc gpu_resample(gpu_ctx *ctx, const gpu_vol *in, const double in_spacing[3],
                   const double out_spacing[3], gpu_interp interp, gpu_vol *out, lc_err *err);

#ifdef __cplusplus
}
#endif

#endif
