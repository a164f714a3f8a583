/*
 * gpu_label.c: the front-end of connected components, component sizes and filtering, and hole
 * filling (gpu_seg.h): checks arguments, allocates counted scratch, picks the components to
 * keep on the host (only per-label tables cross), and runs the backend's kernels.
 * Thread safety: a context is used by one thread at a time.
 */
#include <stdlib.h>
#include <string.h>
#include "gpu_internal.h"

static int conn_ok(int conn)
{
    return conn == 6 || conn == 26 || conn == 4 || conn == 8;
}

static lc_rc check_label_size(const gpu_vol *v, const char *what, lc_err *err)
{
    if (v->n > GPU_LABEL_MAX_VOXELS)
        return lc_err_set(err, LC_ERR_TOO_LARGE,
                          "%s: volume of %zu voxels is over the labelling limit of %zu", what, v->n,
                          GPU_LABEL_MAX_VOXELS);
    return LC_OK;
}

/* The components of the voxels of mask with (m != 0) != invert as runs (backends with the
 * runs_* operations): r's memory is counted; release it with runs_close, also after a
 * failure. */
static lc_rc runs_open(gpu_ctx *ctx, const gpu_vol *mask, int invert, int conn, gpu_runs *r,
                       lc_err *err)
{
    lc_rc rc;
    void *row = NULL, *runs = NULL;
    *r = (gpu_runs){.nx = mask->nx, .ny = mask->ny, .nz = mask->nz, .invert = invert};
    r->row_bytes = (mask->ny * mask->nz + 1) * sizeof(int32_t);
    if ((rc = gpu_mem_alloc(ctx, r->row_bytes, 0, &row, err)) != LC_OK)
        return rc;
    r->row = row;
    if ((rc = ctx->ops->runs_count(ctx->impl, mask->mem, r, err)) != LC_OK)
        return rc;
    r->run_bytes = ctx->ops->runs_bytes(ctx->impl, r->nruns);
    if (r->run_bytes && (rc = gpu_mem_alloc(ctx, r->run_bytes, 0, &runs, err)) != LC_OK)
        return rc;
    r->runs = runs;
    return ctx->ops->runs_label(ctx->impl, mask->mem, conn, r, err);
}

static void runs_close(gpu_ctx *ctx, gpu_runs *r)
{
    gpu_mem_release(ctx, r->runs, r->run_bytes);
    gpu_mem_release(ctx, r->row, r->row_bytes);
    r->runs = NULL;
    r->row = NULL;
}

/* Labels of the voxels of mask with (m != 0) != invert into labels (checked by the caller). */
static lc_rc run_label(gpu_ctx *ctx, const gpu_vol *mask, int invert, int conn, gpu_vol *labels,
                       size_t *nlabels, lc_err *err)
{
    size_t dims[3] = {mask->nx, mask->ny, mask->nz};
    lc_rc rc = LC_OK;
    if (ctx->ops->runs_label) {
        gpu_runs r;
        if ((rc = runs_open(ctx, mask, invert, conn, &r, err)) == LC_OK &&
            (rc = ctx->ops->runs_write(ctx->impl, &r, labels->mem, err)) == LC_OK)
            *nlabels = r.nlabels;
        runs_close(ctx, &r);
        return rc;
    }
    size_t sbytes = ctx->ops->label_scratch(ctx->impl, mask->n);
    void *scratch = NULL;
    if (sbytes && (rc = gpu_mem_alloc(ctx, sbytes, 0, &scratch, err)) != LC_OK)
        return rc;
    rc = ctx->ops->label(ctx->impl, mask->mem, invert, dims, conn, labels->mem, scratch, nlabels,
                         err);
    gpu_mem_release(ctx, scratch, sbytes);
    return rc;
}

lc_rc gpu_label(gpu_ctx *ctx, const gpu_vol *mask, int connectivity, gpu_vol *labels,
                size_t *nlabels, lc_err *err)
{
    lc_rc rc = gpu_check_vol(ctx, mask, GPU_U8, "gpu_label input", err);
    if (rc == LC_OK)
        rc = gpu_check_out(ctx, labels, GPU_I32, "gpu_label output", err);
    if (rc == LC_OK)
        rc = gpu_check_dims(mask, labels, "gpu_label", err);
    if (rc == LC_OK)
        rc = check_label_size(mask, "gpu_label", err);
    if (rc != LC_OK)
        return rc;
    if (!nlabels)
        return lc_err_set(err, LC_ERR_INVALID, "gpu_label: nlabels is NULL");
    if (!conn_ok(connectivity))
        return lc_err_set(err, LC_ERR_INVALID, "invalid connectivity %d: not 4, 6, 8 or 26",
                          connectivity);
    return run_label(ctx, mask, 0, connectivity, labels, nlabels, err);
}

