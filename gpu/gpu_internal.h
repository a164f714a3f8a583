/*
 * gpu_internal.h: what gpu/gpu.c shares with the backends (gpu/ref in C, gpu/cuda in C++):
 * the backend vtable, the context and volume structs, and the one histogram bin formula that
 * every backend uses so their counts are bit-identical. Not for use outside gpu/.
 * Thread safety: as gpu_seg.h (a context is used by one thread at a time).
 */
#ifndef GPU_INTERNAL_H
#define GPU_INTERNAL_H

#include <math.h>
#include "gpu_seg.h"

#ifdef __cplusplus
extern "C" {
#endif

/* One morphology pass, erosion (target 0) or dilation (target 1), in two steps on backend
 * memory: dist[i] = distance along x from voxel i to the nearest voxel of its row whose
 * (in != 0) equals target, capped at rx + 1 (voxels outside the volume never count); then
 *   erosion:  out[x,y,z] = 1 iff for every (dy, dz) with w >= 0 and row (y+dy, z+dz) inside:
 *             dist[x, y+dy, z+dz] > w
 *   dilation: out[x,y,z] = 1 iff for some (dy, dz) with w >= 0 and row inside:
 *             dist[x, y+dy, z+dz] <= w
 * where w = w[(dz + rz) * (2 ry + 1) + dy + ry] is the element's half-width in x on that row
 * (-1: the row is not in the element). w is host memory, built once by gpu.c. */
typedef struct gpu_morph_pass {
    const uint8_t *in;
    uint8_t *out;  /* may be in */
    uint8_t *dist; /* scratch, n bytes */
    size_t nx, ny, nz;
    int target;
    int rx, ry, rz; /* 0..GPU_MORPH_MAX_REACH */
    const int8_t *w;
} gpu_morph_pass;

/* Size of the half-width table of the largest element. */
#define GPU_MORPH_MAX_W ((2 * GPU_MORPH_MAX_REACH + 1) * (2 * GPU_MORPH_MAX_REACH + 1))

/* One resampling (gpu_seg.h): in and out in backend memory of dtype; ratio[a] =
 * (float)(out_spacing[a] / in_spacing[a]). */
typedef struct gpu_resample_job {
    const void *in;
    void *out;
    gpu_dtype dtype;
    gpu_interp interp;
    size_t in_dims[3], out_dims[3];
    float ratio[3];
} gpu_resample_job;

/* Connected components as runs (backends with the runs_* operations: the CPU): a run is a
 * maximal stretch of foreground voxels along x within one row (foreground: (m != 0) !=
 * invert). Rows are numbered r = y + ny * z; the runs of row r are row[r] .. row[r + 1] - 1,
 * in x order, so runs are in raster order and a component's first run holds its first voxel.
 * The front end allocates (counted) and frees both arrays: row after runs_count, which fills
 * it, and runs (runs_bytes(nruns) bytes, none when nruns is 0) before runs_label. */
typedef struct gpu_runs {
    size_t nx, ny, nz;
    int invert;
    int32_t *row; /* mem: ny * nz + 1 offsets (row_bytes) */
    void *runs;   /* mem: the runs and their links or labels (run_bytes) */
    size_t row_bytes, run_bytes;
    size_t nruns;   /* set by runs_count */
    size_t nlabels; /* set by runs_label */
} gpu_runs;

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
    /* out[i] = NaN ? NaN : min((min(max(x, a), b) - a) * inv_width, 1); out may be x. */
    lc_rc (*window)(void *impl, const float *x, size_t n, float a, float b, float inv_width,
                    float *out, lc_err *err);
    /* *count = number of non-zero bytes (waits for the result). */
    lc_rc (*count)(void *impl, const uint8_t *m, size_t n, uint64_t *count, lc_err *err);
    /* One erosion or dilation pass (gpu_morph_pass); p->out may be p->in. */
    lc_rc (*morph)(void *impl, const gpu_morph_pass *p, lc_err *err);
    /* label_scratch and label: backends without the runs_* operations below (CUDA); NULL
     * on the others. Bytes of scratch memory label needs for n voxels (0: none). */
    size_t (*label_scratch)(void *impl, size_t n);
    /* Connected components of the voxels with (m[i] != 0) != invert, into labels (background
     * 0, components 1..*nlabels numbered by first voxel index). conn: 6, 26, 4 or 8.
     * n = dims product <= GPU_LABEL_MAX_VOXELS; scratch: label_scratch(n) bytes of mem (or
     * NULL when 0). Waits for *nlabels. */
    lc_rc (*label)(void *impl, const uint8_t *m, int invert, const size_t dims[3], int conn,
                   int32_t *labels, void *scratch, size_t *nlabels, lc_err *err);
    /* counts (mem, nlabels + 2 zeroed entries): counts[l] += voxels of label l for l in
     * 0..nlabels, counts[nlabels + 1] += voxels outside that range. */
    lc_rc (*label_sizes)(void *impl, const int32_t *labels, size_t n, size_t nlabels,
                         uint64_t *counts, lc_err *err);
    /* out[i] = table[labels[i]] ^ flip for labels in 0..ntable-1, 0 otherwise. table: mem. */
    lc_rc (*lut)(void *impl, const int32_t *labels, size_t n, const uint8_t *table, size_t ntable,
                 uint8_t flip, uint8_t *out, lc_err *err);
    /* table[l] = 1 (mem, ntable entries) for every label l > 0 on the volume's border: its 6
     * faces, or with planar != 0 the 4 edges of every z slice. */
    lc_rc (*mark_border)(void *impl, const int32_t *labels, const size_t dims[3], int planar,
                         uint8_t *table, size_t ntable, lc_err *err);
    lc_rc (*resample)(void *impl, const gpu_resample_job *j, lc_err *err);
    /* Optional (NULL: gpu.c runs minmax, then histogram): both in one pass over x, the
     * histogram as histogram, *mn and *mx as minmax. */
    lc_rc (*minmax_histogram)(void *impl, const float *x, size_t n, int nbins, float lo,
                              float scale, uint64_t *hist, float *mn, float *mx, lc_err *err);
    /* Optional, all or none (NULL: labelling goes through label and a GPU_I32 volume):
     * components as runs (gpu_runs). runs_count fills r->row and r->nruns from the mask;
     * runs_label finds the runs, joins those that touch under connectivity conn and numbers
     * the components as label does (r->nlabels); the others read a labelled r.
     * runs_sizes: counts (mem, nlabels + 1 zeroed entries): counts[l] = voxels of label l,
     * counts[0] = voxels in no run. runs_mark_border: table[l] = 1 (mem, nlabels + 1 entries)
     * for every label on the border (as mark_border). runs_lut: out[i] = table[label] ^ flip,
     * label 0 for voxels in no run (out may be the mask the runs came from). runs_write:
     * labels[i] = the label of voxel i, 0 in no run. */
    lc_rc (*runs_count)(void *impl, const uint8_t *m, gpu_runs *r, lc_err *err);
    size_t (*runs_bytes)(void *impl, size_t nruns);
    lc_rc (*runs_label)(void *impl, const uint8_t *m, int conn, gpu_runs *r, lc_err *err);
    lc_rc (*runs_sizes)(void *impl, const gpu_runs *r, uint64_t *counts, lc_err *err);
    lc_rc (*runs_mark_border)(void *impl, const gpu_runs *r, int planar, uint8_t *table,
                              lc_err *err);
    lc_rc (*runs_lut)(void *impl, const gpu_runs *r, const uint8_t *table, uint8_t flip,
                      uint8_t *out, lc_err *err);
    lc_rc (*runs_write)(void *impl, const gpu_runs *r, int32_t *labels, lc_err *err);
} gpu_ops;

