/*
 * ref.c: the CPU reference backend of gpu_seg.h: "device" memory is host memory, kernels run
 * on up to `threads` pthreads over contiguous voxel ranges (ref_par.h). Results do not depend
 * on the thread count: each part writes its own partial result and parts merge in order.
 * Thread safety: the impl is read-only after open; calls may not overlap on one context.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include "ref_internal.h"
#include "ref_par.h"

static void ref_close(void *impl)
{
    free(impl);
}

/* Volumes from this size on ask for transparent huge pages: a fresh 300 MiB volume takes
 * about 77000 page faults in 4 KiB pages (0.15 s, more than a kernel's pass over it), 150 in
 * 2 MiB pages. Such sizes are mmap'ed by malloc, so the advice only covers our own pages. */
#define REF_HUGE_MIN ((size_t)32 << 20)

static void advise_huge(void *mem, size_t nbytes)
{
#ifdef MADV_HUGEPAGE
    long pg = sysconf(_SC_PAGESIZE);
    uintptr_t a = (uintptr_t)mem, b = a + nbytes;
    if (pg <= 0)
        return;
    a = (a + (uintptr_t)pg - 1) & ~((uintptr_t)pg - 1);
    b &= ~((uintptr_t)pg - 1);
    if (b > a)
        (void)madvise((void *)a, b - a, MADV_HUGEPAGE); /* advice: failure changes nothing */
#else
    (void)mem;
    (void)nbytes;
#endif
}

static lc_rc ref_alloc(void *impl, size_t nbytes, int zero, void **mem, lc_err *err)
{
    (void)impl;
    *mem = zero ? calloc(1, nbytes) : malloc(nbytes);
    if (!*mem)
        return lc_err_set(err, LC_ERR_NOMEM, "could not allocate %zu bytes for a volume", nbytes);
    if (nbytes >= REF_HUGE_MIN)
        advise_huge(*mem, nbytes);
    return LC_OK;
}

static void ref_release(void *impl, void *mem)
{
    (void)impl;
    free(mem);
}

static lc_rc ref_to_mem(void *impl, void *mem, const void *host, size_t nbytes, lc_err *err)
{
    (void)impl;
    (void)err;
    memcpy(mem, host, nbytes);
    return LC_OK;
}

static lc_rc ref_to_host(void *impl, void *host, const void *mem, size_t nbytes, lc_err *err)
{
    (void)impl;
    (void)err;
    memcpy(host, mem, nbytes);
    return LC_OK;
}

/* --- min/max ------------------------------------------------------------------------------ */

static v4f vsel(v4i m, v4f a, v4f b)
{
    return (v4f)((m & (v4i)a) | (~m & (v4i)b));
}

/* Lane-wise "v < b ? v : b" and "v > b ? v : b": NaN compares false, so a NaN v never
 * replaces b. SSE's MINPS / MAXPS are exactly these (unordered or equal: the second operand),
 * and the scalar loops below do the same, so a voxel's place in a part cannot matter. */
static v4f vmin(v4f v, v4f b)
{
#ifdef __SSE__
    return __builtin_ia32_minps(v, b);
#else
    return vsel(v < b, v, b);
#endif
}

static v4f vmax(v4f v, v4f b)
{
#ifdef __SSE__
    return __builtin_ia32_maxps(v, b);
#else
    return vsel(v > b, v, b);
#endif
}

static const v4f v4_inf = {INFINITY, INFINITY, INFINITY, INFINITY};

/* Folds the lanes of lo4 / hi4 into *lo / *hi (exact: min and max do not depend on the order,
 * -0 against +0 aside, which gpu.c settles). */
static void minmax_fold(v4f lo4, v4f hi4, float *lo, float *hi)
{
    for (int l = 0; l < 4; l++) {
        if (lo4[l] < *lo)
            *lo = lo4[l];
        if (hi4[l] > *hi)
            *hi = hi4[l];
    }
}

typedef struct minmax_job {
    const float *x;
    float lo[REF_MAX_THREADS], hi[REF_MAX_THREADS];
} minmax_job;

static void minmax_part(void *arg, int part, size_t begin, size_t end)
{
    minmax_job *job = arg;
    const float *x = job->x;
    float lo = INFINITY, hi = -INFINITY;
    v4f lo0 = v4_inf, lo1 = v4_inf, hi0 = -v4_inf, hi1 = -v4_inf;
    size_t i = begin;
    /* two accumulators of each: the loop runs at the speed of the loads */
    for (; i + 8 <= end; i += 8) {
        v4f a, b;
        memcpy(&a, x + i, sizeof(a));
        memcpy(&b, x + i + 4, sizeof(b));
        lo0 = vmin(a, lo0);
        hi0 = vmax(a, hi0);
        lo1 = vmin(b, lo1);
        hi1 = vmax(b, hi1);
    }
    minmax_fold(vmin(lo1, lo0), vmax(hi1, hi0), &lo, &hi);
    for (; i < end; i++) {
        float v = x[i];
        if (v < lo)
            lo = v;
        if (v > hi)
            hi = v;
    }
    job->lo[part] = lo;
    job->hi[part] = hi;
}