lc_rc gpu_label_sizes(gpu_ctx *ctx, const gpu_vol *labels, size_t nlabels, uint64_t *sizes,
                      lc_err *err)
{
    uint64_t *host = NULL;
    void *counts = NULL;
    size_t nbytes;
    lc_rc rc = gpu_check_vol(ctx, labels, GPU_I32, "gpu_label_sizes", err);
    if (rc != LC_OK)
        return rc;
    if (!sizes)
        return lc_err_set(err, LC_ERR_INVALID, "gpu_label_sizes: sizes is NULL");
    if (nlabels > labels->n || nlabels > (size_t)INT32_MAX)
        return lc_err_set(err, LC_ERR_INVALID,
                          "gpu_label_sizes: %zu labels cannot come from %zu voxels", nlabels,
                          labels->n);
    nbytes = (nlabels + 2) * sizeof(uint64_t);
    host = malloc(nbytes);
    if (!host)
        return lc_err_set(err, LC_ERR_NOMEM, "could not allocate %zu label counters", nlabels + 2);
    if ((rc = gpu_mem_alloc(ctx, nbytes, 1, &counts, err)) != LC_OK ||
        (rc = ctx->ops->label_sizes(ctx->impl, labels->mem, labels->n, nlabels, counts, err)) !=
            LC_OK ||
        (rc = ctx->ops->to_host(ctx->impl, host, counts, nbytes, err)) != LC_OK)
        goto out;
    if (host[nlabels + 1]) {
        rc = lc_err_set(err, LC_ERR_INVALID,
                        "label volume holds %llu voxels with labels outside 0..%zu",
                        (unsigned long long)host[nlabels + 1], nlabels);
        goto out;
    }
    memcpy(sizes, host, (nlabels + 1) * sizeof(uint64_t));
out:
    gpu_mem_release(ctx, counts, nbytes);
    free(host);
    return rc;
}

typedef struct cand {
    uint64_t size;
    size_t label;
} cand;

/* Larger first; equal sizes by label, smaller (earlier first voxel) first. */
static int cand_cmp(const void *a, const void *b)
{
    const cand *x = a, *y = b;
    if (x->size != y->size)
        return x->size > y->size ? -1 : 1;
    return x->label < y->label ? -1 : x->label > y->label;
}

/* table[l] = 1 (table: host, nlabels + 1 zeroed entries) for the components that
 * gpu_select_components keeps, given their sizes (sizes[1..nlabels]); *kept: how many. */
static lc_rc pick_components(const uint64_t *sizes, size_t nlabels, size_t keep_largest,
                             uint64_t min_voxels, uint8_t *table, size_t *kept, lc_err *err)
{
    size_t nc = 0;
    if (keep_largest == 1) {
        /* the largest alone: one scan, the first (smallest) label wins ties */
        size_t best = 0;
        for (size_t l = 1; l <= nlabels; l++)
            if (sizes[l] >= min_voxels && sizes[l] > 0 && (!best || sizes[l] > sizes[best]))
                best = l;
        if (best)
            table[best] = 1;
        *kept = best != 0;
        return LC_OK;
    }
    cand *c = malloc((nlabels + 1) * sizeof(*c));
    if (!c)
        return lc_err_set(err, LC_ERR_NOMEM, "could not allocate tables for %zu labels", nlabels);
    for (size_t l = 1; l <= nlabels; l++)
        if (sizes[l] >= min_voxels && sizes[l] > 0)
            c[nc++] = (cand){.size = sizes[l], .label = l};
    if (keep_largest && nc > keep_largest) {
        qsort(c, nc, sizeof(*c), cand_cmp);
        nc = keep_largest;
    }
    for (size_t i = 0; i < nc; i++)
        table[c[i].label] = 1;
    free(c);
    *kept = nc;
    return LC_OK;
}