struct gpu_ctx {
    gpu_backend backend;
    const gpu_ops *ops;
    void *impl;
    size_t live_vols;                     /* volumes not yet freed: gpu_ctx_free checks it is 0 */
    size_t mem_used, mem_peak, mem_limit; /* backend bytes held by volumes and scratch */
    char desc[160];
};

struct gpu_vol {
    gpu_ctx *ctx; /* the context whose memory holds mem */
    gpu_dtype dtype;
    size_t nx, ny, nz, n, nbytes;
    void *mem;
    int borrowed; /* mem is the caller's host buffer (gpu_vol_borrow on the CPU): not ours */
    int readonly; /* from gpu_vol_borrow: never a kernel's output */
};

/* Open a backend: fills *ops, *impl (closed with ops->close) and a description. The CUDA
 * backend answers LC_ERR_UNSUPPORTED when there is no driver or no device. */
lc_rc gpu_ref_open(int threads, const gpu_ops **ops, void **impl, char *desc, size_t cap,
                   lc_err *err);
#ifdef RADPIPE_HAVE_CUDA
lc_rc gpu_cuda_open(int device, const gpu_ops **ops, void **impl, char *desc, size_t cap,
                    lc_err *err);
#endif

/* Shared by the front-end files (gpu.c, gpu_morph.c, gpu_label.c, gpu_resample.c,
 * gpu_warm.c). Backend memory counted against ctx's limit (LC_ERR_TOO_LARGE past it): */