static lc_rc ref_minmax(void *impl, const float *x, size_t n, float *lo, float *hi, lc_err *err)
{
    ref_impl *r = impl;
    minmax_job job = {.x = x};
    int np = ref_parts(r->threads, n);
    float l = INFINITY, h = -INFINITY;
    (void)err;
    ref_run(r->threads, n, minmax_part, &job);
    for (int i = 0; i < np; i++) {
        if (job.lo[i] < l)
            l = job.lo[i];
        if (job.hi[i] > h)
            h = job.hi[i];
    }
    *lo = l;
    *hi = h;
    return LC_OK;
}

/* --- histogram ---------------------------------------------------------------------------- */

/* Counting: bins of 4 voxels at a time in a vector (gpu_bin_of's exact float steps), then 4
 * scalar increments, one in each of 4 copies of the histogram (32-bit counters), so runs of
 * voxels in one bin (air, soft tissue) do not wait on each other's stores. Each copy has a
 * slot past the last bin for NaN. Copies flush into the part's 64-bit histogram before a
 * counter could wrap. The min/max come along at no cost (the loop waits on its increments). */
#define HIST_COPIES 4
#define HIST_FLUSH  ((size_t)1 << 30) /* voxels between flushes: < 2^32 per counter */

typedef struct hist_job {
    const float *x;
    int nbins;
    float lo, scale;
    uint64_t *parts;  /* nbins counters per part */
    uint32_t *copies; /* HIST_COPIES * (nbins + 1) counters per part */
    float mn[REF_MAX_THREADS], mx[REF_MAX_THREADS];
} hist_job;

/* Lane-wise gpu_bin_of: f > 0 or 0 (NaN f too), at most nbins - 1 (f in [nbins - 1, nbins)
 * truncates to nbins - 1 anyway), truncated; then NaN voxels to slot nbins. */
static v4i bins4(v4f v, v4f lo, v4f scale, v4f top, v4i nan_slot)
{
    const v4f zero = {0, 0, 0, 0};
    v4f f = vmin(vmax((v - lo) * scale, zero), top);
    v4i b = __builtin_convertvector(f, v4i);
    v4i isnan_m = v != v;
    return (isnan_m & nan_slot) | (~isnan_m & b);
}

static void hist_flush(uint32_t *copies, int nbins, uint64_t *h)
{
    for (int c = 0; c < HIST_COPIES; c++) {
        uint32_t *hc = copies + (size_t)c * (size_t)(nbins + 1);
        for (int b = 0; b < nbins; b++)
            h[b] += hc[b];
        memset(hc, 0, (size_t)(nbins + 1) * sizeof(*hc));
    }
}

static void hist_part(void *arg, int part, size_t begin, size_t end)
{
    hist_job *job = arg;
    const float *x = job->x;
    int nbins = job->nbins;
    size_t stride = (size_t)nbins + 1;
    uint64_t *h = job->parts + (size_t)part * (size_t)nbins;
    uint32_t *h0 = job->copies + (size_t)part * HIST_COPIES * stride;
    uint32_t *h1 = h0 + stride, *h2 = h1 + stride, *h3 = h2 + stride;
    const v4f lo = {job->lo, job->lo, job->lo, job->lo};
    const v4f scale = {job->scale, job->scale, job->scale, job->scale};
    const float t = (float)(nbins - 1);
    const v4f top = {t, t, t, t};
    const v4i nan_slot = {nbins, nbins, nbins, nbins};
    float mn = INFINITY, mx = -INFINITY;
    v4f mn4 = v4_inf, mx4 = -v4_inf;
    size_t i = begin;

    while (i + 4 <= end) {
        size_t stop = end - i > HIST_FLUSH ? i + HIST_FLUSH : end;
        for (; i + 4 <= stop; i += 4) {
            v4f v;
            memcpy(&v, x + i, sizeof(v));
            mn4 = vmin(v, mn4);
            mx4 = vmax(v, mx4);
            /* lanes out through two 64-bit halves (cheaper than four extractions); which
             * copy counts which lane does not matter */
            v2u64 b = (v2u64)bins4(v, lo, scale, top, nan_slot);
            uint64_t b01 = b[0], b23 = b[1];
            h0[(uint32_t)b01]++;
            h1[b01 >> 32]++;
            h2[(uint32_t)b23]++;
            h3[b23 >> 32]++;
        }
        hist_flush(h0, nbins, h);
    }
    minmax_fold(mn4, mx4, &mn, &mx);
    for (; i < end; i++) {
        float v = x[i];
        if (v < mn)
            mn = v;
        if (v > mx)
            mx = v;
        if (!isnan(v))
            h[gpu_bin_of(v, job->lo, job->scale, nbins)]++;
    }
    job->mn[part] = mn;
    job->mx[part] = mx;
}