lc_rc gpu_select_components(gpu_ctx *ctx, const gpu_vol *labels, size_t nlabels,
                            size_t keep_largest, uint64_t min_voxels, gpu_vol *out, size_t *kept,
                            lc_err *err)
{
    uint64_t *sizes = NULL;
    uint8_t *table = NULL;
    void *dtable = NULL;
    size_t nc = 0, ntable = nlabels + 1;
    lc_rc rc = gpu_check_vol(ctx, labels, GPU_I32, "gpu_select_components input", err);
    if (rc == LC_OK)
        rc = gpu_check_out(ctx, out, GPU_U8, "gpu_select_components output", err);
    if (rc == LC_OK)
        rc = gpu_check_dims(labels, out, "gpu_select_components", err);
    if (rc != LC_OK)
        return rc;
    if (nlabels > labels->n)
        return lc_err_set(err, LC_ERR_INVALID,
                          "gpu_select_components: %zu labels cannot come from %zu voxels", nlabels,
                          labels->n);
    sizes = malloc(ntable * sizeof(*sizes));
    table = calloc(ntable, 1);
    if (!sizes || !table) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "could not allocate tables for %zu labels", nlabels);
        goto out;
    }
    if ((rc = gpu_label_sizes(ctx, labels, nlabels, sizes, err)) != LC_OK ||
        (rc = pick_components(sizes, nlabels, keep_largest, min_voxels, table, &nc, err)) != LC_OK)
        goto out;
    if ((rc = gpu_mem_alloc(ctx, ntable, 0, &dtable, err)) != LC_OK ||
        (rc = ctx->ops->to_mem(ctx->impl, dtable, table, ntable, err)) != LC_OK ||
        (rc = ctx->ops->lut(ctx->impl, labels->mem, labels->n, dtable, ntable, 0, out->mem, err)) !=
            LC_OK)
        goto out;
    if (kept)
        *kept = nc;
out:
    gpu_mem_release(ctx, dtable, ntable);
    free(table);
    free(sizes);
    return rc;
}

/* gpu_keep_largest on the runs: sizes from the runs, the kept runs written to out; no label
 * volume. */
static lc_rc keep_runs(gpu_ctx *ctx, const gpu_vol *in, int connectivity, size_t keep_largest,
                       uint64_t min_voxels, gpu_vol *out, size_t *kept, lc_err *err)
{
    gpu_runs r;
    uint64_t *sizes = NULL;
    uint8_t *table = NULL;
    void *dcounts = NULL, *dtable = NULL;
    size_t nc = 0, ntable = 0, cbytes = 0;
    lc_rc rc = runs_open(ctx, in, 0, connectivity, &r, err);
    if (rc != LC_OK)
        goto out;
    ntable = r.nlabels + 1;
    cbytes = ntable * sizeof(uint64_t);
    sizes = malloc(cbytes);
    table = calloc(ntable, 1);
    if (!sizes || !table) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "could not allocate tables for %zu labels", r.nlabels);
        goto out;
    }
    if ((rc = gpu_mem_alloc(ctx, cbytes, 1, &dcounts, err)) != LC_OK ||
        (rc = ctx->ops->runs_sizes(ctx->impl, &r, dcounts, err)) != LC_OK ||
        (rc = ctx->ops->to_host(ctx->impl, sizes, dcounts, cbytes, err)) != LC_OK ||
        (rc = pick_components(sizes, r.nlabels, keep_largest, min_voxels, table, &nc, err)) !=
            LC_OK)
        goto out;
    if ((rc = gpu_mem_alloc(ctx, ntable, 0, &dtable, err)) != LC_OK ||
        (rc = ctx->ops->to_mem(ctx->impl, dtable, table, ntable, err)) != LC_OK ||
        (rc = ctx->ops->runs_lut(ctx->impl, &r, dtable, 0, out->mem, err)) != LC_OK)
        goto out;
    if (kept)
        *kept = nc;
out:
    gpu_mem_release(ctx, dtable, ntable);
    gpu_mem_release(ctx, dcounts, cbytes);
    runs_close(ctx, &r);
    free(table);
    free(sizes);
    return rc;
}