lc_rc gpu_mem_alloc(gpu_ctx *ctx, size_t nbytes, int zero, void **mem, lc_err *err);
/* mem may be NULL; nbytes as allocated. */
void gpu_mem_release(gpu_ctx *ctx, void *mem, size_t nbytes);
/* A volume, zero-filled when zero != 0 (gpu_vol_new's checks). */
lc_rc gpu_vol_alloc(gpu_ctx *ctx, gpu_dtype dtype, size_t nx, size_t ny, size_t nz, int zero,
                    gpu_vol **out, lc_err *err);
/* v is non-NULL, belongs to ctx and has dtype want; what names the argument in messages. */
lc_rc gpu_check_vol(const gpu_ctx *ctx, const gpu_vol *v, gpu_dtype want, const char *what,
                    lc_err *err);
/* gpu_check_vol for an output: also refuses read-only (borrowed) volumes. */
lc_rc gpu_check_out(const gpu_ctx *ctx, const gpu_vol *v, gpu_dtype want, const char *what,
                    lc_err *err);
/* a and b have the same dims. */
lc_rc gpu_check_dims(const gpu_vol *a, const gpu_vol *b, const char *what, lc_err *err);
const char *gpu_dtype_name(gpu_dtype t);

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

/* Rounded float operations that are never fused with a neighbour into an FMA. */
GPU_HD float gpu_fmul(float a, float b)
{
#ifdef __CUDA_ARCH__
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}

GPU_HD float gpu_fadd(float a, float b)
{
#ifdef __CUDA_ARCH__
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
}

GPU_HD float gpu_fsub(float a, float b)
{
#ifdef __CUDA_ARCH__
    return __fsub_rn(a, b);
#else
    return a - b;
#endif
}

/* a + (b - a) * t, rounded step by step on every backend. */
GPU_HD float gpu_lerp(float a, float b, float t)
{
    return gpu_fadd(a, gpu_fmul(gpu_fsub(b, a), t));
}

/* Resampling coordinates, shared verbatim by C and CUDA so both backends sample the same
 * voxels with the same weights. p = (float)i * ratio (one float product); linear: p clamped
 * to [0, n - 1], i0 = floor(p), i1 = min(i0 + 1, n - 1), t = p - i0 (exact); nearest:
 * floor(p + 0.5) clamped to [0, n - 1]. Products and sums go through gpu_fmul / gpu_fadd so nvcc
 * cannot contract them into an FMA (the host has no FMA: x86-64 without -march). */
GPU_HD void gpu_rs_linear(size_t i, float ratio, size_t n, size_t *i0, size_t *i1, float *t)
{
    float p = gpu_fmul((float)i, ratio);
    float hi = (float)(n - 1);
    if (!(p > 0.0f))
        p = 0.0f;
    if (p > hi)
        p = hi;
    float f = floorf(p);
    size_t a = (size_t)f;
    if (a > n - 1)
        a = n - 1;
    *i0 = a;
    *i1 = a + 1 < n ? a + 1 : n - 1;
    *t = p - f;
}

GPU_HD size_t gpu_rs_nearest(size_t i, float ratio, size_t n)
{
    float p = gpu_fadd(gpu_fmul((float)i, ratio), 0.5f);
    float f = floorf(p);
    if (!(f > 0.0f))
        return 0;
    if (f >= (float)(n - 1))
        return n - 1;
    return (size_t)f;
}

#endif