static lc_rc hist_run(ref_impl *r, const float *x, size_t n, int nbins, float lo, float scale,
                      uint64_t *hist, float *mn, float *mx, lc_err *err)
{
    int np = ref_parts(r->threads, n);
    hist_job job = {.x = x, .nbins = nbins, .lo = lo, .scale = scale};
    lc_rc rc = LC_OK;

    job.parts = calloc((size_t)np * (size_t)nbins, sizeof(*job.parts));
    job.copies = calloc((size_t)np * HIST_COPIES * ((size_t)nbins + 1), sizeof(*job.copies));
    if (!job.parts || !job.copies) {
        rc =
            lc_err_set(err, LC_ERR_NOMEM, "could not allocate %d histograms of %d bins", np, nbins);
        goto out;
    }
    ref_run(r->threads, n, hist_part, &job);
    for (int b = 0; b < nbins; b++) {
        uint64_t c = 0;
        for (int i = 0; i < np; i++)
            c += job.parts[(size_t)i * (size_t)nbins + (size_t)b];
        hist[b] = c;
    }
    if (mn) {
        float l = INFINITY, h = -INFINITY;
        for (int i = 0; i < np; i++) {
            if (job.mn[i] < l)
                l = job.mn[i];
            if (job.mx[i] > h)
                h = job.mx[i];
        }
        *mn = l;
        *mx = h;
    }
out:
    free(job.copies);
    free(job.parts);
    return rc;
}

static lc_rc ref_histogram(void *impl, const float *x, size_t n, int nbins, float lo, float scale,
                           uint64_t *hist, lc_err *err)
{
    return hist_run(impl, x, n, nbins, lo, scale, hist, NULL, NULL, err);
}

static lc_rc ref_minmax_histogram(void *impl, const float *x, size_t n, int nbins, float lo,
                                  float scale, uint64_t *hist, float *mn, float *mx, lc_err *err)
{
    return hist_run(impl, x, n, nbins, lo, scale, hist, mn, mx, err);
}

/* --- threshold ---------------------------------------------------------------------------- */

typedef struct thr_job {
    const float *x;
    float lo, hi;
    uint8_t *out;
} thr_job;

static void thr_part(void *arg, int part, size_t begin, size_t end)
{
    thr_job *job = arg;
    const float *x = job->x;
    uint8_t *out = job->out;
    const v4f lo = {job->lo, job->lo, job->lo, job->lo}, hi = {job->hi, job->hi, job->hi, job->hi};
    size_t i = begin;
    (void)part;
    for (; i + 16 <= end; i += 16) {
        v4i m[4];
        for (int k = 0; k < 4; k++) {
            v4f v;
            memcpy(&v, x + i + 4 * k, sizeof(v));
            m[k] = (v >= lo) & (v <= hi); /* NaN: false */
        }
        /* 16 lane masks (0 or -1) narrowed to 16 bytes, then 0 or 1 */
        v8s s0 = __builtin_shufflevector((v8s)m[0], (v8s)m[1], 0, 2, 4, 6, 8, 10, 12, 14);
        v8s s1 = __builtin_shufflevector((v8s)m[2], (v8s)m[3], 0, 2, 4, 6, 8, 10, 12, 14);
        v16 b = (v16)__builtin_shufflevector((v16s)s0, (v16s)s1, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18,
                                             20, 22, 24, 26, 28, 30);
        b &= 1;
        memcpy(out + i, &b, sizeof(b));
    }
    for (; i < end; i++) {
        float v = x[i];
        out[i] = v >= job->lo && v <= job->hi;
    }
}

static lc_rc ref_threshold(void *impl, const float *x, size_t n, float lo, float hi, uint8_t *out,
                           lc_err *err)
{
    ref_impl *r = impl;
    thr_job job = {.x = x, .lo = lo, .hi = hi, .out = out};
    (void)err;
    ref_run(r->threads, n, thr_part, &job);
    return LC_OK;
}

/* --- window ------------------------------------------------------------------------------- */

typedef struct win_job {
    const float *x;
    float a, b, inv;
    float *out;
} win_job;

