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
#include <unistd.h>
#include "ref_internal.h"
#include "ref_par.h"

static void ref_close(void *impl)
{
    free(impl);
}

static lc_rc ref_alloc(void *impl, size_t nbytes, int zero, void **mem, lc_err *err)
{
    (void)impl;
    *mem = zero ? calloc(1, nbytes) : malloc(nbytes);
    if (!*mem)
        return lc_err_set(err, LC_ERR_NOMEM, "could not allocate %zu bytes for a volume", nbytes);
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

typedef struct minmax_job {
    const float *x;
    float lo[REF_MAX_THREADS], hi[REF_MAX_THREADS];
} minmax_job;

static void minmax_part(void *arg, int part, size_t begin, size_t end)
{
    minmax_job *job = arg;
    float lo = INFINITY, hi = -INFINITY;
    for (size_t i = begin; i < end; i++) {
        float v = job->x[i];
        /* NaN compares false both ways, so it never replaces a bound */
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

typedef struct hist_job {
    const float *x;
    int nbins;
    float lo, scale;
    uint64_t *parts; /* nbins counters per part */
} hist_job;

static void hist_part(void *arg, int part, size_t begin, size_t end)
{
    hist_job *job = arg;
    uint64_t *h = job->parts + (size_t)part * (size_t)job->nbins;
    for (size_t i = begin; i < end; i++) {
        float v = job->x[i];
        if (!isnan(v))
            h[gpu_bin_of(v, job->lo, job->scale, job->nbins)]++;
    }
}

static lc_rc ref_histogram(void *impl, const float *x, size_t n, int nbins, float lo, float scale,
                           uint64_t *hist, lc_err *err)
{
    ref_impl *r = impl;
    int np = ref_parts(r->threads, n);
    hist_job job = {.x = x, .nbins = nbins, .lo = lo, .scale = scale};

    job.parts = calloc((size_t)np * (size_t)nbins, sizeof(*job.parts));
    if (!job.parts)
        return lc_err_set(err, LC_ERR_NOMEM, "could not allocate %d histograms of %d bins", np,
                          nbins);
    ref_run(r->threads, n, hist_part, &job);
    for (int b = 0; b < nbins; b++) {
        uint64_t c = 0;
        for (int i = 0; i < np; i++)
            c += job.parts[(size_t)i * (size_t)nbins + (size_t)b];
        hist[b] = c;
    }
    free(job.parts);
    return LC_OK;
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
    (void)part;
    for (size_t i = begin; i < end; i++) {
        float v = job->x[i];
        job->out[i] = v >= job->lo && v <= job->hi;
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
    (void)part;
    for (size_t i = begin; i < end; i++) {
        float v = job->x[i];
        if (isnan(v)) {
            job->out[i] = v;
            continue;
        }
        float c = v < job->a ? job->a : v > job->b ? job->b : v;
        float r = (c - job->a) * job->inv;
        job->out[i] = r > 1.0f ? 1.0f : r;
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
    uint64_t c = 0;
    for (size_t i = begin; i < end; i++)
        c += job->m[i] != 0;
    job->count[part] = c;
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
    .threshold = ref_threshold,
    .window = ref_window,
    .count = ref_count,
    .morph = ref_morph,
    .label_scratch = ref_label_scratch,
    .label = ref_label,
    .label_sizes = ref_label_sizes,
    .lut = ref_lut,
    .mark_border = ref_mark_border,
    .resample = ref_resample,
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