lc_rc gpu_keep_largest(gpu_ctx *ctx, const gpu_vol *in, int connectivity, size_t keep_largest,
                       uint64_t min_voxels, gpu_vol *out, size_t *kept, lc_err *err)
{
    gpu_vol *labels = NULL;
    size_t nl = 0;
    lc_rc rc = gpu_check_vol(ctx, in, GPU_U8, "gpu_keep_largest input", err);
    if (rc == LC_OK)
        rc = gpu_check_out(ctx, out, GPU_U8, "gpu_keep_largest output", err);
    if (rc == LC_OK)
        rc = gpu_check_dims(in, out, "gpu_keep_largest", err);
    if (rc != LC_OK)
        return rc;
    if (ctx->ops->runs_label) {
        if ((rc = check_label_size(in, "gpu_keep_largest", err)) != LC_OK)
            return rc;
        if (!conn_ok(connectivity))
            return lc_err_set(err, LC_ERR_INVALID, "invalid connectivity %d: not 4, 6, 8 or 26",
                              connectivity);
        return keep_runs(ctx, in, connectivity, keep_largest, min_voxels, out, kept, err);
    }
    if ((rc = gpu_vol_alloc(ctx, GPU_I32, in->nx, in->ny, in->nz, 0, &labels, err)) == LC_OK &&
        (rc = gpu_label(ctx, in, connectivity, labels, &nl, err)) == LC_OK)
        rc = gpu_select_components(ctx, labels, nl, keep_largest, min_voxels, out, kept, err);
    gpu_vol_free(labels);
    return rc;
}

lc_rc gpu_fill_holes(gpu_ctx *ctx, const gpu_vol *in, int bg_connectivity, gpu_vol *out,
                     lc_err *err)
{
    gpu_vol *labels = NULL;
    void *table = NULL;
    size_t nl = 0, ntable = 0;
    size_t dims[3];
    lc_rc rc = gpu_check_vol(ctx, in, GPU_U8, "gpu_fill_holes input", err);
    if (rc == LC_OK)
        rc = gpu_check_out(ctx, out, GPU_U8, "gpu_fill_holes output", err);
    if (rc == LC_OK)
        rc = gpu_check_dims(in, out, "gpu_fill_holes", err);
    if (rc == LC_OK)
        rc = check_label_size(in, "gpu_fill_holes", err);
    if (rc != LC_OK)
        return rc;
    if (!conn_ok(bg_connectivity))
        return lc_err_set(err, LC_ERR_INVALID,
                          "invalid background connectivity %d: not 4, 6, 8 or 26", bg_connectivity);
    dims[0] = in->nx;
    dims[1] = in->ny;
    dims[2] = in->nz;
    /* Background components (labels of the complement); those touching the border are marked
     * in a table, and out = 1 except on marked components: table[0] (foreground) is never
     * marked, so out = table[label] ^ 1 keeps the foreground and fills unmarked cavities. */
    int planar = bg_connectivity == 4 || bg_connectivity == 8;
    if (ctx->ops->runs_label) {
        gpu_runs r;
        if ((rc = runs_open(ctx, in, 1, bg_connectivity, &r, err)) == LC_OK) {
            ntable = r.nlabels + 1;
            if ((rc = gpu_mem_alloc(ctx, ntable, 1, &table, err)) == LC_OK &&
                (rc = ctx->ops->runs_mark_border(ctx->impl, &r, planar, table, err)) == LC_OK)
                rc = ctx->ops->runs_lut(ctx->impl, &r, table, 1, out->mem, err);
        }
        runs_close(ctx, &r);
        goto out;
    }
    if ((rc = gpu_vol_alloc(ctx, GPU_I32, in->nx, in->ny, in->nz, 0, &labels, err)) != LC_OK ||
        (rc = run_label(ctx, in, 1, bg_connectivity, labels, &nl, err)) != LC_OK)
        goto out;
    ntable = nl + 1;
    if ((rc = gpu_mem_alloc(ctx, ntable, 1, &table, err)) != LC_OK ||
        (rc = ctx->ops->mark_border(ctx->impl, labels->mem, dims, planar, table, ntable, err)) !=
            LC_OK)
        goto out;
    rc = ctx->ops->lut(ctx->impl, labels->mem, labels->n, table, ntable, 1, out->mem, err);
out:
    gpu_mem_release(ctx, table, ntable);
    gpu_vol_free(labels);
    return rc;
}