static void win_part(void *arg, int part, size_t begin, size_t end)
{
    win_job *job = arg;
    const float *x = job->x;
    float *out = job->out;
    const v4f a = {job->a, job->a, job->a, job->a}, b = {job->b, job->b, job->b, job->b};
    const v4f inv = {job->inv, job->inv, job->inv, job->inv}, one = {1, 1, 1, 1};
    size_t i = begin;
    (void)part;
    /* the scalar formula's selections exactly (which of +-0 survives included) */
    for (; i + 4 <= end; i += 4) {
        v4f v;
        memcpy(&v, x + i, sizeof(v));
        v4f c = vsel(v < a, a, vsel(v > b, b, v));
        v4f r = (c - a) * inv;
        r = vsel(r > one, one, r);
        r = vsel(v != v, v, r);
        memcpy(out + i, &r, sizeof(r));
    }
    for (; i < end; i++) {
        float v = x[i];
        if (isnan(v)) {
            out[i] = v;
            continue;
        }
        float c = v < job->a ? job->a : v > job->b ? job->b : v;
        float r = (c - job->a) * job->inv;
        out[i] = r > 1.0f ? 1.0f : r;
    }
}

static lc_rc ref_window(void *impl, const float *x, size_t n, float a, float b, float inv,
                        float *out, lc_err *err)
{
    ref_impl *r = impl;
    win_job job = {.x = x, .a = a, .b = b, .inv = inv, .out = out};
    (void)err;
    ref_run(r->threads, n, win_part, &job);
    return LC_OK;
}

/* --- count -------------------------------------------------------------------------------- */

typedef struct count_job {
    const uint8_t *m;
    uint64_t count[REF_MAX_THREADS];
} count_job;

static void count_part(void *arg, int part, size_t begin, size_t end)
{
    count_job *job = arg;
    const uint8_t *m = job->m;
    const v16 zero = {0};
    uint64_t zeros = 0;
    size_t i = begin;
    /* byte lanes count zero bytes (a comparison gives 0 or 0xff) for up to 255 steps at once */
    while (i + 16 <= end) {
        v16 acc = zero;
        for (int k = 0; k < 255 && i + 16 <= end; k++, i += 16) {
            v16 v;
            memcpy(&v, m + i, sizeof(v));
            acc -= (v16)(v == zero);
        }
        for (int l = 0; l < 16; l++)
            zeros += acc[l];
    }
    for (; i < end; i++)
        zeros += m[i] == 0;
    job->count[part] = (uint64_t)(end - begin) - zeros;
}

static lc_rc ref_count(void *impl, const uint8_t *m, size_t n, uint64_t *count, lc_err *err)
{
    ref_impl *r = impl;
    count_job job = {.m = m};
    uint64_t c = 0;
    (void)err;
    ref_run(r->threads, n, count_part, &job);
    for (int i = 0; i < ref_parts(r->threads, n); i++)
        c += job.count[i];
    *count = c;
    return LC_OK;
}

static const gpu_ops ref_ops = {
    .close = ref_close,
    .alloc = ref_alloc,
    .release = ref_release,
    .to_mem = ref_to_mem,
    .to_host = ref_to_host,
    .minmax = ref_minmax,
    .histogram = ref_histogram,
    .minmax_histogram = ref_minmax_histogram,
    .threshold = ref_threshold,
    .window = ref_window,
    .count = ref_count,
    .morph = ref_morph,
    .label_sizes = ref_label_sizes,
    .lut = ref_lut,
    .mark_border = ref_mark_border,
    .resample = ref_resample,
    .runs_count = ref_runs_count,
    .runs_bytes = ref_runs_bytes,
    .runs_label = ref_runs_label,
    .runs_sizes = ref_runs_sizes,
    .runs_mark_border = ref_runs_mark_border,
    .runs_lut = ref_runs_lut,
    .runs_write = ref_runs_write,
};

lc_rc gpu_ref_open(int threads, const gpu_ops **ops, void **impl, char *desc, size_t cap,
                   lc_err *err)
{
    ref_impl *r;
    if (threads == 0) {
        long online = sysconf(_SC_NPROCESSORS_ONLN);
        threads = online > 0 ? (int)(online < REF_MAX_THREADS ? online : REF_MAX_THREADS) : 1;
    }
    if (threads < 1 || threads > REF_MAX_THREADS)
        return lc_err_set(err, LC_ERR_INVALID, "invalid cpu thread count %d: not in 1..%d", threads,
                          REF_MAX_THREADS);
    r = calloc(1, sizeof(*r));
    if (!r)
        return lc_err_set(err, LC_ERR_NOMEM, "could not allocate the cpu backend");
    r->threads = threads;
    snprintf(desc, cap, "cpu (%d thread%s)", threads, threads == 1 ? "" : "s");
    *ops = &ref_ops;
    *impl = r;
    return LC_OK;
}
